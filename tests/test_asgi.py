"""The ASGI middleware in front of real Starlette / FastAPI apps, driven through
``httpx.ASGITransport`` (the app's own code paths, no sockets)."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
import time
import warnings
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.websockets import WebSocket

from agentsight_middleware import AgentSightMiddleware, Conversation, current_conversation
from agentsight_middleware import asgi as asgi_module
from agentsight_middleware._body import _BOUND_CANCELS, PEEK_WAIT
from agentsight_middleware.testing import RecordingTracker

from .conftest import (
    APP_COOKIE_CASES,
    BROWSER,
    CHROME_DESKTOP,
    GOOGLEBOT,
    IPHONE,
    check_shared_cache_outcome,
    uvicorn_server,
    wait_for_the_parser,
)

pytestmark = pytest.mark.anyio

PAGE = "<!doctype html><title>Shop</title><p>hello</p>"


async def page(request: Request) -> Response:
    return HTMLResponse(PAGE)


async def json_page(request: Request) -> Response:
    return JSONResponse({"ok": True})


async def missing(request: Request) -> Response:
    return HTMLResponse("<h1>not found</h1>", status_code=404)


async def broken(request: Request) -> Response:
    return HTMLResponse("<h1>oops</h1>", status_code=500)


async def moved(request: Request) -> Response:
    return RedirectResponse("/", status_code=302)


async def chat(request: Request) -> Response:
    body = await request.body()
    conversation: Conversation = request.state.agentsight
    current = current_conversation()
    return JSONResponse(
        {
            "body": body.decode("latin-1"),
            "state_id": conversation.id,
            "contextvar_id": current.id if current else None,
            "id_source": conversation.id_source,
        }
    )


def sync_chat(request: Request) -> Response:
    # Runs in Starlette's thread pool: the context variable must have followed.
    current = current_conversation()
    return JSONResponse({"contextvar_id": current.id if current else None})


async def stream(request: Request) -> Response:
    async def chunks() -> AsyncIterator[bytes]:
        for i in range(3):
            yield f"data: {i}\n\n".encode()
            await asyncio.sleep(0)

    return StreamingResponse(chunks(), media_type="text/event-stream")


async def ws(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_text("hi")
    await websocket.close()


def make_app() -> Starlette:
    return Starlette(
        routes=[
            Route("/", page),
            Route("/pricing", page),
            Route("/docs/{rest:path}", page),
            Route("/json", json_page),
            Route("/missing", missing),
            Route("/broken", broken),
            Route("/moved", moved),
            Route("/other", page),
            Route("/api/chat", chat, methods=["POST", "GET"]),
            Route("/api/chat/{conversation_id}/messages", chat, methods=["POST"]),
            Route("/api/sync-chat", sync_chat, methods=["POST"]),
            Route("/api/stream", stream, methods=["POST"]),
            WebSocketRoute("/ws", ws),
        ]
    )


WIDGETS = ["/", "/pricing", "/docs/*", "/json", "/missing", "/broken", "/moved"]
CHATS = [
    "POST /api/chat",
    "/api/chat/{conversation_id}/messages",
    "POST /api/sync-chat",
    "POST /api/stream",
]


def wrap(tracker: Any, **options: Any) -> AgentSightMiddleware:
    options.setdefault("widget_pages", WIDGETS)
    options.setdefault("chat_routes", CHATS)
    return AgentSightMiddleware(make_app(), tracker=tracker, **options)


def client(app: Any, peer: str = "203.0.113.7") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(peer, 50000))
    return httpx.AsyncClient(transport=transport, base_url="http://shop.test")


def cookie_of(response: httpx.Response) -> str | None:
    for value in response.headers.get_list("set-cookie"):
        if value.startswith("agentsight_conversation_id="):
            return value
    return None


# -- page views -----------------------------------------------------------------------


async def test_page_view_initializes_one_conversation_with_request_facts(
    tracker: RecordingTracker,
) -> None:
    mw = wrap(tracker)
    async with client(mw) as c:
        response = await c.get("/pricing?utm_source=ad&token=s3cret#top", headers=BROWSER)
    assert response.status_code == 200
    assert response.text == PAGE
    set_cookie = cookie_of(response)
    assert set_cookie is not None
    conversation_id = set_cookie.split(";")[0].split("=", 1)[1]
    assert conversation_id.startswith("conv_")
    assert len(conversation_id) == 17
    assert "Path=/" in set_cookie
    assert "SameSite=Lax" in set_cookie
    assert "Max-Age=1800" in set_cookie
    assert "HttpOnly" not in set_cookie
    assert "Secure" not in set_cookie  # plain http

    assert mw.flush(5)
    assert tracker.used == []
    [call] = tracker.initialized
    assert call["conversation_id"] == conversation_id
    assert call["customer_ip_address"] == "203.0.113.7"
    assert call["device"] == "desktop"
    assert call["language"] == "en-US"
    assert call["source"] == "web"
    assert "environment" not in call  # left to the tracker's own configuration
    meta = call["metadata"]
    assert meta["page_path"] == "/pricing"
    assert meta["page_url"] == "http://shop.test/pricing?utm_source=ad"
    assert meta["user_agent"] == CHROME_DESKTOP
    assert meta["rule"] == "/pricing"
    assert meta["conversation_id_source"] == "minted"


async def test_page_view_runs_off_the_request_path(tracker: RecordingTracker) -> None:
    release = threading.Event()

    class SlowTracker(RecordingTracker):
        def initialize_conversation(self, conversation_id: str, **kwargs: Any) -> None:
            release.wait(10)  # like the classic SDK's blocking HTTP call
            super().initialize_conversation(conversation_id, **kwargs)

    slow = SlowTracker()
    mw = wrap(slow)
    async with client(mw) as c:
        started = time.perf_counter()
        response = await c.get("/", headers=BROWSER)
        elapsed = time.perf_counter() - started
    assert response.status_code == 200
    assert elapsed < 2, "the page waited for initialize_conversation"
    assert slow.initialized == []
    release.set()
    slow.wait_for(initialized=1)


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        pytest.param("/", {**BROWSER, "accept": "application/json"}, id="accepts-json-only"),
        pytest.param("/", {**BROWSER, "accept": "*/*"}, id="accepts-anything"),
        pytest.param("/", {k: v for k, v in BROWSER.items() if k != "accept"}, id="no-accept"),
        pytest.param("/", {**BROWSER, "sec-fetch-dest": "image"}, id="sec-fetch-dest-image"),
        pytest.param("/", {**BROWSER, "sec-fetch-dest": "empty"}, id="fetch-from-script"),
        pytest.param("/", {**BROWSER, "sec-fetch-dest": "embed"}, id="sec-fetch-dest-embed"),
        pytest.param("/", {**BROWSER, "sec-purpose": "prefetch"}, id="sec-purpose-prefetch"),
        pytest.param(
            "/", {**BROWSER, "sec-purpose": "prefetch;prerender"}, id="sec-purpose-prerender"
        ),
        pytest.param("/", {**BROWSER, "purpose": "prefetch"}, id="purpose-prefetch"),
        pytest.param("/", {**BROWSER, "user-agent": ""}, id="empty-user-agent"),
        pytest.param("/", {**BROWSER, "user-agent": " \t"}, id="blank-user-agent"),
        pytest.param("/json", BROWSER, id="json-answer"),
        pytest.param("/missing", BROWSER, id="404"),
        pytest.param("/broken", BROWSER, id="500"),
        pytest.param("/moved", BROWSER, id="redirect"),
        pytest.param("/other", BROWSER, id="not-a-widget-page"),
    ],
)
async def test_not_a_page_view(
    tracker: RecordingTracker, path: str, headers: dict[str, str]
) -> None:
    mw = wrap(tracker)
    async with client(mw) as c:
        response = await c.get(path, headers=headers, follow_redirects=False)
    assert cookie_of(response) is None
    assert mw.flush(5)
    assert tracker.calls == []


@pytest.mark.parametrize("destination", ["iframe", "frame"])
async def test_a_widget_page_shown_in_a_frame_is_a_page_view(
    tracker: RecordingTracker, destination: str
) -> None:
    # A chat widget served as the page of an iframe (embedded by the site's pages or
    # another site's): browsers send Sec-Fetch-Dest: iframe, and such views were never
    # counted, every chat then minting a conversation never initialized.
    mw = wrap(tracker)
    async with client(mw) as c:
        response = await c.get("/", headers={**BROWSER, "sec-fetch-dest": destination})
    cookie = cookie_of(response)
    assert cookie is not None
    tracker.wait_for(initialized=1)
    assert cookie.split(";")[0].endswith("=" + tracker.initialized[0]["conversation_id"])


@pytest.mark.parametrize("destination", ["iframe", "frame"])
async def test_a_widget_page_framed_by_another_site_is_not_a_page_view(
    tracker: RecordingTracker, destination: str
) -> None:
    # In another site's frame the SameSite=Lax cookie is neither stored nor sent (Chromium
    # 156, tried): every load minted a view and its chats minted other conversations, views
    # no chat could ever be linked to (a visitor who chatted counted 0 of 2 views).
    mw = wrap(tracker)
    headers = {**BROWSER, "sec-fetch-dest": destination, "sec-fetch-site": "cross-site"}
    async with client(mw) as c:
        response = await c.get("/", headers=headers)
        same_site = await c.get(
            "/", headers={**headers, "sec-fetch-site": "same-site"}
        )  # the site's own pages: a view, as above
    assert cookie_of(response) is None
    assert cookie_of(same_site) is not None
    assert mw.flush(5)
    assert len(tracker.initialized) == 1


async def test_a_load_inside_another_sites_frame_is_not_a_page_view(
    tracker: RecordingTracker,
) -> None:
    # Chromium 156, tried: a link followed (or a reload) inside a widget frame that another
    # site frames, and a frame of the site's own page that another site frames, say
    # Sec-Fetch-Site: same-origin, no cookie sent or stored; only Sec-Fetch-Storage-Access
    # (sent from a cross-site context alone) tells them.
    mw = wrap(tracker)
    framed = {**BROWSER, "sec-fetch-dest": "iframe", "sec-fetch-site": "same-origin"}
    async with client(mw) as c:
        inside = await c.get("/", headers={**framed, "sec-fetch-storage-access": "none"})
        own = await c.get("/", headers=framed)
    assert cookie_of(inside) is None
    assert cookie_of(own) is not None
    assert mw.flush(5)
    assert len(tracker.initialized) == 1


async def test_head_is_not_a_page_view(tracker: RecordingTracker) -> None:
    mw = wrap(tracker)
    async with client(mw) as c:
        response = await c.head("/", headers=BROWSER)
    assert response.status_code == 200
    assert cookie_of(response) is None
    assert mw.flush(5)
    assert tracker.calls == []


@pytest.mark.parametrize(
    "user_agent",
    [
        "kube-probe/1.29",
        "ELB-HealthChecker/2.0",
        "GoogleHC/1.0",
        "curl/8.5.0",
        "python-requests/2.32.3",
        "Mozilla/5.0+(compatible; UptimeRobot/2.0; http://www.uptimerobot.com/)",
    ],
)
async def test_probes_are_filtered_in_the_background(
    tracker: RecordingTracker, user_agent: str
) -> None:
    # Telling a probe from a browser costs microseconds for an unseen user agent, so
    # it happens in the worker: the probe gets the visit cookie like any page load
    # (it ignores it), and its view is never sent.
    mw = wrap(tracker)
    async with client(mw) as c:
        response = await c.get("/", headers={**BROWSER, "user-agent": user_agent})
        assert cookie_of(response) is not None
        c.cookies.clear()
        await c.get("/", headers=BROWSER)
    assert mw.flush(5)
    assert len(tracker.initialized) == 1
    assert tracker.initialized[0]["metadata"]["user_agent"] == BROWSER["user-agent"]
    assert mw.stats()["skipped_bots"] == 1


async def test_non_browser_agents_decides_what_is_a_probe(tracker: RecordingTracker) -> None:
    mw = wrap(tracker, non_browser_agents=["ACME-Monitor"])
    async with client(mw) as c:
        await c.get("/", headers={**BROWSER, "user-agent": "acme-monitor/3"})
        c.cookies.clear()
        await c.get("/", headers={**BROWSER, "user-agent": "curl/8.5.0"})
    assert mw.flush(5)
    # curl is a visitor once the list is replaced; ACME's monitor is not, in any case.
    assert [call["metadata"]["user_agent"] for call in tracker.initialized] == ["curl/8.5.0"]
    assert mw.stats()["skipped_bots"] == 1


async def test_bots_are_filtered_in_the_background(tracker: RecordingTracker) -> None:
    mw = wrap(tracker)
    async with client(mw) as c:
        await c.get("/", headers={**BROWSER, "user-agent": GOOGLEBOT})
        c.cookies.clear()  # a different visitor
        await c.get("/", headers=BROWSER)
    assert mw.flush(5)
    assert len(tracker.initialized) == 1
    assert mw.stats()["skipped_bots"] == 1


async def test_reload_keeps_the_conversation(tracker: RecordingTracker) -> None:
    mw = wrap(tracker)
    async with client(mw) as c:
        first = await c.get("/", headers=BROWSER)
        # httpx keeps the cookie like a browser would
        second = await c.get("/pricing", headers=BROWSER)
    first_id = cookie_of(first).split(";")[0]  # type: ignore[union-attr]
    second_cookie = cookie_of(second)
    assert second_cookie is not None, "the cookie's expiry slides on every view"
    assert second_cookie.split(";")[0] == first_id
    assert mw.flush(5)
    assert len(tracker.initialized) == 1


async def test_mobile_device_and_docs_glob(tracker: RecordingTracker) -> None:
    mw = wrap(tracker)
    async with client(mw) as c:
        response = await c.get("/docs/intro", headers={**BROWSER, "user-agent": IPHONE})
    assert response.status_code == 200
    assert mw.flush(5)
    [call] = tracker.initialized
    assert call["device"] == "mobile"
    assert call["metadata"]["rule"] == "/docs/*"


async def test_https_cookie_is_secure(tracker: RecordingTracker) -> None:
    mw = wrap(tracker)
    transport = httpx.ASGITransport(app=mw)
    async with httpx.AsyncClient(transport=transport, base_url="https://shop.test") as c:
        response = await c.get("/", headers=BROWSER)
    assert "Secure" in (cookie_of(response) or "")


async def test_app_set_cookie_headers_are_kept(tracker: RecordingTracker) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/html"), (b"set-cookie", b"session=abc")],
            }
        )
        await send({"type": "http.response.body", "body": b"<p>hi</p>"})

    mw = AgentSightMiddleware(app, widget_pages=["/"], tracker=tracker)
    async with client(mw) as c:
        response = await c.get("/", headers=BROWSER)
    cookies = response.headers.get_list("set-cookie")
    assert cookies[0] == "session=abc"
    assert cookies[1].startswith("agentsight_conversation_id=conv_")


# -- chat requests ----------------------------------------------------------------------


async def test_chat_calls_get_or_create_before_the_handler(tracker: RecordingTracker) -> None:
    seen_by_handler: list[list[str]] = []

    async def handler(request: Request) -> Response:
        seen_by_handler.append([call["conversation_id"] for call in tracker.used])
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/api/chat", handler, methods=["POST"])])
    mw = AgentSightMiddleware(app, chat_routes=["POST /api/chat"], tracker=tracker)
    async with client(mw) as c:
        response = await c.post("/api/chat", headers={"x-conversation-id": "conv_0123456789ab"})
    assert response.text == "ok"
    assert seen_by_handler == [["conv_0123456789ab"]]
    [call] = tracker.used
    assert call["customer_ip_address"] == "203.0.113.7"
    assert call["metadata"]["conversation_id_source"] == "header"


async def test_a_wsgi_app_behind_asgiref_gets_coroutine_sends(tracker: RecordingTracker) -> None:
    """A Flask app served as ASGI by asgiref's WsgiToAsgi (asgiref: Django's ASGI kit): it hands
    the send it is given to ``AsyncToSync``, which warns on every request unless that send
    is a coroutine function. The cookie-adding sends must stay ``async def``: a plain
    function returning the server's awaitable would save ~0.4 us a page view and break this."""
    from asgiref.wsgi import WsgiToAsgi
    from flask import Flask, request

    flask_app = Flask(__name__)

    @flask_app.get("/")
    def home() -> str:
        return "<html><body>shop</body></html>"

    @flask_app.post("/api/chat")
    def flask_chat() -> dict[str, Any]:
        return {"cookie": request.cookies.get("agentsight_conversation_id")}

    asgi_app = WsgiToAsgi(flask_app)  # type: ignore[no-untyped-call]
    mw = AgentSightMiddleware(
        asgi_app, widget_pages=["/"], chat_routes=["POST /api/chat"], tracker=tracker
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async with client(mw) as c:
            page_view = await c.get("/", headers=BROWSER)
            chat_reply = await c.post("/api/chat", json={"message": "hi"})
    assert mw.flush(5)
    assert [str(w.message) for w in caught if "async" in str(w.message)] == []
    assert page_view.text == "<html><body>shop</body></html>"
    assert cookie_of(page_view) is not None
    [initialized] = tracker.initialized
    [used] = tracker.used
    assert chat_reply.json() == {"cookie": initialized["conversation_id"]}
    assert used["conversation_id"] == initialized["conversation_id"]
    assert cookie_of(chat_reply) is not None  # the chat slides the cookie: the other wrapper


async def test_page_then_chat_share_one_conversation(tracker: RecordingTracker) -> None:
    mw = wrap(tracker)
    async with client(mw) as c:
        await c.get("/", headers=BROWSER)
        response = await c.post(
            "/api/chat", json={"message": "hi"}, headers={"user-agent": CHROME_DESKTOP}
        )
    assert mw.flush(5)
    [initialized] = tracker.initialized
    [used] = tracker.used
    assert used["conversation_id"] == initialized["conversation_id"]
    data = response.json()
    assert data["state_id"] == data["contextvar_id"] == used["conversation_id"]
    assert data["id_source"] == "cookie"
    assert used["device"] == "desktop"


@pytest.mark.parametrize(
    ("kwargs", "url", "source"),
    [
        pytest.param({}, "/api/chat/conv_00000000000a/messages", "path", id="path"),
        pytest.param(
            {"headers": {"x-conversation-id": "conv_00000000000a"}},
            "/api/chat",
            "header",
            id="header",
        ),
        pytest.param({}, "/api/chat?conversation_id=conv_00000000000a", "query", id="query"),
        pytest.param(
            {"json": {"conversation_id": "conv_00000000000a", "message": "hi"}},
            "/api/chat",
            "json",
            id="json",
        ),
        pytest.param(
            {"data": {"conversation_id": "conv_00000000000a", "message": "hi"}},
            "/api/chat",
            "form",
            id="form",
        ),
        pytest.param(
            {"headers": {"cookie": "theme=dark; agentsight_conversation_id=conv_00000000000a"}},
            "/api/chat",
            "cookie",
            id="cookie",
        ),
    ],
)
async def test_chat_id_sources(
    tracker: RecordingTracker, kwargs: dict[str, Any], url: str, source: str
) -> None:
    mw = wrap(tracker)
    async with client(mw) as c:
        response = await c.post(url, **kwargs)
    assert response.status_code == 200
    [used] = tracker.used
    assert used["conversation_id"] == "conv_00000000000a"
    assert used["metadata"]["conversation_id_source"] == source


async def test_chat_id_lookup_order(tracker: RecordingTracker) -> None:
    mw = wrap(tracker)
    async with client(mw) as c:
        await c.post(
            "/api/chat?conversation_id=from-query",
            json={"conversation_id": "from-json"},
            headers={"x-conversation-id": "from-header", "cookie": "agentsight_conversation_id=c"},
        )
        await c.post(
            "/api/chat",
            json={"conversation_id": "from-json"},
            headers={"cookie": "agentsight_conversation_id=from-cookie"},
        )
    assert [u["conversation_id"] for u in tracker.used] == ["from-header", "from-json"]


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param("x" * 200, id="too-long"),
        pytest.param("conv 1", id="space"),
        pytest.param("conv;1", id="semicolon"),
        pytest.param("<script>", id="markup"),
        pytest.param("", id="empty"),
    ],
)
async def test_bad_ids_are_not_used(tracker: RecordingTracker, bad: str) -> None:
    mw = wrap(tracker)
    async with client(mw) as c:
        response = await c.post(
            "/api/chat",
            json={"conversation_id": bad},
            headers={"cookie": "agentsight_conversation_id=conv_fromcookie01"},
        )
    # Passed on as sent (httpx writes compact JSON from 0.28, with spaces before).
    assert response.json()["body"] == response.request.content.decode()
    assert json.loads(response.json()["body"]) == {"conversation_id": bad}
    assert tracker.used[0]["conversation_id"] == "conv_fromcookie01"


