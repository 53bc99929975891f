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
from ._events import ENGAGE, INITIALIZE, Event
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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                send = self._lifespan_send(send)
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        root_path: str = scope.get("root_path", "")
        # Servers and routers disagree on whether ``path`` includes ``root_path``;
        # rules are written against the path the client sent, so rebuild it.
        if root_path and not path.startswith(root_path):
            path = root_path + path
        match = self._match(scope["method"], path)
        if match is None:
            await self.app(scope, receive, send)
            return
        if match.rule.kind == WIDGET:
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
        keys = self._header_keys
        headers: dict[str, str] = {}
        for raw_name, raw_value in scope["headers"]:
            key = keys.get(raw_name)
            if key is None:
                continue
            value = raw_value.decode("latin-1")
            if key not in headers:
                headers[key] = value
            elif key == "cookie":
                headers[key] += "; " + value  # HTTP/2 splits cookies over several fields
            elif key in COMMA_JOINED:
                headers[key] += ", " + value
        return headers

    def _conversation(
        self,
        scope: Scope,
        headers: dict[str, str],
        match: Match,
        path: str,
        conversation_id: str,
        id_source: str,
    ) -> Conversation:
        client = scope.get("client")
        server = scope.get("server")
        host = headers.get("host")
        if host is None and server:
            host = f"{server[0]}:{server[1]}" if server[1] else str(server[0])
        return self._core.conversation(
            match,
            conversation_id,
            id_source,
            headers,
            client[0] if client else None,
            scope.get("scheme", "http"),
            host,
            path,
            scope.get("query_string", b"").decode("latin-1"),
            _starlette_request,
            scope,
        )

    async def _widget(
        self, scope: Scope, receive: Receive, send: Send, match: Match, path: str
    ) -> None:
        started = time.time()
        core = self._core
        settings = self._settings
        headers = self._headers(scope)
        conversation_id, id_source = core.widget_id(headers)
        conversation = self._conversation(scope, headers, match, path, conversation_id, id_source)
        scope.setdefault("state", {})["agentsight"] = conversation
        token = core.current.set(conversation)
        try:
            if scope["method"] != "GET" or not core.is_page_view_request(headers):
                await self.app(scope, receive, send)
                return
            set_cookie = settings.set_cookie(conversation_id, secure=conversation.scheme == "https")
            delivery = core.delivery

            async def send_wrapper(message: Message) -> None:
                if message["type"] == "http.response.start" and is_html_success(
                    message["status"], _content_type(message)
                ):
                    message = _with_cookie(message, set_cookie)
                    # Only a new id is a new chance to chat: a reload or the next
                    # page of the same visit keeps the conversation (and its cookie).
                    if id_source == MINTED:
                        delivery.initialize(
                            Event(INITIALIZE, conversation, started), _running_loop()
                        )
                await send(message)

            await self.app(scope, receive, send_wrapper)
        finally:
            core.current.reset(token)

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
        conversation = self._conversation(scope, headers, match, path, conversation_id, id_source)
        scope.setdefault("state", {})["agentsight"] = conversation
        token = core.current.set(conversation)
        try:
            event = Event(ENGAGE, conversation, started)
            await core.delivery.engage_async(event)
            handler_scope = core.delivery.scope(event)
            if handler_scope is not None:
                with handler_scope:
                    await self._call_chat_app(scope, receive, send, conversation)
            else:
                await self._call_chat_app(scope, receive, send, conversation)
        finally:
            core.current.reset(token)

    async def _call_chat_app(
        self, scope: Scope, receive: Receive, send: Send, conversation: Conversation
    ) -> None:
        id_source = conversation.id_source
        if id_source == MINTED or id_source == "cookie":
            # Keep later chat requests of this browser on the same conversation
            # (and slide the cookie's expiry while the visitor is chatting).
            set_cookie = self._settings.set_cookie(
                conversation.id, secure=conversation.scheme == "https"
            )

            async def send_wrapper(message: Message) -> None:
                if message["type"] == "http.response.start":
                    message = _with_cookie(message, set_cookie)
                await send(message)

            await self.app(scope, receive, send_wrapper)
        else:
            await self.app(scope, receive, send)


def _content_type(message: Message) -> str | None:
    for name, value in message.get("headers", ()):
        if name.lower() == b"content-type":
            return bytes(value).decode("latin-1")
    return None


def _with_cookie(message: Message, set_cookie: bytes) -> Message:
    # A new message and header list: the app may reuse its own objects.
    return {**message, "headers": [*message.get("headers", ()), (b"set-cookie", set_cookie)]}


def _running_loop() -> asyncio.AbstractEventLoop | None:
    import asyncio  # loaded already: we run inside it

    try:
        return asyncio.get_running_loop()
    except RuntimeError:  # trio, or no loop
        return None


def _starlette_request(scope: Scope) -> Any:
    # Imported here: only apps that configure a request hook pay for it. No
    # ``receive``: a hook must not consume the body the app is about to read.
    from starlette.requests import Request

    return Request(scope)
