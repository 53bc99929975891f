"""The background worker behind the built-in sinks (AgentSight API, local store).

The request path only appends a small immutable :class:`Event` to a deque: no
lock, no I/O, no parsing. One worker thread per process runs an event loop
that picks the events up every few milliseconds, does the slow parts (user
agent parsing, payload building, JSON) and hands them to the sink.

The worker starts on the first event in the process that serves: after a
``fork()`` (gunicorn ``--preload``, uWSGI) the parent's thread does not exist
in the child, so a changed pid starts a fresh worker instead of queueing into
a dead one.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from ._events import Event, is_robot_view
from ._fork import reset_in_child
from ._greenlets import unseen_loop
from ._log import LogOnce, logger
from ._park import park, resolve
from ._payload import build_payload

if TYPE_CHECKING:
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

__all__ = ["ANSWER_WAIT", "BATCH", "BackgroundDelivery", "HeldChat", "Sink"]

# How long the worker sleeps between looks at an intake that has just gone quiet.
_INTAKE_INTERVAL = 0.02
# Quiet for that long, it parks until the request path's next event wakes it (one
# call_soon_threadsafe, ~5 us, on the first event after a lull): an idle worker that
# kept polling would take the GIL from the app's threads fifty times a second, for
# nothing, which measured ~0.5-1 % of a saturated app's requests/s on untracked routes.
# It still looks every _DOZE seconds, in case a wake-up were ever missed.
_DOZE = 1.0
# While events keep coming the intake is looked at more often: what a poll finds is
# built and sent at once, and the bursts of a 20 ms poll (dozens of events, as many
# requests to the API) cost the app's slowest requests milliseconds on a busy machine.
# Idle, the worker backs off to _INTAKE_INTERVAL.
_BUSY_INTERVAL = 0.005
BATCH = 100
# A worker that stopped on an error (its sink could not start: a certificate file missing,
# an outbox unreadable) is started again after this long, by the next event: the cause
# may be gone by then, and meanwhile events wait in the bounded intake.
_RESTART_AFTER = 30.0
# From this many events waiting, each new one keeps only what its payload will use: a
# worker this far behind is waiting for the API, and the queue must stay bounded in bytes.
_COMPACT_AT = 500
#: How long a chat request's event waits for the app's answer (a 4xx is no chat) before it
#: is queued anyway. A refusal (no CSRF token, not signed in, an invalid body, throttled)
#: comes before the handler runs, at once; a chat the app is still working on then is one,
#: and its event must not wait in memory for an answer that may come minutes later, or
#: never: a process stopped meanwhile (a server's graceful timeout, gunicorn's SIGKILL after
#: it, waitress or uWSGI on SIGTERM, uvicorn forced) or killed lost the chat, where it was
#: queued (and with ``outbox=`` on disk) within milliseconds of the request before.
ANSWER_WAIT = 1.0
#: Chats waiting for their answer at most, whatever ``queue_size``: each leaves within
#: ANSWER_WAIT, so this many come only from a process taking over 10,000 chats a second.
#: Bound by a small ``queue_size`` instead (100, for a small footprint), more chats within
#: one second than that (or behind one still being answered) settled the oldest as a chat
#: before its answer came, and its refusal (a 4xx) came too late to count. Past
#: ``queue_size``, those that have waited their ANSWER_WAIT are queued at once (a worker
#: held up does not settle them), so that only the last second's chats are held past it.
_HELD_MAX = 10_000


class HeldChat:
    """A chat request's event waiting for the app's answer (see :data:`ANSWER_WAIT`):
    settled once, by the answer's start (a 4xx: counted in ``refused_chats``, not sent),
    by the request's end without one, by the worker once it has waited ``ANSWER_WAIT``,
    or by the worker's shutdown. Under WSGI it is also the scope around the app."""

    __slots__ = ("_delivery", "_event", "due")

    def __init__(self, delivery: BackgroundDelivery, event: Event, due: float) -> None:
        self._delivery = delivery
        # Taken with list.pop(), one call that no other thread can split: the request's
        # thread (the answer) and the worker (the wait is over) may settle it at once, and
        # a read then a write could let both take the event and send the chat twice.
        self._event: list[Event] = [event]
        self.due = due

    @property
    def waiting(self) -> bool:
        return bool(self._event)

    def _take(self) -> Event | None:
        """The event, to the first of the two threads that asks; None once taken."""
        box = self._event
        if not box:  # settled already: the usual case at the request's end (no raise)
            return None
        try:
            return box.pop()
        except IndexError:  # settled meanwhile by the other thread
            return None

    def answered(self, refused: bool) -> None:
        """The answer starts: the first one counts (one given again with exc_info replaces
        an answer that was never sent, after the app went wrong)."""
        event = self._take()
        if event is None:
            return
        if refused:
            self._delivery.refused_chats += 1
        else:
            self._delivery.submit(event)

    def settle(self) -> None:
        """No answer (yet): the app failed, the visitor left, or it works on: a chat."""
        event = self._take()
        if event is not None:
            self._delivery.submit(event)

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc_info: object) -> None:
        self.settle()


