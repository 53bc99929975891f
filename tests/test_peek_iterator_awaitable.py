"""A receive whose awaitable's ``__await__`` is a plain iterator (granian:
``PyFutureAwaitable.__await__()`` returns itself, with ``__next__`` and no
``send``/``throw``) fails the peek with AttributeError('... has no attribute send'),
raised to the app: a 500 on every chat request whose id may be in the body, under
granian (which hands every body over as a part with more_body=True, then an empty last
one)."""

from __future__ import annotations

import asyncio
import gc
import sys
import weakref
from typing import Any

import pytest

from agentsight_middleware import _body
from agentsight_middleware._body import peek_asgi


class IterFuture:
    """A future-like awaitable as granian's: __await__ returns self; __next__ only."""

    # On the class, as granian's (a pyo3 getter) is: asyncio.isfuture() looks there, and on
    # Python 3.10 asyncio.wait() wrapped an instance-only one in a task that cleared it.
    _asyncio_future_blocking = False

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._fut = loop.create_future()
        self._asyncio_future_blocking = False

    # the duck-typed future API Task uses
    def get_loop(self) -> Any:
        return self._fut.get_loop()

    def add_done_callback(self, cb: Any, *, context: Any = None) -> None:
        self._fut.add_done_callback(lambda _f: cb(self), context=context)

    def remove_done_callback(self, cb: Any) -> int:
        return 0

    def done(self) -> bool:
        return self._fut.done()

    def cancelled(self) -> bool:
        return self._fut.cancelled()

    def cancel(self, msg: Any = None) -> bool:
        return self._fut.cancel()

    def result(self) -> Any:
        return self._fut.result()

    def set_result(self, value: Any) -> None:
        self._fut.set_result(value)

    def __await__(self) -> Any:
        return self

    def __iter__(self) -> Any:
        return self

    def __next__(self) -> Any:
        if self._fut.done():
            raise StopIteration(self._fut.result())
        self._asyncio_future_blocking = True
        return self


@pytest.mark.parametrize("late", [False, True])
def test_a_receive_awaitable_whose_iterator_has_no_send(late: bool) -> None:
    parts = [
        {
            "type": "http.request",
            "body": b'{"conversation_id": "conv_0123456789ab"}',
            "more_body": True,
        },
        {"type": "http.request", "body": b"", "more_body": False},
    ]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        queue = list(parts)

        def receive() -> IterFuture:
            fut = IterFuture(loop)
            message = queue.pop(0)
            if late:
                loop.call_later(0.01, fut.set_result, message)
            else:
                fut.set_result(message)
            return fut

        body, replay = await peek_asgi(receive, None, 1024)
        assert body == b'{"conversation_id": "conv_0123456789ab"}'
        assert await replay() == parts[0]
        assert await replay() == parts[1]

    asyncio.run(main())


class TakenThenSetFuture(IterFuture):
    """granian's ``PyFutureAwaitable`` as it behaves at the bound: the server takes the part
    off the connection in its own thread and sets the result on the loop a moment later;
    a ``cancel()`` in between says True, and the part taken is dropped."""

    def __init__(self, loop: asyncio.AbstractEventLoop, server: Server) -> None:
        super().__init__(loop)
        self._server = server
        self._taken: dict[str, Any] | None = None

    def take(self, message: dict[str, Any]) -> None:
        # A moment later, as the runtime's thread hands it to the loop (call_soon_threadsafe).
        self._taken = message
        self._fut.get_loop().call_later(0.005, self._hand_over)

    def _hand_over(self) -> None:
        if not self._fut.done():
            self._fut.set_result(self._taken)
        # else: cancelled in between; the part is gone, as granian's is.

    def cancel(self, msg: Any = None) -> bool:
        if self._taken is None:
            self._server.waiting.remove(self)  # nothing taken yet: left on the connection
        return self._fut.cancel()


