"""The time limit the worker puts on connecting, probing and SDK calls."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable

import pytest

from agentsight_middleware._timeout import bounded


def test_the_result_comes_through() -> None:
    async def main() -> int:
        return await bounded(asyncio.sleep(0, 7), 1)

    assert asyncio.run(main()) == 7


def test_past_the_limit_it_raises_asyncio_s_timeout_error() -> None:
    async def main() -> None:
        await bounded(asyncio.sleep(5), 0.01)

    with pytest.raises(asyncio.TimeoutError):
        asyncio.run(main())


def cancelled_as_it_finishes(timed: Callable[[asyncio.Future[int]], Awaitable[int]]) -> str:
    """What a task awaiting ``timed(inner)`` ends with when ``inner`` gets its result and
    the task is cancelled in the same loop turn: "cancelled", or the result's repr."""

    async def main() -> str:
        loop = asyncio.get_running_loop()
        inner: asyncio.Future[int] = loop.create_future()
        task = asyncio.ensure_future(timed(inner))
        await asyncio.sleep(0)  # the task waits on inner

        def both() -> None:
            inner.set_result(1)
            task.cancel()

        loop.call_soon(both)
        try:
            return repr(await task)
        except asyncio.CancelledError:
            return "cancelled"

    return asyncio.run(main())


@pytest.mark.skipif(
    sys.version_info < (3, 11), reason="Python 3.10 keeps wait_for and its race (gh-86296)"
)
def test_a_cancel_in_the_turn_the_awaited_thing_finishes_is_kept() -> None:
    # asyncio.wait_for on 3.11 returned 1 here: the sender that was being shut down
    # went on as if nothing had happened.
    assert cancelled_as_it_finishes(lambda inner: bounded(inner, 10)) == "cancelled"


def test_wait_for_on_this_python_swallows_it_or_not() -> None:
    # The reason for bounded(): shows whether this Python has the race it avoids.
    swallowed = cancelled_as_it_finishes(lambda inner: asyncio.wait_for(inner, 10))
    assert swallowed == ("cancelled" if sys.version_info >= (3, 12) else "1")
