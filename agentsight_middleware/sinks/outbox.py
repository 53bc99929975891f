"""Events waiting to be accepted by the AgentSight API: in memory, or on disk.

Both keep the order of each conversation: only the oldest waiting event of a
conversation can be claimed, and not while an earlier one is in flight or
waiting for a retry, so the ``is_used: false`` record always reaches the API
before the ``is_used: true`` one of the same id.
"""

from __future__ import annotations

import math
import os
import secrets
import socket
import sqlite3
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .._fork import reset_in_child
from .._log import logger
from .._store import (
    _INHERITED,
    WAL_SIZE_LIMIT,
    _fds_of,
    _identity,
    _PathInUse,
    create_private,
    is_locked,
    lock_slice,
    lock_wait_until,
    moved_file_holds,
    retry_locked,
    write_transaction,
)

__all__ = [
    "SETTLE",
    "STARTING_MOST",
    "STEPPED_BACK",
    "MemoryOutbox",
    "Outbox",
    "OutboxItem",
    "SQLiteOutbox",
]

# No wait this package sets is longer than ~60 s (backoff's cap; Retry-After, pauses and a
# request's time-out are shorter): a row due further ahead than this was timed by a wall
# clock that has since been stepped back (NTP at boot, a VM resumed), and is due now. Else
# a retry, or a chat settling, waited out the whole step, an hour for an hour.
STEPPED_BACK = 120.0


@dataclass(slots=True)
class OutboxItem:
    id: int
    conversation_id: str
    body: bytes
    attempts: int = 0
    not_before: float = 0.0
    leased: bool = False
    #: When its lease was taken or last renewed (time.time()).
    leased_at: float = 0.0


class Outbox(Protocol):
    durable: bool
    #: Seconds a claim holds a row against other claimers, or None (no expiry).
    lease: float | None
    #: Monotonic time past which a wait for another process's lock gives up (shutdown's).
    deadline: float

    def put(
        self,
        items: list[tuple[str, bytes]],
        wait: float | None = None,
        views: Sequence[bool] = (),
        times: Sequence[float] = (),
    ) -> int: ...
    def claim(self, limit: int, now: float) -> list[OutboxItem]: ...
    def ack(self, items: list[OutboxItem]) -> None: ...
    def retry(self, item: OutboxItem, not_before: float) -> None: ...
    def defer(self, item: OutboxItem, not_before: float) -> None: ...
    def release(self, item: OutboxItem) -> None: ...
    def renew(self, items: list[OutboxItem], now: float) -> None: ...
    def discard(self, item: OutboxItem) -> None: ...
    def depth(self) -> int: ...
    def counts(self) -> tuple[int, int]: ...
    def depth_upto(self, limit: int) -> int: ...
    def mine(self, before: float) -> tuple[int, int]: ...
    def close(self, unanswered: Sequence[OutboxItem] = (), not_before: float = 0.0) -> None: ...


