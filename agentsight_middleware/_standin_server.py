"""The stand-in API's HTTP server: one asyncio event loop on a thread of its own.

Requests are parsed by llhttp (httptools, uvicorn's parser) where it is installed
and by h11 elsewhere, both behind llhttp's callback interface, and answered in
order on each connection (pipelined requests included). What to answer is decided
by the ``StandInAgentSightAPI`` (``_standin.py``); this module only speaks HTTP.

One loop rather than a thread per connection: the stand-in shares the machine's
cores with whatever it is measured against (the benchmarks run it next to the
server under test), and ~200 us of CPU per request on threads that contend for the
GIL was a tax on the measured process that a remote API never levies.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from email.utils import formatdate
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Protocol

import h11

try:
    import httptools
except ImportError:  # PyPy, or a platform without a wheel
    httptools = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from ._standin import StandInAgentSightAPI

__all__ = ["Request", "Server"]

# Large enough for any OTLP batch the SDK sends; small enough that a runaway
# client cannot exhaust memory of the test process.
MAX_BODY_BYTES = 10 * 1024 * 1024
# "Forever" for a hung request, but bounded so an abandoned server's connections end.
HANG_SECONDS = 600.0
SERVER_NAME = "agentsight-standin"


class Request:
    """One parsed request, as the API logic sees it."""

    __slots__ = ("body", "headers", "method", "path", "received_at")

    def __init__(
        self, method: str, path: str, headers: dict[str, str], body: bytes, received_at: float
    ) -> None:
        self.method = method
        self.path = path
        self.headers = headers
        self.body = body
        self.received_at = received_at


class Answer:
    """What to do with a request: answer it (``status`` > 0), drop the connection
    without answering (``status`` 0), or leave it hanging (``hang``); or, after
    ``delay`` seconds, whatever ``then()`` decides by then."""

    __slots__ = ("delay", "extra_headers", "hang", "payload", "status", "then")

    def __init__(
        self,
        status: int,
        payload: object = None,
        extra_headers: Sequence[tuple[str, str]] = (),
        *,
        delay: float = 0.0,
        then: Callable[[], Answer] | None = None,
        hang: bool = False,
    ) -> None:
        self.status = status
        self.payload = payload
        self.extra_headers = extra_headers
        self.delay = delay
        self.then = then
        self.hang = hang


class _Parser(Protocol):
    def feed_data(self, data: bytes) -> None: ...
    def get_method(self) -> bytes: ...
    def get_http_version(self) -> str: ...
    def should_keep_alive(self) -> bool: ...


class _BadRequest(Exception):
    pass


class _H11Parser:
    """h11's server side behind llhttp's callbacks, for interpreters without httptools.

    h11 also wants to see the answers it frames; here they are written as bytes by
    the connection, so each request gets a fresh h11 connection, fed with what the
    previous one had read past its request's end (a pipelined next request).
    """

    def __init__(self, callbacks: Any) -> None:
        self._callbacks = callbacks
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        self._method = b""
        self._version = "1.1"
        self._keep_alive = True

    def get_method(self) -> bytes:
        return self._method

    def get_http_version(self) -> str:
        return self._version

    def should_keep_alive(self) -> bool:
        return self._keep_alive

    def feed_data(self, data: bytes) -> None:
        callbacks = self._callbacks
        if self._h11.their_state is h11.IDLE and not self._h11.trailing_data[0]:
            # Between requests: a CRLF is to be ignored (RFC 9112 2.2), as llhttp does,
            # however the segments cut it.
            data = data.lstrip(b"\r\n")
            if not data:
                return
        self._h11.receive_data(data)
        while True:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise _BadRequest(str(exc)) from None
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                self._method = event.method
                self._version = event.http_version.decode("ascii")
                connection = b", ".join(v for k, v in event.headers if k == b"connection").lower()
                self._keep_alive = (
                    b"close" not in connection
                    if event.http_version == b"1.1"
                    else b"keep-alive" in connection
                )
                callbacks.on_message_begin()
                callbacks.on_url(event.target)
                for name, value in event.headers.raw_items():
                    callbacks.on_header(name, value)
                callbacks.on_headers_complete()
            elif isinstance(event, h11.Data):
                callbacks.on_body(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                callbacks.on_message_complete()
                # A CRLF between requests is to be ignored (RFC 9112 2.2), as llhttp does.
                rest = bytes(self._h11.trailing_data[0]).lstrip(b"\r\n")
                self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
                if rest:
                    self._h11.receive_data(rest)
            elif isinstance(event, h11.ConnectionClosed):
                return


class _Connection(asyncio.Protocol):
    def __init__(self, server: Server) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._parser: _Parser = (
            httptools.HttpRequestParser(self) if httptools is not None else _H11Parser(self)
        )
        # (request, keep-alive, what is wrong with it: "" when nothing)
        self._queue: deque[tuple[Request | None, bool, str]] = deque()
        self._busy = False
        self._expecting = False  # a request's head asked for 100 Continue
        self._upgrade = False
        self._done_reading = False  # after a refused upgrade or a request it cannot parse
        self._closing = False
        self._timer: asyncio.TimerHandle | None = None
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._size = 0
        self._too_large = False

    # -- asyncio.Protocol -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        # A client that does not read its answers must not make us buffer without end.
        transport.set_write_buffer_limits(high=256 * 1024)
        with contextlib.suppress(OSError):
            # Answers are one write each; the client's next request must not wait
            # for a delayed ACK either.
            transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._server.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self._closing or self._done_reading:
            return
        try:
            self._parser.feed_data(data)
        except Exception as exc:
            # Nothing more is read from this connection: its last answer closes it.
            self._done_reading = True
            if self._transport is not None:
                self._transport.pause_reading()
            if httptools is not None and isinstance(exc, httptools.HttpParserUpgrade):
                return  # the request that asked to upgrade is queued with its refusal
            # Whatever the parser refuses (a broken request line, an invalid
            # Content-Length, malformed chunks): one answer, then the connection goes.
            self._queue.append((None, False, "Malformed request."))
            self._next()

    def pause_writing(self) -> None:
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None and not self._closing and not self._done_reading:
            self._transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._server.connections.discard(self)
        self._server.held.pop(self, None)
        if self._timer is not None:
            self._timer.cancel()

    # -- parser callbacks -------------------------------------------------

    def on_message_begin(self) -> None:
        self._expecting = False
        self._upgrade = False
        self._url = b""
        self._headers = {}
        self._body = []
        self._size = 0
        self._too_large = False

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        headers = self._headers
        headers[key] = f"{headers[key]}, {text}" if key in headers else text

    def on_headers_complete(self) -> None:
        headers = self._headers
        # This server does not switch protocols (h2c, websocket): such a request is
        # refused, once, whichever parser read it (llhttp stops at its head).
        self._upgrade = "upgrade" in headers and "upgrade" in headers.get("connection", "").lower()
        if (
            headers.get("expect", "").lower() == "100-continue"
            and self._parser.get_http_version() == "1.1"
            and not self._upgrade
        ):
            self._expecting = True
            self._continue()

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > MAX_BODY_BYTES:
            self._too_large = True
            self._body = []
        elif not self._too_large:
            self._body.append(body)

    def on_message_complete(self) -> None:
        parser = self._parser
        self._expecting = False
        request = Request(
            parser.get_method().decode("latin-1"),
            self._url.decode("latin-1"),
            self._headers,
            b"".join(self._body),
            time.time(),
        )
        wrong = ""
        if self._upgrade:
            wrong = "Protocol upgrade is not supported."
        elif self._too_large:
            wrong = "Request body too large."
        elif "host" not in self._headers and parser.get_http_version() == "1.1":
            wrong = "Malformed request."  # RFC 9112 3.2: a 1.1 request must name its host
        self._queue.append((request, parser.should_keep_alive() and not wrong, wrong))
        self._next()

    # -- answering, in order ------------------------------------------------

    def _continue(self) -> None:
        """The 100 Continue a request's head asked for, once every answer before it went."""
        if self._expecting and not self._queue and not self._busy and not self._closing:
            self._expecting = False
            if self._transport is not None:
                self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _next(self) -> None:
        """Answer what is queued, in order, until a request is held or the queue is empty.
        A loop, not a recursion: thousands of pipelined requests may be waiting."""
        while self._queue and not self._busy and not self._closing:
            request, keep_alive, wrong = self._queue.popleft()
            if request is None or wrong:
                status = 413 if wrong == "Request body too large." else 400
                self._write(status, {"detail": wrong}, (), close=True, head=False)
                return
            try:
                answer = self._server.api._decide(request)
            except Exception as exc:
                self._fail(exc)
                return
            if answer.hang:
                self._busy = True
                self._hold(HANG_SECONDS, self._close)
                return
            if answer.delay > 0:
                self._busy = True
                self._hold(answer.delay, functools.partial(self._held, request, answer, keep_alive))
                return
            self._finish(request, answer, keep_alive)
        self._continue()

    def _held(self, request: Request, answer: Answer, keep_alive: bool) -> None:
        self._busy = False
        try:
            self._finish(request, answer, keep_alive)
        except Exception as exc:
            self._fail(exc)
            return
        self._next()

    def _fail(self, exc: Exception) -> None:
        # A bug in the stand-in itself (or input it cannot hold, such as JSON nested past
        # the interpreter's limit): answered, not left hanging, and said on stderr.
        import traceback

        traceback.print_exception(exc)
        self._write(
            500, {"detail": f"stand-in error: {type(exc).__name__}"}, (), close=True, head=False
        )

    def _hold(self, seconds: float, then: Callable[[], None]) -> None:
        """Run ``then`` after ``seconds``, or at once when the API releases what it holds."""
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(seconds, self._release)
        self._server.held[self] = then

    def _release(self) -> None:
        then = self._server.held.pop(self, None)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if then is not None and not self._closing:
            then()

    def _finish(self, request: Request, answer: Answer, keep_alive: bool) -> None:
        if answer.then is not None:
            answer = answer.then()
        if answer.status == 0:  # dropped: read, then closed without a word
            self._close()
            return
        self._write(
            answer.status,
            answer.payload,
            answer.extra_headers,
            close=not keep_alive,
            head=request.method == "HEAD",
        )

    def _write(
        self,
        status: int,
        payload: object,
        extra_headers: Sequence[tuple[str, str]],
        *,
        close: bool,
        head: bool,
    ) -> None:
        transport = self._transport
        if transport is None or self._closing:
            return
        body = json.dumps(payload, separators=(",", ":")).encode()
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = ""
        lines = [
            f"HTTP/1.1 {status} {reason}",
            f"Server: {SERVER_NAME}",
            f"Date: {self._server.date()}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
        ]
        lines.extend(f"{name}: {value}" for name, value in extra_headers)
        if close:
            lines.append("Connection: close")
        head_bytes = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        # One write: header and body in a single segment.
        transport.write(head_bytes if head else head_bytes + body)
        if close:
            self._close()

    def _close(self) -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.close()

    def _abort(self) -> None:
        """Stop: whatever is still buffered for a client that does not read is dropped."""
        self._closing = True
        if self._transport is not None:
            self._transport.abort()