async def test_chat_without_any_id_mints_one_and_sets_the_cookie(
    tracker: RecordingTracker,
) -> None:
    mw = wrap(tracker)
    async with client(mw) as c:
        first = await c.post("/api/chat", json={"message": "hi"})
        second = await c.post("/api/chat", json={"message": "again"})
    [a, b] = tracker.used
    assert a["metadata"]["conversation_id_source"] == "minted"
    assert a["conversation_id"].startswith("conv_")
    assert cookie_of(first) is not None
    assert b["conversation_id"] == a["conversation_id"]
    assert b["metadata"]["conversation_id_source"] == "cookie"
    assert second.status_code == 200


@pytest.mark.parametrize(
    ("url", "kwargs"),
    [
        pytest.param(
            "/api/chat", {"headers": {"x-conversation-id": "conv_00000000000a"}}, id="header"
        ),
        pytest.param("/api/chat", {"json": {"conversation_id": "conv_00000000000a"}}, id="json"),
        pytest.param("/api/chat/conv_00000000000a/messages", {}, id="path"),
    ],
)
async def test_a_chat_sending_the_cookies_id_another_way_too_slides_the_cookie(
    tracker: RecordingTracker, url: str, kwargs: dict[str, Any]
) -> None:
    # The demo widget's way (and the README's for every origin): the id read from
    # document.cookie sent in X-Conversation-ID, the cookie going along with a same-origin
    # fetch(). The cookie must slide as for a chat found by its cookie, or it expires
    # cookie_max_age after the last page view while the visitor is still chatting.
    mw = wrap(tracker)
    async with client(mw) as c:
        c.cookies.set("agentsight_conversation_id", "conv_00000000000a")
        response = await c.post(url, **kwargs)
        other = await c.post(
            "/api/chat", headers={"x-conversation-id": "conv_00000000000b"}
        )  # another id than the cookie's: the cookie is not the client's to change
    assert tracker.used[0]["metadata"]["conversation_id_source"] != "cookie"
    renewed = cookie_of(response)
    assert renewed is not None
    assert renewed.split(";")[0] == "agentsight_conversation_id=conv_00000000000a"
    assert "Max-Age=1800" in renewed
    assert cookie_of(other) is None


