"""Cancel/uncancel bookkeeping of _body._wait_cancelling (3.11+): a cancel from elsewhere
in the same loop turn as the bound's, time limits around the peek, receives that take the
cancel their own way, awaitables that are not asyncio futures."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
import types
from typing import Any

import anyio
import pytest

from agentsight_middleware import _body
from agentsight_middleware._body import peek_asgi

pytestmark = pytest.mark.skipif(sys.version_info < (3, 11), reason="the bound cancels on 3.11+")

MESSAGE = {"type": "http.request", "body": b"{}", "more_body": False}


class _LoopProxy:
    """The running loop, but the peek's timer callback runs ``before()`` and ``after()``
    in the very same loop turn, around ``expire``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, before: Any, after: Any) -> None:
        self._loop, self._before, self._after = loop, before, after

    def call_later(self, delay: float, cb: Any, *args: Any) -> Any:
        def wrapped() -> None:
            if self._before is not None:
                self._before()
            cb(*args)
            if self._after is not None:
                self._after()

        return self._loop.call_later(delay, wrapped)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loop, name)


def _patch_loop(monkeypatch: pytest.MonkeyPatch, before: Any = None, after: Any = None) -> None:
    real = asyncio.get_running_loop

    def fake() -> Any:
        return _LoopProxy(real(), before, after)

    # _wait_cancelling does `import asyncio` then asyncio.get_running_loop(): patch the
    # module attribute for the duration of the test only.
    monkeypatch.setattr(asyncio, "get_running_loop", fake)


def _receive(kind: str) -> Any:
    async def receive() -> dict[str, Any]:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            if kind == "reraises":
                raise
            if kind == "swallows":
                return MESSAGE
            if kind == "converts":
                raise OSError("gone") from None
            if kind == "cleans-up-then-reraises":
                await asyncio.sleep(0.01)
                raise
        raise AssertionError("not cancelled")

    return receive


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("kind", ["reraises", "cleans-up-then-reraises"])
def test_an_outside_cancel_in_the_same_turn_as_ours_is_kept(
    monkeypatch: pytest.MonkeyPatch, when: str, kind: str
) -> None:
    async def main() -> None:
        task: asyncio.Task[Any] | None = None

        def outside() -> None:
            assert task is not None
            task.cancel("outside")

        _patch_loop(monkeypatch, **{when: outside})
        task = asyncio.ensure_future(peek_asgi(_receive(kind), "2", 1024))
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled()

    asyncio.run(main())


