"""Peek at a request body for a conversation id, then hand the app the very same bytes.

Only the first ``limit`` bytes are ever held. Under ASGI the messages read are
replayed unchanged (same chunking, same ``more_body`` flags, a
``http.disconnect`` included), then ``receive`` is passed through. Under WSGI
the bytes read are served again before the rest of the original stream.
"""

from __future__ import annotations

import io
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Generator, MutableMapping
from typing import IO, Any

__all__ = ["ReplayInput", "peek_asgi", "peek_wsgi"]

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]


#: Seconds a chat request's body may take to start arriving, and then as long again to
#: arrive whole, before the app is called without it (the id then comes from the sources
#: after the body). An app may answer before reading it (a 401, a rate limit), or a
#: client wait for the answer before sending it: neither should wait on the peek. (On
#: Python 3.10 the first part is awaited without a bound: see _wait_handing_over.)
#: 200 ms: a body past the first TCP flight (~14 KB) comes one round trip later, over
#: 100 ms on a mobile network.
PEEK_WAIT = 0.2
#: How late a wake-up may be before the peek gives the body a little more time.
_LATE = 0.005
#: Loop turns a receive must have sat still, past the bound, before it is cancelled: one
#: that has just woken may hold the message already and still have awaits to run before
#: it returns it (Starlette's receive_or_disconnect leaves an anyio task group: three
#: turns), and a cancel there drops the message.
_QUIET_TURNS = 5
#: Parts of a body the peek holds at most. A server may hand a body over one chunk (or one
#: HTTP/2 DATA frame, empty ones too) a message, as hypercorn does: 1-byte chunks, or empty
#: frames, made the peek hold tens of thousands of messages, each a dict kept until the app
#: read it (4-10 MB for one chat request, where the bare server holds 10 messages and pushes
#: back on the socket). No client sends a chat body in more parts than this; past it the
#: body is left to the app as one over the limit is.
_MAX_PARTS = 1024


def _send(steps: Any, value: Any) -> Any:
    """``steps.send(value)``, as ``await`` does it: an awaitable's iterator need not be a
    generator (granian's receive returns a future whose ``__await__`` is itself, with
    ``__next__`` only)."""
    if value is None:
        return next(steps)
    try:
        return steps.send(value)
    finally:
        del value  # trio's outcome, holding the error it raises here (see _throw)


def _throw(steps: Any, exc: BaseException) -> Any:
    """``steps.throw(exc)``, as ``await`` does it: an iterator without ``throw`` is left,
    and the exception raised where it was awaited. ``exc`` is not kept here once raised: a
    frame that holds the exception going through it is in that exception's traceback, a
    reference cycle only the garbage collector frees, and with it every frame it went
    through and their locals, the server's receive among them. granian keeps a connection
    open while its request is referenced: after a time limit's 504 over a cancelled peek,
    until the next collection (often past the client's own time-out)."""
    throw = getattr(steps, "throw", None)
    try:
        if throw is None:
            raise exc
        return throw(exc)
    finally:
        del exc


def _kept(exc: BaseException, handled: BaseException | None) -> BaseException:
    """``exc``, kept to be raised where the app receives, without its traceback: the frames
    it went through, the catching one among them (on 3.12+ through the ``f_back`` of the
    server's), would hold it in a reference cycle (see _throw), and the request with it. The
    same for those it was raised from or while handling (``__cause__``, ``__context__``: a
    frame of the server's that caught one is in its traceback), short of ``handled``, the
    error being handled where the peek began (an outer middleware's, not ours to change)."""
    left = [exc]
    seen = {id(handled)}
    while left:
        each = left.pop()
        if id(each) not in seen:
            seen.add(id(each))
            each.with_traceback(None)
            left += [e for e in (each.__cause__, each.__context__) if e is not None]
    if sys.version_info >= (3, 11):
        # Else the server's log would blame the middleware's replay for it.
        exc.add_note(
            "(the server raised this while agentsight-middleware peeked at the request body; "
            "its traceback there was dropped)"
        )
    return exc


