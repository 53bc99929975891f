"""No tracker and no API key: the events are kept in a local SQLite file."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from agentsight_middleware import AgentSightMiddleware
from agentsight_middleware._report import build_report

from .conftest import BROWSER, uvicorn_server


async def page(request: Request) -> Response:
    return HTMLResponse("<p>shop</p>")


async def chat(request: Request) -> Response:
    return JSONResponse({"ok": True})


@pytest.mark.anyio
async def test_events_are_kept_locally_and_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("AGENTSIGHT_API_KEY", raising=False)
    db = tmp_path / "events.sqlite3"
    app = Starlette(routes=[Route("/", page), Route("/api/chat", chat, methods=["POST"])])
    with caplog.at_level(logging.WARNING, logger="agentsight_middleware"):
        mw = AgentSightMiddleware(
            app, widget_pages=["/"], chat_routes=["POST /api/chat"], local_store=db
        )
    assert f"keeping AgentSight events in {db}" in caplog.text
    assert "agentsight-middleware report" in caplog.text
    async with _shop(mw) as c:
        for visitor in range(4):
            c.cookies.clear()
            await c.get("/", headers=BROWSER)
            if visitor % 2 == 0:
                await c.post("/api/chat", json={"message": "hi"})
    assert mw.flush(10)
    report = build_report(db)
    assert report.initialized == 4
    assert report.used == 2
    assert report.interaction_rate_percent == 50.0
    assert mw.stats()["stored"] == 6
    mw.close()


def _shop(mw: AgentSightMiddleware) -> httpx.AsyncClient:
    """A client of the shop, from one visitor's address."""
    transport = httpx.ASGITransport(app=mw, client=("198.51.100.3", 1))
    return httpx.AsyncClient(transport=transport, base_url="http://shop.test")


def _middleware(**options: Any) -> AgentSightMiddleware:
    app = Starlette(routes=[Route("/", page), Route("/api/chat", chat, methods=["POST"])])
    return AgentSightMiddleware(app, widget_pages=["/"], chat_routes=["POST /api/chat"], **options)


def test_a_store_in_a_missing_folder_fails_at_start_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AGENTSIGHT_API_KEY", raising=False)
    with pytest.raises(ValueError, match=r"local_store=.*the folder .* does not exist"):
        _middleware(local_store=tmp_path / "no-such-folder" / "events.sqlite3")