class MemoryOutbox:
    """Bounded: past ``max_items`` the newest events are refused (and counted by the caller).

    Events wait in one queue per conversation: a claim looks at the head of each
    conversation only, so many events of one conversation cost nothing extra.
    """

    durable = False
    lease: float | None = None  # a claim holds until it is acknowledged or given back
    deadline = math.inf  # never waits

    def __init__(self, max_items: int) -> None:
        self._max = max_items
        self._queues: dict[str, deque[OutboxItem]] = {}
        # The conversations whose head is not in flight, in the order they became so: a
        # claim steps over none of the heads in flight (one per request written, up to
        # senders x pipeline), which a scan of every queue did on each claim, new events
        # queued behind them. An OrderedDict: a dict's deleted entries at the front would
        # be stepped over by each iteration instead.
        self._free: OrderedDict[str, None] = OrderedDict()
        self._size = 0
        self._next_id = 0

    def put(
        self,
        items: list[tuple[str, bytes]],
        wait: float | None = None,
        views: Sequence[bool] = (),
        times: Sequence[float] = (),
    ) -> int:
        # ``views`` and ``times`` are not needed here: one process's intake is already in
        # request order.
        room = max(self._max - self._size, 0)
        queues = self._queues
        for conversation_id, body in items[:room]:
            self._next_id += 1
            queue = queues.get(conversation_id)
            if queue is None:
                queue = queues[conversation_id] = deque()
                self._free[conversation_id] = None
            queue.append(OutboxItem(self._next_id, conversation_id, body))
        accepted = min(room, len(items))
        self._size += accepted
        return accepted

    def claim(self, limit: int, now: float) -> list[OutboxItem]:
        picked: list[OutboxItem] = []
        queues = self._queues
        for conversation_id in self._free:
            head = queues[conversation_id][0]
            # A head waiting for its retry blocks its conversation (one in flight is not here).
            if now < head.not_before <= now + STEPPED_BACK:
                continue
            head.leased = True
            picked.append(head)
            if len(picked) >= limit:
                break
        free = self._free
        for item in picked:
            del free[item.conversation_id]
        return picked

    def _given_back(self, item: OutboxItem) -> None:
        """``item``, claimed, is no longer in flight: its conversation may be claimed again."""
        item.leased = False
        queue = self._queues.get(item.conversation_id)
        if queue and queue[0] is item:
            self._free[item.conversation_id] = None

    def ack(self, items: list[OutboxItem]) -> None:
        queues, free = self._queues, self._free
        for item in items:
            conversation_id = item.conversation_id
            queue = queues.get(conversation_id)
            if queue and queue[0] is item:
                queue.popleft()
                self._size -= 1
                if queue:
                    free[conversation_id] = None  # its next event may go
                else:
                    del queues[conversation_id]
                    free.pop(conversation_id, None)

    def retry(self, item: OutboxItem, not_before: float) -> None:
        item.attempts += 1
        item.not_before = not_before
        self._given_back(item)

    def defer(self, item: OutboxItem, not_before: float) -> None:
        """Give a claimed item back for later without counting an attempt (a 429)."""
        item.not_before = not_before
        self._given_back(item)

    def release(self, item: OutboxItem) -> None:
        """Give a claimed item back as it was: not an attempt, claimable at once."""
        self._given_back(item)

    def renew(self, items: list[OutboxItem], now: float) -> None:
        pass

    def discard(self, item: OutboxItem) -> None:
        self.ack([item])

    def depth(self) -> int:
        return self._size

    def counts(self) -> tuple[int, int]:
        """Events this process put that wait for the API, and all events waiting: the
        same, in memory."""
        return self._size, self._size

    def depth_upto(self, limit: int) -> int:
        return min(self._size, limit)

    def mine(self, before: float) -> tuple[int, int]:
        """Events waiting (all this process's), and how many of them a claim could take
        before ``before`` (time.time()): not claimed already, not waiting past it for a
        retry, and not behind such an event of their conversation."""
        queues, stepped_back = self._queues, time.time() + STEPPED_BACK
        due = sum(
            1 for cid in self._free if not before <= queues[cid][0].not_before <= stepped_back
        )
        return self._size, due

    def close(self, unanswered: Sequence[OutboxItem] = (), not_before: float = 0.0) -> None:
        pass


# How long a write waits for another process's write lock before it fails "locked" (in
# tries of LOCK_SLICE, so that shutdown's deadline, set meanwhile, ends the wait).
_BUSY_TIMEOUT = 10.0
# How long depth() and counts() wait for the worker's use of the connection before they
# answer with the last counts.
_DEPTH_WAIT = 0.05

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id TEXT NOT NULL,
    body BLOB NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    not_before REAL NOT NULL DEFAULT 0,
    lease_until REAL NOT NULL DEFAULT 0,
    lease_owner TEXT,
    origin TEXT,
    kind INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS starting (owner TEXT PRIMARY KEY, since REAL NOT NULL) WITHOUT ROWID;
