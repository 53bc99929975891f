"""The local events file: schema, verbatim payloads, many processes, replay bookkeeping."""

from __future__ import annotations

import json
import multiprocessing
import os
import sqlite3
import sys
import warnings
from collections.abc import Iterator
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from agentsight_middleware import _store
from agentsight_middleware._store import (
    DEFAULT_PATH,
    SCHEMA_VERSION,
    LocalStore,
    StoreError,
    StoreNotFoundError,
    connect_readonly,
    mark_sent,
    unsent,
)

#: 2026-11-24 13:08:17.234473 UTC, the brief's example.
BASE = datetime(2026, 11, 24, 13, 8, 17, 234473, tzinfo=timezone.utc).timestamp()

CHROME = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36"
)


def make_payload(
    conversation_id: str,
    *,
    used: bool = False,
    at: float = BASE,
    page: str | None = "/pricing",
    device: str | None = "desktop",
    language: str | None = "en-US",
    source: str | None = "web",
    ip: str | None = "203.0.113.7",
    environment: str | None = "production",
) -> dict[str, Any]:
    """An API body as the middleware builds it (``_payload.build_payload``)."""
    path = page or "/"
    return {
        "timestamp": datetime.fromtimestamp(at, timezone.utc).isoformat(),
        "conversation_id": conversation_id,
        "customer_id": None,
        "customer_ip_address": ip,
        "device": device,
        "source": source,
        "language": language,
        "name": None,
        "environment": environment,
        "metadata": {
            "page_path": page,
            "page_url": f"https://shop.example{path}",
            "referrer": "https://www.google.com/",
            "user_agent": CHROME,
            "rule": path,
            "conversation_id_source": "cookie" if used else "minted",
        },
        "is_used": used,
    }


def rows(path: Path, sql: str, *params: object) -> list[tuple[Any, ...]]:
    with closing(sqlite3.connect(path)) as conn:
        return conn.execute(sql, params).fetchall()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / DEFAULT_PATH


@pytest.fixture
def store(db: Path) -> Iterator[LocalStore]:
    with LocalStore(db) as opened:
        yield opened


