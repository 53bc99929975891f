"""Hands conversations to a user-supplied tracker such as the classic SDK's
``agentsight.ConversationTracker`` (any object with its two methods).

- ``initialize_conversation`` (page view) runs in the background worker: the
  classic SDK sends it at once over blocking HTTP (15 s timeout, 3 retries), so it
  must never hold up the page. One call at a time, unless the tracker's class says how
  many it takes at once (``agentsight_initialize_threads``, 8 for the classic SDK).
- ``get_or_create_conversation`` (chat request) runs *before* the app handles the
  request and is waited for, so that a handler using the SDK finds the
  conversation in place, for ``tracker_timeout`` at most. Coroutine methods are
  awaited; blocking ones go to a thread of their own (never onto the event loop under
  ASGI, nor held by the request's thread under WSGI), and what such a call returns to
  be awaited (a coroutine method behind a plain decorator) is awaited within the same
  ``tracker_timeout``.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import inspect
import json
import math
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import AbstractContextManager, contextmanager, suppress
from typing import TYPE_CHECKING, Any

from ._dispatch import Dispatcher
from ._events import Event, is_robot_view, tracker_kwargs
from ._fork import reset_in_child
from ._greenlets import unseen_loop
from ._log import AGAIN_EVERY, LogOnce
from ._payload import OWN_METADATA, encode_event
from ._threads import DaemonThreads, wait_started

if TYPE_CHECKING:
    import asyncio

__all__ = ["TrackerDelivery", "check_tracker"]

_METHODS = ("initialize_conversation", "get_or_create_conversation")

#: Blocking ``get_or_create_conversation`` calls that may run at once under ASGI.
ENGAGE_THREADS = 16
# Blocking page-view calls at once: what the tracker's class says (the classic SDK's
# adapter: 8; one at a time, it sent ten page views a second from 100 ms away, and a hung
# call stopped all), else one, as always: a tracker may hold what belongs to a thread (a
# sqlite3 connection).


def _initialize_threads(tracker: object) -> int:
    threads = getattr(type(tracker), "agentsight_initialize_threads", 1)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        return 1
    return min(threads, 64)


#: A coroutine tracker's ``initialize_conversation`` calls that may be running at once on
#: the app's loop; past that, page views are dropped (and counted) rather than piling up
#: tasks behind a tracker that hangs.
INITIALIZE_IN_FLIGHT = 256
#: Page views joining a queue this deep are compacted (``Conversation._compact``).
COMPACT_AT = 500

# Metadata as the built-in client sends it (see _payload.encode_event): a hook's date as
# its text, NaN as null. The classic SDK's own JSON encoding failed on such a value and
# lost the page view, and the chat's conversation row with it.
_STRICT = json.JSONEncoder(allow_nan=False)
_LENIENT = json.JSONEncoder(allow_nan=False, default=str, ensure_ascii=False)


def _json_metadata(metadata: dict[str, Any], owner: TrackerDelivery) -> dict[str, Any]:
    if metadata.keys() <= OWN_METADATA:
        return metadata  # the middleware's own: text only
    try:
        _STRICT.encode(metadata)
        return metadata
    except (TypeError, ValueError):
        pass
    body, note = encode_event({"metadata": metadata}, _LENIENT.encode)
    if note is not None:
        # Said as the built-in client says it (HttpSink's "json note"): nothing failed,
        # the event goes, so a WARNING once, not log_once's "failed" ERROR with a traceback.
        from ._log import logger

        if owner.metadata_noted:
            logger.debug("%s", note)
        else:
            owner.metadata_noted = True
            logger.warning("%s", note)
    safe: dict[str, Any] = json.loads(body)["metadata"]
    return safe


#: Seconds a tracker's own flush is waited for at least: enough for one with nothing to
#: send to say so (``flush(0)`` right after everything was handed over).
_LEAST_FLUSH = 0.05
#: Seconds it gets at close() at least, past the shutdown deadline if need be: its buffer
#: holds every earlier page view and turn, which one slow page view must not cost.
_LEAST_CLOSE_FLUSH = 1.0
# How long close() waits at most (within its own deadline) for its own loop's thread to
# end once stopped: the rest (calls still running, given up to tracker_timeout) goes on
# without it.
_LOOP_JOIN = 1.0


def _tracker_failure(exc: BaseException) -> bool:
    """Whether ``exc``, raised by a tracker's synchronous call, is that tracker's failure:
    an Exception, or asyncio's ``CancelledError`` (a BaseException: this task's own
    cancellation only ever comes at an await; without asyncio loaded there is none).
    Other BaseExceptions (a server's own time limit) go on."""
    if isinstance(exc, Exception):
        return True
    asyncio = sys.modules.get("asyncio")
    return asyncio is not None and isinstance(exc, asyncio.CancelledError)


def _cancelling() -> bool:
    """Whether the running task is being cancelled (a CancelledError is then its own),
    rather than a tracker raising one. Python 3.10's tasks cannot tell: assumed so."""
    import asyncio

    try:
        task = asyncio.current_task()
    except RuntimeError:
        return False  # no asyncio loop (trio): an asyncio CancelledError is the tracker's
    if task is None:
        return False
    cancelling = getattr(task, "cancelling", None)
    return True if cancelling is None else bool(cancelling())


def _is_instance_method(cls: type, name: str) -> bool:
    """Whether ``cls`` itself (not its metaclass) defines ``name`` as a method that needs an
    instance: anything that binds (a function, a partialmethod, a singledispatchmethod, a
    wrapped or compiled method) but a static or class method."""
    for klass in cls.__mro__:
        if name in vars(klass):
            attribute = vars(klass)[name]
            # What binds to an instance (has __get__): a Mock or a callable object set on
            # the class does not, and works called through the class.
            return hasattr(type(attribute), "__get__") and not isinstance(
                attribute, (staticmethod, classmethod)
            )
    return False


def _takes_arguments(cls: type) -> bool:
    """Whether building ``cls`` needs an argument (a parameter without a default)."""
    try:
        parameters = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(
        p.default is p.empty
        and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        for p in parameters
    )


def check_tracker(tracker: object) -> None:
    if isinstance(tracker, type) and any(_is_instance_method(tracker, m) for m in _METHODS):
        # Callable, but unbound: every call would fail for want of self. (A class whose
        # methods are static or class methods, or come from its metaclass, is fine.)
        name = tracker.__name__
        # Built with its own arguments where it takes some (ClassicTracker(tracker)).
        takes = "..." if _takes_arguments(tracker) else ""
        raise ValueError(
            f"tracker={name} is a class, not a tracker: pass an instance, tracker={name}({takes})"
        )
    missing = [m for m in _METHODS if not callable(getattr(tracker, m, None))]
    if missing:
        raise ValueError(
            f"tracker={type(tracker).__name__} object lacks {' and '.join(missing)}(); pass an "
            "object with initialize_conversation() and get_or_create_conversation(), such as "
            "agentsight_middleware.sdk.AgentSightSDK() (agentsight 0.1.x), "
            "agentsight.ConversationTracker() (agentsight 0.0.x) or "
            "agentsight_middleware.testing.RecordingTracker()"
        )


@contextmanager
def _guarded(manager: AbstractContextManager[Any], owner: TrackerDelivery) -> Iterator[None]:
    """Enter ``manager`` around the app without ever letting it change the outcome:
    a failing enter or exit is logged, and the app's own exception always propagates."""
    entered = False
    try:
        manager.__enter__()
        entered = True
    except BaseException as exc:
        if not _tracker_failure(exc):
            raise
        owner._count("errors")
        owner.log_once("tracker.conversation_scope() enter", exc)
    if not entered:
        # Outside the except block: the app's own exception must not carry ours
        # as its __context__ ("During handling of the above exception...").
        yield
        return
    try:
        yield
    except BaseException as app_exc:
        try:
            manager.__exit__(type(app_exc), app_exc, app_exc.__traceback__)
        except BaseException as exc:
            if exc is app_exc or not _tracker_failure(exc):
                raise  # the app's own, handed back: not the tracker's failure
            owner._count("errors")
            owner.log_once("tracker.conversation_scope() exit", exc)
        raise
    else:
        try:
            manager.__exit__(None, None, None)
        except BaseException as exc:
            if not _tracker_failure(exc):
                raise
            owner._count("errors")
            owner.log_once("tracker.conversation_scope() exit", exc)


def _discard(awaitable: Any) -> None:
    """Let go of what a tracker's call returned to be awaited that will never be: a
    coroutine closed (it never ran: no "coroutine ... was never awaited" warning at its
    collection), an asyncio future cancelled on its own loop, as a call that ran out of
    time is; anything else is dropped."""
    if inspect.iscoroutine(awaitable) or inspect.isgenerator(awaitable):
        awaitable.close()
        return
    asyncio = sys.modules.get("asyncio")  # an asyncio future, if any, loaded it
    if asyncio is not None and asyncio.isfuture(awaitable):
        get_loop = getattr(awaitable, "get_loop", None)
        if callable(get_loop):
            with suppress(RuntimeError):  # its loop is closed: it will never run anyway
                get_loop().call_soon_threadsafe(awaitable.cancel)


async def _awaited(awaitable: Any) -> Any:
    """``awaitable`` awaited on the running loop; a result that is no awaitable (a method
    that returns a coroutine only at times) is the call's result. An asyncio future of
    another loop (a tracker's own, in a thread) is waited for on that loop, where it
    belongs: awaited here, asyncio refused it ("attached to a different loop") and every
    call was counted an error."""
    import asyncio

    if not inspect.isawaitable(awaitable):
        return awaitable
    get_loop = getattr(awaitable, "get_loop", None)
    if asyncio.isfuture(awaitable) and callable(get_loop):
        its = get_loop()
        if its is not asyncio.get_running_loop():
            return await _on_its_loop(awaitable, its)
    return await awaitable


def _run_unseen(loop: asyncio.AbstractEventLoop, grace: float) -> None:
    """The own loop's thread: under gevent, a greenlet the app's greenlets must not take
    for theirs (see unseen_loop). Once stopped (see TrackerDelivery._stop_own_loop), the
    calls still on it get ``grace`` seconds to end, then are cancelled, and it is closed."""
    with unseen_loop():
        try:
            loop.run_forever()
        finally:
            _wind_up(loop, grace)


def _wind_up(loop: asyncio.AbstractEventLoop, grace: float) -> None:
    import asyncio

    try:
        # Not cancelled at once: a chat's call under way as close() ran (each is bounded by
        # its tracker_timeout) is made still, as the engage threads' are.
        tasks = asyncio.all_tasks(loop)
        if tasks:
            _, pending = loop.run_until_complete(asyncio.wait(tasks, timeout=grace))
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()


async def _on_its_loop(future: Any, its: asyncio.AbstractEventLoop) -> Any:
    """The outcome of ``future``, an asyncio future of loop ``its``, waited for here: its
    callbacks run on ``its``, and it is cancelled there when this wait is."""
    import asyncio

    here = asyncio.get_running_loop()
    mirror: asyncio.Future[Any] = here.create_future()

    def copy(done: Any) -> None:  # on this loop
        if mirror.done():
            return
        if done.cancelled():
            mirror.cancel()
        elif done.exception() is not None:
            mirror.set_exception(done.exception())
        else:
            mirror.set_result(done.result())

    def settled(done: Any) -> None:  # on its loop
        with suppress(RuntimeError):  # this loop is closed: no one waits
            here.call_soon_threadsafe(copy, done)

    its.call_soon_threadsafe(future.add_done_callback, settled)  # RuntimeError: its is closed
    try:
        return await mirror
    except asyncio.CancelledError:
        _discard(future)  # this request's time is up (or the request itself ended)
        raise


class _Handoff:
    """What a tracker's call made in a thread returned to be awaited, handed to the
    request waiting for it, or closed by that thread if the request has stopped waiting:
    returned through the thread's future, it was dropped unawaited when the call came
    back after tracker_timeout ("coroutine ... was never awaited")."""

    __slots__ = ("_gone", "_item", "_lock")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._item: Any = None
        self._gone = False

    def put(self, awaitable: Any) -> None:
        """From the tracker's thread."""
        with self._lock:
            if not self._gone:
                self._item = awaitable
                return
        _discard(awaitable)

    def take(self) -> Any:
        """From the request, once it waits for the thread no more: the awaitable, or None;
        one that comes later is the thread's to close."""
        with self._lock:
            self._gone = True
            item, self._item = self._item, None
        return item


class _Slot:
    """One blocking call's claim on a semaphore, given back exactly once: by its thread
    when the call ran, or by the request when the call never started (anyio drops a
    call cancelled before a worker thread took it)."""

    __slots__ = ("_lock", "_semaphore", "_state")

    _PENDING, _RUNNING, _GIVEN_UP = 0, 1, 2

    def __init__(self, semaphore: threading.BoundedSemaphore) -> None:
        self._semaphore = semaphore
        self._lock = threading.Lock()
        self._state = self._PENDING

    def start(self) -> bool:
        with self._lock:
            if self._state != self._PENDING:
                return False
            self._state = self._RUNNING
            return True

    def done(self) -> None:
        self._semaphore.release()

    def give_up(self) -> None:
        with self._lock:
            if self._state != self._PENDING:
                return
            self._state = self._GIVEN_UP
        self._semaphore.release()


#: A page view the API failed while it accepted another within this long waits alone: the
#: API is failing some requests (one bad instance behind a balancer), not down, and the
#: page views it takes must go on. With 3 failures in a row pausing them all (as the
#: built-in client's connections that fail), an API failing 30 % of requests at random took
#: 8 page views a second of 50, where each waiting alone it takes 34, as before.
_ANSWERED_WITHIN = 1.0
#: Seconds the others wait for the attempt that goes alone after a pause before one more
#: goes alone: a hung one (the classic SDK's 15 s timeout, 3 times) must not hold them all.
_ALONE_WAIT = 2.0


class _Pause:
    """When page views may be attempted, shared by the worker's threads. While the API fails
    (the tracker's ``agentsight_retry_in`` says a failure is worth making again: a 5xx, 408 or
    429), no page view is attempted before the wait it gave; then one goes alone, and the others
    follow once one succeeds (half-open), as the built-in client's senders after a pause. Each
    page view sleeping out its own backoff held one of the 8 threads for up to 3.5 s and made its
    4 attempts: through 30 s of 503s, 2.8 page views a second were taken, each lost, and the
    failing API got 11.6 requests a second (0.4 and 1.8 now); waiting here, they stay queued
    for when the API is back."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._until = 0.0  # monotonic: no attempt before it
        self._half_open = False
        # Set when the attempt going alone is over; None while none goes.
        self._alone: threading.Event | None = None
        self._succeeded_at = -math.inf

    def turn(self, closing: threading.Event) -> threading.Event | None:
        """Wait until an attempt may be made (at once when ``closing`` is set). Returns the
        event to hand to :meth:`succeeded` or :meth:`failed` if the attempt goes alone."""
        while not closing.is_set():
            if not self._half_open and time.monotonic() >= self._until:
                return None  # the usual case, without the lock
            with self._lock:
                left = self._until - time.monotonic()
                alone = self._alone
                if left <= 0 and self._half_open and alone is None:
                    alone = self._alone = threading.Event()
                    return alone
            if left > 0:
                closing.wait(left)
            elif alone is not None and not alone.wait(_ALONE_WAIT):
                with self._lock:
                    if self._alone is alone:
                        self._alone = None  # the next to look goes alone beside it
        return None

    def succeeded(self, alone: threading.Event | None) -> None:
        self._succeeded_at = time.monotonic()
        if alone is not None:
            with self._lock:
                self._half_open = False
                self._end(alone)

    def failed(self, alone: threading.Event | None, wait: float | None) -> bool:
        """An attempt failed; ``wait``: the tracker's backoff if the API is failing, else None
        (a refusal, a network error the SDK retried itself: nothing said of an outage).
        True when the page view is to wait alone (see _ANSWERED_WITHIN), False when all wait."""
        now = time.monotonic()
        with self._lock:
            if alone is not None:
                self._end(alone)
            if wait is None:
                return False
            # Also for one that went alone (``alone``) once the API took another: it hung
            # past _ALONE_WAIT, one went beside it and was taken. Its late failure (a 504)
            # paused every page view, the API taking them all along.
            if not self._half_open and now - self._succeeded_at < _ANSWERED_WITHIN:
                return True
            self._until = max(self._until, now + wait)
            self._half_open = True
            return False

    def _end(self, alone: threading.Event) -> None:
        if self._alone is alone:
            self._alone = None
        alone.set()

    def wake(self) -> None:
        """Have the threads waiting for the attempt going alone look again (a close())."""
        with self._lock:
            alone, self._alone = self._alone, None
        if alone is not None:
            alone.set()


class TrackerDelivery:
    def __init__(
        self,
        tracker: Any,
        *,
        source: str | None,
        environment: str | None,
        timeout: float,
        queue_size: int = 10_000,
        is_probe: Callable[[str], bool] | None = None,
        shutdown_timeout: float = 5.0,
    ) -> None:
        check_tracker(tracker)
        self._shutdown_timeout = shutdown_timeout
        self._is_probe = is_probe
        self.tracker = tracker
        self._source = source
        self._environment = environment
        self._timeout = timeout
        self._initialize = tracker.initialize_conversation
        self._engage = tracker.get_or_create_conversation
        self._initialize_is_async = inspect.iscoroutinefunction(self._initialize)
        self._engage_is_async = inspect.iscoroutinefunction(self._engage)
        # An adapter whose engage call does nothing (the SDK's scope does the work)
        # says so, and the chat request is spared a useless trip to a thread. Read from
        # the class, and only a real True: a MagicMock answers any name truthily.
        self._skip_engage = getattr(type(tracker), "agentsight_skip_engage", False) is True
        scope = getattr(tracker, "conversation_scope", None)
        self._scope: Callable[..., AbstractContextManager[Any]] | None = (
            scope if callable(scope) else None
        )
        retry_in = getattr(tracker, "agentsight_retry_in", None)
        #: The tracker's say on a failed page view (see _initialize_with_retries); only
        #: when its class has one (a MagicMock answers any name).
        self._retry_in: Callable[[BaseException, int], float | None] | None = (
            retry_in
            if callable(retry_in) and hasattr(type(tracker), "agentsight_retry_in")
            else None
        )
        #: Set by close(): retries stop waiting, and the page view is given up. Cleared by
        #: the next start or page view once no close() runs (see _reopen), not at the end
        #: of close(): one that ran out of time leaves the worker running, and the page view
        #: it was making was then made again, up to 3 times, after the shutdown.
        self._closing = threading.Event()
        self._closes_running = 0
        self._pause = _Pause()
        flush_hook = getattr(tracker, "agentsight_flush", None)
        #: The tracker's own flush (see _flush_tracker), or None.
        self._flush_hook: Callable[[float], Any] | None = (
            flush_hook if callable(flush_hook) else None
        )
        self.log_once = LogOnce()
        #: Whether _json_metadata has said what it changed: once, as the built-in client does.
        self.metadata_noted = False
        self._dispatcher: Dispatcher[tuple[Event, asyncio.AbstractEventLoop | None]] = Dispatcher(
            self._deliver_initialize,
            maxsize=queue_size,
            shutdown_timeout=shutdown_timeout,
            concurrency=1 if self._initialize_is_async else _initialize_threads(tracker),
            # At exit, all of close(): the coroutine calls still running and the
            # tracker's own buffer (agentsight_flush), not only the worker's queue.
            at_exit=self.close,
        )
        # Coroutine calls with no app loop to run on (under WSGI): one loop of our own,
        # in a thread, for all of them. A loop per call (asyncio.run) broke trackers that
        # keep loop-bound resources, such as an httpx.AsyncClient. A coroutine that blocks
        # (sync I/O in an async def) holds up the others, as on any event loop.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._loop_lock = threading.Lock()
        self._count_lock = threading.Lock()
        reset_in_child(self._after_fork)
        # Blocking engage calls run in threads of their own number, never on the
        # app's: a slow tracker on anyio's default limiter held the 40 threads
        # Starlette runs every sync endpoint in. A slot is given back when the call
        # returns, not when the request stops waiting for it, so a hung tracker
        # holds at most this many threads (and chat requests go on without it).
        self._engage_slots = threading.BoundedSemaphore(ENGAGE_THREADS)
        # When a slot was last taken or given back (see _engage_hung).
        self._engage_free_at = time.monotonic()
        # Under WSGI, where blocking engage calls run (see _engage_in_thread); made at the
        # first call, as the dispatcher's pool is (see _engage_in_thread).
        self._engage_threads: DaemonThreads | None = None
        self._engage_threads_lock = threading.Lock()
        self.skipped_bots = 0
        self.errors = 0
        self.timeouts = 0
        self.dropped = 0
        self.slow = 0
        self.retried = 0
        # When a slow page view was last said (see _slow), and self.slow then.
        self._slow_said: float | None = None
        self._slow_told = 0
        # A coroutine tracker's page views running on the app's loop: flush() and close()
        # wait for them, as they wait for the worker's queue.
        self._flying: dict[Future[Any], asyncio.AbstractEventLoop] = {}
        self._flying_lock = threading.Lock()
        # The tracker's own flush last started (see _flush_tracker): its thread, outcome
        # and start; and the one a close() gave up on.
        self._flush_lock = threading.Lock()
        self._flush_thread: threading.Thread | None = None
        self._flush_outcome: list[bool] = []
        self._flush_began = 0.0
        self._close_gave_up_on: threading.Thread | None = None
        # The app's loop a coroutine tracker's page views last ran on (its flush is
        # awaited there), and the loop of the thread that asked for the flush, if any.
        self._app_loop: asyncio.AbstractEventLoop | None = None
        self._flush_caller_loop: asyncio.AbstractEventLoop | None = None

    def _after_fork(self) -> None:
        self._flush_lock = threading.Lock()
        self._closing = threading.Event()
        self._closes_running = 0
        self._pause = _Pause()
        # The parent's page views ran on loops this process does not have.
        self._flying = {}
        self._flying_lock = threading.Lock()
        self._flush_thread = self._close_gave_up_on = None
        self._loop = self._app_loop = self._flush_caller_loop = None
        self._loop_thread = None
        self._loop_lock = threading.Lock()
        self._count_lock = threading.Lock()
        # The parent's engage calls hold slots their threads, not here, would give back; and
        # the parent's counts are not this process's (the dispatcher's are reset too).
        self._engage_slots = threading.BoundedSemaphore(ENGAGE_THREADS)
        self._engage_free_at = time.monotonic()
        self._engage_threads = None
        self._engage_threads_lock = threading.Lock()
        self.skipped_bots = self.errors = self.timeouts = self.dropped = self.slow = 0
        self.retried = 0
        self._slow_said, self._slow_told = None, 0
        # Said again by each process, as the built-in client's sink (made at each worker
        # start) and LogOnce do.
        self.metadata_noted = False

    def _own_loop(self) -> asyncio.AbstractEventLoop:
        import asyncio

        with self._loop_lock:
            loop = self._loop
            if loop is not None and not loop.is_closed():
                return loop
            loop = self._loop = asyncio.new_event_loop()
            thread = self._loop_thread = threading.Thread(
                target=_run_unseen,
                args=(loop, self._timeout),
                name="agentsight-tracker-loop",
                daemon=True,
            )
        # Its thread started once the lock is let go, as the delivery worker's (see
        # BackgroundDelivery._start): under gevent a start switches greenlets, and a lock
        # made at a gunicorn --preload fork is no lock gevent patched. A call meanwhile
        # queues on the loop, which runs it once started.
        try:
            thread.start()
        except RuntimeError:
            # No thread (Python 3.12+ at interpreter exit): not kept, a loop that never
            # runs would take every later call, and a flush waiting for one, for ever.
            with self._loop_lock:
                if self._loop is loop:
                    self._loop = self._loop_thread = None
            loop.close()
            raise
        return loop

    def _stop_own_loop(self, deadline: float) -> None:
        """Let our loop's thread end (see _wind_up); a later call makes a new loop. Kept,
        each closed middleware left a thread (a greenlet under gevent) running its loop
        for the life of the process."""
        with self._loop_lock:
            loop, self._loop = self._loop, None
            thread, self._loop_thread = self._loop_thread, None
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(loop.stop)
        except RuntimeError:
            return  # closed already (its thread never started)
        # Briefly: one held by a call that blocks (sync I/O in an async def) ends once the
        # call returns, and closes its loop then.
        if thread is not None and thread is not threading.current_thread():
            with suppress(RuntimeError):  # never started (a close() racing _own_loop)
                thread.join(min(_LOOP_JOIN, max(deadline - time.monotonic(), 0.0)))

    def _count(self, name: str) -> None:
        with self._count_lock:  # from the worker's threads and the app's at once
            setattr(self, name, getattr(self, name) + 1)

    def _kwargs(self, event: Event) -> dict[str, Any]:
        kwargs = tracker_kwargs(
            event.conversation, source=self._source, environment=self._environment
        )
        kwargs["metadata"] = _json_metadata(kwargs["metadata"], self)
        return kwargs

    # -- page views: background ------------------------------------------------------

    def initialize(self, event: Event, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Queue a page view; returns at once. ``loop`` runs a coroutine tracker's call."""
        self._reopen()
        if self._dispatcher.waiting() >= COMPACT_AT:
            # A tracker this far behind: what waits keeps only what its call will use.
            try:
                event.conversation._compact()
            except Exception as exc:  # never the request's failure
                self.log_once("compacting a queued page view", exc)
        self._dispatcher.submit((event, loop))

    def _deliver_initialize(self, item: tuple[Event, asyncio.AbstractEventLoop | None]) -> None:
        event, loop = item
        # The bot and probe tests read the user agent (slow when it is new), hence
        # here and not on the request path.
        if is_robot_view(event, self._is_probe):
            self._count("skipped_bots")
            return
        try:
            kwargs = self._kwargs(event)
            if self._initialize_is_async:
                self._start_initialize(self._initialize(**kwargs), loop)
                return
            result, started = self._initialize_with_retries(kwargs)
            if inspect.isawaitable(result):
                # A coroutine function behind a plain decorator. Not taken for a coroutine
                # function from now on: a method that returns a coroutine only at times
                # failed every later page view its plain result ("can't be used in 'await'
                # expression").
                self._start_initialize(result, loop)
                return
            took = time.monotonic() - started
            if took > self._timeout:
                # A blocking call cannot be cut short: it held one of the worker's
                # threads all along. It succeeded, so it is no failure: counted as
                # processed (and slow), and said at WARNING.
                self._slow(took)
        except BaseException as exc:
            # Any BaseException: a tracker's CancelledError (or gevent's Timeout) once
            # stopped the worker for good.
            self._failed(exc)

    def _initialize_with_retries(self, kwargs: dict[str, Any]) -> tuple[Any, float]:
        """A blocking page view, made again after a failure the tracker says is worth it
        (``agentsight_retry_in(exc, attempt)``: seconds to wait, or None): the classic SDK
        sends a 503's or 429's page view once, and it was lost where the built-in client
        retries. In the worker, never a chat request's time; a close() ends the waiting.
        Every attempt waits for its turn (see _Pause): while the API fails, the page views
        wait out one backoff together, not each its own on a thread of the worker's.
        Returns the call's result and when its last attempt started: the backoff before it
        is ours, not the tracker being slow (a page view retried after a 503 was counted
        'slow' and said so at WARNING, its tracker answering in milliseconds)."""
        attempt = 1
        pause = self._pause
        failure: Exception | None = None
        while True:
            alone = pause.turn(self._closing)
            if failure is not None:
                if self._closing.is_set():
                    pause.failed(alone, None)
                    raise failure
                self._count("retried")
            started = time.monotonic()
            try:
                result = self._initialize(**kwargs)
            except Exception as exc:
                wait = failing = None
                try:
                    if self._retry_in is not None:
                        wait = self._retry_in(exc, attempt)
                        # Past its attempts this page view is given up, but its failure
                        # still says the API fails: the others wait all the same.
                        failing = wait if wait is not None else self._retry_in(exc, 1)
                finally:
                    alone_wait = pause.failed(alone, failing)
                if wait is None or (alone_wait and self._closing.wait(wait)):
                    raise
                failure = exc
            except BaseException:
                pause.failed(alone, None)
                raise
            else:
                pause.succeeded(alone)
                return result, started
            attempt += 1

    def _slow(self, took: float) -> None:
        """A page view that succeeded after ``tracker_timeout``: said the first time, then
        once every AGAIN_EVERY seconds at most with how many there were, as LogOnce does."""
        now = time.monotonic()
        with self._count_lock:
            self.slow += 1
            if self._slow_said is not None and now - self._slow_said < AGAIN_EVERY:
                return
            since, self._slow_said, self._slow_told = self.slow - self._slow_told, now, self.slow
        from ._log import logger

        logger.warning(
            "tracker.initialize_conversation() took %.1f s, over tracker_timeout=%g s, and "
            "succeeded (%d such page view(s) since last said, counted in stats()['slow'])",
            took,
            self._timeout,
            since,
        )

    def _start_initialize(self, call: Any, loop: asyncio.AbstractEventLoop | None) -> None:
        """Run a coroutine tracker's call on the app's loop (it may hold loop-bound
        resources, an AsyncClient), else on ours; the worker does not wait for it."""
        import asyncio

        if loop is None or not loop.is_running():
            loop = self._own_loop()
        else:
            self._app_loop = loop
        with self._flying_lock:
            if len(self._flying) >= INITIALIZE_IN_FLIGHT:
                self._prune()
            if len(self._flying) >= INITIALIZE_IN_FLIGHT:
                _discard(call)  # never to run: no "never awaited" warning
                self._count("dropped")
                self.log_once(
                    f"tracker.initialize_conversation() (dropped: "
                    f"{INITIALIZE_IN_FLIGHT} calls still running)",
                    TimeoutError(),
                )
                return
            future = asyncio.run_coroutine_threadsafe(self._bounded(call, self._timeout), loop)
            self._flying[future] = loop
        future.add_done_callback(self._check_future)

    @staticmethod
    async def _bounded(call: Any, seconds: float) -> Any:
        from ._timeout import bounded

        return await bounded(_awaited(call), seconds)

    def _prune(self) -> None:
        """Forget the calls of loops that stopped: they will never run, and must not hold
        places or be waited for (a test harness closing its loop). Under the lock; not
        cancelled here (their callbacks take the lock, and the loop is gone anyway)."""
        own = self._loop
        for future, loop in list(self._flying.items()):
            # Our own loop runs once its thread gets to it (see _own_loop): not running yet,
            # its calls were forgotten, and a flush() or close() meanwhile returned before
            # the page view queued on it was made.
            if loop.is_closed() or (not loop.is_running() and loop is not own):
                del self._flying[future]

    def _check_future(self, future: Future[Any]) -> None:
        with self._flying_lock:
            self._flying.pop(future, None)
        exc = None if future.cancelled() else future.exception()
        if exc is not None:
            self._failed(exc)

    def _failed(self, exc: BaseException) -> None:
        import asyncio

        # asyncio's own TimeoutError is not the built-in one before Python 3.11.
        if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
            self._count("timeouts")
            self.log_once(
                f"tracker.initialize_conversation() (timed out after {self._timeout:g} s)", exc
            )
        else:
            self._count("errors")
            self.log_once("tracker.initialize_conversation()", exc)

    # -- chat requests: before the handler -----------------------------------------

    def engage_sync(self, event: Event) -> None:
        """Under WSGI: before the handler, bounded by ``tracker_timeout``."""
        if self._skip_engage:
            return
        import asyncio

        # One tracker_timeout for all of it: the wait for a thread, the call and what it
        # returned to be awaited (a coroutine method behind a plain decorator). That was
        # awaited for a tracker_timeout of its own: a hung one cost the chat up to twice it.
        deadline = time.monotonic() + self._timeout
        try:
            kwargs = self._kwargs(event)
            if self._engage_is_async:
                self._wait_on_own_loop(lambda: self._engage(**kwargs), deadline)
            else:
                # A method that is no coroutine function goes to a thread at every call,
                # even once it has returned a coroutine (one behind a plain decorator): its
                # wrapper, or the call that returns a coroutine only at times, may block.
                # Taken for a coroutine function, it was called on our one loop: the chats'
                # calls were made one at a time, and the others timed out behind it.
                awaitable = self._engage_in_thread(kwargs, deadline)
                if awaitable is not None:
                    self._wait_on_own_loop(lambda: awaitable, deadline, awaitable)
        except (TimeoutError, asyncio.TimeoutError, concurrent.futures.TimeoutError) as exc:
            self._count("timeouts")
            self.log_once(
                f"tracker.get_or_create_conversation() (timed out after {self._timeout:g} s)", exc
            )
        except (Exception, asyncio.CancelledError) as exc:
            # A tracker's CancelledError escaped into the request, and the chat got no
            # answer at all. Other BaseExceptions go on: a server's own time limit on the
            # request (gevent's Timeout) must still cut it short.
            self._count("errors")
            self.log_once("tracker.get_or_create_conversation()", exc)

    def _engage_in_thread(self, kwargs: dict[str, Any], deadline: float) -> Any:
        """A blocking call, in a thread of its own with a copy of the request's context,
        waited for until ``deadline`` at most, as under ASGI: in the request's thread, a
        hung tracker held the request (and the server's worker) for as long as it hung.
        State a tracker sets for the handler belongs in its ``conversation_scope``, which
        is entered in the request's thread. Returns what the call returned to be awaited,
        else None."""
        # A slot is waited for, within the same tracker_timeout: skipped at once, a healthy
        # tracker 100 ms from its API lost the call of 32 of 48 chats at once (each made in
        # its request's thread before), counted as timeouts. A hung tracker costs a chat
        # tracker_timeout at most, and none once its calls have held every slot that long
        # (_engage_hung). (Under ASGI the wait is in short sleeps: _engage_slot.)
        if not self._engage_slots.acquire(blocking=False) and (
            self._engage_hung()
            or not self._engage_slots.acquire(timeout=max(deadline - time.monotonic(), 0.0))
        ):
            self._count("timeouts")
            self.log_once(
                f"tracker.get_or_create_conversation() (skipped: {ENGAGE_THREADS} "
                f"calls still running after {self._timeout:g} s)",
                TimeoutError(),
            )
            return None
        self._engage_free_at = time.monotonic()
        slots = self._engage_slots
        handoff = _Handoff()

        def call() -> None:
            try:
                result = self._engage(**kwargs)
            except BaseException as exc:
                if _tracker_failure(exc):
                    raise
                # Raised in the tracker's thread, not this request's: not a time limit of
                # the server's on this request, but the tracker's failure.
                raise RuntimeError(f"the tracker raised {exc!r}") from exc
            finally:
                self._engage_free_at = time.monotonic()
                slots.release()
            if inspect.isawaitable(result):
                handoff.put(result)

        # Threads kept for the next call (a thread started per call cost ~0.4 ms a chat),
        # daemons: a hung call must not hold up the interpreter's exit. The pool is made at
        # the first call, in the process and with the ``threading`` and ``queue`` that
        # serve it: made at a fork (gunicorn ``--preload``), its queue was the C one
        # gevent's worker patches only after the fork, and its first idle thread, a
        # greenlet, blocked the whole worker on it.
        context = contextvars.copy_context()
        try:
            for again in (True, False):
                # Not submitted under the lock: made at a fork, it is no lock gevent's
                # worker patched, and a thread's start waits (a greenlet's switch).
                with self._engage_threads_lock:
                    pool = self._engage_threads
                    if pool is None:
                        pool = DaemonThreads(ENGAGE_THREADS, "agentsight-tracker-engage")
                        self._engage_threads = pool
                try:
                    future = pool.submit(context.run, call)
                    break
                except RuntimeError:
                    # A close() shut that pool down meanwhile: the next one takes it.
                    if not again:
                        raise
                    with self._engage_threads_lock:
                        if self._engage_threads is pool:
                            self._engage_threads = None
        except BaseException:
            slots.release()  # the call will never run to give it back
            raise
        try:
            future.result(max(deadline - time.monotonic(), 0.0))
        except BaseException:
            _discard(handoff.take())
            raise
        return handoff.take()

    def _stop_engage_threads(self) -> None:
        """Let the engage threads end (a hung call's once it returns); a later chat starts
        new ones. Kept, each closed middleware left its threads waiting for ever."""
        with self._engage_threads_lock:
            pool, self._engage_threads = self._engage_threads, None
        if pool is not None:
            pool.shutdown(wait=False)

    def _wait_on_own_loop(self, make: Callable[[], Any], deadline: float, made: Any = None) -> None:
        """``make()`` (a coroutine tracker's call) run on our loop and what it returns
        awaited there, waited for until ``deadline``. ``made``: the awaitable ``make``
        returns, closed if it never gets to the loop."""
        import asyncio

        try:
            if time.monotonic() >= deadline:
                raise TimeoutError
            loop = self._own_loop()
        except BaseException:
            _discard(made)
            raise

        async def run() -> Any:
            left = deadline - time.monotonic()
            if left <= 0:
                # The loop came to it late (held by another call): the request has gone
                # on, and the call is not made now.
                _discard(made)
                return None
            return await self._bounded(make(), left)

        future = asyncio.run_coroutine_threadsafe(run(), loop)
        try:
            # Until the deadline, not a second past it: the loop may be late to start
            # the call (a coroutine of the tracker's blocking it), and the request waited
            # that long on top of the call's own tracker_timeout.
            future.result(max(deadline - time.monotonic(), 0.0))
        except concurrent.futures.TimeoutError:
            future.cancel()  # not to run on after the request has gone on without it
            raise

    async def engage_async(self, event: Event) -> None:
        """Under ASGI: awaited in the request's task, bounded by ``tracker_timeout``."""
        if self._skip_engage:
            return
        import asyncio

        import anyio  # the ASGI server has loaded it already (Starlette's own dependency)
        import anyio.to_thread

        deadline = time.monotonic() + self._timeout
        try:
            with anyio.move_on_after(self._timeout) as scope:
                if self._engage_is_async:
                    await _awaited(self._engage(**self._kwargs(event)))
                else:
                    kwargs = self._kwargs(event)
                    if not await self._engage_slot(deadline):
                        self._count("timeouts")
                        self.log_once(
                            f"tracker.get_or_create_conversation() (skipped: {ENGAGE_THREADS} "
                            f"calls still running after {self._timeout:g} s)",
                            TimeoutError(),
                        )
                        return
                    slot = _Slot(self._engage_slots)
                    handoff = _Handoff()

                    def call() -> None:
                        if slot.start():
                            try:
                                result = self._engage(**kwargs)
                            except asyncio.CancelledError as exc:
                                # Not this request's cancellation (a thread has none):
                                # re-raised in its task, it would be taken for one.
                                raise RuntimeError(f"the tracker raised {exc!r}") from exc
                            finally:
                                self._engage_free_at = time.monotonic()
                                slot.done()
                            if inspect.isawaitable(result):
                                handoff.put(result)

                    try:
                        # A limiter of our own, never waited on (the slots keep the calls
                        # below its total); one per call, as a limiter belongs to the
                        # async backend (asyncio, trio) that made it.
                        await anyio.to_thread.run_sync(
                            call,
                            abandon_on_cancel=True,
                            limiter=anyio.CapacityLimiter(ENGAGE_THREADS),
                        )
                    except BaseException:
                        _discard(handoff.take())
                        raise
                    finally:
                        slot.give_up()
                    awaitable = handoff.take()
                    if awaitable is not None:
                        # A coroutine function behind a plain decorator: its coroutine is
                        # awaited here, on the request's loop. Its wrapper stays in a thread
                        # at every call (see engage_sync): taken for a coroutine function,
                        # it was called on the app's loop, and held every request.
                        await _awaited(awaitable)
            if scope.cancelled_caught:
                self._count("timeouts")
                self.log_once(
                    f"tracker.get_or_create_conversation() (timed out after {self._timeout:g} s)",
                    TimeoutError(),
                )
        except Exception as exc:
            self._count("errors")
            self.log_once("tracker.get_or_create_conversation()", exc)
        except asyncio.CancelledError as exc:
            # A coroutine tracker's own (it awaited a task cancelled elsewhere) must not
            # end the chat unanswered; the request's cancellation (a client gone, a
            # server stopping) goes on.
            if _cancelling():
                raise
            self._count("errors")
            self.log_once("tracker.get_or_create_conversation()", exc)

    async def _engage_slot(self, deadline: float) -> bool:
        """Take a slot for a blocking call, waiting (on the request's loop, in short sleeps:
        the slots are a thread's semaphore, shared by every loop) until ``deadline`` at
        most, as under WSGI. Skipped at once, a burst of chats lost the calls the loop took
        slots for before the threads had given them back: up to 52 of 200 chats at once to
        a coroutine method behind a plain decorator, whose wrapper returns at once."""
        import anyio

        pause = 0.001
        while not self._engage_slots.acquire(blocking=False):
            left = deadline - time.monotonic()
            if left <= 0 or self._engage_hung():
                return False
            await anyio.sleep(min(pause, left))
            pause = min(pause * 2, 0.05)
        self._engage_free_at = time.monotonic()
        return True

    def _engage_hung(self) -> bool:
        """All the slots taken and none taken or given back for ``tracker_timeout``: the
        tracker hangs, and a chat goes on without its call at once. Waiting for a slot
        there cost every chat tracker_timeout (200 chats behind 16 hung calls: 4.5 s, not
        0.56), where a burst to a healthy tracker frees slots within milliseconds."""
        return time.monotonic() - self._engage_free_at >= self._timeout

    # -- the handler's scope --------------------------------------------------------

    def scope(self, event: Event) -> AbstractContextManager[None] | None:
        """The tracker's ``conversation_scope(...)`` for a chat request, if it has one.

        Trackers whose SDK keeps the current conversation in context variables
        (the OpenTelemetry-based SDK) need the handler to run *inside* a scope;
        entered in the request's task, it reaches async handlers, sync handlers
        in the thread pool (the context is copied) and WSGI handlers alike.
        """
        if self._scope is None:
            return None
        try:
            manager = self._scope(**self._kwargs(event))
        except BaseException as exc:
            if not _tracker_failure(exc):
                raise
            self._count("errors")
            self.log_once("tracker.conversation_scope()", exc)
            return None
        return _guarded(manager, self)

    def ensure_started(self) -> None:
        self._reopen()
        self._dispatcher.ensure_started()

    def _reopen(self) -> None:
        """Page views failing from now on are made again (see close)."""
        if self._closing.is_set():
            with self._count_lock:
                if not self._closes_running:
                    self._closing.clear()

    def flush(self, timeout: float | None = None) -> bool:
        if timeout is None:
            timeout = self._shutdown_timeout  # as the built-in client's flush()
        deadline = time.monotonic() + timeout
        if not self._dispatcher.flush(timeout):
            return False
        flying = self._waitable()
        if flying:
            left = max(deadline - time.monotonic(), 0.0)
            _, pending = concurrent.futures.wait(flying, left)
            if pending:
                return False
        return self._flush_tracker(deadline)

    def close(self, timeout: float | None = None) -> None:
        # One deadline for the queue, the calls on the app's loop and the tracker's own
        # buffer: not shutdown_timeout once per part.
        deadline = time.monotonic() + (self._shutdown_timeout if timeout is None else timeout)
        # A page view waiting to be made again is given up rather than hold the shutdown
        # up (it was failing; the rest of the queue may not be). Until the next start or
        # page view: a second lifespan's page views are retried again.
        self._stop_engage_threads()
        with self._count_lock:
            self._closes_running += 1
            self._closing.set()
        self._pause.wake()
        try:
            self._dispatcher.close(timeout)
        finally:
            with self._count_lock:
                self._closes_running -= 1
        # Page views a coroutine tracker is still handling on the app's loop: given the
        # time the tracker may take (they time out by then), said when cut short.
        flying = self._waitable()
        if flying:
            _, pending = concurrent.futures.wait(flying, max(deadline - time.monotonic(), 0))
            if pending:
                from ._log import logger

                logger.warning(
                    "%d tracker.initialize_conversation() call(s) not finished at shutdown",
                    len(pending),
                )
                for future in pending:
                    future.cancel()
        try:
            self._close_flush(timeout, deadline)
        finally:
            # Last: a coroutine tracker's flush is awaited on our loop.
            self._stop_own_loop(deadline)

    def _close_flush(self, timeout: float | None, deadline: float) -> None:
        if self._flush_hook is None:
            return
        running = self._flush_thread
        if running is not None and running is self._close_gave_up_on and running.is_alive():
            return  # a close before this one waited for that very flush in vain: not again
        if timeout is None:
            # Given a second at least: a page view that used up the shutdown timeout must
            # not cost the whole batch the tracker holds (every earlier page view and turn).
            deadline = max(deadline, time.monotonic() + _LEAST_CLOSE_FLUSH)
        if not self._flush_tracker(deadline):
            self._close_gave_up_on = self._flush_thread
            from ._log import logger

            logger.warning(
                "the tracker's own buffer (%s.agentsight_flush) was not sent at shutdown "
                "(it failed or ran out of time); what it still holds may be lost",
                type(self.tracker).__name__,
            )

    def _flush_tracker(self, deadline: float) -> bool:
        """The tracker's own buffer sent, if it has one and says how
        (``agentsight_flush(timeout)``): the 0.1.x SDK batches what it records and
        exports every few seconds, and its atexit flush never runs when uvicorn ends on
        SIGTERM (it re-raises the signal after the lifespan shutdown). True once a flush
        that started after this call began has succeeded; False if it failed or ran out of
        time.

        In a thread of its own, waited for until the deadline: the hook's own timeout is a
        wish (OpenTelemetry's force_flush exports the whole queue whatever it is told: ~48 s
        a batch against an API that does not answer). One at a time: a caller finding one
        that started before it waits for it, then starts its own (what was handed over
        meanwhile is in no earlier flush); callers at once share one."""
        hook = self._flush_hook
        if hook is None:
            return True
        import asyncio

        self._flush_caller_loop = asyncio._get_running_loop()
        called_at = time.monotonic()
        while True:
            inline: tuple[float, list[bool]] | None = None
            start = False
            with self._flush_lock:
                thread, outcome, began = self._flush_thread, self._flush_outcome, self._flush_began
                # One not started yet (ident None: its caller starts it once the lock is let
                # go) is not one that ended: waited for, not replaced.
                ended = thread is not None and thread.ident is not None and not thread.is_alive()
                if thread is None or (began < called_at and ended):
                    left = max(deadline - time.monotonic(), _LEAST_FLUSH)
                    outcome, began = [], time.monotonic()
                    thread = threading.Thread(
                        target=self._run_flush,
                        args=(hook, left, outcome),
                        name="agentsight-tracker-flush",
                        daemon=True,
                    )
                    self._flush_thread, self._flush_outcome = thread, outcome
                    self._flush_began = began
                    start = True
            if start:
                # Once the lock is let go, as the delivery worker's (see
                # BackgroundDelivery._start): under gevent a start switches greenlets, and
                # this lock, made before a --preload worker patched threading, is the OS's:
                # a second flush meanwhile blocked the whole worker on it, for good.
                try:
                    thread.start()
                except RuntimeError:
                    # Python 3.12 starts no thread once the interpreter has begun to
                    # exit (atexit's close): the hook runs here instead.
                    with self._flush_lock:
                        if self._flush_thread is thread:
                            self._flush_thread = None
                    inline = (left, outcome)
            if inline is not None:
                self._run_flush(hook, *inline, bounded=True)
                return bool(outcome) and outcome[0]

            def still(mine: threading.Thread = thread) -> bool:
                return self._flush_thread is mine

            if not wait_started(thread, still, deadline):
                return False  # its start failed (its caller runs the hook) or never came
            thread.join(max(deadline - time.monotonic(), _LEAST_FLUSH))
            if thread.is_alive():
                return False
            if began >= called_at:
                return bool(outcome) and outcome[0]
            if time.monotonic() >= deadline:
                return False  # an older flush used up the time: none of our own

    def _run_flush(
        self,
        hook: Callable[[float], Any],
        timeout: float,
        outcome: list[bool],
        bounded: bool = False,
    ) -> None:
        try:
            result = hook(timeout)
            if inspect.isawaitable(result):
                # A coroutine tracker's flush (async def agentsight_flush): awaited where
                # its page views ran, the app's loop while it runs, else the tracker's own.
                result = self._await_flush(result, timeout, bounded)
            outcome.append(result is not False)
        except Exception as exc:
            self._count("errors")
            self.log_once("tracker.agentsight_flush()", exc)
            outcome.append(False)

    def _await_flush(self, awaitable: Any, timeout: float, bounded: bool = False) -> Any:
        """``bounded``: run on the caller's thread (no flush thread could start), so waited
        for ``timeout`` at most: no join() bounds it, and an exit would wait for ever."""
        import asyncio

        async def wait() -> Any:
            return await awaitable

        loop = self._app_loop
        if loop is None or not loop.is_running() or loop is self._flush_caller_loop:
            try:
                loop = self._own_loop()
            except RuntimeError:
                if asyncio._get_running_loop() is not None:
                    raise
                # No thread can start (Python 3.12+ at interpreter exit, where close()
                # runs the flush on the caller's thread): awaited here, on a loop of its own.
                here = asyncio.new_event_loop()
                try:
                    return here.run_until_complete(asyncio.wait_for(wait(), timeout))
                finally:
                    here.close()
        future = asyncio.run_coroutine_threadsafe(wait(), loop)
        if not bounded:
            try:
                return future.result()
            except concurrent.futures.CancelledError:
                if loop is self._loop or loop is self._app_loop:
                    raise
                # Cancelled as a close() that gave it up ended our loop (see _wind_up): no
                # failure of the tracker's, and that close() said what it means.
                return False
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            return False

    def _waitable(self) -> list[Future[Any]]:
        """The page views running on loops that run, but not on this thread's own loop
        (waiting there would block the very calls waited for)."""
        import asyncio

        # Under gevent our own loop is no other greenlet's running loop (see _greenlets):
        # taken for the caller's, flush() and close() waited for none of its page views.
        here = asyncio._get_running_loop()
        with self._flying_lock:
            self._prune()
            return [future for future, loop in self._flying.items() if loop is not here]

    def stats(self) -> dict[str, int]:
        stats: dict[str, int] = dict(self._dispatcher.stats())
        stats.update(
            skipped_bots=self.skipped_bots,
            errors=self.errors,
            timeouts=self.timeouts,
            slow=self.slow,
            retried=self.retried,
        )
        stats["dropped"] += self.dropped
        return stats
