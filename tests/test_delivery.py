"""The built-in client against the stand-in AgentSight API, over real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from agentsight_middleware import AgentSightMiddleware
from agentsight_middleware._credentials import Credentials
from agentsight_middleware._delivery import BackgroundDelivery
from agentsight_middleware._retry import classify, retry_after
from agentsight_middleware.sinks.outbox import SQLiteOutbox
from agentsight_middleware.testing import StandInAgentSightAPI

from .conftest import (
    BROWSER,
    CHROME_DESKTOP,
    outbox_rows,
    uvicorn_server,
    website_answering_200,
)

pytestmark = pytest.mark.anyio


async def page(request: Request) -> Response:
    return HTMLResponse("<p>shop</p>")


async def chat(request: Request) -> Response:
    await request.body()
    return JSONResponse({"ok": True})


def make_app() -> Starlette:
    return Starlette(routes=[Route("/", page), Route("/api/chat", chat, methods=["POST"])])


@pytest.fixture
def api() -> Iterator[StandInAgentSightAPI]:
    with StandInAgentSightAPI() as server:
        yield server


def wrap(api: StandInAgentSightAPI, **options: Any) -> AgentSightMiddleware:
    options.setdefault("api_key", api.api_key)
    options.setdefault("endpoint", api.url)
    return AgentSightMiddleware(
        make_app(), widget_pages=["/"], chat_routes=["POST /api/chat"], **options
    )


def client(app: Any) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=("203.0.113.9", 4000))
    return httpx.AsyncClient(transport=transport, base_url="https://shop.test")


async def visit(c: httpx.AsyncClient, chats: int = 1) -> None:
    c.cookies.clear()
    await c.get("/", headers=BROWSER)
    for i in range(chats):
        await c.post(
            "/api/chat",
            json={"message": i},
            headers={"user-agent": CHROME_DESKTOP, "accept-language": "en-US"},
        )


async def test_page_and_chat_reach_the_api_as_the_sdk_sends_them(
    api: StandInAgentSightAPI,
) -> None:
    mw = wrap(api)
    async with client(mw) as c:
        await visit(c)
    assert mw.flush(10)
    first, second = api.conversations
    assert first["is_used"] is False
    assert second["is_used"] is True
    assert first["conversation_id"] == second["conversation_id"]
    for body in (first, second):
        assert set(body) == {
            "timestamp",
            "conversation_id",
            "customer_id",
            "customer_ip_address",
            "device",
            "source",
            "language",
            "name",
            "environment",
            "metadata",
            "is_used",
        }
        assert body["customer_ip_address"] == "203.0.113.9"
        assert body["device"] == "desktop"
        assert body["language"] == "en-US"
        assert body["environment"] == "production"
        assert body["source"] == "web"
    assert first["metadata"]["page_url"] == "https://shop.test/"
    request = api.requests[0]
    assert request.path == "/api/conversations/"
    assert request.headers["authorization"] == f"Api-Key {api.api_key}"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["user-agent"].startswith("agentsight-middleware/")
    stats = mw.stats()
    assert stats["sent"] == 2
    assert stats["enqueued"] == 2
    assert stats["pending"] == 0
    mw.close()


async def test_environment_variables_configure_the_client(
    api: StandInAgentSightAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENTSIGHT_API_KEY", api.api_key)
    monkeypatch.setenv("AGENTSIGHT_API_ENDPOINT", api.url + "/")
    monkeypatch.setenv("AGENTSIGHT_ENVIRONMENT", "dev")
    mw = AgentSightMiddleware(make_app(), widget_pages=["/"], chat_routes=["POST /api/chat"])
    async with client(mw) as c:
        await visit(c)
    assert mw.flush(10)
    assert [b["environment"] for b in api.conversations] == ["development", "development"]
    assert api.requests[0].path == "/api/conversations/"  # no doubled slash
    mw.close()


async def test_a_slow_api_costs_the_app_nothing(api: StandInAgentSightAPI) -> None:
    api.set_latency(0.5)
    mw = wrap(api)
    async with client(mw) as c:
        started = time.perf_counter()
        for _ in range(10):
            await visit(c)
        elapsed = time.perf_counter() - started
    assert elapsed < 1.0, f"20 requests took {elapsed:.2f} s behind a 0.5 s API"
    assert mw.flush(15)
    assert len(api.conversations) == 20
    mw.close()


async def test_outage_then_recovery_delivers_everything_in_order(
    api: StandInAgentSightAPI,
) -> None:
    api.fail_next(6, status=503)
    api.drop_next(2)
    mw = wrap(api, delivery_concurrency=4)
    async with client(mw) as c:
        for _ in range(5):
            await visit(c, chats=2)
    assert mw.flush(60)
    bodies = api.conversations
    assert len(bodies) == 15
    by_conversation: dict[str, list[bool]] = {}
    for body in bodies:
        by_conversation.setdefault(body["conversation_id"], []).append(body["is_used"])
    assert len(by_conversation) == 5
    assert all(flags == [False, True, True] for flags in by_conversation.values())
    # The 503s; a connection dropped as it was reused may be sent again at once, uncounted.
    assert mw.stats()["retried"] >= 6
    mw.close()


async def test_429_pauses_delivery_for_retry_after(api: StandInAgentSightAPI) -> None:
    api.throttle_next(1, retry_after="1")
    mw = wrap(api)
    async with client(mw) as c:
        await visit(c, chats=0)
    started = time.monotonic()
    assert mw.flush(10)
    assert time.monotonic() - started >= 0.9
    assert len(api.conversations) == 1
    assert mw.stats()["throttled"] == 1
    mw.close()


async def test_a_pause_set_before_the_clock_is_stepped_back_ends_on_time(
    api: StandInAgentSightAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A 429 paused delivery until a time of the wall clock; NTP stepping that clock back an
    # hour then held every sender for the hour (0 of 50 events sent in the 20 s after the
    # API was fine again), the in-memory queue filling meanwhile.
    real = time.time
    offset = [3600.0]  # the clock is an hour fast
    monkeypatch.setattr(time, "time", lambda: real() + offset[0])
    api.throttle_next(1, retry_after="2")
    mw = wrap(api)
    try:
        async with client(mw) as c:
            await visit(c, chats=0)
            deadline = time.monotonic() + 10
            while mw.stats()["throttled"] == 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert mw.stats()["throttled"] == 1
            offset[0] = 0.0  # and is set right
            await visit(c, chats=0)
        deadline = time.monotonic() + 10
        while not api.conversations and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert len(api.conversations) >= 1  # the second page view, once the 2 s are over
    finally:
        mw.close(0.5)


async def test_refused_key_is_logged_once_masked_and_not_retried(
    api: StandInAgentSightAPI, caplog: pytest.LogCaptureFixture
) -> None:
    other_key = "ags_" + "0" * 32 + "_abcdef"
    mw = wrap(api, api_key=other_key)
    with caplog.at_level(logging.INFO, logger="agentsight_middleware"):
        async with client(mw) as c:
            for _ in range(3):
                await visit(c)
        assert mw.flush(10)
    assert len(api.requests) == 6  # each tried once, none retried
    assert mw.stats()["rejected"] == 6
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "refused the API key ags_0000********" in errors[0]
    assert other_key not in caplog.text
    mw.close()


async def test_a_refused_key_keeps_the_events_of_a_durable_outbox(
    api: StandInAgentSightAPI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A revoked or mistyped key deleted every event from the outbox: on disk they now
    # wait for the fixed key, and the key problem is logged once.
    outbox = tmp_path / "outbox.sqlite3"
    mw = wrap(api, api_key="ags_" + "0" * 32 + "_abcdef", outbox=outbox)
    with caplog.at_level(logging.INFO, logger="agentsight_middleware"):
        async with client(mw) as c:
            for _ in range(3):
                await visit(c)
        assert not mw.flush(1.5)
        stats = mw.stats()
        mw.close(1)
    assert stats["sent"] == stats["rejected"] == 0
    assert 1 <= len(api.requests) <= 6  # paused after the first refusals, not retried at once
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "refused the API key ags_0000********" in errors[0]
    assert "kept in the outbox" in errors[0]
    assert outbox_rows(outbox) == 6
    # The right key, same outbox: every event of the first run arrives.
    mw = wrap(api, outbox=outbox)
    mw._core.delivery.ensure_started()
    api.wait_for(conversations=6, timeout=15)
    assert mw.flush(10)
    mw.close()
    assert outbox_rows(outbox) == 0


async def test_memory_queue_is_bounded_while_the_api_is_down() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens there
    mw = AgentSightMiddleware(
        make_app(),
        widget_pages=["/"],
        api_key="ags_" + "1" * 32 + "_abcdef",
        endpoint=dead,
        queue_size=5,
        shutdown_timeout=0.2,
    )
    async with client(mw) as c:
        for _ in range(20):
            await visit(c, chats=0)
    time.sleep(0.3)
    stats = mw.stats()
    # queue_size events wait for the worker, and as many for the API plus the
    # one batch the worker took when the sink was not yet full (at most the
    # intake's 5): the bound holds however the arrivals interleave.
    assert stats["queued"] <= 5, stats
    assert stats["pending"] <= 5 + 5, stats
    assert stats["enqueued"] + stats["dropped"] == 20, stats
    assert stats["enqueued"] == stats["queued"] + stats["pending"], stats
    mw.close()


def test_bad_keys_and_endpoints_fail_at_start_up() -> None:
    with pytest.raises(ValueError, match=r"ags_<32 hex digits>_<6 hex digits>") as info:
        AgentSightMiddleware(make_app(), widget_pages=["/"], api_key="sk-live-1234567890abcdef")
    assert "1234567890abcdef" not in str(info.value)
    with pytest.raises(ValueError, match="http:// or https://"):
        AgentSightMiddleware(
            make_app(), widget_pages=["/"], api_key="ags_" + "1" * 32 + "_abcdef", endpoint="api"
        )
    for endpoint, message in (("http://api:99999", "not a valid URL"), ("https://", "no host")):
        with pytest.raises(ValueError, match=message):
            AgentSightMiddleware(
                make_app(), widget_pages=["/"], api_key="ags_" + "1" * 32 + "_abcdef",
                endpoint=endpoint,
            )  # fmt: skip
    with pytest.raises(ValueError, match="either tracker="):
        AgentSightMiddleware(
            make_app(), widget_pages=["/"], api_key="ags_" + "1" * 32 + "_abcdef", tracker=object()
        )


def test_credentials_repr_masks_the_key() -> None:
    key = "ags_" + "a" * 32 + "_bbbbbb"
    credentials = Credentials.resolve(api_key=key, endpoint=None, environment=None, env={})
    assert credentials is not None
    assert key not in repr(credentials)
    assert credentials.conversations_url == "https://api.agentsight.io/api/conversations/"


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, "accepted"),
        (201, "accepted"),
        (202, "accepted"),  # the sink then checks that the body is the API's answer
        (204, "accepted"),
        (301, "elsewhere"),  # http:// redirected to https://: the endpoint is wrong
        (302, "elsewhere"),
        (307, "elsewhere"),
        (308, "elsewhere"),
        (400, "rejected"),
        (401, "rejected"),
        (403, "rejected"),
        (404, "elsewhere"),  # the API's conversations route exists and takes POST
        (405, "elsewhere"),
        (407, "elsewhere"),  # a forward proxy asking for its login
        (421, "elsewhere"),
        (426, "elsewhere"),
        (413, "rejected"),
        (408, "retry"),
        (429, "throttled"),
        (500, "retry"),
        (502, "retry"),
        (503, "retry"),
    ],
)
def test_classify(status: int, outcome: str) -> None:
    assert classify(status) == outcome


@pytest.mark.parametrize(
    ("status", "body", "outcome"),
    [
        (400, b'{"timestamp": ["This field is required."]}', "rejected"),
        (401, b'{"detail": "Invalid token."}', "rejected"),
        (400, b"<html><h1>400 The plain HTTP request was sent to HTTPS port</h1>", "elsewhere"),
        (403, b"<!doctype html><title>Access denied</title>", "elsewhere"),
        (413, b"<html>413 Request Entity Too Large</html>", "rejected"),
    ],
)
def test_a_refusal_that_is_not_the_api_s_json_is_from_elsewhere(
    status: int, body: bytes, outcome: str
) -> None:
    assert classify(status, body) == outcome


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("3", 3.0),
        ("120", 30.0),
        (None, 1.0),
        ("soon", 1.0),
        ("Wed, 25 Nov 2026 12:00:05 GMT", 5.0),
        # Passed already (or clocks apart), or no wait at all: at least a second, not a
        # resend at once for as long as the API throttles.
        ("Wed, 25 Nov 2026 11:00:00 GMT", 1.0),
        ("0", 1.0),
        ("\u00b2", 1.0),  # a Unicode digit: isdigit() says yes, float() says no
        ("\u0663", 1.0),  # ARABIC-INDIC DIGIT THREE: float() reads it, the RFC does not
    ],
)
def test_retry_after(header: str | None, expected: float) -> None:
    now = 1795608000.0  # 2026-11-25 12:00:00 UTC
    assert retry_after(header, now=now) == pytest.approx(expected)


# -- the durable outbox ---------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(port: int, outbox: Path, api_url: str, api_key: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "AGENTSIGHT_API_KEY": api_key, "AGENTSIGHT_API_ENDPOINT": api_url}
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.apps.outbox_app", str(port), str(outbox)],
        env=env,
        cwd=Path(__file__).parent.parent,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/missing", timeout=0.5)
            return process
        except httpx.TransportError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("the app did not start")


def test_sigkill_during_an_outage_loses_nothing(tmp_path: Path) -> None:
    outbox = tmp_path / "outbox.sqlite3"
    api = StandInAgentSightAPI()  # not started yet: the API is down
    port = _free_port()
    api_port = _free_port()
    api_url = f"http://127.0.0.1:{api_port}"
    process = _serve(port, outbox, api_url, api.api_key)
    ids = []
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as c:
            for _ in range(40):
                c.cookies.clear()
                response = c.get("/", headers=BROWSER)
                ids.append(response.cookies["agentsight_conversation_id"])
        # Events reach the disk within ~20 ms on an idle machine; on a loaded one
        # give the worker its time, then kill: what is on disk must all arrive.
        deadline = time.monotonic() + 10
        while outbox_rows(outbox) < 40 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(10)
    api = StandInAgentSightAPI(port=api_port, api_keys=[api.api_key])
    with api:
        process = _serve(port, outbox, api_url, api.api_key)
        try:
            api.wait_for(conversations=40, timeout=20)
            time.sleep(0.3)  # would a duplicate arrive?
        finally:
            process.terminate()
            process.wait(10)
        received = [b["conversation_id"] for b in api.conversations]
    assert sorted(received) == sorted(ids), "every event enqueued before the kill, once"
    assert outbox_rows(outbox) == 0


def _drain_outbox(outbox: str, url: str, key: str) -> None:
    """Runs in a child process: deliver what is in the shared outbox, then stop."""
    mw = AgentSightMiddleware(
        make_app(), widget_pages=["/"], api_key=key, endpoint=url, outbox=outbox
    )
    # Start the worker without a request: submit nothing, just start and flush.
    mw._core.delivery._start()  # type: ignore[union-attr]
    time.sleep(2.0)
    mw.close(5)


async def test_a_locked_outbox_keeps_the_batch_and_stats_do_not_wait(
    api: StandInAgentSightAPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another process (a backup, a sqlite3 shell) held the outbox's write lock past
    # SQLite's busy timeout: the worker's batch (up to 100 events) was dropped, and
    # stats() waited with the worker for the whole busy timeout.
    import sqlite3
    import threading

    monkeypatch.setattr("agentsight_middleware.sinks.outbox._BUSY_TIMEOUT", 1.0)
    outbox = tmp_path / "outbox.sqlite3"
    mw = wrap(api, outbox=outbox)
    holder = sqlite3.connect(outbox, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    threading.Timer(2.5, holder.execute, ("COMMIT",)).start()
    async with client(mw) as c:
        for _ in range(3):
            await visit(c)
    slowest = 0.0
    for _ in range(20):  # while the worker waits for the lock
        started = time.monotonic()
        mw.stats()
        slowest = max(slowest, time.monotonic() - started)
        time.sleep(0.05)
    assert mw.flush(15)
    stats = mw.stats()
    mw.close()
    holder.close()
    assert len(api.conversations) == 6
    assert stats["errors"] == 0
    assert slowest < 0.5


async def test_close_keeps_to_its_timeout_while_another_process_holds_the_outbox(
    api: StandInAgentSightAPI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A write already waiting in SQLite's busy timeout (10 s) when close(timeout=1) came
    # finished its wait: close() gave up on the worker after 6 s (timeout + 5), and the
    # worker went on waiting behind it.
    import sqlite3

    outbox = tmp_path / "outbox.sqlite3"
    mw = wrap(api, outbox=outbox)
    async with client(mw) as c:
        await visit(c)
        assert mw.flush(10)
        holder = sqlite3.connect(outbox, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            await visit(c)
            time.sleep(0.5)  # the worker's batch now waits for the lock
            started = time.monotonic()
            with caplog.at_level(logging.WARNING, logger="agentsight_middleware"):
                mw.close(1)
            closed_in = time.monotonic() - started
        finally:
            holder.close()
    assert closed_in < 3.0
    assert "did not finish" not in caplog.text  # the worker ended: nothing waits behind
    # Never written: said, as before. One batch of both, or (the worker woken by the first
    # before the second came, on a loaded machine) one each in the batch and the intake.
    lost = re.findall(
        r"(\d+) event\(s\) (?:lost at shutdown|still waiting to be built at shutdown)",
        caplog.text,
    )
    assert sum(map(int, lost)) == 2, caplog.text
    assert len(api.conversations) == 2
    assert outbox_rows(outbox) == 0


async def test_flush_and_close_wait_for_this_process_s_events_only(
    api: StandInAgentSightAPI, tmp_path: Path
) -> None:
    # A row another live process holds in a shared outbox made flush() False after its
    # whole timeout and close() take the whole shutdown_timeout, though every event of
    # this process was delivered.
    import sqlite3

    outbox = tmp_path / "shared.sqlite3"
    mw = wrap(api, outbox=outbox)
    sibling = sqlite3.connect(outbox, isolation_level=None)
    sibling.execute(
        "INSERT INTO outbox (conversation_id, body, lease_until, lease_owner) "
        "VALUES ('conv_sibling00000', x'7b7d', ?, 'elsewhere:1:abcd')",
        (time.time() + 60,),
    )
    sibling.close()
    async with client(mw) as c:
        await visit(c)
    started = time.monotonic()
    assert mw.flush(5)
    flushed_in = time.monotonic() - started
    started = time.monotonic()
    mw.close()
    closed_in = time.monotonic() - started
    assert len(api.conversations) == 2
    assert flushed_in < 2.0
    assert closed_in < 1.0
    assert outbox_rows(outbox) == 1  # the sibling's, untouched


async def test_pending_counts_this_process_s_events_and_outbox_pending_the_file_s(
    tmp_path: Path,
) -> None:
    # In a process sharing an outbox file (a gunicorn worker), stats()["pending"] counted
    # every row of the file: each worker reported the others' backlog as its own.
    import sqlite3

    outbox = tmp_path / "shared.sqlite3"
    dead = f"http://127.0.0.1:{_free_port()}"  # nothing listens there: the events wait
    mw = AgentSightMiddleware(
        make_app(),
        widget_pages=["/"],
        chat_routes=["POST /api/chat"],
        api_key="ags_" + "1" * 32 + "_abcdef",
        endpoint=dead,
        outbox=outbox,
        shutdown_timeout=0.5,
    )
    sibling = sqlite3.connect(outbox, isolation_level=None)
    sibling.executemany(
        "INSERT INTO outbox (conversation_id, body, lease_until, lease_owner, origin) "
        "VALUES (?, x'7b7d', ?, 'elsewhere:1:abcd', 'elsewhere:1:abcd')",
        [(f"conv_sibling{n:05d}", time.time() + 60) for n in range(3)],
    )
    sibling.close()
    try:
        async with client(mw) as c:
            await visit(c)
        deadline = time.monotonic() + 10
        while outbox_rows(outbox) < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        stats = mw.stats()
        assert stats["pending"] == 2  # the page view and the chat of this process
        assert stats["outbox_pending"] == 5  # and the sibling's three
    finally:
        mw.close()


def test_outbox_pending_counts_what_an_earlier_run_left_before_the_worker_starts(
    tmp_path: Path,
) -> None:
    # stats() said 0 for every count until the worker had built its sink: under WSGI until
    # the first request (and 0.3-0.7 s after it), under ASGI for as long after the
    # lifespan's start, while the file held an outage's backlog from the last run.
    import sqlite3

    from agentsight_middleware import AgentSightWSGIMiddleware

    outbox = tmp_path / "left.sqlite3"
    SQLiteOutbox(outbox).close()
    earlier = sqlite3.connect(outbox, isolation_level=None)
    earlier.executemany(
        "INSERT INTO outbox (conversation_id, body, origin) VALUES (?, x'7b7d', 'gone:1:abcd')",
        [(f"conv_earlier{n:05d}",) for n in range(4)],
    )
    earlier.close()
    dead = f"http://127.0.0.1:{_free_port()}"
    mw = AgentSightWSGIMiddleware(
        lambda environ, start_response: [],
        widget_pages=["/"],
        api_key="ags_" + "1" * 32 + "_abcdef",
        endpoint=dead,
        outbox=outbox,
        shutdown_timeout=0.5,
    )
    try:
        stats = mw.stats()
        assert stats["outbox_pending"] == 4  # the last run's backlog
        assert stats["pending"] == 0  # none of this process's
    finally:
        mw.close()


async def test_stats_wait_once_for_a_worker_waiting_for_a_locked_outbox(
    api: StandInAgentSightAPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # stats() gives up on the outbox's lock after a short wait while the worker holds it
    # through a wait for another process's lock, and answers the last counts: once for
    # both pending counts, not once each (a first version of outbox_pending waited twice).
    import sqlite3

    monkeypatch.setattr("agentsight_middleware.sinks.outbox._DEPTH_WAIT", 1.0)
    outbox = tmp_path / "outbox.sqlite3"
    mw = wrap(api, outbox=outbox)
    async with client(mw) as c:
        await visit(c)
        assert mw.flush(10)
        holder = sqlite3.connect(outbox, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            await visit(c)
            time.sleep(0.5)  # the worker's batch now waits for the lock (10 s at most)
            started = time.monotonic()
            stats = mw.stats()
            took = time.monotonic() - started
        finally:
            holder.close()
    assert mw.flush(10)
    mw.close()
    assert took < 1.8  # one wait of 1 s
    assert (stats["pending"], stats["outbox_pending"]) == (0, 0)  # the last counts
    assert len(api.conversations) == 4


async def test_what_the_api_accepted_is_recorded_though_another_process_locks_the_outbox(
    api: StandInAgentSightAPI, tmp_path: Path
) -> None:
    # The API accepts a page view while another process holds the outbox's write lock;
    # shutdown comes meanwhile. The acknowledgement got one 0.1 s try and was then
    # forgotten: the row stayed (claimed), and the next start sent the event again.
    import sqlite3
    import threading

    outbox = tmp_path / "outbox.sqlite3"
    mw = wrap(api, outbox=outbox, shutdown_timeout=0.5)
    async with client(mw) as c:
        await visit(c, chats=0)
        assert mw.flush(10)  # the file exists
        api.set_latency(0.4)
        await visit(c, chats=0)
    time.sleep(0.15)  # put and claimed; its answer is on the way
    holder = sqlite3.connect(outbox, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    # Held past shutdown's deadline (0.5 s after close), not past the 1 s grace after it.
    release = threading.Timer(1.3, holder.close)
    release.start()
    try:
        time.sleep(0.5)  # the answer came; its acknowledgement waits for the lock
        mw.close()
    finally:
        release.join()
    assert len(api.conversations) == 2
    assert outbox_rows(outbox) == 0  # before: 1, sent again at the next start


async def test_close_without_an_outbox_waits_for_an_api_that_recovers(
    api: StandInAgentSightAPI, caplog: pytest.LogCaptureFixture
) -> None:
    # Events in memory have nowhere else to go: a first version of the shutdown that stops
    # early gave up on them at the first failed attempt (0 of 20 delivered, "lost"),
    # though the API answered again within shutdown_timeout.
    mw = wrap(api, shutdown_timeout=5)
    api.fail_next(2, status=500)  # the page view's first two attempts: back within ~1.5 s
    async with client(mw) as c:
        await visit(c)
    time.sleep(0.3)  # the first attempts failed
    with caplog.at_level(logging.WARNING, logger="agentsight_middleware"):
        mw.close()
    assert len(api.conversations) == 2
    assert "not delivered" not in caplog.text


async def test_close_with_an_outbox_does_not_wait_for_a_failing_api(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Nothing can be delivered and the events are safe on disk: a recycled worker
    # (gunicorn --max-requests) or a reloader's old process stalled the whole
    # shutdown_timeout.
    dead = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    mw = AgentSightMiddleware(
        make_app(),
        widget_pages=["/"],
        chat_routes=["POST /api/chat"],
        api_key="ags_" + "1" * 32 + "_abcdef",
        endpoint=dead,
        outbox=tmp_path / "outbox.sqlite3",
        shutdown_timeout=5,
    )
    async with client(mw) as c:
        await visit(c)
    time.sleep(0.3)  # the first attempts failed
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="agentsight_middleware"):
        mw.close()
    assert time.monotonic() - started < 1.5
    assert outbox_rows(tmp_path / "outbox.sqlite3") == 2


async def test_close_with_an_outbox_goes_on_sending_while_the_api_accepts(
    api: StandInAgentSightAPI, tmp_path: Path
) -> None:
    # A first version stopped at the first moment with nothing in flight: one chat's
    # events go one after the other, so 171 of 200 were left on disk with a healthy API,
    # for a next start a scaled-down pod never has.
    outbox = tmp_path / "outbox.sqlite3"
    mw = wrap(api, outbox=outbox, shutdown_timeout=10)
    async with client(mw) as c:
        await visit(c)
        for _ in range(60):
            await c.post("/api/chat", json={"message": "hi"})
    mw.close()
    assert len(api.conversations) == 62
    assert outbox_rows(outbox) == 0


async def test_flush_with_an_outbox_is_true_once_everything_was_accepted(
    api: StandInAgentSightAPI, tmp_path: Path
) -> None:
    # The API's acceptances are written to the outbox a loop turn later: flush() looked in
    # between, found the accepted rows still there, and said False (1 in 2 to 1 in 60).
    mw = wrap(api, outbox=tmp_path / "outbox.sqlite3")
    results: list[bool] = []
    async with client(mw) as c:
        for _ in range(30):
            await visit(c)
            results.append(mw.flush(5))
    mw.close()
    assert results == [True] * 30
    assert len(api.conversations) == 60


async def test_a_process_stopping_mid_request_leaves_its_rows_to_nobody_else(
    api: StandInAgentSightAPI, tmp_path: Path
) -> None:
    # A shared outbox, an API slower than shutdown_timeout: the process stopped with its
    # requests written and unanswered, handed their leases back, and a sibling sent the
    # same events again at once while the API was still storing the first copies.
    outbox = tmp_path / "shared.sqlite3"
    api.set_latency(3)
    mw = wrap(api, outbox=outbox, shutdown_timeout=0.5)
    async with client(mw) as c:
        await visit(c)
    deadline = time.monotonic() + 10
    while mw.stats().get("in_flight", 0) < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert mw.stats()["in_flight"] == 1  # the page view; the chat waits behind it
    mw.close()
    sibling = SQLiteOutbox(outbox)
    try:
        now = time.time()
        assert sibling.claim(10, now) == []  # not the page view, nor the chat behind it
        # Not before as long as the request timeout, even once its lease is freed early.
        [(not_before,)] = (
            sibling._connect()
            .execute("SELECT not_before FROM outbox WHERE lease_owner IS NOT NULL")
            .fetchall()
        )
        assert not_before > now + 10
    finally:
        sibling.close()


def test_processes_sharing_an_outbox_send_each_event_once(
    api: StandInAgentSightAPI, tmp_path: Path
) -> None:
    import json
    import multiprocessing

    outbox = tmp_path / "shared.sqlite3"
    store = SQLiteOutbox(outbox)
    rows = [
        (
            f"conv_{i:012x}",
            json.dumps(
                {
                    "timestamp": "2026-11-25T12:00:00+00:00",
                    "conversation_id": f"conv_{i:012x}",
                    "customer_id": None,
                    "customer_ip_address": None,
                    "device": None,
                    "source": "web",
                    "language": None,
                    "name": None,
                    "environment": "production",
                    "metadata": None,
                    "is_used": False,
                }
            ).encode(),
        )
        for i in range(300)
    ]
    store.put(rows)
    store.close()
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(target=_drain_outbox, args=(str(outbox), api.url, api.api_key))
        for _ in range(3)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join(30)
    received = [b["conversation_id"] for b in api.conversations]
    assert len(received) == 300
    assert len(set(received)) == 300
    assert outbox_rows(outbox) == 0


async def test_metadata_json_cannot_hold_is_sent_as_text_or_null(
    api: StandInAgentSightAPI,
) -> None:
    import datetime

    values = iter([{"when": datetime.date(2026, 11, 25)}, {"ratio": float("nan")}, {"ok": 1}])
    mw = wrap(api, metadata=lambda request: next(values))
    async with client(mw) as c:
        for _ in range(3):
            await visit(c, chats=0)
    assert mw.flush(10)
    metadata = [b["metadata"] for b in api.conversations]  # three conversations, any order
    assert sorted(m.get("when") or "" for m in metadata) == ["", "", "2026-11-25"]
    assert sorted(m.get("ok", 0) for m in metadata) == [0, 0, 1]
    assert [m["ratio"] for m in metadata if "ratio" in m] == [None]  # NaN: the API refuses it
    assert mw.stats()["failed"] == 0
    mw.close()


async def test_a_hanging_api_leaves_the_app_fast(api: StandInAgentSightAPI) -> None:
    api.hang_next(50)
    mw = wrap(api, shutdown_timeout=0.5)
    async with client(mw) as c:
        started = time.perf_counter()
        for _ in range(10):
            await visit(c)
        elapsed = time.perf_counter() - started
    assert elapsed < 1.0, f"20 requests took {elapsed:.2f} s behind a hanging API"
    assert mw.stats()["enqueued"] == 20
    mw.close()


def _start(command: list[str], port: int, api: StandInAgentSightAPI) -> subprocess.Popen[bytes]:
    env = {**os.environ, "AGENTSIGHT_API_KEY": api.api_key, "AGENTSIGHT_API_ENDPOINT": api.url}
    process = subprocess.Popen(command, env=env, cwd=Path(__file__).parent.parent)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/missing", timeout=0.5)
            return process
        except httpx.TransportError:
            if process.poll() is not None:
                raise RuntimeError(f"{command} exited with {process.returncode}") from None
            time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"{command} did not start")


def _page_views(port: int, count: int) -> None:
    with httpx.Client(base_url=f"http://127.0.0.1:{port}") as c:
        for _ in range(count):
            c.cookies.clear()
            assert c.get("/", headers=BROWSER).status_code == 200


def test_lifespan_shutdown_delivers_what_is_queued(api: StandInAgentSightAPI) -> None:
    api.set_latency(0.2)  # 30 events at 8 in flight: ~0.8 s of sending still to do
    port = _free_port()
    process = _start(
        [sys.executable, "-m", "tests.apps.delivery_app", "asgi", str(port)], port, api
    )
    try:
        _page_views(port, 30)
    finally:
        process.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises SIGTERM for its exit status.
        assert process.wait(30) in (0, -signal.SIGTERM)
    assert len(api.conversations) == 30


def test_gunicorn_preload_workers_deliver(api: StandInAgentSightAPI) -> None:
    port = _free_port()
    command = [
        sys.executable, "-m", "gunicorn", "--preload", "-w", "2", "-b", f"127.0.0.1:{port}",
        "--log-level", "warning", "tests.apps.delivery_app:flask_app",
    ]  # fmt: skip
    process = _start(command, port, api)
    try:
        _page_views(port, 20)
        api.wait_for(conversations=20, timeout=15)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
    assert len({b["conversation_id"] for b in api.conversations}) == 20


async def test_delivery_keeps_going_under_a_steady_stream_of_events(
    api: StandInAgentSightAPI,
) -> None:
    """The worker once took events as long as any were waiting and never let its
    sender tasks run: under steady load nothing was sent until the load stopped."""
    mw = wrap(api)
    headers = [(k.encode(), v.encode()) for k, v in BROWSER.items() if k != "user-agent"]

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        pass

    async with client(mw) as c:
        await visit(c, chats=0)
    assert mw.flush(10)  # the worker is up (its start-up is not what is tested)
    sent_before = mw.stats()["sent"]
    sent_during_load = 0
    deadline = time.monotonic() + 1.0
    n = 0
    while time.monotonic() < deadline:  # a busy server: requests back to back
        n += 1
        # A new user agent each time: the worker's slowest case (a cold parse each).
        agent = (b"user-agent", CHROME_DESKTOP.replace("126.0.0.0", f"126.0.{n}.0").encode())
        scope = {
            "type": "http", "method": "GET", "path": "/", "root_path": "",
            "query_string": b"", "headers": [*headers, agent], "client": ("203.0.113.9", 1),
            "server": ("shop.test", 80), "scheme": "http",
        }  # fmt: skip
        await mw(scope, receive, send)
        sent_during_load = mw.stats()["sent"] - sent_before
    assert sent_during_load > 0, mw.stats()
    # A backlog of thousands still to build: shutdown keeps to its time limit and the
    # worker really stops (it must not go on sending behind the app's back).
    worker = mw._core.delivery._thread  # type: ignore[union-attr]
    assert worker is not None
    mw.close(0.5)
    worker.join(15)  # the backlog would take the old worker minutes
    assert not worker.is_alive()


async def test_an_idle_worker_parks_and_the_next_event_wakes_it(
    api: StandInAgentSightAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Under load the intake is looked at every 5 ms (smaller bursts towards the API);
    # once it has been quiet for 20 ms the worker parks: no looks, no GIL taken from the
    # app's threads, until the next event (or close()) wakes it.
    monkeypatch.setattr("agentsight_middleware._delivery._DOZE", 5.0)
    mw = wrap(api)
    delivery = mw._core.delivery
    takes = 0
    real_take = delivery._take  # type: ignore[union-attr]

    async def counting_take() -> int:
        nonlocal takes
        takes += 1
        return await real_take()

    monkeypatch.setattr(delivery, "_take", counting_take)
    async with client(mw) as c:
        await visit(c)
    assert mw.flush(10)
    time.sleep(0.2)  # backs off (5, 10, 20 ms), then parks; the worker has its own thread
    takes = 0
    time.sleep(1.0)
    idle_takes = takes
    started = time.monotonic()
    async with client(mw) as c:
        await visit(c)  # events again: they wake it
    assert mw.flush(10)
    woke_in = time.monotonic() - started
    started = time.monotonic()
    mw.close()
    closed_in = time.monotonic() - started
    assert idle_takes == 0  # 50 if it kept looking every 20 ms
    assert woke_in < 1.0  # delivered at once, not after the 5 s doze
    assert closed_in < 1.0
    assert mw.stats()["sent"] == 4


async def test_probes_and_bots_never_reach_the_api(api: StandInAgentSightAPI) -> None:
    mw = wrap(api)
    async with client(mw) as c:
        for agent in (
            "kube-probe/1.29",
            "curl/8.5.0",
            "Googlebot/2.1 (+http://www.google.com/bot.html)",
        ):
            c.cookies.clear()
            response = await c.get("/", headers={**BROWSER, "user-agent": agent})
            assert response.status_code == 200
        await visit(c, chats=0)
    assert mw.flush(10)
    mw.close()
    stats = mw.stats()
    assert stats["skipped_bots"] == 3
    assert stats["sent"] == 1
    assert stats["senders"] == 8  # a trickle never makes delivery grow
    assert [c["metadata"]["user_agent"] for c in api.conversations] == [BROWSER["user-agent"]]


def test_a_fork_after_the_worker_started_gets_an_outbox_of_its_own() -> None:
    # gunicorn without --preload forks before any request, but a server that forks
    # later (or an app that forks a helper) must not send the parent's queued events
    # again, nor inherit leases of events the parent had in flight.
    import collections
    import os
    import warnings

    from flask import Flask
    from werkzeug.test import Client

    from agentsight_middleware import AgentSightWSGIMiddleware

    from .conftest import BROWSER

    with StandInAgentSightAPI() as api:
        api.set_latency(0.5)  # slow: the parent's events wait in its outbox at fork
        flask_app = Flask(__name__)
        flask_app.get("/", endpoint="page")(lambda: "<!doctype html><p>hi</p>")
        flask_app.post("/api/chat", endpoint="chat")(lambda: {"ok": True})
        mw = AgentSightWSGIMiddleware(
            flask_app.wsgi_app,
            widget_pages=["/"],
            chat_routes=["POST /api/chat"],
            api_key=api.api_key,
            endpoint=api.url,
            delivery_concurrency=1,
        )

        def view() -> str:
            response = Client(mw).get("/", headers=BROWSER)
            return str(response.headers["Set-Cookie"]).split(";")[0].split("=", 1)[1]

        parent_ids = [view() for _ in range(6)]
        time.sleep(0.2)
        read_end, write_end = os.pipe()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
            pid = os.fork()
        if pid == 0:  # the child: a chat of a conversation the parent had in flight, a view
            try:
                os.close(read_end)
                Client(mw).post(
                    "/api/chat", json={"conversation_id": parent_ids[0]}, headers=BROWSER
                )
                own = view()
                flushed = mw.flush(15)
                counted = mw.stats()["enqueued"]
                os.write(write_end, f"{own} {flushed} {counted}".encode())
            finally:
                os._exit(0)
        os.close(write_end)
        api.set_latency(0)
        os.waitpid(pid, 0)
        child_view, child_flushed, child_counted = os.read(read_end, 1024).decode().split()
        os.close(read_end)
        assert mw.flush(15)
        sent = collections.Counter((b["conversation_id"], b["is_used"]) for b in api.conversations)
    assert child_flushed == "True"
    assert child_counted == "2"  # its chat and its view: the parent's 6 were counted too
    assert all(count == 1 for count in sent.values()), sent
    assert all(sent[(cid, False)] == 1 for cid in parent_ids)
    assert sent[(child_view, False)] == 1
    assert sent[(parent_ids[0], True)] == 1


async def test_an_endpoint_that_is_not_the_api_does_not_swallow_events(
    api: StandInAgentSightAPI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A mistyped endpoint that answers 200 with a web page (a catch-all route, a captive
    # portal) recorded nothing: the events stay in the outbox for the right endpoint.
    outbox = tmp_path / "outbox.sqlite3"
    with website_answering_200() as url:
        mw = wrap(api, endpoint=url, outbox=outbox)
        with caplog.at_level(logging.INFO, logger="agentsight_middleware"):
            async with client(mw) as c:
                for _ in range(3):
                    await visit(c)
            assert not mw.flush(1.5)
            stats = mw.stats()
            mw.close(1)
    assert stats["sent"] == 0
    assert stats["retried"] >= 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "check the endpoint" in errors[0]
    # Said to an operator who has an outbox: not to pass one, nor that 1 s was spent.
    assert "pass outbox=" not in caplog.text
    [stop] = [r.getMessage() for r in caplog.records if "at shutdown" in r.getMessage()]
    assert stop.endswith(
        "not delivered (the API was failing, or they were not due before the deadline: not "
        "waited for) at shutdown; "
        "they stay in the outbox for the next start"
    )
    # The right endpoint, same outbox: every event of the first run arrives.
    mw = wrap(api, outbox=outbox)
    mw._core.delivery.ensure_started()
    api.wait_for(conversations=6, timeout=15)
    assert mw.flush(10)
    assert len(api.conversations) == 6
    mw.close()


def test_events_left_at_exit_reach_an_endpoint_named_by_host(api: StandInAgentSightAPI) -> None:
    # A process that exits right after serving (a one-request job, a recycled worker):
    # atexit delivers what is left, and asyncio resolves the host name (the default
    # endpoint is api.agentsight.io) in its loop's default executor, which took no work
    # once the interpreter had begun to exit: nothing reached the API.
    child = (
        "import sys\n"
        "from werkzeug.test import Client\n"
        "from agentsight_middleware import AgentSightWSGIMiddleware\n"
        "def page(environ, start_response):\n"
        "    start_response('200 OK', [('Content-Type', 'text/html')])\n"
        "    return [b'<p>shop</p>']\n"
        "mw = AgentSightWSGIMiddleware(page, widget_pages=['/'], api_key=sys.argv[1],\n"
        "                              endpoint=sys.argv[2])\n"
        "headers = {'User-Agent': sys.argv[3], 'Accept': 'text/html'}\n"
        "assert Client(mw).get('/', headers=headers).status_code == 200\n"
    )  # the process then exits, the event still queued
    endpoint = api.url.replace("127.0.0.1", "localhost")
    assert "localhost" in endpoint
    for _ in range(3):
        subprocess.run(
            [sys.executable, "-c", child, api.api_key, endpoint, BROWSER["user-agent"]],
            check=True,
            timeout=60,
        )
    api.wait_for(conversations=3, timeout=10)
    assert len(api.conversations) == 3


async def test_a_dropped_middleware_stops_its_worker(api: StandInAgentSightAPI) -> None:
    # Each worker held its delivery for good (atexit too): a test suite that built 200
    # middlewares and dropped them kept 200 threads alive.
    import gc
    import threading

    workers = []
    for _ in range(5):
        mw = wrap(api)
        async with client(mw) as c:
            await visit(c, chats=0)
        assert mw.flush(10)
        thread = mw._core.delivery._thread  # type: ignore[union-attr]
        assert thread is not None
        workers.append(thread)
        del mw, c
    gc.collect()
    deadline = time.monotonic() + 10
    for thread in workers:
        thread.join(max(deadline - time.monotonic(), 0))
    assert not any(thread.is_alive() for thread in workers)
    assert not [t for t in threading.enumerate() if t.name == "agentsight-delivery"]
    assert len(api.conversations) == 5


def test_at_exit_the_workers_stop_together(api: StandInAgentSightAPI) -> None:
    # Each delivery's close() ran at exit after the one before: four middlewares and a
    # hanging API kept the process 4 x shutdown_timeout.
    api.hang_next(100)
    child = (
        "import sys\n"
        "from werkzeug.test import Client\n"
        "from agentsight_middleware import AgentSightWSGIMiddleware\n"
        "def page(environ, start_response):\n"
        "    start_response('200 OK', [('Content-Type', 'text/html')])\n"
        "    return [b'<p>shop</p>']\n"
        "kept = []\n"
        "for _ in range(4):\n"
        "    mw = AgentSightWSGIMiddleware(page, widget_pages=['/'], api_key=sys.argv[1],\n"
        "                                  endpoint=sys.argv[2], shutdown_timeout=2)\n"
        "    headers = {'User-Agent': sys.argv[3], 'Accept': 'text/html'}\n"
        "    assert Client(mw).get('/', headers=headers).status_code == 200\n"
        "    kept.append(mw)\n"
        "import time; time.sleep(0.5); print(time.monotonic(), flush=True)\n"
    )
    process = subprocess.run(
        [sys.executable, "-c", child, api.api_key, api.url, BROWSER["user-agent"]],
        check=True,
        timeout=60,
        capture_output=True,
        text=True,
    )
    exited_in = time.monotonic() - float(process.stdout.split()[-1])
    assert len(api.requests) == 4  # all sent, none answered
    assert exited_in < 4.0, process.stderr


async def test_a_worker_that_stopped_on_an_error_starts_again(
    api: StandInAgentSightAPI, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Its sink could not start (SSL_CERT_FILE naming a missing file, say): the worker
    # thread died, and every later event waited in an intake nobody read, then was
    # dropped as "queue full" (the worker was never started again).
    monkeypatch.setattr("agentsight_middleware._delivery._RESTART_AFTER", 0.3)
    mw = wrap(api)
    delivery = mw._core.delivery
    assert isinstance(delivery, BackgroundDelivery)
    real_factory = delivery._sink_factory
    starts = 0

    def flaky_factory() -> Any:
        nonlocal starts
        starts += 1
        if starts == 1:
            raise OSError("[Errno 2] No such file or directory: '/missing/ca.pem'")
        return real_factory()

    monkeypatch.setattr(delivery, "_sink_factory", flaky_factory)
    async with client(mw) as c:
        await visit(c, chats=0)  # starts the worker, which stops on the error
        for _ in range(100):
            if not delivery._started:
                break
            await asyncio.sleep(0.01)
        assert mw.flush(0.1) is False  # its event waits, and flush() says so
        await asyncio.sleep(0.4)
        await visit(c, chats=1)  # the next event starts it again
    assert mw.flush(10)
    mw.close()
    assert starts == 2
    assert "starts again in 0.3 s" in caplog.text
    assert len(api.conversations) == 3  # the waiting page view, then a page view and a chat


async def test_a_backed_up_queue_keeps_only_what_the_payloads_use(
    api: StandInAgentSightAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With the API down, events wait unbuilt, each holding the raw headers of its request:
    # 60 KiB headers made ~269 KiB an event, ~2.6 GB for a full queue of 10,000. Past
    # _COMPACT_AT waiting, each new event keeps only what its payload reads, and the
    # payload is the same.
    from agentsight_middleware._events import INITIALIZE, new_event
    from agentsight_middleware._payload import build_payload

    monkeypatch.setattr(BackgroundDelivery, "_start", lambda self: None)  # events stay queued
    mw = wrap(api, trusted_proxies=["10.0.0.0/8"])
    delivery = mw._core.delivery
    assert isinstance(delivery, BackgroundDelivery)
    delivery._compact_at = 2
    hops = ", ".join(f"198.51.{n // 250}.{n % 250}" for n in range(5000))
    headers = {
        **BROWSER,
        "user-agent": CHROME_DESKTOP + " " + "x" * 60_000,
        "accept-language": "de-CH, " + ", ".join(["en;q=0.1"] * 6000),
        "referer": "https://search.example/?q=" + "a" * 60_000 + "&token=secret",
        "x-forwarded-for": hops + ", 203.0.113.50, 10.1.2.3",
    }
    transport = httpx.ASGITransport(app=mw, client=("10.0.0.1", 4000))
    async with httpx.AsyncClient(transport=transport, base_url="https://shop.test") as c:
        for _ in range(4):
            c.cookies.clear()
            await c.get("/?utm=" + "b" * 60_000 + "&page=2", headers=headers)
    events = list(delivery._intake)
    assert len(events) == 4
    full, _, compact, _ = events  # the first two joined a short queue, the others did not

    def size(event: Any) -> int:
        return sum(len(v) for v in event.conversation._facts() if isinstance(v, str)) + sum(
            len(v or "") for v in event.conversation._facts()[7]
        )

    assert size(full) > 240_000
    assert size(compact) < 25_000
    for event in (full, compact):
        assert event.conversation.client_ip == "203.0.113.50"
    same_time = [new_event((INITIALIZE, e.conversation, 1.0)) for e in (full, compact)]
    payloads = [build_payload(e, source="web", environment=None) for e in same_time]
    assert payloads[0]["conversation_id"] != payloads[1]["conversation_id"]
    for payload in payloads:
        del payload["conversation_id"]
    assert payloads[0] == payloads[1]
    assert payloads[0]["language"] == "de-CH"
    assert payloads[0]["device"] == "desktop"


async def test_the_event_a_pause_held_goes_once_the_pause_is_over_whatever_the_clock(
    api: StandInAgentSightAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As above, but the event the 429 answered: given back to the outbox until the wall
    # clock's end of the pause, it waited for the whole step (an hour) after delivery
    # resumed (the same for every event an unreachable API held).
    real = time.time
    offset = [3600.0]  # the clock is an hour fast
    monkeypatch.setattr(time, "time", lambda: real() + offset[0])
    api.throttle_next(1, retry_after="2")
    mw = wrap(api)
    try:
        async with client(mw) as c:
            await visit(c, chats=0)
            deadline = time.monotonic() + 10
            while mw.stats()["throttled"] == 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert mw.stats()["throttled"] == 1
            offset[0] = 0.0  # and is set right
            await visit(c, chats=0)
        deadline = time.monotonic() + 10
        while len(api.conversations) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert len(api.conversations) == 2, api.conversations  # the throttled one too
    finally:
        mw.close(0.5)


@pytest.mark.parametrize("sink", ["api", "local store"])
def test_counts_add_up_across_lifespans(
    api: StandInAgentSightAPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sink: str
) -> None:
    # A second lifespan (a server run again in the process, two TestClient blocks) starts
    # a new worker, whose sink counted from zero: stats() said enqueued 6, sent 3 (or
    # stored 3) with every event delivered.
    if sink == "api":
        mw, done = wrap(api), "sent"
    else:
        monkeypatch.delenv("AGENTSIGHT_API_KEY", raising=False)
        mw = AgentSightMiddleware(
            make_app(), chat_routes=["POST /api/chat"], local_store=tmp_path / "e.sqlite3"
        )
        done = "stored"
    for run in (1, 2):
        with uvicorn_server(mw) as url, httpx.Client(base_url=url) as c:
            for n in range(3):
                asked = c.post("/api/chat", headers={"X-Conversation-ID": f"conv_{run}{n:011d}"})
                assert asked.status_code == 200
        stats = mw.stats()  # the lifespan's shutdown delivered them all
        assert (stats["enqueued"], stats[done], stats["pending"]) == (3 * run, 3 * run, 0)


def test_events_lost_at_shutdown_are_counted(api: StandInAgentSightAPI) -> None:
    # The API down, the in-memory queue for it full: what still waits for the worker at
    # the shutdown's deadline is lost (a warning says so), and it left stats() altogether:
    # queued went to 0 and no count took them. So did what the in-memory queue for the
    # API held, at the next lifespan's start (a new worker, a new queue).
    api.fail_for(60)
    mw = wrap(api, queue_size=50, shutdown_timeout=0.5)
    outcomes = ("sent", "pending", "dropped", "failed", "rejected", "errors", "skipped_bots")
    with uvicorn_server(mw) as url, httpx.Client(base_url=url) as c:
        for n in range(400):
            asked = c.post("/api/chat", headers={"X-Conversation-ID": f"conv_{n:012d}"})
            assert asked.status_code == 200
    stats = mw.stats()  # after the lifespan's shutdown
    assert stats["queued"] == 0
    assert sum(stats[k] for k in outcomes) == 400, stats
    api.reset()  # up again
    with uvicorn_server(mw) as url, httpx.Client(base_url=url) as c:
        for n in range(3):
            asked = c.post("/api/chat", headers={"X-Conversation-ID": f"conv_again{n:07d}"})
            assert asked.status_code == 200
    stats = mw.stats()
    assert sum(stats[k] for k in outcomes) == 403, stats
    assert (stats["sent"], stats["pending"]) == (3, 0)
