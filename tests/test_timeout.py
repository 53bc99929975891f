"""The time limit the worker puts on connecting, probing and SDK calls."""

from __future__ import annotations

import asyncio
import sys

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


@pytest.mark.skipif(
    sys.version_info < (3, 11), reason="Python 3.10 keeps wait_for and its race (gh-86296)"
)
def test_a_cancel_in_the_turn_the_awaited_thing_finishes_is_kept() -> None:
    # asyncio.wait_for on 3.11 returned 1 here: the sender that was being shut down
    # went on as if nothing had happened.
    async def main() -> str:
        loop = asyncio.get_running_loop()
        inner: asyncio.Future[int] = loop.create_future()
        task = asyncio.ensure_future(bounded(inner, 10))
        await asyncio.sleep(0)  # the task waits on inner

        def both() -> None:
            inner.set_result(1)
            task.cancel()

        loop.call_soon(both)
        try:
            return repr(await task)
        except asyncio.CancelledError:
            return "cancelled"

    assert asyncio.run(main()) == "cancelled"


def test_wait_for_on_this_python_swallows_it_or_not() -> None:
    # The reason for bounded(): shows whether this Python has the race it avoids.
    async def main() -> str:
        loop = asyncio.get_running_loop()
        inner: asyncio.Future[int] = loop.create_future()
        task = asyncio.ensure_future(asyncio.wait_for(inner, 10))
        await asyncio.sleep(0)

        def both() -> None:
            inner.set_result(1)
            task.cancel()

        loop.call_soon(both)
        try:
            return repr(await task)
        except asyncio.CancelledError:
            return "cancelled"

    assert asyncio.run(main()) == ("cancelled" if sys.version_info >= (3, 12) else "1")
