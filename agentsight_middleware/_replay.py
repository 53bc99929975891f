"""``agentsight-middleware send``: deliver a local events file to the AgentSight API.

For events gathered before there was an API key. Run it again after any failure
or interruption: an event is marked in the file as soon as the API has accepted
it, and a marked event is never sent again. (The one window left is the API
accepting an event and the process dying before the mark: that event is sent
again by the next run, as any retried request may be.)

A conversation's events (an id's within one environment, as the report counts
them) go in the order they were recorded, one after the other (its page view
before its chat, as live delivery sends them); different conversations go in
parallel. When an event fails, the later events of its
conversation are left for the next run rather than sent out of order.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from types import FrameType
from typing import Any, TextIO

import httpx

from .__version__ import __version__
from ._credentials import Credentials
from ._log import logger
from ._retry import (
    ACCEPTED,
    ELSEWHERE,
    REJECTED,
    RETRY,
    THROTTLED,
    backoff,
    classify,
    retry_after,
)
from ._store import (
    LocalStore,
    StoreError,
    _timestamp,
    connect_readonly,
    count_unsent,
    is_locked,
    mark_sent,
    unsent,
    unsent_of,
)

__all__ = ["ReplayBusyError", "ReplaySummary", "replay"]

_BATCH = 200
_ATTEMPTS = 4
#: A 429 waits and is not an attempt, up to this many times for one event.
_THROTTLES = 10
#: Seconds without an answer other than 429 or a network error before the run gives up.
_STALLED = 60.0
#: Seconds a request may take; also the least wait before resending one that timed out.
_TIMEOUT = 15.0


class ReplayBusyError(Exception):
    """Another ``send`` is replaying the same events file."""


@dataclass
class ReplaySummary:
    sent: int = 0
    #: Already sent by an earlier run: not sent again.
    skipped: int = 0
    failed: int = 0
    #: Of ``failed``, those the API refused for good (a 400): a later run is refused again.
    refused: int = 0
    #: Not tried: after an earlier event of their conversation failed, or the run stopped.
    left: int = 0
    #: The server's words for the first refusal, to show the user.
    first_error: str | None = None
    #: Accepted by the API but not marked in the file (it could not be written): the next
    #: run sends them again.
    unmarked: int = 0
    #: Why the run stopped before the end, if it did.
    stopped: str | None = None
    interrupted: bool = False
    #: The signal that asked the run to stop (SIGINT for Ctrl-C), when ``interrupted``.
    signal_number: int = 0


class _Run:
    """What the sending threads share: whether to stop, and the API's throttle."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.reason: str | None = None
        self._lock = threading.Lock()
        self._resume_at = 0.0
        self._stalled_since: float | None = None
        self._locked_since: float | None = None

    def halt(self, reason: str) -> None:
        with self._lock:
            if self.reason is None:
                self.reason = reason
        self.stop.set()

    def throttle(self, seconds: float) -> None:
        # One 429 pauses every thread: the others would only be throttled too.
        with self._lock:
            self._resume_at = max(self._resume_at, time.monotonic() + seconds)

    def wait_turn(self) -> bool:
        """False when the run is stopping; sleeps out a throttle first."""
        while True:
            delay = self._resume_at - time.monotonic()
            if delay <= 0 or self.stop.wait(delay):
                return not self.stop.is_set()

    def answered(self) -> None:
        with self._lock:
            self._stalled_since = None

    def mark_waited(self) -> float:
        """Seconds marks have been waiting for a locked file (one clock for all senders)."""
        now = time.monotonic()
        with self._lock:
            if self._locked_since is None:
                self._locked_since = now
            return now - self._locked_since

    def marked(self) -> None:
        if self._locked_since is not None:
            with self._lock:
                self._locked_since = None

    def stalled(self, why: str) -> None:
        """No answer but a throttle or a network error: give up after ``_STALLED`` s of it."""
        now = time.monotonic()
        with self._lock:
            if self._stalled_since is None:
                self._stalled_since = now
            give_up = now - self._stalled_since > _STALLED
        if give_up:
            self.halt(f"{why} for {_STALLED:g} s: run send again later")


