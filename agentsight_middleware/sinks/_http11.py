"""A small keep-alive pool of HTTP/1.1 connections for one origin, on asyncio and h11.

The worker sends one short JSON ``POST`` per event to one host, and every
microsecond it spends is taken from the host app's own process. httpx's
transport (httpcore over h11) measured ~0.4 ms of CPU per request here from a
single thread and ~0.8 ms from the threads that its blocking API needs, which
caps a process near 900 events/s; ``httpx.AsyncClient`` was slower still. The
same h11 state machine driven straight from an ``asyncio.Protocol`` costs
~0.15-0.2 ms and sends 4,000+ requests/s. h11 is httpcore's own HTTP/1.1
engine (installed with httpx), so parsing, framing and validation are the
same well-tested code; only pooling and I/O are ours.

Errors are raised as httpx's exception types, so callers handle one family.
When the endpoint must be reached through a proxy, the sink uses httpx's own
transport instead (see ``http.py``).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from typing import NamedTuple

import h11
import httpx

__all__ = ["Http11Pool", "Reply"]

# httpcore's default: a connection idle longer than this may be closed by the
# server at any moment, and a request written into such a connection is lost
# with an ambiguous error. Opening a new one is cheaper than that retry.
KEEPALIVE_EXPIRY = 5.0
# The API answers a small JSON object; anything bigger is not its answer.
MAX_RESPONSE_BODY = 1 << 20
# h11 events are immutable and validate their headers when built (a third of h11's
# cost per request): the request heads are built once per body length and reused.
_HEADS_CACHED = 512
_END = h11.EndOfMessage()


class Reply(NamedTuple):
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> str | None:
        for key, value in self.headers:
            if key == name:  # h11 lower-cases names
                return value.decode("latin-1")
        return None


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self._h11 = h11.Connection(h11.CLIENT)
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[Reply] | None = None
        self._status = 0
        self._eof_seen = False
        self._headers: list[tuple[bytes, bytes]] = []
        self._buffer: list[bytes] = []
        self._size = 0
        self.lost = False
        self.idle_since = time.monotonic()

    # -- asyncio.Protocol -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self._h11.receive_data(data)
        except RuntimeError:
            # Data after the connection was declared unusable: nobody waits for it.
            self.close()
            return
        self._pump()

    def eof_received(self) -> bool | None:
        self._eof()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._eof()

    # -- ours -------------------------------------------------------------

    def usable(self, now: float) -> bool:
        return (
            not self.lost
            and self._transport is not None
            and not self._transport.is_closing()
            and self._h11.our_state is h11.IDLE
            and now - self.idle_since < KEEPALIVE_EXPIRY
        )

    def close(self) -> None:
        self.lost = True
        if self._transport is not None:
            self._transport.close()

    async def request(self, head: h11.Request, body: bytes, timeout: float) -> Reply:
        assert self._transport is not None
        if self.lost or self._transport.is_closing():
            # Closed by the server between connecting and now: a write would be
            # dropped silently and the answer awaited until the timeout.
            self.close()
            raise httpx.RemoteProtocolError("server closed the connection before the request")
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Reply] = loop.create_future()
        self._waiter = waiter
        self._buffer = []
        self._size = 0
        self._status = 0
        # A timer rather than wait_for(): no extra task per request.
        timer = loop.call_later(timeout, self._time_out, waiter, timeout)
        h = self._h11
        try:
            self._transport.write(
                (h.send(head) or b"") + (h.send(h11.Data(data=body)) or b"") + (h.send(_END) or b"")
            )
            reply = await waiter
        except BaseException:
            # Timed out, cancelled (shutdown) or failed mid-exchange: what the
            # server has seen is unknown, so this connection is never reused.
            self.close()
            raise
        finally:
            timer.cancel()
            self._waiter = None
        if h.our_state is h11.DONE and h.their_state is h11.DONE and not h.trailing_data[0]:
            h.start_next_cycle()
            self.idle_since = time.monotonic()
        else:
            # "Connection: close", an HTTP/1.0 answer, or bytes after the answer that
            # nobody asked for (read as the next request's answer, they would shift
            # every reply on this connection by one).
            self.close()
        return reply

    @staticmethod
    def _time_out(waiter: asyncio.Future[Reply], timeout: float) -> None:
        if not waiter.done():
            waiter.set_exception(httpx.ReadTimeout(f"no answer within {timeout:g} s"))

    def _pump(self) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            if self._h11.their_state is not h11.IDLE or self._h11.trailing_data[0]:
                self.close()  # bytes nobody asked for: the stream is out of step
            return
        try:
            while True:
                event = self._h11.next_event()
                if event is h11.NEED_DATA:
                    return
                if isinstance(event, h11.Response):
                    self._status = event.status_code
                    self._headers = list(event.headers)
                elif isinstance(event, h11.Data):
                    self._size += len(event.data)
                    if self._size > MAX_RESPONSE_BODY:
                        raise h11.RemoteProtocolError("response body too large")
                    self._buffer.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    waiter.set_result(Reply(self._status, self._headers, b"".join(self._buffer)))
                    return
                elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                    raise h11.RemoteProtocolError("server closed the connection")
                # InformationalResponse (100 Continue): wait for the real one.
        except h11.RemoteProtocolError as exc:
            self.close()
            if not self._eof_seen:
                message = f"invalid response from the server: {exc}"
            elif self._status:
                message = "server disconnected in the middle of its response"
            else:
                message = "server disconnected without sending a response"
            waiter.set_exception(httpx.RemoteProtocolError(message))

    def _eof(self) -> None:
        self._eof_seen = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            try:
                self._h11.receive_data(b"")
            except RuntimeError:
                pass
            else:
                self._pump()
            if not waiter.done():
                waiter.set_exception(
                    httpx.RemoteProtocolError("server disconnected without sending a response")
                )
        self.close()


class Http11Pool:
    """Keep-alive connections to the origin of ``url``, each used by one request at a time.

    The caller bounds concurrency (the sink never has more requests in flight
    than ``max_connections``); the pool only reuses and opens connections.
    """

    def __init__(
        self,
        url: str,
        *,
        headers: list[tuple[bytes, bytes]],
        max_connections: int,
        timeout: float,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        # httpx's URL model: IDNA hosts, percent-encoded paths and the default port
        # left out of Host (RFC 9112), as httpx itself would send them.
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as exc:
            raise ValueError(f"not an http(s) URL: {url!r} ({exc})") from None
        if parsed.scheme not in ("http", "https") or not parsed.raw_host:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self._host = parsed.raw_host.decode("ascii")
        self._port = parsed.port or (443 if parsed.scheme == "https" else 80)
        self._ssl: ssl.SSLContext | None = None
        if parsed.scheme == "https":
            # httpx's own context: certifi's roots, as httpx.Client would verify.
            self._ssl = ssl_context or httpx.create_ssl_context()
        self.host_header = parsed.netloc
        self.target = parsed.raw_path
        self._headers = [(b"Host", self.host_header), *headers]
        self._heads: dict[int, h11.Request] = {}
        self._max = max_connections
        self._timeout = timeout
        self._idle: list[_Connection] = []
        self._closed = False

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, connection = await asyncio.wait_for(
                loop.create_connection(
                    _Connection,
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl is not None else None,
                    # One time limit covers all of a host's addresses: without racing
                    # them, an address that drops packets (a broken IPv6 route) would
                    # use it all up and the working one would never be tried.
                    happy_eyeballs_delay=0.25,
                    interleave=1,
                ),
                self._timeout,
            )
        except asyncio.TimeoutError:
            raise httpx.ConnectTimeout(
                f"connecting to {self._host}:{self._port} timed out"
            ) from None
        except (OSError, ssl.SSLError, UnicodeError) as exc:
            # UnicodeError: a host name IDNA cannot encode (a label over 63 chars).
            raise httpx.ConnectError(f"{type(exc).__name__}: {exc}") from exc
        if self._closed:  # closed while connecting (shutdown)
            connection.close()
            raise httpx.ConnectError("the connection pool is closed")
        return connection

    def _head(self, length: int) -> h11.Request:
        head = self._heads.get(length)
        if head is None:
            if len(self._heads) >= _HEADS_CACHED:
                self._heads.clear()
            head = self._heads[length] = h11.Request(
                method=b"POST",
                target=self.target,
                headers=[*self._headers, (b"Content-Length", str(length).encode("ascii"))],
            )
        return head

    async def post(self, body: bytes) -> Reply:
        """POST ``body`` with the pool's headers (Host and Content-Length added)."""
        if self._closed:
            raise httpx.ConnectError("the connection pool is closed")
        try:
            head = self._head(len(body))
        except h11.LocalProtocolError as exc:  # a header h11 will not send
            raise httpx.LocalProtocolError(str(exc)) from exc
        now = time.monotonic()
        connection = None
        while self._idle:
            candidate = self._idle.pop()
            if candidate.usable(now):
                connection = candidate
                break
            candidate.close()
        if connection is None:
            connection = await self._connect()
        try:
            reply = await connection.request(head, body, self._timeout)
        except h11.LocalProtocolError as exc:
            raise httpx.LocalProtocolError(str(exc)) from exc
        except OSError as exc:
            raise httpx.WriteError(f"{type(exc).__name__}: {exc}") from exc
        if not self._closed and len(self._idle) < self._max and connection.usable(time.monotonic()):
            self._idle.append(connection)
        else:
            connection.close()
        return reply

    def close(self) -> None:
        self._closed = True
        for connection in self._idle:
            connection.close()
        self._idle.clear()