def test_schema_wal_and_version(store: LocalStore, db: Path) -> None:
    assert store.write([make_payload("conv_0123456789ab")]) == 1
    assert rows(db, "PRAGMA journal_mode") == [("wal",)]
    assert rows(db, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    columns = [row[1] for row in rows(db, "PRAGMA table_info(events)")]
    assert columns == [
        "id",
        "ts",
        "is_used",
        "conversation_id",
        "customer_id",
        "customer_ip_address",
        "device",
        "source",
        "language",
        "name",
        "environment",
        "page_path",
        "payload",
        "sent_at",
    ]
    indexes = {row[0]: row[1] for row in rows(db, "SELECT name, sql FROM sqlite_master")}
    assert "ON events (ts)" in indexes["events_ts"]
    assert "ON events (conversation_id," in indexes["events_conversation"]


def test_a_write_waits_for_another_writer_up_to_the_busy_timeout(
    store: LocalStore, db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SQLite waits LOCK_SLICE a try; the write tries again up to BUSY_TIMEOUT.
    import threading

    store.write([make_payload("conv_a")])
    holder = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    threading.Timer(1.0, holder.execute, ("COMMIT",)).start()
    assert store.write([make_payload("conv_b")]) == 1  # waited for the lock
    monkeypatch.setattr(_store, "BUSY_TIMEOUT", 0.5)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            store.write([make_payload("conv_c")])
    finally:
        holder.close()
    assert _ids(db) == ["conv_a", "conv_b"]


def test_row_columns_and_verbatim_payload(store: LocalStore, db: Path) -> None:
    view = make_payload("conv_0123456789ab", page="/prix/été", language="fr-FR", device=None)
    chat = make_payload("conv_0123456789ab", used=True, at=BASE + 30, page="/api/chat")
    assert store.write([view, chat]) == 2
    stored = rows(
        db,
        "SELECT ts, is_used, conversation_id, customer_ip_address, device, source, language,"
        " name, environment, page_path, payload, sent_at FROM events ORDER BY id",
    )
    assert stored[0][:10] == (
        pytest.approx(BASE, abs=1e-6),
        0,
        "conv_0123456789ab",
        "203.0.113.7",
        None,
        "web",
        "fr-FR",
        None,
        "production",
        "/prix/été",
    )
    assert stored[1][:3] == (pytest.approx(BASE + 30, abs=1e-6), 1, "conv_0123456789ab")
    assert stored[1][9] == "/api/chat"
    # The body the API will get: same keys in the same order, non-ASCII unescaped.
    assert json.loads(stored[0][10]) == view
    assert list(json.loads(stored[0][10])) == list(view)
    assert "été" in stored[0][10]
    assert stored[0][11] is None


def test_payload_from_the_middleware(store: LocalStore, db: Path) -> None:
    from agentsight_middleware._conversation import Conversation
    from agentsight_middleware._events import INITIALIZE, Event
    from agentsight_middleware._payload import build_payload

    conversation = Conversation(
        id="conv_0123456789ab",
        id_source="minted",
        kind="widget",
        rule="/pricing",
        peer="203.0.113.7",
        user_agent=CHROME,
        accept_language="en-us,en;q=0.9",
        scheme="https",
        host="shop.example",
        path="/pricing",
        query="",
    )
    payload = build_payload(Event(INITIALIZE, conversation, BASE), source="web", environment=None)
    store.write([payload])
    ((ts, page, device, language, body),) = rows(
        db, "SELECT ts, page_path, device, language, payload FROM events"
    )
    assert ts == pytest.approx(BASE, abs=1e-6)
    assert (page, device, language) == ("/pricing", "desktop", "en-US")
    assert json.loads(body) == payload


@pytest.mark.parametrize(
    ("timestamp", "expected"),
    [
        ("2026-11-24T13:08:17.234473+00:00", BASE),
        ("2026-11-24T13:08:17.234473Z", BASE),
        ("2026-11-24T13:08:17.234473", BASE),
        ("2026-11-24T15:08:17.234473+02:00", BASE),
    ],
)
def test_timestamp_forms(store: LocalStore, db: Path, timestamp: str, expected: float) -> None:
    payload = make_payload("conv_a")
    payload["timestamp"] = timestamp
    store.write([payload])
    assert rows(db, "SELECT ts FROM events") == [(pytest.approx(expected, abs=1e-6),)]


def test_lazy_open_and_empty_batch(db: Path) -> None:
    store = LocalStore(db)
    assert store.write([]) == 0
    assert not db.exists()
    store.close()
    assert repr(store) == f"LocalStore({str(db)!r})"
    assert store.path == str(db)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"timestamp": None}, "ISO 8601 string"),
        ({"timestamp": "yesterday"}, "not ISO 8601"),
        ({"conversation_id": ""}, "no conversation_id"),
        ({"conversation_id": None}, "no conversation_id"),
    ],
)
def test_bad_payload_rejects_the_whole_batch(
    store: LocalStore, db: Path, change: dict[str, Any], message: str
) -> None:
    store.write([make_payload("conv_first")])
    bad = {**make_payload("conv_bad"), **change}
    with pytest.raises(ValueError, match=message):
        store.write([make_payload("conv_ok"), bad])
    assert store.write([make_payload("conv_after")]) == 1
    assert rows(db, "SELECT conversation_id FROM events ORDER BY id") == [
        ("conv_first",),
        ("conv_after",),
    ]


def test_failed_insert_rolls_back(store: LocalStore, db: Path) -> None:
    def die_mid_batch() -> None:
        with store._transaction() as conn:
            conn.execute(
                "INSERT INTO events (ts, is_used, conversation_id, payload) VALUES (1, 0, 'x', '')"
            )
            raise RuntimeError("the worker died mid-batch")

    store.write([make_payload("conv_first")])
    with pytest.raises(RuntimeError):
        die_mid_batch()
    assert store.write([make_payload("conv_after")]) == 1
    assert rows(db, "SELECT conversation_id FROM events ORDER BY id") == [
        ("conv_first",),
        ("conv_after",),
    ]


