"""The local events file: what the middleware keeps when there is no AgentSight API key.

Each row is one API body (:func:`agentsight_middleware._payload.build_payload`), kept verbatim
for a later replay to the API, plus a few columns pulled out of it so that the report can group
a million rows in SQL.

Concurrency model: one writer thread per process, several processes (``gunicorn -w 4``) on one
file. WAL lets readers (the ``report`` command) run beside the writers, ``busy_timeout`` makes a
writer wait for another one instead of failing, and each write is one short ``BEGIN IMMEDIATE``
transaction so that no process holds the write lock for long.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sqlite3
import sys
import threading
import time
import urllib.parse
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, Protocol, TypeVar

from ._log import logger

__all__ = [
    "BUSY_TIMEOUT",
    "DEFAULT_PATH",
    "SCHEMA_VERSION",
    "LocalStore",
    "StoreError",
    "StoreNotFoundError",
    "check_unchanged",
    "connect_readonly",
    "count_unsent",
    "create_private",
    "mark_sent",
    "moved_file_holds",
    "not_writable_reason",
    "unsent",
    "wrap_database_error",
]

DEFAULT_PATH = "agentsight-events.sqlite3"

#: Bumped on every change to the table (not to an index: older releases keep reading and
#: writing a file whose indexes a newer one rebuilt); ``PRAGMA user_version`` holds the file's.
SCHEMA_VERSION = 1

#: Seconds a writer waits for another process's transaction before giving up.
BUSY_TIMEOUT = 5.0

#: How long SQLite itself waits for a lock, per try, on the writers' connections: a longer
#: wait is made of tries (see retry_locked), so that a deadline set meanwhile (shutdown's)
#: ends it. Once waiting, SQLite cannot be told (``interrupt()`` does not end a busy wait):
#: with the whole busy timeout in one try, ``close(timeout=1)`` took 6 s.
LOCK_SLICE = 0.1
#: The same under gevent (see lock_slice): a try finding the lock taken ends at once, and
#: retry_locked's sleep before the next is gevent's, which lets the other greenlets run.
_GREENLET_LOCK_SLICE = 0.002


def lock_slice() -> float:
    """SQLite's own wait for a lock, per try, on the writers' connections made now.

    LOCK_SLICE, but a few milliseconds under gevent's monkey-patching (gunicorn ``-k
    gevent``): SQLite's busy wait sleeps in C, which stops the one thread every greenlet of
    the process runs on. A worker waiting for a file another process held (a backup, a
    VACUUM, a sqlite3 shell in a transaction) answered no request for the whole busy timeout,
    5 s for the local store and 10 s for the outbox a try, tries chained: gunicorn's
    ``--timeout`` killed it, and the events it held were lost."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched("time"):
        return _GREENLET_LOCK_SLICE
    return LOCK_SLICE


# The largest number of ``?`` in one statement on every SQLite still in use (3.32 raised it).
_MAX_VARIABLES = 999

_TABLE = """
CREATE TABLE IF NOT EXISTS {schema}events (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    is_used INTEGER NOT NULL,
    conversation_id TEXT NOT NULL,
    customer_id TEXT,
    customer_ip_address TEXT,
    device TEXT,
    source TEXT,
    language TEXT,
    name TEXT,
    environment TEXT,
    page_path TEXT,
    payload TEXT NOT NULL,
    sent_at REAL
)
"""

# events_conversation leads with conversation_id, so it serves lookups by conversation;
# the columns after it make it covering for the report's per-conversation GROUP BY, which
# then never reads the wide rows (the payload): about half the report's time on a million
# events, for a few percent of write speed. The environment second: the report groups by
# id and environment, and in the index's order that needs no sort (1.83 s -> 1.23 s for a
# million events, where it came last).
_INDEXES = (
    "CREATE INDEX IF NOT EXISTS events_ts ON events (ts)",
    "CREATE INDEX IF NOT EXISTS events_conversation ON events"
    " (conversation_id, environment, is_used, ts, page_path, device, language, source)",
)

