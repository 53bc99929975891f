"""The outboxes keep each conversation in order and never hand out one event twice."""

from __future__ import annotations

import contextlib
import math
import os
import sqlite3
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentsight_middleware._store import WAL_SIZE_LIMIT
from agentsight_middleware.sinks.outbox import MemoryOutbox, Outbox, SQLiteOutbox


def _outbox(tmp_path: Path, kind: int) -> Outbox:
    # Only the one asked for: an SQLite outbox built and never closed is a
    # ResourceWarning (an error here) on Python 3.13.
    return MemoryOutbox(10_000) if kind == 0 else SQLiteOutbox(tmp_path / "o.sqlite3")


@pytest.mark.parametrize("kind", [0, 1], ids=["memory", "sqlite"])
def test_one_event_per_conversation_in_flight_and_in_order(tmp_path: Path, kind: int) -> None:
    outbox = _outbox(tmp_path, kind)
    outbox.put([("a", b"a1"), ("a", b"a2"), ("b", b"b1"), ("a", b"a3")])
    now = time.time()
    first = outbox.claim(10, now)
    assert [i.body for i in first] == [b"a1", b"b1"]
    assert outbox.claim(10, now) == []  # both conversations are in flight
    outbox.retry(first[0], now + 60)  # a1 waits: a2 must not overtake it
    assert outbox.claim(10, now) == []
    outbox.ack([first[1]])
    [again] = outbox.claim(10, now + 61)
    assert again.body == b"a1"
    assert again.attempts == 1
    outbox.ack([again])
    assert [i.body for i in outbox.claim(10, now + 61)] == [b"a2"]
    assert outbox.depth() == 2
    outbox.close()


@pytest.mark.parametrize("kind", [0, 1], ids=["memory", "sqlite"])
def test_oldest_events_first_so_a_busy_conversation_takes_turns(tmp_path: Path, kind: int) -> None:
    # Both outboxes hand out the oldest free events first: a conversation whose event
    # was just sent goes behind the others instead of being served again at once.
    outbox = _outbox(tmp_path, kind)
    outbox.put([("a", b"a1"), ("b", b"b1"), ("c", b"c1"), ("a", b"a2")])
    now = time.time()
    [first] = outbox.claim(1, now)
    assert first.body == b"a1"
    outbox.ack([first])
    assert [i.body for i in outbox.claim(2, now)] == [b"b1", b"c1"]
    assert [i.body for i in outbox.claim(2, now)] == [b"a2"]
    outbox.close()


@pytest.mark.parametrize("kind", [0, 1], ids=["memory", "sqlite"])
def test_depth_upto_counts_every_row_no_further_than_asked(tmp_path: Path, kind: int) -> None:
    # Claimed rows and rows behind their conversation's head are waiting too.
    outbox = _outbox(tmp_path, kind)
    outbox.put([("a", b"a1"), ("a", b"a2"), ("b", b"b1"), ("c", b"c1")])
    outbox.claim(1, time.time())
    assert [outbox.depth_upto(n) for n in (1, 3, 4, 100)] == [1, 3, 4, 4]
    assert outbox.depth_upto(100) == outbox.depth()
    outbox.close()


def test_memory_outbox_is_bounded() -> None:
    outbox = MemoryOutbox(3)
    assert outbox.put([(str(i), b"x") for i in range(5)]) == 3
    assert outbox.depth() == 3


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from("abcd"), min_size=1, max_size=40), st.integers(1, 5))
def test_memory_outbox_delivers_everything_in_per_conversation_order(
    conversations: list[str], batch: int
) -> None:
    outbox = MemoryOutbox(1000)
    outbox.put([(c, f"{c}{n}".encode()) for n, c in enumerate(conversations)])
    delivered: list[bytes] = []
    while outbox.depth():
        claimed = outbox.claim(batch, time.time())
        assert claimed
        assert len({i.conversation_id for i in claimed}) == len(claimed)
        outbox.ack(claimed)
        delivered += [i.body for i in claimed]
    assert sorted(delivered) == sorted(f"{c}{n}".encode() for n, c in enumerate(conversations))
    for c in "abcd":
        mine = [int(b[1:]) for b in delivered if b[:1] == c.encode()]
        assert mine == sorted(mine)