class Server:
    """Parts of a body on a connection: each receive() takes the next one that has come."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.parts: list[dict[str, Any]] = []
        self.waiting: list[TakenThenSetFuture] = []

    def arrive(self, message: dict[str, Any]) -> None:
        if self.waiting:
            self.waiting.pop(0).take(message)
        else:
            self.parts.append(message)

    def receive(self) -> TakenThenSetFuture:
        fut = TakenThenSetFuture(self.loop, self)
        if self.parts:
            fut.set_result(self.parts.pop(0))
        else:
            self.waiting.append(fut)
        return fut


@pytest.mark.skipif(sys.version_info < (3, 11), reason="the bound cancels on 3.11+")
def test_a_part_a_foreign_future_has_taken_at_the_bound_still_reaches_the_app() -> None:
    # Under granian, the part that came just as the peek's bound expired was lost: the
    # peek cancelled the server's pending receive, its cancel() said True, and the part it
    # had already taken never reached the app: a truncated JSON body (a 500), or a
    # request that hung for want of its last, empty part.
    head, tail = b'{"conversation_id": ', b'"conv_0123456789ab"}'
    first = {"type": "http.request", "body": head, "more_body": True}
    rest = {"type": "http.request", "body": tail, "more_body": True}
    end = {"type": "http.request", "body": b"", "more_body": False}

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = Server(loop)
        server.arrive(first)
        # Taken by the server a moment before the bound, handed to the loop after it.
        loop.call_later(_body.PEEK_WAIT - 0.002, server.arrive, rest)
        loop.call_later(_body.PEEK_WAIT + 0.1, server.arrive, end)
        body, replay = await peek_asgi(server.receive, None, 1024)
        got = [await asyncio.wait_for(replay(), 1) for _ in range(3)]
        assert got == [first, rest, end]
        assert body in (b"", head + tail)

    asyncio.run(main())


@pytest.mark.parametrize("part", ["first", "later"])
def test_a_foreign_future_awaited_by_a_peek_that_is_cancelled_is_cancelled_too(part: str) -> None:
    # The request cancelled while the peek waits for a part (a time limit around the app,
    # the server stopping): without the middleware the task's cancel() cancels the server's
    # pending receive (its future is what the task waits on). The peek waits on granian's
    # future through asyncio.wait(), so the cancel reached only that wait and the future
    # was left pending: granian kept the connection open after the answer, until the client
    # gave up (3 s, the client's time limit, instead of 0.1 s).
    first = {"type": "http.request", "body": b'{"conversation_id": ', "more_body": True}

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = Server(loop)
        if part == "later":
            server.arrive(first)
        futures: list[TakenThenSetFuture] = []

        def receive() -> TakenThenSetFuture:
            futures.append(server.receive())
            return futures[-1]

        peek = asyncio.ensure_future(peek_asgi(receive, None, 1024))
        await asyncio.sleep(_body.PEEK_WAIT / 4)
        peek.cancel()
        with pytest.raises(asyncio.CancelledError):
            await peek
        pending = futures[-1]
        assert pending.cancelled(), "the server's receive was left pending"
        assert not server.waiting

    asyncio.run(main())


class Request:
    """The server's side of one request (granian's ``ASGIHTTPProtocol``, whose bound
    ``receive`` the app is given): granian keeps the connection open while it lives."""

    def __init__(self, server: Server) -> None:
        self._server = server

    def receive(self) -> TakenThenSetFuture:
        return self._server.receive()


@pytest.mark.parametrize("part", ["first", "later"])
def test_a_peek_that_is_cancelled_leaves_no_reference_cycle_holding_the_request(
    part: str,
) -> None:
    # A time limit around the app expires while the peek waits on granian's future: the
    # CancelledError went through frames of ours that kept it in a local (the part's wait,
    # the throw into the receive): each such frame is in the exception's traceback, a cycle
    # that held every frame it went through, the peek's among them, and so the server's
    # receive and its request, until the garbage collector's next pass. granian kept the
    # connection open meanwhile: after the 504, often until the client gave up (in about
    # one such request in four under granian, each without a collector pass; never
    # without the middleware). Counted here without the collector: a reference left means
    # a cycle.
    first = {"type": "http.request", "body": b'{"conversation_id": ', "more_body": True}

    async def main() -> weakref.ref[Request]:
        server = Server(asyncio.get_running_loop())
        if part == "later":
            server.arrive(first)
        request = Request(server)
        gone = weakref.ref(request)
        peek = asyncio.ensure_future(peek_asgi(request.receive, None, 1024))
        del request
        while not server.waiting:  # the peek waits on the server's future
            await asyncio.sleep(0)
        peek.cancel()
        try:
            await peek
        except asyncio.CancelledError:
            pass
        else:  # pragma: no cover
            raise AssertionError("the peek was not cancelled")
        del peek
        return gone

    enabled = gc.isenabled()
    gc.disable()
    try:
        gone = asyncio.run(main())
        assert gone() is None, "a reference cycle holds the request"
    finally:
        if enabled:
            gc.enable()