async def test_options_preflight_is_not_a_chat(tracker: RecordingTracker) -> None:
    mw = wrap(tracker)
    async with client(mw) as c:
        await c.options("/api/chat/conv_00000000000a/messages")
    assert tracker.used == []


async def test_context_follows_sync_handlers_into_the_thread_pool(
    tracker: RecordingTracker,
) -> None:
    mw = wrap(tracker)
    async with client(mw) as c:
        response = await c.post("/api/sync-chat", headers={"x-conversation-id": "conv_sync"})
    assert response.json() == {"contextvar_id": "conv_sync"}
    assert current_conversation() is None


async def test_streaming_chat_response_passes_through(tracker: RecordingTracker) -> None:
    mw = wrap(tracker)
    async with (
        client(mw) as c,
        c.stream("POST", "/api/stream", headers={"x-conversation-id": "conv_stream"}) as response,
    ):
        chunks = [chunk async for chunk in response.aiter_raw()]
    assert b"".join(chunks) == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
    assert response.headers["content-type"].startswith("text/event-stream")
    assert tracker.used[0]["conversation_id"] == "conv_stream"


# -- the host app is never harmed --------------------------------------------------------


class RaisingTracker:
    def initialize_conversation(self, conversation_id: str, **kwargs: Any) -> None:
        raise RuntimeError("backend exploded")

    def get_or_create_conversation(self, conversation_id: str, **kwargs: Any) -> None:
        raise RuntimeError("backend exploded")


async def test_a_raising_tracker_changes_nothing_and_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    mw = wrap(RaisingTracker())
    with caplog.at_level(logging.DEBUG, logger="agentsight_middleware"):
        async with client(mw) as c:
            pages = [await c.get("/", headers=BROWSER) for _ in range(3)]
            chats = [await c.post("/api/chat", json={"m": i}) for i in range(3)]
        assert mw.flush(5)
    assert all(p.status_code == 200 and p.text == PAGE for p in pages)
    assert [c.json()["body"] for c in chats] == [c.request.content.decode() for c in chats]
    assert [json.loads(c.json()["body"]) for c in chats] == [{"m": 0}, {"m": 1}, {"m": 2}]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 2  # one for each method, not one per request
    assert all("backend exploded" in (r.exc_text or "") for r in errors)
    assert mw.stats()["errors"] == 4  # one page view (then the cookie holds) + three chats


async def test_a_hanging_tracker_costs_at_most_the_timeout() -> None:
    class HangingTracker(RecordingTracker):
        def get_or_create_conversation(self, conversation_id: str, **kwargs: Any) -> None:
            time.sleep(3)

    mw = wrap(HangingTracker(), tracker_timeout=0.2)
    async with client(mw) as c:
        started = time.perf_counter()
        response = await c.post("/api/chat", json={"m": 1})
        elapsed = time.perf_counter() - started
    assert response.status_code == 200
    assert elapsed < 1.5
    assert mw.stats()["timeouts"] == 1


def test_a_slow_tracker_leaves_the_apps_thread_pool_alone() -> None:
    # Starlette runs sync endpoints on anyio's default limiter (40 threads): blocking
    # tracker calls must not take those, or an untracked endpoint waits for the tracker.
    import asyncio

    from fastapi import FastAPI

    from .conftest import uvicorn_server

    release = threading.Event()
    entered: list[str] = []

    class BlockedTracker(RecordingTracker):
        def get_or_create_conversation(self, conversation_id: str, **kwargs: Any) -> None:
            entered.append(conversation_id)
            release.wait(20)

    app = FastAPI()

    @app.post("/api/chat")
    async def chat_endpoint() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/health")
    def health() -> dict[str, bool]:  # sync: run on anyio's default limiter
        return {"ok": True}

    app.add_middleware(
        AgentSightMiddleware, chat_routes=["POST /api/chat"], tracker=BlockedTracker()
    )

    async def scenario(url: str) -> None:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as c:
            chats = [asyncio.create_task(c.post("/api/chat", json={})) for _ in range(45)]
            while len(entered) < 16:
                await asyncio.sleep(0.01)
            # Every tracker slot is blocked: the sync endpoint still gets a thread.
            health_response = await c.get("/health", timeout=10)
            assert health_response.json() == {"ok": True}
            release.set()
            answers = await asyncio.gather(*chats)
        assert all(answer.status_code == 200 for answer in answers)

    with uvicorn_server(app) as url:
        try:
            asyncio.run(scenario(url))
        finally:
            release.set()
    assert len(entered) == 45  # the other 29 chats waited for a thread


async def test_a_hung_tracker_holds_a_bounded_number_of_threads() -> None:
    from agentsight_middleware._tracker import ENGAGE_THREADS

    hang = threading.Event()

    class HungTracker(RecordingTracker):
        def get_or_create_conversation(self, conversation_id: str, **kwargs: Any) -> None:
            hang.wait(30)

    mw = wrap(HungTracker(), tracker_timeout=0.05)
    before = threading.active_count()
    try:
        async with client(mw) as c:
            for _ in range(10):
                answers = [c.post("/api/chat", json={}) for _ in range(10)]
                for answer in answers:
                    assert (await answer).status_code == 200
        # Each timed-out call keeps its thread until the tracker returns; new calls
        # beyond the slots are skipped instead of starting more threads.
        assert threading.active_count() - before <= ENGAGE_THREADS + 2
        assert mw.stats()["timeouts"] == 100
    finally:
        hang.set()


def test_a_client_waiting_for_100_continue_gets_the_apps_own_answer(
    tracker: RecordingTracker,
) -> None:
    # An app that refuses a chat unread (401, 413, 429) must refuse it as it would alone:
    # peeking at the body would have the server send 100 Continue on the app's behalf.
    import socket

    from .conftest import uvicorn_server

    async def guarded_chat(request: Request) -> Response:
        if request.headers.get("authorization") != "Bearer ok":
            return PlainTextResponse("unauthorized", status_code=401)
        return PlainTextResponse(str(len(await request.body())))

    app = Starlette(routes=[Route("/api/chat", guarded_chat, methods=["POST"])])
    mw = AgentSightMiddleware(app, chat_routes=["POST /api/chat"], tracker=tracker)
    with uvicorn_server(mw) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(
                b"POST /api/chat HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                b"Content-Length: 30\r\nExpect: 100-continue\r\n"
                b"Cookie: agentsight_conversation_id=conv_waiting0000\r\n\r\n"
            )
            answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 401"), answer
    assert mw.flush(5)
    # The id is still found where it can be without the body.
    assert tracker.used[0]["conversation_id"] == "conv_waiting0000"


async def test_coroutine_tracker_methods_are_awaited() -> None:
    calls: list[tuple[str, str, bool]] = []

    class AsyncTracker:
        async def initialize_conversation(self, conversation_id: str, **kwargs: Any) -> None:
            await asyncio.sleep(0)
            calls.append(("initialize", conversation_id, True))

        async def get_or_create_conversation(self, conversation_id: str, **kwargs: Any) -> None:
            await asyncio.sleep(0)
            calls.append(("engage", conversation_id, True))

    mw = wrap(AsyncTracker())
    async with client(mw) as c:
        await c.get("/", headers=BROWSER)
        await c.post("/api/chat", json={})
        assert mw.flush(5)
        for _ in range(100):  # the initialize coroutine runs on this loop
            if len(calls) == 2:
                break
            await asyncio.sleep(0.01)
    assert sorted(kind for kind, _, _ in calls) == ["engage", "initialize"]
    assert calls[0][1] == calls[1][1]


class _SlowAsyncTracker:
    """A coroutine tracker whose page views take ``delay`` seconds (None: never end)."""

    def __init__(self, delay: float | None) -> None:
        self.delay = delay
        self.started = 0
        self.finished = 0

    async def initialize_conversation(self, conversation_id: str, **kwargs: Any) -> None:
        self.started += 1
        await asyncio.sleep(3600 if self.delay is None else self.delay)
        self.finished += 1

    async def get_or_create_conversation(self, conversation_id: str, **kwargs: Any) -> None:
        pass


def _page_app() -> Starlette:
    return Starlette(routes=[Route("/", lambda request: HTMLResponse(PAGE))])


def test_a_coroutine_tracker_s_page_views_finish_before_shutdown() -> None:
    # They run on the app's loop, fire-and-forget from the worker: a lifespan shutdown
    # once cancelled every one still running (20 of 20 here), silently.
    tracker = _SlowAsyncTracker(0.5)
    mw = AgentSightMiddleware(_page_app(), widget_pages=["/"], tracker=tracker)
    with uvicorn_server(mw) as url, httpx.Client(base_url=url) as c:
        for _ in range(20):
            c.cookies.clear()
            assert c.get("/", headers=BROWSER).status_code == 200
    assert (tracker.started, tracker.finished) == (20, 20)