async def _wait_cancelling(
    steps: Generator[Any, None, Message], waited: Any, deadline: float
) -> tuple[Message | None, Any]:
    """The rest of a ``receive()`` that has to wait, carried on in this very task (its
    first step ran here: a contextvar, a cancel scope or an ``asyncio.timeout`` it
    entered must be left here too): ``(message, None)`` if it comes before ``deadline``,
    else ``(None, None)``, the receive cancelled here, as a time limit on it would: the
    app's own next ``receive()`` gets what comes (a server's receive is cancel-safe:
    Starlette cancels a pending one itself, in ``Request.is_disconnected()``). Never
    handed to the app half run: the app may call receive from another task (an inner
    BaseHTTPMiddleware's ``call_next``), where a cancel scope that the receive entered
    here (an outer BaseHTTPMiddleware's) cannot be left. Under trio, relayed without a
    bound. A future of the server's own kind is never cancelled (see :func:`_foreign`):
    the server's receive itself is handed over at the bound (nothing of a wrapper ran in
    this task), one inside a wrapper's is waited for without a bound."""
    import asyncio

    if waited is steps and _foreign(waited):
        return await _wait_handing_over(steps, waited, deadline)
    resume = _Resume(steps, waited)
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return await resume, None
    task = asyncio.current_task()
    if task is None:  # pragma: no cover - a receive stepped outside any task
        return await resume, None
    expired = finished = False
    seen = resume.steps
    quiet = 0
    timer: asyncio.Handle

    def expire() -> None:
        # Past the bound: checked every loop turn until the receive has sat still for
        # _QUIET_TURNS of them (not woken, no wake-up queued), then cancelled. One that
        # moves (the part came: the server hands it over, a wrapper leaves its task
        # group with the message in hand) is left to finish, up to PEEK_WAIT more.
        nonlocal expired, timer, seen, quiet
        if finished:
            return
        pending = resume.waited
        future = getattr(pending, "_asyncio_future_blocking", None) is not None
        if resume.steps != seen or (future and pending.done()):
            seen, quiet = resume.steps, 0
        else:
            quiet += 1
        if quiet < _QUIET_TURNS and time.monotonic() < deadline + PEEK_WAIT:
            timer = loop.call_soon(expire)  # noqa: F821  # deleted once finished: see below
            return
        if future and _foreign(pending):
            # A future of the server's own kind, inside a wrapper's receive: neither its
            # cancel() nor Task.cancel() (which calls it) is safe (see _foreign). Waited for.
            return
        expired = True
        task.cancel()  # noqa: F821  # deleted once finished: see below

    timer = loop.call_later(max(0.0, deadline - time.monotonic()), expire)
    try:
        message = await resume
        if expired:
            task.uncancel()  # it took our cancel, and answered all the same
        return message, None
    except BaseException as exc:
        # Our cancel taken back whatever came of it (a receive may turn it into an
        # error of its own): a count left behind would confuse the app's time limits.
        if not expired or task.uncancel() > 0 or not isinstance(exc, asyncio.CancelledError):
            raise  # this task's own cancel, one more besides ours, or the receive's error
        return None, None
    finally:
        finished = True
        timer.cancel()
        # Let go: an error going through this frame (a time limit's cancel) holds it in its
        # traceback, and the task holds the error, a reference cycle that kept the request
        # (the server's receive, the app's state) until the collector's next pass; expire,
        # which schedules itself, was one too, on every peek that waited.
        del task, expire


async def _wait_handing_over(
    steps: Generator[Any, None, Message], waited: Any, deadline: float
) -> tuple[Message | None, Any]:
    """The rest of a ``receive()`` that has to wait, carried on in this very task (its
    first step ran here: a contextvar, a cancel scope or an ``asyncio.timeout`` it
    entered must be left here too): ``(message, None)`` if it comes before ``deadline``,
    else ``(None, an awaitable of the rest)`` for the app to await. Under trio, or for
    a yield asyncio does not know, relayed without a bound. On Python 3.10 for every
    receive: there, anyio takes a cancel of ours in a cancel scope the receive entered for
    its own, and swallows it (BaseHTTPMiddleware's receive then fails); the app awaiting
    the rest in another task fails as well, so the first part is not bounded there. On
    3.11+ only for a server's own future awaited as it is (granian's: see _foreign), which
    any task may await and no cancel may touch."""
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return await _Resume(steps, waited), None
    while True:
        throw: BaseException | None = None
        if waited is None:  # a bare yield: one loop turn, as a task gives it
            try:
                await asyncio.sleep(0)
            except BaseException as exc:  # this task cancelled: it goes in, as a task's would
                throw = exc
        elif getattr(waited, "_asyncio_future_blocking", None) is not None:
            try:
                if not waited.done():
                    await asyncio.wait((waited,), timeout=max(0.0, deadline - time.monotonic()))
                    if not waited.done() and time.monotonic() - deadline > _LATE:
                        await asyncio.wait((waited,), timeout=_LATE)
            except BaseException as exc:  # this task cancelled (an anyio scope, say)
                throw = exc
                # As the task's cancel() does to the future it waits on itself: this task
                # waited on asyncio.wait's, and a future of the server's own kind left
                # pending kept granian's connection open after the answer.
                _cancel_foreign(waited)
            else:
                if not waited.done():
                    return None, _Resume(steps, waited)  # blocking mark kept for the app's task
                waited._asyncio_future_blocking = False
                try:
                    waited.result()
                except BaseException as exc:
                    throw = exc
        else:
            return await _Resume(steps, waited), None
        try:
            waited = next(steps) if throw is None else _throw(steps, throw)
        except StopIteration as done:
            return done.value, None
        finally:
            throw = None  # not kept where it goes through (see _throw)