_INSERT = """
INSERT INTO events (
    ts, is_used, conversation_id, customer_id, customer_ip_address, device, source,
    language, name, environment, page_path, payload
) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""

_T = TypeVar("_T")

# Key order kept and no ASCII escaping: a row keeps the body the API will get. One encoder
# for all rows: json.dumps builds a new one per call when given options.
# A value JSON cannot hold (a date in user metadata) is kept as its text, as the built-in
# client sends it; NaN and infinities are refused, as the API refuses them.
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=str)

# _payload.MAX_EVENT_CHARS (a test keeps them equal), without importing the request-path
# modules into the CLI.
_MAX_EVENT_CHARS = 64 * 1024

# One row for _INSERT, in its column order.
_Row = tuple[float, int, str, Any, Any, Any, Any, Any, Any, Any, Any, str]


class StoreError(Exception):
    """The events file cannot be used: not SQLite, someone else's database, a newer schema."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """There is no events file (yet) at the path."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        text = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(text)) if text else ""
        if not text or not os.path.isdir(folder):
            # No file can ever be there (the middleware refuses such a path at start-up).
            super().__init__(
                f"no events file at {text!r}: "
                + (f"there is no folder {folder}" if text else "the path is empty")
                + "; pass --db with the file your app writes (local_store=)"
            )
            return
        # The middleware creates the file at the first event it records, and a running
        # app with none yet is the usual case: say what makes one.
        super().__init__(
            f"no events file at {text} (yet): the middleware creates it at the "
            "first event it records. Open a widget page in a browser (page views count only "
            "from browsers: curl, scripts, probes and bots do not), or pass --db with the "
            "file your app writes (local_store=)"
        )


def _timestamp(value: Any) -> float:
    if not isinstance(value, str):
        raise ValueError(f"payload timestamp must be an ISO 8601 string, not {value!r}")
    # Python 3.10's fromisoformat does not read the "Z" that other producers write.
    text = value[:-1] + "+00:00" if value.endswith(("Z", "z")) else value
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"payload timestamp {value!r} is not ISO 8601") from None
    if moment.tzinfo is None:
        # The middleware writes UTC; a time without an offset is taken to be UTC too, not
        # the local time of whichever machine runs the report.
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def _row(payload: Mapping[str, Any]) -> _Row:
    conversation_id = payload.get("conversation_id")
    if not isinstance(conversation_id, str) or not conversation_id:
        raise ValueError(f"payload has no conversation_id: {payload!r}")
    metadata = payload.get("metadata")
    page_path = metadata.get("page_path") if isinstance(metadata, Mapping) else None
    if page_path is not None and not isinstance(page_path, str):
        page_path = str(page_path)  # a metadata hook's own page_path: a column takes text
    try:
        body = _ENCODER.encode(payload)
        if len(body) > _MAX_EVENT_CHARS:
            raise OverflowError(len(body))
    except Exception:
        # What a metadata hook returned (a NaN, a key JSON cannot hold, a value whose str()
        # raises, a megabyte): kept as the built-in client sends it (_payload.encode_event).
        from ._payload import encode_event

        try:
            body, _ = encode_event(dict(payload), _ENCODER.encode)
        except Exception as exc:
            raise ValueError(f"payload cannot be stored as JSON: {exc!r}") from None
    return (
        _timestamp(payload.get("timestamp")),
        1 if payload.get("is_used") else 0,
        conversation_id,
        payload.get("customer_id"),
        payload.get("customer_ip_address"),
        payload.get("device"),
        payload.get("source"),
        payload.get("language"),
        payload.get("name"),
        payload.get("environment"),
        page_path,
        body,
    )


