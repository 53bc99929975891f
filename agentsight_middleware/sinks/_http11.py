"""A small keep-alive pool of HTTP/1.1 connections for one origin, on asyncio.

The worker sends one short JSON ``POST`` per event to one host, and every
microsecond it spends is taken from the host app's own process. httpx's
transport (httpcore over h11) measured ~0.4 ms of CPU per request here from a
single thread and ~0.8 ms from the threads that its blocking API needs, which
caps a process near 900 events/s; ``httpx.AsyncClient`` was slower still. Driving
the connections straight from an ``asyncio.Protocol`` removes most of that.

Answers are parsed by one of two engines, as uvicorn does on the server side:

* ``httptools`` (llhttp, the C parser of Node.js; uvicorn's fast path): ~2 µs
  to parse an answer, and the request is written as one prebuilt byte string;
* ``h11`` (httpcore's own pure-Python engine, installed with httpx): ~65 µs per
  exchange; used where httptools is not installed (PyPy).

Both frame the same bytes and raise httpx's exception types, so callers handle
one family. llhttp is the stricter reader (it refuses what could smuggle a
request: a doubled Content-Length, bare LF line ends, folded headers); an
answer only h11 accepts makes the pool read with h11 from then on, so a server
that httpx could talk to is never refused. When the endpoint must be reached
through a proxy, the sink uses httpx's own transport instead (see ``http.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import math
import socket
import ssl
import time
from asyncio import staggered
from typing import Any, Literal, NamedTuple

import h11
import httpx

from .._log import logger
from .._timeout import bounded

try:
    import httptools
except ImportError:  # PyPy, or a platform without a wheel: h11 does the parsing
    httptools = None  # type: ignore[assignment]

__all__ = [
    "ENGINES",
    "PIPELINE",
    "READ_IN_ONE_GO",
    "ClosedUnannounced",
    "Http11Pool",
    "NotSent",
    "Reply",
    "UnreadableAnswer",
]

Engine = Literal["httptools", "h11"]
#: The engines this interpreter can use, fastest first.
ENGINES: tuple[Engine, ...] = ("httptools", "h11") if httptools is not None else ("h11",)

# A connection idle longer than this may be closed by the server at any moment, and
# a request written into such a connection is lost with an ambiguous error: opening a
# new one is cheaper than that retry. Under the 5 s that uvicorn (and httpcore) use,
# so that a server closing at exactly 5 s never races a pipeline written at 5 s.
KEEPALIVE_EXPIRY = 4.0
# The API answers a small JSON object; anything bigger is not its answer.
MAX_RESPONSE_BODY = 1 << 20
# Status line, headers and trailers of one answer at most: llhttp sets no limit of its
# own, and a server sending header lines without end would fill the process's memory.
MAX_RESPONSE_HEAD = 64 * 1024
# h11 events are immutable and validate their headers when built (a third of h11's
# cost per request): its request heads are built once per body length and reused.
_HEADS_CACHED = 512
_END = h11.EndOfMessage()
#: Requests written at once on one connection (HTTP/1.1 pipelining, RFC 9112 9.3.2),
#: httptools engine only: one write and one read for up to this many events instead of
#: one of each per event. Measured on loopback: ~33 us of client CPU per request one at
#: a time, ~8 us at this depth.
PIPELINE = 16
# Of the time a pipeline is expected to take (see ``Http11Pool.post_many``'s
# ``answer_time``), the share after which its answers are first read: most are in by then
# and come in one read. Not all: the last answers come as they come, not at the expected
# time of the slowest pipeline.
_READ_AT = 0.75
#: Shorter pipelines are read as their answers come: pausing and resuming the reads costs
#: two system calls and a timer's wake-up, and with two or three answers it saves a read
#: at most (measured: more CPU an event against an API taking 2-8 ms a request).
READ_IN_ONE_GO = 4
# A server that leaves part of a pipeline unanswered without announcing a close (it read
# only the first request, or a proxy in front of it mishandles pipelines) gets one request
# per connection at a time for this long; then pipelining is tried again.
PIPELINE_PAUSE = 300.0
# After an answer only h11 could read, h11 reads this long; then httptools again.
ENGINE_PAUSE = 300.0
# While one of a host's addresses has not connected, the next one is tried after this long
# (RFC 8305's Connection Attempt Delay; asyncio's happy_eyeballs_delay).
_NEXT_ADDRESS_AFTER = 0.25
# After a connection lost while a pipeline's answers waited to be read late, answers are
# read as they come this long: the answers a reset overtakes in the socket are gone.
READ_LATE_PAUSE = 300.0
# A connection lost this long after its reading resumed counts as lost while reading late:
# by then the answers that were held back are read.
_RESUMED_LATELY = 0.05


class Reply(NamedTuple):
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    #: When it was read (``time.perf_counter()``; 0.0 from httpx's transport): a pipeline's
    #: answers read as they come are as far apart as the server took to answer them, which
    #: tells a server that is slow per request from one that is far away (see
    #: ``HttpSink._timed``).
    at: float = 0.0

    def header(self, name: bytes) -> str | None:
        for key, value in self.headers:
            if key == name:  # both engines lower-case names
                return value.decode("latin-1")
        return None


class _Framing:
    """The request bytes both engines send: one method, target and header set."""

    def __init__(self, target: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        self._target = target
        self._headers = headers
        self._prefix: bytes | None = None
        self._heads: dict[int, h11.Request] = {}

    def _build_head(self, length: int) -> h11.Request:
        return h11.Request(
            method=b"POST",
            target=self._target,
            headers=[*self._headers, (b"Content-Length", str(length).encode("ascii"))],
        )

    def check(self) -> None:
        """Refuse the headers h11 would refuse (once, before anything is sent)."""
        if self._prefix is None:
            self._build_head(0)
            lines = b"".join(b"%s: %s\r\n" % pair for pair in self._headers)
            self._prefix = b"POST %s HTTP/1.1\r\n%s" % (self._target, lines)

    def raw(self, body: bytes) -> bytes:
        prefix = self._prefix
        assert prefix is not None, "check() first"
        return b"%sContent-Length: %d\r\n\r\n%s" % (prefix, len(body), body)

    def h11_head(self, length: int) -> h11.Request:
        head = self._heads.get(length)
        if head is None:
            if len(self._heads) >= _HEADS_CACHED:
                self._heads.clear()
            head = self._heads[length] = self._build_head(length)
        return head


class _Tally:
    """Shared by a pool's connections: answers as they arrive, before their exchange ends."""

    __slots__ = ("accepted",)

    def __init__(self) -> None:
        self.accepted = 0  # 2xx answers