class Server:
    """Listens on ``(host, port)`` from ``start()`` until ``stop()``, on its own thread."""

    def __init__(self, api: StandInAgentSightAPI, host: str, port: int) -> None:
        self.api = api
        self.connections: set[_Connection] = set()
        #: Requests held back (latency, hang): what to do when released.
        self.held: dict[_Connection, Callable[[], None]] = {}
        self._date = ("", 0)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            # Benchmarks open many connections at once: a small backlog would make
            # the kernel refuse or delay them.
            sock.listen(1024)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self.socket = sock
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, name=f"agentsight-standin:{self.address[1]}", daemon=True
        )

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.socket.getsockname()[:2]
        return str(host), int(port)

    def date(self) -> str:
        # formatdate() costs microseconds; one per second is enough for a Date header.
        now = int(time.time())
        text, second = self._date
        if second != now:
            text = formatdate(now, usegmt=True)
            self._date = (text, now)
        return text

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            self._server = loop.run_until_complete(
                loop.create_server(lambda: _Connection(self), sock=self.socket, backlog=1024)
            )
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            for connection in list(self.connections):
                connection._abort()
            # Let the transports finish closing before the loop goes.
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()

    def release(self) -> None:
        """Let every held request go on now (from any thread): latency ends, hangs close."""
        with contextlib.suppress(RuntimeError):  # the loop is already closed
            self._loop.call_soon_threadsafe(self._release_all)

    def _release_all(self) -> None:
        for connection in list(self.held):
            try:
                connection._release()
            except Exception as exc:  # one connection's trouble must not hold the others
                connection._fail(exc)

    def stop(self, timeout: float) -> None:
        """Stop accepting, release what is held, close every connection."""

        def shut() -> None:
            try:
                if self._server is not None:
                    self._server.close()
                self._release_all()
            finally:
                for connection in list(self.connections):
                    connection._abort()
                self._loop.stop()

        if self._thread.is_alive():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(shut)
            self._thread.join(timeout)
        self.socket.close()