# What _post says about one event. REFUSED: the API said no for good (a bad payload),
# which later events of the conversation do not wait on; FAILED: it could not be
# delivered for now, and they do.
_SENT, _REFUSED, _FAILED, _NOT_TRIED = "sent", "refused", "failed", "not tried"


def _looks_like_the_api(response: httpx.Response) -> bool:
    # The API answers a JSON object carrying the conversation's numeric "id": a
    # mistyped endpoint answering 200 with a web page must not mark events sent.
    try:
        data = response.json()
    except ValueError:
        return False
    found = data.get("id") if isinstance(data, dict) else None
    return isinstance(found, int) and not isinstance(found, bool)


def _post(
    client: httpx.Client, url: str, payload: dict[str, Any] | None, run: _Run
) -> tuple[str, str | None]:
    """(outcome, error) after bounded retries of what can be retried."""
    if payload is None:
        return _REFUSED, "the events file holds this event's payload as invalid JSON"
    error: str | None = None
    attempt = throttles = 0
    while attempt < _ATTEMPTS:
        if not run.wait_turn():
            return _NOT_TRIED, None
        try:
            response = client.post(url, json=payload)
        except (ValueError, TypeError) as exc:
            # Kept by an older version (NaN in metadata): the API refuses it, and a crash
            # here would stop every run at this row.
            return _REFUSED, f"the event cannot be sent as JSON ({exc})"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
            run.stalled(f"the API could not be reached ({error})")
            if isinstance(exc, (httpx.ReadTimeout, httpx.WriteTimeout)):
                # The server may still process it: sent again at once, a later event of
                # the conversation could reach the API before it (as in live delivery).
                attempt += 1
                if attempt < _ATTEMPTS and run.stop.wait(max(backoff(attempt), _TIMEOUT)):
                    return _NOT_TRIED, None
                continue
        else:
            outcome = classify(response.status_code, response.content)
            if outcome == THROTTLED:
                run.stalled("the API kept throttling")
            elif outcome == RETRY:
                run.stalled(f"the API kept failing (HTTP {response.status_code})")
            else:
                run.answered()
            if outcome == ACCEPTED:
                if _looks_like_the_api(response):
                    return _SENT, None
                run.halt(
                    f"{url} answered {response.status_code} with something other than the "
                    "AgentSight API's answer (a JSON object with an id): check --endpoint"
                )
                return _NOT_TRIED, None
            if outcome == ELSEWHERE:
                location = response.headers.get("location")
                run.halt(
                    f"{url} answered {response.status_code}"
                    + (f" (redirecting to {location[:200]})" if location else "")
                    + ": that is not the AgentSight API's conversations endpoint; check --endpoint"
                )
                return _NOT_TRIED, None
            error = f"HTTP {response.status_code}: {response.text[:200]}"
            if response.status_code in (401, 403):
                run.halt(f"the API refused the key ({error})")
                return _NOT_TRIED, None
            if outcome == REJECTED:
                return _REFUSED, error
            if outcome == THROTTLED and throttles < _THROTTLES:
                throttles += 1
                run.throttle(retry_after(response.headers.get("retry-after"), now=time.time()))
                continue
        attempt += 1
        if attempt < _ATTEMPTS and run.stop.wait(backoff(attempt)):
            return _NOT_TRIED, None
    return _FAILED, error


@dataclass
class _Outcome:
    accepted: list[int]
    unmarked: int = 0
    failed: int = 0
    refused: int = 0
    left: int = 0
    error: str | None = None
    #: The conversation's later events must wait for the next run.
    held: bool = False