def _still_waiting(held: deque[HeldChat]) -> int:
    """How many held chats wait for their answer (those settled leave the deque later)."""
    # Copied in one C call first, which a request thread's append cannot split (iterating
    # the deque itself while one is appended raises).
    return sum(1 for chat in list(held) if chat.waiting)


class Sink(Protocol):
    #: Monotonic time past which a write stops waiting for a file another process has
    #: locked, one already waiting included: infinite while running, shutdown's deadline
    #: once close() is called.
    deadline: float
    #: What a failed put() was doing, for its log line: a full disk loses the batch.
    storing: str

    @property
    def durable(self) -> bool:
        """True when undelivered events survive a restart (a durable outbox, a local file)."""
        ...

    async def start(self) -> None: ...
    async def put(self, payloads: list[dict[str, Any]]) -> None:
        """Take the events; those it can neither send nor keep are counted in its
        ``failed``, those of a put() that raises included (the worker counts them nowhere
        else: ``errors`` is for the middleware's own failures, not a full disk's)."""
        ...

    def backed_up(self) -> bool: ...
    async def drain(self, deadline: float, *, closing: bool = False) -> int: ...
    async def aclose(self) -> None: ...
    def stats(self) -> dict[str, int]: ...


#: The keys of each sink's stats(), known before the sink is built (with the worker, at
#: the first event); here, as importing the HTTP sink loads httpx.
HTTP_STATS = (
    "sent",
    "retried",
    "throttled",
    "rejected",
    "failed",
    "dropped",
    "in_flight",
    "senders",
    "pending",
    "outbox_pending",
)
STORE_STATS = ("stored", "failed", "pending")
#: The keys of a sink's stats() that say how things are now, not how many so far: a new
#: sink's are the ones to show, where a stopped sink's counts are added to the new one's.
_GAUGES = frozenset({"in_flight", "senders", "pending", "outbox_pending"})

# Deliveries whose worker may be running: a running worker's thread holds its delivery,
# and a stopped one is freed with its middleware.
_LIVE: weakref.WeakSet[BackgroundDelivery] = weakref.WeakSet()
_atexit_registered = False


def _close_all() -> None:
    """At exit, every worker is told to stop at once and all are waited for together,
    against their deadlines (not one shutdown_timeout after another)."""
    deliveries = [delivery for delivery in list(_LIVE) if delivery._thread is not None]
    for delivery in deliveries:
        delivery.stop()
    for delivery in deliveries:
        delivery.close()


def _close_loop(loop: asyncio.AbstractEventLoop) -> None:
    """What ``asyncio.run`` does at its end, but for the default executor's shutdown, which
    starts a thread to wait for it: Python 3.12 starts none once the interpreter has begun
    to exit, which is when atexit has the worker deliver what is left, and asyncio.run
    raised there after the delivery (an ERROR and a traceback at every exit). ``close()``
    shuts the executor down without waiting: its threads are daemons (see _threads)."""
    import asyncio

    try:
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        if tasks:
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
    except Exception as exc:  # the worker's end: said, never raised into the thread
        logger.debug("closing the delivery worker's loop: %r", exc)
    finally:
        loop.close()


