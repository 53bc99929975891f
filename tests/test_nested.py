"""Two of ours on one request: the outer one tracks it, the inner one leaves it alone.

A middleware on the main app and another on an app it mounts (each written by its own team,
or one added twice), or a Flask app wrapped twice: both matched the request, and the visit
or the chat was counted twice, once under each instance's delivery.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from flask import Flask
from starlette.applications import Starlette
from starlette.routing import Mount
from werkzeug.middleware.dispatcher import DispatcherMiddleware
from werkzeug.serving import make_server

from agentsight_middleware import (
    AgentSightMiddleware,
    AgentSightWSGIMiddleware,
    current_conversation,
)
from agentsight_middleware.testing import RecordingTracker

from .conftest import BROWSER, serving, uvicorn_server

COOKIE = "agentsight_conversation_id"
RULES: dict[str, Any] = {"widget_pages": ["/shop/"], "chat_routes": ["POST /shop/chat"]}


def _nested_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "further out" in r.getMessage()]


def _visit_and_chat(url: str, chats: int = 2) -> tuple[str, list[str | None]]:
    """A page view, then chats; the page's cookie id and the id each chat's handler saw."""
    with httpx.Client(base_url=url) as client:
        page = client.get("/shop/", headers=BROWSER)
        assert page.status_code == 200
        seen = [client.post("/shop/chat", json={}).json()["seen"] for _ in range(chats)]
    return page.cookies[COOKIE], seen


def _settled(outer: RecordingTracker, inner: RecordingTracker) -> None:
    outer.wait_for(initialized=1, used=2)
    time.sleep(0.2)  # what the inner one would have sent by now, had it tracked too
    assert (len(inner.initialized), len(inner.used)) == (0, 0)
    assert (len(outer.initialized), len(outer.used)) == (1, 2)


def test_a_mounted_app_s_middleware_leaves_the_main_app_s_requests_to_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    outer, inner = RecordingTracker(), RecordingTracker()
    shop = FastAPI()

    @shop.get("/", response_class=HTMLResponse)
    def page() -> str:
        return "<html><body>shop</body></html>"

    @shop.post("/chat")
    def chat() -> dict[str, Any]:
        conversation = current_conversation()
        return {"seen": None if conversation is None else conversation.id}

    shop.add_middleware(AgentSightMiddleware, tracker=inner, **RULES)
    main = Starlette(routes=[Mount("/shop", shop)])
    main.add_middleware(AgentSightMiddleware, tracker=outer, **RULES)
    with (
        caplog.at_level(logging.WARNING, logger="agentsight_middleware"),
        uvicorn_server(main) as url,
    ):
        cookie, seen = _visit_and_chat(url)
        _settled(outer, inner)
    assert seen == [cookie, cookie]  # the handler sees the outer one's conversation
    assert [call["conversation_id"] for call in outer.used] == [cookie, cookie]
    told = _nested_warnings(caplog)
    assert len(told) == 1, told  # once, not a line per request
    assert "/shop/" in told[0]
    assert "wrap the app once" in told[0]


def _flask_shop() -> Flask:
    shop = Flask("shop")

    @shop.get("/shop/")
    def page() -> str:
        return "<html><body>shop</body></html>"

    @shop.post("/shop/chat")
    def chat() -> dict[str, Any]:
        conversation = current_conversation()
        return {"seen": None if conversation is None else conversation.id}

    return shop


def _flask_shop_under_a_dispatcher(inner: RecordingTracker) -> Any:
    shop = Flask("shop")

    @shop.get("/")
    def page() -> str:
        return "<html><body>shop</body></html>"

    @shop.post("/chat")
    def chat() -> dict[str, Any]:
        conversation = current_conversation()
        return {"seen": None if conversation is None else conversation.id}

    shop.wsgi_app = AgentSightWSGIMiddleware(  # type: ignore[method-assign]
        shop.wsgi_app, tracker=inner, **RULES
    )
    return DispatcherMiddleware(Flask("main"), {"/shop": shop})


@pytest.mark.parametrize("layout", ["wrapped twice", "dispatcher"])
def test_a_wsgi_app_wrapped_twice_is_tracked_once(
    layout: str, caplog: pytest.LogCaptureFixture
) -> None:
    outer, inner = RecordingTracker(), RecordingTracker()
    if layout == "wrapped twice":
        app: Any = AgentSightWSGIMiddleware(_flask_shop().wsgi_app, tracker=inner, **RULES)
    else:
        app = _flask_shop_under_a_dispatcher(inner)
    app = AgentSightWSGIMiddleware(app, tracker=outer, **RULES)
    with (
        caplog.at_level(logging.WARNING, logger="agentsight_middleware"),
        serving(make_server("127.0.0.1", 0, app, threaded=True)) as url,
    ):
        cookie, seen = _visit_and_chat(url)
        _settled(outer, inner)
    assert seen == [cookie, cookie]
    assert [call["conversation_id"] for call in outer.used] == [cookie, cookie]
    assert len(_nested_warnings(caplog)) == 1