def _send_conversation(
    client: httpx.Client,
    url: str,
    rows: list[tuple[int, dict[str, Any] | None]],
    run: _Run,
    accepted: Callable[[int], bool],
) -> _Outcome:
    """One conversation's events, in order, each once the one before is done with.
    ``accepted(row_id)`` marks an event in the file the moment the API took it (False:
    it could not be, and the run stops)."""
    outcome = _Outcome(accepted=[])
    for index, (row_id, payload) in enumerate(rows):
        result, error = _post(client, url, payload, run)
        if result == _SENT:
            outcome.accepted.append(row_id)
            if not accepted(row_id):
                outcome.unmarked += 1
                outcome.left = len(rows) - index - 1
                outcome.held = True
                break
            continue
        if result in (_REFUSED, _FAILED):
            outcome.failed += 1
            outcome.error = outcome.error or error
            if result == _REFUSED:
                outcome.refused += 1
                # Refused for good: waiting would change nothing, as live delivery
                # drops such an event and goes on with the next.
                continue
            index += 1
        outcome.left = len(rows) - index
        outcome.held = True
        break
    return outcome


@contextlib.contextmanager
def _pool(workers: int) -> Iterator[ThreadPoolExecutor]:
    """The senders; waited for at the end, but not after a second Ctrl-C (stop at once)."""
    pool = ThreadPoolExecutor(workers, thread_name_prefix="agentsight-send")
    at_once = False
    try:
        yield pool
    except KeyboardInterrupt:
        at_once = True
        raise
    finally:
        pool.shutdown(wait=not at_once, cancel_futures=True)


#: What asks a run to stop gently: Ctrl-C, and what `timeout`, systemd, `docker stop` or
#: Kubernetes send (SIGTERM), or a closed terminal (SIGHUP).
_STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)


