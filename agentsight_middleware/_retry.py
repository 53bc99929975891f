"""When to send again: pure functions over status codes and headers."""

from __future__ import annotations

import random
from email.utils import parsedate_to_datetime

__all__ = ["ACCEPTED", "REJECTED", "RETRY", "THROTTLED", "backoff", "classify", "retry_after"]

ACCEPTED = "accepted"
#: 400/401/403/404...: the same request can never succeed; retrying only adds load.
REJECTED = "rejected"
#: 5xx, 408 and network errors: the backend may recover.
RETRY = "retry"
#: 429: wait what the backend says.
THROTTLED = "throttled"

#: The SDK's cap on a ``Retry-After`` wait; a hostile or broken header cannot park delivery.
MAX_RETRY_AFTER = 30.0


def classify(status: int) -> str:
    if status in (200, 201):
        return ACCEPTED
    if status == 429:
        return THROTTLED
    if status >= 500 or status == 408:
        return RETRY
    return REJECTED


def retry_after(value: str | None, *, now: float, default: float = 1.0) -> float:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date, RFC 9110)."""
    if value:
        value = value.strip()
        # isascii() too: "²" and other Unicode digits pass isdigit() but not float().
        if value.isascii() and value.isdigit():
            return min(float(value), MAX_RETRY_AFTER)
        try:
            when: float = parsedate_to_datetime(value).timestamp()
        except (TypeError, ValueError, IndexError, OverflowError):
            return default
        return min(max(when - now, 0.0), MAX_RETRY_AFTER)
    return default


# Our own source: the app's global ``random`` state (seeded by its tests, say) is not
# ours to advance from a background thread, and forked workers must not share a sequence.
_jitter = random.SystemRandom()


def backoff(attempt: int, *, base: float = 0.5, cap: float = 60.0) -> float:
    """Exponential backoff with jitter: about 0.5 s, 1 s, 2 s ... capped.

    Jitter spreads the retries of many workers so that a recovering backend is
    not hit by all of them at the same instant.
    """
    ceiling = min(cap, base * 2.0 ** max(attempt - 1, 0))
    return ceiling / 2 + _jitter.random() * ceiling / 2
