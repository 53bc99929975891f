"""Two of ours on one request: the outer one tracks it, the inner one leaves it alone.

A middleware on the main app and another on an app it mounts (each written by its own team,
or one added twice), or a Flask app wrapped twice: both matched the request, and the visit
or the chat was counted twice, once under each instance's delivery.
"""

from __future__ import annotations

import asyncio
import logging
import time
import warnings
from typing import Any

import httpx
import pytest
from fastapi import BackgroundTasks, FastAPI
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


def _flask_shop(prefix: str = "/shop") -> Flask:
    """The shop's page and chat under ``prefix`` ("" for one mounted at /shop)."""
    shop = Flask("shop")

    @shop.get(f"{prefix}/")
    def page() -> str:
        return "<html><body>shop</body></html>"

    @shop.post(f"{prefix}/chat")
    def chat() -> dict[str, Any]:
        conversation = current_conversation()
        return {"seen": None if conversation is None else conversation.id}

    return shop


def _flask_shop_under_a_dispatcher(inner: RecordingTracker) -> Any:
    shop = _flask_shop(prefix="")
    shop.wsgi_app = AgentSightWSGIMiddleware(  # type: ignore[method-assign]
        shop.wsgi_app, tracker=inner, **RULES
    )
    return DispatcherMiddleware(Flask("main"), {"/shop": shop})


def _through_a_lazy_layer(inner: RecordingTracker) -> Any:
    """A layer that calls the app it wraps only as its own body is read (a generator): the
    inner one of ours is called from a step of the outer one's body."""
    wrapped = AgentSightWSGIMiddleware(_flask_shop().wsgi_app, tracker=inner, **RULES)

    def lazy(environ: dict[str, Any], start_response: Any) -> Any:
        yield from wrapped(environ, start_response)

    return lazy


@pytest.mark.parametrize("layout", ["wrapped twice", "dispatcher", "lazy layer"])
def test_a_wsgi_app_wrapped_twice_is_tracked_once(
    layout: str, caplog: pytest.LogCaptureFixture
) -> None:
    outer, inner = RecordingTracker(), RecordingTracker()
    if layout == "wrapped twice":
        app: Any = AgentSightWSGIMiddleware(_flask_shop().wsgi_app, tracker=inner, **RULES)
    elif layout == "dispatcher":
        app = _flask_shop_under_a_dispatcher(inner)
    else:
        app = _through_a_lazy_layer(inner)
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


def _big_chat_then_pages(
    url: str, also: str | None = None
) -> tuple[dict[str, Any], list[httpx.Response]]:
    """On one keep-alive connection: a chat whose body passes uvicorn's 64 KiB flow-control
    mark (its reading is paused, then resumed from inside the request), then two views (and
    a GET of ``also``)."""
    with httpx.Client(base_url=url) as client:
        chat = client.post("/api/chat", json={"message": "x" * 300_000})
        assert chat.status_code == 200
        pages = []
        for _ in range(2):
            client.cookies.clear()  # a first visit each: a view with an event
            pages.append(client.get("/shop/", headers=BROWSER))
        if also is not None:
            pages.append(client.get(also))
    return chat.json(), pages


@pytest.mark.parametrize("background", [False, True])
@pytest.mark.parametrize("http", ["h11", "httptools"])
def test_a_later_request_on_the_connection_is_no_nested_one(
    http: str, background: bool, caplog: pytest.LogCaptureFixture
) -> None:
    # asyncio's transport, resumed from inside the big chat, runs the connection's later
    # requests in a copy of that chat's context, its conversation current there: the
    # middleware took each for one tracked further out, and tracked nothing (no cookie, no
    # view, a warning of a nesting there is none of), on every later request of it; and an
    # untracked one read the chat's conversation from current_conversation(). Also while
    # the chat's background task still runs (the chat itself not yet over).
    tracker = RecordingTracker()
    app = FastAPI()

    @app.get("/shop/", response_class=HTMLResponse)
    def page() -> str:
        conversation = current_conversation()
        return f"<html><body>{None if conversation is None else conversation.id}</body></html>"

    @app.get("/other")
    def other() -> dict[str, Any]:
        conversation = current_conversation()
        return {"seen": None if conversation is None else conversation.id}

    @app.post("/api/chat")
    async def chat(body: dict[str, Any], tasks: BackgroundTasks) -> dict[str, Any]:
        if background:
            tasks.add_task(asyncio.sleep, 1.0)
        conversation = current_conversation()
        return {"seen": None if conversation is None else conversation.id}

    app.add_middleware(
        AgentSightMiddleware,
        tracker=tracker,
        widget_pages=["/shop/"],
        chat_routes=["POST /api/chat"],
    )
    with (
        caplog.at_level(logging.WARNING, logger="agentsight_middleware"),
        uvicorn_server(app, http=http) as url,
    ):
        answer, pages = _big_chat_then_pages(url, also="/other")
        tracker.wait_for(initialized=2, used=1)
    assert pages.pop().json() == {"seen": None}
    ids = [str(page.cookies.get(COOKIE)) for page in pages]
    assert "None" not in ids
    assert answer["seen"] not in ids
    assert [page.text for page in pages] == [f"<html><body>{id}</body></html>" for id in ids]
    assert sorted(call["conversation_id"] for call in tracker.initialized) == sorted(ids)
    assert _nested_warnings(caplog) == []


def test_a_wsgi_app_under_an_asgi_one_tracks_a_later_request_on_the_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The same left-behind conversation reaches a WSGI app the ASGI app mounts (Starlette's
    # WSGIMiddleware, as a2wsgi, runs it in a thread with a copy of the context): its own
    # middleware stepped aside.
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated for a2wsgi, which does the same
        from starlette.middleware.wsgi import WSGIMiddleware

    outer, inner = RecordingTracker(), RecordingTracker()

    async def chat(request: Any) -> JSONResponse:
        await request.body()
        return JSONResponse({})

    shop = AgentSightWSGIMiddleware(_flask_shop().wsgi_app, tracker=inner, widget_pages=["/shop/"])
    main = Starlette(
        routes=[Route("/api/chat", chat, methods=["POST"]), Mount("/", WSGIMiddleware(shop))]
    )
    main.add_middleware(AgentSightMiddleware, tracker=outer, chat_routes=["POST /api/chat"])
    with (
        caplog.at_level(logging.WARNING, logger="agentsight_middleware"),
        uvicorn_server(main) as url,
    ):
        _, pages = _big_chat_then_pages(url)
        outer.wait_for(used=1)
        inner.wait_for(initialized=2)
    assert all(page.cookies.get(COOKIE) for page in pages)
    assert _nested_warnings(caplog) == []