"""

# The first row of each conversation, free to take: its page view (kind 0) if one is
# in the file, else its oldest row. A leased or delayed head row blocks the rows behind
# it, which keeps each conversation in order even when several processes share the
# file. Rows are not in request order across processes: the page view a worker saw
# may reach the file after the chat another worker saw a few ms later (each worker
# writes within ~20 ms), so the view goes first by kind, not by id, and a chat row waits
# SETTLE seconds for such a view to arrive. A worker that has just started writes its
# first events only after its one-time work (the HTTP client's import, the user-agent
# parser's build: 0.6-2.6 s on a busy 2-core machine, past SETTLE for a start in ten
# under gunicorn with workers restarted): it says so in the table ``starting`` until
# they are written, and the chats requested since its start began (not_before from
# :hold_from) wait for that too. A view later than that (a worker stalled a second once
# started, or starting for more than STARTING_MOST) finds its chat claimed already and
# goes beside it, as before this order: no leased row blocks one of a lower kind.
_CLAIM = """
SELECT id, conversation_id, body, attempts FROM outbox AS o
WHERE lease_until <= :now AND (not_before <= :now OR not_before > :now + :stepped_back)
  AND (kind = 0 OR not_before < :hold_from)
  AND NOT EXISTS (
      SELECT 1 FROM outbox AS p
      WHERE p.conversation_id = o.conversation_id AND p.kind = o.kind AND p.id < o.id
  )
  AND NOT EXISTS (
      SELECT 1 FROM outbox AS p WHERE p.conversation_id = o.conversation_id AND p.kind < o.kind
  )
