"""When to send again: pure functions over status codes and headers."""

from __future__ import annotations

import random
from email.utils import parsedate_to_datetime

__all__ = [
    "ACCEPTED",
    "ELSEWHERE",
    "REJECTED",
    "RETRY",
    "THROTTLED",
    "backoff",
    "classify",
    "retry_after",
]

#: 2xx: accepted if the body is the API's answer (a JSON object with an id); a 202 or
#: 204 from something else is not (the callers look at the body).
ACCEPTED = "accepted"
#: 400/401/403/413...: the same request can never succeed; retrying only adds load.
REJECTED = "rejected"
#: 3xx, 404, 405, 407, 421, 426, and a 400/401/403 that is not the API's JSON: not the
#: API's conversations endpoint answering (``http://`` redirected to ``https://``, a login
#: page, a wrong path, a proxy or firewall in between): the endpoint (or the way to it) is
#: wrong, not the event, which is kept until it is fixed.
ELSEWHERE = "elsewhere"

# Answered by something other than the API's conversations route, whatever their body.
_ELSEWHERE_STATUSES = frozenset({404, 405, 407, 421, 426})
#: 5xx, 408 and network errors: the backend may recover.
RETRY = "retry"
#: 429: wait what the backend says.
THROTTLED = "throttled"

#: The SDK's cap on a ``Retry-After`` wait; a hostile or broken header cannot park delivery.
MAX_RETRY_AFTER = 30.0


def classify(status: int, body: bytes | None = None) -> str:
    """What to do after an answer with ``status`` (and ``body``, when there is one)."""
    if 200 <= status < 300:
        return ACCEPTED
    if status == 429:
        return THROTTLED
    if status >= 500 or status == 408:
        return RETRY
    if 300 <= status < 400 or status in _ELSEWHERE_STATUSES:
        # The API's list-create route exists, takes POST, and needs no proxy login.
        return ELSEWHERE
    if body is not None and status in (400, 401, 403) and body.lstrip()[:1] != b"{":
        # The API refuses with a JSON object (Django REST framework's): a page is a proxy
        # ("plain HTTP request sent to HTTPS port") or a firewall speaking, not the API.
        return ELSEWHERE
    return REJECTED


#: The least a 429 pauses for: "Retry-After: 0" (or a date our clock has passed)
#: would otherwise resend at once, thousands of requests a second for as long as
#: the API throttles.
MIN_RETRY_AFTER = 1.0


def retry_after(value: str | None, *, now: float, default: float = 1.0) -> float:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date, RFC 9110),
    at least :data:`MIN_RETRY_AFTER` and at most :data:`MAX_RETRY_AFTER`."""
    if value:
        value = value.strip()
        # isascii() too: "²" and other Unicode digits pass isdigit() but not float().
        if value.isascii() and value.isdigit():
            wait = float(value)
        else:
            try:
                wait = parsedate_to_datetime(value).timestamp() - now
            except (TypeError, ValueError, IndexError, OverflowError):
                wait = default
    else:
        wait = default
    return min(max(wait, MIN_RETRY_AFTER), MAX_RETRY_AFTER)


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