@pytest.mark.parametrize("key_from", ["environment", "argument"])
def test_a_local_store_with_an_api_key_is_said_to_be_unused(
    key_from: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Taken without a word: the events went to the API and the file named was never made.
    key = "ags_" + "1" * 32 + "_abcdef"
    options: dict[str, Any] = {"local_store": tmp_path / "events.sqlite3"}
    if key_from == "environment":
        monkeypatch.setenv("AGENTSIGHT_API_KEY", key)
    else:
        monkeypatch.delenv("AGENTSIGHT_API_KEY", raising=False)
        options["api_key"] = key
    with caplog.at_level(logging.WARNING, logger="agentsight_middleware"):
        mw = _middleware(**options)
    mw.close()
    [said] = [r.getMessage() for r in caplog.records if "local_store=" in r.getMessage()]
    assert said.startswith(f"local_store={str(tmp_path / 'events.sqlite3')!r} is not used")
    where = "AGENTSIGHT_API_KEY" if key_from == "environment" else "api_key="
    assert f"with an API key ({where}) events go to the AgentSight API" in said
    assert key not in caplog.text
    assert "stored" not in mw.stats()  # the API client's counters, not the store's


def test_an_outbox_that_cannot_be_opened_names_the_argument(tmp_path: Path) -> None:
    key = "ags_" + "1" * 32 + "_abcdef"
    with pytest.raises(ValueError, match=r"outbox=.*cannot be used as an SQLite outbox"):
        _middleware(api_key=key, outbox=tmp_path / "no-such-folder" / "outbox.sqlite3")
    corrupt = tmp_path / "corrupt.sqlite3"
    corrupt.write_bytes(b"this is not a database" * 100)
    with pytest.raises(ValueError, match=r"outbox=.*corrupt.sqlite3"):
        _middleware(api_key=key, outbox=corrupt)


@pytest.mark.anyio
async def test_a_broken_store_is_logged_once_not_per_page_view(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("AGENTSIGHT_API_KEY", raising=False)
    corrupt = tmp_path / "events.sqlite3"
    mw = _middleware(local_store=corrupt)
    # Broken after start-up (a file there already fails it): the store opens it at the
    # first event.
    corrupt.write_bytes(b"this is not a database" * 100)
    with caplog.at_level(logging.DEBUG, logger="agentsight_middleware"):
        async with _shop(mw) as c:
            for _ in range(20):
                c.cookies.clear()
                response = await c.get("/", headers=BROWSER)
                assert response.status_code == 200  # the app is untouched
                mw.flush(5)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert errors[0].exc_info is not None
    stats = mw.stats()
    # Events the file could not take are the store's failures, counted once: not the
    # middleware's own errors too.
    assert (stats["failed"], stats["errors"], stats["stored"]) == (20, 0, 0)
    mw.close()


@pytest.mark.anyio
async def test_the_store_records_the_environment_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # send replays stored bodies as they are: development traffic must stay development.
    monkeypatch.delenv("AGENTSIGHT_API_KEY", raising=False)
    monkeypatch.setenv("AGENTSIGHT_ENVIRONMENT", "dev")
    db = tmp_path / "events.sqlite3"
    mw = _middleware(local_store=db)
    async with _shop(mw) as c:
        await c.get("/", headers=BROWSER)
    assert mw.flush(5)
    mw.close()
    import sqlite3

    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("SELECT environment FROM events").fetchall() == [("development",)]
    monkeypatch.setenv("AGENTSIGHT_ENVIRONMENT", "staging")
    with pytest.raises(ValueError, match="AGENTSIGHT_ENVIRONMENT='staging'"):
        _middleware(local_store=tmp_path / "other.sqlite3")


@pytest.mark.anyio
async def test_one_event_the_file_cannot_take_costs_no_other_its_place(tmp_path: Path) -> None:
    # A metadata hook's date for one signed-in visitor once cost the up to 100 events of
    # its batch (other visitors' page views) with one TypeError: a date is kept as its
    # text, and a NaN (which the API refuses) as null, as the built-in client sends them.
    import datetime
    import json
    import sqlite3

    from agentsight_middleware._store import LocalStore
    from agentsight_middleware.sinks.store import StoreSink

    from .test_store import make_payload

    db = tmp_path / "events.sqlite3"
    sink = StoreSink(LocalStore(db))
    dated = make_payload("conv_dated")
    dated["metadata"] = {**dated["metadata"], "member_since": datetime.date(2024, 5, 1)}
    odd = make_payload("conv_odd")
    odd["metadata"] = {**odd["metadata"], "page_path": ["/a", "/b"], "score": 1.5}
    nan = make_payload("conv_nan")
    nan["metadata"] = {**nan["metadata"], "score": float("nan")}
    batch = [make_payload(f"conv_{n:03d}") for n in range(5)]
    await sink.put([*batch[:2], dated, nan, odd, *batch[2:]])
    await sink.aclose()
    assert (sink.stored, sink.failed) == (8, 0)
    with contextlib.closing(sqlite3.connect(db)) as conn:
        kept = dict(conn.execute("SELECT conversation_id, payload FROM events").fetchall())
    assert json.loads(kept["conv_nan"])["metadata"]["score"] is None
    assert json.loads(kept["conv_dated"])["metadata"]["member_since"] == "2024-05-01"


@pytest.mark.anyio
async def test_a_batch_waits_for_a_lock_another_process_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A VACUUM, a backup or a database browser left in a transaction holds the write
    # lock past SQLite's busy timeout: the batch was dropped, from a sink that says it
    # keeps every event. It now waits (the worker's intake is bounded meanwhile).
    import sqlite3
    import threading

    from agentsight_middleware import _store
    from agentsight_middleware.sinks.store import StoreSink

    from .test_store import make_payload

    monkeypatch.setattr(_store, "BUSY_TIMEOUT", 0.2)
    db = tmp_path / "events.sqlite3"
    store = _store.LocalStore(db)
    store.write([make_payload("conv_first")])  # the file exists, in WAL mode
    holder = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    threading.Timer(1.5, holder.execute, ("COMMIT",)).start()
    sink = StoreSink(store)
    await sink.put([make_payload("conv_waited")])
    await sink.aclose()
    holder.close()
    assert (sink.stored, sink.failed) == (1, 0)
    assert "is locked by another process" in caplog.text
    with contextlib.closing(sqlite3.connect(db)) as conn:
        ids = [row[0] for row in conn.execute("SELECT conversation_id FROM events ORDER BY id")]
    assert ids == ["conv_first", "conv_waited"]


@pytest.mark.anyio
async def test_close_keeps_to_its_deadline_with_the_store_locked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A store locked by another process for good: the batch's tries went on past
    # shutdown's deadline, close() gave up on the worker 5 s late, and said "0 event(s)
    # ... lost" although the batch it held was.
    import sqlite3
    import time

    from agentsight_middleware import _store

    monkeypatch.delenv("AGENTSIGHT_API_KEY", raising=False)
    monkeypatch.setattr(_store, "BUSY_TIMEOUT", 0.2)
    db = tmp_path / "events.sqlite3"
    mw = _middleware(local_store=db, shutdown_timeout=0.5)
    async with _shop(mw) as c:
        await c.get("/", headers=BROWSER)
        assert mw.flush(10)  # the file exists
        holder = sqlite3.connect(db, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        c.cookies.clear()
        await c.get("/", headers=BROWSER)
    time.sleep(0.5)  # the worker's batch waits for the lock
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="agentsight_middleware"):
        mw.close()
    closed_in = time.monotonic() - started
    holder.close()
    assert closed_in < 1.5
    assert "1 event(s) lost at shutdown" in caplog.text
    assert mw.stats()["stored"] == 1


@pytest.mark.anyio
async def test_a_worker_started_after_a_close_waits_for_a_lock_as_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A second lifespan (two TestClient blocks, a server restarting it) starts a new
    # worker on the same store: it kept the first shutdown's deadline, long past, so a
    # write meeting a lock got one 0.1 s try and the event was lost.
    import sqlite3
    import threading
    import time

    monkeypatch.delenv("AGENTSIGHT_API_KEY", raising=False)
    db = tmp_path / "events.sqlite3"
    mw = _middleware(local_store=db, shutdown_timeout=0.5)
    async with _shop(mw) as c:
        await c.get("/", headers=BROWSER)
        assert mw.flush(10)
        mw.close()  # the first lifespan's end
        time.sleep(0.6)  # its deadline has passed
        holder = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
        holder.execute("BEGIN IMMEDIATE")
        release = threading.Timer(0.8, holder.close)
        release.start()
        try:
            c.cookies.clear()
            await c.get("/", headers=BROWSER)  # starts the worker again
            assert mw.flush(10)
        finally:
            release.join()
    stats = mw.stats()
    mw.close()
    assert stats["failed"] == 0
    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows = conn.execute("SELECT count(*) FROM events").fetchone()[0]
    assert rows == 2  # before: 1, the second page view lost


@pytest.mark.anyio
async def test_close_ends_a_write_already_waiting_for_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A write already waiting in SQLite's busy timeout (5 s) when close(timeout=1) came
    # finished its wait: close() took 4.5 s.
    import sqlite3
    import time

    monkeypatch.delenv("AGENTSIGHT_API_KEY", raising=False)
    db = tmp_path / "events.sqlite3"
    mw = _middleware(local_store=db)
    async with _shop(mw) as c:
        await c.get("/", headers=BROWSER)
        assert mw.flush(10)  # the file exists
        holder = sqlite3.connect(db, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        c.cookies.clear()
        await c.get("/", headers=BROWSER)
    time.sleep(0.5)  # the worker's batch waits for the lock
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="agentsight_middleware"):
        mw.close(1)
    closed_in = time.monotonic() - started
    holder.close()
    assert closed_in < 3.0
    assert "1 event(s) lost at shutdown" in caplog.text
    assert mw.stats()["stored"] == 1


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["local store", "built-in client"])
async def test_stats_have_every_key_before_the_first_event(tmp_path: Path, mode: str) -> None:
    # The sink's counts appeared only once the worker had started: a health endpoint
    # reading stats()["stored"] or ["sent"] before any traffic got a KeyError.
    app = Starlette(routes=[Route("/", page)])
    options: dict[str, Any] = (
        {"local_store": str(tmp_path / "events.sqlite3")}
        if mode == "local store"
        else {"api_key": "ags_" + "a" * 32 + "_abcdef", "endpoint": "http://127.0.0.1:9"}
    )
    mw = AgentSightMiddleware(app, widget_pages=["/"], shutdown_timeout=0.5, **options)
    try:
        before = mw.stats()
        assert set(before.values()) == {0}
        transport = httpx.ASGITransport(app=mw)
        async with httpx.AsyncClient(transport=transport, base_url="http://shop.test") as c:
            await c.get("/", headers=BROWSER)
        mw.flush(0.5)
        assert set(mw.stats()) == set(before)  # the same keys once the sink exists
    finally:
        mw.close()


@pytest.mark.anyio
async def test_a_store_that_keeps_failing_says_so_again_with_a_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The first lost batch was an ERROR; every later one DEBUG only: a disk that stayed
    # full lost events for hours after one line. Now said again, counted, at most once a
    # minute (here a fraction of a second).
    import sqlite3

    from agentsight_middleware import _log

    monkeypatch.delenv("AGENTSIGHT_API_KEY", raising=False)
    monkeypatch.setattr(_log, "AGAIN_EVERY", 0.3)
    db = tmp_path / "events.sqlite3"
    mw = _middleware(local_store=db)
    async with _shop(mw) as c:
        await c.get("/", headers=BROWSER)
        assert mw.flush(10)
        with contextlib.closing(sqlite3.connect(db)) as conn:  # every write fails from now on
            conn.execute(
                "CREATE TRIGGER full BEFORE INSERT ON events "
                "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
            )
            conn.commit()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="agentsight_middleware"):
            for _ in range(3):  # one batch each: the worker takes what is queued
                c.cookies.clear()
                assert (await c.get("/", headers=BROWSER)).status_code == 200
                assert mw.flush(10)
            await anyio.sleep(0.35)
            c.cookies.clear()
            await c.get("/", headers=BROWSER)
            assert mw.flush(10)
    said = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in said] == [logging.ERROR, logging.WARNING], said
    assert "failed 3 more time(s)" in said[1][1]
    assert "database or disk is full" in said[1][1]
    assert mw.stats()["stored"] == 1
    assert mw.stats()["failed"] == 4
    mw.close()