def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "no-such-dir" / "events.sqlite3"
    store = LocalStore(path)  # nothing happens yet
    with pytest.raises(FileNotFoundError, match=r"directory .*no-such-dir does not exist"):
        store.write([make_payload("conv_a")])
    assert not path.parent.exists()
    store.close()


def test_not_an_events_file(tmp_path: Path) -> None:
    text = tmp_path / "notes.sqlite3"
    text.write_text("this is not a database, it is a shopping list\n" * 100)
    with LocalStore(text) as store, pytest.raises(StoreError, match="not a usable events file"):
        store.write([make_payload("conv_a")])
    with pytest.raises(StoreError, match="not a usable events file"):
        connect_readonly(text)

    other = tmp_path / "other.sqlite3"
    with closing(sqlite3.connect(other)) as conn:
        conn.execute("CREATE TABLE users (id INTEGER)")
    with LocalStore(other) as store, pytest.raises(StoreError, match="not an agentsight events"):
        store.write([make_payload("conv_a")])
    with pytest.raises(StoreError, match="not an agentsight events"):
        connect_readonly(other)


def test_newer_schema_is_refused(store: LocalStore, db: Path) -> None:
    store.write([make_payload("conv_a")])
    store.close()
    with closing(sqlite3.connect(db)) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with LocalStore(db) as newer, pytest.raises(StoreError, match="upgrade the package"):
        newer.write([make_payload("conv_b")])
    with pytest.raises(StoreError, match="upgrade the package"):
        connect_readonly(db)


def test_missing_file_for_readers(tmp_path: Path) -> None:
    path = tmp_path / "absent.sqlite3"
    with pytest.raises(StoreNotFoundError) as caught:
        connect_readonly(path)
    assert isinstance(caught.value, FileNotFoundError)
    assert str(caught.value).startswith(f"no events file at {path} (yet): the middleware")
    assert not path.exists()


def test_close_then_write_reopens(store: LocalStore, db: Path) -> None:
    store.write([make_payload("conv_a")])
    store.close()
    store.close()
    store.write([make_payload("conv_b")])
    assert rows(db, "SELECT count(*) FROM events") == [(2,)]


def test_unsent_and_mark_sent(store: LocalStore) -> None:
    store.write([make_payload(f"conv_{n}", at=BASE + n) for n in range(5)])
    first = unsent(store, 2)
    assert [row_id for row_id, _ in first] == [1, 2]
    assert first[0][1] == make_payload("conv_0", at=BASE)
    assert mark_sent(store, [1, 2], at=BASE + 100) == 2
    # Idempotent: a replay interrupted and run again marks nothing twice.
    assert mark_sent(store, [1, 2], at=BASE + 200) == 0
    assert [row_id for row_id, _ in unsent(store, 10)] == [3, 4, 5]
    # Paging past a batch the API refused (3 stays unsent).
    assert [row_id for row_id, _ in unsent(store, 10, after_id=3)] == [4, 5]
    assert unsent(store, 0) == []
    assert mark_sent(store, []) == 0
    with store._reading() as conn:
        assert conn.execute("SELECT id, sent_at FROM events WHERE id <= 2").fetchall() == [
            (1, BASE + 100),
            (2, BASE + 100),
        ]


def test_mark_sent_many_ids(store: LocalStore) -> None:
    store.write([make_payload(f"conv_{n}") for n in range(2500)])
    ids = [row_id for row_id, _ in unsent(store, 5000)]
    assert len(ids) == 2500
    assert mark_sent(store, ids) == 2500
    assert unsent(store, 10) == []


def _write_in_process(path: str, prefix: str, count: int, start: Any) -> None:
    # Both children start writing together, however long each took to import.
    start.wait(timeout=60)
    with LocalStore(path) as store:
        for batch in range(0, count, 100):
            store.write(
                [make_payload(f"{prefix}{n:06d}", at=BASE + n) for n in range(batch, batch + 100)]
            )


