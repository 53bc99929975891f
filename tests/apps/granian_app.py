"""A chat endpoint for granian (``tests/test_granian.py``), as plain ASGI (``app``) and as
plain WSGI (``wsgi_app``): it answers with the body it read, byte for byte, behind the
middleware (a recording tracker: nothing leaves the process, nothing is written to disk)."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

from agentsight_middleware import AgentSightMiddleware, AgentSightWSGIMiddleware
from agentsight_middleware.testing import RecordingTracker


async def echo(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["path"].endswith("/unread"):  # refused unread, as a 401 or a rate limit is
        await send({"type": "http.response.start", "status": 401, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return  # the client is gone: nothing to answer
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    headers = [
        (b"content-type", b"application/octet-stream"),
        (b"content-length", b"%d" % len(body)),
    ]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


app = AgentSightMiddleware(
    echo, chat_routes=["POST /api/chat", "POST /api/chat/unread"], tracker=RecordingTracker()
)


async def timed(scope: Any, receive: Any, send: Any) -> None:
    # A time limit around the app and the middleware (0.1 s, within the peek's bound), as an
    # outer middleware may set one: a 504 when it expires. The collector off in this server
    # process: a reference cycle holding granian's request would then hold it for good. The
    # lifespan goes to the app alone (as with uvicorn --lifespan off): through the middleware,
    # the requests the cycle kept open were rarer still, for reasons not found.
    gc.disable()
    if scope["type"] != "http":
        return await echo(scope, receive, send)
    try:
        await asyncio.wait_for(app(scope, receive, send), 0.1)
    except asyncio.TimeoutError:
        await send({"type": "http.response.start", "status": 504, "headers": []})
        await send({"type": "http.response.body", "body": b""})


def wsgi_echo(environ: Any, start_response: Any) -> list[bytes]:
    # As Werkzeug's get_data() reads a stream the server says ends with the body.
    body = environ["wsgi.input"].read()
    headers = [("Content-Type", "application/octet-stream"), ("Content-Length", str(len(body)))]
    start_response("200 OK", headers)
    return [body]


wsgi_app = AgentSightWSGIMiddleware(
    wsgi_echo, chat_routes=["POST /api/chat"], tracker=RecordingTracker()
)
