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
