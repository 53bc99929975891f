"""Decisions shared by the ASGI and WSGI glue: is this a page view, and what is
the conversation of this request. The glue only translates its protocol into
the plain ``str`` mappings used here.
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable, Mapping
from typing import Any

from ._config import Settings
from ._conversation import MINTED, Conversation, cookie_value, mint_id
from ._delivery import BackgroundDelivery
from ._facts import forwarded_scheme
from ._log import LogOnce
from ._rules import Match
from ._tracker import TrackerDelivery

__all__ = ["HEADER_KEYS", "Core", "Delivery", "current_conversation", "is_html_success"]

#: What takes the events: a user's tracker, or the built-in background worker.
Delivery = TrackerDelivery | BackgroundDelivery

#: The request headers the middleware reads; everything else is never decoded.
HEADER_KEYS = (
    "accept",
    "accept-language",
    "content-length",
    "content-type",
    "cookie",
    "forwarded",
    "host",
    "purpose",
    "referer",
    "sec-fetch-dest",
    "sec-purpose",
    "user-agent",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-moz",
    "x-purpose",
    "x-real-ip",
)
# Headers that may be sent more than once and mean a list when combined.
COMMA_JOINED = frozenset({"forwarded", "x-forwarded-for"})
# Prefetches and previews announce themselves in one of these.
_PURPOSE_HEADERS = ("sec-purpose", "purpose", "x-purpose", "x-moz")

# Conversation's fields in order, as one tuple: tuple.__new__ is ~5x cheaper than
# the named tuple's keyword constructor on this path.
_new_conversation: Callable[[tuple[Any, ...]], Conversation] = functools.partial(
    tuple.__new__, Conversation
)

_current: contextvars.ContextVar[Conversation | None] = contextvars.ContextVar(
    "agentsight_conversation", default=None
)


def current_conversation() -> Conversation | None:
    """The conversation of the request being handled, or None outside a tracked request.

    Works in async handlers, in sync handlers that Starlette runs in its thread
    pool (the context is copied there), and under WSGI.
    """
    return _current.get()


def is_html_success(status: int, content_type: str | None) -> bool:
    if not 200 <= status < 300 or status == 204:
        return False
    if not content_type:
        return False
    media = content_type.partition(";")[0].strip().lower()
    return media in ("text/html", "application/xhtml+xml")


class Core:
    def __init__(self, settings: Settings, delivery: Delivery) -> None:
        self.settings = settings
        self.delivery = delivery
        self.log_once = LogOnce()
        self.current = _current
        # ``TrustedProxies.__bool__`` is a Python call; asked once here, not per request.
        self._trusts_proxies = bool(settings.trusted_proxies)

    def widget_id(self, headers: Mapping[str, str]) -> tuple[str, str]:
        """``(id, source)`` for a widget page: the visit's cookie, else a fresh id."""
        cookie = headers.get("cookie")
        found = cookie_value(cookie, self.settings.cookie_name) if cookie else None
        return (found, "cookie") if found is not None else (mint_id(), MINTED)

    def is_page_view_request(self, headers: Mapping[str, str]) -> bool:
        """Cheap request-side tests of a real page view (the response is checked later)."""
        get = headers.get
        accept = get("accept")
        if not accept:
            return False
        # Browsers send these in lower case: lowering is only needed to say "no".
        if "text/html" not in accept and "application/xhtml+xml" not in accept:
            accept = accept.lower()
            if "text/html" not in accept and "application/xhtml+xml" not in accept:
                return False
        dest = get("sec-fetch-dest")
        if dest is not None and dest != "document" and dest.strip().lower() != "document":
            return False
        for name in _PURPOSE_HEADERS:
            value = get(name)
            if value is not None:
                value = value.lower()
                if "prefetch" in value or "prerender" in value or "preview" in value:
                    return False
        # Probes and monitors (``non_browser_agents``) are told apart by the worker:
        # matching an unseen user agent costs microseconds, so a bot rotating its
        # user agent would make every request pay. Every browser sends one, though.
        user_agent = get("user-agent")
        return user_agent is not None and user_agent != "" and not user_agent.isspace()

    def conversation(
        self,
        match: Match,
        conversation_id: str,
        id_source: str,
        headers: Mapping[str, str],
        peer: str | None,
        scheme: str,
        host: str | None,
        path: str,
        query: str,
        make_request: Callable[[Any], Any],
        raw: Any,
        /,
    ) -> Conversation:
        """The request's :class:`Conversation`; ``make_request(raw)`` builds the object
        handed to the hooks, only when there are hooks.

        Positional arguments and a tuple built in C: this runs on every tracked
        request, and keyword calls cost it microseconds.
        """
        settings = self.settings
        get = headers.get
        forwarding = None
        trusted = None
        if self._trusts_proxies:
            trusted = settings.trusted_proxies
            forwarded = get("forwarded")
            # The scheme now (the cookie's Secure flag depends on it); the client IP
            # later, in the worker: walking forwarding chains costs microseconds.
            forwarding = (forwarded, get("x-forwarded-for"), get("x-real-ip"))
            scheme = forwarded_scheme(scheme, forwarded, get("x-forwarded-proto"), peer, trusted)
        customer_id = None
        extra: Mapping[str, Any] | None = None
        if settings.has_hooks:
            request = make_request(raw)
            customer_id = self._customer_id(request)
            extra = self._metadata(request)
        rule = match.rule
        return _new_conversation(
            (
                conversation_id,
                id_source,
                rule.kind,
                rule.source,
                peer,
                get("user-agent", ""),
                get("accept-language"),
                scheme,
                host,
                path,
                query,
                get("referer"),
                customer_id,
                extra,
                forwarding,
                trusted,
            )
        )

    def _customer_id(self, request: Any) -> str | None:
        hook = self.settings.customer_id_hook
        if hook is None:
            return None
        try:
            value = hook(request)
        except Exception as exc:
            self.log_once("customer_id hook", exc)
            return None
        if value is None or isinstance(value, bool):
            return None
        return str(value)

    def _metadata(self, request: Any) -> Mapping[str, Any] | None:
        hook = self.settings.metadata_hook
        if hook is None or isinstance(hook, Mapping):
            return hook
        try:
            value = hook(request)
        except Exception as exc:
            self.log_once("metadata hook", exc)
            return None
        if value is not None and not isinstance(value, Mapping):
            self.log_once(
                "metadata hook", TypeError(f"returned {type(value).__name__}, not a dict")
            )
            return None
        return value
