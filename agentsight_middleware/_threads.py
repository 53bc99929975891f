"""Daemon threads for the background worker (see :class:`DaemonThreads`)."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any, TypeVar

__all__ = ["DaemonDefaultExecutor", "DaemonThreads", "wait_started"]

_T = TypeVar("_T")


def wait_started(thread: threading.Thread, still: Callable[[], bool], deadline: float) -> bool:
    """Whether ``thread`` has started, waited for until ``deadline`` (monotonic) while
    ``still()`` (its owner's start has not given it up). A worker's thread is started once
    its owner's lock is let go (see BackgroundDelivery._start): a close() meeting one not
    started yet must wait for it, as join() raises on it and is_alive() says it ended."""
    while thread.ident is None:
        if not still() or time.monotonic() >= deadline:
            return False
        time.sleep(0.001)  # gevent's, once patched: the starting greenlet runs meanwhile
    return True


class DaemonThreads(Executor):
    """An executor of daemon threads, started as needed.

    Not ``ThreadPoolExecutor``, for the worker's two uses of threads: its threads are
    joined at interpreter exit (a request hanging at a proxy held up the app's exit for
    the whole request timeout after ``shutdown_timeout`` ran out), and it takes no work
    once the interpreter has begun to exit, which is when ``atexit`` delivers what is
    left (asyncio resolves host names in its loop's default executor: with it, nothing
    queued could be sent to ``api.agentsight.io`` at exit). What daemon threads still
    wait for at exit is dropped with them (a durable outbox keeps the event).
    """

    def __init__(self, max_workers: int, name: str) -> None:
        self._max = max_workers
        self._name = name
        self._jobs: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]] | None]
        self._jobs = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._workers = 0
        self._shutdown = False

    def submit(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> Future[_T]:
        future: Future[_T] = Future()

        def call() -> _T:
            return fn(*args, **kwargs)

        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if not self._idle.acquire(blocking=False) and self._workers < self._max:
                try:
                    threading.Thread(
                        target=self._work, name=f"{self._name}_{self._workers + 1}", daemon=True
                    ).start()
                except RuntimeError:
                    # Python 3.12 starts no thread once the interpreter has begun to exit,
                    # which is when atexit delivers what is left: the threads already
                    # started take it in turn, or, with none, the caller runs it (the
                    # worker died of the RuntimeError, and every queued event was lost).
                    pass
                else:
                    self._workers += 1
            if self._workers:
                self._jobs.put((future, call))
                return future
        _run(future, call)
        return future

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            future, call = job
            _run(future, call)
            del job, future, call
            self._idle.release()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                while True:
                    try:
                        job = self._jobs.get_nowait()
                    except queue.Empty:
                        break
                    if job is not None:
                        job[0].cancel()
            for _ in range(self._workers):
                self._jobs.put(None)


def _run(future: Future[_T], call: Callable[[], _T]) -> None:
    """Run ``call`` for ``future`` (unless it was cancelled), as an executor's thread does."""
    if future.set_running_or_notify_cancel():
        try:
            result = call()
        except BaseException as exc:
            future.set_exception(exc)
        else:
            future.set_result(result)


class DaemonDefaultExecutor(ThreadPoolExecutor):
    """:class:`DaemonThreads` in the shape asyncio's ``set_default_executor`` insists on
    (a ``ThreadPoolExecutor``): the worker loop's resolver of host names."""

    def __init__(self, max_workers: int, name: str) -> None:
        super().__init__(max_workers)  # starts no thread: submit() never reaches it
        self._daemons = DaemonThreads(max_workers, name)

    def submit(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> Future[_T]:
        return self._daemons.submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._daemons.shutdown(wait, cancel_futures=cancel_futures)
        super().shutdown(wait, cancel_futures=cancel_futures)