def _identity(path: str) -> tuple[int, int] | None:
    """The (device, inode) of the file at ``path``, or None when there is none."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


# SQLite's unix locks (os_unix.c): every connection holds a read lock on the shared
# range of the main file in WAL mode, and on this byte of the -shm file.
_SHARED_FIRST = 0x40000000 + 2
_SHARED_SIZE = 510
_SHM_DMS = 128


def _held_elsewhere(fd: int, start: int, length: int) -> bool | None:
    """Whether another process holds a lock on these bytes of ``fd``'s file; None where
    this cannot be asked (``F_GETLK``'s ``struct flock`` is laid out for Linux here).

    Asked with F_GETLK, which takes no lock: taking one, or closing a descriptor of a
    file, would drop the locks SQLite holds on it in this process (POSIX locks).
    """
    if not sys.platform.startswith("linux"):
        return None
    import fcntl
    import struct

    request = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, start, length, 0)
    try:
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, request + bytes(8))
    except OSError:
        return None
    return bool(struct.unpack_from("h", answer)[0] != fcntl.F_UNLCK)


def _fds_of(*identities: tuple[int, int] | None) -> list[int | None]:
    """For each file ``identity``, a descriptor this process has open on it (SQLite's
    own), or None; one look through /proc/self/fd for all of them."""
    found: dict[tuple[int, int], int] = {}
    wanted = {identity for identity in identities if identity is not None}
    if wanted and os.path.isdir("/proc/self/fd"):
        for name in os.listdir("/proc/self/fd"):
            try:
                info = os.fstat(int(name))
            except (OSError, ValueError):
                continue
            key = (info.st_dev, info.st_ino)
            if key in wanted:
                found.setdefault(key, int(name))
    return [None if identity is None else found.get(identity) for identity in identities]


def _names(fd: int, identity: tuple[int, int]) -> bool:
    """Whether descriptor ``fd`` is open on the file ``identity``."""
    try:
        info = os.fstat(fd)
    except OSError:
        return False
    return (info.st_dev, info.st_ino) == identity


def _shm_in_use(path: str) -> bool:
    """Whether another process has a connection using the -shm file at ``path``."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        return bool(_held_elsewhere(fd, _SHM_DMS, 1))
    finally:
        os.close(fd)


class _PathInUse(sqlite3.OperationalError):
    """The path's -wal and -shm files are still in use for a file moved from it (its
    text says "locked": the sink retries, as for a locked file)."""


#: Bytes an events file's or an outbox's -wal is cut back to after a checkpoint.
WAL_SIZE_LIMIT = 4 * 1024 * 1024


def moved_file_holds(path: str, held_here: Callable[[], bool]) -> bool:
    """Whether no new file may be started at ``path``: there is none (or an empty one),
    and its -shm is still in use for a file moved or deleted from it, by another process
    or, as ``held_here()`` says, by this one. SQLite would take those -wal and -shm files for the
    new file's ("disk I/O error", or a corrupt file)."""
    try:
        empty = os.path.getsize(path) == 0
    except OSError:
        empty = True  # no file: SQLite would create one
    shm = path + "-shm"
    if not empty or not os.path.exists(shm):
        return False
    # In use here: asking would open and close a descriptor of the -shm, which drops the
    # locks this process's SQLite holds on it (POSIX locks).
    return held_here() or _shm_in_use(shm)


def _describe(path: str) -> str:
    return os.path.abspath(path)


def is_locked(exc: BaseException) -> bool:
    """Whether ``exc`` says that another connection holds the lock (past the busy timeout)."""
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def create_private(path: str | os.PathLike[str]) -> None:
    """Create ``path`` empty and readable by its owner alone (0600), unless it exists.

    The file holds visitors' IP addresses, user agents, page URLs and customer ids: left
    to SQLite it would be made with the umask's mode, world-readable under the usual
    022. SQLite gives the -wal and -shm files the mode of the database file, so they
    follow. A link to a file not made yet (the file kept on a data volume) is followed
    once, as SQLite would follow it, to make that file; never a link at the end of that.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    flags |= getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        # An existing file keeps the mode its owner gave it; a dangling link's target
        # would be made by SQLite with the umask's mode.
        if not (os.path.islink(path) and not os.path.exists(path)):
            return
        try:
            fd = os.open(os.path.realpath(path), flags, 0o600)
        except OSError:
            return
    except OSError:
        return  # a folder we cannot write, say: SQLite's own error says so, as before
    os.close(fd)


def wrap_database_error(path: str, exc: sqlite3.DatabaseError) -> StoreError:
    text = str(exc)
    if is_locked(exc):
        return StoreError(
            f"{_describe(path)} is locked by another process ({text}): try again in a moment"
        )
    return StoreError(f"{_describe(path)} is not a usable events file: {text}")


def _covering_index_is_current(conn: sqlite3.Connection) -> bool:
    row = conn.execute(
        "SELECT sql FROM sqlite_master WHERE type = 'index' AND name = 'events_conversation'"
    ).fetchone()
    return row is not None and row[0] == _INDEXES[1].replace(" IF NOT EXISTS", "")


def _ensure_schema(conn: sqlite3.Connection, path: str) -> None:
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    if version == SCHEMA_VERSION and _covering_index_is_current(conn):
        return
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{_describe(path)} has events schema {version}, newer than this "
            f"agentsight-middleware understands ({SCHEMA_VERSION}): upgrade the package"
        )
    # Two processes may both find a new file empty: the write lock makes one create the
    # schema and the other see it done.
    conn.execute("BEGIN IMMEDIATE")
    try:
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        if version == 0:
            (tables,) = conn.execute(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table'"
            ).fetchone()
            if tables:
                raise StoreError(
                    f"{_describe(path)} is a SQLite database but not an agentsight events "
                    "file; choose another path"
                )
            conn.execute(_TABLE.format(schema=""))
            for statement in _INDEXES:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        elif not _covering_index_is_current(conn):
            # A file from before the covering index held the environment (reports filter
            # and count on it): rebuilt under the write lock, in the transaction (a crash
            # leaves the old one whole; other writers wait, ~2 s per million events).
            conn.execute("DROP INDEX IF EXISTS events_conversation")
            conn.execute(_INDEXES[1])
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


@contextmanager
def write_transaction(conn: sqlite3.Connection, until: Callable[[], float]) -> Iterator[None]:
    """One ``BEGIN IMMEDIATE`` ... ``COMMIT`` on an autocommit connection, rolled back on error.

    IMMEDIATE takes the write lock at the start, so a writer waits for another one
    instead of failing halfway through: until ``until()`` (see retry_locked).
    """
    retry_locked(lambda: conn.execute("BEGIN IMMEDIATE"), until)
    try:
        yield
        # In WAL mode a COMMIT never waits; in the rollback journal a file system without
        # shared memory leaves, it waits for readers to finish.
        retry_locked(lambda: conn.execute("COMMIT"), until)
    except BaseException:
        # A failed COMMIT leaves the transaction open; the next BEGIN would fail.
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


class _HasDeadline(Protocol):
    #: Monotonic time past which a wait for another process's lock gives up (shutdown's).
    deadline: float


def lock_wait_until(
    owner: _HasDeadline, busy: float, wait: float | None = None
) -> Callable[[], float]:
    """For a wait for a lock starting now: when it gives up, after ``busy`` seconds
    (``wait`` if less), or at ``owner.deadline`` if that comes first, set meanwhile (by
    another thread, at shutdown) or not. The ``until`` of retry_locked."""
    limit = time.monotonic() + (busy if wait is None else min(wait, busy))
    return lambda: min(limit, owner.deadline)


def retry_locked(action: Callable[[], _T], until: Callable[[], float]) -> _T:
    """``action()``, tried again while it fails because another connection holds a lock,
    until ``until()`` (monotonic) has passed; asked after each try, so that a deadline set
    meanwhile (by another thread) counts. Each try waits up to the connection's busy
    timeout (LOCK_SLICE for the writers')."""
    while True:
        started = time.monotonic()
        try:
            return action()
        except sqlite3.OperationalError as exc:
            now = time.monotonic()
            left = until() - now
            if not is_locked(exc) or left <= 0:
                raise
            if now - started < LOCK_SLICE / 2:
                # SQLite may report contention at once instead of calling the busy handler
                # (switching a new file to WAL needs an exclusive lock): no spinning.
                time.sleep(min(0.01, left))


# Connections a forked child inherited. SQLite forbids using them across fork(), closing
# included (a close may checkpoint or unlock on the parent's behalf), and letting them be
# garbage-collected would close them: they are kept here, untouched, for the child's life.
_INHERITED: list[sqlite3.Connection] = []

_LIVE_STORES: weakref.WeakSet[LocalStore] = weakref.WeakSet()


def _before_fork() -> None:
    for store in list(_LIVE_STORES):
        store._close_before_fork()


def _after_fork_in_child() -> None:
    for store in list(_LIVE_STORES):
        store._forget_after_fork()


class LocalStore:
    """Appends API bodies to a SQLite file; safe for one writer thread in each of many processes.

    The file is opened at the first :meth:`write` (so importing and configuring the
    middleware in a pre-fork master opens nothing), and reopened in a forked child.
    A directory that does not exist is an error at that first write; it is not created,
    since a typo in the path should not scatter files.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        follow_path: bool = True,
        busy_timeout: float | None = None,
    ) -> None:
        self._path = os.fspath(path)
        # How long a write waits for another process's lock once the file is open (None:
        # BUSY_TIMEOUT; opening waits that long anyway: the app may be rebuilding an index).
        self._busy_timeout = busy_timeout
        # False: stay with the file first opened, even if the path comes to name another
        # (`send` marks rows by their ids: in a new file at the path, those are others).
        self._follow_path = follow_path
        self._conn: sqlite3.Connection | None = None
        self._pid = 0
        # The file the connection has open (see _connection).
        self._identity: tuple[int, int] | None = None
        # The -wal file at the path while the file was still there (see _settle_moved),
        # and whether this process stays with a moved file.
        self._wal_identity: tuple[int, int] | None = None
        self._shm_identity: tuple[int, int] | None = None
        self._staying = False
        # SQLite's descriptors on the file and its -shm, once found (see _sqlite_fds).
        self._fds: list[int | None] = []
        #: Monotonic time past which a wait for another process's lock gives up
        #: (shutdown's, set by the sink from another thread while a write may be waiting).
        self.deadline = math.inf
        self._lock = threading.Lock()
        _LIVE_STORES.add(self)

    @property
    def path(self) -> str:
        return self._path

    def __repr__(self) -> str:
        return f"LocalStore({self._path!r})"

    def __enter__(self) -> LocalStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def write(self, payloads: Sequence[Mapping[str, Any]], wait: float | None = None) -> int:
        """Append ``payloads`` in one transaction (all or none); returns the rows written.

        Raises ``ValueError`` for a payload without a conversation id or ISO timestamp
        (before anything is written), :class:`StoreError` for a file that is not an events
        file, ``FileNotFoundError`` for a missing directory, and ``sqlite3.OperationalError``
        when another process held the write lock longer than :data:`BUSY_TIMEOUT` (or
        ``wait`` seconds, if less).
        """
        # Parsed and serialised before taking the write lock: other processes wait on it.
        rows = [_row(payload) for payload in payloads]
        if not rows:
            return 0
        with self._transaction(wait) as conn:
            conn.executemany(_INSERT, rows)
        return len(rows)

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is None:
                return
            if self._pid == os.getpid():
                self._let_go(conn)
            else:
                _INHERITED.append(conn)

    def _busy(self) -> float:
        return BUSY_TIMEOUT if self._busy_timeout is None else self._busy_timeout

    def _until(self, wait: float | None = None) -> Callable[[], float]:
        return lock_wait_until(self, self._busy(), wait)

    @contextmanager
    def _transaction(self, wait: float | None = None) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._connection()
            with write_transaction(conn, self._until(wait)):
                yield conn

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._connection()

    def _connection(self) -> sqlite3.Connection:
        pid = os.getpid()
        if self._conn is not None and self._pid != pid:
            # A fork the at-fork hooks did not see (they cover os.fork and multiprocessing).
            _INHERITED.append(self._conn)
            self._conn = None
        if self._conn is not None and self._follow_path:
            # The file moved or deleted under a running app (rotated after `send`,
            # say): the open connection would go on writing into the old inode, and
            # the report on the configured path would find nothing. Looked at before
            # every transaction (two stat() calls, ~3 us next to a write's ~100 us), so
            # that no write goes into the old file once another process has moved on.
            if _identity(self._path) == self._identity:
                self._wal_identity = _identity(self._path + "-wal")
            elif self._settle_moved(self._conn):
                self._conn.close()
                self._conn = None
            elif not self._staying:
                self._staying = True
                deleted = self._deleted()
                logger.log(
                    logging.ERROR if deleted else logging.WARNING,
                    "the events file %s was %s without its -wal and -shm files while other"
                    " processes had it open: this process goes on writing into the %s until"
                    " no other process uses it (a new file at the path would share those two"
                    " files with it, and corrupt both). Stop the app before moving or"
                    " deleting the file, or move all three.",
                    _describe(self._path),
                    "deleted" if deleted else "moved",
                    "deleted file, and those events are lost," if deleted else "moved file",
                )
        if self._conn is None:
            self._conn = self._open()
            self._pid = pid
            self._identity = _identity(self._path)
            self._wal_identity = _identity(self._path + "-wal")
            self._shm_identity = _identity(self._path + "-shm")
            self._staying = False
            self._fds = []
        return self._conn

    def _let_go(self, conn: sqlite3.Connection) -> None:
        if _identity(self._path) != self._identity:
            self._settle_moved(conn, closing=True)
        conn.close()

    def _settle_moved(self, conn: sqlite3.Connection, *, closing: bool = False) -> bool:
        """Whether ``conn``, open on a file that was moved or deleted, may be closed and a
        new file started at the path; first moving its ``-wal`` into the file if need be.

        SQLite does not checkpoint on closing a file that moved, and the ``-wal`` and
        ``-shm`` files keep the path's names: moved alone, the file lacks its last
        writes (all of them, under 1,000 pages). A new file may be started at the path
        only by a connection with no other on the file, nor on a new file there: those
        two files would be the new file's too. While another file is at the path, only
        such a connection may checkpoint, as the -wal's index may be that file's.
        """
        wal = _identity(self._path + "-wal")
        if wal is None or wal != self._wal_identity:
            return True  # moved along with the file (or removed): the names are free
        if self._alone():
            try:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            except sqlite3.Error:
                return False
            return True
        if closing and _identity(self._path) is None:
            # Others have the file open too, and no other file uses the -wal: what they
            # and this one wrote goes into the file now, without waiting for anyone.
            with contextlib.suppress(sqlite3.Error):
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        return False

    def _alone(self) -> bool:
        """Whether no other process has this file open, nor a file using its -shm (False
        where that cannot be known)."""
        if self._others_here():
            return False  # (F_GETLK does not see this process's own locks)
        db, shm = self._sqlite_fds()
        if db is None or _held_elsewhere(db, _SHARED_FIRST, _SHARED_SIZE) is not False:
            return False
        return shm is not None and _held_elsewhere(shm, _SHM_DMS, 1) is False

    def _sqlite_fds(self) -> list[int | None]:
        """The descriptors SQLite has open on the file and its -shm (or None for one not
        found). Kept from the last look while each still names its file: a process staying
        with a moved file asks at every write, and a look through /proc/self/fd costs
        ~2 ms with 2,000 descriptors open, where an fstat of each costs microseconds."""
        wanted = (self._identity, self._shm_identity)
        kept = self._fds
        if kept and all(
            fd is not None and identity is not None and _names(fd, identity)
            for fd, identity in zip(kept, wanted, strict=True)
        ):
            return kept
        self._fds = found = _fds_of(*wanted)
        return found

    def _others_here(self) -> bool:
        """Whether another store of this process has a file at this path open."""
        return any(
            store is not self and store._conn is not None and store._path == self._path
            for store in list(_LIVE_STORES)
        )

    def _deleted(self) -> bool:
        db = self._sqlite_fds()[0]
        try:
            return db is not None and os.fstat(db).st_nlink == 0
        except OSError:
            return False

    def _check_path_free(self) -> None:
        """Refuse to start a file at the path while the -wal and -shm there are still in
        use for a file moved from it (see _settle_moved)."""
        # Another store of this process on the file: its SQLite locks on the -shm would
        # go with the descriptor _shm_in_use closes, so ask no further.
        if moved_file_holds(self._path, self._others_here):
            raise _PathInUse(
                f"the events file {_describe(self._path)} is locked: it was moved or deleted"
                f" without its -wal and -shm files, which processes still use for it; a new"
                f" file is started there once they stop (stop the app before moving the file,"
                f" or move all three)"
            )

    def _open(self) -> sqlite3.Connection:
        directory = os.path.dirname(os.path.abspath(self._path))
        if not os.path.isdir(directory):
            raise FileNotFoundError(
                f"cannot create the events file {self._path}: directory {directory} does not exist"
            )
        self._check_path_free()
        create_private(self._path)
        # isolation_level=None: the module must not open transactions behind our back;
        # every write is an explicit BEGIN IMMEDIATE. check_same_thread=False: close() may
        # come from another thread than the writer's (at exit); self._lock serialises them.
        try:
            conn = sqlite3.connect(
                self._path,
                timeout=min(lock_slice(), self._busy()),
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.DatabaseError as exc:
            raise wrap_database_error(self._path, exc) from exc
        try:
            # Opening waits BUSY_TIMEOUT whatever the writes' wait: another process may be
            # rebuilding an index.
            until = lock_wait_until(self, BUSY_TIMEOUT)

            # A file system without shared memory (some network mounts) refuses WAL and
            # stays in its journal mode: still correct across processes, only slower.
            retry_locked(lambda: conn.execute("PRAGMA journal_mode = WAL").fetchone(), until)
            # In WAL, NORMAL never corrupts; a power cut may lose the last commits, which
            # is an acceptable price for analytics events and saves an fsync per batch.
            conn.execute("PRAGMA synchronous = NORMAL")
            # The -wal file keeps the size a busy stretch (or a long report's read) grew it
            # to, 10-20 MB under 4 gunicorn workers, unless a limit truncates it at the
            # checkpoints after.
            conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
            retry_locked(lambda: _ensure_schema(conn, self._path), until)
        except sqlite3.DatabaseError as exc:
            conn.close()
            if isinstance(exc, sqlite3.OperationalError) and is_locked(exc):
                raise
            raise wrap_database_error(self._path, exc) from exc
        except BaseException:
            conn.close()
            raise
        return conn

    def _close_before_fork(self) -> None:
        # Closing in the parent is always safe, and then the child inherits nothing; the
        # parent reopens at its next write. Never block a fork on a slow writer.
        if not self._lock.acquire(timeout=BUSY_TIMEOUT):
            return
        try:
            if self._conn is not None and self._pid == os.getpid():
                self._let_go(self._conn)
                self._conn = None
        finally:
            self._lock.release()

    def _forget_after_fork(self) -> None:
        # The lock may have been copied while held by a thread that does not exist here.
        self._lock = threading.Lock()
        if self._conn is not None:
            _INHERITED.append(self._conn)
            self._conn = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


def unsent(
    store: LocalStore, limit: int, after_id: int = 0
) -> list[tuple[int, dict[str, Any] | None]]:
    """Up to ``limit`` events not yet replayed to the API, oldest first, with ``id > after_id``.

    Pass the last id of a batch as ``after_id`` to page on even when a batch could not be
    marked sent (the API refused it), so one bad event cannot stall a replay. A payload
    that is not a JSON object (a file edited by hand) comes back as None.
    """
    if limit <= 0:
        return []
    with store._reading() as conn:
        rows = _select(
            store,
            conn,
            "SELECT id, payload FROM events WHERE id > ? AND sent_at IS NULL ORDER BY id LIMIT ?",
            (after_id, limit),
        )
    return [(row_id, _payload_or_none(payload)) for row_id, payload in rows]


def _select(
    store: LocalStore, conn: sqlite3.Connection, sql: str, parameters: Sequence[object]
) -> list[Any]:
    """The rows of ``sql``; a lock (a file system without shared memory keeps readers out
    while a writer commits) is waited for in tries, as for a write (see LOCK_SLICE)."""
    return retry_locked(lambda: conn.execute(sql, parameters).fetchall(), store._until())


def _in_chunks(values: Sequence[_T]) -> Iterator[tuple[list[_T], str]]:
    """``values`` in pieces an ``IN (...)`` takes (one ``?`` kept for another parameter),
    each with its ``?,?,...``."""
    for start in range(0, len(values), _MAX_VARIABLES - 1):
        chunk = list(values[start : start + _MAX_VARIABLES - 1])
        yield chunk, ",".join("?" * len(chunk))


def unsent_of(
    store: LocalStore, conversation_ids: Sequence[str], after_id: int
) -> list[tuple[int, dict[str, Any] | None]]:
    """The events of these conversations not yet replayed with ``id > after_id``: what a
    replay's later batches hold of conversations it is sending now (served by the
    conversation index)."""
    found: list[tuple[int, dict[str, Any] | None]] = []
    with store._reading() as conn:
        for chunk, marks in _in_chunks(conversation_ids):
            rows = _select(
                store,
                conn,
                f"SELECT id, payload FROM events WHERE conversation_id IN ({marks})"
                " AND sent_at IS NULL AND id > ? ORDER BY id",
                (*chunk, after_id),
            )
            found += [(row_id, _payload_or_none(payload)) for row_id, payload in rows]
    return found


def _payload_or_none(text: object) -> dict[str, Any] | None:
    try:
        payload = json.loads(text)  # type: ignore[arg-type]
    except (TypeError, ValueError, RecursionError):
        return None
    return payload if isinstance(payload, dict) else None


def count_unsent(store: LocalStore, after_id: int = 0) -> int:
    """How many events with ``id > after_id`` are not yet replayed."""
    with store._reading() as conn:
        [(count,)] = _select(
            store, conn, "SELECT count(*) FROM events WHERE id > ? AND sent_at IS NULL", (after_id,)
        )
    return int(count)


def mark_sent(store: LocalStore, ids: Sequence[int], *, at: float | None = None) -> int:
    """Record that the API accepted the events ``ids``; returns how many were newly marked.

    Already-marked rows keep their first ``sent_at``, so a replay interrupted and run
    again neither resends nor re-dates them.
    """
    if not ids:
        return 0
    when = time.time() if at is None else at
    marked = 0
    with store._transaction() as conn:
        for chunk, marks in _in_chunks(ids):
            cursor = conn.execute(
                f"UPDATE events SET sent_at = ? WHERE sent_at IS NULL AND id IN ({marks})",
                [when, *chunk],
            )
            marked += cursor.rowcount
    return marked


def not_writable_reason(path: str) -> str | None:
    """Why the existing file at ``path`` can never take events (not SQLite, another
    program's database, a newer release's schema), or None. Read only, and without waiting:
    a file another process keeps locked, or one this process cannot open read-only, is left
    to the first write, which waits for it or says what went wrong."""
    uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro"
    try:
        with contextlib.closing(
            sqlite3.connect(uri, uri=True, timeout=0, isolation_level=None)
        ) as conn:
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            (tables,) = conn.execute(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table'"
            ).fetchone()
    except sqlite3.DatabaseError as exc:
        message = str(exc)
        if is_locked(exc) or "unable to open" in message or "readonly" in message:
            return None
        return str(wrap_database_error(path, exc))
    # As _ensure_schema would say at the first write.
    if version > SCHEMA_VERSION:
        return (
            f"{_describe(path)} has events schema {version}, newer than this "
            f"agentsight-middleware understands ({SCHEMA_VERSION}): upgrade the package"
        )
    if version == 0 and tables:
        return (
            f"{_describe(path)} is a SQLite database but not an agentsight events file; "
            "choose another path"
        )
    return None


def _open_readonly(text: str) -> tuple[sqlite3.Connection, int]:
    """A read-only connection and the file's schema version."""
    # mode=ro: a report must never create, migrate or lock out the writers.
    uri = "file:" + urllib.parse.quote(os.path.abspath(text)) + "?mode=ro"
    try:
        return _first_read(
            sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT, isolation_level=None)
        )
    except sqlite3.DatabaseError as exc:
        # A WAL file's reader needs its -shm beside it, which a reader without write access
        # to the folder (an admin reading the www-data app's file, a read-only volume) cannot
        # create. With no -wal file, no writer is at work: the file is read as it is.
        message = str(exc)
        if not isinstance(exc, sqlite3.OperationalError) or not (
            "unable to open" in message or "readonly" in message
        ):
            raise wrap_database_error(text, exc) from exc
        if not os.access(text, os.R_OK):
            raise StoreError(f"{_describe(text)} cannot be read: permission denied") from exc
        if os.path.exists(text + "-wal"):
            raise StoreError(
                f"{_describe(text)} cannot be read: SQLite needs to write its -shm file "
                f"beside it ({message}); run the report as the app's user, or copy the "
                "file (with its -wal) somewhere you can write"
            ) from exc
    # Read as it is, without the locks a writer would wait for: taken as read only if the
    # file is the same when the report is done (see check_unchanged).
    before = _file_state(text)
    try:
        conn = sqlite3.connect(
            uri + "&immutable=1",
            uri=True,
            timeout=BUSY_TIMEOUT,
            isolation_level=None,
            factory=_ImmutableRead,
        )
    except sqlite3.DatabaseError as exc:
        raise wrap_database_error(text, exc) from exc
    assert isinstance(conn, _ImmutableRead)
    conn.path, conn.state = text, before
    try:
        return _first_read(conn)
    except sqlite3.DatabaseError as exc:
        raise check_unchanged(conn) or wrap_database_error(text, exc) from exc