@contextlib.contextmanager
def _ctrl_c_stops(run: _Run, summary: ReplaySummary) -> Iterator[None]:
    """Ctrl-C (or SIGTERM, SIGHUP) asks the run to stop, rather than ending it wherever the
    main thread is (half-way through taking a future's lock, or between a request's answer
    and its mark in the file: killed there, the requests under way were sent again by the
    next run). A second one stops at once, as usual."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[int, Any] = {}
    for signum in _STOP_SIGNALS:
        handler = signal.getsignal(signum)
        # Ignored (a shell's "send &" ignores SIGINT; nohup SIGHUP), or a handler not set
        # from Python that could not be put back: leave it as it is.
        if handler is not signal.SIG_IGN and handler is not None:
            previous[signum] = handler

    def stop(signum: int, frame: FrameType | None) -> None:
        if summary.interrupted:
            for number, handler in previous.items():
                signal.signal(number, handler)
            raise KeyboardInterrupt
        summary.interrupted = True
        summary.signal_number = signum
        run.halt("interrupted")

    for signum in previous:
        signal.signal(signum, stop)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


#: Tries at a lock file that a run ending meanwhile removed (see _take_lock): each such
#: try means another run took the file's lock and let it go in between, so a few suffice.
_LOCK_TRIES = 10


@contextlib.contextmanager
def _only_sender(path: str | os.PathLike[str]) -> Iterator[None]:
    """Holds the file's send locks so that two runs (cron and a person) never send twice.
    Their files are removed at the end (see _take_lock)."""
    try:
        import fcntl  # noqa: F401  (only where there is one: not on Windows)
    except ImportError:  # not on Windows: runs there must not overlap
        yield
        return
    real = os.path.realpath(os.fspath(path))
    busy = f"another `send` is replaying {os.fspath(path)}: wait for it to finish"
    with contextlib.ExitStack() as held:
        # ``<file>.send-lock`` beside the file: a second run by another path to it (a
        # symlink) finds the same one. And one named after the file's device and inode in
        # this user's own folder of the temporary folder: a run on the file moved or
        # hard-linked elsewhere meanwhile finds that one (180 of 400 events went twice).
        # Never the database file itself: closing any handle on it drops SQLite's locks.
        beside_error: list[OSError] = []

        def beside() -> tuple[str, TextIO] | None:
            where = real + ".send-lock"
            try:
                return where, open(where, "a")
            except OSError as exc:  # a folder that takes no new file
                beside_error.append(exc)
                return None

        locked = _take_lock(held, beside, busy)
        locked = _take_lock(held, lambda: _inode_lock(real), busy) or locked
        if not locked:
            raise (beside_error or [OSError(f"no lock could be taken for {real}")])[0]
        yield


def _take_lock(
    held: contextlib.ExitStack, opener: Callable[[], tuple[str, TextIO] | None], busy: str
) -> bool:
    """Lock the file ``opener`` opens (False when it opens none) until ``held`` closes,
    and remove it then, still locked: a file left behind by every run (a ``.send-lock``
    beside the events file) is clutter. Removed, the file another run opened meanwhile may
    be gone from its name by the time that run locks it, and a third run would lock a new
    one at the name beside it: so a lock counts only while its file is still the one at
    its name, and is taken again otherwise."""
    import fcntl

    for _ in range(_LOCK_TRIES):
        opened = opener()
        if opened is None:
            return False
        where, handle = opened
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise ReplayBusyError(busy) from None
        if _still_at(handle, where):
            held.enter_context(handle)  # closed (unlocked) after its removal below
            held.callback(_remove_if_still_at, handle, where)
            return True
        handle.close()  # removed by a run that ended meanwhile: the one at its name now
    raise ReplayBusyError(busy)


def _still_at(handle: TextIO, where: str) -> bool:
    try:
        at = os.stat(where)
    except OSError:
        return False
    mine = os.fstat(handle.fileno())
    return (at.st_dev, at.st_ino) == (mine.st_dev, mine.st_ino)


def _remove_if_still_at(handle: TextIO, where: str) -> None:
    # Only this run's own file: one a person deleted meanwhile may have been made again
    # by another run, whose lock it now is.
    with contextlib.suppress(OSError):
        if _still_at(handle, where):
            os.unlink(where)


def _inode_lock(real: str) -> tuple[str, TextIO] | None:
    """The lock named after the file's device and inode, in a folder of this user's own in
    the temporary folder (made 0700; a shared /tmp must not let another user put a FIFO
    or a symlink where the lock goes), opened without following links or blocking. None,
    with a warning, where that cannot be had safely: the lock beside the file still holds
    for every run by any path to the file, only not for the file moved meanwhile."""
    import stat

    try:
        info = os.stat(real)
        folder = os.path.join(tempfile.gettempdir(), f"agentsight-send-{os.getuid()}")
        with contextlib.suppress(FileExistsError):
            os.mkdir(folder, 0o700)
        owned = os.lstat(folder)
        if not stat.S_ISDIR(owned.st_mode) or owned.st_uid != os.getuid() or owned.st_mode & 0o077:
            raise OSError(f"{folder} is not a folder of this user's alone")
        where = os.path.join(folder, f"{info.st_dev}-{info.st_ino}.lock")
        fd = os.open(
            where,
            os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
            0o600,
        )
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError("the lock is not a plain file")
        return where, os.fdopen(fd, "a")
    except OSError as exc:
        logger.warning(
            "send: no lock by file identity (%s); a second run on this file moved elsewhere "
            "meanwhile would not be refused",
            exc,
        )
        return None


def _counts(path: str | os.PathLike[str]) -> tuple[int, int]:
    conn = connect_readonly(path)
    try:
        total, done = conn.execute("SELECT count(*), count(sent_at) FROM events").fetchone()
    finally:
        conn.close()
    return int(total), int(done)


def replay(
    path: str | os.PathLike[str],
    credentials: Credentials,
    *,
    concurrency: int = 8,
    progress: TextIO | None = None,
    transport: httpx.BaseTransport | None = None,
) -> ReplaySummary:
    """Send every not-yet-sent event of ``path``; ``progress`` gets a bar when it is a terminal.

    Ctrl-C stops it: requests under way finish and are recorded, and the summary
    says ``interrupted``. (Only when called in the main thread: that is where Python
    delivers the signal.)
    """
    from .sinks.http import environment_proxy

    total, done = _counts(path)
    summary = ReplaySummary(skipped=done)
    show: Callable[[int], None] = _progress_bar(progress, total - done)
    url = credentials.conversations_url
    headers = {
        "Authorization": f"Api-Key {credentials.api_key}",
        "User-Agent": f"agentsight-middleware/{__version__}",
    }
    run = _Run()
    # The proxy the environment names, as live delivery uses it (sinks/http.py).
    proxy = None if transport is not None else environment_proxy(url)
    # A short busy timeout for the marks: _mark waits out a lock itself, within one
    # deadline for the run, and each sender holds the store while SQLite waits.
    store = LocalStore(path, follow_path=False, busy_timeout=0.5)
    with (
        _only_sender(path),
        _closed_unless_stopped_at_once(store),
        httpx.Client(
            headers=headers, timeout=_TIMEOUT, transport=transport, proxy=proxy, trust_env=False
        ) as client,
        _pool(concurrency) as pool,
    ):
        # Conversations with an event not sent in this run: their later events wait.
        held: set[Any] = set()
        # Rows of later batches already taken with their conversation (see below), and
        # those of them marked sent.
        taken: set[int] = set()
        taken_marked: set[int] = set()
        after = 0

        def accepted(row_id: int) -> bool:
            # At once, not at the end of the conversation: a run killed or interrupted
            # must not leave accepted events unmarked, to be sent again.
            marked = _mark(store, row_id, run)
            if marked and row_id in taken:
                taken_marked.add(row_id)
            return marked

        def record(future: Future[_Outcome], conversation: Any) -> None:
            outcome = future.result()
            summary.sent += len(outcome.accepted)
            summary.unmarked += outcome.unmarked
            summary.failed += outcome.failed
            summary.refused += outcome.refused
            summary.left += outcome.left
            if outcome.error and summary.first_error is None:
                summary.first_error = outcome.error
            if outcome.held:
                held.add(conversation)

        if total > done:
            _check_writable(store)
        with _ctrl_c_stops(run, summary):
            while not run.stop.is_set() and (batch := _next_batch(store, after, run)):
                after = batch[-1][0]
                conversations: dict[Any, list[tuple[int, dict[str, Any] | None]]] = {}
                for row_id, payload in batch:
                    if row_id in taken:
                        continue
                    conversation = _conversation_key(row_id, payload)
                    if conversation in held:
                        summary.left += 1
                    else:
                        conversations.setdefault(conversation, []).append((row_id, payload))
                # Each conversation whole: with several processes writing the file, one
                # may store its page view after another stored the chat, even batches later.
                for row_id, payload in _rest_of(store, conversations, after, run):
                    conversation = _conversation_key(row_id, payload)
                    if conversation in conversations:
                        conversations[conversation].append((row_id, payload))
                        taken.add(row_id)
                for rows in conversations.values():
                    rows.sort(key=_happened)  # in the order they happened
                pending = {
                    pool.submit(_send_conversation, client, url, rows, run, accepted): conversation
                    for conversation, rows in conversations.items()
                }
                # Once stopped, what has not started returns at once, untried.
                while pending:
                    finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in finished:
                        record(future, pending.pop(future))
                    show(summary.sent + summary.failed)
        summary.stopped = run.reason
        if run.stop.is_set():
            # Stopped early: what the loop did not reach is left too.
            with contextlib.suppress(sqlite3.DatabaseError, StoreError):
                # (Less the rows taken ahead with their conversation: counted there.)
                # Those above ``after`` only: the ones below it are not in the count.
                summary.left += count_unsent(store, after) - len(
                    {row for row in taken - taken_marked if row > after}
                )
    show(-1)
    return summary


class _RolledBack(Exception):
    pass


def _check_writable(store: LocalStore) -> None:
    """Raise StoreError when the file can be read but not written (another user's, an
    immutable or read-only one): every event sent could not be marked, and each run sent
    the same first ones again (8 a run, for ever) and never the others. A file locked by
    another process is not refused here: the marks wait for it (see _mark)."""
    try:
        with store._transaction() as conn:
            # A write that changes nothing, rolled back: SQLite refuses it as a write.
            conn.execute(
                "UPDATE events SET sent_at = sent_at WHERE id = (SELECT min(id) FROM events)"
            )
            raise _RolledBack
    except _RolledBack:
        return
    except (sqlite3.DatabaseError, StoreError, OSError) as exc:
        # Locked: the marks wait for it. A file that cannot be opened at all: said by the
        # run's first read, as before. Only a file opened for reading alone is refused here.
        if "readonly" not in str(exc).lower():
            return
        raise StoreError(
            f"{os.path.abspath(store.path)} cannot be written ({exc}): send marks each event "
            "it sends in the file; run it as a user who can write the file and its folder"
        ) from exc


def _rest_of(
    store: LocalStore,
    conversations: dict[Any, list[tuple[int, dict[str, Any] | None]]],
    after: int,
    run: _Run,
) -> list[tuple[int, dict[str, Any] | None]]:
    ids = list({key[0] for key in conversations if type(key) is tuple})
    return _read(run, lambda: unsent_of(store, ids, after)) if ids else []


def _conversation_key(row_id: int, payload: dict[str, Any] | None) -> tuple[str, str | None] | int:
    """What a row's order is kept within: a conversation id in one environment, as the
    report counts a conversation (a development event of an id never waits for a failed
    production one). A damaged row (an id that is a list, say) goes alone, by its row."""
    found = None if payload is None else payload.get("conversation_id")
    if payload is None or not isinstance(found, str):
        return row_id
    environment = payload.get("environment")
    return found, environment if isinstance(environment, str) else None


def _next_batch(
    store: LocalStore, after: int, run: _Run
) -> list[tuple[int, dict[str, Any] | None]]:
    return _read(run, lambda: unsent(store, _BATCH, after))


def _read(
    run: _Run, read: Callable[[], list[tuple[int, dict[str, Any] | None]]]
) -> list[tuple[int, dict[str, Any] | None]]:
    """``read()``, or nothing and the run stopped when the file cannot be used."""
    try:
        return read()
    except (sqlite3.DatabaseError, StoreError) as exc:
        run.halt(f"the events file could not be used ({exc})")
        return []


@contextlib.contextmanager
def _closed_unless_stopped_at_once(store: LocalStore) -> Iterator[None]:
    """Close the store at the end, but not after a second Ctrl-C: a sender may be waiting
    in it for a locked file, and the process is about to exit anyway."""
    try:
        yield
    except KeyboardInterrupt:
        raise
    except BaseException:
        store.close()
        raise
    store.close()


def _happened(row: tuple[int, dict[str, Any] | None]) -> float:
    """When an event happened, as the store reads its timestamp (``Z`` or any offset: as
    text, "20:26:40Z" sorts after "20:26:40.3+00:00"); one that cannot be read goes last."""
    try:
        return _timestamp(None if row[1] is None else row[1].get("timestamp"))
    except ValueError:
        return math.inf


#: Seconds a mark may wait for a file another process holds locked (a backup, a VACUUM).
_MARK_PATIENCE = 60.0


def _mark(store: LocalStore, row_id: int, run: _Run) -> bool:
    """Mark one accepted event sent, waiting out a lock (``_MARK_PATIENCE`` for the whole
    run, not per event, and not once the run is stopping); False, and the run stopped,
    when the file cannot be written: the event would otherwise be sent again."""
    while True:
        try:
            mark_sent(store, [row_id])
            run.marked()
            return True
        except (sqlite3.DatabaseError, StoreError) as exc:
            locked = is_locked(exc)
            if locked and not run.stop.is_set() and run.mark_waited() < _MARK_PATIENCE:
                run.stop.wait(0.2)
                continue
            run.halt(
                "the events file stayed locked by another process"
                if locked
                else f"the events file could not be written ({exc})"
            )
            return False


def _progress_bar(stream: TextIO | None, total: int) -> Callable[[int], None]:
    if stream is None or not stream.isatty() or total == 0:
        return lambda n: None
    width = 30

    def show(n: int) -> None:
        if n < 0:
            stream.write("\n")
        else:
            filled = width * n // total
            stream.write(f"\rsending {n}/{total} [{'=' * filled}{' ' * (width - filled)}]")
        stream.flush()

    return show