ORDER BY id LIMIT :limit
"""
# How long a chat row waits before it may be claimed, for its conversation's page view
# to be written by the worker that served it (see _CLAIM).
SETTLE = 1.0
# A start said in ``starting`` holds chats no longer than this after it began: a worker
# stalled that long at its start, or killed then on another host (one of this host that
# no longer runs is forgotten at once), is not waited for.
STARTING_MOST = 10.0
# How long the worker's start waits for another process's write lock to say it starts:
# the note is not worth holding the start for.
_STARTING_WAIT = 0.5


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, but not ours to signal
    return True


def _host() -> str:
    """This host as a lease owner names it: its name and, where it can be told, the PID
    namespace of this process. Processes of two containers sharing the file and a host
    name (a Kubernetes pod's containers, ``docker --network host``) number their processes
    each in its own namespace: a pid of the other's, looked up in this one, names no
    process (or another one), and its live claims were freed and sent a second time."""
    host = socket.gethostname()
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:  # not Linux, or no /proc: the host name alone, as before
        return host
    return f"{host}/pidns{namespace}"


def _gone(owner: object, host: str) -> bool:
    """Whether ``owner`` (a lease owner's name) is a process of ``host`` that no longer
    exists (never this one)."""
    # Owners are "host:pid:random"; the host itself may contain ":" (never the pid).
    owner_host, _, rest = str(owner).rpartition(":")[0].rpartition(":")
    if owner_host != host or not rest.isdigit():
        return False
    pid = int(rest)
    return pid != os.getpid() and not _pid_alive(pid)


def _release_dead_leases(conn: sqlite3.Connection) -> None:
    """Free the rows held by processes of this host (and PID namespace) that no longer exist.

    A process killed mid-send (SIGKILL, OOM) leaves its rows leased; without
    this, a restart would wait out the lease before sending them.
    """
    host = _host()
    owners = conn.execute(
        "SELECT DISTINCT lease_owner FROM outbox WHERE lease_owner IS NOT NULL"
    ).fetchall()
    for (owner,) in owners:
        if _gone(owner, host):
            conn.execute(
                "UPDATE outbox SET lease_until = 0, lease_owner = NULL WHERE lease_owner = ?",
                (owner,),
            )
    # And their starts (see SQLiteOutbox.starting), with any start too old to wait for.
    for (owner,) in conn.execute("SELECT owner FROM starting").fetchall():
        if _gone(owner, host):
            conn.execute("DELETE FROM starting WHERE owner = ?", (owner,))
    conn.execute("DELETE FROM starting WHERE since < ?", (time.time() - STARTING_MOST,))


def _hold_from(conn: sqlite3.Connection, now: float, host: str) -> float:
    """The earliest start said in ``starting`` that chats still wait for (see _CLAIM), or
    inf; forgets the starts of this host's processes that no longer run (killed while
    starting: gunicorn starts another at once)."""
    since = math.inf
    rows = conn.execute(
        "SELECT owner, since FROM starting WHERE since > ? AND since < ?",
        # Nor one ahead of the clock by more than that: written before a step back.
        (now - STARTING_MOST, now + STARTING_MOST),
    ).fetchall()
    for owner, began in rows:
        if _gone(owner, host):
            conn.execute("DELETE FROM starting WHERE owner = ?", (owner,))
        else:
            since = min(since, float(began))
    return since


class SQLiteOutbox:
    """Every event on disk (SQLite, WAL) until the API has accepted it.

    Several processes may share one file: a claimed row carries a lease with
    the claimer's name, so no two processes send the same row, and a process
    killed mid-send only delays its rows until the lease runs out.
    """

    durable = True

    def __init__(self, path: str | os.PathLike[str], *, lease: float = 60.0) -> None:
        self.path = Path(path)
        self.lease: float | None = lease
        self._lease = lease
        #: Monotonic time past which a wait for another process's lock gives up: set at
        #: shutdown, from another thread, while a write may be waiting.
        self.deadline = math.inf
        self._owner = f"{_host()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._host = _host()
        # The owner this process's start is said under (see starting), while it is.
        self._starting: str | None = None
        # Its end, said by the worker, but not written yet (the file was locked): the
        # next claim writes it, or every chat requested since waits STARTING_MOST.
        self._start_over = False
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        # The last counts (see counts).
        self._counts = (0, 0)
        try:
            self._connect()  # at construction: a path that cannot be opened fails at start-up
        except sqlite3.OperationalError as exc:
            if not is_locked(exc):
                raise
            # A file that opens but is busy (another process's long write, while this one
            # adds a column to a file from an older version): connected at the first use.
        reset_in_child(self._after_fork)

    def _after_fork(self) -> None:
        # The lock may have been copied while held by the parent's worker, which
        # does not exist here; the parent's connection is kept referenced, never used
        # (closing it here could undo the parent's locks: SQLite's advice after fork).
        self._lock = threading.Lock()
        if self._conn is not None:
            _INHERITED.append(self._conn)
            self._conn = None
        self._starting = None  # the parent's to take back
        self._start_over = False
        self._counts = (0, self._counts[1])  # this process has put nothing yet

    def _until(self, wait: float | None = None) -> Callable[[], float]:
        return lock_wait_until(self, _BUSY_TIMEOUT, wait)

    def _connect(self) -> sqlite3.Connection:
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        # After fork the parent's connection must not be used: open our own.
        path = os.fspath(self.path)
        # An outbox deleted or moved without its -wal and -shm while other processes
        # still use them: a new file here would share them ("disk I/O error" at a
        # worker's start, which made gunicorn stop the whole app). Taken as a lock: the
        # middleware starts, and its writes wait (retried, then counted) until they stop.
        if moved_file_holds(path, lambda: _fds_of(_identity(path + "-shm"))[0] is not None):
            raise _PathInUse(
                f"the outbox {os.path.abspath(path)} is locked: it was moved or deleted"
                " without its -wal and -shm files, which processes still use for it; a new"
                " file is started there once they stop (stop the app before moving or"
                " deleting the outbox, or move all three)"
            )
        create_private(self.path)
        conn = sqlite3.connect(
            self.path, timeout=lock_slice(), isolation_level=None, check_same_thread=False
        )
        try:
            # Each step may be done already (by another process too): all tried again.
            retry_locked(lambda: self._prepare(conn), self._until())
        except BaseException:
            # A connection without the origin column (its write lock held past the busy
            # timeout) must not be kept: every later put would fail on it.
            conn.close()
            raise
        self._conn = conn
        self._pid = os.getpid()
        self._owner = f"{_host()}:{os.getpid()}:{secrets.token_hex(4)}"
        return conn

    @staticmethod
    def _prepare(conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode survives a killed process (the OS holds the writes);
        # only a power cut can lose the last commits, and that is not worth an fsync each.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")  # see _store
        conn.executescript(_SCHEMA)
        # A file from before the columns (its rows' origin stays unknown: NULL; their
        # kind 1: in the order they were written, as before).
        columns = {row[1] for row in conn.execute("PRAGMA table_info(outbox)")}
        for column, declaration in (("origin", "TEXT"), ("kind", "INTEGER NOT NULL DEFAULT 1")):
            if column in columns:
                continue
            try:
                conn.execute(f"ALTER TABLE outbox ADD COLUMN {column} {declaration}")
            except sqlite3.OperationalError as exc:
                # Another process added it meanwhile: fine.
                if "duplicate column" not in str(exc).lower():
                    raise
        # After the columns (a file from before them has no kind): _CLAIM's look-ups, each
        # one index search (with (conversation_id, id) alone, every row of the conversation
        # is read for its kind: a claim took minutes with 50,000 chats ahead of 50,000 views).
        conn.execute(
            "CREATE INDEX IF NOT EXISTS outbox_conversation_kind "
            "ON outbox (conversation_id, kind, id)"
        )
        # The index of the builds before kind (no release had it): no query uses it, and
        # every put paid for it (~1-2 us a row of the worker's ~6-8).
        conn.execute("DROP INDEX IF EXISTS outbox_conversation")
        _release_dead_leases(conn)

    def put(
        self,
        items: list[tuple[str, bytes]],
        wait: float | None = None,
        views: Sequence[bool] = (),
        times: Sequence[float] = (),
    ) -> int:
        """Append ``items``; waits for another process's write lock up to the busy timeout,
        or ``wait`` seconds if that is less (raising ``sqlite3.OperationalError`` then).

        ``views``, one flag per item when given, marks page views: they go first in their
        conversation, and the other items wait for one until SETTLE seconds after their
        request (``times``, time.time() of each item's request, when given), at most SETTLE
        seconds from now (see _CLAIM)."""
        with self._lock:
            # Connected first: a connection opened here (after a fork, after close())
            # takes a new owner, and the rows must carry the one mine() and counts() ask
            # for; marked with the one before, flush() and shutdown did not wait for them.
            conn = self._connect()
            owner = self._owner
            if views:
                settle = time.time() + SETTLE
                # From the request, not from now: the view it waits for was written within
                # ~0.3 s of its own request, which came first. A chat written late (held
                # for its answer up to ANSWER_WAIT, _delivery) waited that second twice:
                # 2 s from request to API, and left in the file at a shutdown_timeout under
                # 1 s however long ago it came in.
                starts = times or [math.inf] * len(items)
                rows = [
                    (
                        conversation_id, body, owner, 0 if view else 1,
                        0.0 if view else min(settle, start + SETTLE),
                    )
                    for (conversation_id, body), view, start in zip(
                        items, views, starts, strict=True
                    )
                ]  # fmt: skip
            else:
                rows = [(conversation_id, body, owner, 1, 0.0) for conversation_id, body in items]
            with write_transaction(conn, self._until(wait)):
                conn.executemany(
                    "INSERT INTO outbox (conversation_id, body, origin, kind, not_before) "
                    "VALUES (?, ?, ?, ?, ?)",
                    rows,
                )
        return len(items)

    def starting(self, since: float | None) -> None:
        """Say in the file that this process starts, since ``since`` (time.time()), or
        (None) that it has started.

        A chat row waits SETTLE from its request for its page view (see _CLAIM), which
        a worker that has just started writes only after its one-time work. While said,
        the chats requested since ``since`` (whichever process wrote them) wait for its
        end too, STARTING_MOST at most. Said by the worker's thread before that work and
        ended once its first events are written. Best effort: with the file locked by
        another process past a short wait, nothing is said (an end, at the next claim)."""
        try:
            with self._lock:
                if since is None and self._starting is None:
                    return
                if since is None:
                    self._start_over = True
                conn = self._connect()
                owner = self._owner if since is not None else self._starting
                with write_transaction(conn, self._until(_STARTING_WAIT)):
                    if since is not None:
                        conn.execute(
                            "INSERT OR REPLACE INTO starting (owner, since) VALUES (?, ?)",
                            (owner, since),
                        )
                    else:
                        conn.execute("DELETE FROM starting WHERE owner = ?", (owner,))
                self._starting = owner if since is not None else None
                self._start_over = False
        except sqlite3.OperationalError as exc:
            if not is_locked(exc):
                raise
            logger.debug("could not say in the outbox that this process starts: %r", exc)

    def claim(self, limit: int, now: float) -> list[OutboxItem]:
        with self._lock:
            conn = self._connect()
            ending = self._start_over
            with write_transaction(conn, self._until()):
                if ending:
                    self._end_start(conn)
                # Chats requested since the start began: the view of a chat requested
                # before it came to the process, or to the one before it, not to this one.
                hold_from = _hold_from(conn, now, self._host) + SETTLE
                rows = conn.execute(
                    _CLAIM,
                    {
                        "now": now,
                        "limit": limit,
                        "stepped_back": STEPPED_BACK,
                        "hold_from": hold_from,
                    },
                ).fetchall()
                conn.executemany(
                    "UPDATE outbox SET lease_until = ?, lease_owner = ? WHERE id = ?",
                    [(now + self._lease, self._owner, row[0]) for row in rows],
                )
            if ending:
                self._starting, self._start_over = None, False
        return [
            OutboxItem(row[0], row[1], row[2], row[3], leased=True, leased_at=now) for row in rows
        ]

    def _end_start(self, conn: sqlite3.Connection) -> None:
        """Take this process's start out of the file, in the caller's transaction: said
        done once it commits."""
        conn.execute("DELETE FROM starting WHERE owner = ?", (self._starting,))

    def _for_each(self, sql: str, rows: list[tuple[object, ...]]) -> None:
        """``sql`` once per row, all in one transaction: in autocommit mode each statement
        would be its own."""
        if not rows:
            return
        with self._lock:
            conn = self._connect()
            with write_transaction(conn, self._until()):
                conn.executemany(sql, rows)

    def ack(self, items: list[OutboxItem]) -> None:
        self._for_each(
            "DELETE FROM outbox WHERE id = ? AND lease_owner = ?",
            [(item.id, self._owner) for item in items],
        )

    def retry(self, item: OutboxItem, not_before: float) -> None:
        self._for_each(
            "UPDATE outbox SET attempts = attempts + 1, not_before = ?, lease_until = 0, "
            "lease_owner = NULL WHERE id = ? AND lease_owner = ?",
            [(not_before, item.id, self._owner)],
        )

    def defer(self, item: OutboxItem, not_before: float) -> None:
        """Give a claimed row back for later without counting an attempt (a 429)."""
        self._for_each(
            "UPDATE outbox SET not_before = ?, lease_until = 0, lease_owner = NULL "
            "WHERE id = ? AND lease_owner = ?",
            [(not_before, item.id, self._owner)],
        )

    def release(self, item: OutboxItem) -> None:
        """Give a claimed row back as it was: not an attempt, claimable at once (by any
        process sharing the file)."""
        self._for_each(
            "UPDATE outbox SET lease_until = 0, lease_owner = NULL "
            "WHERE id = ? AND lease_owner = ?",
            [(item.id, self._owner)],
        )

    def renew(self, items: list[OutboxItem], now: float) -> None:
        """Extend the leases of rows this process is still sending: a pipeline to a slow
        API may take longer than a lease, and an expired one lets another claim send the
        row again. A process that dies stops renewing, and its rows free up as before."""
        self._for_each(
            "UPDATE outbox SET lease_until = ? WHERE id = ? AND lease_owner = ?",
            [(now + self._lease, item.id, self._owner) for item in items],
        )
        for item in items:
            item.leased_at = now

    def discard(self, item: OutboxItem) -> None:
        self.ack([item])

    def depth(self) -> int:
        """Rows in the file, whoever put them (processes sharing it, earlier runs): the
        second of counts(), without reading the whole table (1 ms with 100,000 rows)."""
        row = self._ask("SELECT count(*) FROM outbox", ())
        if row is not None:
            self._counts = (self._counts[0], int(row[0]))
        return self._counts[1]

    def counts(self) -> tuple[int, int]:
        """Rows this process put that are still in the file (not yet accepted by the API),
        and all rows (other processes', earlier runs'). One read of the whole table: 0.08 ms
        with 1,000 rows, 28-144 ms with 100,000 (events of 0.3-5 KB)."""
        row = self._ask("SELECT coalesce(sum(origin = ?), 0), count(*) FROM outbox", (self._owner,))
        if row is not None:
            self._counts = (int(row[0]), int(row[1]))
        return self._counts

    def _ask(self, sql: str, parameters: tuple[object, ...]) -> tuple[int, ...] | None:
        """The row of a count, or None (the caller's last counts) when it cannot be had at
        once.

        Asked from the app's threads (stats(), a health endpoint): while the worker holds
        the lock through a wait for another process's write lock (up to the busy timeout),
        they get the last counts rather than waiting with it. Nor do they open the file:
        a process not connected yet has put nothing, and opening may wait for that lock.
        """
        if not self._lock.acquire(timeout=_DEPTH_WAIT):
            return None
        try:
            if self._conn is None or self._pid != os.getpid():
                return None
            row: tuple[int, ...] = self._conn.execute(sql, parameters).fetchone()
        except sqlite3.OperationalError as exc:
            if not is_locked(exc):
                raise
            return None
        finally:
            self._lock.release()
        return row

    def depth_upto(self, limit: int) -> int:
        """``depth()``, counted no further than ``limit``: the sink asks as often as every
        10 ms while sending, and a count of all rows takes ~7 ms at 1,000,000 of them (this,
        ~40 us up to 1,024)."""
        with self._lock:
            row = (
                self._connect()
                .execute("SELECT count(*) FROM (SELECT 1 FROM outbox LIMIT ?)", (limit,))
                .fetchone()
            )
        return int(row[0])

    def mine(self, before: float) -> tuple[int, int]:
        """Rows this process put that are still here (another process sharing the file may
        be sending some, and this one theirs), and how many of them may go before ``before``
        (time.time()): not waiting past it for a retry, nor claimed here (the caller knows
        its own claims) unless that claim runs out before then."""
        with self._lock:
            conn = self._connect()
            left, due = retry_locked(
                lambda: conn.execute(
                    "SELECT count(*), "
                    "coalesce(sum((not_before < :before OR not_before > :stepped_back) "
                    "AND (lease_owner IS NOT :origin OR lease_until < :before)), 0) "
                    "FROM outbox WHERE origin = :origin",
                    {
                        "before": before,
                        "origin": self._owner,
                        "stepped_back": time.time() + STEPPED_BACK,
                    },
                ).fetchone(),
                self._until(),
            )
        return int(left), int(due)

    def close(self, unanswered: Sequence[OutboxItem] = (), not_before: float = 0.0) -> None:
        """Hand back the leases of the rows this process claimed: the next start (or a
        sibling) sends them at once. Except ``unanswered`` ones (written to the API, no
        answer yet: it may still store them, and another sender would send them twice):
        they keep their lease, and are not sent again before ``not_before`` even if this
        host's next start frees the leases of dead processes early.

        With the file locked by another process past ``deadline``, nothing is written:
        every claimed row keeps its lease (see _write_back)."""
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is None or self._pid != os.getpid():
                return
            try:
                self._write_back(conn, unanswered, not_before)
            except sqlite3.OperationalError as exc:
                if not is_locked(exc):
                    raise
                logger.warning(
                    "the outbox %s is locked by another process (%s): any event this process"
                    " had claimed keeps its claim, and is sent by a start on this host after"
                    " this process has exited or, once the claim runs out (%g s), by any"
                    " process sharing the file",
                    self.path,
                    exc,
                    self._lease,
                )
            finally:
                conn.close()

    def _write_back(
        self, conn: sqlite3.Connection, unanswered: Sequence[OutboxItem], not_before: float
    ) -> None:
        now = time.time()
        with write_transaction(conn, self._until()):
            if self._starting is not None:  # stopped while starting (a SIGTERM)
                self._end_start(conn)
            conn.executemany(
                "UPDATE outbox SET not_before = ? WHERE id = ? AND lease_owner = ?",
                [(max(not_before, now + 1), i.id, self._owner) for i in unanswered],
            )
            # A leased row's not_before was due when it was claimed, so a later one
            # marks the unanswered (set just above, at most a request's time-out ahead):
            # one further ahead than STEPPED_BACK was due by a clock stepped back since.
            conn.execute(
                "UPDATE outbox SET lease_until = 0, lease_owner = NULL "
                "WHERE lease_owner = ? AND (not_before <= ? OR not_before > ?)",
                (self._owner, now, now + STEPPED_BACK),
            )
        self._starting, self._start_over = None, False