def _foreign(waited: Any) -> bool:
    """Whether a receive waits on a future of the server's own kind, not asyncio's: one
    that may not be cancelled without losing a message. granian's ``PyFutureAwaitable``
    takes the part off the connection in its own thread and sets the result a moment later
    on the loop; a ``cancel()`` in between says True, and that part never reaches the app (a
    chat body whose part came at the bound: a truncated body, or a request that hangs
    for want of its last, empty part). Another's ``cancel()`` may say False instead, and
    ``Task.cancel()`` would then put a CancelledError in place of the message."""
    import asyncio

    blocking = getattr(waited, "_asyncio_future_blocking", None)
    return blocking is not None and not isinstance(waited, asyncio.Future)


def _cancel_foreign(waited: Any) -> None:
    """Cancel ``waited`` if it is a future of the server's own kind still pending: once no
    one will take what it brings (the request cancelled, or the app finished without it)."""
    if _foreign(waited) and not waited.done():
        waited.cancel()


class _Resume:
    """Awaits the rest of a stepped awaitable: what it yields goes to the running task,
    and what the task sends back (or throws) goes to it, as ``await`` would have done."""

    def __init__(self, steps: Generator[Any, Any, Message], waited: Any) -> None:
        self._steps = steps
        self.waited = waited  # what it waits on now
        self.steps = 0  # how many times it was woken by what it waited on (not a bare yield)

    def abandon(self) -> None:
        """A wait handed over to an app that finished without taking it up: the server's
        own future (see :func:`_foreign`) is cancelled now, what it may hold read by no
        one. An app that does not read leaves no receive pending without us; granian kept
        the connection open while ours was (until more of the body came, or the client
        gave up)."""
        if self.waited is not self._steps:
            return  # inside a wrapper's receive: never cancelled (see _wait_cancelling)
        _cancel_foreign(self.waited)

    def __await__(self) -> Generator[Any, Any, Message]:
        steps = self._steps
        while True:
            try:
                sent = yield self.waited
            except BaseException as exc:
                self.steps += self.waited is not None
                try:
                    self.waited = _throw(steps, exc)
                except StopIteration as done:
                    return done.value  # type: ignore[no-any-return]
            else:
                self.steps += self.waited is not None
                try:
                    self.waited = _send(steps, sent)
                except StopIteration as done:
                    return done.value  # type: ignore[no-any-return]
                finally:
                    sent = None  # trio sends an outcome: its error is not kept (see _send)


#: A part that does not come in time: its receive cancelled (3.11+), or handed over.
_BOUND_CANCELS = sys.version_info >= (3, 11)
_wait_bounded = _wait_cancelling if _BOUND_CANCELS else _wait_handing_over


def _declared_length(value: str | None) -> int | None:
    """``Content-Length`` as an int; -1 when present but not a number."""
    if value is None:
        return None
    value = value.strip()
    # ASCII digits only: str.isdigit() also says yes to "²" and other digits int()
    # refuses, and past 4,300 digits int() refuses any string. Eighteen digits is
    # already an exabyte: a longer value is nonsense too.
    if value.isascii() and value.isdigit() and len(value) <= 18:
        return int(value)
    return -1


