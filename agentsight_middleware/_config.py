"""Configuration shared by the ASGI and WSGI middleware: validated once, at start-up.

Every argument is checked in :class:`Settings` so that a mistake fails when the
app starts, with a message that names the argument and says what to write
instead, never on the first request.
"""

from __future__ import annotations

import enum
import functools
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final, Literal

from ._conversation import (
    ID_SOURCES,
    MINTED,
    clean_id,
    cookie_value,
    form_field,
    json_field,
    query_field,
)
from ._facts import (
    DEFAULT_NON_BROWSER_AGENTS,
    ForwardedHeader,
    TrustedProxies,
    compile_agent_matcher,
)
from ._log import logger
from ._rules import RuleSet

__all__ = ["NEED_BODY", "Settings", "normalise_environment"]


class _Body(enum.Enum):
    NEEDED = "needed"


#: ``Settings.find_id`` answer meaning "the id may be in the body: read it and ask again".
NEED_BODY: Final = _Body.NEEDED

_ENVIRONMENTS = {
    "production": "production",
    "prod": "production",
    "development": "development",
    "dev": "development",
}
# RFC 6265 cookie-name (an RFC 9110 token).
_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def normalise_environment(value: str, *, argument: str = "environment") -> str:
    slug = _ENVIRONMENTS.get(value.strip().lower()) if isinstance(value, str) else None
    if slug is None:
        fix = "use 'production' or 'development' (or 'prod' / 'dev')"
        if argument == "environment" and isinstance(value, str) and value.strip():
            # With tracker=, the SDK reads the variable itself, and sends what it holds: an
            # environment of the agent's own (0.1.x checks it against them) works there.
            fix += (
                f", the two every agent has; for an environment your agent has of its own, "
                f"pass the SDK as tracker=, leave environment= out and set "
                f"AGENTSIGHT_ENVIRONMENT={value.strip()!r}: the SDK reads it"
            )
        raise ValueError(f"{argument}={value!r} is not an AgentSight environment; {fix}")
    return slug


#: The longest wait an option may ask for: a day. Longer ones overflow the clocks that
#: threads and event loops wait on (1e12 s), and no shutdown or tracker call should.
MAX_SECONDS = 86400.0


