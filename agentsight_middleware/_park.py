"""How the background loop's tasks sleep while there is nothing to do.

A task parks on a future that whoever brings work resolves (from the loop, or from
another thread with ``call_soon_threadsafe(resolve, future)``), with a time limit as
a safety net: an idle process's background thread then stays quiet instead of
polling, and never takes the GIL from the app's threads for nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported by the worker itself: an app that never sends an event never loads it
    import asyncio

__all__ = ["park", "resolve"]


def resolve(future: asyncio.Future[None]) -> None:
    """Wake whoever parked on ``future`` (a no-op once it is done)."""
    if not future.done():
        future.set_result(None)


async def park(future: asyncio.Future[None], seconds: float) -> None:
    """Wait until ``future`` is resolved, or ``seconds`` have passed."""
    timer = future.get_loop().call_later(seconds, resolve, future)
    try:
        await future
    finally:
        timer.cancel()
