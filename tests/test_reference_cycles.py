"""A request through the middleware leaves no reference cycle the bare app's does not.

Objects in a cycle wait for the garbage collector's next pass, and with them whatever
they hold: the server's request, its connection (granian keeps it open while the
request lives), the app's state. Counted with the collector off: what ``gc.collect()``
frees after the requests is what they left in cycles.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from agentsight_middleware import AgentSightMiddleware, AgentSightWSGIMiddleware
from agentsight_middleware.testing import RecordingTracker

BODY = b'{"message": "hello", "conversation_id": "conv_0123456789ab"}'
RULES: dict[str, Any] = {"widget_pages": ["/"], "chat_routes": ["POST /api/chat"]}


def cyclic_garbage(run_one: Callable[[], None], n: int) -> int:
    """Objects left in cycles by ``n`` calls of ``run_one`` (after a few untimed ones)."""
    for _ in range(3):
        run_one()
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(n):
            run_one()
        return gc.collect()
    finally:
        if enabled:
            gc.enable()


# --- ASGI -------------------------------------------------------------------------------


async def echo(scope: Any, receive: Any, send: Any) -> None:
    message = await receive()
    while message.get("more_body"):
        message = await receive()
    headers = [(b"content-type", b"text/html; charset=utf-8")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"<p>hi</p>"})


async def failing(scope: Any, receive: Any, send: Any) -> None:
    await receive()
    raise RuntimeError("the app failed")


async def unread(scope: Any, receive: Any, send: Any) -> None:
    # Answers without reading the body (a 401, a rate limit): a receive error the peek
    # kept for it stays kept until the request is gone.
    await send({"type": "http.response.start", "status": 401, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def http_scope(method: str, path: str, body: bytes) -> dict[str, Any]:
    headers = [
        (b"host", b"shop.example"),
        (b"user-agent", b"Mozilla/5.0 (X11; Linux x86_64) Chrome/120.0 Safari/537.36"),
        (b"accept", b"text/html"),
    ]
    if body:
        headers += [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
        "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
        "query_string": b"", "headers": headers, "client": ("203.0.113.7", 50000),
        "server": ("shop.example", 80),
    }  # fmt: skip


# (method, path, body) and the parts a server's receive hands over, each after a delay in
# seconds (None: never, as a client that stops sending; -1: the receive fails; -2: it fails
# while handling an error of its own, as anyio's streams do), and the time limit around the
# app.
ASGI_CASES: dict[str, tuple[str, str, list[tuple[float | None, bytes, bool]], float | None]] = {
    "widget page": ("GET", "/", [(0.0, b"", False)], None),
    "chat, body at once": ("POST", "/api/chat", [(0.0, BODY, False)], None),
    "chat, the rest of the body waited for": (
        "POST", "/api/chat", [(0.0, BODY[:20], True), (0.01, BODY[20:], False)], None,
    ),
    "chat cancelled by a time limit while the peek waits": (
        "POST", "/api/chat", [(0.0, BODY[:20], True), (None, b"", False)], 0.02,
    ),
    "chat whose body's rest never comes (the peek's bound)": (
        "POST", "/api/chat", [(0.0, BODY[:20], True), (None, b"", False)], None,
    ),
    "chat whose receive fails": (
        "POST", "/api/chat", [(0.0, BODY[:20], True), (-1.0, b"", False)], None,
    ),
    "chat whose receive fails at once": ("POST", "/api/chat", [(-1.0, b"", False)], None),
    "chat whose receive fails, raised while handling another": (
        "POST", "/api/chat", [(0.0, BODY[:20], True), (-2.0, b"", False)], None,
    ),
    "chat whose receive fails at once, raised while handling another": (
        "POST", "/api/chat", [(-2.0, b"", False)], None,
    ),
}  # fmt: skip


def asgi_run(app: Any, case: str) -> Callable[[], None]:
    method, path, parts, limit = ASGI_CASES[case]
    body = b"".join(part for _, part, _ in parts)

    async def one() -> None:
        left = list(parts)

        async def receive() -> dict[str, Any]:
            if not left:  # the app reads on: the client has gone
                return {"type": "http.disconnect"}
            delay, part, more = left.pop(0)
            if delay is None:
                await asyncio.sleep(0.3)  # past the peek's bound, short of for ever
                return {"type": "http.disconnect"}
            if delay == -2:
                try:
                    raise ConnectionResetError("connection reset by peer")
                except ConnectionResetError:
                    raise OSError("the stream is closed") from None  # __context__ kept
            if delay < 0:
                raise OSError("connection reset by peer")
            if delay:
                await asyncio.sleep(delay)
            return {"type": "http.request", "body": part, "more_body": more}

        async def send(message: dict[str, Any]) -> None:
            pass

        call = app(http_scope(method, path, body), receive, send)
        with contextlib.suppress(asyncio.TimeoutError, RuntimeError, OSError):
            await (call if limit is None else asyncio.wait_for(call, limit))

    return lambda: asyncio.run(one())


@pytest.mark.parametrize(
    "inner", [echo, failing, unread], ids=["app answers", "app raises", "app answers unread"]
)
@pytest.mark.parametrize("case", list(ASGI_CASES))
def test_an_asgi_request_leaves_no_cycle_of_ours(case: str, inner: Any) -> None:
    # A peek cancelled by a time limit kept the task in a frame the CancelledError went
    # through (a cycle holding the whole request: 22 objects a request); one that waited
    # for the body kept its own timer callback, which schedules itself (10 more).
    n = 2 if "bound" in case else 6
    ours = AgentSightMiddleware(inner, tracker=RecordingTracker(), **RULES)
    bare = cyclic_garbage(asgi_run(inner, case), n)
    assert cyclic_garbage(asgi_run(ours, case), n) <= bare


# --- WSGI -------------------------------------------------------------------------------


def wsgi_echo(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
    environ["wsgi.input"].read()
    start_response("200 OK", [("Content-Type", "text/html; charset=utf-8")])
    return iter([b"<p>hi</p>"])


def wsgi_failing(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
    environ["wsgi.input"].read()
    raise RuntimeError("the app failed")


def wsgi_unread(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
    start_response("401 Unauthorized", [("Content-Type", "text/plain")])
    return iter([b""])


class BrokenInput(io.RawIOBase):
    """A ``wsgi.input`` whose connection fails after the first bytes."""

    def __init__(self, head: bytes) -> None:
        self._head = head

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if not self._head:
            raise OSError("connection reset by peer")
        n = min(len(buffer), len(self._head))
        buffer[:n], self._head = self._head[:n], self._head[n:]
        return n


WSGI_CASES = ["widget page", "chat, body at once", "chat whose input fails"]


def wsgi_run(app: Any, case: str) -> Callable[[], None]:
    method, path = ("GET", "/") if case == "widget page" else ("POST", "/api/chat")
    body = b"" if method == "GET" else BODY

    def one() -> None:
        stream: Any = io.BytesIO(body)
        if case == "chat whose input fails":
            stream = io.BufferedReader(BrokenInput(BODY[:20]))
        environ = {
            "REQUEST_METHOD": method, "PATH_INFO": path, "SCRIPT_NAME": "", "QUERY_STRING": "",
            "SERVER_NAME": "shop.example", "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1",
            "REMOTE_ADDR": "203.0.113.7", "HTTP_HOST": "shop.example", "HTTP_ACCEPT": "text/html",
            "HTTP_USER_AGENT": "Mozilla/5.0 (X11; Linux x86_64) Chrome/120.0 Safari/537.36",
            "CONTENT_TYPE": "application/json", "CONTENT_LENGTH": str(len(body)),
            "wsgi.input": stream, "wsgi.url_scheme": "http", "wsgi.errors": io.StringIO(),
            "wsgi.version": (1, 0), "wsgi.multithread": False, "wsgi.multiprocess": False,
            "wsgi.run_once": False,
        }  # fmt: skip
        try:
            result = app(environ, lambda status, headers, exc_info=None: None)
            try:
                for _ in result:
                    pass
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
        except (RuntimeError, OSError):
            pass

    return one


@pytest.mark.parametrize(
    "inner",
    [wsgi_echo, wsgi_failing, wsgi_unread],
    ids=["app answers", "app raises", "app answers unread"],
)
@pytest.mark.parametrize("case", WSGI_CASES)
def test_a_wsgi_request_leaves_no_cycle_of_ours(case: str, inner: Any) -> None:
    ours = AgentSightWSGIMiddleware(inner, tracker=RecordingTracker(), **RULES)
    bare = cyclic_garbage(wsgi_run(inner, case), 6)
    assert cyclic_garbage(wsgi_run(ours, case), 6) <= bare


# --- trio -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case", ["the rest of the body waited for", "cancelled while the peek waits"]
)
def test_a_trio_request_leaves_no_cycle_of_ours(case: str) -> None:
    # trio sends the task an outcome, which holds the Cancelled it raises in the receive (a
    # time limit's, or a trio.sleep's own deadline, which the receive's sleep catches): the
    # peek's frames that handed it on kept it in a local, a cycle holding the request (the
    # sleep's: on 3.12+, its frames link to ours through f_back). Counted within one
    # trio.run (each run leaves cycles of its own, the middleware's objects on them).
    trio = pytest.importorskip("trio")
    late, limit = (0.01, None) if case.startswith("the rest") else (None, 0.02)

    def count(app: Any, n: int) -> int:
        async def one() -> None:
            left = [BODY[:20], BODY[20:]]

            async def receive() -> dict[str, Any]:
                if not left:
                    return {"type": "http.disconnect"}
                part = left.pop(0)
                if not left:
                    if late is None:
                        await trio.sleep(0.3)
                        return {"type": "http.disconnect"}
                    await trio.sleep(late)
                return {"type": "http.request", "body": part, "more_body": bool(left)}

            async def send(message: dict[str, Any]) -> None:
                pass

            with trio.move_on_after(1 if limit is None else limit):
                await app(http_scope("POST", "/api/chat", BODY), receive, send)

        async def main() -> int:
            for _ in range(3):
                await one()
            gc.collect()
            enabled = gc.isenabled()
            gc.disable()
            try:
                for _ in range(n):
                    await one()
                return gc.collect()
            finally:
                if enabled:
                    gc.enable()

        return trio.run(main)  # type: ignore[no-any-return]

    ours = AgentSightMiddleware(echo, tracker=RecordingTracker(), **RULES)
    assert count(ours, 6) <= count(echo, 6)