class BackgroundDelivery:
    def __init__(
        self,
        sink_factory: Callable[[], Sink],
        *,
        source: str | None,
        environment: str | None,
        queue_size: int = 10_000,
        shutdown_timeout: float = 5.0,
        name: str = "agentsight-delivery",
        is_probe: Callable[[str], bool] | None = None,
        stats_keys: Sequence[str] = (),
        release: Callable[[], None] | None = None,
        idle_counts: Callable[[], tuple[int, int]] | None = None,
        starting: Callable[[float | None], None] | None = None,
    ) -> None:
        self._sink_factory = sink_factory
        # A durable outbox's (pending, outbox_pending), read while no sink is built (before
        # the worker's first start, or while a stopped one waits to start again): the file
        # is open from start-up, and what earlier runs left in it is there to count.
        self._idle_counts = idle_counts
        # A shared outbox's note that this process starts (see SQLiteOutbox.starting):
        # told before the one-time work of the worker's start and after its first write.
        self._starting = starting
        # When the worker was last asked to start (time.time()): by the first request,
        # before the event of any request it serves was seen.
        self._asked_at = 0.0
        # Frees what the sink would have closed (a durable outbox's connection, opened at
        # start-up) when close() comes with no worker running: no event ever, or after a
        # stopped worker. A later event opens it again.
        self._release = release
        self._is_probe = is_probe
        # The sink's counts, as zeros until it is built at the first event: a health
        # endpoint reading stats()["sent"] must not meet a KeyError before any traffic.
        self._stats_keys = stats_keys
        self._source = source
        self._environment = environment
        self._queue_size = queue_size
        # Events joining a queue this deep are compacted (Conversation._compact).
        self._compact_at = min(_COMPACT_AT, queue_size)
        self._held_max = max(queue_size, _HELD_MAX)
        self._shutdown_timeout = shutdown_timeout
        self._name = name
        self._lock = threading.Lock()
        self._started = False
        self._intake: deque[Event] = deque()
        # Chat events waiting for their answer, oldest first (each waits ANSWER_WAIT):
        # appended by the request path, taken by the worker (and by a request thread at a
        # full deque, see hold()).
        self._held: deque[HeldChat] = deque()
        # Taken around every take from _held: a request thread's pass at a full deque has a
        # chat out of it for a moment, and shutdown's last pass, made then, missed it: its
        # request's end queued it after the worker had ended (lost, uncounted). Never taken
        # by the usual request, which only appends.
        self._settling = threading.Lock()
        self._holding = 0  # events taken from the intake, in the sink's put() now
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sink: Sink | None = None
        # The counts of the sinks of workers that stopped (a close() and a later start, a
        # second lifespan, a worker stopped on an error): a new sink counts from zero.
        self._past: dict[str, int] = {}
        self._stopping = threading.Event()
        self._stop_by = math.inf  # shutdown's deadline (monotonic), set by close()
        self._ready = threading.Event()
        self._parked: asyncio.Future[None] | None = None
        self._restart_at = 0.0  # a stopped worker may start again from then (0: none stopped)
        self._resolver: Callable[[int, str], ThreadPoolExecutor] | None = None
        self.enqueued = 0
        self.dropped = 0
        self.skipped_bots = 0
        self.errors = 0
        self.refused_chats = 0
        # A store that cannot be written (a deleted directory, a corrupt file) fails
        # every batch: one traceback, not one per batch.
        self._log_once = LogOnce()
        self._drop_logged_at = -60.0
        reset_in_child(self._after_fork)

    def _after_fork(self) -> None:
        self._started = False
        self._restart_at = 0.0
        self._thread = None
        self._loop = None
        self._sink = None
        self._past = {}
        self._lock = threading.Lock()  # may have been held by another thread at fork time
        self._intake = deque()
        self._held = deque()
        self._settling = threading.Lock()  # may have been held by another thread at fork time
        self._parked = None
        # The parent's counts are not this process's: its events were the parent's to send.
        self.enqueued = self.dropped = self.skipped_bots = self.errors = 0
        self.refused_chats = 0

    # -- request path ---------------------------------------------------------------

    def submit(self, event: Event) -> None:
        if not self._started:
            self._start()
        intake = self._intake
        if len(intake) >= self._compact_at:  # a backed-up worker: not the usual case
            if len(intake) >= self._queue_size:
                # The newest is dropped: memory stays bounded and what was seen
                # first (the page view before its chat) is what is kept.
                self.dropped += 1
                now = time.monotonic()
                # Once, then at most once a minute: a flood of identical lines helps nobody.
                if now - self._drop_logged_at >= 60.0:
                    self._drop_logged_at = now
                    logger.warning(
                        "event queue full (%d waiting for the worker): %d event(s) dropped so far",
                        self._queue_size,
                        self.dropped,
                    )
                return
            # Bounded in bytes too: what waits keeps only what its payload will use.
            try:
                event.conversation._compact()
            except Exception as exc:  # never the request's failure
                self._log_once("compacting a queued event", exc)
        intake.append(event)
        self.enqueued += 1
        if self._parked is not None:
            self._wake()

    def hold(self, event: Event) -> HeldChat:
        """A chat request's event, queued when the app's answer starts (none if a 4xx),
        when the request ends without one, or after ANSWER_WAIT, whichever comes first."""
        if not self._started:
            self._start()
        now = time.monotonic()
        waiting = self._held
        if len(waiting) >= self._queue_size:  # not the usual case: see _HELD_MAX
            # A worker held up (a put() waiting for a locked file) settles nothing: what
            # has waited long enough is queued from here (bounded there, drops counted).
            self._settle_held(now)
            if len(waiting) >= self._held_max:
                # Only chats of the last second left: the oldest is settled now (as a
                # chat, if its answer has not come), so that the deque stays bounded.
                with self._settling, contextlib.suppress(IndexError):  # none left meanwhile
                    waiting.popleft().settle()
        held = HeldChat(self, event, now + ANSWER_WAIT)
        waiting.append(held)
        return held

    def _settle_held(self, now: float) -> None:
        """Queue the held chats that have waited long enough (all of them at shutdown),
        and forget those their answer settled."""
        held = self._held
        # One pass at a time (see _settling): the worker and a request thread (hold() at a
        # full deque) may both come here, and one's pass must not miss a chat the other
        # has out. (Taken, then looked at, as before the lock: the guard costs nothing.)
        with self._settling, contextlib.suppress(IndexError):
            while held:
                chat = held.popleft()
                if chat.waiting and chat.due > now:
                    held.appendleft(chat)  # not its time yet: back at the head
                    return
                chat.settle()

    def _wake(self) -> None:
        """Wake a parked worker (from any thread)."""
        parked, self._parked = self._parked, None
        loop = self._loop
        if parked is not None and loop is not None:
            # RuntimeError: the loop is closed, the worker is gone.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(resolve, parked)

    def initialize(self, event: Event, loop: Any = None) -> None:
        self.submit(event)

    def engage_sync(self, event: Event) -> None:
        self.submit(event)

    async def engage_async(self, event: Event) -> None:
        self.submit(event)

    def scope(self, event: Event) -> None:
        return None

    # -- worker ---------------------------------------------------------------------

    def ensure_started(self) -> None:
        """Start the worker now (at app start-up): a durable outbox is sent without waiting
        for the first event."""
        if not self._started:
            self._start()

    def _start(self) -> None:
        with self._lock:
            if self._started:
                return
            if self._restart_at:
                if time.monotonic() < self._restart_at:
                    return  # a worker stopped on an error: not yet (see _RESTART_AFTER)
            else:
                self._intake = deque()
            self._stopping = threading.Event()
            self._ready = threading.Event()
            self._asked_at = time.time()
            # Imported here, once, not by the worker: a process that exits right after its
            # first event (a one-request job) would have the worker import it while the
            # interpreter shuts down, which concurrent.futures' thread module refuses.
            from ._threads import DaemonDefaultExecutor

            self._resolver = DaemonDefaultExecutor
            thread = threading.Thread(target=self._thread_main, name=self._name, daemon=True)
            self._thread = thread
            self._started = True
            _LIVE.add(self)
            global _atexit_registered
            if not _atexit_registered:
                atexit.register(_close_all)
                _atexit_registered = True
        # Started once the lock is let go: under gevent a thread's start waits (a greenlet's
        # switch), and a lock made before the worker patched ``threading`` (at a gunicorn
        # --preload fork) is the OS's: the next request's greenlet waiting for it blocked
        # the whole worker, for good. Those that come meanwhile find the worker started and
        # queue their events for it.
        try:
            thread.start()
        except BaseException:
            with self._lock:
                if self._thread is thread:
                    self._thread = None
                    self._started = False
                    # Events queued meanwhile are kept for the next start (which replaces
                    # the intake of a worker that ended well), as a failed worker's are.
                    self._restart_at = time.monotonic()
            raise

    def _thread_main(self) -> None:
        import asyncio  # here: a WSGI app that never sends an event never loads it

        with unseen_loop():
            loop = asyncio.new_event_loop()
            try:
                loop.run_until_complete(self._main())
            except Exception:
                logger.exception(
                    "the delivery worker stopped; events wait (up to queue_size) and it "
                    "starts again in %g s",
                    _RESTART_AFTER,
                )
                with self._lock:
                    if self._thread is threading.current_thread():
                        self._use_sink(None)
                        self._loop = None
                        self._restart_at = time.monotonic() + _RESTART_AFTER
                        self._started = False
            finally:
                _close_loop(loop)

    async def _main(self) -> None:
        import asyncio

        self._loop = loop = asyncio.get_running_loop()
        # Host names are resolved in the loop's default executor: one that still works
        # while the interpreter exits, when atexit delivers what is left.
        assert self._resolver is not None
        loop.set_default_executor(self._resolver(4, "agentsight-resolver"))
        starting = self._starting
        if starting is not None:
            self._tell_starting(starting, self._asked_at)
        try:
            sink = self._sink_factory()
            await sink.start()
        except Exception:
            self._ready.set()
            if starting is not None:
                self._tell_starting(starting, None)
            raise
        self._use_sink(sink)
        if self._stopping.is_set():  # close() came before the sink was there to be told
            sink.deadline = self._stop_by
        self._ready.set()
        try:
            if starting is not None:
                # The rest of the one-time work, before the first events are taken: with
                # it done, they are written at once (see SQLiteOutbox.starting). Under
                # ASGI the lifespan's start has built the parser already.
                from ._device import backend

                try:
                    backend()
                except Exception as exc:  # tried again at the first event, as before
                    logger.debug("could not build the user-agent parser: %r", exc)
                # Those that came meanwhile (all of them: a start of seconds under load
                # may have hundreds), written before the note ends.
                backlog = len(self._intake)
                while backlog > 0 and self._intake and not sink.backed_up():
                    backlog -= await self._take()
                self._tell_starting(starting, None)
            interval = _INTAKE_INTERVAL
            held = self._held
            while not self._stopping.is_set():
                if held:
                    self._settle_held(time.monotonic())
                # Yield after every batch: the sink's sender tasks run on this same
                # loop, and a steady stream of events must not starve them.
                if sink.backed_up():
                    # Backpressure: events wait in the intake (bounded, drops counted
                    # there) rather than being built only to be refused by the sink.
                    await asyncio.sleep(_INTAKE_INTERVAL)
                    continue
                if await self._take():
                    interval = _BUSY_INTERVAL
                    await asyncio.sleep(0)
                    continue
                if interval >= _INTAKE_INTERVAL:
                    await self._park()
                    interval = _BUSY_INTERVAL
                    continue
                await asyncio.sleep(interval)
                interval = min(interval * 2, _INTAKE_INTERVAL)
            # Shutdown: the chats still waiting for their answer are chats (no refusal
            # came), then everything within one time limit, building included, so
            # that a long backlog cannot keep the worker (and the process) alive.
            self._settle_held(math.inf)
            deadline = self._stop_by
            while self._intake and time.monotonic() < deadline:
                if sink.backed_up():
                    await asyncio.sleep(_INTAKE_INTERVAL)
                    continue
                await self._take()
                await asyncio.sleep(0)
            if self._intake:
                # Counted, as the queue's overflow is: they leave ``queued`` for nowhere. One
                # by one, for a request thread's append meanwhile (clear() lost it uncounted).
                lost = 0
                intake = self._intake
                with contextlib.suppress(IndexError):
                    while intake:
                        intake.popleft()
                        lost += 1
                self.dropped += lost
                logger.warning("%d event(s) still waiting to be built at shutdown are lost", lost)
            left = await sink.drain(deadline, closing=True)
            if left:
                logger.warning(
                    "%d event(s) not delivered %s at shutdown%s",
                    left,
                    # A durable outbox is not waited for while the API fails (README,
                    # Lifecycle): the process did not spend shutdown_timeout on them.
                    f"within {self._shutdown_timeout:.1f} s"
                    if time.monotonic() >= deadline
                    # Nor are rows not due before the deadline: a retry's, or a chat's
                    # waiting outbox.SETTLE for its page view (a timeout under 1 s).
                    else "(the API was failing, or they were not due before the deadline:"
                    " not waited for)",
                    "; they stay in the outbox for the next start"
                    if sink.durable
                    else " and are lost",
                )
        finally:
            await sink.aclose()

    def _tell_starting(self, starting: Callable[[float | None], None], since: float | None) -> None:
        try:
            starting(since)
        except Exception as exc:
            # A note for the other processes, never the worker's end: what keeps the
            # file from being written (a full disk, its folder gone) is said by the puts.
            logger.debug("could not say in the outbox that this process starts: %r", exc)

    def _use_sink(self, sink: Sink | None) -> None:
        """Make ``sink`` the one stats() reads, keeping the counts of the one before: they
        were lost with it (``sent`` back to 0 at a second lifespan, ``enqueued`` not)."""
        old, past = self._sink, self._past
        if old is not None:
            past = dict(past)
            try:
                counts = old.stats()
                for key, value in counts.items():
                    if key not in _GAUGES:
                        past[key] = past.get(key, 0) + value
                if not old.durable:
                    # What it kept in memory ends with it, undelivered (logged at its
                    # shutdown): lost, as the queue's overflow is.
                    past["dropped"] = past.get("dropped", 0) + max(counts.get("pending", 0), 0)
            except Exception as exc:  # counts, never the worker's start
                logger.debug("keeping a stopped sink's counts: %r", exc)
        # Two stores: a stats() on another thread between them (at a worker's restart
        # only) may count the stopped sink's figures twice or not at all, that once.
        self._sink, self._past = sink, past

    async def _park(self) -> None:
        """Sleep until ``submit()`` (or ``close()``) wakes us, or _DOZE seconds."""
        import asyncio

        loop = asyncio.get_running_loop()
        parked: asyncio.Future[None] = loop.create_future()
        self._parked = parked
        # Published first, then looked at the intake: an event appended before this
        # look is seen here, one appended after it finds the future and wakes us.
        if self._intake or self._stopping.is_set():
            self._parked = None
            return
        doze = _DOZE
        held = self._held
        if held:  # woken when the oldest held chat has waited long enough
            doze = min(doze, max(held[0].due - time.monotonic(), 0.0))
        try:
            await park(parked, doze)
        finally:
            self._parked = None

    async def _take(self) -> int:
        """Build up to BATCH payloads and hand them to the sink; how many events were taken
        (bots and probes included: the intake was not idle)."""
        intake = self._intake
        batch: list[dict[str, Any]] = []
        taken = 0
        while intake and len(batch) < BATCH:
            event = intake.popleft()
            taken += 1
            try:
                # Parsing the user agent is the slow part: here, never on the request path.
                if is_robot_view(event, self._is_probe):
                    self.skipped_bots += 1
                    continue
                batch.append(
                    build_payload(event, source=self._source, environment=self._environment)
                )
            except Exception as exc:
                self.errors += 1
                self._log_once("building an event", exc)
        if batch:
            assert self._sink is not None
            self._holding = len(batch)
            try:
                await self._sink.put(batch)
            except Exception as exc:
                # Counted by the sink, in its ``failed``: events it could not keep.
                if self._stopping.is_set() and time.monotonic() >= self._stop_by:
                    logger.warning("%d event(s) lost at shutdown: %r", len(batch), exc)
                else:
                    # Said as what was lost and where: "HttpSink.put() failed" on a full
                    # disk told an operator neither that events were lost nor which file.
                    self._log_once(
                        f"{self._sink.storing} (those events are lost; stats()['failed']"
                        " counts them)",
                        exc,
                    )
            finally:
                self._holding = 0
        return taken

    # -- lifecycle --------------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every event so far is delivered (or stored); False on time-out."""
        if not self._started or self._thread is None:
            return not self._intake  # none sent yet, or a worker stopped with events waiting
        deadline = time.monotonic() + (self._shutdown_timeout if timeout is None else timeout)
        self._ready.wait(max(deadline - time.monotonic(), 0))
        sink, loop = self._sink, self._loop
        if sink is None or loop is None:
            return not self._intake
        while time.monotonic() < deadline:
            if not self._intake:
                import asyncio

                future = asyncio.run_coroutine_threadsafe(sink.drain(deadline), loop)
                try:
                    return future.result(max(deadline - time.monotonic(), 0) + 1) == 0
                except Exception:
                    return False
            time.sleep(0.005)
        return False

    def close(self, timeout: float | None = None) -> None:
        """Deliver what can be delivered within ``timeout`` and stop the worker."""
        if not self._started or self._thread is None:
            if self._intake:
                logger.warning(
                    "%d event(s) not delivered: the delivery worker had stopped (see its error)",
                    len(self._intake),
                )
            if self._release is not None:
                self._release()
            return
        if timeout is not None:
            self._shutdown_timeout = timeout
        self.stop()
        self._join()

    def stop(self) -> None:
        """Tell the worker to deliver what it can within the shutdown timeout and end;
        returns at once (close() waits for it)."""
        if not self._started or self._stopping.is_set():
            return
        # From now: a put() still waiting for a locked file when close() came gives up then.
        self._stop_by = time.monotonic() + self._shutdown_timeout
        self._stopping.set()
        sink = self._sink
        if sink is not None:
            sink.deadline = self._stop_by
        self._wake()

    def _join(self) -> None:
        thread = self._thread
        if thread is None:
            return
        from ._threads import wait_started

        # Not started yet (_start starts it once its lock is let go): waited for, as for its
        # end. Left as it was, the close returned before the delivery, and the worker ended
        # on the stop with _started still set: later events queued for nobody.
        if not wait_started(thread, lambda: self._thread is thread, self._stop_by + 5):
            return
        thread.join(max(self._stop_by + 5 - time.monotonic(), 0))
        if thread.is_alive():
            logger.warning(
                "the delivery worker did not finish within %.1f s at shutdown; %d event(s) "
                "still waiting in memory are lost",
                self._shutdown_timeout + 5,
                len(self._intake) + self._holding,
            )
        self._thread = None
        self._started = False

    def stats(self) -> dict[str, int]:
        stats = {
            "enqueued": self.enqueued,
            "dropped": self.dropped,
            "skipped_bots": self.skipped_bots,
            "refused_chats": self.refused_chats,
            "errors": self.errors,
            "queued": len(self._intake),
            "held": _still_waiting(self._held),
        }
        sink, past = self._sink, self._past  # as _use_sink set them
        for key, value in past.items():
            stats[key] = stats.get(key, 0) + value
        if sink is not None:
            for key, value in sink.stats().items():
                stats[key] = stats.get(key, 0) + value
        else:
            for key in self._stats_keys:
                stats.setdefault(key, 0)
            if self._idle_counts is not None:
                try:
                    stats["pending"], stats["outbox_pending"] = self._idle_counts()
                except Exception as exc:  # stats() never fails
                    logger.debug("counting the outbox: %r", exc)
        return stats