class _TooLarge(Exception):
    pass


class _BadStatus(Exception):
    pass


class UnreadableAnswer(httpx.RemoteProtocolError):
    """An answer llhttp refused: the pool reads the next ones with h11, as httpx would."""


class NotSent(httpx.TransportError):
    """A request the server did not process, as far as HTTP can tell: an earlier answer
    said the connection would close (RFC 9112 9.6: no later request on it is processed),
    or the server closed the connection at an answer's end, before any byte of this
    request's answer (a kept-alive connection closed as it was reused, or a server's limit
    of requests per connection). It is sent again at once, without counting as a failed
    attempt. A request behind a timeout or a cut-off answer is not one of these: the
    server may still process it, so it fails with the same error."""


def _pause_reading(transport: asyncio.Transport) -> bool:
    """Whether reading ``transport`` is paused now. On Python 3.10, a TLS transport whose
    socket was reset has dropped it one loop turn before the protocol hears of it:
    pausing raises then, and the loss that follows ends the exchange as it would have."""
    try:
        transport.pause_reading()
    except (AttributeError, RuntimeError):
        return False
    return True


class _Connection(asyncio.Protocol):
    """One connection, one exchange at a time (one request, or a pipeline of them); the
    subclasses read the answers."""

    def __init__(self, framing: _Framing, tally: _Tally) -> None:
        self._framing = framing
        self._tally = tally
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._replies: list[Reply] = []
        self._expected = 0
        self._timeout = 0.0
        self._progress_at = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._read_later: asyncio.TimerHandle | None = None  # see exchange's answer_time
        #: The answers an exchange had when it was cancelled.
        self.partial: list[Reply] = []
        self._idle = True  # between exchanges, and the last one left it reusable
        self._received = False  # any byte came in during the exchange
        # The server closed the connection right after a complete answer (or, on a
        # reused connection, before any byte): see NotSent.
        self._closed_between = False
        self.lost = False
        self._late = False  # the exchange's answers are read late (see exchange)
        #: Lost before its answers read late were all in (see exchange's answer_time).
        self.lost_reading_late = False
        self._resumed_at = -math.inf  # when reading last resumed after a pause
        #: It has answered a whole exchange and stayed open: it may carry a pipeline.
        self.proven = False
        self.idle_since = time.monotonic()

    # -- asyncio.Protocol -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def eof_received(self) -> bool | None:
        self._eof()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        waiter = self._waiter
        if (
            self._late
            and waiter is not None
            and not waiter.done()
            and (
                self._read_later is not None
                or time.monotonic() - self._resumed_at < _RESUMED_LATELY
            )
        ):
            # Lost while answers were held back: those the server had not got out yet die
            # with the connection, and their events go again.
            self.lost_reading_late = True
        self._eof()

    # -- ours -------------------------------------------------------------

    def usable(self, now: float) -> bool:
        return (
            self._idle
            and not self.lost
            and self._transport is not None
            and not self._transport.is_closing()
            and now - self.idle_since < KEEPALIVE_EXPIRY
        )

    def close(self) -> None:
        self.lost = True
        self._idle = False
        if self._transport is not None:
            self._transport.close()

    async def exchange(
        self, bodies: list[bytes], timeout: float, answer_time: float = 0.0
    ) -> list[Reply | Exception]:
        """Write every body at once and read their answers in order: one result per body,
        a ``Reply`` or the error that stands for it. Raises only if cancelled.

        With ``answer_time`` (what a request is expected to add), a pipeline's answers are
        not read as each comes, but once most should be in (see :data:`_READ_AT`)."""
        assert self._transport is not None
        n = len(bodies)
        reused = self.proven
        if self.lost or self._transport.is_closing():
            # Closed by the server since its last answer (or since it was opened): a write
            # would be dropped silently. Nothing was sent, but only a kept-alive connection
            # closing is no failure: one closed at once (a draining balancer) would have
            # the request sent again at once, and again, in a loop.
            self.close()
            if reused:
                return [_not_sent()] * n
            return [
                httpx.RemoteProtocolError("server closed the connection before the request")
            ] * n
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiter = waiter
        self._idle = False
        self._replies = []
        self._received = False
        self._closed_between = False
        self._expected = n
        # A timer rather than wait_for(): no extra task per exchange. It measures time
        # without an answer: a pipeline's last request may wait for all the others.
        self._timeout = timeout
        self._progress_at = time.monotonic()
        self._timer = loop.call_later(timeout, self._time_out)
        error: Exception | None = None
        try:
            self._transport.write(self._frame(bodies))
            if n >= READ_IN_ONE_GO and answer_time > 0.0 and _pause_reading(self._transport):
                # A server answers a pipeline's requests one after the other, and read as
                # they come, each answer costs a loop wake-up, a system call and a feed of
                # the parser of its own: in one read, a pipeline's answers share them (~20 %
                # of the worker's CPU an event at 3,000 events/s to the stand-in).
                # Well within the time limit, which runs from the last answer read.
                self._late = True
                pause = min(_READ_AT * n * answer_time, timeout / 4)
                self._read_later = loop.call_later(pause, self.read_now)
            await waiter
        except httpx.HTTPError as exc:
            error = exc
        except h11.LocalProtocolError as exc:  # a header h11 will not send
            error = httpx.LocalProtocolError(str(exc))
        except OSError as exc:
            error = httpx.WriteError(f"{type(exc).__name__}: {exc}")
        except BaseException:
            # Cancelled (shutdown): what the server has seen is unknown, so this
            # connection is never reused. The answers already read stand.
            self.partial = self._replies[:n]
            self.close()
            raise
        finally:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            # Failed or timed out before: an idle connection must go on reading, or it
            # would not see the server close it.
            self.read_now()
            self._waiter = None
            self._late = False
        results: list[Reply | Exception] = list(self._replies[:n])
        if error is None and len(results) == n and not self.lost and self._next_cycle():
            self._idle = True
            self.proven = True
            self.idle_since = time.monotonic()
        else:
            # Timed out or failed mid-exchange (what the server has seen is unknown);
            # "Connection: close", an HTTP/1.0 answer, or bytes after the answers that
            # nobody asked for (read as the next request's answer, they would shift
            # every reply on this connection by one).
            self.close()
        if len(results) < n:
            if error is None:
                # Announced (RFC 9112 9.6): nothing after it was processed.
                results += [_not_sent()] * (n - len(results))
            elif self._closed_between and (results or reused):
                # Closed at an answer's end with nothing of the next one: a keep-alive limit,
                # or a kept-alive connection closed as it was reused. Or the server dying on
                # the first of them, each time it comes (see ClosedUnannounced). (On a new
                # connection, a close before any answer is a failure: the same doubt, and
                # nothing says the connection had worked before.)
                results.append(_closed_unannounced())
                results += [_not_sent()] * (n - len(results))
            else:
                # Timed out or cut off: the requests behind it were written, and the server
                # may still process them. Each fails with the error, counted and backed off
                # like it: sent again at once, they could be processed twice, and a
                # conversation's next event could overtake the stale copy.
                results += [error] * (n - len(results))
        return results

    def read_now(self) -> None:
        """Read the answers of the pipeline out (if its reading waits) from now on."""
        if self._read_later is None:
            return
        self._read_later.cancel()
        self._read_later = None
        self._resumed_at = time.monotonic()
        transport = self._transport
        if transport is not None and not transport.is_closing():
            with contextlib.suppress(AttributeError, RuntimeError):  # see _pause_reading
                transport.resume_reading()

    def _time_out(self) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        quiet = time.monotonic() - self._progress_at
        if quiet < self._timeout:
            # An answer came meanwhile: the time runs from it.
            self._timer = asyncio.get_running_loop().call_later(
                self._timeout - quiet, self._time_out
            )
            return
        waiter.set_exception(httpx.ReadTimeout(f"no answer within {self._timeout:g} s"))

    def _fail(self, message: str, error: type[httpx.RemoteProtocolError] | None = None) -> None:
        self.close()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception((error or httpx.RemoteProtocolError)(message))

    def _disconnected(self, status_seen: bool) -> None:
        if not status_seen and (self._replies or not self._received):
            self._closed_between = True
        self._fail(
            "server disconnected in the middle of its response"
            if status_seen
            else "server disconnected without sending a response"
        )

    def _frame(self, bodies: list[bytes]) -> bytes:
        raise NotImplementedError

    def _next_cycle(self) -> bool:
        raise NotImplementedError

    def _eof(self) -> None:
        raise NotImplementedError


