"""Widget pages the app answers with a redirect: no view is recorded (a redirect is no page),
and before these checks nothing said so. Django's i18n_patterns serve ``/`` at ``/en/``
(LocaleMiddleware redirects there), so ``widget_pages=["/"]`` recorded nothing, silently;
as did a view that redirects (a language chosen in Flask or FastAPI) and a pattern rule
whose pages gain a trailing slash. Real servers: Werkzeug's and uvicorn; and Chromium."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import Request  # at module level: the route's annotation is read from here
from playwright.sync_api import Browser
from werkzeug.serving import make_server

from agentsight_middleware import AgentSightMiddleware, AgentSightWSGIMiddleware
from agentsight_middleware.testing import RecordingTracker

from .conftest import BROWSER, CHROME_LINUX, serving, uvicorn_server

COOKIE = "agentsight_conversation_id"

I18N = {
    "ROOT_URLCONF": "tests.apps.django_i18n_urls",
    "USE_I18N": True,
    "LANGUAGE_CODE": "en",
    "LANGUAGES": [("en", "English"), ("fr", "French")],
    "MIDDLEWARE": [
        "django.middleware.locale.LocaleMiddleware",
        "django.middleware.common.CommonMiddleware",
    ],
}


def _ours(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("agentsight_middleware") and r.levelno == logging.WARNING
    ]


def _redirect_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [line for line in _ours(caplog) if "A redirect is no page view" in line]


def _serve(app: Any, wsgi: bool) -> AbstractContextManager[str]:
    if wsgi:
        return serving(make_server("127.0.0.1", 0, app, threaded=True))
    return uvicorn_server(app)


@pytest.fixture
def django_setup(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # the example module keeps a local store in the cwd
    import examples.django_site.wsgi  # noqa: F401  (configures and sets Django up)


@contextmanager
def _django(wsgi: bool, settings: dict[str, Any], **options: Any) -> Iterator[tuple[str, Any]]:
    """The Django site of ``settings`` wrapped with ``options``, under Werkzeug's server
    (WSGI) or uvicorn (ASGI); yields (its URL, the middleware)."""
    from django.test import override_settings

    with override_settings(**settings):
        if wsgi:
            from django.core.wsgi import get_wsgi_application

            app: Any = AgentSightWSGIMiddleware(get_wsgi_application(), **options)
        else:
            from django.core.asgi import get_asgi_application

            app = AgentSightMiddleware(get_asgi_application(), **options)
        with _serve(app, wsgi) as url:
            yield url, app


@pytest.mark.parametrize("wsgi", [True, False], ids=["wsgi", "asgi"])
def test_django_i18n_rules_are_told_with_their_language_prefixed_paths(
    wsgi: bool, django_setup: None, caplog: pytest.LogCaptureFixture
) -> None:
    tracker = RecordingTracker()
    options = {"widget_pages": ["/", "/pricing"], "chat_routes": ["POST /api/chat/"]}
    site = _django(wsgi, I18N, tracker=tracker, **options)
    with caplog.at_level(logging.WARNING), site as (url, app):
        for _ in range(3):
            answer = httpx.get(url + "/", headers=BROWSER)
            assert (answer.status_code, answer.headers["location"]) == (302, "/en/")
        assert httpx.get(url + "/pricing", headers=BROWSER).headers["location"] == "/en/pricing/"
        assert app.flush(5)
    assert tracker.initialized == []  # the redirects record nothing: now it is said
    told = _ours(caplog)
    assert len(told) == 2, told  # at the route check; not again for the redirects seen
    home = next(line for line in told if line.startswith("widget_pages rule '/':"))
    assert "i18n_patterns" in home, home
    assert "write '/en/', '/fr/'" in home, home
    assert "re.compile(r'/(?:en|fr)/')" in home, home
    pricing = next(line for line in told if line.startswith("widget_pages rule '/pricing':"))
    assert "write '/en/pricing/', '/fr/pricing/'" in pricing, pricing
    assert "re.compile(r'/(?:en|fr)/pricing/')" in pricing, pricing


@pytest.mark.parametrize(
    ("wsgi", "widget_pages"),
    [
        (True, [re.compile(r"/(?:en|fr)/")]),
        (False, [re.compile(r"/(?:en|fr)/")]),
        # The advised paths beside the old rule, which is left as it was: harmless now.
        (True, ["/", "/en/", "/fr/"]),
    ],
    ids=["wsgi", "asgi", "wsgi-paths-and-the-old-rule"],
)
def test_django_i18n_the_advised_rules_record_each_language_s_views(
    wsgi: bool, widget_pages: list[Any], django_setup: None, caplog: pytest.LogCaptureFixture
) -> None:
    tracker = RecordingTracker()
    options = {"widget_pages": widget_pages, "chat_routes": ["POST /api/chat/"]}
    site = _django(wsgi, I18N, tracker=tracker, **options)
    with caplog.at_level(logging.WARNING), site as (url, _):
        for language in ("fr", "en"):
            with httpx.Client(base_url=url, follow_redirects=True) as browser:
                page = browser.get("/", headers={**BROWSER, "accept-language": language})
                assert page.url.path == f"/{language}/"
                assert f"Shop ({language})" in page.text
        tracker.wait_for(initialized=2)
    assert [call["metadata"]["page_path"] for call in tracker.initialized] == ["/fr/", "/en/"]
    assert _ours(caplog) == []


def _flask_site() -> Any:
    """A Flask site whose home page sends visitors to their language's (as Flask-Babel
    sites do), with a sign-in, a page signed-in visitors skip, and a moved page."""
    from flask import Flask, redirect, request

    app = Flask("site")

    @app.get("/")
    def home() -> Any:
        return redirect("/en/")

    @app.get("/en/")
    def english() -> Any:
        if request.accept_languages.best == "fr":
            return redirect("/fr/")  # the visitor's language, served elsewhere
        return "<!doctype html><title>Home</title>"

    @app.get("/account")
    def account() -> Any:
        if "session" not in request.cookies:
            return redirect("/login?next=/account")
        return "<!doctype html><title>Account</title>"

    @app.get("/welcome")
    def welcome() -> Any:
        if "session" in request.cookies:
            return redirect("/app")  # signed in: straight to the app
        return "<!doctype html><title>Welcome</title>"

    @app.get("/portal")
    def portal() -> Any:
        if "session" not in request.cookies:
            return redirect("/login")  # the page to come back to kept in the session
        return "<!doctype html><title>Portal</title>"

    @app.get("/old")
    def old() -> Any:
        return redirect("/new")

    @app.get("/new")
    def new() -> str:
        return "<!doctype html><title>New</title>"

    @app.get("/docs/<name>/")
    def docs(name: str) -> str:
        return f"<!doctype html><title>{name}</title>"

    return app


def _fastapi_site() -> Any:
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse, RedirectResponse

    app = FastAPI()

    @app.get("/")
    def home() -> RedirectResponse:
        return RedirectResponse("/en/")  # 307

    @app.get("/en/", response_class=HTMLResponse)
    def english() -> str:
        return "<!doctype html><title>Home</title>"

    @app.get("/welcome", response_class=HTMLResponse)
    def welcome(request: Request) -> Any:
        if "session" in request.cookies:
            return RedirectResponse("/app")  # signed in: straight to the app
        return "<!doctype html><title>Welcome</title>"

    return app


def _wrapped(framework: str, tracker: RecordingTracker, widget_pages: list[str]) -> Any:
    if framework == "flask":
        site = _flask_site()
        site.wsgi_app = AgentSightWSGIMiddleware(
            site.wsgi_app, widget_pages=widget_pages, tracker=tracker
        )
        return site
    return AgentSightMiddleware(_fastapi_site(), widget_pages=widget_pages, tracker=tracker)


@pytest.mark.parametrize("framework", ["flask", "fastapi"])
def test_a_widget_page_answered_only_with_redirects_is_told_once(
    framework: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A view that redirects: the route check at start-up sees a route at "/" and is right.
    tracker = RecordingTracker()
    app = _wrapped(framework, tracker, ["/"])
    with caplog.at_level(logging.WARNING), _serve(app, framework == "flask") as url:
        statuses = []
        for visit in range(5):
            answer = httpx.get(url + "/", headers=BROWSER)
            statuses.append(answer.status_code)
            assert "set-cookie" not in answer.headers
            # One temporary redirect is no sign (a sign-in, say): told at the third.
            assert len(_redirect_warnings(caplog)) == (0 if visit < 2 else 1)
        # A script's fetch, no page view, is not counted.
        assert httpx.get(url + "/", headers={"accept": "*/*"}).status_code in (302, 307)
    status = statuses[0]
    assert statuses == [status] * 5
    assert status == (302 if framework == "flask" else 307)
    told = _redirect_warnings(caplog)
    assert len(told) == 1, told
    assert told[0].startswith("the widget page rule '/': 3 browser page views ('/',"), told
    assert f"({status} to '/en/') and none with a page since the first" in told[0], told
    assert "add that page to widget_pages ('/en/'" in told[0], told
    assert tracker.initialized == []


def test_sign_in_redirects_and_rules_that_answer_pages_say_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tracker = RecordingTracker()
    app = _wrapped("flask", tracker, ["/account", "/welcome", "/old", "/new"])
    signed_in = {**BROWSER, "cookie": "session=1"}
    with caplog.at_level(logging.WARNING), _serve(app, True) as url:
        for _ in range(5):
            # A sign-in that comes back to the page (?next=/account).
            assert httpx.get(url + "/account", headers=BROWSER).status_code == 302
            # A page that moved to another widget page: its view is recorded there.
            assert httpx.get(url + "/old", headers=BROWSER).headers["location"] == "/new"
        # A page some visitors see and others skip: one page among the redirects will do.
        assert httpx.get(url + "/welcome", headers=signed_in).status_code == 302
        assert httpx.get(url + "/welcome", headers=BROWSER).status_code == 200
        for _ in range(5):
            assert httpx.get(url + "/welcome", headers=signed_in).status_code == 302
        assert httpx.get(url + "/account", headers=signed_in).status_code == 200
        tracker.wait_for(initialized=2)
    assert _ours(caplog) == []


@pytest.mark.parametrize(
    ("framework", "page"),
    [("flask", "/welcome"), ("flask", "/portal"), ("fastapi", "/welcome")],
    ids=["flask-signed-in-sent-on", "flask-sign-in-wall", "fastapi-signed-in-sent-on"],
)
def test_visitors_sent_elsewhere_before_the_first_page_say_nothing(
    framework: str, page: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The first visitors after a start are signed in (sent on to "/app"), or not and sent
    # to sign in (no ?next=): the rule's page is served to the others, and recorded. A
    # warning that nothing was recorded, advising "/app" or "/login" as widget pages, was
    # wrong: only the page itself elsewhere (a language, a slash) is a sign of a miss.
    tracker = RecordingTracker()
    app = _wrapped(framework, tracker, [page])
    sent_on = {**BROWSER, "cookie": "session=1"} if page == "/welcome" else BROWSER
    shown = BROWSER if page == "/welcome" else {**BROWSER, "cookie": "session=1"}
    with caplog.at_level(logging.WARNING), _serve(app, framework == "flask") as url:
        for _ in range(5):
            answer = httpx.get(url + page, headers=sent_on)
            assert answer.status_code in (302, 307), answer
            assert answer.headers["location"] in ("/app", "/login"), answer.headers
        assert httpx.get(url + page, headers=shown).status_code == 200
        tracker.wait_for(initialized=1)
    assert [call["metadata"]["page_path"] for call in tracker.initialized] == [page]
    assert _redirect_warnings(caplog) == []


def test_a_page_sent_to_another_language_is_still_told(caplog: pytest.LogCaptureFixture) -> None:
    # Only the same page elsewhere counts (a temporary redirect to another page does not):
    # a language changed in the path is that, and French visitors' views of "/en/" are
    # recorded nowhere.
    tracker = RecordingTracker()
    app = _wrapped("flask", tracker, ["/en/"])
    french = {**BROWSER, "accept-language": "fr"}
    with caplog.at_level(logging.WARNING), _serve(app, True) as url:
        for _ in range(3):
            assert httpx.get(url + "/en/", headers=french).headers["location"] == "/fr/"
    told = _redirect_warnings(caplog)
    assert len(told) == 1, told
    assert "add that page to widget_pages ('/fr/'" in told[0], told
    assert tracker.initialized == []


@pytest.mark.parametrize("wsgi", [True, False], ids=["flask-wsgi", "django-asgi"])
def test_a_permanent_redirect_is_told_at_the_first(
    wsgi: bool, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A pattern rule (not checked at start-up) whose pages gain a trailing slash: Flask's
    # strict slashes (308), Django's APPEND_SLASH (301). A browser keeps a permanent
    # redirect and never asks the app again: waiting for a third would wait for others.
    tracker = RecordingTracker()
    serve: Callable[[], AbstractContextManager[tuple[str, Any]]]
    if wsgi:
        site = _wrapped("flask", tracker, ["/docs/*"])

        @contextmanager
        def serve() -> Iterator[tuple[str, Any]]:
            with _serve(site, True) as url:
                yield url, site.wsgi_app

    else:
        monkeypatch.chdir(tmp_path)
        import examples.django_site.wsgi  # noqa: F401

        settings = {
            "ROOT_URLCONF": "tests.apps.django_docs_urls",
            "MIDDLEWARE": ["django.middleware.common.CommonMiddleware"],
        }

        def serve() -> AbstractContextManager[tuple[str, Any]]:
            return _django(False, settings, widget_pages=["/docs/*"], tracker=tracker)

    with caplog.at_level(logging.WARNING), serve() as (url, app):
        answer = httpx.get(url + "/docs/intro", headers=BROWSER)
        assert answer.status_code == (308 if wsgi else 301)
        told = _redirect_warnings(caplog)
        assert len(told) == 1, told
        assert httpx.get(url + "/docs/setup", headers=BROWSER).status_code in (301, 308)
        assert _redirect_warnings(caplog) == told  # once for the rule
        assert app.flush(5)
    assert told[0].startswith(
        "the widget page rule '/docs/*': a browser's page view ('/docs/intro') answered with "
        "a permanent redirect"
    ), told
    assert "no widget rule matches '/docs/intro/'" in told[0], told
    assert tracker.initialized == []


def test_django_s_own_languages_are_checked_twelve_at_most(
    django_setup: None, caplog: pytest.LogCaptureFixture
) -> None:
    # A site that sets no LANGUAGES has Django's ~100: each language tried is activated
    # (its translations loaded) at the check, so a dozen are, and the line says so.
    from django.conf import global_settings

    settings = {key: value for key, value in I18N.items() if key != "LANGUAGES"}
    every = len(global_settings.LANGUAGES)
    with (
        caplog.at_level(logging.WARNING),
        _django(True, settings, widget_pages=["/"], tracker=RecordingTracker()) as (url, _),
    ):
        assert httpx.get(url + "/", headers=BROWSER).status_code == 302
    told = _ours(caplog)
    assert len(told) == 1, told
    # The default language's first; a language's hyphen as it is in the regex.
    assert "write '/en/', '/af/', '/ar/', '/ar-dz/', '/ast/'," in told[0], told
    alternatives = re.search(r"re\.compile\(r'/\(\?:([^)]*)\)/'\)", told[0])
    assert alternatives is not None, told
    assert alternatives[1].split("|")[:4] == ["en", "af", "ar", "ar-dz"], told
    assert len(alternatives[1].split("|")) == 12, told
    assert f"{every - 12} more languages of LANGUAGES were not checked" in told[0], told


@pytest.mark.parametrize(
    ("widget_pages", "recorded"),
    [(["/"], False), ([re.compile(r"/(?:en|fr)/")], True)],
    ids=["the-old-rule", "the-advised-rule"],
)
def test_chromium_sent_on_by_locale_middleware(
    widget_pages: list[Any],
    recorded: bool,
    browser: Browser,
    django_setup: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A French visitor's Chromium opens "/": LocaleMiddleware sends it to "/fr/".
    tracker = RecordingTracker()
    site = _django(False, I18N, widget_pages=widget_pages, tracker=tracker)
    with caplog.at_level(logging.WARNING), site as (url, app):
        context = browser.new_context(locale="fr-FR", user_agent=CHROME_LINUX)
        try:
            page = context.new_page()
            page.goto(url + "/")
            assert page.url == url + "/fr/"
            assert page.title() == "Shop (fr)"
            cookies = [c["value"] for c in context.cookies() if c["name"] == COOKIE]
        finally:
            context.close()
        assert app.flush(5)
    views = [call["metadata"]["page_path"] for call in tracker.initialized]
    if recorded:
        assert views == ["/fr/"]
        assert cookies == [tracker.initialized[0]["conversation_id"]]
        assert _ours(caplog) == []
    else:
        assert (views, cookies) == ([], [])
        [told] = _ours(caplog)
        assert "write '/en/', '/fr/', or one rule: re.compile(r'/(?:en|fr)/')" in told, told


@pytest.mark.parametrize("home", ["/me", "/hq/", "/go"])
def test_a_signed_in_visitor_sent_to_a_two_letter_page_says_nothing(
    home: str, caplog: pytest.LogCaptureFixture
) -> None:
    # "/" sends signed-in visitors to their own page, named with two letters: those read as
    # a language segment taken out ("/me" less "me" is "/"), so their redirects were told
    # as the page served elsewhere, advising a page that shows no widget.
    from flask import Flask, redirect, request

    site = Flask("site")

    @site.get("/")
    def home_page() -> Any:
        if "session" in request.cookies:
            return redirect(home)
        return "<!doctype html><title>Welcome</title>"

    tracker = RecordingTracker()
    app = AgentSightWSGIMiddleware(site, widget_pages=["/"], tracker=tracker)
    with caplog.at_level(logging.WARNING), _serve(app, True) as url:
        for _ in range(5):
            answer = httpx.get(url + "/", headers={**BROWSER, "cookie": "session=1"})
            assert answer.headers["location"] == home, answer.headers
        assert httpx.get(url + "/", headers=BROWSER).status_code == 200
        tracker.wait_for(initialized=1)
    assert _redirect_warnings(caplog) == []
