"""What happens to a shared outbox file that is deleted or moved while gunicorn's workers
use it: real gunicorn workers, the stand-in API, real signals."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from agentsight_middleware.testing import StandInAgentSightAPI

from .conftest import BROWSER, gunicorn_outbox_app, gunicorn_workers


@pytest.fixture
def api() -> Iterator[StandInAgentSightAPI]:
    with StandInAgentSightAPI() as server:
        yield server


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for the workers")
def test_an_outbox_deleted_under_running_workers_does_not_stop_gunicorn(
    tmp_path: Path, api: StandInAgentSightAPI
) -> None:
    # rm outbox.sqlite3 (to drop a backlog, say) left its -wal and -shm in use by the
    # workers: the next worker gunicorn started (a SIGKILL, the OOM killer, a timeout,
    # --max-requests) met them with a new file, failed "disk I/O error" at start-up as a
    # misconfiguration, and gunicorn stopped the whole app ("Worker failed to boot").
    outbox = tmp_path / "outbox.sqlite3"
    with gunicorn_outbox_app(tmp_path, api, workers=2) as (url, server, log):
        seen: set[int] = set()
        with httpx.Client(base_url=url) as c:
            deadline = time.monotonic() + 20
            while seen != gunicorn_workers(server.pid) and time.monotonic() < deadline:
                c.cookies.clear()
                seen.add(int(c.get("/", headers=BROWSER).headers["x-pid"]))
            api.wait_for(conversations=len(seen), timeout=15)  # both have the file open
            outbox.unlink()
            os.kill(seen.pop(), signal.SIGKILL)
            time.sleep(3)  # gunicorn starts another worker
            assert server.poll() is None, log.read_text()
            c.cookies.clear()
            assert c.get("/", headers=BROWSER).status_code == 200
        assert "failed to boot" not in log.read_text()


@pytest.mark.anyio
async def test_an_outbox_on_a_full_disk_says_which_file_and_that_events_are_lost(
    tmp_path: Path, api: StandInAgentSightAPI, caplog: pytest.LogCaptureFixture
) -> None:
    # Said as "HttpSink.put() failed; the request was served regardless" (a 2 MB tmpfs
    # filled during an outage): the outbox kept nothing of those events, and said so
    # nowhere but in stats()["errors"].
    import contextlib
    import logging
    import sqlite3

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import HTMLResponse
    from starlette.routing import Route

    from agentsight_middleware import AgentSightMiddleware

    async def page(request: Request) -> HTMLResponse:
        return HTMLResponse("<p>page</p>")

    outbox = tmp_path / "outbox.sqlite3"
    mw = AgentSightMiddleware(
        Starlette(routes=[Route("/", page)]),
        widget_pages=["/"],
        api_key=api.api_key,
        endpoint=api.url,
        outbox=outbox,
    )
    transport = httpx.ASGITransport(app=mw, client=("198.51.100.3", 1))
    async with httpx.AsyncClient(transport=transport, base_url="http://shop.test") as c:
        await c.get("/", headers=BROWSER)
        assert mw.flush(10)
        with contextlib.closing(sqlite3.connect(outbox)) as conn:  # SQLite's own words
            conn.execute(
                "CREATE TRIGGER full BEFORE INSERT ON outbox "
                "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
            )
            conn.commit()
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="agentsight_middleware"):
            c.cookies.clear()
            assert (await c.get("/", headers=BROWSER)).status_code == 200
            assert mw.flush(10)
    errors = [r for r in caplog.records if "disk is full" in str(r.exc_info and r.exc_info[1])]
    assert errors, [r.getMessage() for r in caplog.records]
    said = errors[0].getMessage()
    assert str(outbox) in said, said
    assert "lost" in said, said
    stats = mw.stats()
    # Lost in the sink, as an event given up on is: `failed`, once, not `errors` too.
    assert (stats["sent"], stats["failed"], stats["errors"]) == (1, 1, 0)
    mw.close()