class _ImmutableRead(sqlite3.Connection):
    """A connection that reads a file as immutable, and what the file was when opened."""

    path = ""
    state: tuple[int, int, int, bool] | None = None


def _file_state(text: str) -> tuple[int, int, int, bool] | None:
    """What would change if a writer touched the file: inode, size, mtime, a -wal file."""
    try:
        info = os.stat(text)
    except OSError:
        return None
    return info.st_ino, info.st_size, info.st_mtime_ns, os.path.exists(text + "-wal")


def check_unchanged(conn: sqlite3.Connection) -> StoreError | None:
    """For a connection that read the file as immutable (no locks: a reader that cannot
    write beside the file), the error to raise if a writer changed it meanwhile, else None.
    Such a read may have mixed old and new pages: its figures are not to be trusted."""
    if not isinstance(conn, _ImmutableRead) or _file_state(conn.path) == conn.state:
        return None
    return StoreError(
        f"{_describe(conn.path)} was written to while the report read it without locks (no "
        "write access to its folder for SQLite's -shm file): run the report again, or as "
        "the app's user"
    )


def _first_read(conn: sqlite3.Connection) -> tuple[sqlite3.Connection, int]:
    try:
        # Before any temporary table: changing temp_store drops them. The report's GROUP BYs
        # sort in temporary storage, which has no business on disk.
        conn.execute("PRAGMA temp_store = MEMORY")
        (version,) = conn.execute("PRAGMA user_version").fetchone()
    except BaseException:
        conn.close()
        raise
    return conn, int(version)