@pytest.mark.parametrize("when", ["before", "after"])
def test_an_outside_cancel_in_the_same_turn_swallowed_by_the_receive(
    monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    # The receive swallows the (single) CancelledError; bare, it would swallow the
    # outside one as well, so losing it is the receive's doing. But the count must say it.
    seen: dict[str, Any] = {}

    async def main() -> None:
        task: asyncio.Task[Any] | None = None

        def outside() -> None:
            assert task is not None
            task.cancel("outside")

        async def run() -> Any:
            result = await peek_asgi(_receive("swallows"), "2", 1024)
            current = asyncio.current_task()
            assert current is not None
            seen["cancelling"] = current.cancelling()
            try:
                await asyncio.sleep(0.05)
                seen["next await"] = "ran"
            except asyncio.CancelledError:
                seen["next await"] = "cancelled"
                raise
            return result

        _patch_loop(monkeypatch, **{when: outside})
        task = asyncio.ensure_future(run())
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert seen["cancelling"] == 1  # the outside cancel still counted


@pytest.mark.parametrize("when", ["before", "after"])
def test_an_asyncio_timeout_expiring_in_the_same_turn_still_times_out(
    monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    async def main() -> None:
        holder: dict[str, Any] = {}

        def fire() -> None:
            holder["cm"]._on_timeout()  # the timeout's own callback, in this very turn

        _patch_loop(monkeypatch, **{when: fire})

        async def limited() -> None:
            async with asyncio.timeout(60) as cm:
                holder["cm"] = cm
                await peek_asgi(_receive("reraises"), "2", 1024)

        with pytest.raises(TimeoutError):
            await limited()
        task = asyncio.current_task()
        assert task is not None
        assert task.cancelling() == 0

    asyncio.run(main())


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("scope_kind", ["move_on_after", "fail_after"])
def test_an_anyio_scope_cancelled_in_the_same_turn_still_ends_the_request(
    monkeypatch: pytest.MonkeyPatch, when: str, scope_kind: str
) -> None:
    reached: list[str] = []

    async def main() -> None:
        holder: dict[str, Any] = {}

        def fire() -> None:
            holder["scope"].cancel()

        _patch_loop(monkeypatch, **{when: fire})
        factory = anyio.move_on_after if scope_kind == "move_on_after" else anyio.fail_after
        try:
            with factory(60) as scope:
                holder["scope"] = scope
                await peek_asgi(_receive("reraises"), "2", 1024)
                reached.append("after peek")
                await asyncio.sleep(1)  # the app: must be cancelled at once
                reached.append("app finished")
        except TimeoutError:
            reached.append("TimeoutError")
        task = asyncio.current_task()
        assert task is not None
        assert task.cancelling() == 0

    started = time.monotonic()
    asyncio.run(main())
    assert time.monotonic() - started < 0.8
    assert "app finished" not in reached


def test_a_bare_yield_receive_is_bounded_and_cancel_safe() -> None:
    @types.coroutine
    def poll() -> Any:
        # A generator-based awaitable polling with bare yields (as granian's iter awaitable).
        while True:
            yield

    async def receive() -> dict[str, Any]:
        await poll()
        raise AssertionError

    async def main() -> None:
        started = time.monotonic()
        body, _replay = await peek_asgi(receive, "2", 1024)
        assert body == b""
        assert time.monotonic() - started < _body.PEEK_WAIT + 0.1
        task = asyncio.current_task()
        assert task is not None
        assert task.cancelling() == 0

    asyncio.run(main())


class _DuckFuture:
    """A future-like that is not an asyncio.Future (duck-typed, as Task accepts)."""

    _asyncio_future_blocking = False

    def __init__(self, loop: asyncio.AbstractEventLoop, cancellable: bool) -> None:
        self._loop = loop
        self._cancellable = cancellable
        self._callbacks: list[Any] = []
        self._done = False
        self._result: Any = None
        self._cancelled = False

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def add_done_callback(self, cb: Any, *, context: Any = None) -> None:
        self._callbacks.append((cb, context))

    def remove_done_callback(self, cb: Any) -> int:
        return 0

    def done(self) -> bool:
        return self._done

    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self, msg: Any = None) -> bool:
        if self._done or not self._cancellable:
            return False
        self._done = self._cancelled = True
        self._fire()
        return True

    def set_result(self, value: Any) -> None:
        self._done, self._result = True, value
        self._fire()

    def _fire(self) -> None:
        for cb, context in self._callbacks:
            self._loop.call_soon(cb, self, context=context)

    def result(self) -> Any:
        if self._cancelled:
            raise asyncio.CancelledError
        return self._result

    def __await__(self) -> Any:
        if not self._done:
            self._asyncio_future_blocking = True
            yield self
        return self.result()


def test_a_receive_on_a_future_that_cannot_be_cancelled_loses_no_message() -> None:
    # A server whose receive() returns a fresh future-like resolved with the message (as
    # a Rust-backed server does), and whose cancel() says False once the work started:
    # Task.cancel() then sets _must_cancel, and the task gets CancelledError at its next
    # wake-up, i.e. when the message comes, in place of it.
    async def main() -> None:
        loop = asyncio.get_running_loop()
        pending: list[_DuckFuture] = []

        def receive() -> Any:
            fut = _DuckFuture(loop, cancellable=False)
            pending.append(fut)
            return fut

        def arrive() -> None:
            pending.pop(0).set_result(MESSAGE)

        loop.call_later(_body.PEEK_WAIT + 0.2, arrive)
        body, replay = await asyncio.wait_for(peek_asgi(receive, "2", 1024), 3)
        if body == b"{}":
            return  # the peek got it late: fine

        def disconnect() -> None:
            if pending:
                pending.pop(0).set_result({"type": "http.disconnect"})

        loop.call_later(0.3, disconnect)
        got = await asyncio.wait_for(replay(), 1)
        assert got == MESSAGE, got

    asyncio.run(main())
