"""API key, endpoint and environment, read the way the official SDK reads them."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from ._config import normalise_environment

__all__ = [
    "API_KEY_RE",
    "DEFAULT_ENDPOINT",
    "Credentials",
    "in_clear_warning",
    "mask_key",
    "resolve_environment",
]

API_KEY_RE = re.compile(r"ags_[a-f0-9]{32}_[a-f0-9]{6}", re.IGNORECASE)
DEFAULT_ENDPOINT = "https://api.agentsight.io"


def mask_key(key: str) -> str:
    """Enough of a key to tell two apart in a log, never enough to use it."""
    return key[:8] + "********" if len(key) > 12 else "********"


def resolve_environment(
    environment: str | None, env: Mapping[str, str] | None = None
) -> str | None:
    """``environment`` if given, else ``AGENTSIGHT_ENVIRONMENT``, normalised; None if neither.

    A value that is not an environment fails, naming where it came from.
    """
    chosen: str | None
    if environment is not None:
        chosen, argument = environment, "environment"
    else:
        chosen = (os.environ if env is None else env).get("AGENTSIGHT_ENVIRONMENT")
        argument = "AGENTSIGHT_ENVIRONMENT"
    return normalise_environment(chosen, argument=argument) if chosen else None


@dataclass(frozen=True, repr=False)
class Credentials:
    api_key: str
    endpoint: str
    environment: str | None

    def __repr__(self) -> str:
        return (
            f"Credentials(api_key={mask_key(self.api_key)!r}, endpoint={self.endpoint!r}, "
            f"environment={self.environment!r})"
        )

    @property
    def conversations_url(self) -> str:
        # The backend has APPEND_SLASH off: the trailing slash is part of the route.
        return self.endpoint.rstrip("/") + "/api/conversations/"

    @property
    def in_clear(self) -> bool:
        """Whether the key would cross a network unencrypted: ``http://`` to a host that is
        not this machine (the stand-in API or a local relay on loopback is fine)."""
        parts = urlsplit(self.endpoint)
        if parts.scheme != "http":
            return False
        host = (parts.hostname or "").lower().rstrip(".")
        if host == "localhost" or host.endswith(".localhost"):
            return False
        try:
            return not ipaddress.ip_address(host).is_loopback
        except ValueError:
            return True

    @classmethod
    def resolve(
        cls,
        *,
        api_key: str | None,
        endpoint: str | None,
        environment: str | None,
        env: Mapping[str, str] | None = None,
        names: tuple[str, str] = ("api_key=", "endpoint="),
        read_environment: bool = True,
    ) -> Credentials | None:
        """Arguments first, then ``AGENTSIGHT_*`` variables; None when there is no key.

        ``names`` are what an error calls ``api_key`` and ``endpoint`` when they were given:
        the arguments' names, or the command line's flags (``--api-key``, ``--endpoint``).
        With ``read_environment`` false, the environment is None and
        ``AGENTSIGHT_ENVIRONMENT`` is not read (``send`` replays stored bodies as they are).
        """
        key_name, endpoint_name = names
        env = os.environ if env is None else env
        if api_key is not None and not isinstance(api_key, str):
            raise ValueError(f"api_key must be a string (ags_...), got {type(api_key).__name__}")
        key = api_key if api_key is not None else env.get("AGENTSIGHT_API_KEY")
        given = endpoint if endpoint is not None else env.get("AGENTSIGHT_API_ENDPOINT")
        # Checked with or without a key: a typo must fail at start-up, not on the day the
        # key is set in production.
        base = _endpoint(
            given, endpoint_name if endpoint is not None else "AGENTSIGHT_API_ENDPOINT"
        )
        if key is None or not key.strip():
            return None
        key = key.strip()
        if not API_KEY_RE.fullmatch(key):
            where = key_name if api_key is not None else "AGENTSIGHT_API_KEY"
            if API_KEY_RE.fullmatch(key.strip("'\"")):
                # docker --env-file and some .env loaders keep the quotes as part of the value.
                fix = "remove the quotes around it (the tool that set it kept them)"
            else:
                fix = "copy it again from the AgentSight dashboard"
            raise ValueError(
                f"{where} {mask_key(key)!r} is not an AgentSight API key: keys look like "
                f"ags_<32 hex digits>_<6 hex digits>; {fix}"
            )
        if not read_environment:
            return cls(api_key=key, endpoint=base, environment=None)
        return cls(api_key=key, endpoint=base, environment=resolve_environment(environment, env))


def _endpoint(given: object, where: str) -> str:
    """The API's base URL from what was given (None or blank: the default), or a ValueError
    naming ``where`` and what to write."""
    if given is not None and not isinstance(given, str):
        raise ValueError(
            f"{where} must be a URL string such as {DEFAULT_ENDPOINT!r}, got {type(given).__name__}"
        )
    base = (given or DEFAULT_ENDPOINT).strip()
    try:
        parts = urlsplit(base)
        parts.port  # noqa: B018 - raises for a port out of range or not a number
    except ValueError as exc:
        raise ValueError(f"{where} {base!r} is not a valid URL: {exc}") from None
    if parts.scheme.lower() not in ("http", "https") or not base[len(parts.scheme) :].startswith(
        "://"
    ):
        raise ValueError(
            f"{where} {base!r} must be an http:// or https:// URL, e.g. {DEFAULT_ENDPOINT!r}"
        )
    # The scheme is case-insensitive (RFC 3986 3.1); the client compares it in lower case.
    base = parts.scheme.lower() + base[len(parts.scheme) :]
    if not parts.hostname or any(ch.isspace() or ch in '\\<>"{}|^`' for ch in parts.netloc):
        raise ValueError(
            f"{where} {base!r} has no host or an invalid one, e.g. {DEFAULT_ENDPOINT!r}"
        )
    if parts.query or parts.fragment or "?" in base or "#" in base:
        raise ValueError(
            f"{where} {base!r}: the API's base URL takes no ?query or #fragment (events go to "
            f"<base>/api/conversations/), e.g. {DEFAULT_ENDPOINT!r}"
        )
    # The events URL pasted whole: events would go to .../api/conversations/api/conversations/,
    # a 404 the worker only reports once the first event is out.
    path = parts.path.rstrip("/")
    if path.lower().endswith("/api/conversations"):
        trimmed = base[: base.lower().rindex("/api/conversations")]
        raise ValueError(
            f"{where} {base!r} is the events URL itself: pass the API's base URL, "
            f"{trimmed!r} (events go to <base>/api/conversations/)"
        )
    return base


def in_clear_warning(credentials: Credentials, where: str) -> str:
    """What to say when :attr:`Credentials.in_clear`: ``where`` names the setting."""
    return (
        f"{where} {credentials.endpoint!r} is plain http:// to another host: the API key "
        f"({mask_key(credentials.api_key)}) and the visitors' IP addresses cross the network "
        f"in clear text, readable and reusable by anyone on the way. Use https:// "
        f"(e.g. {DEFAULT_ENDPOINT!r})"
    )