async def peek_asgi(
    receive: Receive, content_length: str | None, limit: int
) -> tuple[bytes, Receive]:
    """``(body, receive_for_the_app)``; ``body`` is b"" unless complete and within ``limit``."""
    declared = _declared_length(content_length)
    if declared is not None and not 0 < declared <= limit:
        return b"", receive  # too big, empty or nonsense: do not touch the stream

    first_error: BaseException | None = None
    first: Message | None = None
    waiting: Any = None
    handled = sys.exc_info()[1]  # see _kept
    try:
        # Stepped by hand as the later parts are (see below): a first part the server
        # already has costs nothing more, and one that does not come within PEEK_WAIT
        # (a client waiting for the answer before it sends the body, or one that never
        # sends it) is left to the app, which may answer unread (a 401, a rate limit).
        steps = receive().__await__()
        try:
            waited = next(steps)  # not .send: granian's is an iterator without it
        except StopIteration as done:
            first = done.value
        else:
            if _BOUND_CANCELS:
                first, waiting = await _wait_bounded(steps, waited, time.monotonic() + PEEK_WAIT)
            else:  # Python 3.10: awaited as before the bound (see _wait_handing_over)
                first = await _Resume(steps, waited)
    except Exception as exc:
        first, first_error = None, _kept(exc, handled)
    if first is not None and first["type"] == "http.request" and not first.get("more_body", False):
        # The common case: the whole body in one message. Hand that very message
        # back first, then the server's receive, with no buffering machinery.
        pending: Message | None = first

        async def replay_one() -> Message:
            nonlocal pending
            if pending is not None:
                message, pending = pending, None
                return message
            return await receive()

        body = first.get("body", b"")
        return (body if len(body) <= limit else b""), replay_one

    messages: deque[Message] = deque()
    chunks: list[bytes] = []
    size = 0
    complete = False
    error = first_error
    deadline = 0.0  # set at the first part that has to be waited for
    try:
        message = first
        while message is not None:
            messages.append(message)
            if message["type"] != "http.request":
                break  # http.disconnect: the app will see it next
            chunk = message.get("body", b"")
            chunks.append(chunk)
            size += len(chunk)
            if not message.get("more_body", False):
                complete = size <= limit
                break
            if size > limit or len(messages) >= _MAX_PARTS:
                break
            # A part the server already has is taken at once: receive() is stepped by
            # hand, and only one that has to wait goes through _wait_bounded (awaiting
            # each part under a time limit, with a task, cost ~30 us a part: a 64 KB body
            # in parts went from +37 to +217 us).
            steps = receive().__await__()
            try:
                waited = next(steps)  # not .send: granian's is an iterator without it
            except StopIteration as done:
                message = done.value
                continue
            if not deadline:
                deadline = time.monotonic() + PEEK_WAIT
            message, waiting = await _wait_bounded(steps, waited, deadline)
            if waiting is not None:
                break
    except Exception as exc:
        # The server's receive failed; the app must meet the same failure, at the
        # same point of the stream, rather than have it swallowed here.
        error = _kept(exc, handled)

    async def replay() -> Message:
        if messages:
            return messages.popleft()
        nonlocal error, waiting
        if error is not None:
            exc, error = error, None
            try:
                raise exc
            finally:
                del exc  # not kept where it goes through (see _throw)
        if waiting is not None:
            pending, waiting = waiting, None
            return await pending  # type: ignore[no-any-return]
        return await receive()

    if waiting is not None:

        def abandon() -> None:
            # The app has finished: the wait handed over at the bound, if it never took it
            # up (see _Resume.abandon).
            if waiting is not None:
                waiting.abandon()

        replay.abandon = abandon  # type: ignore[attr-defined]
    return (b"".join(chunks) if complete else b""), replay


#: The size of each read of the rest of a WSGI input read to its end (see ReplayInput).
_READ_BLOCK = 65536


