"""ASGI glue: FastAPI, Starlette, Litestar, Django's ASGI handler, any ASGI 3 app.

::

    app.add_middleware(AgentSightMiddleware, widget_pages=["/"],
                       chat_routes=["POST /api/chat"], tracker=tracker)

Requests whose path matches no rule, and every websocket and lifespan message,
go straight to the app.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from ._base import MiddlewareBase
from ._body import peek_asgi
from ._config import NEED_BODY
from ._conversation import MINTED, Conversation, mint_id
from ._core import COMMA_JOINED, HEADER_KEYS, is_html_success
from ._events import ENGAGE, INITIALIZE, new_event
from ._rules import WIDGET, Match

if TYPE_CHECKING:
    import asyncio

__all__ = ["AgentSightMiddleware"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class AgentSightMiddleware(MiddlewareBase):
    """Tracks chat-widget page views and chat requests of an ASGI app."""

    def __init__(self, app: Any, **options: Any) -> None:
        super().__init__(app, **options)
        keys = {key: key for key in HEADER_KEYS}
        keys[self._settings.id_header] = self._settings.id_header
        self._header_keys = {key.encode("latin-1"): value for key, value in keys.items()}
        rules = self._settings.rules
        self._exact_matches = rules.exact_matches
        self._prefixes = rules.prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                send = self._lifespan_send(send)
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        root_path = scope.get("root_path")
        # Servers and routers disagree on whether ``path`` includes ``root_path``;
        # rules are written against the path the client sent, so rebuild it.
        if root_path and not path.startswith(root_path):
            path = root_path + path
        # RuleSet.match's answer without calling it for most requests (see
        # ``RuleSet.exact_matches``): this runs on every request of the app.
        by_method = self._exact_matches.get(path)
        if by_method is None:
            if not path.startswith(self._prefixes):
                await self.app(scope, receive, send)
                return
            match = self._match(scope["method"], path)
        else:
            method = scope["method"]
            match = by_method[method] if method in by_method else self._match(method, path)
        if match is None:
            await self.app(scope, receive, send)
        elif match.rule.kind == WIDGET:
            await self._widget(scope, receive, send, match, path)
        else:
            await self._chat(scope, receive, send, match, path)

    def _lifespan_send(self, send: Send) -> Send:
        async def lifespan_send(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                # In the serving process, after any fork: events left in a durable
                # outbox by the last run are sent now, not at the first page view.
                self._core.delivery.ensure_started()
            elif message["type"] == "lifespan.shutdown.complete":
                # Deliver what is queued while the server still waits for us; in a
                # thread, because closing joins the worker thread.
                import anyio.to_thread

                await anyio.to_thread.run_sync(self.close)
            await send(message)

        return lifespan_send

    def _headers(self, scope: Scope) -> dict[str, str]:
        get = self._header_keys.get
        headers: dict[str, str] = {}
        for raw_name, raw_value in scope["headers"]:
            key = get(raw_name)
            if key is None:
                continue
            if key not in headers:
                headers[key] = raw_value.decode("latin-1")
            elif key == "cookie":
                # HTTP/2 splits cookies over several fields
                headers[key] += "; " + raw_value.decode("latin-1")
            elif key in COMMA_JOINED:
                headers[key] += ", " + raw_value.decode("latin-1")
        return headers

    def _conversation(
        self,
        scope: Scope,
        headers: dict[str, str],
        match: Match,
        path: str,
        conversation_id: str,
        id_source: str,
        query: str | None = None,
    ) -> Conversation:
        client = scope.get("client")
        host = headers.get("host")
        if host is None:
            server = scope.get("server")
            if server:
                host = f"{server[0]}:{server[1]}" if server[1] else str(server[0])
        if query is None:
            query = scope.get("query_string", b"").decode("latin-1")
        return self._core.conversation(
            match,
            conversation_id,
            id_source,
            headers,
            client[0] if client else None,
            scope.get("scheme", "http"),
            host,
            path,
            query,
            _starlette_request,
            scope,
        )

    async def _widget(
        self, scope: Scope, receive: Receive, send: Send, match: Match, path: str
    ) -> None:
        started = time.time()
        core = self._core
        headers = self._headers(scope)
        conversation_id, id_source = core.widget_id(headers)
        conversation = self._conversation(scope, headers, match, path, conversation_id, id_source)
        scope.setdefault("state", {})["agentsight"] = conversation
        current = core.current
        token = current.set(conversation)
        try:
            if scope["method"] != "GET" or not core.is_page_view_request(headers):
                await self.app(scope, receive, send)
                return
            set_cookie = (
                b"set-cookie",
                self._settings.set_cookie(conversation_id, secure=conversation.scheme == "https"),
            )
            # Only a new id is a new chance to chat: a reload or the next page of
            # the same visit keeps the conversation (and its cookie).
            initialize = core.delivery.initialize if id_source == MINTED else None

            async def send_wrapper(message: Message) -> None:
                if message["type"] == "http.response.start" and _is_html_success(message):
                    # A new message and header list: the app may reuse its own objects.
                    message = {**message, "headers": [*message.get("headers", ()), set_cookie]}
                    if initialize is not None:
                        initialize(new_event((INITIALIZE, conversation, started)), _get_loop())
                await send(message)

            await self.app(scope, receive, send_wrapper)
        finally:
            current.reset(token)

    async def _chat(
        self, scope: Scope, receive: Receive, send: Send, match: Match, path: str
    ) -> None:
        started = time.time()
        core = self._core
        settings = self._settings
        headers = self._headers(scope)
        query = scope.get("query_string", b"").decode("latin-1")
        found = settings.find_id(match.params, headers, query, None)
        if found is NEED_BODY:
            body, receive = await peek_asgi(
                receive, headers.get("content-length"), settings.max_body_peek
            )
            found = settings.find_id(match.params, headers, query, body)
        if found is None:
            conversation_id, id_source = mint_id(), MINTED
        else:
            conversation_id, id_source = found
        conversation = self._conversation(
            scope, headers, match, path, conversation_id, id_source, query
        )
        scope.setdefault("state", {})["agentsight"] = conversation
        current = core.current
        token = current.set(conversation)
        try:
            delivery = core.delivery
            event = new_event((ENGAGE, conversation, started))
            await delivery.engage_async(event)
            handler_scope = delivery.scope(event)
            app_send = send
            if id_source == MINTED or id_source == "cookie":
                # Keep later chat requests of this browser on the same conversation
                # (and slide the cookie's expiry while the visitor is chatting).
                set_cookie = (
                    b"set-cookie",
                    settings.set_cookie(conversation_id, secure=conversation.scheme == "https"),
                )

                async def send_wrapper(message: Message) -> None:
                    if message["type"] == "http.response.start":
                        message = {**message, "headers": [*message.get("headers", ()), set_cookie]}
                    await send(message)

                app_send = send_wrapper
            if handler_scope is None:
                await self.app(scope, receive, app_send)
            else:
                with handler_scope:
                    await self.app(scope, receive, app_send)
        finally:
            current.reset(token)


def _is_html_success(message: Message) -> bool:
    """Whether an ``http.response.start`` message starts a successful HTML page."""
    content_type = None
    for name, value in message.get("headers", ()):
        if name.lower() == b"content-type":
            content_type = bytes(value).decode("latin-1")
            break
    return is_html_success(message["status"], content_type)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    """The running asyncio loop, or None under trio (or with no loop)."""
    global _get_loop
    import asyncio  # loaded already: we run inside it

    # Never raises, unlike get_running_loop: trio apps would pay for an exception.
    _get_loop = asyncio._get_running_loop
    return _get_loop()


# Replaced by asyncio's own function on first use: importing asyncio here would
# load it into trio apps, and a function-level import costs every page view.
_get_loop: Callable[[], asyncio.AbstractEventLoop | None] = _running_loop


def _starlette_request(scope: Scope) -> Any:
    # Imported here: only apps that configure a request hook pay for it. No
    # ``receive``: a hook must not consume the body the app is about to read.
    from starlette.requests import Request

    return Request(scope)
