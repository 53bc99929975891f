"""A body that comes just before the bound, behind an outer BaseHTTPMiddleware (Starlette's
receive_or_disconnect), is lost.

receive_or_disconnect gets the message, then leaves an anyio task group (it cancels its
response_sent.wait child and waits for it: two loop turns). The peek's timer firing in
those turns cancels the receive *after* the message was taken from the server: anyio re-
raises the CancelledError (not an anyio one), the message is dropped, the peek returns
(None, None) and the app's receive() waits for a body the client already sent."""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from agentsight_middleware import AgentSightMiddleware, _body
from agentsight_middleware.testing import RecordingTracker

BODY = b'{"conversation_id": "conv_0123456789ab"}'


class UvicornLikeReceive:
    """uvicorn's RequestResponseCycle.receive: an Event and a buffer (cancel-safe itself)."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.body = b""
        self.more_body = True
        self.first_call: float | None = None

    async def __call__(self) -> dict[str, Any]:
        if self.first_call is None:
            self.first_call = time.monotonic()
        await self.event.wait()
        self.event.clear()
        message = {"type": "http.request", "body": self.body, "more_body": self.more_body}
        self.body = b""
        return message

    def data(self, chunk: bytes, more_body: bool) -> None:
        self.body += chunk
        self.more_body = more_body
        self.event.set()


async def passthrough(request: Request, call_next: Any) -> Any:
    return await call_next(request)


def build(layout: str, tracker: RecordingTracker) -> Any:
    async def chat(request: Request) -> Response:
        return Response(await request.body())

    inner = [Middleware(BaseHTTPMiddleware, dispatch=passthrough)] if "inner" in layout else []
    app: Any = Starlette(routes=[Route("/api/chat", chat, methods=["POST"])], middleware=inner)
    app = AgentSightMiddleware(app, chat_routes=["POST /api/chat"], tracker=tracker)
    if "outer" in layout:
        app = BaseHTTPMiddleware(app, dispatch=passthrough)
    return app


async def one_request(layout: str, arrive_before_deadline: float, busy: float) -> bytes:
    tracker = RecordingTracker()
    app = build(layout, tracker)
    server = UvicornLikeReceive()
    loop = asyncio.get_running_loop()
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/api/chat",
        "raw_path": b"/api/chat",
        "query_string": b"",
        "root_path": "",
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 80),
        "headers": [
            (b"host", b"t"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(BODY)).encode()),
        ],
    }

    def arrive() -> None:
        server.data(BODY, more_body=False)
        time.sleep(busy)  # the rest of this loop turn: other connections' work

    async def schedule() -> None:
        while server.first_call is None:
            await asyncio.sleep(0)
        when = server.first_call + _body.PEEK_WAIT - arrive_before_deadline
        loop.call_at(when, arrive)

    scheduler = asyncio.ensure_future(schedule())
    try:
        await asyncio.wait_for(app(scope, server, send), 1)
    except asyncio.TimeoutError:
        return b"<app still waiting for the body after 1 s>"
    finally:
        scheduler.cancel()
    return b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


@pytest.mark.skipif(sys.version_info < (3, 11), reason="the bound cancels on 3.11+")
@pytest.mark.parametrize("layout", ["outer", "inner+outer"])
def test_a_body_coming_in_the_last_loop_turns_before_the_bound_reaches_the_app(
    layout: str,
) -> None:
    # The body comes 1 to 3 ms before the bound, in a loop turn that takes 4 ms (a server
    # with other connections to serve): the peek's timer fires while the outer
    # BaseHTTPMiddleware's receive leaves its task group, the message already in hand.
    # (Several offsets: epoll wakes the loop with a 1 ms granularity.)
    lost = []
    for offset_us in (1000, 1500, 2000, 2500, 3000):
        got = asyncio.run(one_request(layout, arrive_before_deadline=offset_us / 1e6, busy=0.004))
        if got != BODY:
            lost.append((offset_us, got))
    assert not lost
