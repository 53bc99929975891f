"""No tracker and no API key: the events are kept in a local SQLite file."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from agentsight_middleware import AgentSightMiddleware
from agentsight_middleware._report import build_report

from .conftest import BROWSER


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
    transport = httpx.ASGITransport(app=mw, client=("198.51.100.3", 1))
    async with httpx.AsyncClient(transport=transport, base_url="http://shop.test") as c:
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


def _middleware(**options: object) -> AgentSightMiddleware:
    app = Starlette(routes=[Route("/", page), Route("/api/chat", chat, methods=["POST"])])
    return AgentSightMiddleware(app, widget_pages=["/"], chat_routes=["POST /api/chat"], **options)


def test_a_store_in_a_missing_folder_fails_at_start_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AGENTSIGHT_API_KEY", raising=False)
    with pytest.raises(ValueError, match=r"local_store=.*the folder .* does not exist"):
        _middleware(local_store=tmp_path / "no-such-folder" / "events.sqlite3")


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
    corrupt.write_bytes(b"this is not a database" * 100)
    mw = _middleware(local_store=corrupt)
    transport = httpx.ASGITransport(app=mw, client=("198.51.100.3", 1))
    with caplog.at_level(logging.DEBUG, logger="agentsight_middleware"):
        async with httpx.AsyncClient(transport=transport, base_url="http://shop.test") as c:
            for _ in range(20):
                c.cookies.clear()
                response = await c.get("/", headers=BROWSER)
                assert response.status_code == 200  # the app is untouched
                mw.flush(5)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert errors[0].exc_info is not None
    assert mw.stats()["errors"] == 20
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
    transport = httpx.ASGITransport(app=mw, client=("198.51.100.3", 1))
    async with httpx.AsyncClient(transport=transport, base_url="http://shop.test") as c:
        await c.get("/", headers=BROWSER)
    assert mw.flush(5)
    mw.close()
    import sqlite3

    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT environment FROM events").fetchall() == [("development",)]
    monkeypatch.setenv("AGENTSIGHT_ENVIRONMENT", "staging")
    with pytest.raises(ValueError, match="AGENTSIGHT_ENVIRONMENT='staging'"):
        _middleware(local_store=tmp_path / "other.sqlite3")