def connect_readonly(path: str | os.PathLike[str]) -> sqlite3.Connection:
    """A read-only connection to an events file, for reports; the caller closes it.

    It is in autocommit mode (``isolation_level=None``): the caller opens the read
    transaction it wants.

    Raises :class:`StoreNotFoundError` when there is no file and :class:`StoreError` when it
    is not an events file (a folder, say). A file with no tables at all (an empty file, or
    one created but never written) reads as an events file with no events.
    """
    text = os.fspath(path)
    if os.path.isdir(text):
        raise StoreError(
            f"{text} is a folder, not an events file; name the file in it, e.g. "
            f"{os.path.join(text, DEFAULT_PATH)}"
        )
    if not os.path.isfile(text):
        try:
            os.stat(text)
        except PermissionError as exc:
            # A folder on the way is closed to this user (the app's own, run as another):
            # the file may well be there; neither "no folder" nor "(yet)" is true.
            raise StoreError(
                f"{text} cannot be reached by this user ({exc.strerror}): run the report "
                "as the user your app runs as, or pass --db with a copy of the file"
            ) from None
        except OSError:
            pass
        raise StoreNotFoundError(text)
    conn, version = _open_readonly(text)
    try:
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{_describe(text)} has events schema {version}, newer than this "
                f"agentsight-middleware understands ({SCHEMA_VERSION}): upgrade the package"
            )
        tables = {
            name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        if tables and ("events" not in tables or version != SCHEMA_VERSION):
            # The writer stamps its schema version: another app's table named "events"
            # carries none, and the report's queries would fail on its columns.
            raise StoreError(
                f"{_describe(text)} is a SQLite database but not an agentsight events file"
            )
        if not tables:
            # A temporary table shadows nothing and needs no write access to the file:
            # the report's queries then run unchanged and find no rows.
            conn.execute(_TABLE.format(schema="temp."))
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise wrap_database_error(text, exc) from exc
    except BaseException:
        conn.close()
        raise
    return conn
