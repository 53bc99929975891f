"""One background worker thread per process that takes work off the request path.

The request path only calls :meth:`Dispatcher.submit`, which appends to a bounded
queue and never blocks. The worker is started lazily by the first submit in the
process that serves, so a worker inherited across ``fork()`` (gunicorn
``--preload``) is never relied on: a changed pid starts a fresh one.
"""

from __future__ import annotations

import atexit
import queue
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from ._fork import reset_in_child
from ._log import logger

__all__ = ["Dispatcher", "DispatcherStats"]

T = TypeVar("T")

_STOP = object()


class DispatcherStats(dict[str, int]):
    """Counts of what the dispatcher did; a plain dict so it logs and serialises as one."""


class Dispatcher(Generic[T]):
    def __init__(
        self,
        handler: Callable[[T], None],
        *,
        maxsize: int = 10_000,
        name: str = "agentsight-worker",
        shutdown_timeout: float = 5.0,
    ) -> None:
        self._handler = handler
        self._maxsize = maxsize
        self._name = name
        self._shutdown_timeout = shutdown_timeout
        self._lock = threading.Lock()
        self._started = False
        self._queue: queue.Queue[object] = queue.Queue(maxsize)
        self._thread: threading.Thread | None = None
        self._atexit_registered = False
        self.submitted = 0
        self.processed = 0
        self.failed = 0
        self.dropped = 0
        reset_in_child(self._after_fork)

    def _after_fork(self) -> None:
        self._started = False
        self._thread = None
        self._lock = threading.Lock()

    def ensure_started(self) -> None:
        if not self._started:
            self._start()

    def submit(self, item: T) -> bool:
        """Queue ``item`` for the worker; False (and counted) when the queue is full.

        When full, the newest item is the one dropped: the queue holds what was
        seen first, and memory stays bounded however long the backend is away.
        """
        if not self._started:
            self._start()
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                logger.warning(
                    "queue full (%d items), %d event(s) dropped so far",
                    self._maxsize,
                    self.dropped,
                )
            return False
        self.submitted += 1
        return True

    def _start(self) -> None:
        with self._lock:
            if self._started:
                return
            # After a fork the parent's queue may hold items its worker owned and
            # a lock state copied mid-use: start clean rather than inherit them.
            self._queue = queue.Queue(self._maxsize)
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()
            self._started = True
            if not self._atexit_registered:
                atexit.register(self.close)
                self._atexit_registered = True

    def _run(self) -> None:
        q = self._queue
        while True:
            item = q.get()
            try:
                if item is _STOP:
                    return
                self._handler(item)  # type: ignore[arg-type]
                self.processed += 1
            except Exception:
                self.failed += 1
                logger.exception("background delivery failed")
            finally:
                q.task_done()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything submitted so far is handled; False on time-out."""
        if not self._started:
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        q = self._queue
        with q.all_tasks_done:
            while q.unfinished_tasks:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                q.all_tasks_done.wait(remaining)
        return True

    def close(self, timeout: float | None = None) -> None:
        """Flush within ``timeout`` (default: the shutdown timeout) and stop the worker."""
        if not self._started or self._thread is None:
            return
        limit = self._shutdown_timeout if timeout is None else timeout
        if not self.flush(limit):
            logger.warning(
                "%d event(s) not delivered within %.1f s at shutdown",
                self._queue.unfinished_tasks,
                limit,
            )
            return
        self._queue.put(_STOP)
        self._thread.join(limit)
        self._thread = None
        self._started = False

    def stats(self) -> DispatcherStats:
        return DispatcherStats(
            submitted=self.submitted,
            processed=self.processed,
            failed=self.failed,
            dropped=self.dropped,
            queued=self._queue.qsize(),
        )
