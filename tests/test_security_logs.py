"""Security review (session 16), finding F6: the request path, which the visitor writes
(and the server hands over percent-decoded), goes into two WARNING lines with ``%s``: a
path holding ``%0A`` writes a line of the attacker's choosing into the application's log.
Said once per rule or per process, so the visitor has to be the first to trigger it (at a
deploy, on a widget page answered with JSON or sent for shared caches).
"""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route

from agentsight_middleware import AgentSightMiddleware
from agentsight_middleware.testing import RecordingTracker

from .conftest import BROWSER, uvicorn_server

FORGED = "/help/x%0A2026-11-27 12:00:00 CRITICAL django.security: admin password reset by 10.0.0.1"


async def json_page(request: Any) -> JSONResponse:
    return JSONResponse({"page": request.path_params["name"]})


async def cached_page(request: Any) -> HTMLResponse:
    return HTMLResponse("<p>help</p>", headers={"cache-control": "public, max-age=60"})


@pytest.mark.parametrize("endpoint", [json_page, cached_page], ids=["not-html", "shared-cache"])
def test_visitor_path_cannot_forge_a_log_line(
    endpoint: Any, caplog: pytest.LogCaptureFixture
) -> None:
    app = AgentSightMiddleware(
        Starlette(routes=[Route("/help/{name}", endpoint)]),
        widget_pages=["/help/*"],
        tracker=RecordingTracker(),
    )
    with (
        caplog.at_level(logging.WARNING, logger="agentsight_middleware"),
        uvicorn_server(app) as url,
        httpx.Client(base_url=url) as client,
    ):
        assert client.get(FORGED, headers=BROWSER).status_code == 200
    ours = [r.getMessage() for r in caplog.records if r.name == "agentsight_middleware"]
    assert ours, "the warning was not logged"
    assert all("\n" not in message for message in ours), ours