@pytest.mark.anyio
async def test_a_full_disk_is_said_with_the_file_and_the_events_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # On a full disk (a 2 MB tmpfs filled while gunicorn's workers wrote) the one ERROR
    # said "StoreSink.put() failed; the request was served regardless": neither which
    # file nor that the events were lost.
    import sqlite3

    monkeypatch.delenv("AGENTSIGHT_API_KEY", raising=False)
    db = tmp_path / "events.sqlite3"
    mw = _middleware(local_store=db)
    async with _shop(mw) as c:
        await c.get("/", headers=BROWSER)
        assert mw.flush(10)
        with contextlib.closing(sqlite3.connect(db)) as conn:  # SQLite's own words
            conn.execute(
                "CREATE TRIGGER full BEFORE INSERT ON events "
                "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
            )
            conn.commit()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="agentsight_middleware"):
            c.cookies.clear()
            assert (await c.get("/", headers=BROWSER)).status_code == 200
            assert mw.flush(10)
    [record] = caplog.records
    assert record.levelno == logging.ERROR
    said = record.getMessage()
    assert str(db) in said, said
    assert "lost" in said, said
    assert "database or disk is full" in str(record.exc_info[1])  # type: ignore[index]
    assert "stats()['failed'] counts them" in said, said
    stats = mw.stats()
    assert (stats["stored"], stats["failed"], stats["errors"]) == (1, 1, 0)
    mw.close()


def test_events_the_store_cannot_take_are_counted_once_under_a_real_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A full disk counted each lost event in `failed` (the store's) and in `errors` (the
    # worker's) too: enqueued 4 read as stored 1 + failed 3 + errors 3. The API client
    # counts an event it cannot keep once, in `failed`; so does the store now.
    import sqlite3

    monkeypatch.delenv("AGENTSIGHT_API_KEY", raising=False)
    db = tmp_path / "events.sqlite3"
    mw = _middleware(local_store=db)
    with uvicorn_server(mw) as url, httpx.Client(base_url=url, headers=BROWSER) as c:
        assert c.get("/").status_code == 200
        assert mw.flush(10)
        with contextlib.closing(sqlite3.connect(db)) as conn:
            conn.execute(
                "CREATE TRIGGER full BEFORE INSERT ON events "
                "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
            )
            conn.commit()
        for _ in range(3):
            c.cookies.clear()
            assert c.get("/").status_code == 200
        assert mw.flush(10)
        stats = mw.stats()
    mw.close()
    assert (stats["enqueued"], stats["stored"], stats["failed"], stats["errors"]) == (4, 1, 3, 0)