def test_a_hanging_coroutine_tracker_holds_a_bounded_number_of_calls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each page view left a task on the app's loop for ever (3,000 page views, 3,000
    # tasks, +42 MB), with no timeout and nothing counted.
    from agentsight_middleware import _tracker

    monkeypatch.setattr(_tracker, "INITIALIZE_IN_FLIGHT", 8)
    tracker = _SlowAsyncTracker(None)
    mw = AgentSightMiddleware(_page_app(), widget_pages=["/"], tracker=tracker, tracker_timeout=3.0)
    with uvicorn_server(mw) as url, httpx.Client(base_url=url) as c:
        for _ in range(30):
            c.cookies.clear()
            assert c.get("/", headers=BROWSER).status_code == 200
        assert mw.flush(0.5) is False  # the 8 running calls do not finish...
        assert mw.flush(10)  # ...until the tracker timeout ends them
        stats = mw.stats()
    assert tracker.started == 8
    assert (stats["dropped"], stats["timeouts"], stats["processed"]) == (22, 8, 30)


def test_page_views_left_on_a_closed_loop_hold_no_place(monkeypatch: pytest.MonkeyPatch) -> None:
    # A harness that closes its loop without cancelling its tasks (run_until_complete, an
    # old pytest-asyncio event_loop fixture): their calls never end. They once held their
    # places for good (past 256, every later page view in the process was dropped) and
    # flush() with no time limit waited for ever.
    from agentsight_middleware import _tracker

    monkeypatch.setattr(_tracker, "INITIALIZE_IN_FLIGHT", 2)
    hanging = _SlowAsyncTracker(None)
    mw = AgentSightMiddleware(_page_app(), widget_pages=["/"], tracker=hanging)

    async def page_views(n: int, wait: float) -> None:
        transport = httpx.ASGITransport(app=mw)
        async with httpx.AsyncClient(transport=transport, base_url="http://shop.test") as c:
            for _ in range(n):
                c.cookies.clear()
                assert (await c.get("/", headers=BROWSER)).status_code == 200
        await asyncio.sleep(wait)  # the worker hands them to this loop meanwhile

    loop = asyncio.new_event_loop()
    loop.run_until_complete(page_views(2, 0.3))
    loop.close()  # their tasks never run again (and are never cancelled)
    assert hanging.started == 2
    started = time.monotonic()
    assert mw.flush()  # none to wait for: their loop is gone
    assert time.monotonic() - started < 2
    hanging.delay = 0.0  # the tracker is healthy from now on
    asyncio.run(page_views(1, 0.3))
    assert mw.flush(5)
    assert (hanging.started, hanging.finished) == (3, 1)
    assert mw.stats()["dropped"] == 0


