"""The package's one logger, and a guard against logging the same failure forever."""

from __future__ import annotations

import logging
import threading
import time

from ._fork import reset_in_child

__all__ = ["LogOnce", "logger"]

logger = logging.getLogger("agentsight_middleware")


# A failure that goes on (a full disk, a hook broken for every request) is said again at
# most this often, with how many times it happened meanwhile: counted only in stats(), a
# loss that began an hour ago looked like one error an hour ago.
AGAIN_EVERY = 60.0


class LogOnce:
    """Logs the first failure of each kind with its traceback; later ones are counted, and
    said at WARNING once every :data:`AGAIN_EVERY` seconds at most (each at DEBUG).

    A broken tracker or hook fails on every request: one clear error beats a flood.
    """

    def __init__(self) -> None:
        # (what, type) -> [monotonic time last said, failures since]
        self._seen: dict[tuple[str, type[BaseException]], list[float]] = {}
        self._lock = threading.Lock()
        reset_in_child(self._after_fork)

    def _after_fork(self) -> None:
        # Held by another thread (the worker logging) at a fork, it would stay held in the
        # child for ever: its worker's next failure to log would hang it.
        self._lock = threading.Lock()

    def __call__(self, what: str, exc: BaseException) -> None:
        key = (what, type(exc))
        now = time.monotonic()
        again = 0
        with self._lock:
            told = self._seen.get(key)
            if told is None:
                self._seen[key] = [now, 0]
            else:
                told[1] += 1
                if now - told[0] >= AGAIN_EVERY:
                    again = int(told[1])
                    told[0], told[1] = now, 0
        if told is None:
            logger.error(
                "%s failed; the request was served regardless (further %s failures of it "
                "are counted and said once a minute)",
                what,
                type(exc).__name__,
                exc_info=exc,
            )
        elif again:
            logger.warning(
                "%s failed %d more time(s) since it was last said (the last: %r)",
                what,
                again,
                exc,
            )
        else:
            logger.debug("%s failed again: %r", what, exc)