# One step of the sink's use of an outbox: put events of conversations, claim up to n,
# or do something to one claimed item (acknowledge, retry later, defer, give back).
_STEPS = st.one_of(
    st.tuples(st.just("put"), st.lists(st.sampled_from("abcdef"), min_size=1, max_size=4)),
    st.tuples(st.just("claim"), st.integers(1, 4)),
    st.tuples(st.sampled_from(["ack", "retry", "defer", "release"]), st.integers(0, 7)),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_STEPS, max_size=60))
def test_memory_outbox_claims_every_free_head_and_only_those(steps: list[Any]) -> None:
    """Against a model of the rules: a claim takes as many heads as it may, each the oldest
    event of its conversation, none in flight or waiting for a retry; what waits and what
    is due (``mine``) agree with the model after every step."""
    outbox = MemoryOutbox(1000)
    queues: dict[str, list[bytes]] = {}  # the model: events waiting, by conversation
    in_flight: dict[str, Any] = {}  # conversation -> its claimed head
    waiting_retry: set[str] = set()  # conversations whose head waits for a retry
    now, later = 1000.0, 1060.0
    serial = 0
    for step in steps:
        if step[0] == "put":
            events = []
            for conversation in step[1]:
                serial += 1
                events.append((conversation, f"{conversation}{serial}".encode()))
                queues.setdefault(conversation, []).append(events[-1][1])
            assert outbox.put(events) == len(events)
        elif step[0] == "claim":
            free = {c for c in queues if c not in in_flight and c not in waiting_retry}
            claimed = outbox.claim(step[1], now)
            assert len(claimed) == min(step[1], len(free))
            assert {i.conversation_id for i in claimed} <= free
            assert len({i.conversation_id for i in claimed}) == len(claimed)
            for item in claimed:
                assert item.body == queues[item.conversation_id][0]
                assert item.leased
                in_flight[item.conversation_id] = item
        elif in_flight:
            conversation = sorted(in_flight)[step[1] % len(in_flight)]
            item = in_flight.pop(conversation)
            if step[0] == "ack":
                outbox.ack([item])
                queues[conversation].pop(0)
                if not queues[conversation]:
                    del queues[conversation]
            elif step[0] == "release":
                outbox.release(item)
            else:  # retry or defer: due only later
                (outbox.retry if step[0] == "retry" else outbox.defer)(item, later)
                waiting_retry.add(conversation)
        size = sum(map(len, queues.values()))
        free_now = [c for c in queues if c not in in_flight and c not in waiting_retry]
        assert outbox.depth() == size
        assert outbox.mine(now + 1) == (size, len(free_now))
        assert outbox.mine(later + 1) == (size, len([c for c in queues if c not in in_flight]))
    # Past the retries' time, everything is delivered, each conversation in order.
    for item in in_flight.values():
        outbox.release(item)
    delivered: dict[str, list[bytes]] = {}
    while outbox.depth():
        claimed = outbox.claim(3, later + 1)
        assert claimed
        outbox.ack(claimed)
        for item in claimed:
            delivered.setdefault(item.conversation_id, []).append(item.body)
    assert delivered == queues


