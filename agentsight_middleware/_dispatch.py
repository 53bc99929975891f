"""One background worker thread per process that takes work off the request path.

The request path only calls :meth:`Dispatcher.submit`, which appends to a bounded
deque: no lock, no wake-up. A ``queue.Queue`` would notify the sleeping worker on
every item, and each page view would then pay for a thread switch and a fight
over the GIL (~90 µs under uvicorn, half of what serving the page costs); the
worker looks for items every few milliseconds instead, and takes all it finds.

The worker is started lazily by the first submit in the process that serves, so a
worker inherited across ``fork()`` (gunicorn ``--preload``) is never relied on: a
changed pid starts a fresh one.

With ``concurrency`` above one, the worker hands items to that many daemon threads
(started as needed), so that a blocking tracker 100 ms from its API sends more than
ten page views a second, and one hung call does not stop the others.
"""

from __future__ import annotations

import atexit
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

from ._fork import reset_in_child
from ._log import logger
from ._threads import DaemonThreads, wait_started

__all__ = ["Dispatcher", "DispatcherStats"]

T = TypeVar("T")

# How long the worker sleeps when there is nothing to do: the most a page view waits
# before its tracker call starts.
_INTERVAL = 0.02
# A full queue's drops are said at most this often.
_DROP_LOG_EVERY = 60.0


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
        concurrency: int = 1,
        at_exit: Callable[[], None] | None = None,
    ) -> None:
        self._handler = handler
        #: What runs at interpreter exit: close(), unless the owner has more to close.
        self._at_exit = at_exit
        self._concurrency = concurrency
        self._maxsize = maxsize
        self._name = name
        self._shutdown_timeout = shutdown_timeout
        self._lock = threading.Lock()
        self._started = False
        self._items: deque[T] = deque()
        self._busy = 0  # items out of the deque and being handled
        self._count_lock = threading.Lock()  # busy and the counters, from several threads
        self._slots = threading.BoundedSemaphore(concurrency)
        self._pool: DaemonThreads | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._atexit_registered = False
        self._gave_up = False  # a close() ran out of time (see close)
        self.submitted = 0
        self.processed = 0
        self.failed = 0
        self.dropped = 0
        self._drop_logged_at = -math.inf
        reset_in_child(self._after_fork)

    def _after_fork(self) -> None:
        self._started = False
        self._thread = None
        self._lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._items = deque()
        self._busy = 0
        self._slots = threading.BoundedSemaphore(self._concurrency)
        self._pool = None
        self._gave_up = False
        # The parent's counts are not this process's (its queue is not either).
        self.submitted = self.processed = self.failed = self.dropped = 0
        self._drop_logged_at = -math.inf

    def ensure_started(self) -> None:
        # A new start (a lifespan's): its own shutdown flushes again, whatever the last did.
        self._gave_up = False
        if not self._started:
            self._start()

    def submit(self, item: T) -> bool:
        """Queue ``item`` for the worker; False (and counted) when the queue is full.

        When full, the newest item is the one dropped: the queue holds what was
        seen first, and memory stays bounded however long the backend is away.
        """
        if not self._started:
            self._start()
        items = self._items
        if len(items) >= self._maxsize:
            self.dropped += 1
            now = time.monotonic()
            # Once, then at most once a minute (as the built-in client says it): one line
            # per 1,000 drops was a line a second at 1,000 page views/s to a hung tracker.
            if now - self._drop_logged_at >= _DROP_LOG_EVERY:
                self._drop_logged_at = now
                logger.warning(
                    "queue full (%d items), %d event(s) dropped so far",
                    self._maxsize,
                    self.dropped,
                )
            return False
        items.append(item)
        self.submitted += 1
        return True

    def waiting(self) -> int:
        """Items queued for the worker now."""
        return len(self._items)

    def _start(self) -> None:
        with self._lock:
            if self._started:
                return
            # The deque is kept (a fork's child has a new one, see _after_fork): what a
            # failed start's window queued (see below) is the next worker's to handle.
            self._stopping = threading.Event()
            if self._concurrency > 1 and self._pool is None:
                self._pool = DaemonThreads(self._concurrency, self._name)
            thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread = thread
            self._started = True
            if not self._atexit_registered:
                atexit.register(self._at_exit or self.close)
                self._atexit_registered = True
        # Outside the lock, as the delivery worker's (see BackgroundDelivery._start): under
        # gevent a start switches greenlets, and the lock may be one gevent never patched.
        try:
            thread.start()
        except BaseException:
            with self._lock:
                if self._thread is thread:
                    self._thread = None
                    self._started = False
            raise

    def _run(self) -> None:
        items, stopping, pool = self._items, self._stopping, self._pool
        while True:
            if not items:
                if stopping.is_set():
                    return
                stopping.wait(_INTERVAL)
                continue
            if pool is None:
                self._claim()
                self._handle(items.popleft())
                continue
            # A free thread first: with all of them in calls, items wait in the bounded
            # deque (counted and dropped when it is full), not in the pool's own queue.
            while not self._slots.acquire(timeout=_INTERVAL):
                if stopping.is_set() and not items:
                    return
            self._claim()  # before the item leaves the deque: flush() sees one or the other
            try:
                pool.submit(self._handle_in_thread, items.popleft())
            except BaseException:
                self._done(failed=True)
                self._slots.release()
                raise

    def _claim(self) -> None:
        with self._count_lock:
            self._busy += 1

    def _done(self, *, failed: bool) -> None:
        with self._count_lock:
            self._busy -= 1
            if failed:
                self.failed += 1
            else:
                self.processed += 1

    def _handle_in_thread(self, item: T) -> None:
        try:
            self._handle(item)
        finally:
            self._slots.release()

    def _handle(self, item: T) -> None:
        try:
            self._handler(item)
        except BaseException:
            # Any BaseException too (a CancelledError, gevent's Timeout): one bad call
            # stopped the worker for good, and every later page view waited forever.
            self._done(failed=True)
            logger.exception("background delivery failed")
        else:
            self._done(failed=False)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything submitted so far is handled; False on time-out (by default
        the shutdown timeout, as the built-in client's flush(): a hung call never ends)."""
        if not self._started:
            return True
        deadline = time.monotonic() + (self._shutdown_timeout if timeout is None else timeout)
        while self._items or self._busy:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.002)
        self._gave_up = False  # caught up: a later close() has something to wait for again
        return True

    def close(self, timeout: float | None = None) -> None:
        """Flush within ``timeout`` (default: the shutdown timeout) and stop the worker."""
        if not self._started or self._thread is None:
            return
        if self._gave_up:
            return  # a close() ran out of time already: atexit's must not wait it out again
        limit = self._shutdown_timeout if timeout is None else timeout
        thread = self._thread
        # One not started yet (see _start), waited for first: join() raised on it, and the
        # worker it became ended on the stop with _started still set (every later item
        # queued for nobody) before the item of the submit that started it was queued.
        if not wait_started(thread, lambda: self._thread is thread, time.monotonic() + limit):
            return  # its start failed (given up: nothing to stop) or never came
        if not self.flush(limit):
            logger.warning(
                "%d event(s) not delivered within %.1f s at shutdown",
                len(self._items) + self._busy,
                limit,
            )
            # The worker is left running (held up by a call, it still finishes what it
            # has, and what comes later): stopping it here would have a later page view
            # start a second worker beside it, two calls at once.
            self._gave_up = True
            return
        self._stopping.set()
        self._thread.join(limit)
        self._thread = None
        self._started = False
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    def stats(self) -> DispatcherStats:
        return DispatcherStats(
            submitted=self.submitted,
            processed=self.processed,
            failed=self.failed,
            dropped=self.dropped,
            queued=len(self._items),
        )