class ClosedUnannounced(NotSent):
    """:class:`NotSent` for the first request left unanswered by a close nobody announced:
    most likely never processed (a keep-alive limit), but it may be the request the server
    dies on. Sent again at once once; if that happens to it again, it counts as an attempt
    (see ``HttpSink._outcome``): a server dropping the connection on one event must not
    have it sent on every connection in turn."""


def _closed_unannounced() -> ClosedUnannounced:
    return ClosedUnannounced("not answered: the server closed the connection without a word")


def _not_sent() -> NotSent:
    return NotSent("not answered: what came before it on its connection ended the exchange")


class _FastConnection(_Connection):
    """Answers parsed by httptools (llhttp); each request is one prebuilt byte string, and
    several can be written at once (pipelined)."""

    def __init__(self, framing: _Framing, tally: _Tally) -> None:
        super().__init__(framing, tally)
        assert httptools is not None
        self._parser = httptools.HttpResponseParser(self)
        self._status = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._size = 0
        self._framed = False  # Content-Length or Transfer-Encoding: the end is known
        self._in_headers = False
        self._complete = False  # the answer being read is whole
        self._keep_alive = False
        self._stray = False
        # Bytes read in all, and the count at the end of the read in which the answer being
        # read began: what came after it is that answer's, a lower bound of its size.
        self._read = 0
        self._chunk_end = 0
        self._answer_base = 0
        self._read_at = 0.0  # when the last read came (perf_counter): its answers' time

    def _frame(self, bodies: list[bytes]) -> bytes:
        self._status = 0
        self._complete = False
        self._keep_alive = True
        self._answer_base = self._read
        raw = self._framing.raw
        return raw(bodies[0]) if len(bodies) == 1 else b"".join(map(raw, bodies))

    def _next_cycle(self) -> bool:
        return len(self._replies) == self._expected and self._keep_alive and not self._stray

    def data_received(self, data: bytes) -> None:
        self._received = True
        waiter = self._waiter
        if waiter is None or waiter.done():
            self.close()  # bytes nobody asked for: the stream is out of step
            return
        self._read += len(data)
        self._chunk_end = self._read
        self._read_at = time.perf_counter()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _TooLarge):
                self._fail("invalid response from the server: response body too large")
            elif isinstance(exc.__context__, _BadStatus):
                self._fail(f"invalid response from the server: status {self._status}")
            else:
                self._fail(f"invalid response from the server: {exc}")
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            # After a complete answer this is stray bytes: the reply stands, the
            # connection goes. Before, it may be an answer that llhttp, strict against
            # request smuggling, refuses and h11 reads (a doubled Content-Length, bare
            # LF line ends, folded headers): the pool then changes engine.
            self._fail(
                f"invalid response from the server: {type(exc).__name__} {exc}", UnreadableAnswer
            )
        else:
            # llhttp buffers a head (a header line without end, trailers) with no limit of
            # its own. The bytes read after the read in which the unfinished answer began
            # are all its own: past the limits, it is refused (the limit is thus exceeded
            # by one read at most; per answer, so a pipeline of big answers is no matter).
            if not self._complete:
                span = self._read - self._answer_base
                if span > MAX_RESPONSE_BODY + MAX_RESPONSE_HEAD or (
                    self._in_headers and span > MAX_RESPONSE_HEAD
                ):
                    self._fail("invalid response from the server: answer too large")

    # llhttp's callbacks, within feed_data()

    def on_message_begin(self) -> None:
        if len(self._replies) >= self._expected or not self._keep_alive:
            self._stray = True  # an answer to no request
        self._status = 0
        self._headers = []
        self._body = []
        self._size = 0
        self._framed = False
        self._in_headers = True
        self._complete = False
        self._answer_base = self._chunk_end

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-length" or name == b"transfer-encoding":
            self._framed = True
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._status = self._parser.get_status_code()
        if self._status < 100:
            raise _BadStatus  # else taken for an interim answer: waited out to the timeout

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > MAX_RESPONSE_BODY:
            raise _TooLarge
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._status < 200:
            return  # 100 Continue and the like: the real answer follows
        if not self._complete:
            self._complete = True
            self._answer(self._parser.should_keep_alive())

    def _answer(self, keep_alive: bool) -> None:
        if self._stray or len(self._replies) >= self._expected:
            return
        self._keep_alive = keep_alive
        self._replies.append(
            Reply(self._status, self._headers, b"".join(self._body), self._read_at)
        )
        self._progress_at = time.monotonic()
        if self._status < 300:
            self._tally.accepted += 1
        waiter = self._waiter
        # An answer that closes the connection ends the exchange: the server processes
        # no request after it (the rest of a pipeline is not sent, see NotSent).
        if (
            waiter is not None
            and not waiter.done()
            and (not keep_alive or len(self._replies) == self._expected)
        ):
            waiter.set_result(None)

    def _eof(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            if self._status >= 200 and not self._framed and not self._complete:
                # Neither a length nor chunks: the body ends where the connection does.
                self._complete = True
                self._answer(keep_alive=False)
            else:
                # Of the answer being read, not one finished before it.
                self._disconnected(self._in_headers or (self._status != 0 and not self._complete))
        self.close()


class _H11Connection(_Connection):
    """Answers parsed (and requests framed) by h11's state machine, one request at a time
    (h11's client cannot pipeline)."""

    def __init__(self, framing: _Framing, tally: _Tally) -> None:
        super().__init__(framing, tally)
        self._h11 = h11.Connection(h11.CLIENT)
        self._eof_seen = False
        self._status = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._buffer: list[bytes] = []
        self._size = 0

    def _frame(self, bodies: list[bytes]) -> bytes:
        (body,) = bodies
        self._buffer = []
        self._size = 0
        self._status = 0
        h = self._h11
        head = self._framing.h11_head(len(body))
        return (h.send(head) or b"") + (h.send(h11.Data(data=body)) or b"") + (h.send(_END) or b"")

    def _next_cycle(self) -> bool:
        h = self._h11
        if h.our_state is h11.DONE and h.their_state is h11.DONE and not h.trailing_data[0]:
            h.start_next_cycle()
            return True
        return False

    def data_received(self, data: bytes) -> None:
        self._received = True
        try:
            self._h11.receive_data(data)
        except RuntimeError:
            # Data after the connection was declared unusable: nobody waits for it.
            self.close()
            return
        self._pump()

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
                    self._replies.append(
                        Reply(
                            self._status,
                            self._headers,
                            b"".join(self._buffer),
                            time.perf_counter(),
                        )
                    )
                    if self._status < 300:
                        self._tally.accepted += 1
                    waiter.set_result(None)
                    return
                elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                    raise h11.RemoteProtocolError("server closed the connection")
                # InformationalResponse (100 Continue): wait for the real one.
        except h11.RemoteProtocolError as exc:
            if not self._eof_seen:
                self._fail(f"invalid response from the server: {exc}")
            else:
                self._disconnected(bool(self._status))

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
                self._disconnected(False)
        self.close()


def _interleave(infos: list[Any]) -> list[Any]:
    """A host's addresses with their families taking turns, the first one's first (RFC 8305
    section 4; asyncio's ``interleave=1``)."""
    families: dict[int, list[Any]] = {}
    for info in infos:
        families.setdefault(info[0], []).append(info)
    turns = itertools.zip_longest(*families.values())
    return [info for turn in turns for info in turn if info is not None]


async def _open_socket(host: str, port: int) -> socket.socket:
    """A socket connected to ``host``, its addresses raced as asyncio's happy eyeballs race
    them: one time limit covers them all, and without the race an address that drops
    packets (a broken IPv6 route) would use it all up, the working one never tried.

    Every socket connected here and not returned is closed here. ``create_connection`` with
    ``happy_eyeballs_delay`` drops the socket that has won when its caller is cancelled before
    the race is over, a few loop turns after the connect (a sender cancelled at shutdown, or
    at its time limit): it stayed open until the garbage collector found it."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    if not infos:
        raise OSError(f"getaddrinfo({host!r}) returned no address")
    connected: list[socket.socket] = []
    errors: list[OSError] = []

    async def attempt(info: Any) -> socket.socket:
        family, type_, proto, _, address = info
        sock = None
        try:
            sock = socket.socket(family, type_, proto)
            sock.setblocking(False)
            await loop.sock_connect(sock, address)
        except BaseException as exc:
            if sock is not None:
                sock.close()
            if isinstance(exc, OSError):
                errors.append(exc)
            raise
        connected.append(sock)
        return sock

    winner: socket.socket | None = None
    try:
        winner, _, _ = await staggered.staggered_race(
            [functools.partial(attempt, info) for info in _interleave(infos)],
            _NEXT_ADDRESS_AFTER,
        )
    finally:
        for sock in connected:
            if sock is not winner:
                sock.close()
    if winner is None:  # as asyncio says it: the error, or all of them if they differ
        if len({str(exc) for exc in errors}) == 1:
            raise errors[0]
        raise OSError(f"Multiple exceptions: {', '.join(map(str, errors)) or 'none'}")
    return winner


class Http11Pool:
    """Keep-alive connections to the origin of ``url``, each used by one exchange at a time.

    The caller bounds concurrency (the sink never has more exchanges in flight
    than ``max_connections``); the pool only reuses and opens connections, and
    pipelines several requests on one connection when it is safe to (``depth``).
    """

    def __init__(
        self,
        url: str,
        *,
        headers: list[tuple[bytes, bytes]],
        max_connections: int,
        timeout: float,
        ssl_context: ssl.SSLContext | None = None,
        engine: Engine | None = None,
    ) -> None:
        # httpx's URL model: IDNA hosts, percent-encoded paths and the default port
        # left out of Host (RFC 9112), as httpx itself would send them.
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as exc:
            raise ValueError(f"not an http(s) URL: {url!r} ({exc})") from None
        if parsed.scheme not in ("http", "https") or not parsed.raw_host:
            raise ValueError(f"not an http(s) URL: {url!r}")
        if engine is not None and engine not in ENGINES:
            raise ValueError(f"HTTP engine {engine!r} is not available here; one of {ENGINES}")
        self.engine: Engine = engine or ENGINES[0]
        self._connection_class = _FastConnection if self.engine == "httptools" else _H11Connection
        self._host = parsed.raw_host.decode("ascii")
        self._port = parsed.port or (443 if parsed.scheme == "https" else 80)
        self._ssl: ssl.SSLContext | None = None
        if parsed.scheme == "https":
            # httpx's own context: certifi's roots, as httpx.Client would verify.
            self._ssl = ssl_context or httpx.create_ssl_context()
        self.host_header = parsed.netloc
        self.target = parsed.raw_path
        self._framing = _Framing(self.target, [(b"Host", self.host_header), *headers])
        self._max = max_connections
        self._timeout = timeout
        self._idle: list[_Connection] = []
        self._exchanging: set[_Connection] = set()
        self._read_now = False  # see read_now()
        self._closed = False
        self._no_pipelining_until = 0.0
        self._read_late_after = 0.0  # see READ_LATE_PAUSE
        # Reading with h11 after an answer httptools refused, until then (0: not so).
        self._h11_until = 0.0
        self._tally = _Tally()

    def reads_late(self) -> bool:
        """Whether a pipeline's answers may be read in one go now (see ``post_many``'s
        ``answer_time``): not after ``read_now()``, nor for :data:`READ_LATE_PAUSE` after a
        connection was lost while answers were held back, nor ever over TLS, where asyncio's
        TLS layer goes on reading the socket and drops what it holds when the connection is
        reset (16 of 16 answers lost where read as they came none were), for a saving in
        calls alone."""
        return (
            self._ssl is None and not self._read_now and time.monotonic() >= self._read_late_after
        )

    @property
    def accepted(self) -> int:
        """2xx answers so far, counted as they arrive (a pipeline's first ones before
        its last)."""
        return self._tally.accepted

    @property
    def max_depth(self) -> int:
        """How many requests one connection may carry at once with this server now."""
        if self.engine != "httptools" or time.monotonic() < self._no_pipelining_until:
            return 1
        return PIPELINE

    @property
    def depth(self) -> int:
        """How many requests ``post_many`` would write at once now: a pipeline only on a
        proven idle connection (a new one carries one request first, and events taken
        for it would only wait, their outbox lease running)."""
        depth = self.max_depth
        if depth > 1:
            now = time.monotonic()
            if not any(
                c.proven and c.usable(now) and type(c) is _FastConnection for c in self._idle
            ):
                return 1
        return depth

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        cls, framing, tally = self._connection_class, self._framing, self._tally

        async def connect() -> tuple[asyncio.BaseTransport, _Connection]:
            sock = await _open_socket(self._host, self._port)
            # No await between: the socket is the transport's before a cancel can come,
            # and a transport cancelled while it is made is closed by asyncio.
            return await loop.create_connection(
                lambda: cls(framing, tally),
                sock=sock,
                ssl=self._ssl,
                server_hostname=self._host if self._ssl is not None else None,
            )

        try:
            _, connection = await bounded(connect(), self._timeout)
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

    async def post(self, body: bytes) -> Reply:
        """POST ``body`` with the pool's headers (Host and Content-Length added)."""
        (result,) = await self.post_many([body])
        if isinstance(result, Exception):
            raise result
        return result

    async def post_many(
        self,
        bodies: list[bytes],
        results: list[Reply | Exception] | None = None,
        answer_time: float = 0.0,
    ) -> list[Reply | Exception]:
        """POST each body, in order, on one connection; one result per body: its ``Reply``,
        or the ``httpx.HTTPError`` that stands for it (``NotSent``: send it again, it does
        not count as an attempt). Raises only if cancelled; ``results``, if given, is
        filled as answers come, so a caller that is cancelled keeps the ones it got.

        Up to ``depth`` requests are written at once (pipelined), and only on a
        connection that has already answered a request and stayed open: a new one
        carries one request first (RFC 9112 9.3.2: what a server does with a pipeline
        on a connection it is about to refuse is unknown). ``answer_time``, the seconds a
        request is expected to add to a pipeline (the caller's measure of the server), has
        a pipeline's answers read in one go once most should be in, not one by one.
        """
        n = len(bodies)
        results = [] if results is None else results
        if self._closed:
            results += [httpx.ConnectError("the connection pool is closed")] * n
            return results
        try:
            self._framing.check()
        except h11.LocalProtocolError as exc:  # a header h11 will not send
            results += [httpx.LocalProtocolError(str(exc))] * n
            return results
        now = time.monotonic()
        connection = None
        while self._idle:
            candidate = self._idle.pop()
            if candidate.usable(now):
                connection = candidate
                break
            candidate.close()
        if connection is None:
            try:
                connection = await self._connect()
            except httpx.HTTPError as exc:
                results += [exc] * n
                return results
        start = len(results)
        self._exchanging.add(connection)
        try:
            while len(results) - start < n:
                done = len(results) - start
                if done and not connection.usable(time.monotonic()):
                    # The server closed it after answering all it was sent so far (as it
                    # said it would, or the answer was its last): the rest were never sent.
                    results += [_not_sent()] * (n - done)
                    break
                pipelines = connection.proven and type(connection) is _FastConnection
                batch = bodies[done : done + (self.max_depth if pipelines else 1)]
                if not self.reads_late():
                    answer_time = 0.0
                try:
                    answered = await connection.exchange(batch, self._timeout, answer_time)
                except BaseException:
                    results += connection.partial
                    raise
                results += answered
                if connection.lost_reading_late and time.monotonic() >= self._read_late_after:
                    self._read_late_after = time.monotonic() + READ_LATE_PAUSE
                    logger.warning(
                        "%s closed a connection while its answers waited to be read in one "
                        "go; reading answers as they come for the next %d s",
                        self._host,
                        READ_LATE_PAUSE,
                    )
        finally:
            self._exchanging.discard(connection)
        self._learn(n, results[start:])
        if not self._closed and len(self._idle) < self._max and connection.usable(time.monotonic()):
            self._idle.append(connection)
        else:
            connection.close()
        return results

    def _learn(self, written: int, answered: list[Reply | Exception]) -> None:
        """What one ``post_many`` tells about the server: which engine reads it, and
        whether it answers all of what one connection carries."""
        if self.engine == "httptools" and any(isinstance(r, UnreadableAnswer) for r in answered):
            # For a while, not for good: garbage from a broken proxy or a moment's
            # misconfiguration is unreadable to h11 too, and h11 costs ~30x the CPU per
            # answer (and pipelining).
            logger.warning(
                "an answer from %s could not be read by httptools (%s); reading answers "
                "with h11 for the next %d s",
                self._host,
                next(r for r in answered if isinstance(r, UnreadableAnswer)),
                ENGINE_PAUSE,
            )
            self._switch("h11", _H11Connection)
            self._h11_until = time.monotonic() + ENGINE_PAUSE
        elif self._h11_until and time.monotonic() >= self._h11_until:
            self._h11_until = 0.0
            self._switch("httptools", _FastConnection)
        if written > 1 and isinstance(answered[0], Reply):
            lost = [r for r in answered if isinstance(r, Exception) and not isinstance(r, NotSent)]
            if lost and time.monotonic() >= self._no_pipelining_until:
                # Answered, then silent or cut off without announcing it: a server (or a
                # proxy in front of it) that does not read pipelines, or closes kept-alive
                # connections unannounced. The request the failure hit is retried as after
                # any failure, the rest at once; the next ones go one at a time.
                self._no_pipelining_until = time.monotonic() + PIPELINE_PAUSE
                logger.warning(
                    "%s left %d of %d request(s) on one connection unanswered (%s); sending "
                    "one request per connection at a time for the next %d s",
                    self._host,
                    sum(1 for r in answered if not isinstance(r, Reply)),
                    written,
                    lost[0],
                    PIPELINE_PAUSE,
                )

    def _switch(self, engine: Engine, cls: type[_FastConnection] | type[_H11Connection]) -> None:
        """Read with another engine from now on; the idle connections of the other one
        go (an h11 connection cannot carry a pipeline, for one)."""
        self.engine = engine
        self._connection_class = cls
        keep: list[_Connection] = [c for c in self._idle if type(c) is cls]
        for connection in self._idle:
            if type(connection) is not cls:
                connection.close()
        self._idle = keep

    def read_now(self) -> None:
        """Read every answer as it comes from now on, those of the pipelines out included
        (see ``post_many``'s ``answer_time``): at shutdown, an answer left unread when the
        time is up counts as none, and its event as unanswered."""
        self._read_now = True
        for connection in self._exchanging:
            connection.read_now()

    def close(self) -> None:
        self._closed = True
        for connection in self._idle:
            connection.close()
        self._idle.clear()
