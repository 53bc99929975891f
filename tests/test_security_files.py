"""Security review (session 16), finding F3: the local store and the outbox hold every
visitor's IP address, user agent, page URLs and referrers (and the customer ids a hook
names); they are created with the process umask's mode, world-readable under the usual
022, with their -wal and -shm files beside them.

The files must be the owner's alone (0600), as the `send` command's own lock files are.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from agentsight_middleware import AgentSightMiddleware

from .conftest import BROWSER

KEY = "ags_" + "0" * 32 + "_" + "0" * 6


async def page(request: Request) -> Response:
    return HTMLResponse("<p>shop</p>", headers={"cache-control": "no-cache"})


def _modes(path: Path) -> dict[str, str]:
    found = {}
    for suffix in ("", "-wal", "-shm"):
        file = Path(f"{path}{suffix}")
        if file.exists():
            found[file.name] = oct(stat.S_IMODE(file.stat().st_mode))
    return found


@pytest.fixture
def usual_umask() -> Iterator[None]:
    previous = os.umask(0o022)  # Debian's, Ubuntu's, a container's default
    yield
    os.umask(previous)


@pytest.mark.anyio
async def test_local_store_is_not_world_readable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, usual_umask: None
) -> None:
    monkeypatch.delenv("AGENTSIGHT_API_KEY", raising=False)
    db = tmp_path / "agentsight-events.sqlite3"
    mw = AgentSightMiddleware(
        Starlette(routes=[Route("/", page)]), widget_pages=["/"], local_store=db
    )
    transport = httpx.ASGITransport(app=mw, client=("198.51.100.3", 1))
    async with httpx.AsyncClient(transport=transport, base_url="http://shop.test") as c:
        await c.get("/", headers=BROWSER)
    assert mw.flush(10)
    try:
        modes = _modes(db)
        assert db.name in modes
        assert all(mode == "0o600" for mode in modes.values()), modes
    finally:
        mw.close()


def test_outbox_is_not_world_readable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, usual_umask: None
) -> None:
    outbox = tmp_path / "outbox.sqlite3"
    mw = AgentSightMiddleware(
        Starlette(routes=[Route("/", page)]),
        widget_pages=["/"],
        api_key=KEY,
        endpoint="http://127.0.0.1:9",
        outbox=outbox,
    )
    try:
        modes = _modes(outbox)
        assert outbox.name in modes  # opened at start-up
        assert all(mode == "0o600" for mode in modes.values()), modes
    finally:
        mw.close(0)
