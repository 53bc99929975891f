"""Rules that miss the app's routes by a little are told once the app has started."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, FastAPI
from fastapi.responses import HTMLResponse
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route, Router

from agentsight_middleware import AgentSightMiddleware
from agentsight_middleware._routes import near_misses, starlette_routes
from agentsight_middleware._rules import RuleSet
from agentsight_middleware.testing import RecordingTracker

from .conftest import uvicorn_server


def _shop() -> FastAPI:
    app = FastAPI()

    @app.get("/pricing", response_class=HTMLResponse)
    def pricing() -> str:
        return "<html>prices</html>"

    @app.post("/api/chat")
    def chat() -> dict[str, str]:
        return {"reply": "hi"}

    return app


def _told(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("agentsight_middleware") and r.levelno == logging.WARNING
    ]


@pytest.mark.parametrize("form", ["add_middleware", "wrap"])
def test_a_trailing_slash_and_a_wrong_method_are_told_at_start_up(
    form: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Written as a newcomer does: both rules match nothing the app serves, and before
    # this nothing said so (the page was never counted, the chat never tracked).
    options: dict[str, Any] = {
        "widget_pages": ["/pricing/"],
        "chat_routes": ["GET /api/chat"],
        "tracker": RecordingTracker(),
    }
    app: Any = _shop()
    if form == "add_middleware":
        app.add_middleware(AgentSightMiddleware, **options)
    else:
        app = AgentSightMiddleware(app, **options)
    with caplog.at_level(logging.WARNING), uvicorn_server(app) as url:
        assert httpx.get(url + "/pricing").status_code == 200  # the app itself is untouched
    told = _told(caplog)
    assert len(told) == 2, told
    assert any(
        "'/pricing/'" in line and "one serves '/pricing'" in line and "write '/pricing'" in line
        for line in told
    ), told
    assert any("'GET /api/chat'" in line and "takes POST, not GET" in line for line in told), told


def test_rules_that_name_the_app_s_routes_or_no_route_at_all_say_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = _shop()
    app.mount("/static", PlainTextResponse("file"))
    app.add_middleware(
        AgentSightMiddleware,
        # Served as written; a pattern (not checked); a path under a mount; a path no
        # route knows (a catch-all or another app may serve it: not a near miss).
        widget_pages=["/pricing", "/docs/**", "/static/help", "/elsewhere"],
        chat_routes=["POST /api/chat", "/api/chat"],
        tracker=RecordingTracker(),
    )
    with caplog.at_level(logging.WARNING), uvicorn_server(app):
        pass
    assert _told(caplog) == []


def _near_misses(routes: list[Any], widget: list[str], chat: list[str]) -> list[str]:
    return near_misses(RuleSet(widget, chat).exact_matches, routes)


async def _page(request: Any) -> PlainTextResponse:
    return PlainTextResponse("page")


def test_near_misses_the_other_way_round_and_methods_of_get_routes() -> None:
    routes = [
        Route("/pricing/", _page),
        Route("/stream", _page, methods=["GET"]),
        Route("/submit", _page, methods=["PUT"]),
    ]
    told = _near_misses(routes, ["/pricing"], ["POST /stream", "/submit", "POST /submit"])
    assert len(told) == 2, told
    slash = next(line for line in told if "'/pricing'" in line)
    assert "one serves '/pricing/'" in slash
    # Starlette adds HEAD to a GET route: not worth naming. A chat rule without methods
    # matches the PUT route: no word about it.
    method = next(line for line in told if "'POST /stream'" in line)
    assert "takes GET, not POST" in method


def test_the_router_is_found_through_the_layers_around_it() -> None:
    router = Router(routes=[Route("/", _page)])
    app = Starlette(routes=[Mount("/", router)])

    class Layer:
        def __init__(self, app: Any) -> None:
            self.app = app

    assert starlette_routes(Layer(Layer(app))) is app.routes
    assert starlette_routes(Layer(object())) is None
    assert starlette_routes(None) is None


# Cases from a review of the check.
def test_a_pattern_rule_is_not_checked_at_another_rule_s_exact_path(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # widget_pages=["/**"] (every page) with chat_routes=["POST /api/chat"], a correct and
    # common configuration: the pattern was checked at the chat rule's path, under GET.
    app = _shop()
    app.add_middleware(
        AgentSightMiddleware,
        widget_pages=["/**"],
        chat_routes=["POST /api/chat"],
        tracker=RecordingTracker(),
    )
    with caplog.at_level(logging.WARNING), uvicorn_server(app):
        pass
    assert _told(caplog) == []


def test_a_chat_pattern_is_not_checked_at_a_get_chat_rule_s_path() -> None:
    # POST /api/** for the chats, GET /api/stream for the SSE stream: both correct.
    routes = [
        Route("/api/stream", _page, methods=["GET"]),
        Route("/api/chat", _page, methods=["POST"]),
    ]
    assert _near_misses(routes, [], ["POST /api/**", "GET /api/stream"]) == []


# 2 (medium): FastAPI 0.165 keeps an included router as one lazy route
# (_IncludedRouter) without `methods`: the method miss, the feature's headline case,
# is never told for a route declared on an APIRouter.
def test_a_wrong_method_is_told_for_a_route_of_an_included_router(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = FastAPI()
    api = APIRouter(prefix="/api")

    @api.post("/chat")
    def chat() -> dict[str, str]:
        return {"reply": "hi"}

    app.include_router(api)
    app.add_middleware(
        AgentSightMiddleware, chat_routes=["GET /api/chat"], tracker=RecordingTracker()
    )
    with caplog.at_level(logging.WARNING), uvicorn_server(app) as url:
        assert httpx.post(url + "/api/chat").status_code == 200
    told = _told(caplog)
    assert len(told) == 1, told
    assert "takes POST, not GET" in told[0], told


# 3 (low): a root_path deployment (uvicorn --root-path /app; rules written with the
# mount point, as the README says) with a one-segment catch-all: "/app/" is the home
# page, served, yet "/app" matches the catch-all and the check said "write '/app'".
def test_no_slash_warning_for_the_home_page_under_a_root_path(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = FastAPI()

    @app.get("/", response_class=HTMLResponse)
    def home() -> str:
        return "<html>home</html>"

    @app.get("/{slug}", response_class=HTMLResponse)
    def page(slug: str) -> str:
        return f"<html>{slug}</html>"

    tracker = RecordingTracker()
    app.add_middleware(AgentSightMiddleware, widget_pages=["/app/"], tracker=tracker)
    with caplog.at_level(logging.WARNING), uvicorn_server(app, root_path="/app") as url:
        # The proxy strips /app: "/" reaches uvicorn, the app sees path "/app/".
        browser = {"accept": "text/html", "user-agent": "Mozilla/5.0 Firefox/130.0"}
        assert httpx.get(url + "/", headers=browser).text == "<html>home</html>"
        tracker.wait_for(initialized=1)  # the rule matched: a page view
    assert _told(caplog) == []


def test_the_headline_cases_are_still_told_with_a_catch_all() -> None:
    routes = [
        Route("/pricing", _page),
        Route("/api/chat", _page, methods=["POST"]),
        Route("/{slug}", _page),
    ]
    told = _near_misses(routes, ["/pricing/"], ["GET /api/chat"])
    assert len(told) == 2, told
    assert any("write '/pricing'" in line for line in told), told
    assert any("write 'POST /api/chat'" in line for line in told), told