def positive_seconds(name: str, value: object, *, allow_zero: bool = False) -> float:
    """``value`` as seconds, or a ValueError naming ``name`` and what to write instead."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name} must be a number of seconds, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero) or value > MAX_SECONDS:
        least = ">= 0" if allow_zero else "> 0"
        raise ValueError(
            f"{name} must be seconds {least} and at most {MAX_SECONDS:.0f} (a day), got {value!r}"
        )
    return float(value)


class Settings:
    """Everything derivable from the arguments, computed once."""

    def __init__(
        self,
        *,
        widget_pages: Iterable[str | re.Pattern[str]] = (),
        chat_routes: Iterable[str | re.Pattern[str]] = (),
        trusted_proxies: Sequence[str] | int | None = None,
        trusted_proxy_header: ForwardedHeader = "auto",
        cookie_name: str = "agentsight_conversation_id",
        cookie_max_age: int | None = 1800,
        conversation_id_sources: Sequence[str] = ID_SOURCES,
        conversation_id_header: str = "X-Conversation-ID",
        conversation_id_field: str = "conversation_id",
        max_body_peek: int = 64 * 1024,
        non_browser_agents: Iterable[str] = DEFAULT_NON_BROWSER_AGENTS,
        source: str | None = "web",
        environment: str | None = None,
        customer_id: Callable[[Any], Any] | None = None,
        metadata: Mapping[str, Any] | Callable[[Any], Mapping[str, Any] | None] | None = None,
        tracker_timeout: float = 5.0,
    ) -> None:
        self.rules = RuleSet(widget_pages, chat_routes)
        if not self.rules:
            raise ValueError(
                "no rules: pass widget_pages=[...] (pages that show the chat widget, e.g. ['/']) "
                "and/or chat_routes=[...] (chat API routes, e.g. ['POST /api/chat']). It "
                "wraps the whole application (Django: in wsgi.py or asgi.py; it is not a "
                "settings.MIDDLEWARE entry)"
            )
        self.trusted_proxies = TrustedProxies(trusted_proxies, header=trusted_proxy_header)
        self.is_non_browser = compile_agent_matcher(non_browser_agents)

        if not isinstance(cookie_name, str) or not _TOKEN_RE.fullmatch(cookie_name):
            raise ValueError(
                f"cookie_name={cookie_name!r} is not a valid cookie name; "
                "use letters, digits and '_' (e.g. 'agentsight_conversation_id')"
            )
        self.cookie_name = cookie_name
        # RFC 6265bis 4.1.3: browsers drop a __Secure- or __Host- cookie set without Secure
        # (the id would never come back), and a __Host- one with a Domain or another Path.
        prefixed = cookie_name.startswith(("__Secure-", "__Host-"))
        if cookie_max_age is not None and (
            isinstance(cookie_max_age, bool)
            or not isinstance(cookie_max_age, int)
            or cookie_max_age <= 0
        ):
            raise ValueError(
                f"cookie_max_age must be a positive number of seconds or None "
                f"(a browser-session cookie), got {cookie_max_age!r}"
            )
        self.cookie_max_age = cookie_max_age
        attrs = "; Path=/; SameSite=Lax"
        if cookie_max_age is not None:
            attrs += f"; Max-Age={cookie_max_age}"
        # Not HttpOnly: the widget's script reads the id to send it with chat requests.
        self._cookie_attrs = attrs.encode("latin-1")
        # Set-Cookie built from precomputed pieces, indexed by "secure": it is on the
        # path of every page view.
        self._cookie_start = f"{cookie_name}=".encode("latin-1")
        secure = self._cookie_attrs + b"; Secure"
        self._cookie_ends = (secure if prefixed else self._cookie_attrs, secure)
        self._cookie_text = (
            f"{cookie_name}=",
            attrs + "; Secure" if prefixed else attrs,
            attrs + "; Secure",
        )

        if isinstance(conversation_id_sources, str):
            raise ValueError(
                "conversation_id_sources must be a list such as ['header', 'cookie'], "
                "not a single string"
            )
        try:
            sources = tuple(conversation_id_sources)
        except TypeError:
            raise ValueError(
                "conversation_id_sources must be a list such as ['header', 'cookie'], "
                f"got {conversation_id_sources!r}"
            ) from None
        if not sources:
            raise ValueError(
                "conversation_id_sources=[] would start a new conversation on every chat "
                f"request: name at least one of {', '.join(ID_SOURCES)}"
            )
        unknown = [s for s in sources if s not in ID_SOURCES]
        if unknown or len(set(sources)) != len(sources):
            raise ValueError(
                f"conversation_id_sources={list(sources)!r}: each of {', '.join(ID_SOURCES)} "
                f"may appear once (unknown: {unknown!r})"
            )
        self.id_sources = sources
        if not isinstance(conversation_id_header, str) or not _TOKEN_RE.fullmatch(
            conversation_id_header
        ):
            raise ValueError(
                f"conversation_id_header={conversation_id_header!r} is not a valid header name"
            )
        self.id_header = conversation_id_header.lower()
        if "_" in conversation_id_header and "header" in sources:
            # Valid HTTP, but gunicorn (header_map=drop) and nginx (underscores_in_headers
            # off) drop such headers by default: the id would silently never arrive.
            logger.warning(
                "conversation_id_header=%r contains '_': gunicorn and nginx drop such headers "
                "by default, so the id may never arrive; prefer '-' (e.g. %r)",
                conversation_id_header,
                conversation_id_header.replace("_", "-"),
            )
        if not isinstance(conversation_id_field, str) or not conversation_id_field:
            raise ValueError("conversation_id_field must be a non-empty string")
        self.id_field = conversation_id_field

        if (
            isinstance(max_body_peek, bool)
            or not isinstance(max_body_peek, int)
            or max_body_peek < 0
        ):
            raise ValueError(
                f"max_body_peek must be a number of bytes >= 0 (0 turns body lookup off), "
                f"got {max_body_peek!r}"
            )
        self.max_body_peek = max_body_peek
        self.reads_body = max_body_peek > 0 and ("json" in sources or "form" in sources)
        # find_id's sources for each kind of body (None: no body it reads), the other
        # body source left out; and from that kind's source on, for its second call.
        self._plans: dict[str | None, tuple[str, ...]] = {
            kind: tuple(s for s in sources if s == kind or s not in ("json", "form"))
            for kind in (None, "json", "form")
        }
        self._plans_with_body: dict[str, tuple[str, ...]] = {
            kind: plan[plan.index(kind) :]
            for kind, plan in self._plans.items()
            if kind is not None and kind in plan
        }

        if source is not None and not isinstance(source, str):
            raise ValueError(f"source must be a string such as 'web' or None, got {source!r}")
        self.source = source
        self.environment = None if environment is None else normalise_environment(environment)

        if customer_id is not None and not callable(customer_id):
            raise ValueError(
                "customer_id must be a callable taking the request and returning an id or None"
            )
        self.customer_id_hook = customer_id
        if metadata is not None and not (callable(metadata) or isinstance(metadata, Mapping)):
            raise ValueError(
                "metadata must be a dict, or a callable taking the request and returning a dict"
            )
        self.metadata_hook = metadata
        self.has_hooks = customer_id is not None or metadata is not None
        self.tracker_timeout = positive_seconds("tracker_timeout", tracker_timeout)

    def set_cookie(self, conversation_id: str, *, secure: bool) -> bytes:
        return self._cookie_start + conversation_id.encode("latin-1") + self._cookie_ends[secure]

    def set_cookie_text(self, conversation_id: str, secure: bool) -> str:
        """:meth:`set_cookie` as the ``str`` a WSGI header holds."""
        start, plain, with_secure = self._cookie_text
        # Ids are ASCII (validated or minted), so this equals the bytes decoded as latin-1.
        return start + conversation_id + (with_secure if secure else plain)

    def renews_cookie(self, id_source: str, conversation_id: str, cookie: str | None) -> bool:
        """Whether a chat's answer sets the id cookie: when the id was just minted, or is the
        one the request's own cookie carries, found there or first in another source (a
        widget that sends the cookie's id in the header too, as a same-origin ``fetch()``
        sends the cookie with it): the visit's cookie slides while the visitor chats."""
        if id_source == MINTED or id_source == "cookie":
            return True
        return cookie is not None and cookie_value(cookie, self.cookie_name) == conversation_id

    def find_id(
        self,
        params: Mapping[str, str],
        id_header: str | None,
        content_type: str | None,
        cookie: str | None,
        query: str,
        body: bytes | None,
    ) -> tuple[str, str] | Literal[_Body.NEEDED] | None:
        """``(id, source)`` from the first configured source that has a valid id.

        ``id_header`` is the value of the configured id header and ``cookie`` the
        ``Cookie`` header, as the glue read them. Returns :data:`NEED_BODY` when a body
        source comes next and ``body`` is None: the glue then reads (peeks at) the
        body and asks again.
        """
        kind = _body_kind(content_type) if self.reads_body else None
        if body is None or kind is None:
            sources = self._plans[kind]
        else:  # the second call, with the body: the sources before it were tried already
            sources = self._plans_with_body.get(kind, ())
        field = self.id_field
        # Each source returns as soon as it has an id: this runs on every chat request.
        for source in sources:
            if source == "cookie":
                if cookie:
                    value = cookie_value(cookie, self.cookie_name)
                    if value is not None:
                        return value, source
            elif source == "header":
                if id_header:
                    value = clean_id(id_header.strip())
                    if value is not None:
                        return value, source
            elif source == "json" or source == "form":  # the body's kind (see _plans)
                if body is None:
                    return NEED_BODY
                value = json_field(body, field) if kind == "json" else form_field(body, field)
                if value is not None:
                    return value, source
            elif source == "path":
                raw = params.get(field)
                if raw:
                    value = clean_id(raw)
                    if value is not None:
                        return value, source
            elif query:
                value = query_field(query, field)
                if value is not None:
                    return value, source
        return None


@functools.lru_cache(maxsize=64)
def _body_kind(content_type: str | None) -> str | None:
    if not content_type:
        return None
    media = content_type.partition(";")[0].strip().lower()
    if media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    ):
        return "json"
    if media == "application/x-www-form-urlencoded":
        return "form"
    return None