async def test_websocket_and_lifespan_pass_through(tracker: RecordingTracker) -> None:
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["type"])
        if scope["type"] == "lifespan":
            message = await receive()
            await send({"type": "lifespan.startup.complete"})
            seen.append(message["type"])

    mw = AgentSightMiddleware(app, widget_pages=["/"], chat_routes=["/ws"], tracker=tracker)
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        return {"type": "lifespan.startup"}

    async def send(message: Any) -> None:
        sent.append(message)

    await mw({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    await mw({"type": "websocket", "path": "/ws", "headers": []}, receive, send)
    assert seen == ["lifespan", "lifespan.startup", "websocket"]
    assert sent == [{"type": "lifespan.startup.complete"}]
    assert tracker.calls == []


async def test_unmatched_paths_are_untouched(tracker: RecordingTracker) -> None:
    received: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        received.append((scope, receive, send))

    mw = AgentSightMiddleware(app, widget_pages=["/"], tracker=tracker)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request"}

    async def send(message: Any) -> None:
        pass

    scope = {"type": "http", "method": "GET", "path": "/elsewhere", "headers": []}
    await mw(scope, receive, send)
    [(got_scope, got_receive, got_send)] = received
    assert got_scope is scope
    assert "state" not in scope
    assert got_receive is receive
    assert got_send is send


# -- proxies, mounts, hooks ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("peer", "trusted", "headers", "expected"),
    [
        pytest.param(
            "203.0.113.7",
            None,
            {"x-forwarded-for": "1.2.3.4"},
            "203.0.113.7",
            id="untrusted-peer-ignores-xff",
        ),
        pytest.param(
            "10.0.0.2",
            ["10.0.0.0/8"],
            {"x-forwarded-for": "198.51.100.9"},
            "198.51.100.9",
            id="trusted-proxy",
        ),
        pytest.param(
            "10.0.0.2",
            ["10.0.0.0/8"],
            {"x-forwarded-for": "6.6.6.6, 198.51.100.9, 10.0.0.3"},
            "198.51.100.9",
            id="forged-leftmost-entry-ignored",
        ),
        pytest.param(
            "10.0.0.2",
            ["10.0.0.0/8"],
            {"forwarded": 'for="[2001:db8::17]:4711";proto=https'},
            "2001:db8::17",
            id="rfc7239",
        ),
        pytest.param(
            "10.0.0.2",
            ["10.0.0.0/8"],
            {"x-forwarded-for": "unknown"},
            None,
            id="garbage-gives-none",
        ),
        pytest.param(
            "10.0.0.2",
            1,
            {"x-forwarded-for": "6.6.6.6, 198.51.100.9"},
            "198.51.100.9",
            id="hop-count",
        ),
    ],
)
async def test_client_ip(
    tracker: RecordingTracker,
    peer: str,
    trusted: Any,
    headers: dict[str, str],
    expected: str | None,
) -> None:
    mw = wrap(tracker, trusted_proxies=trusted)
    async with client(mw, peer=peer) as c:
        await c.post("/api/chat", json={}, headers=headers)
    assert tracker.used[0]["customer_ip_address"] == expected


async def test_mounted_app_matches_the_path_the_client_sent(tracker: RecordingTracker) -> None:
    inner = AgentSightMiddleware(
        make_app(),
        widget_pages=["/shop/pricing"],
        chat_routes=["POST /shop/api/chat"],
        tracker=tracker,
    )
    outer = Starlette(routes=[Mount("/shop", app=inner)])
    async with client(outer) as c:
        page_response = await c.get("/shop/pricing", headers=BROWSER)
        await c.post("/shop/api/chat", json={})
    assert page_response.status_code == 200
    assert inner.flush(5)
    assert tracker.initialized[0]["metadata"]["page_path"] == "/shop/pricing"
    assert tracker.used[0]["metadata"]["page_path"] == "/shop/api/chat"


async def test_customer_id_and_metadata_hooks(tracker: RecordingTracker) -> None:
    def customer(request: Request) -> str | None:
        return request.headers.get("x-user")

    mw = wrap(
        tracker,
        customer_id=customer,
        metadata=lambda request: {"plan": request.query_params.get("plan")},
        environment="prod",
        source="shop",
    )
    async with client(mw) as c:
        await c.post("/api/chat?plan=pro", json={"x": 1}, headers={"x-user": "u-42"})
    [used] = tracker.used
    assert used["customer_id"] == "u-42"
    assert used["metadata"]["plan"] == "pro"
    assert used["environment"] == "production"
    assert used["source"] == "shop"


async def test_a_raising_hook_changes_nothing(tracker: RecordingTracker) -> None:
    def customer(request: Request) -> str:
        raise KeyError("no session")

    mw = wrap(tracker, customer_id=customer)
    async with client(mw) as c:
        response = await c.post("/api/chat", json={"x": 1})
    assert response.status_code == 200
    assert tracker.used[0]["customer_id"] is None


class _LazyUser:
    """A framework's lazy user object: turning it into text raises."""

    def __str__(self) -> str:
        raise RuntimeError("session store down")


@pytest.mark.parametrize(
    ("returned", "stored"),
    [(_LazyUser(), None), (b"user-42", "user-42"), ("", None), ("  ", None), (42, "42")],
    ids=["str-raises", "bytes", "empty", "blank", "int"],
)
async def test_a_customer_id_hook_s_odd_values(
    tracker: RecordingTracker, returned: object, stored: str | None
) -> None:
    # str() of a lazy user once ran outside the hook's guard: the visitor got a 500.
    mw = wrap(tracker, customer_id=lambda request: returned)
    async with client(mw) as c:
        response = await c.post("/api/chat", json={"x": 1})
    assert response.status_code == 200
    assert tracker.used[0]["customer_id"] == stored


async def test_fastapi_add_middleware_one_liner(tracker: RecordingTracker) -> None:
    app = FastAPI()

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return PAGE

    @app.post("/api/chat")
    async def chat_endpoint(request: Request) -> dict[str, str]:
        return {"conversation_id": request.state.agentsight.id}

    app.add_middleware(
        AgentSightMiddleware, widget_pages=["/"], chat_routes=["POST /api/chat"], tracker=tracker
    )
    async with client(app) as c:
        await c.get("/", headers=BROWSER)
        response = await c.post("/api/chat", json={"message": "hi"})
    tracker.wait_for(initialized=1, used=1)
    assert response.json()["conversation_id"] == tracker.initialized[0]["conversation_id"]


def test_construction_errors_name_the_argument(tracker: RecordingTracker) -> None:
    cases: list[tuple[Callable[[], object], str]] = [
        (lambda: AgentSightMiddleware(make_app(), tracker=tracker), "no rules"),
        (
            lambda: AgentSightMiddleware(make_app(), widget_pages=["/"], outbox="x.sqlite3"),
            "outbox= needs an API key",
        ),
        (
            lambda: AgentSightMiddleware(make_app(), widget_pages=["/"], tracker=object()),
            "lacks initialize_conversation",
        ),
        (
            lambda: AgentSightMiddleware(make_app(), widget_pages="/", tracker=tracker),
            "widget_pages",
        ),
        (
            lambda: wrap(tracker, environment="staging"),
            # Says what to do instead (the SDK reads the variable itself).
            r"environment='staging' .* leave environment= out and set "
            r"AGENTSIGHT_ENVIRONMENT='staging'",
        ),
        (lambda: wrap(tracker, cookie_name="bad name"), "cookie_name"),
        (lambda: wrap(tracker, cookie_max_age=-5), "cookie_max_age"),
        (
            lambda: wrap(tracker, conversation_id_sources=["header", "body"]),
            "conversation_id_sources",
        ),
        (lambda: wrap(tracker, conversation_id_sources="header"), "conversation_id_sources"),
        (lambda: wrap(tracker, max_body_peek=-1), "max_body_peek"),
        (lambda: wrap(tracker, tracker_timeout=0), "tracker_timeout"),
        (lambda: wrap(tracker, customer_id="user"), "customer_id"),
        (lambda: wrap(tracker, metadata=["x"]), "metadata"),
        (lambda: wrap(tracker, trusted_proxies="10.0.0.1"), "trusted_proxies must be a list"),
    ]
    for build, expected in cases:
        with pytest.raises(ValueError, match=expected):
            build()


async def test_pinned_proxy_header_ignores_a_spoofed_forwarded(tracker: RecordingTracker) -> None:
    # nginx appends to X-Forwarded-For and passes the client's own Forwarded through.
    headers = {"forwarded": "for=1.2.3.4", "x-forwarded-for": "198.51.100.20"}
    auto = wrap(tracker, trusted_proxies=["10.0.0.0/8"])
    pinned = wrap(tracker, trusted_proxies=["10.0.0.0/8"], trusted_proxy_header="x-forwarded-for")
    for mw in (auto, pinned):
        async with client(mw, peer="10.0.0.2") as c:
            await c.post("/api/chat", json={}, headers=headers)
    # "auto" believes neither of two headers that disagree (one came from the client).
    assert [u["customer_ip_address"] for u in tracker.used] == [None, "198.51.100.20"]


async def _raw_call(
    app: Any, method: str, path: str, headers: Any, body: bytes = b""
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """One request straight through ASGI, with ``headers`` exactly as given."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "2",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "client": ("10.0.0.2", 50000),
        "server": ("shop.test", 80),
        "headers": headers,
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = sent[0]
    return start["status"], list(start["headers"]), b"".join(m.get("body", b"") for m in sent[1:])


async def test_repeated_header_fields_read_as_one(tracker: RecordingTracker) -> None:
    # HTTP/2 servers hand over one field per cookie; proxies may add a second
    # X-Forwarded-For field. A list header means all its fields; any other, the first.
    mw = wrap(tracker, trusted_proxies=["10.0.0.0/8"])
    browser = [(name.encode(), value.encode()) for name, value in BROWSER.items()]
    headers = (  # a tuple, not a list: ASGI only promises an iterable
        (b"host", b"shop.test"),
        (b"cookie", b"theme=dark"),
        (b"cookie", b"agentsight_conversation_id=conv_split01; lang=en"),
        (b"x-forwarded-for", b"6.6.6.6, 198.51.100.9"),
        (b"x-forwarded-for", b"198.51.100.10"),
        (b"host", b"evil.test"),
        (b"content-type", b"application/json"),
        *browser,
    )
    status, _, body = await _raw_call(mw, "POST", "/api/chat", headers, b"{}")
    assert status == 200
    assert json.loads(body)["state_id"] == "conv_split01"
    status, response_headers, _ = await _raw_call(mw, "GET", "/", iter(headers))
    assert status == 200
    cookies = [value for name, value in response_headers if name == b"set-cookie"]
    assert len(cookies) == 1
    assert cookies[0].startswith(b"agentsight_conversation_id=conv_split01;")
    assert mw.flush(5)
    used = tracker.used[0]
    assert used["conversation_id"] == "conv_split01"
    assert used["customer_ip_address"] == "198.51.100.10"  # the last field's last hop
    assert used["metadata"]["page_url"] == "http://shop.test/api/chat"  # the first Host
    assert tracker.initialized == []  # a returning visit: its id came in the cookie


async def test_a_repeated_purpose_header_still_marks_a_prefetch(tracker: RecordingTracker) -> None:
    mw = wrap(tracker)
    browser = [(name.encode(), value.encode()) for name, value in BROWSER.items()]
    headers = [*browser, (b"sec-purpose", b"x-unknown"), (b"sec-purpose", b"prefetch")]
    status, response_headers, _ = await _raw_call(mw, "GET", "/", headers)
    assert status == 200
    assert not any(name == b"set-cookie" for name, _ in response_headers)
    assert mw.flush(5)
    assert tracker.initialized == []


async def test_secure_flag_follows_the_proxy_only_for_a_trusted_peer(
    tracker: RecordingTracker,
) -> None:
    # The answer for (peer, X-Forwarded-Proto) is remembered: a spoofing client
    # sending the proxy's header must not get the proxy's answer, nor the reverse.
    mw = wrap(tracker, trusted_proxies=["10.0.0.0/8"])
    https = {**BROWSER, "x-forwarded-proto": "https"}
    for peer, headers, secure in [
        ("10.0.0.2", https, True),
        ("203.0.113.7", https, False),
        ("10.0.0.2", https, True),
        ("10.0.0.2", {**BROWSER, "x-forwarded-proto": "http"}, False),
        ("203.0.113.7", https, False),
        ("10.0.0.2", {**BROWSER, "forwarded": "for=198.51.100.9;proto=https"}, True),
        ("10.0.0.2", {**BROWSER, "forwarded": "for=198.51.100.9;proto=http", **https}, False),
        # Long values are never cached (a client could fill the cache with its headers),
        # and still answered: a proxy appends its own value to the client's.
        ("10.0.0.2", {**BROWSER, "x-forwarded-proto": "x" * 4000 + ", https"}, True),
        ("203.0.113.7", {**BROWSER, "x-forwarded-proto": "y" * 4000 + ", https"}, False),
    ]:
        async with client(mw, peer=peer) as c:
            response = await c.get("/", headers=headers)
        cookie = cookie_of(response) or ""
        assert cookie, (peer, headers)
        assert ("Secure" in cookie) is secure, (peer, headers)
    assert all(len(key[2] or b"") <= 16 for key in mw._core.secure_answers)
    assert (
        len(mw._core.secure_answers) == 3
    )  # (peer, proto): both peers' "https", the proxy's "http"


async def test_a_proxy_adding_its_own_field_is_believed_as_under_wsgi() -> None:
    # HAProxy's add-header or Apache's "RequestHeader add" append the proxy's field after
    # the one the client sent. WSGI servers join the two; ASGI passes both on. The client's
    # must win under neither: not its IP, not its https.
    from agentsight_middleware import AgentSightWSGIMiddleware

    options: dict[str, Any] = {
        "widget_pages": ["/"],
        "trusted_proxies": ["10.0.0.0/8"],
        "trusted_proxy_header": "x-real-ip",
    }
    browser = [(name.encode(), value.encode()) for name, value in BROWSER.items()]
    client_sent = [(b"x-real-ip", b"6.6.6.6"), (b"x-forwarded-proto", b"https")]
    proxy_added = [(b"x-real-ip", b"198.51.100.77"), (b"x-forwarded-proto", b"http")]
    asgi_tracker = RecordingTracker()
    mw = wrap(asgi_tracker, **options)
    _, headers, _ = await _raw_call(mw, "GET", "/", [*browser, *client_sent, *proxy_added])
    [asgi_cookie] = [value.decode() for name, value in headers if name == b"set-cookie"]
    assert mw.flush(5)

    def page_app(environ: Any, start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/html")])
        return [b"<p>hi</p>"]

    wsgi_tracker = RecordingTracker()
    wsgi = AgentSightWSGIMiddleware(page_app, tracker=wsgi_tracker, **options)
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/",
        "REMOTE_ADDR": "10.0.0.2",
        "SERVER_NAME": "shop.test",
        "SERVER_PORT": "80",
        "wsgi.url_scheme": "http",
        **{"HTTP_" + name.upper().replace("-", "_"): value for name, value in BROWSER.items()},
        # As gunicorn and Werkzeug hand over a repeated field.
        "HTTP_X_REAL_IP": "6.6.6.6,198.51.100.77",
        "HTTP_X_FORWARDED_PROTO": "https,http",
    }
    wsgi_headers: list[tuple[str, str]] = []
    wsgi(environ, lambda status, headers, exc_info=None: wsgi_headers.extend(headers))
    [wsgi_cookie] = [value for name, value in wsgi_headers if name == "Set-Cookie"]
    assert wsgi.flush(5)
    for cookie, [event] in (
        (asgi_cookie, asgi_tracker.initialized),
        (wsgi_cookie, wsgi_tracker.initialized),
    ):
        assert "Secure" not in cookie
        assert event["customer_ip_address"] != "6.6.6.6"
        assert event["metadata"]["page_url"].startswith("http://")
    assert (
        asgi_tracker.initialized[0]["customer_ip_address"]
        == wsgi_tracker.initialized[0]["customer_ip_address"]
    )


async def test_headers_given_as_a_one_shot_iterable_all_reach_the_server(
    tracker: RecordingTracker,
) -> None:
    # ASGI allows any iterable of headers; a generator can be read only once.
    async def app(scope: Any, receive: Any, send: Any) -> None:
        headers = (
            pair for pair in [(b"content-type", b"text/html"), (b"cache-control", b"max-age=60")]
        )
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"<p>hi</p>"})

    mw = AgentSightMiddleware(app, widget_pages=["/"], tracker=tracker)
    browser = [(name.encode(), value.encode()) for name, value in BROWSER.items()]
    _, headers, body = await _raw_call(mw, "GET", "/", browser)
    assert [name for name, _ in headers] == [b"content-type", b"cache-control", b"set-cookie"]
    assert body == b"<p>hi</p>"


@pytest.mark.parametrize(
    "path",
    ["/shop/shopping-cart", "/shopping-cart"],
    ids=["path-includes-root-path", "path-without-root-path"],
)
async def test_root_path_is_added_at_a_segment_boundary(
    tracker: RecordingTracker, path: str
) -> None:
    # uvicorn puts root_path into path, hypercorn does not: "/shopping-cart" under the
    # mount point "/shop" is "/shop/shopping-cart", not a path that already has it.
    mw = AgentSightMiddleware(make_app(), widget_pages=["/shop/shopping-cart"], tracker=tracker)
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["path"])
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/html")],
            }
        )
        await send({"type": "http.response.body", "body": b"<p>cart</p>"})

    mw.app = app
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "/shop",
        "query_string": b"",
        "client": ("203.0.113.7", 50000),
        "server": ("shop.test", 80),
        "headers": [(name.encode(), value.encode()) for name, value in BROWSER.items()],
    }
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    await mw(scope, receive, send)
    assert seen == [path]  # the app's scope is untouched
    assert any(name == b"set-cookie" for name, _ in sent[0]["headers"])
    assert mw.flush(5)
    assert tracker.initialized[0]["metadata"]["page_path"] == "/shop/shopping-cart"


@pytest.mark.parametrize(("request_cookie", "app_cookie", "events"), APP_COOKIE_CASES)
async def test_the_apps_own_cookie_is_never_overridden(
    tracker: RecordingTracker,
    request_cookie: str | None,
    app_cookie: str,
    events: list[tuple[str, str]],
) -> None:
    async def restoring_page(request: Request) -> Response:
        response = HTMLResponse(PAGE)
        response.headers.append("set-cookie", "theme=dark; Path=/")
        response.headers.append("set-cookie", app_cookie)
        return response

    async def new_chat(request: Request) -> Response:
        response = JSONResponse({"ok": True})
        response.headers.append("set-cookie", "agentsight_conversation_id=conv_fromchat00001")
        return response

    app = Starlette(
        routes=[Route("/", restoring_page), Route("/api/chat", new_chat, methods=["POST"])]
    )
    mw = AgentSightMiddleware(
        app, widget_pages=["/"], chat_routes=["POST /api/chat"], tracker=tracker
    )
    async with client(mw) as c:
        if request_cookie:
            c.cookies.set("agentsight_conversation_id", request_cookie)
        page_response = await c.get("/", headers=BROWSER)
        chat_response = await c.post("/api/chat", json={})
    assert page_response.headers.get_list("set-cookie") == ["theme=dark; Path=/", app_cookie]
    assert chat_response.headers.get_list("set-cookie") == [
        "agentsight_conversation_id=conv_fromchat00001"
    ]
    assert mw.flush(5)
    assert [
        (call["conversation_id"], call["metadata"]["conversation_id_source"])
        for call in tracker.initialized
    ] == events


@pytest.mark.parametrize(
    ("root_path", "path"),
    [
        ("/", "/pricing"),
        ("/shop/", "/shop/pricing"),
        ("/shop/", "/pricing"),
        # uvicorn --root-path /shop/ (and "/") prepends it to the path: "/shop//pricing".
        ("/shop/", "/shop//pricing"),
        ("/", "//pricing"),
    ],
)
async def test_a_root_path_ending_in_a_slash_is_not_doubled(
    tracker: RecordingTracker, root_path: str, path: str
) -> None:
    # FastAPI(root_path="/") under uvicorn: rules are written against the path sent.
    expected = "/pricing" if root_path == "/" else "/shop/pricing"
    mw = AgentSightMiddleware(make_app(), widget_pages=[expected], tracker=tracker)
    browser = [(name.encode(), value.encode()) for name, value in BROWSER.items()]
    scope = {
        "type": "http",
        "method": "GET",
        "path": path,
        "root_path": root_path,
        "query_string": b"",
        "headers": browser,
        "client": ("203.0.113.7", 1),
    }
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        sent.append(message)

    mw.app = _html_app
    await mw(scope, receive, send)
    assert any(name == b"set-cookie" for name, _ in sent[0]["headers"])
    assert mw.flush(5)
    assert tracker.initialized[0]["metadata"]["page_path"] == expected


async def _html_app(scope: Any, receive: Any, send: Any) -> None:
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/html")]}
    )
    await send({"type": "http.response.body", "body": b"<p>hi</p>"})


async def test_the_last_of_the_apps_own_cookies_counts(tracker: RecordingTracker) -> None:
    # Deleted, then set again in the same response: the browser keeps the second.
    async def page_sets_twice(request: Request) -> Response:
        response = HTMLResponse(PAGE)
        response.delete_cookie("agentsight_conversation_id")
        response.set_cookie("agentsight_conversation_id", "conv_final0000001")
        return response

    mw = AgentSightMiddleware(
        Starlette(routes=[Route("/", page_sets_twice)]), widget_pages=["/"], tracker=tracker
    )
    async with client(mw) as c:
        response = await c.get("/", headers=BROWSER)
    assert len(response.headers.get_list("set-cookie")) == 2  # the app's, none of ours
    assert mw.flush(5)
    assert [call["conversation_id"] for call in tracker.initialized] == ["conv_final0000001"]


@pytest.mark.parametrize(
    "headers",
    [
        # str values get through some servers (h11 encodes them): answered as without us.
        [(b"content-type", "text/html"), (b"set-cookie", "theme=dark")],
        [(b"content-type", b"application/json"), (b"set-cookie", "theme=dark")],
        [(b"content-type", bytearray(b"text/html")), (b"set-cookie", bytearray(b"a=1"))],
    ],
    ids=["str-html", "str-json", "bytearray"],
)
async def test_odd_header_value_types_pass_through(
    tracker: RecordingTracker, headers: list[tuple[bytes, Any]]
) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": list(headers)})
        await send({"type": "http.response.body", "body": b"<p>hi</p>"})

    mw = AgentSightMiddleware(
        app, widget_pages=["/"], chat_routes=["POST /api/chat"], tracker=tracker
    )
    browser = [(name.encode(), value.encode()) for name, value in BROWSER.items()]
    for method, path in (("GET", "/"), ("POST", "/api/chat")):
        status, sent_headers, body = await _raw_call(mw, method, path, browser)
        assert status == 200
        assert body == b"<p>hi</p>"
        assert sent_headers[: len(headers)] == headers


@pytest.mark.parametrize(
    "name_type", [bytes, bytearray, memoryview], ids=["bytes", "bytearray", "memoryview"]
)
@pytest.mark.parametrize(
    ("headers", "cookie_added"),
    [
        # Names read in any case: a page, but one shared caches may store (no cookie).
        ([(b"Content-Type", b"text/html"), (b"CDN-Cache-Control", b"public, max-age=60")], False),
        ([(b"content-type", b"text/html"), (b"Cache-Control", b"s-maxage=60")], False),
        # The app's own cookie for ours, sent in capitals: it decides, none added.
        ([(b"CONTENT-TYPE", b"text/html"),
          (b"Set-Cookie", b"agentsight_conversation_id=conv_apps0000001")], False),
        # Not HTML, in capitals: no page.
        ([(b"Content-Type", b"application/json")], False),
        # A page with headers we do not read, as long as some we do.
        ([(b"content-type", b"text/html"), (b"x-frame-options", b"DENY"),
          (b"Surrogate-Key", b"home page")], True),
    ],
)  # fmt: skip
async def test_response_header_names_are_read_in_any_case_and_type(
    tracker: RecordingTracker,
    headers: list[tuple[bytes, bytes]],
    cookie_added: bool,
    name_type: type,
) -> None:
    sent_as = [(name_type(name), value) for name, value in headers]

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": list(sent_as)})
        await send({"type": "http.response.body", "body": b"<p>hi</p>"})

    mw = AgentSightMiddleware(app, widget_pages=["/"], tracker=tracker)
    browser = [(name.encode(), value.encode()) for name, value in BROWSER.items()]
    status, sent_headers, body = await _raw_call(mw, "GET", "/", browser)
    assert (status, body) == (200, b"<p>hi</p>")
    assert sent_headers[: len(sent_as)] == sent_as
    ours = [v for n, v in sent_headers[len(sent_as) :] if n == b"set-cookie"]
    assert bool(ours) is cookie_added
    assert mw.flush(5)
    apps_id = [call["conversation_id"] for call in tracker.initialized]
    if b"conv_apps0000001" in b"".join(value for _, value in headers):
        assert apps_id == ["conv_apps0000001"]
    else:
        assert len(apps_id) == (1 if cookie_added else 0)


@pytest.mark.parametrize("name", [b"x-forwarded-proto", b"forwarded"])
@pytest.mark.parametrize(
    ("proxy", "value", "secure"),
    [
        ("192.0.2.1", b"", False),  # the peer (10.0.0.2) is no proxy
        ("192.0.2.1", b"x" * 40 + b", https", False),
        ("192.0.2.1", b"https", False),
        ("10.0.0.2", b"https", True),  # the peer is the trusted proxy
        ("10.0.0.2", b"x" * 40 + b", https", True),
    ],
)
async def test_a_bytearray_forwarding_value_is_answered_as_its_bytes(
    tracker: RecordingTracker, name: bytes, proxy: str, value: bytes, secure: bool
) -> None:
    # Not ASGI's bytes, but a middleware in front may hand one over: the Secure flag is
    # decided as for the same bytes (a bytearray is unhashable: it was looked up as it
    # came, a TypeError out of the app's request).
    if name == b"forwarded" and value:
        # With the client's for=: under "auto" a Forwarded naming no client is not read.
        value = b"for=198.51.100.9;proto=" + value.rpartition(b" ")[2]
    mw = wrap(tracker, trusted_proxies=[proxy])
    browser = [(n.encode(), v.encode()) for n, v in BROWSER.items()]
    for _ in range(2):  # the second asks what the first left in Core's answers
        headers = [*browser, (name, bytearray(value))]
        status, sent_headers, _ = await _raw_call(mw, "GET", "/", headers)
        assert status == 200
        cookies = [v for n, v in sent_headers if n == b"set-cookie"]
        assert len(cookies) == 1
        assert (b"Secure" in cookies[0]) is (secure and bool(value))


async def test_the_first_content_type_decides_as_under_wsgi(tracker: RecordingTracker) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        start = [(b"content-type", b"text/html"), (b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": start})
        await send({"type": "http.response.body", "body": b"<p>hi</p>"})

    mw = AgentSightMiddleware(app, widget_pages=["/"], tracker=tracker)
    browser = [(name.encode(), value.encode()) for name, value in BROWSER.items()]
    _, headers, _ = await _raw_call(mw, "GET", "/", browser)
    assert any(name == b"set-cookie" for name, _ in headers)


class _SlowTracker:
    """A blocking tracker whose page views take ``delay`` seconds each."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.initialized = 0

    def initialize_conversation(self, conversation_id: str, **kwargs: Any) -> None:
        time.sleep(self.delay)
        self.initialized += 1

    def get_or_create_conversation(self, conversation_id: str, **kwargs: Any) -> None:
        pass


async def test_shutdown_timeout_bounds_a_tracker_s_shutdown_too(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # With tracker=, shutdown_timeout was ignored: shutdown always took 5 s.
    slow = _SlowTracker(0.5)
    mw = AgentSightMiddleware(_page_app(), widget_pages=["/"], tracker=slow, shutdown_timeout=1)
    async with client(mw) as c:
        for _ in range(20):
            c.cookies.clear()
            await c.get("/", headers=BROWSER)
    started = time.monotonic()
    mw.close()
    elapsed = time.monotonic() - started
    assert 0.8 < elapsed < 2.5, elapsed
    assert slow.initialized < 20
    assert "not delivered within 1.0 s" in caplog.text


def _cached_page_app() -> Starlette:
    async def cached(request: Request) -> Response:
        if request.headers.get("if-none-match") == '"v1"':
            return Response(status_code=304, headers={"etag": '"v1"'})
        return HTMLResponse(PAGE, headers={"etag": '"v1"'})

    return Starlette(routes=[Route("/", cached)])


async def test_a_page_revalidated_with_304_is_a_page_view(tracker: RecordingTracker) -> None:
    # A visitor whose cookie expired reloads a cached page: the 304 must carry a new id
    # (browsers keep cookies set with a 304) and initialize it, or the chat that follows
    # is a used conversation that never had a view.
    mw = AgentSightMiddleware(_cached_page_app(), widget_pages=["/"], tracker=tracker)
    cached = {**BROWSER, "if-none-match": '"v1"'}
    async with client(mw) as c:
        fresh = await c.get("/", headers=cached)
        c.cookies.clear()
        assert fresh.status_code == 304
        minted = cookie_of(fresh)
        assert minted is not None
        minted_id = minted.split(";")[0].split("=", 1)[1]
        returning = await c.get(
            "/", headers={**cached, "cookie": f"agentsight_conversation_id={minted_id}"}
        )
        assert returning.status_code == 304
        assert cookie_of(returning) == minted  # renewed, the same id
        # Not a page view (a script's fetch): no cookie, no event.
        api = await c.get("/", headers={"accept": "application/json", "if-none-match": '"v1"'})
        assert api.status_code == 304
        assert cookie_of(api) is None
    assert mw.flush(5)
    assert [call["conversation_id"] for call in tracker.initialized] == [minted_id]


async def test_a_304_with_another_content_type_is_no_page_view(tracker: RecordingTracker) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 304, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    mw = AgentSightMiddleware(app, widget_pages=["/"], tracker=tracker)
    async with client(mw) as c:
        response = await c.get("/", headers=BROWSER)
    assert response.status_code == 304
    assert cookie_of(response) is None
    assert mw.flush(5)
    assert tracker.initialized == []


@pytest.mark.parametrize("forwarded_for", ["6.6.6.6", "6.6.6.6:4711"])
def test_a_server_that_rewrote_the_peer_is_warned_about(
    tracker: RecordingTracker,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    forwarded_for: str,
) -> None:
    # uvicorn replaces scope["client"] with an X-Forwarded-For address for connections
    # from 127.0.0.1 (its default --proxy-headers): the middleware, told to trust a proxy,
    # then reads a client-chosen address. It cannot undo that, so it says what to change.
    monkeypatch.setattr(asgi_module, "_rewrite_warned", False)
    mw = AgentSightMiddleware(
        _page_app(), widget_pages=["/"], tracker=tracker, trusted_proxies=["10.0.0.0/8"]
    )
    with caplog.at_level(logging.WARNING, logger="agentsight_middleware"):
        with uvicorn_server(mw) as url, httpx.Client(base_url=url) as c:
            for _ in range(2):
                c.cookies.clear()
                response = c.get("/", headers={**BROWSER, "x-forwarded-for": forwarded_for})
                assert response.status_code == 200
        assert mw.flush(5)
    warnings = [r.getMessage() for r in caplog.records if "X-Forwarded-For" in r.getMessage()]
    assert len(warnings) == 1  # once per process
    assert "'6.6.6.6'" in warnings[0]
    assert "--forwarded-allow-ips=''" in warnings[0]
    assert [call["customer_ip_address"] for call in tracker.initialized] == ["6.6.6.6"] * 2


def test_no_rewrite_warning_when_the_peer_is_the_proxy(
    tracker: RecordingTracker, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(asgi_module, "_rewrite_warned", False)
    mw = AgentSightMiddleware(
        _page_app(), widget_pages=["/"], tracker=tracker, trusted_proxies=["127.0.0.1"]
    )
    with caplog.at_level(logging.WARNING, logger="agentsight_middleware"):
        # What --forwarded-allow-ips='' gives: the peer as it connected, trusted by us.
        with uvicorn_server(mw, forwarded_allow_ips="") as url, httpx.Client(base_url=url) as c:
            c.get("/", headers={**BROWSER, "x-forwarded-for": "203.0.113.5"})
        assert mw.flush(5)
    assert not [r for r in caplog.records if "X-Forwarded-For" in r.getMessage()]
    assert [call["customer_ip_address"] for call in tracker.initialized] == ["203.0.113.5"]


def test_a_client_naming_itself_in_x_forwarded_for_sets_off_no_warning(
    tracker: RecordingTracker, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The server did not rewrite (--forwarded-allow-ips=''): a direct client that writes its
    # own address into X-Forwarded-For must not spend the one warning, nor raise it falsely.
    monkeypatch.setattr(asgi_module, "_rewrite_warned", False)
    mw = AgentSightMiddleware(
        _page_app(), widget_pages=["/"], tracker=tracker, trusted_proxies=["10.0.0.0/8"]
    )
    with caplog.at_level(logging.WARNING, logger="agentsight_middleware"):
        with uvicorn_server(mw, forwarded_allow_ips="") as url, httpx.Client(base_url=url) as c:
            c.get("/", headers={**BROWSER, "x-forwarded-for": "127.0.0.1"})
        assert mw.flush(5)
    assert not [r for r in caplog.records if "X-Forwarded-For" in r.getMessage()]
    assert [call["customer_ip_address"] for call in tracker.initialized] == ["127.0.0.1"]


def _chat_app(seen: list[tuple[str, bytes]]) -> Starlette:
    async def first_part_then_answer(request: Request) -> Response:
        # Answers once the first part of the body is in, then reads the rest: a duplex
        # chat stream, or an app that refuses a request before reading it all.
        stream = request.stream()
        first = await stream.__anext__()
        conversation = current_conversation()
        assert conversation is not None
        seen.append((conversation.id, first))
        return Response(b"go on", status_code=401)

    return Starlette(routes=[Route("/api/chat", first_part_then_answer, methods=["POST"])])


def test_the_app_is_not_held_for_a_body_that_arrives_slowly(tracker: RecordingTracker) -> None:
    # The body was read whole before the app ran, with no time limit: a client that waits
    # for the answer before sending the rest got none, and an app that refuses a request
    # unread answered only once the upload ended. The peek now waits 200 ms for the rest,
    # then the app runs with the stream as it is, and the cookie gives the id.
    import socket

    seen: list[tuple[str, bytes]] = []
    mw = AgentSightMiddleware(_chat_app(seen), chat_routes=["POST /api/chat"], tracker=tracker)
    with uvicorn_server(mw) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(
                b"POST /api/chat HTTP/1.1\r\nHost: shop.example\r\n"
                b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
                b"Cookie: agentsight_conversation_id=conv_abcdefabcdef\r\n\r\n"
                b'a\r\n{"m": "1",\r\n'
            )
            started = time.monotonic()
            answer = client.recv(65536)
            waited = time.monotonic() - started
            client.sendall(b'1a\r\n "conversation_id": "x"}\r\n0\r\n\r\n')
    assert answer.startswith(b"HTTP/1.1 401")
    assert waited < 2.0  # before: no answer at all, the client never sends the rest
    assert seen == [("conv_abcdefabcdef", b'{"m": "1",')]
    tracker.wait_for(used=1)
    assert [call["conversation_id"] for call in tracker.used] == ["conv_abcdefabcdef"]


def test_a_body_in_parts_that_arrive_together_is_still_read(tracker: RecordingTracker) -> None:
    # The bound is on waiting, not on parts: a body sent in several chunks at once still
    # gives its id, and the app reads every byte of it.
    import socket

    got: list[bytes] = []

    async def echo(request: Request) -> Response:
        got.append(await request.body())
        return Response(b"ok")

    app = Starlette(routes=[Route("/api/chat", echo, methods=["POST"])])
    mw = AgentSightMiddleware(app, chat_routes=["POST /api/chat"], tracker=tracker)
    body = b'{"conversation_id": "conv_fromthebody", "text": "' + b"x" * 3000 + b'"}'
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(body[i : i + 500]), body[i : i + 500])
        for i in range(0, len(body), 500)
    )
    with uvicorn_server(mw) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(
                b"POST /api/chat HTTP/1.1\r\nHost: shop.example\r\nConnection: close\r\n"
                b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            for i in range(0, len(chunks), 700):
                client.sendall(chunks[i : i + 700])
            client.sendall(b"0\r\n\r\n")
            answer = b""
            while chunk := client.recv(65536):
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 200")
    assert got == [body]
    tracker.wait_for(used=1)
    assert [call["conversation_id"] for call in tracker.used] == ["conv_fromthebody"]


@pytest.mark.parametrize(
    ("cache_control", "tracked"),
    [
        (["public, max-age=600"], False),
        (["max-age=60, s-maxage=600"], False),
        (["public", "private"], True),  # two fields, read together: private wins
        (["private, max-age=600"], True),
        (["no-cache"], True),
        ([], True),
        # Headers for CDNs alone: a CDN stores the page whatever Cache-Control says.
        (["private, max-age=0", "CDN-Cache-Control: max-age=600"], False),
        (["private", "Surrogate-Control: max-age=600"], False),
        (["private", "Cloudflare-CDN-Cache-Control: max-age=600"], False),
        (["private", "CDN-Cache-Control: no-store"], True),
    ],
)
def test_a_widget_page_for_shared_caches_is_left_as_it_is(
    tracker: RecordingTracker,
    caplog: pytest.LogCaptureFixture,
    cache_control: list[str],
    tracked: bool,
) -> None:
    # A CDN or nginx in front stored the first visitor's Set-Cookie with the page and
    # handed that conversation to every later visitor (or stopped caching the page).
    async def page(request: Request) -> Response:
        response = HTMLResponse(PAGE)
        for value in cache_control:
            name, _, cdn_value = value.partition(": ")
            if cdn_value:
                response.headers.append(name, cdn_value)
            else:
                response.headers.append("Cache-Control", value)
        return response

    app = Starlette(routes=[Route("/", page)])
    mw = AgentSightMiddleware(app, widget_pages=["/"], tracker=tracker)
    with uvicorn_server(mw) as url, httpx.Client(base_url=url) as client:
        answers = [client.get("/", headers=BROWSER) for _ in range(2)]
        client.cookies.clear()
    assert [answer.text for answer in answers] == [PAGE, PAGE]
    check_shared_cache_outcome(answers, cache_control, tracked, mw, tracker, caplog)


def test_a_widget_page_that_answers_json_is_said_once_for_each_rule(
    tracker: RecordingTracker, caplog: pytest.LogCaptureFixture
) -> None:
    # FastAPI sends a returned str as JSON unless told response_class=HTMLResponse: such
    # a widget page was never tracked, and nothing said why.
    from fastapi import HTTPException
    from fastapi.responses import HTMLResponse as FastAPIHTML

    api = FastAPI()

    @api.get("/")
    def home() -> str:
        return "<p>shop</p>"

    @api.get("/shop/{item}")
    def item(item: str) -> str:
        if item == "gone":
            raise HTTPException(status_code=404)
        return f"<p>{item}</p>"

    @api.get("/about", response_class=FastAPIHTML)
    def about() -> str:
        return "<p>about</p>"

    mw = AgentSightMiddleware(api, widget_pages=["/", "/shop/*", "/about"], tracker=tracker)
    with (
        caplog.at_level(logging.WARNING, logger="agentsight_middleware"),
        uvicorn_server(mw) as url,
        httpx.Client(base_url=url) as client,
    ):
        answers = {}
        for path in ["/", "/", "/shop/a", "/shop/b", "/shop/gone", "/about"]:
            client.cookies.clear()
            answers[path] = client.get(path, headers=BROWSER)
    assert answers["/"].json() == "<p>shop</p>"  # the app's answer, as it was
    assert "set-cookie" not in answers["/"].headers
    assert "set-cookie" not in answers["/shop/b"].headers
    assert answers["/about"].headers["set-cookie"].startswith("agentsight_conversation_id=")
    said = [r.getMessage() for r in caplog.records if "not an HTML page" in r.getMessage()]
    assert len(said) == 2  # once for "/", once for "/shop/*"; not for the 404
    assert said[0].startswith("the widget page '/' (rule '/') answered a browser's page view")
    assert "with 200 and Content-Type 'application/json'" in said[0]
    assert "response_class=HTMLResponse" in said[0]
    assert said[1].startswith("the widget page '/shop/a' (rule '/shop/*')")
    assert mw.flush(5)
    assert len(tracker.initialized) == 1  # /about


@pytest.mark.parametrize(("method", "path"), [("GET", "/"), ("POST", "/api/chat")])
async def test_request_headers_given_as_a_one_shot_iterable_all_reach_the_app(
    tracker: RecordingTracker, method: str, path: str
) -> None:
    # The scope's headers read with list() by the middleware, the app found the iterable
    # exhausted on tracked routes (found by a differential run).
    async def app(scope: Any, receive: Any, send: Any) -> None:
        names = b",".join(name for name, _ in scope["headers"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": names})

    mw = AgentSightMiddleware(
        app, widget_pages=["/"], chat_routes=["POST /api/chat"], tracker=tracker
    )
    browser = [(name.encode(), value.encode()) for name, value in BROWSER.items()]
    _, _, body = await _raw_call(mw, method, path, (pair for pair in browser))
    assert body == b",".join(name for name, _ in browser)


def test_a_chat_request_whose_body_never_comes_is_answered_by_an_app_that_does_not_wait(
    tracker: RecordingTracker,
) -> None:
    # Headers sent, the body not (a client waiting for the answer first, or a broken
    # one): an app that refuses such a request unread (a 401, a rate limit) answered at
    # once bare, and never wrapped, the body peek waiting for a first part with no limit.
    # (Python 3.10 waits for the first part without a bound, as documented: there the app
    # answers once the body comes.)
    import socket
    import urllib.parse

    async def refuse(request: Request) -> Response:
        return PlainTextResponse("unauthorized", status_code=401)

    app = Starlette(routes=[Route("/api/chat", refuse, methods=["POST"])])
    mw = AgentSightMiddleware(app, chat_routes=["POST /api/chat"], tracker=tracker)
    with uvicorn_server(mw) as url:
        port = urllib.parse.urlsplit(url).port
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            started = time.monotonic()
            client.sendall(
                b"POST /api/chat HTTP/1.1\r\nHost: shop.test\r\n"
                b"Content-Type: application/json\r\nContent-Length: 7\r\n\r\n"
            )
            if not _BOUND_CANCELS:
                client.settimeout(PEEK_WAIT + 0.5)
                with pytest.raises(TimeoutError):  # past the bound: no answer yet
                    client.recv(65536)
                client.settimeout(10)
                client.sendall(b'{"a":1}')
                started = time.monotonic()
            answer = b""
            while not answer.endswith(b"unauthorized"):  # head and body may come apart
                part = client.recv(65536)
                if not part:
                    break
                answer += part
            took = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 401 ")
    assert answer.endswith(b"unauthorized")
    assert took < 2.0  # the peek's 200 ms wait, then the app (was: until the client gave up)
    tracker.wait_for(used=1)  # tracked all the same, under an id of its own


@pytest.mark.parametrize(
    ("cache_control", "cookie"),
    [
        ("public, max-age=60", False),
        ("s-maxage=60", False),
        ("private, max-age=60", True),
        (None, True),
    ],
)
def test_a_chat_answer_for_shared_caches_gets_no_cookie_the_chat_counts(
    tracker: RecordingTracker, cache_control: str | None, cookie: bool
) -> None:
    # As for widget pages: a CDN storing the answer with the visitor's Set-Cookie would
    # hand that conversation to the next visitors (nginx and Varnish would stop caching).
    async def history(request: Request) -> Response:
        headers = {} if cache_control is None else {"cache-control": cache_control}
        return JSONResponse({"messages": []}, headers=headers)

    app = Starlette(routes=[Route("/api/chat", history, methods=["GET"])])
    mw = AgentSightMiddleware(app, chat_routes=["GET /api/chat"], tracker=tracker)
    with uvicorn_server(mw) as url, httpx.Client(base_url=url) as client:
        client.cookies.set("agentsight_conversation_id", "conv_0123456789ab")
        answer = client.get("/api/chat")
    assert answer.json() == {"messages": []}
    assert answer.headers.get("cache-control") == cache_control
    set_cookies = answer.headers.get_list("set-cookie")
    assert set_cookies == (
        ["agentsight_conversation_id=conv_0123456789ab; Path=/; SameSite=Lax; Max-Age=1800"]
        if cookie
        else []
    )
    tracker.wait_for(used=1)
    assert tracker.used[0]["conversation_id"] == "conv_0123456789ab"


@pytest.mark.parametrize("split", [0, 10])  # the first part late; the second part late
@pytest.mark.parametrize("layout", ["inner", "outer", "inner+outer"])
def test_a_late_body_part_reaches_the_app_whatever_middleware_surrounds_it(
    layout: str, split: int
) -> None:
    # A body (or its rest) coming PEEK_WAIT + 0.3 s after the headers (a slow client; a
    # client without TCP_NODELAY over a long round trip), with FastAPI's
    # @app.middleware("http") (BaseHTTPMiddleware) inside and outside the middleware: the
    # receive half run by the peek (in the outer one's cancel scope) was resumed by the
    # app in the inner one's call_next task: 500, "Attempted to exit a cancel scope that
    # isn't the current tasks's current cancel scope". Both were 500s before the bound
    # cancelled a late receive instead of handing it to the app half run.
    import socket
    import urllib.parse

    if layout == "inner+outer" and split and sys.version_info < (3, 11):
        pytest.xfail("Python 3.10 keeps handing a late part over (see _wait_handing_over)")
    tracker = RecordingTracker()
    app = FastAPI()

    @app.post("/api/chat")
    async def chat(request: Request) -> dict[str, str]:
        return {"got": (await request.body()).decode()}

    async def passthrough(request: Request, call_next: Any) -> Any:
        return await call_next(request)

    if "inner" in layout:
        app.middleware("http")(passthrough)
    app.add_middleware(AgentSightMiddleware, chat_routes=["POST /api/chat"], tracker=tracker)
    if "outer" in layout:
        app.middleware("http")(passthrough)
    body = b'{"conversation_id": "conv_0123456789ab", "m": "hi"}'
    with uvicorn_server(app) as url:
        port = urllib.parse.urlsplit(url).port
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(
                b"POST /api/chat HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body[:split])
            )
            time.sleep(PEEK_WAIT + 0.3)
            client.sendall(body[split:])
            answer = b""
            while not answer.endswith(b"}"):
                part = client.recv(65536)
                if not part:
                    break
                answer += part
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    got = answer.partition(b"\r\n\r\n")[2]
    assert got == b'{"got":"{\\"conversation_id\\": \\"conv_0123456789ab\\", \\"m\\": \\"hi\\"}"}'


def test_the_user_agent_parser_is_built_before_the_server_serves(
    tracker: RecordingTracker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The user-agent parser was built by the worker at the process's first page view:
    # ~0.2-0.3 s, ~130 ms of it in one call into ua-parser-rs that holds the GIL, which
    # froze every request and stream in flight (an SSE chunk due every 200 ms came 300-490
    # ms after the last under uvicorn, hypercorn, gunicorn, waitress and Werkzeug's server).
    # Built at the lifespan's start now: the server serves only once it is done.
    from agentsight_middleware import _device

    monkeypatch.setattr(_device, "_engine", None)  # as in a process that has not built it
    app = Starlette(routes=[Route("/", page)])
    mw = AgentSightMiddleware(app, widget_pages=["/"], tracker=tracker)
    with uvicorn_server(mw) as url:
        assert _device._engine is not None  # no request yet
        answer = httpx.get(url, headers=BROWSER)
        assert answer.status_code == 200
        tracker.wait_for(initialized=1)
        assert tracker.initialized[0]["device"] == "desktop"


def test_without_a_lifespan_the_first_answered_request_starts_the_parser_s_build(
    tracker: RecordingTracker, unbuilt_parser: list[str]
) -> None:
    # A server that runs no lifespan (Daphne, uvicorn --lifespan off) had the worker build
    # the parser at the first page view, freezing the requests and streams in flight. The
    # first request of any kind starts it now, once answered, in a thread of its own: a
    # probe or any other page first, and the first page view finds it built.
    from .apps.parser_app import parser_state

    async def parser(request: Request) -> Response:
        return PlainTextResponse(parser_state())

    app = Starlette(routes=[Route("/", page), Route("/parser", parser)])
    mw = AgentSightMiddleware(app, widget_pages=["/"], tracker=tracker)
    with uvicorn_server(mw, lifespan="off") as url, httpx.Client(base_url=url) as client:
        assert client.get("/parser").text == "none"  # not while it is served
        wait_for_the_parser(client)  # no page view yet
        assert client.get("/", headers=BROWSER).status_code == 200
        tracker.wait_for(initialized=1)
    mw.close()
    assert unbuilt_parser == ["agentsight-ua-parser"]
    assert tracker.initialized[0]["device"] == "desktop"


def test_a_user_agent_parser_that_cannot_be_built_does_not_stop_the_app_starting(
    tracker: RecordingTracker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Built at the lifespan's start, a parser that failed to build (a ua-parser whose rules
    # or resolvers are not as _device expects) raised in the app's send of
    # lifespan.startup.complete: Starlette then said lifespan.startup.failed and uvicorn
    # exited ("Application startup failed"). Built at the first page view, as before, its
    # failure cost only the device of each view.
    from agentsight_middleware import _device

    def broken() -> Any:
        raise RuntimeError("ua-parser's rules are not as expected")

    monkeypatch.setattr(_device, "_engine", None)
    monkeypatch.setattr(_device, "_build", broken)
    _device._classify.cache_clear()  # no device classified before, none kept after
    app = Starlette(routes=[Route("/", page)])
    mw = AgentSightMiddleware(app, widget_pages=["/"], tracker=tracker)
    try:
        with uvicorn_server(mw) as url:
            answer = httpx.get(url, headers=BROWSER)
            assert answer.status_code == 200
            tracker.wait_for(initialized=1)
            assert tracker.initialized[0]["device"] is None
    finally:
        _device._classify.cache_clear()