def test_two_processes_write_concurrently(db: Path) -> None:
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(2)
    workers = [
        context.Process(target=_write_in_process, args=(str(db), prefix, 5000, start))
        for prefix in ("conv_a", "conv_b")
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    assert rows(db, "SELECT count(*), count(DISTINCT conversation_id) FROM events") == [
        (10000, 10000)
    ]
    assert rows(db, "PRAGMA integrity_check") == [("ok",)]
    # The two writers really interleaved (a process ran while the other had not finished).
    runs = rows(
        db,
        "SELECT count(*) FROM (SELECT substr(conversation_id, 1, 6) AS who,"
        " lag(substr(conversation_id, 1, 6)) OVER (ORDER BY id) AS before FROM events)"
        " WHERE who != before",
    )
    assert runs[0][0] >= 1


def _write_in_forked_child(store: LocalStore) -> None:
    store.write([make_payload("conv_child", at=BASE + 1)])
    store.close()


@pytest.mark.skipif(sys.platform == "win32", reason="no fork on Windows")
def test_fork_gets_its_own_connection(store: LocalStore, db: Path) -> None:
    store.write([make_payload("conv_parent", at=BASE)])
    with warnings.catch_warnings():
        # Python 3.12+ warns about fork() in a process that has threads; this test
        # forks precisely to check that the store survives it.
        warnings.simplefilter("ignore", DeprecationWarning)
        child = multiprocessing.get_context("fork").Process(
            target=_write_in_forked_child, args=(store,)
        )
        child.start()
    child.join(timeout=60)
    assert child.exitcode == 0
    store.write([make_payload("conv_parent_again", at=BASE + 2)])
    assert rows(db, "SELECT conversation_id FROM events ORDER BY ts") == [
        ("conv_parent",),
        ("conv_child",),
        ("conv_parent_again",),
    ]


def test_changed_pid_without_fork_hooks_reopens(
    store: LocalStore, db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.write([make_payload("conv_before")])
    inherited = store._conn
    real_pid = os.getpid()
    monkeypatch.setattr(os, "getpid", lambda: real_pid + 1)
    try:
        store.write([make_payload("conv_after")])
        assert store._conn is not inherited
        # The "inherited" connection is parked, not closed, and never used again.
        assert _store._INHERITED[-1] is inherited
    finally:
        monkeypatch.undo()
        # In this (real, single) process closing it is safe; a forked child never does.
        _store._INHERITED.remove(inherited)  # type: ignore[arg-type]
        assert inherited is not None
        inherited.close()
    assert rows(db, "SELECT count(*) FROM events") == [(2,)]


def test_close_from_another_thread(store: LocalStore, db: Path) -> None:
    import threading

    writer = threading.Thread(target=store.write, args=([make_payload("conv_t")],))
    writer.start()
    writer.join()
    store.close()
    assert rows(db, "SELECT count(*) FROM events") == [(1,)]


def test_an_event_made_huge_by_a_hook_is_kept_without_the_hook_s_values(
    store: LocalStore, db: Path
) -> None:
    from agentsight_middleware import _payload, _store

    assert _store._MAX_EVENT_CHARS == _payload.MAX_EVENT_CHARS
    payload = make_payload("conv_huge")
    payload["metadata"] = {**payload["metadata"], "blob": "x" * 1_000_000}
    assert store.write([payload]) == 1
    [(body,)] = rows(db, "SELECT payload FROM events")
    kept = json.loads(body)["metadata"]
    assert "blob" not in kept
    assert kept["page_path"] == payload["metadata"]["page_path"]


@pytest.mark.parametrize("how", ["move", "delete"])
def test_a_store_moved_or_deleted_under_a_running_app_is_created_again(
    store: LocalStore, db: Path, tmp_path: Path, how: str
) -> None:
    # The README says to move or delete the file once sent: a running app's open
    # connection went on writing into the old inode (the deleted file, or the archive),
    # and the report on the configured path found no file at all.
    store.write([make_payload("conv_before")])
    archive = tmp_path / "archive.sqlite3"
    for suffix in ("", "-wal", "-shm"):
        source = Path(f"{db}{suffix}")
        if source.exists():
            if how == "move":
                source.rename(f"{archive}{suffix}")
            else:
                source.unlink()
    store.write([make_payload("conv_after")])
    assert rows(db, "SELECT conversation_id FROM events") == [("conv_after",)]
    if how == "move":
        assert rows(archive, "SELECT conversation_id FROM events") == [("conv_before",)]


def _ids(path: Path) -> list[str]:
    return [row[0] for row in rows(path, "SELECT conversation_id FROM events ORDER BY id")]


@pytest.mark.parametrize("how", ["move", "replace", "delete"])
def test_only_the_main_file_rotated_under_a_running_app(
    store: LocalStore, db: Path, tmp_path: Path, how: str
) -> None:
    # Moving the main file alone left every write not yet checkpointed (all of them,
    # under 1,000 pages) in the -wal at the old name: the moved file had no table at
    # all; and a file moved in at the path was read with that stale -wal.
    before = [f"conv_before{n:03d}" for n in range(50)]
    for conversation_id in before:
        store.write([make_payload(conversation_id)])
    archive = tmp_path / "archive.sqlite3"
    if how == "delete":
        db.unlink()
    else:
        db.rename(archive)
    if how == "replace":
        # Another events file of its own put in its place (a restored backup, say).
        with LocalStore(tmp_path / "other.sqlite3") as other:
            other.write([make_payload("conv_other")])
        (tmp_path / "other.sqlite3").rename(db)
    store.write([make_payload("conv_after")])
    store.close()
    expected_at_path = ["conv_other", "conv_after"] if how == "replace" else ["conv_after"]
    assert _ids(db) == expected_at_path
    assert rows(db, "PRAGMA integrity_check") == [("ok",)]
    if how != "delete":
        assert _ids(archive) == before
        assert rows(archive, "PRAGMA integrity_check") == [("ok",)]
        assert not Path(f"{archive}-wal").exists()  # it needs no -wal of its own


def test_a_store_that_stays_with_its_file_keeps_its_last_writes_when_moved(
    db: Path, tmp_path: Path
) -> None:
    # `send` (follow_path=False) marks rows in the file it opened; moved meanwhile,
    # its marks stayed in the -wal at the old name, and the next run sent them again.
    with LocalStore(db) as writer:
        writer.write([make_payload(f"conv_{n:03d}") for n in range(20)])
    replay = LocalStore(db, follow_path=False)
    ids = [row_id for row_id, _ in unsent(replay, 100)]
    archive = tmp_path / "archive.sqlite3"
    db.rename(archive)
    mark_sent(replay, ids)
    replay.close()
    assert rows(archive, "SELECT count(*) FROM events WHERE sent_at IS NOT NULL") == [(20,)]


def _store_process(path: str, commands: Any) -> None:
    # Writes what it is told, one transaction each, as an app's worker does; answers
    # with what the package logged meanwhile.
    import logging

    logged: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            logged.append(record.getMessage())

    logging.getLogger("agentsight_middleware").addHandler(Collect())
    reader: sqlite3.Connection | None = None
    with LocalStore(path) as store:
        while True:
            command = commands.recv()
            if command is None:
                break
            if command == "read":  # a reader (a report, a browser) with the file open
                reader = sqlite3.connect(path)
                reader.execute("SELECT count(*) FROM events").fetchone()
            elif command == "unread" and reader is not None:
                reader.close()
            else:
                try:
                    store.write([make_payload(command)])
                except sqlite3.OperationalError as exc:
                    logged.append(f"raised: {exc}")
            commands.send(logged[:])
            logged.clear()


class _Processes:
    """Store processes (see _store_process) on one path, each told what to do in turn."""

    def __init__(self, path: Path, count: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.pipes: list[Any] = []
        self.processes: list[Any] = []
        for _ in range(count):
            self.start(path, context)

    def start(self, path: Path, context: Any = None) -> int:
        context = context or multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe()
        process = context.Process(target=_store_process, args=(str(path), theirs))
        process.start()
        self.pipes.append(ours)
        self.processes.append(process)
        return len(self.pipes) - 1

    def tell(self, which: int, command: str) -> list[str]:
        self.pipes[which].send(command)
        assert self.pipes[which].poll(60), "the store process did not answer"
        logged: list[str] = self.pipes[which].recv()
        return logged

    def stop(self, which: int) -> None:
        self.pipes[which].send(None)
        self.processes[which].join(timeout=60)
        assert self.processes[which].exitcode == 0

    def stop_all(self) -> None:
        for which, process in enumerate(self.processes):
            if process.exitcode is None:
                self.stop(which)


def test_only_the_main_file_moved_under_two_processes(db: Path, tmp_path: Path) -> None:
    # A new file at the path would share the -wal and -shm files with the moved one
    # while the other process has it open: the first to notice started one, the other
    # then checkpointed the new file's pages into the moved file (whose 30 events were
    # gone). Both now stay with the moved file, and say so once.
    context = multiprocessing.get_context("spawn")
    pipes = []
    processes = []
    for _ in range(2):
        ours, theirs = context.Pipe()
        process = context.Process(target=_store_process, args=(str(db), theirs))
        process.start()
        pipes.append(ours)
        processes.append(process)

    def write(which: int, conversation_id: str) -> list[str]:
        pipes[which].send(conversation_id)
        assert pipes[which].poll(60), "the store process did not answer"
        logged: list[str] = pipes[which].recv()
        return logged

    logged: list[str] = []
    try:
        for n in range(30):
            assert write(n % 2, f"conv_old{n:03d}") == []
        archive = tmp_path / "archive.sqlite3"
        db.rename(archive)
        for n in range(30):
            logged += write(n % 2, f"conv_new{n:03d}")
    finally:
        for pipe in pipes:
            pipe.send(None)
        for process in processes:
            process.join(timeout=60)
    assert [process.exitcode for process in processes] == [0, 0]
    assert _ids(archive) == [f"conv_old{n:03d}" for n in range(30)] + [
        f"conv_new{n:03d}" for n in range(30)
    ]
    assert rows(archive, "PRAGMA integrity_check") == [("ok",)]
    assert not db.exists()
    assert len(logged) == 2
    assert all("other processes had it open" in line for line in logged)


def test_a_process_alone_with_a_moved_file_starts_a_new_one_after_the_others_left(
    db: Path, tmp_path: Path
) -> None:
    # The other process closed before this one noticed: nothing shares the -wal any
    # more, so this one moves it into the file and starts a new one.
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    process = context.Process(target=_store_process, args=(str(db), theirs))
    process.start()
    with LocalStore(db) as store:
        store.write([make_payload("conv_mine")])
        ours.send("conv_theirs")
        assert ours.poll(60)
        assert ours.recv() == []
        ours.send(None)
        process.join(timeout=60)
        archive = tmp_path / "archive.sqlite3"
        db.rename(archive)
        store.write([make_payload("conv_after")])
    assert _ids(archive) == ["conv_mine", "conv_theirs"]
    assert _ids(db) == ["conv_after"]


def test_a_reader_at_the_move_holds_the_app_on_the_moved_file_only_while_it_reads(
    db: Path, tmp_path: Path
) -> None:
    # A report open on the file when it moved kept the app on the moved file for good (and
    # the first probe for other users left a lock that kept every later reader out of it).
    others = _Processes(db, 1)
    try:
        with LocalStore(db) as store:
            store.write([make_payload("conv_before")])
            others.tell(0, "read")
            archive = tmp_path / "archive.sqlite3"
            db.rename(archive)
            store.write([make_payload("conv_while_read")])
            assert not db.exists()  # stays with the moved file while it is read...
            others.tell(0, "unread")
            store.write([make_payload("conv_after")])  # ...and starts a new one after
        assert _ids(archive) == ["conv_before", "conv_while_read"]
        assert _ids(db) == ["conv_after"]
    finally:
        others.stop_all()


def test_a_process_started_while_others_stay_with_a_moved_file_waits_for_them(
    db: Path, tmp_path: Path
) -> None:
    # A worker started meanwhile (gunicorn --max-requests, a reload) made a new file at
    # the path, whose -wal and -shm the others were using: "disk I/O error" on its every
    # write, and all 32 events of both files gone. It now finds the path in use, and
    # starts the new file once the others have stopped.
    group = _Processes(db, 2)
    try:
        for n in range(10):
            group.tell(n % 2, f"conv_old{n:03d}")
        archive = tmp_path / "archive.sqlite3"
        db.rename(archive)
        for n in range(10, 20):
            group.tell(n % 2, f"conv_old{n:03d}")  # both stay with the moved file
        late = group.start(db)
        logged = group.tell(late, "conv_late_first")
        assert any("raised:" in line and "is locked" in line for line in logged), logged
        assert not db.exists() or db.stat().st_size == 0
        group.stop(0)
        group.stop(1)
        group.tell(late, "conv_late")
    finally:
        group.stop_all()
    assert _ids(archive) == [f"conv_old{n:03d}" for n in range(20)]
    assert rows(archive, "PRAGMA integrity_check") == [("ok",)]
    assert _ids(db) == ["conv_late"]


def test_staying_with_a_moved_file_looks_for_sqlite_s_descriptors_once(
    db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # While a process stayed with a moved file, each write looked through /proc/self/fd
    # for SQLite's descriptors again (4.3 ms a write with 2,000 descriptors open, 0.08 ms
    # otherwise). They are kept while they name their files; the process still moves on
    # once the other user has gone.
    looks = 0
    fds_of = _store._fds_of

    def counted(*identities: tuple[int, int] | None) -> list[int | None]:
        nonlocal looks
        looks += 1
        return fds_of(*identities)

    monkeypatch.setattr(_store, "_fds_of", counted)
    others = _Processes(db, 1)
    try:
        with LocalStore(db) as store:
            store.write([make_payload("conv_before")])
            others.tell(0, "read")
            archive = tmp_path / "archive.sqlite3"
            db.rename(archive)
            for n in range(20):
                store.write([make_payload(f"conv_moved{n:02d}")])
            assert not db.exists()
            assert looks == 1
            others.tell(0, "unread")
            store.write([make_payload("conv_after")])
        assert _ids(archive) == ["conv_before"] + [f"conv_moved{n:02d}" for n in range(20)]
        assert _ids(db) == ["conv_after"]
    finally:
        others.stop_all()


def test_a_file_behind_a_folder_closed_to_the_reader_is_not_called_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The app runs as another user, its data folder closed to the one running the report
    # (stat() fails with EACCES, as it does under a 0700 folder): the report said "there is
    # no folder" (or that the middleware had not created the file yet).
    closed = tmp_path / "app"
    (closed / "data").mkdir(parents=True)
    path = closed / "data" / "events.sqlite3"
    with LocalStore(path) as store:
        store.write([make_payload("conv_a")])
    stat = os.stat

    def denied(target: Any, *args: Any, **kwargs: Any) -> Any:
        if str(os.fspath(target)).startswith(str(closed) + os.sep):
            raise PermissionError(13, "Permission denied", str(target))
        return stat(target, *args, **kwargs)

    monkeypatch.setattr(os, "stat", denied)
    with pytest.raises(StoreError) as caught:
        connect_readonly(path)
    assert not isinstance(caught.value, StoreNotFoundError), caught.value
    assert "Permission denied" in str(caught.value), caught.value


def test_the_wal_is_cut_back_after_a_busy_stretch(tmp_path: Path) -> None:
    # A burst written in one go (a backlog, four workers at once) grew the -wal to its
    # size, 10-20 MB under gunicorn -w 4, and SQLite kept the file that large for good.
    path = tmp_path / "events.sqlite3"
    with LocalStore(path) as store:
        store.write([make_payload(f"conv_{n:012d}") for n in range(30_000)])
        assert os.path.getsize(f"{path}-wal") > 2 * _store.WAL_SIZE_LIMIT
        for n in range(5):  # the checkpoints after it
            store.write([make_payload(f"conv_again{n:07d}")])
        assert os.path.getsize(f"{path}-wal") <= _store.WAL_SIZE_LIMIT