class _FailingCommit:
    """A connection whose next COMMIT fails, as one does on a full disk."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self.fail_next_commit = True

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql == "COMMIT" and self.fail_next_commit:
            self.fail_next_commit = False
            raise sqlite3.OperationalError("database or disk is full")
        return self._conn.execute(sql, *args)

    def __getattr__(self, name: str) -> object:
        return getattr(self._conn, name)


def test_a_failed_commit_is_rolled_back_and_the_outbox_goes_on(tmp_path: Path) -> None:
    outbox = SQLiteOutbox(tmp_path / "o.sqlite3")
    real = outbox._connect()
    failing = _FailingCommit(real)
    outbox._conn = failing  # type: ignore[assignment]
    with pytest.raises(sqlite3.OperationalError, match="disk is full"):
        outbox.put([("a", b"lost")])
    # Left open, the transaction would make every later write fail ("cannot start a
    # transaction within a transaction") and keep the lost row half-written.
    assert not real.in_transaction
    assert outbox.put([("b", b"kept")]) == 1
    assert [i.body for i in outbox.claim(10, time.time())] == [b"kept"]
    outbox._conn = real
    outbox.close()


def _use_outbox_in_child(outbox: SQLiteOutbox) -> None:
    # Runs in a forked child: the parent's lock was held at fork by a thread that
    # does not exist here.
    outbox.put([("conv_child", b"{}")])
    assert outbox.depth() == 2
    outbox.close()


def test_a_lock_held_at_fork_does_not_hang_the_child(tmp_path: Path) -> None:
    import multiprocessing
    import sys
    import warnings

    if sys.platform == "win32":
        pytest.fail("runs where fork exists; this suite runs on Linux")
    outbox = SQLiteOutbox(tmp_path / "outbox.sqlite3")
    outbox.put([("conv_parent", b"{}")])
    with outbox._lock, warnings.catch_warnings():  # the parent's worker, inside a call
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
        child = multiprocessing.get_context("fork").Process(
            target=_use_outbox_in_child, args=(outbox,)
        )
        child.start()
        child.join(timeout=20)
    if child.exitcode is None:
        child.kill()
    assert child.exitcode == 0
    assert outbox.depth() == 2  # the parent goes on with its own connection
    outbox.close()


def _file_from_before_the_origin_column(path: Path) -> None:
    old = sqlite3.connect(path)
    old.execute(
        "CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, conversation_id TEXT NOT NULL,"
        " body BLOB NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, not_before REAL NOT NULL"
        " DEFAULT 0, lease_until REAL NOT NULL DEFAULT 0, lease_owner TEXT)"
    )
    old.execute("CREATE INDEX outbox_conversation ON outbox (conversation_id, id)")
    old.execute("INSERT INTO outbox (conversation_id, body) VALUES ('conv_old', x'7b7d')")
    old.commit()
    old.close()


def test_a_file_from_before_the_origin_column_is_upgraded_in_place(tmp_path: Path) -> None:
    # Rows are marked with the process that put them (flush() and shutdown wait for their
    # own); a file an older release created has no such column, and its rows stay theirs.
    path = tmp_path / "old.sqlite3"
    _file_from_before_the_origin_column(path)
    outbox = SQLiteOutbox(path)
    outbox.put([("conv_new", b"{}")])
    now = time.time()
    assert outbox.mine(now) == (1, 1)
    assert outbox.depth() == 2
    assert sorted(i.conversation_id for i in outbox.claim(10, now)) == ["conv_new", "conv_old"]
    assert outbox.mine(now) == (1, 0)  # claimed here: the caller knows it is in flight
    outbox.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        indexes = {
            row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='index'")
        }
    # The claim's index made, the old one (which every put kept up for nothing) gone.
    assert indexes == {"outbox_conversation_kind"}


def test_an_upgrade_meeting_a_held_write_lock_is_done_at_the_first_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another process held the write lock past the busy timeout while the app started: the
    # column was never added, and every event the process handled was lost ("table outbox
    # has no column named origin").
    from agentsight_middleware.sinks import outbox as outbox_module

    monkeypatch.setattr(outbox_module, "_BUSY_TIMEOUT", 0.2)
    path = tmp_path / "old.sqlite3"
    _file_from_before_the_origin_column(path)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    outbox = SQLiteOutbox(path)  # starts: the file is fine, only busy
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        outbox.put([("conv_new", b"{}")])  # the caller retries a locked file
    holder.execute("COMMIT")
    holder.close()
    assert outbox.put([("conv_new", b"{}")]) == 1
    assert outbox.depth() == 2
    with contextlib.closing(sqlite3.connect(path)) as conn:
        columns = {row[1] for row in conn.execute("PRAGMA table_info(outbox)")}
    assert "origin" in columns
    outbox.close()


def test_a_write_waiting_for_a_lock_ends_at_a_deadline_set_meanwhile(tmp_path: Path) -> None:
    # SQLite's busy wait, once started, ran its whole 10 s whatever shutdown's deadline:
    # the wait is now made of short tries, each looking at the deadline.
    import threading

    path = tmp_path / "o.sqlite3"
    outbox = SQLiteOutbox(path)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    failed: list[BaseException] = []

    def put() -> None:
        try:
            outbox.put([("conv_a", b"{}")])
        except BaseException as exc:
            failed.append(exc)

    writer = threading.Thread(target=put)
    writer.start()
    time.sleep(0.3)  # waiting for the lock
    outbox.deadline = time.monotonic() + 0.2
    writer.join(5)  # the busy timeout is 10 s
    try:
        assert not writer.is_alive()
        [error] = failed
        assert "locked" in str(error)
    finally:
        holder.close()
        writer.join()
        outbox.close()


def test_closing_with_the_file_locked_leaves_the_claims_as_they_are(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Past the deadline the leases cannot be handed back: close() then waited the whole
    # busy timeout and raised (the worker's error, "starts again in 30 s", at exit). It now
    # leaves the rows leased (sent once the lease runs out, or by this host's next start,
    # which frees dead processes' leases) and says so.
    path = tmp_path / "o.sqlite3"
    outbox = SQLiteOutbox(path)
    outbox.put([("conv_a", b"{}"), ("conv_b", b"{}")])
    [claimed, _] = outbox.claim(2, time.time())
    outbox.ack([claimed])
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    outbox.deadline = time.monotonic() + 0.3
    try:
        outbox.close()
    finally:
        holder.close()
    assert "keeps its claim" in caplog.text
    with contextlib.closing(sqlite3.connect(path)) as conn:
        leased = conn.execute("SELECT conversation_id, lease_owner IS NOT NULL FROM outbox")
        assert leased.fetchall() == [("conv_b", 1)]
    again = SQLiteOutbox(path)  # a next start: the claim is this (live) process's, kept
    assert again.claim(10, time.time()) == []
    again.close()


def test_a_page_view_written_after_its_chat_by_another_process_still_goes_first(
    tmp_path: Path,
) -> None:
    # gunicorn -w 4 behind a proxy: the page view is served by one worker, the chat a few
    # ms later by another, whose row reached the shared file first (each worker writes
    # within ~20 ms, its first events up to ~0.3 s). The API got the chat (is_used: true)
    # before the page view (is_used: false) for 1-16 % of such conversations.
    chat_worker = SQLiteOutbox(tmp_path / "o.sqlite3")
    view_worker = SQLiteOutbox(tmp_path / "o.sqlite3")
    chat_worker.put([("a", b"a-chat")], views=[False])
    now = time.time()
    assert chat_worker.claim(10, now) == []  # the chat waits for a view to arrive
    view_worker.put([("a", b"a-view")], views=[True])
    [view] = chat_worker.claim(10, now + 5)  # the view first, however late it came
    assert view.body == b"a-view"
    assert chat_worker.claim(10, now + 5) == []  # the chat waits for the view's answer
    chat_worker.ack([view])
    assert [i.body for i in chat_worker.claim(10, now + 5)] == [b"a-chat"]
    chat_worker.close()
    view_worker.close()


def test_a_chat_waits_for_a_process_still_starting_past_the_settle_time(tmp_path: Path) -> None:
    # gunicorn restarts a worker: its first events reach the file only after its one-time
    # work (the HTTP client's import, the user-agent parser's build), 0.6-2.6 s on a busy
    # machine; a chat served meanwhile by a worker up already went before its view.
    chat_worker = SQLiteOutbox(tmp_path / "o.sqlite3")
    new_worker = SQLiteOutbox(tmp_path / "o.sqlite3")
    began = time.time()
    new_worker.starting(began)
    chat_worker.put(
        [("before", b"before-chat"), ("a", b"a-chat")], views=[False, False],
        times=[began - 0.1, began + 0.1],
    )  # fmt: skip
    later = began + 1.5  # past SETTLE for both
    # Requested before the start began: its view was not this worker's to write.
    assert [i.body for i in chat_worker.claim(10, later)] == [b"before-chat"]
    assert chat_worker.claim(10, later) == []  # the other waits for the start
    new_worker.put([("a", b"a-view")], views=[True])
    new_worker.starting(None)
    assert [i.body for i in chat_worker.claim(10, later)] == [b"a-view"]
    chat_worker.close()
    new_worker.close()


def test_a_start_is_waited_for_no_longer_than_its_limit(tmp_path: Path) -> None:
    from agentsight_middleware.sinks.outbox import SETTLE, STARTING_MOST

    chat_worker = SQLiteOutbox(tmp_path / "o.sqlite3")
    stalled = SQLiteOutbox(tmp_path / "o.sqlite3")
    began = time.time()
    stalled.starting(began)
    chat_worker.put([("a", b"a-chat")], views=[False], times=[began])
    assert chat_worker.claim(10, began + STARTING_MOST - 1) == []
    assert [i.body for i in chat_worker.claim(10, began + STARTING_MOST + SETTLE)] == [b"a-chat"]
    chat_worker.close()
    stalled.close()


def _start_and_die(path: Path) -> None:
    SQLiteOutbox(path).starting(time.time())
    os._exit(0)  # as at a SIGKILL: no close()


def test_a_start_of_a_process_that_no_longer_runs_is_not_waited_for(tmp_path: Path) -> None:
    # A worker killed while starting (gunicorn's timeout, the OOM killer, a deploy) held
    # every chat for STARTING_MOST: gunicorn starts another one at once.
    path = tmp_path / "o.sqlite3"
    chat_worker = SQLiteOutbox(path)
    began = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
        pid = os.fork()
    if pid == 0:
        _start_and_die(path)
    os.waitpid(pid, 0)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT count(*) FROM starting").fetchone() == (1,)
    chat_worker.put([("a", b"a-chat")], views=[False], times=[began + 0.1])
    assert [i.body for i in chat_worker.claim(10, began + 1.5)] == [b"a-chat"]
    chat_worker.close()


def test_a_process_stopped_while_starting_takes_its_start_back(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite3"
    stopped = SQLiteOutbox(path)
    stopped.starting(time.time())
    stopped.close()  # a SIGTERM during the start
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT count(*) FROM starting").fetchone() == (0,)


def test_a_start_ended_while_another_process_writes_is_not_waited_for(tmp_path: Path) -> None:
    # The end of a start is said best effort, after a short wait for the write lock: one
    # held longer by another process (a large batch, a backup) meanwhile left the note
    # there, and every chat requested since waited STARTING_MOST, not for the start.
    path = tmp_path / "o.sqlite3"
    chat_worker = SQLiteOutbox(path)
    new_worker = SQLiteOutbox(path)
    began = time.time()
    new_worker.starting(began)
    chat_worker.put([("a", b"a-chat")], views=[False], times=[began + 0.1])
    new_worker.put([("a", b"a-view")], views=[True])
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")
        new_worker.starting(None)  # gives up on the lock: the start is over all the same
        other.execute("ROLLBACK")
    # Its senders' next look for work (every 0.1 s): the view goes, then its chat.
    new_worker.ack(new_worker.claim(10, began + 1.5))
    assert [i.body for i in chat_worker.claim(10, began + 1.5)] == [b"a-chat"]
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT count(*) FROM starting").fetchone() == (0,)
    chat_worker.close()
    new_worker.close()


def test_a_chat_with_no_page_view_goes_after_the_settle_time(tmp_path: Path) -> None:
    outbox = SQLiteOutbox(tmp_path / "o.sqlite3")
    outbox.put([("a", b"a1"), ("a", b"a2")], views=[False, False])
    now = time.time()
    assert outbox.claim(10, now) == []
    assert [i.body for i in outbox.claim(10, now + 1.5)] == [b"a1"]
    outbox.close()


@pytest.mark.parametrize("kind", [0, 1], ids=["memory", "sqlite"])
def test_a_wait_timed_before_the_clock_was_stepped_back_is_not_waited_out(
    tmp_path: Path, kind: int
) -> None:
    # A retry 2 s ahead, timed on a clock an hour fast that NTP then set right, is due
    # an hour and 2 s ahead of the clock now: it waited out the step (a chat settling in
    # a durable outbox as well). No wait set here is that long, so it is due now.
    outbox = _outbox(tmp_path, kind)
    outbox.put([("a", b"a1"), ("b", b"b1"), ("c", b"c1")])
    now = time.time()
    a, b, c = outbox.claim(10, now)
    outbox.retry(a, now + 3600 + 2)  # timed by the clock before the step
    outbox.retry(b, now + 60)  # a long backoff, on the clock as it is
    outbox.defer(c, now + 30)  # a Retry-After
    assert outbox.mine(now + 1) == (3, 1)
    [again] = outbox.claim(10, now)
    assert again.body == b"a1"
    outbox.ack([again])
    assert [i.body for i in outbox.claim(10, now + 61)] == [b"b1", b"c1"]
    outbox.close()


def test_a_chat_settling_from_before_a_clock_step_goes_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outbox = SQLiteOutbox(tmp_path / "o.sqlite3")
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 3600)
    outbox.put([("a", b"a-chat")], views=[False])  # settles until an hour and 1 s ahead
    monkeypatch.setattr(time, "time", real)
    assert [i.body for i in outbox.claim(10, time.time())] == [b"a-chat"]
    outbox.close()


def test_a_row_claimed_from_before_a_clock_step_is_handed_back_at_close(
    tmp_path: Path,
) -> None:
    # close() keeps the lease of a claimed row whose not_before is ahead (it takes it for
    # one written and unanswered); a row due because the clock was stepped back is ahead
    # too, and a sibling of this host waited out the whole lease for it.
    path = tmp_path / "o.sqlite3"
    outbox = SQLiteOutbox(path)
    outbox.put([("a", b"a1")])
    now = time.time()
    [item] = outbox.claim(10, now)
    outbox.retry(item, now + 3600)  # timed by the clock before the step
    [again] = outbox.claim(10, time.time())  # due now: claimed, never written
    assert again.body == b"a1"
    outbox.close()
    sibling = SQLiteOutbox(path)
    assert [i.body for i in sibling.claim(10, time.time())] == [b"a1"]
    sibling.close()


def test_the_claim_looks_each_conversation_up_in_one_index_search(tmp_path: Path) -> None:
    # With (conversation_id, id) alone, each candidate's "a row of a lower kind before it?"
    # read every row of its conversation: a claim took minutes for 50,000 chats written
    # ahead of 50,000 page views of one conversation (review).
    from agentsight_middleware.sinks import outbox as outbox_module

    path = tmp_path / "outbox.sqlite3"
    box = SQLiteOutbox(path)
    box.put([("conv_one", b"{}")], None, [False])
    with contextlib.closing(sqlite3.connect(path)) as conn:
        plan = conn.execute(
            "EXPLAIN QUERY PLAN " + outbox_module._CLAIM,
            {
                "now": time.time(),
                "limit": 10,
                "stepped_back": outbox_module.STEPPED_BACK,
                "hold_from": math.inf,
            },
        ).fetchall()
    searches = [row[-1] for row in plan if "AS p" in row[-1] or " p " in row[-1]]
    assert searches, plan
    assert all("USING COVERING INDEX outbox_conversation_kind" in step for step in searches), plan
    box.close()


def test_rows_put_on_a_new_connection_are_this_process_s(tmp_path: Path) -> None:
    # A put that opens the connection (after close(): a second lifespan; after a fork:
    # gunicorn --preload, uWSGI) takes a new owner there, and its rows were marked with
    # the old one: mine() and counts() did not see them, so flush() returned and shutdown
    # stopped while they were still in the file (40 chats left with the API up).
    outbox = SQLiteOutbox(tmp_path / "o.sqlite3")
    outbox.close()
    outbox.put([("conv_a", b"{}"), ("conv_a", b"{}")], None, [True, False])
    assert outbox.mine(time.time() + 5) == (2, 2)
    assert outbox.counts() == (2, 2)
    outbox.close()


def _put_in_child(outbox: SQLiteOutbox) -> None:
    outbox.put([("conv_child", b"{}"), ("conv_child", b"{}")], None, [True, False])
    left, _ = outbox.mine(time.time() + 5)
    mine, _ = outbox.counts()
    outbox.close()
    raise SystemExit(0 if (left, mine) == (2, 2) else 10 + left * 3 + mine)


def test_rows_put_in_a_forked_child_are_the_child_s(tmp_path: Path) -> None:
    import multiprocessing
    import warnings

    outbox = SQLiteOutbox(tmp_path / "o.sqlite3")  # built in the parent (--preload)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
        child = multiprocessing.get_context("fork").Process(target=_put_in_child, args=(outbox,))
        child.start()
        child.join(timeout=20)
    if child.exitcode is None:
        child.kill()
    assert child.exitcode == 0  # 10: the child counted none of its two rows as its own
    outbox.close()


_CLAIMER = """
import sys, time
from agentsight_middleware.sinks.outbox import SQLiteOutbox
box = SQLiteOutbox(sys.argv[1])
box.put([("conv_a", b"{}")])
assert len(box.claim(10, time.time())) == 1
print("claimed", flush=True)
sys.stdin.read()  # alive, sending it, until the test is done
"""

_TAKER = """
import sys, time
from agentsight_middleware.sinks.outbox import SQLiteOutbox
box = SQLiteOutbox(sys.argv[1])  # a start: frees the claims of this host's dead processes
print(len(box.claim(10, time.time())), flush=True)
box.close()
"""


def test_a_live_claim_of_another_pid_namespace_is_not_freed(tmp_path: Path) -> None:
    # Two containers sharing the file and a host name (a Kubernetes pod's, docker
    # --network host) number their processes each in its own PID namespace: a start in
    # one took the other's live claims for dead (its pid named no process there), freed
    # them and sent them a second time (40 of 40 events in flight, in a run of two apps).
    import os
    import shutil
    import subprocess
    import sys

    import agentsight_middleware

    unshare = shutil.which("unshare")
    namespace = [unshare or "unshare", "--pid", "--fork", "--mount-proc"]
    if unshare is None or subprocess.run([*namespace, "true"], capture_output=True).returncode:
        pytest.skip("needs unshare --pid (root, or user namespaces)")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(agentsight_middleware.__file__))
    path = str(tmp_path / "o.sqlite3")
    # The claimer is pid 4 in its namespace, the taker pid 2 in its own: no pid 4 there.
    run = '/bin/true; /bin/true; "$0" -c "$1" "$2"; true'
    claimer = subprocess.Popen(
        [*namespace, "sh", "-c", run, sys.executable, _CLAIMER, path],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert claimer.stdout is not None
        assert claimer.stdout.readline() == "claimed\n"
        taker = subprocess.run(
            [*namespace, "sh", "-c", '"$0" -c "$1" "$2"; true', sys.executable, _TAKER, path],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert taker.stdout == "0\n", taker.stderr  # "1": the live claim was freed and taken
    finally:
        claimer.communicate(timeout=30)


def test_the_outbox_wal_is_cut_back_after_a_backlog(tmp_path: Path) -> None:
    # An outage's backlog written, then delivered: the -wal kept the size it grew to.
    path = tmp_path / "outbox.sqlite3"
    outbox = SQLiteOutbox(path)
    body = b"x" * 600  # about an event's JSON
    outbox.put([(f"conv_{n:012d}", body) for n in range(30_000)])
    assert os.path.getsize(f"{path}-wal") > 2 * WAL_SIZE_LIMIT
    while items := outbox.claim(1000, time.time() + 60):
        outbox.ack(items)
    outbox.put([("conv_after", body)])
    assert os.path.getsize(f"{path}-wal") <= WAL_SIZE_LIMIT
    outbox.close()