class ReplayInput(io.RawIOBase):
    """A ``wsgi.input`` that serves ``head`` first, then the rest of ``stream``."""

    def __init__(self, head: bytes, stream: IO[bytes] | None, error: BaseException | None = None):
        super().__init__()
        self._head = head
        self._pos = 0
        self._stream = stream
        self._error = error

    def readable(self) -> bool:
        return True

    def _raise_pending(self) -> None:
        if self._error is not None:
            exc, self._error = self._error, None
            try:
                raise exc
            finally:
                del exc  # not kept where it goes through (see _throw)

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        left = len(self._head) - self._pos
        if left > 0:
            n = min(left, len(view))
            view[:n] = self._head[self._pos : self._pos + n]
            self._pos += n
            return n
        self._raise_pending()
        if self._stream is None or not len(view):
            return 0
        data = self._stream.read(len(view))
        view[: len(data)] = data
        return len(data)

    def read(self, size: int | None = -1) -> bytes:
        head = (
            self._head[self._pos :]
            if size is None or size < 0
            else self._head[self._pos : self._pos + size]
        )
        self._pos += len(head)
        if size is not None and 0 <= size <= len(head):
            return head
        self._raise_pending()
        if self._stream is None:
            return head
        if size is None or size < 0:
            return head + self._read_to_end(self._stream)
        return head + self._stream.read(size - len(head))

    @staticmethod
    def _read_to_end(stream: IO[bytes]) -> bytes:
        """The rest of ``stream``, read in parts of a given size: PEP 3333 promises no
        ``read()`` without one, and granian's input (2.x) answers one made after sized reads
        (the peek's) with only part of what is left, the rest lost: a chunked body over the
        peek's limit reached the app cut short (Flask's ``get_data()`` reads so)."""
        parts = []
        while chunk := stream.read(_READ_BLOCK):
            parts.append(chunk)
        return b"".join(parts)

    def readall(self) -> bytes:
        return self.read(-1)

    def readline(self, size: int | None = -1) -> bytes:
        limit = (
            len(self._head) if size is None or size < 0 else min(len(self._head), self._pos + size)
        )
        end = self._head.find(b"\n", self._pos, limit)
        stop = limit if end < 0 else end + 1
        line = self._head[self._pos : stop]
        self._pos = stop
        if end >= 0 or (size is not None and 0 <= size <= len(line)):
            return line
        self._raise_pending()
        if self._stream is None:
            return line
        more = (
            self._stream.readline()
            if size is None or size < 0
            else self._stream.readline(size - len(line))
        )
        return line + more


def _position(stream: Any) -> int | None:
    """Where a seekable ``stream`` stands, or None (not seekable, or it will not say)."""
    try:
        seekable = getattr(stream, "seekable", None)
        return stream.tell() if seekable is not None and seekable() else None
    except Exception:
        return None


def _rewound(stream: Any, position: int) -> bool:
    try:
        stream.seek(position)
    except Exception:
        return False
    return True


def peek_wsgi(environ: MutableMapping[str, Any], limit: int) -> bytes:
    """The body if it fits in ``limit``, else b""; ``wsgi.input`` is replaced by a replay."""
    stream = environ.get("wsgi.input")
    if stream is None:
        return b""
    declared = _declared_length(environ.get("CONTENT_LENGTH") or None)
    if declared is not None and not 0 < declared <= limit:
        return b""
    rest: IO[bytes] | None
    if environ.get("wsgi.input_terminated"):
        # The stream ends with the body, whatever Content-Length says (a de-chunked
        # body keeps the header, and Werkzeug then ignores it): read it as the app
        # would, and serve the rest of the stream after the bytes read.
        want = limit + 1  # one byte more tells "too big" from "exactly the limit"
        rest = stream
    elif declared is not None:
        want = declared
        # Never read past Content-Length: on a plain socket that read would block.
        rest = None
    else:
        return b""  # no length and no terminated stream: the app could not read it either

    start = _position(stream)
    chunks: list[bytes] = []
    got = 0
    error: BaseException | None = None
    handled = sys.exc_info()[1]  # see _kept
    try:
        while got < want:
            chunk = stream.read(want - got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    except Exception as exc:
        # Kept for the app without its traceback (see _kept): this frame, and on 3.11+ its
        # caller's through f_back, would hold it, through environ's replay and this local.
        error = _kept(exc, handled)
    head = b"".join(chunks)
    if start is None or error is not None or not _rewound(stream, start):
        environ["wsgi.input"] = ReplayInput(head, rest, error)
    # else: a seekable input (waitress's buffer, a test client's BytesIO, uWSGI's with
    # post-buffering) is left in place, rewound: the app keeps seek(), tell() and the
    # rest, which a replay lacks (WebOb seeks an input it was told is seekable).
    if error is not None or got > limit or (declared is not None and got != declared):
        return b""
    return head
