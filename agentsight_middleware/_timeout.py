"""A time limit on an await that never swallows the caller's own cancellation.

``asyncio.wait_for`` before Python 3.12 returns the result when the awaited thing
finishes in the same loop turn as the caller is cancelled (CPython gh-86296): a
sender cancelled at shutdown while its connection was being made went on sending,
and the shutdown waited for it. ``asyncio.timeout`` (3.11+) runs the await in the
caller's own task, so a cancel reaches it as it came. Python 3.10 has no fix short
of reimplementing it, and keeps ``wait_for`` and its race.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable
from typing import TypeVar

__all__ = ["bounded"]

T = TypeVar("T")

if sys.version_info >= (3, 11):

    async def bounded(awaitable: Awaitable[T], seconds: float) -> T:
        """``await awaitable``, or ``asyncio.TimeoutError`` once ``seconds`` have passed."""
        async with asyncio.timeout(seconds):
            return await awaitable

else:  # pragma: no cover - Python 3.10

    async def bounded(awaitable: Awaitable[T], seconds: float) -> T:
        """``await awaitable``, or ``asyncio.TimeoutError`` once ``seconds`` have passed."""
        return await asyncio.wait_for(awaitable, seconds)
