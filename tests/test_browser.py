"""A real browser (Debian's headless Chromium, driven by Playwright) against the demo
served by uvicorn on 127.0.0.1, with the local store behind it."""

from __future__ import annotations

import importlib
import os
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from werkzeug.serving import make_server

from agentsight_middleware import AgentSightMiddleware
from agentsight_middleware._report import build_report
from examples.common import reply_to, widget_page
from examples.demo import create_app

from .conftest import CHROME_LINUX, IPHONE, serving, uvicorn_server


@pytest.fixture
def demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    monkeypatch.delenv("AGENTSIGHT_API_KEY", raising=False)
    db = tmp_path / "events.sqlite3"
    with uvicorn_server(create_app(local_store=db)) as url:
        yield url + "/", db


def events(db: Path) -> list[dict[str, Any]]:
    if not db.exists():
        return []
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        rows = conn.execute(
            "SELECT conversation_id, is_used, device, language FROM events ORDER BY id"
        ).fetchall()
    except sqlite3.OperationalError:  # created, but no event written yet
        return []
    finally:
        conn.close()
    return [dict(row) for row in rows]


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def chat(page: Page, message: str) -> None:
    page.fill("#message", message)
    page.press("#message", "Enter")
    page.wait_for_selector(f"#log p.bot:has-text('You said: {message}')")


def test_page_reload_chat_and_a_second_visitor(
    browser: Browser, demo: tuple[str, Path], tmp_path: Path
) -> None:
    url, db = demo
    first = browser.new_context(locale="fr-FR", user_agent=CHROME_LINUX)
    page = first.new_page()
    page.goto(url)
    wait_until(lambda: len(events(db)) == 1, "the first page view")
    [view] = events(db)
    assert view["is_used"] == 0
    assert view["device"] == "desktop"
    assert view["language"] == "fr-FR"
    conversation_id = view["conversation_id"]
    assert page.evaluate("conversationId()") == conversation_id

    page.reload()
    page.wait_for_selector("#chat-toggle")
    time.sleep(0.3)
    assert {e["conversation_id"] for e in events(db)} == {conversation_id}, "the cookie holds"

    page.click("#chat-toggle")
    chat(page, "hello")
    chat(page, "how much is it?")
    wait_until(lambda: len(events(db)) == 3, "two chat requests")
    used = [e for e in events(db) if e["is_used"]]
    assert [e["conversation_id"] for e in used] == [conversation_id, conversation_id]
    page.screenshot(path=str(tmp_path / "demo.png"))
    if os.environ.get("AGENTSIGHT_SCREENSHOT"):
        shutil.copy(tmp_path / "demo.png", os.environ["AGENTSIGHT_SCREENSHOT"])

    second = browser.new_context(locale="en-GB", user_agent=CHROME_LINUX)
    second.new_page().goto(url)
    wait_until(lambda: len({e["conversation_id"] for e in events(db)}) == 2, "a second visitor")
    first.close()
    second.close()

    report = build_report(db)
    assert report.initialized == 2
    assert report.used == 1
    assert report.interaction_rate_percent == 50.0


def test_mobile_browser_is_a_mobile_device(browser: Browser, demo: tuple[str, Path]) -> None:
    url, db = demo
    context = browser.new_context(
        user_agent=IPHONE, viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True
    )
    context.new_page().goto(url)
    wait_until(lambda: len(events(db)) == 1, "the page view")
    assert events(db)[0]["device"] == "mobile"
    context.close()


def test_headless_chrome_s_own_page_views_are_not_counted_its_chats_are(
    browser: Browser, demo: tuple[str, Path]
) -> None:
    # A browser with no screen (an app's own Playwright tests, a browser uptime check, a
    # scraper) has no one to chat: its views made the rate look lower than it is.
    url, db = demo
    context = browser.new_context()
    page = context.new_page()
    assert "HeadlessChrome/" in page.evaluate("navigator.userAgent")
    page.goto(url)
    page.click("#chat-toggle")
    chat(page, "hello")
    wait_until(lambda: len(events(db)) == 1, "the chat request")
    time.sleep(0.3)
    [only] = events(db)
    assert only["is_used"] == 1
    assert page.evaluate("conversationId()") == only["conversation_id"]  # the cookie held
    context.close()


@contextmanager
def _wsgi_server(app: Any) -> Iterator[str]:
    server = make_server("127.0.0.1", 0, app, threaded=True)
    with serving(server) as url:
        yield url


# Each example under a real server, its chat sent by the page's own widget: the demo's
# tests post to each app's chat route by hand, and Django's widget posted to /api/chat,
# which its site (whose route ends in a slash) answers 404: no chat was ever recorded.
EXAMPLE_SERVERS: dict[str, Callable[[Path], AbstractContextManager[str]]] = {
    "starlette": lambda db: uvicorn_server(
        importlib.import_module("examples.starlette_app").create_app(local_store=db)
    ),
    "litestar": lambda db: uvicorn_server(
        importlib.import_module("examples.litestar_app").create_app(local_store=db)
    ),
    "django asgi": lambda db: uvicorn_server(
        importlib.import_module("examples.django_site.asgi").create_application(local_store=db)
    ),
    "flask": lambda db: _wsgi_server(
        importlib.import_module("examples.flask_app").create_app(local_store=db)
    ),
    "django wsgi": lambda db: _wsgi_server(
        importlib.import_module("examples.django_site.wsgi").create_application(local_store=db)
    ),
}


