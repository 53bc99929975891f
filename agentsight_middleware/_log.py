"""The package's one logger, and a guard against logging the same failure forever."""

from __future__ import annotations

import logging
import threading

from ._fork import reset_in_child

__all__ = ["LogOnce", "logger"]

logger = logging.getLogger("agentsight_middleware")


class LogOnce:
    """Logs the first failure of each kind with its traceback, later ones at DEBUG.

    A broken tracker or hook fails on every request: one clear error beats a flood.
    """

    def __init__(self) -> None:
        self._seen: set[tuple[str, type[BaseException]]] = set()
        self._lock = threading.Lock()
        reset_in_child(self._after_fork)

    def _after_fork(self) -> None:
        # Held by another thread (the worker logging) at a fork, it would stay held in the
        # child for ever: its worker's next failure to log would hang it.
        self._lock = threading.Lock()

    def __call__(self, what: str, exc: BaseException) -> None:
        key = (what, type(exc))
        with self._lock:
            first = key not in self._seen
            self._seen.add(key)
        if first:
            logger.error(
                "%s failed; the request was served regardless (further %s failures of it "
                "are logged at DEBUG)",
                what,
                type(exc).__name__,
                exc_info=exc,
            )
        else:
            logger.debug("%s failed again: %r", what, exc)
