"""One shop per kind of app for the servers of ``tests/test_servers.py`` (Hypercorn, Daphne,
waitress, gunicorn's gthread worker), each behind the middleware with the built-in client
(AGENTSIGHT_API_KEY and AGENTSIGHT_API_ENDPOINT point at the stand-in API; SERVERS_TEST_OUTBOX
names the outbox file, none when empty).

Every chat answers with the body it read, byte for byte, and names the conversation it ran
with in ``X-Conversation``; ``/api/sse`` streams three server-sent events, each naming it."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

import anyio

from agentsight_middleware import (
    AgentSightMiddleware,
    AgentSightWSGIMiddleware,
    current_conversation,
)

PAGE = b"<!doctype html><title>shop</title><p>shop</p>"
RULES: dict[str, Any] = {
    "widget_pages": ["/"],
    "chat_routes": ["POST /api/chat", "POST /api/sse"],
    # The stand-in API answers slowly in the tests: what is queued at the stop must go.
    "shutdown_timeout": 10,
    "outbox": os.environ.get("SERVERS_TEST_OUTBOX") or None,
}


def _id() -> str:
    conversation = current_conversation()
    return "none" if conversation is None else conversation.id


def _event(i: int) -> bytes:
    return f"data: {i}:{_id()}\n\n".encode()


async def _asgi(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["type"] == "websocket":  # an echo, under a chat rule's path
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        while (message := await receive())["type"] == "websocket.receive":
            await send({"type": "websocket.send", "text": f"{message['text']}:{_id()}"})
        return
    if scope["path"] == "/":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/html; charset=utf-8")]})  # fmt: skip
        await send({"type": "http.response.body", "body": PAGE})
        return
    body = b""
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return  # the client is gone
        body += message.get("body", b"")
        if not message.get("more_body", False):
            break
    if scope["path"] == "/api/sse":
        headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for i in range(3):
            await send({"type": "http.response.body", "body": _event(i), "more_body": True})
            await anyio.sleep(0.01)  # anyio: hypercorn's trio worker runs it too
        await send({"type": "http.response.body", "body": b""})
        return
    headers = [(b"content-type", b"application/octet-stream"), (b"x-conversation", _id().encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


asgi = AgentSightMiddleware(_asgi, chat_routes=[*RULES["chat_routes"], "/ws"],
                            **{k: v for k, v in RULES.items() if k != "chat_routes"})  # fmt: skip


def quart() -> Any:
    """The shop in Quart (Flask's API on ASGI, Hypercorn's own framework)."""
    from quart import Quart, Response, request

    app = Quart(__name__)

    @app.get("/")
    async def index() -> Response:
        return Response(PAGE, content_type="text/html; charset=utf-8")

    @app.post("/api/chat")
    async def chat() -> Response:
        body = await request.get_data()
        return Response(body, content_type="application/octet-stream",
                        headers={"X-Conversation": _id()})  # fmt: skip

    @app.post("/api/sse")
    async def sse() -> Response:
        async def events() -> Any:
            for i in range(3):
                yield _event(i)
                await anyio.sleep(0.01)

        return Response(events(), content_type="text/event-stream")

    return AgentSightMiddleware(app, **RULES)


def flask() -> Any:
    """The shop in Flask, for the WSGI servers."""
    from flask import Flask, Response, request

    app = Flask(__name__)

    @app.get("/")
    def index() -> Response:
        return Response(PAGE, content_type="text/html; charset=utf-8")

    @app.post("/api/chat")
    def chat() -> Response:
        return Response(request.get_data(), content_type="application/octet-stream",
                        headers={"X-Conversation": _id()})  # fmt: skip

    @app.post("/api/sse")
    def sse() -> Response:
        def events() -> Iterator[bytes]:
            for i in range(3):
                yield _event(i)  # after the view returned: the conversation is still set
                time.sleep(0.01)

        return Response(events(), content_type="text/event-stream")

    app.wsgi_app = AgentSightWSGIMiddleware(app.wsgi_app, **RULES)  # type: ignore[method-assign]
    return app


def waitress_app() -> Any:
    """The Flask shop, with SIGTERM (``docker stop``) exiting as Ctrl-C does, as the README
    says to have it under ``waitress-serve``: the exit then delivers what is queued."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    return flask()