def _view_and_chat(browser: Browser, url: str, db: Path) -> None:
    """Load the example widget's page at ``url``, chat once, and wait for both events."""
    context = browser.new_context(user_agent=CHROME_LINUX)
    page = context.new_page()
    page.goto(url + "/")
    wait_until(lambda: len(events(db)) == 1, "the page view")
    page.click("#chat-toggle")
    page.fill("#message", "hello")
    page.press("#message", "Enter")
    page.wait_for_selector("#log p.bot", timeout=10_000)
    assert page.inner_text("#log p.bot") == "You said: hello"
    wait_until(lambda: len(events(db)) == 2, "the chat request")
    context.close()


@pytest.mark.parametrize("name", list(EXAMPLE_SERVERS))
def test_each_example_s_widget_chats_on_the_page_s_conversation(
    browser: Browser, name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AGENTSIGHT_API_KEY", raising=False)
    db = tmp_path / "events.sqlite3"
    with EXAMPLE_SERVERS[name](db) as url:
        _view_and_chat(browser, url, db)
    [view, used] = events(db)
    assert (view["is_used"], used["is_used"]) == (0, 1)
    assert used["conversation_id"] == view["conversation_id"]


def test_the_widget_passes_django_s_csrf_check_of_a_page_that_sets_its_cookie(
    browser: Browser, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A new Django project checks CSRF: the widget's POST had no token, Django answered
    # 403, and every chat was counted as refused (an interaction rate of 0 %).
    monkeypatch.delenv("AGENTSIGHT_API_KEY", raising=False)
    monkeypatch.setenv("DJANGO_SETTINGS_MODULE", "examples.django_site.settings")
    import django
    from django.test import override_settings

    django.setup()
    db = tmp_path / "events.sqlite3"
    csrf = override_settings(
        ROOT_URLCONF="tests.apps.django_csrf_widget_urls",
        MIDDLEWARE=["django.middleware.csrf.CsrfViewMiddleware"],
    )
    wsgi = importlib.import_module("examples.django_site.wsgi")
    with csrf, _wsgi_server(wsgi.create_application(local_store=db)) as url:
        _view_and_chat(browser, url, db)
    [view, used] = events(db)
    assert used["conversation_id"] == view["conversation_id"]


def test_a_page_left_open_past_the_cookie_s_life_chats_on_its_view_s_conversation(
    browser: Browser, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A tab left open (30 minutes by default; 2 s here) whose visitor then chats: the
    # widget read the id from the expired cookie at that moment, found none, and the chat
    # minted a conversation that had no view, while the view's stayed unused (rate 0 %).
    monkeypatch.delenv("AGENTSIGHT_API_KEY", raising=False)
    db = tmp_path / "events.sqlite3"
    with uvicorn_server(create_app(local_store=db, cookie_max_age=2)) as url:
        context = browser.new_context(user_agent=CHROME_LINUX)
        page = context.new_page()
        page.goto(url + "/")
        wait_until(lambda: len(events(db)) == 1, "the page view")
        time.sleep(2.5)
        assert page.evaluate("conversationId()") is None  # the cookie has expired
        page.click("#chat-toggle")
        chat(page, "still there?")
        wait_until(lambda: len(events(db)) == 2, "the chat request")
        context.close()
    [view, used] = events(db)
    assert used["is_used"] == 1
    assert used["conversation_id"] == view["conversation_id"]
    report = build_report(db)
    assert (report.initialized, report.used, report.used_without_page_view) == (1, 1, 0)


def test_the_widget_chats_with_an_api_on_another_origin_that_allows_the_readme_s_headers(
    browser: Browser, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A Django page sets csrftoken; its widget posts to an API on another origin whose CORS
    # lists the headers the README names. The widget added X-CSRFToken there too: the
    # preflight was refused and no chat got through (and the page's token went elsewhere).
    from starlette.middleware.cors import CORSMiddleware

    monkeypatch.delenv("AGENTSIGHT_API_KEY", raising=False)
    seen: list[str | None] = []

    async def chat_view(request: Request) -> Response:
        seen.append(request.headers.get("x-csrftoken"))
        data = await request.json()
        return JSONResponse({"reply": reply_to(str(data.get("message", "")))})

    api = CORSMiddleware(
        AgentSightMiddleware(
            Starlette(routes=[Route("/api/chat", chat_view, methods=["POST"])]),
            chat_routes=["POST /api/chat"],
            local_store=tmp_path / "api.sqlite3",
        ),
        allow_origin_regex=r"http://127\.0\.0\.1:[0-9]+",
        allow_methods=["POST"],
        allow_headers=["X-Conversation-ID"],
    )
    with uvicorn_server(api) as api_url:

        async def index(request: Request) -> Response:
            page = HTMLResponse(widget_page(api_url + "/api/chat"))
            page.set_cookie("csrftoken", "s3cretToken0123456789abcdefABCDEF", samesite="lax")
            return page

        site = AgentSightMiddleware(
            Starlette(routes=[Route("/", index)]),
            widget_pages=["/"],
            local_store=tmp_path / "site.sqlite3",
        )
        with uvicorn_server(site) as url:
            context = browser.new_context(user_agent=CHROME_LINUX)
            page = context.new_page()
            page.goto(url + "/")
            assert "csrftoken=" in page.evaluate("document.cookie")
            page.click("#chat-toggle")
            page.fill("#message", "hello")
            page.press("#message", "Enter")
            page.wait_for_selector("#log p.bot", timeout=10_000)
            assert page.inner_text("#log p.bot") == "You said: hello"
            context.close()
    assert seen == [None]
