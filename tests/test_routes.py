"""Rules that miss the app's routes by a little are told once the app has started."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, FastAPI
from fastapi.responses import HTMLResponse
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route, Router
from werkzeug.test import Client

from agentsight_middleware import AgentSightMiddleware, AgentSightWSGIMiddleware
from agentsight_middleware._routes import (
    near_misses,
    starlette_routes,
    starlette_served,
    wsgi_served,
)
from agentsight_middleware._rules import RuleSet
from agentsight_middleware.testing import RecordingTracker

from .conftest import serving, uvicorn_server


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
    return near_misses(RuleSet(widget, chat).exact_matches, starlette_served(routes))


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


# WSGI: Flask (Werkzeug's URL map) and Django (its URL conf), checked at the first request.
def _flask_shop() -> Any:
    from flask import Flask

    app = Flask("shop")

    @app.get("/pricing")
    def pricing() -> str:
        return "<html>prices</html>"

    @app.get("/docs/")
    def docs() -> str:
        return "<html>docs</html>"

    @app.post("/api/chat")
    def chat() -> dict[str, str]:
        return {"reply": "hi"}

    return app


def _serve_wsgi(app: Any) -> Any:
    from werkzeug.serving import make_server

    return serving(make_server("127.0.0.1", 0, app, threaded=True))


@pytest.mark.parametrize("form", ["wsgi_app", "app"])
def test_flask_near_misses_are_told_at_the_first_request(
    form: str, caplog: pytest.LogCaptureFixture
) -> None:
    from werkzeug.middleware.proxy_fix import ProxyFix

    options: dict[str, Any] = {
        # /pricing/ for the route /pricing (Flask answers 404); /docs for the route /docs/
        # (Flask redirects, and the rule only ever sees the redirect); a GET rule for a
        # POST route (Flask lists OPTIONS too: not worth naming).
        "widget_pages": ["/pricing/", "/docs"],
        "chat_routes": ["GET /api/chat"],
        "tracker": RecordingTracker(),
    }
    flask_app = _flask_shop()
    if form == "wsgi_app":  # as the README writes it, through another middleware
        flask_app.wsgi_app = AgentSightWSGIMiddleware(ProxyFix(flask_app.wsgi_app), **options)
        app = flask_app
    else:
        app = AgentSightWSGIMiddleware(flask_app, **options)
    with caplog.at_level(logging.WARNING), _serve_wsgi(app) as url:
        assert httpx.get(url + "/pricing").text == "<html>prices</html>"  # untouched
        told = _told(caplog)
        assert httpx.post(url + "/api/chat").json() == {"reply": "hi"}
        assert _told(caplog) == told  # once, at the first request only
    assert len(told) == 3, told
    assert any("'/pricing/'" in line and "write '/pricing'" in line for line in told), told
    assert any("'/docs'" in line and "write '/docs/'" in line for line in told), told
    assert any(
        "'GET /api/chat'" in line
        and "takes POST, not GET" in line
        and "write 'POST /api/chat'" in line
        for line in told
    ), told


def test_quart_websocket_routes_are_no_http_route_to_advise(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Quart's URL map is Werkzeug's, with WebSocket routes in it (at GET). A rule at a
    # WebSocket route's path was told "takes GET, not DELETE, GET, PATCH, POST, PUT" and
    # to write 'GET /ws', which matches no request either (websockets pass through).
    from quart import Quart, websocket

    app = Quart(__name__)

    @app.websocket("/ws")
    async def ws() -> None:
        await websocket.send("hi")

    @app.get("/live")
    async def live_page() -> str:
        return "<html>live</html>"

    @app.websocket("/live")
    async def live() -> None:
        await websocket.send("hi")

    middleware = AgentSightMiddleware(
        app, chat_routes=["/ws", "POST /ws", "POST /live"], tracker=RecordingTracker()
    )
    with caplog.at_level(logging.WARNING), uvicorn_server(middleware) as url:
        assert httpx.get(url + "/live").text == "<html>live</html>"
    told = _told(caplog)
    # An HTTP route's methods only: GET at /live, nothing at /ws (as for FastAPI's).
    assert len(told) == 1, told
    assert "'POST /live'" in told[0], told
    assert "takes GET, not POST" in told[0], told


def test_flask_rules_under_a_script_name_are_checked_inside_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The shop mounted at /shop (SCRIPT_NAME): rules name the path the client sends.
    from werkzeug.middleware.dispatcher import DispatcherMiddleware
    from werkzeug.wrappers import Response

    flask_app = _flask_shop()
    flask_app.wsgi_app = AgentSightWSGIMiddleware(
        flask_app.wsgi_app,
        widget_pages=["/shop/pricing", "/shop/docs/", "/shop/nowhere", "/shop/docs"],
        chat_routes=["POST /shop/api/chat", "/elsewhere"],
        tracker=RecordingTracker(),
    )
    site = DispatcherMiddleware(Response("home"), {"/shop": flask_app})
    with caplog.at_level(logging.WARNING), _serve_wsgi(site) as url:
        assert httpx.get(url + "/shop/pricing").text == "<html>prices</html>"
    # /shop/docs misses (Flask redirects it to /shop/docs/, which has its own rule), and
    # /elsewhere, outside the shop, matches no request the middleware sees (every path
    # starts with its script name); a path no route knows says nothing.
    told = _told(caplog)
    assert len(told) == 2, told
    docs = next(line for line in told if "'/shop/docs'" in line)
    assert "write '/shop/docs/'" in docs, docs
    outside = next(line for line in told if "'/elsewhere'" in line)
    assert "root path '/shop'" in outside, outside
    assert "write '/shop/elsewhere'" in outside, outside


def test_django_slash_misses_are_told_at_the_first_request(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)  # the example module keeps a local store in the cwd
    from examples.django_site.wsgi import create_application

    caplog.clear()  # its own application, made at import, warns that it has no key
    app = create_application(tracker=RecordingTracker())  # the example's rules: served
    mistaken = AgentSightWSGIMiddleware(
        app.app, widget_pages=["/"], chat_routes=["POST /api/chat"], tracker=RecordingTracker()
    )
    with caplog.at_level(logging.WARNING):
        with _serve_wsgi(app) as url:
            assert httpx.get(url + "/").status_code == 200
        assert _told(caplog) == []
        with _serve_wsgi(mistaken) as url:
            assert httpx.get(url + "/").status_code == 200
    # The example's views are functions, which may take any method: only the slash is told.
    told = _told(caplog)
    assert len(told) == 1, told
    assert "'POST /api/chat'" in told[0], told
    assert "write 'POST /api/chat/'" in told[0], told


def test_a_wsgi_app_without_a_known_router_says_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from werkzeug.wrappers import Response

    app = AgentSightWSGIMiddleware(
        Response("plain"), widget_pages=["/pricing/"], tracker=RecordingTracker()
    )
    with caplog.at_level(logging.DEBUG), _serve_wsgi(app) as url:
        assert httpx.get(url + "/pricing/").text == "plain"
    assert [r for r in caplog.records if "compare the rules" in r.getMessage()] == []
    assert _told(caplog) == []


# Cases from a review of the WSGI check: each failed before its fix.
def _rule_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("agentsight_middleware")
        and r.levelno == logging.WARNING
        and " rule '" in r.getMessage()  # not the count of instances the tests build
    ]


def _first_request(
    app: Any, caplog: pytest.LogCaptureFixture, path: str = "/", **request: Any
) -> list[str]:
    with caplog.at_level(logging.WARNING):
        Client(app).open(path, **request).close()
    return _rule_warnings(caplog)


def _chat_page_and_api() -> Any:
    # The chat's page and its API at one path: GET renders, POST answers.
    from flask import Flask

    app = Flask("chat")

    @app.get("/chat")
    def page() -> str:
        return "<html>chat</html>"

    @app.post("/chat")
    def answer() -> dict[str, str]:
        return {"reply": "hi"}

    return app


# 1 (high): the first request of a process is a WebSocket upgrade (a chat widget's socket
# reconnecting after a deploy): Werkzeug's adapter bound to that environ matches only
# WebSocket routes, so each HTTP route answered 405 for the other method and both
# correct rules were told to change ("write 'GET /chat'").
def test_a_websocket_first_request_tells_nothing_of_correct_rules(
    caplog: pytest.LogCaptureFixture,
) -> None:
    flask_app = _chat_page_and_api()

    @flask_app.route("/ws", websocket=True)  # type: ignore[untyped-decorator]  # as flask-sock does
    def socket() -> str:
        return ""

    flask_app.wsgi_app = AgentSightWSGIMiddleware(
        flask_app.wsgi_app,
        widget_pages=["/chat"],
        chat_routes=["POST /chat"],
        tracker=RecordingTracker(),
    )
    upgrade = {"Connection": "keep-alive, Upgrade", "Upgrade": "websocket"}
    assert _first_request(flask_app, caplog, "/ws", headers=upgrade) == []


def test_a_websocket_first_request_still_tells_a_near_miss(
    caplog: pytest.LogCaptureFixture,
) -> None:
    flask_app = _chat_page_and_api()
    flask_app.wsgi_app = AgentSightWSGIMiddleware(
        flask_app.wsgi_app, chat_routes=["POST /chat/"], tracker=RecordingTracker()
    )
    upgrade = {"Connection": "Upgrade", "Upgrade": "websocket"}
    told = _first_request(flask_app, caplog, "/ws", headers=upgrade)
    assert len(told) == 1, told
    assert "write 'POST /chat'" in told[0], told


# 2 (medium): Flask's documented subdomain routing (SERVER_NAME, subdomain_matching,
# a blueprint on the "api" subdomain): the check bound the map without the server name,
# so it asked the default subdomain only, whatever the request's host, and told the API's
# correct rule to take the page's method.
@pytest.mark.parametrize("host", ["example.com", "api.example.com"])
def test_routes_on_another_subdomain_count(host: str, caplog: pytest.LogCaptureFixture) -> None:
    from flask import Blueprint, Flask

    flask_app = Flask("site", subdomain_matching=True)
    flask_app.config["SERVER_NAME"] = "example.com"
    api = Blueprint("api", "site", subdomain="api")

    @api.post("/chat")
    def answer() -> dict[str, str]:
        return {"reply": "hi"}

    flask_app.register_blueprint(api)

    @flask_app.get("/chat")
    def page() -> str:
        return "<html>chat</html>"

    flask_app.wsgi_app = AgentSightWSGIMiddleware(  # type: ignore[method-assign]
        flask_app.wsgi_app,
        widget_pages=["/chat"],
        chat_routes=["POST /chat"],
        tracker=RecordingTracker(),
    )
    assert _first_request(flask_app, caplog, "/chat", base_url=f"http://{host}") == []


# 2b (medium): the same with host_matching: only the first request's host was asked.
def test_routes_of_another_host_count(caplog: pytest.LogCaptureFixture) -> None:
    from flask import Flask

    flask_app = Flask("site", host_matching=True, static_host="www.example.com")

    @flask_app.get("/chat", host="www.example.com")
    def page() -> str:
        return "<html>chat</html>"

    @flask_app.post("/chat", host="api.example.com")
    def answer() -> dict[str, str]:
        return {"reply": "hi"}

    flask_app.wsgi_app = AgentSightWSGIMiddleware(  # type: ignore[method-assign]
        flask_app.wsgi_app,
        widget_pages=["/chat"],
        chat_routes=["POST /chat"],
        tracker=RecordingTracker(),
    )
    told = _first_request(flask_app, caplog, "/chat", base_url="http://www.example.com")
    assert told == []


# 3 (medium): the middleware around Werkzeug's DispatcherMiddleware (a Flask front end with
# an SPA catch-all, the API mounted at /api): the walk went down the dispatcher's default
# app only, and the front end's catch-all "took GET" at the API's path.
def test_a_path_mounted_elsewhere_is_not_asked_of_the_default_app(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from flask import Flask
    from werkzeug.middleware.dispatcher import DispatcherMiddleware

    front = Flask("front")

    @front.get("/", defaults={"path": ""})
    @front.get("/<path:path>")
    def spa(path: str) -> str:
        return "<html>spa</html>"

    api = Flask("api")

    @api.post("/chat")
    def answer() -> dict[str, str]:
        return {"reply": "hi"}

    site = AgentSightWSGIMiddleware(
        DispatcherMiddleware(front, {"/api": api}),
        widget_pages=["/"],
        chat_routes=["POST /api/chat"],
        tracker=RecordingTracker(),
    )
    assert _first_request(site, caplog) == []


def test_the_default_app_of_a_dispatcher_is_still_checked(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from flask import Flask
    from werkzeug.middleware.dispatcher import DispatcherMiddleware
    from werkzeug.wrappers import Response

    front = Flask("front")

    @front.get("/pricing")
    def pricing() -> str:
        return "<html>prices</html>"

    site = AgentSightWSGIMiddleware(
        DispatcherMiddleware(front, {"/api": Response("api")}),
        widget_pages=["/pricing/"],
        tracker=RecordingTracker(),
    )
    told = _first_request(site, caplog)
    assert len(told) == 1, told
    assert "write '/pricing'" in told[0], told


# 4 (low): a first request with a Host Werkzeug cannot bind (a scanner's) lost the check
# for the whole process (BadHost, logged at debug).
def test_a_bad_host_on_the_first_request_does_not_lose_the_check(
    caplog: pytest.LogCaptureFixture,
) -> None:
    flask_app = _chat_page_and_api()
    flask_app.wsgi_app = AgentSightWSGIMiddleware(
        flask_app.wsgi_app, chat_routes=["POST /chat/"], tracker=RecordingTracker()
    )
    told = _first_request(flask_app, caplog, "/", headers={"Host": "a..b"})
    assert len(told) == 1, told
    assert "write 'POST /chat'" in told[0], told


# 5 (low, a missed near miss): a route's defaults were taken for path parameters, so the
# slash was not told for Flask's own idiom of a first page with defaults.
def test_a_route_s_defaults_are_no_path_parameters(caplog: pytest.LogCaptureFixture) -> None:
    from flask import Flask

    flask_app = Flask("blog")

    @flask_app.get("/blog/", defaults={"page": 1})
    @flask_app.get("/blog/page/<int:page>")
    def blog(page: int) -> str:
        return f"<html>{page}</html>"

    flask_app.wsgi_app = AgentSightWSGIMiddleware(  # type: ignore[method-assign]
        flask_app.wsgi_app, widget_pages=["/blog"], tracker=RecordingTracker()
    )
    told = _first_request(flask_app, caplog)
    assert len(told) == 1, told
    assert "write '/blog/'" in told[0], told


# Django: the example's URL conf ("" and "api/chat/").
@pytest.fixture
def django_app(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    monkeypatch.chdir(tmp_path)  # the example module keeps a local store in the cwd
    from examples.django_site.wsgi import create_application

    return create_application(tracker=RecordingTracker()).app


def _environ() -> dict[str, Any]:
    from werkzeug.test import EnvironBuilder

    return EnvironBuilder("/").get_environ()


# 6 (low-medium): django-hosts (ROOT_HOSTCONF) and django-tenants (PUBLIC_SCHEMA_URLCONF)
# route each host with its own URL conf (request.urlconf, set by their middleware);
# resolve() outside a request asks ROOT_URLCONF only, so a rule for another host's route
# was told to take ROOT_URLCONF's slash.
@pytest.mark.parametrize("setting", ["ROOT_HOSTCONF", "PUBLIC_SCHEMA_URLCONF"])
def test_django_urls_chosen_per_host_are_not_checked(django_app: Any, setting: str) -> None:
    from django.test import override_settings

    with override_settings(**{setting: "site.hosts"}):
        served = wsgi_served(django_app, _environ())
        told = (
            []
            if served is None
            else near_misses(RuleSet([], ["POST /api/chat"]).exact_matches, served)
        )
    assert told == [], told


# 7 (low, cost): Django's URLs do not know methods, yet a chat rule without methods was
# resolved once per method (5), then its other slash once per method again: ~0.5 ms a
# resolve() on a 1,000-route URL conf, 60-140 ms at the first request for 20 such rules.
def test_django_resolves_a_path_once(django_app: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import django.urls

    calls: list[str] = []
    resolve = django.urls.resolve

    def counting(path: str, *args: Any) -> Any:
        calls.append(path)
        return resolve(path, *args)

    monkeypatch.setattr(django.urls, "resolve", counting)
    served = wsgi_served(django_app, _environ())
    assert served is not None
    assert near_misses(RuleSet([], ["/nowhere"]).exact_matches, served) == []
    assert sorted(calls) == ["/nowhere", "/nowhere/"], calls


# 8 (low, a missed near miss): the extra keyword arguments a path() passes its view
# ({"template_name": ...}, sitemaps) were taken for path parameters.
def test_django_extra_kwargs_are_no_path_parameters(
    django_app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import django.urls
    from django.urls import ResolverMatch

    resolve = django.urls.resolve

    def with_extra(path: str, *args: Any) -> Any:
        found = resolve(path, *args)
        return ResolverMatch(
            found.func, (), {"template_name": "x.html"}, extra_kwargs={"template_name": "x.html"}
        )

    monkeypatch.setattr(django.urls, "resolve", with_extra)
    served = wsgi_served(django_app, _environ())
    assert served is not None
    told = near_misses(RuleSet(["/api/chat"], []).exact_matches, served)
    assert len(told) == 1, told
    assert "write '/api/chat/'" in told[0], told


# ASGI servers without a lifespan: the first tracked request checks.
def test_django_asgi_is_checked_at_the_first_tracked_request(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Django's ASGI handler takes no lifespan (uvicorn says "unsupported" and goes on), so
    # the lifespan's start never comes: before this, nothing was checked under Django ASGI.
    monkeypatch.chdir(tmp_path)  # the example module keeps a local store in the cwd
    from examples.django_site.asgi import create_application

    caplog.clear()
    app = create_application(tracker=RecordingTracker())
    with caplog.at_level(logging.WARNING), uvicorn_server(app) as url:
        assert httpx.get(url + "/").status_code == 200
    assert _rule_warnings(caplog) == []  # the example's own rules are right
    # Behind a proxy that strips /site (the rules name the path the client sends).
    mistaken = AgentSightMiddleware(
        app.app,
        widget_pages=["/site/"],
        chat_routes=["POST /site/api/chat"],
        tracker=RecordingTracker(),
    )
    with caplog.at_level(logging.WARNING), uvicorn_server(mistaken, root_path="/site") as url:
        # Untracked, but the first request under a root path: checked now (routereview2 A).
        assert httpx.get(url + "/api/chat/").status_code == 200  # (the view takes GET too)
        told = _rule_warnings(caplog)
        assert httpx.get(url + "/").status_code == 200  # tracked
        assert httpx.get(url + "/").status_code == 200
        assert _rule_warnings(caplog) == told  # once
    assert len(told) == 1, told
    assert "'POST /site/api/chat'" in told[0], told
    assert "write 'POST /site/api/chat/'" in told[0], told


def test_a_starlette_app_served_without_a_lifespan_is_checked_too(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = _shop()
    app.add_middleware(
        AgentSightMiddleware,
        widget_pages=["/pricing"],
        chat_routes=["GET /api/chat"],
        tracker=RecordingTracker(),
    )
    with caplog.at_level(logging.WARNING), uvicorn_server(app, lifespan="off") as url:
        assert _rule_warnings(caplog) == []
        assert httpx.get(url + "/pricing").status_code == 200
    told = _rule_warnings(caplog)
    assert len(told) == 1, told
    assert "takes POST, not GET" in told[0], told


# A FastAPI sub-app mounted at /api gets no lifespan (Starlette's router does not pass it
# on), the very case the first-tracked-request check is for; its rules name the path the
# client sends (/api/...), yet the check asked the sub-app's routes with that path and no
# root_path: no route ever matched, nothing was told.
def test_a_mounted_sub_app_is_checked_under_its_mount(caplog: pytest.LogCaptureFixture) -> None:
    api = FastAPI()

    @api.get("/pricing", response_class=HTMLResponse)
    def pricing() -> str:
        return "<html>prices</html>"

    @api.post("/chat")
    def chat() -> dict[str, str]:
        return {"reply": "hi"}

    api.add_middleware(
        AgentSightMiddleware,
        widget_pages=["/api/pricing/"],
        chat_routes=["GET /api/chat"],
        tracker=RecordingTracker(),
    )
    site = Starlette(routes=[Mount("/api", app=api)])
    with caplog.at_level(logging.WARNING), uvicorn_server(site) as url:
        assert _rule_warnings(caplog) == []  # no lifespan reached the sub-app
        assert httpx.get(url + "/api/pricing/").status_code == 307  # tracked: checked
    told = _rule_warnings(caplog)
    assert len(told) == 2, told
    assert any("write '/api/pricing'" in line for line in told), told
    assert any("takes POST, not GET" in line for line in told), told


# The middleware on the main app, a sub-app mounted beside its own routes (app.mount("/shop",
# sub), Mount("/star", routes=[...])): the Mount matches every path below it, so each rule
# there was taken as served, and the sub-apps' near misses went untold.
def test_rules_under_a_mount_are_checked_against_the_mounted_app_s_routes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    shop = FastAPI()

    @shop.get("/item", response_class=HTMLResponse)
    def item() -> str:
        return "<html>item</html>"

    @shop.post("/chat")
    def chat() -> dict[str, str]:
        return {"reply": "hi"}

    async def star_chat(request: Any) -> PlainTextResponse:
        return PlainTextResponse("hi")

    app = _shop()
    app.mount("/shop", shop)
    app.mount("/star", Router(routes=[Route("/chat", star_chat, methods=["POST"])]))
    app.add_middleware(
        AgentSightMiddleware,
        widget_pages=["/shop/item/", "/shop/item", "/star/chat"],
        chat_routes=["POST /shop/chat", "POST /star/chat/"],
        tracker=RecordingTracker(),
    )
    with caplog.at_level(logging.WARNING), uvicorn_server(app) as url:
        assert httpx.get(url + "/shop/item").status_code == 200  # the app itself is untouched
    told = _rule_warnings(caplog)
    assert len(told) == 3, told
    assert any("'/shop/item/'" in line and "write '/shop/item'" in line for line in told), told
    assert any("'/star/chat'" in line and "takes POST, not GET" in line for line in told), told
    assert any("'POST /star/chat/'" in line and "write 'POST /star/chat'" in line for line in told)


# The same under uvicorn --root-path (rules written with the root path). With a lifespan
# (routereview G), whose scope has no root_path, the start-up check asked without it and
# these rules went untold; and with every rule a near miss (routereview2 A), the site's
# own requests match none, so a check waiting for a tracked request never ran: the first
# request under a root path checks, tracked or not.
@pytest.mark.parametrize("first", ["tracked", "untracked"])
@pytest.mark.parametrize("lifespan", ["off", "on"])
def test_a_starlette_app_under_a_root_path_is_checked(
    lifespan: str, first: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = _shop()
    app.add_middleware(
        AgentSightMiddleware,
        widget_pages=["/site/pricing/"],
        chat_routes=["GET /site/api/chat"],
        tracker=RecordingTracker(),
    )
    with (
        caplog.at_level(logging.WARNING),
        uvicorn_server(app, root_path="/site", lifespan=lifespan) as url,
    ):
        assert _rule_warnings(caplog) == []  # the lifespan knows no root path
        for _ in range(2):  # told once
            if first == "tracked":
                # The proxy strips /site: "/pricing/" reaches uvicorn, the app sees
                # "/site/pricing/", which the widget rule matches.
                assert httpx.get(url + "/pricing/").status_code == 307
            else:
                assert httpx.get(url + "/pricing").status_code == 200
                assert httpx.post(url + "/api/chat").status_code == 200
    told = _rule_warnings(caplog)
    assert len(told) == 2, told
    assert any("write '/site/pricing'" in line for line in told), told
    assert any(
        "takes POST, not GET" in line and "write 'POST /site/api/chat'" in line for line in told
    ), told


def _shop_with_home(widget: list[str], chat: list[str]) -> FastAPI:
    app = _shop()

    @app.get("/", response_class=HTMLResponse)
    def home() -> str:
        return "<html>home</html>"

    app.add_middleware(
        AgentSightMiddleware, widget_pages=widget, chat_routes=chat, tracker=RecordingTracker()
    )
    return app


# routereview2 B: rules written with the app's own route paths under uvicorn --root-path
# match no request (the middleware puts /site before every path), yet the check asked
# Starlette, which matches a path outside root_path whole, and advised "write '/pricing'",
# "write 'POST /api/chat'": rules as dead as before.
def test_rules_outside_the_root_path_are_told_so(caplog: pytest.LogCaptureFixture) -> None:
    app = _shop_with_home(["/site/", "/pricing/"], ["GET /api/chat"])
    with (
        caplog.at_level(logging.WARNING),
        uvicorn_server(app, root_path="/site", lifespan="off") as url,
    ):
        assert httpx.get(url + "/").status_code == 200  # tracked: checked
        assert httpx.get(url + "/pricing").status_code == 200  # (what the rule wanted)
    told = _rule_warnings(caplog)
    assert len(told) == 2, told
    assert any("'/pricing/'" in line and "write '/site/pricing/'" in line for line in told), told
    assert any("'GET /api/chat'" in line and "write 'GET /site/api/chat'" in line for line in told)
    assert not any("write '/pricing'" in line or "'POST /api/chat'" in line for line in told), told


@pytest.mark.parametrize("lifespan", ["off", "on"])
@pytest.mark.parametrize("root_path", ["/site", "/site/"])
def test_right_rules_under_a_root_path_say_nothing(
    root_path: str, lifespan: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = _shop_with_home(["/site/", "/site/pricing"], ["POST /site/api/chat"])
    with (
        caplog.at_level(logging.WARNING),
        uvicorn_server(app, root_path=root_path, lifespan=lifespan) as url,
    ):
        assert httpx.get(url + "/pricing").status_code == 200
        assert httpx.get(url + "/").status_code == 200
    assert _rule_warnings(caplog) == []


# Guards for the first-request check (each failed with the change it names).
# Without its try/except, the first tracked request failed.
def test_a_check_that_fails_at_the_first_tracked_request_does_not_fail_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Strict:
        def __getattr__(self, name: str) -> Any:
            raise KeyError(name)

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            assert scope["type"] == "http"  # no lifespan: the check runs at a request
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

    app = AgentSightMiddleware(Strict(), widget_pages=["/"], tracker=RecordingTracker())
    with caplog.at_level(logging.DEBUG), uvicorn_server(app, lifespan="off") as url:
        for _ in range(2):
            assert httpx.get(url + "/").text == "ok"
    assert any("compare the rules" in r.getMessage() for r in caplog.records)


# Had the lifespan's check left the flag set: told twice, at start and at the first
# tracked request.
def test_with_a_lifespan_the_first_tracked_request_does_not_check_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = _shop()
    app.add_middleware(AgentSightMiddleware, widget_pages=["/pricing/"], tracker=RecordingTracker())
    with caplog.at_level(logging.WARNING), uvicorn_server(app) as url:
        assert len(_rule_warnings(caplog)) == 1  # at the lifespan's start
        assert httpx.get(url + "/pricing/").status_code == 307  # tracked
    assert len(_rule_warnings(caplog)) == 1


# Django's class-based views know their methods (View.dispatch finds a handler by name).
def test_django_class_based_views_have_their_methods_told(
    caplog: pytest.LogCaptureFixture, django_app: Any
) -> None:
    from django.test import override_settings

    # The handler reads ROOT_URLCONF at each request, so the example's serves these views.
    with override_settings(ROOT_URLCONF="tests.apps.django_views_urls"):
        app = AgentSightWSGIMiddleware(
            django_app,
            widget_pages=["/pricing/", "/api/chat/"],
            # A PUT rule for a POST view; GET rules for a view with a dispatch() of its
            # own and a function view (both may take it); a slash missing.
            chat_routes=["PUT /api/chat/", "GET /own/", "GET /function/", "POST /pricing"],
            tracker=RecordingTracker(),
        )
        with caplog.at_level(logging.WARNING), _serve_wsgi(app) as url:
            assert httpx.get(url + "/pricing/").status_code == 200
            assert httpx.post(url + "/api/chat/").json() == {"reply": "hi"}
    told = _rule_warnings(caplog)
    assert len(told) == 3, told
    assert any(
        "chat_routes rule 'PUT /api/chat/'" in line
        and "takes POST, not PUT" in line  # (and OPTIONS: not named)
        and "write 'POST /api/chat/'" in line
        for line in told
    ), told
    assert any(
        "widget_pages rule '/api/chat/'" in line and "widget rules match GET only" in line
        for line in told
    ), told
    # The slash is told first, as for every framework, with the methods the view there
    # takes: "write 'POST /pricing/'" named a rule the GET-only view answers with 405.
    assert any("'POST /pricing'" in line and "write 'GET /pricing/'" in line for line in told), told


# Review of the class-based view check (cbvreview).
def _cbv_told(django_app: Any, widget: list[str], chat: list[str]) -> list[str]:
    from django.test import override_settings

    with override_settings(ROOT_URLCONF="tests.apps.django_views_urls"):
        served = wsgi_served(django_app, _environ())
        assert served is not None
        return near_misses(RuleSet(widget, chat).exact_matches, served)


# A (medium, false warning): as_view(http_method_names=[...]) sets the instance's list,
# which View.dispatch reads; the class's was read, so POST was "not taken".
def test_django_as_view_http_method_names_are_the_view_s(django_app: Any) -> None:
    assert _cbv_told(django_app, [], ["POST /widened/"]) == []
    told = _cbv_told(django_app, [], ["GET /narrowed/"])  # the narrowed one: told too
    assert len(told) == 1, told
    assert "takes POST, not GET" in told[0], told


# B (low, false warning): handlers View.dispatch finds on the instance (set in setup() or
# __init__), or a 405 handler that serves, were not seen: not guessed now.
@pytest.mark.parametrize("path", ["/in-setup/", "/in-init/", "/any-method/"])
def test_django_views_with_handlers_of_their_own_are_not_guessed(
    django_app: Any, path: str
) -> None:
    assert _cbv_told(django_app, [], [f"POST {path}"]) == []


# C (low, a missed near miss): Django's dispatch() under method_decorator(csrf_exempt,
# name="dispatch"), the usual form of a JSON chat view, is Django's: its methods are told.
def test_django_method_decorated_dispatch_is_django_s(django_app: Any) -> None:
    told = _cbv_told(django_app, [], ["GET /exempt/"])
    assert len(told) == 1, told
    assert "takes POST, not GET" in told[0], told
    assert "write 'POST /exempt/'" in told[0], told


def test_a_route_answering_only_options_gets_no_method_advice() -> None:
    # "write 'OPTIONS /api/chat'" named a rule the middleware refuses at start-up.
    routes = [Route("/api/chat", _page, methods=["OPTIONS"]), Route("/page/", _page)]
    assert _near_misses(routes, [], ["POST /api/chat"]) == []
    # The slash is still told where the other path has a route.
    told = _near_misses(routes, ["/page"], [])
    assert len(told) == 1, told
    assert "write '/page/'" in told[0], told


# A GET catch-all (a single-page app's "/{path:path}") takes every path: its GET is no
# advice for a chat rule ("write 'GET /api/chat'" would count page loads as chats).
def test_a_catch_all_gives_no_method_advice_the_slash_still_told() -> None:
    routes = [Route("/api/chat/", _page, methods=["POST"]), Route("/{path:path}", _page)]
    told = _near_misses(routes, [], ["POST /api/chat"])
    assert len(told) == 1, told
    assert "one serves '/api/chat/'" in told[0], told
    assert "write 'POST /api/chat/'" in told[0], told
    assert "GET" not in told[0], told
    # A rule whose path only the catch-all knows: nothing to say, as for any unknown path.
    assert _near_misses(routes, [], ["POST /api/talk"]) == []
    # The route's own methods are still told, without the catch-all's.
    routes = [Route("/api/chat", _page, methods=["PUT"]), Route("/{path:path}", _page)]
    told = _near_misses(routes, [], ["POST /api/chat"])
    assert len(told) == 1, told
    assert "takes PUT, not POST" in told[0], told
    assert "write 'PUT /api/chat'" in told[0], told


def test_flask_catch_all_gives_no_method_advice(caplog: pytest.LogCaptureFixture) -> None:
    from flask import Flask

    flask_app = Flask("spa")

    @flask_app.post("/api/chat/")
    def chat() -> dict[str, str]:
        return {"reply": "hi"}

    @flask_app.get("/", defaults={"path": ""})
    @flask_app.get("/<path:path>")
    def spa(path: str) -> str:
        return "<html>app</html>"

    flask_app.wsgi_app = AgentSightWSGIMiddleware(  # type: ignore[method-assign]
        flask_app.wsgi_app,
        widget_pages=["/"],
        chat_routes=["POST /api/chat", "POST /api/talk", "PUT /api/chat/"],
        tracker=RecordingTracker(),
    )
    told = _first_request(flask_app, caplog)
    # The slash for the first; nothing for a path only the catch-all serves; the third
    # rule's route takes POST: the route's own methods, not the catch-all's GET as well.
    assert len(told) == 2, told
    slash = next(line for line in told if "'POST /api/chat'" in line)
    assert "write 'POST /api/chat/'" in slash, slash
    method = next(line for line in told if "'PUT /api/chat/'" in line)
    assert "takes POST, not PUT" in method, method
    assert "write 'POST /api/chat/'" in method, method


# Litestar: its public Litestar.routes, at the lifespan's start (or the first tracked
# request without one). It serves a path with or without its trailing slash alike.
def _litestar_shop() -> Any:
    from litestar import Litestar, Router, asgi, get, post
    from litestar.params import FromPath

    @get("/pricing", media_type="text/html")
    async def pricing() -> str:
        return "<html>prices</html>"

    @post("/chat/", status_code=200)
    async def chat() -> dict[str, str]:
        return {"reply": "hi"}

    @get("/items/{item_id:int}")
    async def item(item_id: FromPath[int]) -> str:
        return str(item_id)

    @post("/upload/{rest:path}")
    async def upload(rest: FromPath[str]) -> str:
        return rest

    @asgi("/files", is_mount=True, copy_scope=True)
    async def files(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"file"})

    @post("/feedback")
    async def feedback() -> None:
        return None

    api = Router("/api", route_handlers=[chat, feedback])
    # No logging config: Litestar's would replace the root logger's handlers, pytest's too.
    return Litestar(route_handlers=[pricing, item, upload, files, api], logging_config=None)


@pytest.mark.parametrize("lifespan", ["on", "off"])
def test_litestar_methods_are_told_at_start_up(
    lifespan: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = AgentSightMiddleware(
        _litestar_shop(),
        # Right (the slash too: Litestar serves /pricing/), a route with parameters, a
        # mount: nothing. Wrong methods: told, with the route's own methods.
        widget_pages=["/pricing/", "/items/7", "/files/a.txt", "/api/feedback"],
        chat_routes=["GET /api/chat", "POST /upload/a/b", "PUT /pricing", "POST /nowhere"],
        tracker=RecordingTracker(),
    )
    with caplog.at_level(logging.WARNING), uvicorn_server(app, lifespan=lifespan) as url:
        if lifespan == "on":
            assert len(_rule_warnings(caplog)) == 3  # before any request
        assert httpx.get(url + "/pricing/").text == "<html>prices</html>"  # untouched
        assert httpx.post(url + "/api/chat").json() == {"reply": "hi"}
        assert httpx.get(url + "/files/a.txt").text == "file"
    told = _rule_warnings(caplog)
    assert len(told) == 3, told
    widget = next(line for line in told if "widget_pages rule '/api/feedback'" in line)
    assert "widget rules match GET only" in widget, widget
    chat = next(line for line in told if "'GET /api/chat'" in line)
    assert "takes POST, not GET" in chat, chat
    assert "write 'POST /api/chat'" in chat, chat
    put = next(line for line in told if "'PUT /pricing'" in line)
    assert "write 'GET /pricing'" in put, put


def test_litestar_routes_are_asked_under_the_root_path() -> None:
    from agentsight_middleware._routes import litestar_served

    wrapped = AgentSightMiddleware(_litestar_shop(), widget_pages=["/"], tracker=RecordingTracker())
    served = litestar_served(wrapped)  # found through the layers around it
    assert served is not None
    assert served("/api/chat", "POST", True) == (True, set())
    assert served("/items/abc", "GET", False) == (True, set())  # its shape: not guessed
    assert served("/items/7", "GET", True) == (False, set())  # no route without parameters
    assert served("/api/chat", "GET", True) == (False, {"POST", "OPTIONS"})
    under = litestar_served(_litestar_shop(), "/shop/")
    assert under is not None
    assert under("/shop/api/chat/", "POST", True) == (True, set())
    assert under("/api/chat", "POST", False) == (False, set())  # outside the root path
    assert litestar_served(_shop()) is None  # not Litestar


# Review of the catch-all change (routereview).
# A (medium, wrong advice): the slash advice kept the rule's methods where the route at
# the other path takes others: "GET /api/chat" for a POST "/api/chat/" was told "write
# 'GET /api/chat/'", a rule the app answers with 405 (the next start said so again).
def test_the_slash_advice_names_the_methods_taken_there() -> None:
    routes = [
        Route("/api/chat/", _page, methods=["POST"]),
        Route("/chat/", _page),
        Route("/talk/", _page),
        Route("/feedback/", _page, methods=["POST"]),
    ]
    told = _near_misses(routes, ["/feedback"], ["GET /api/chat", "POST /chat", "/talk"])
    assert len(told) == 4, told
    chat = next(line for line in told if "rule 'GET /api/chat'" in line)
    assert "write 'POST /api/chat/'" in chat, chat
    page = next(line for line in told if "rule 'POST /chat'" in line)
    assert "write 'GET /chat/'" in page, page
    anything = next(line for line in told if "rule '/talk'" in line)
    assert "write '/talk/'" in anything, anything  # a rule without methods: as it was
    widget = next(line for line in told if "widget_pages rule '/feedback'" in line)
    assert "it takes POST: widget rules match GET only" in widget, widget
    assert "write" not in widget, widget


# B (medium, a missed near miss the old check caught): methods came only from routes
# without parameters, so "GET /api/agents/sales/chat" for POST /api/agents/{agent}/chat
# (405) was no longer told. A route with parameters names its methods again unless it
# also takes a path no app routes (a catch-all).
def test_a_route_with_parameters_names_its_methods_a_catch_all_does_not() -> None:
    agent = Route("/api/agents/{agent}/chat", _page, methods=["POST"])
    told = _near_misses([agent], [], ["GET /api/agents/sales/chat"])
    assert len(told) == 1, told
    assert "write 'POST /api/agents/sales/chat'" in told[0], told
    # Behind a catch-all that takes GET there: served, nothing to say; under PUT, the
    # agent route's POST only.
    routes = [agent, Route("/{path:path}", _page)]
    assert _near_misses(routes, [], ["GET /api/agents/sales/chat"]) == []
    told = _near_misses(routes, [], ["PUT /api/agents/sales/chat"])
    assert len(told) == 1, told
    assert "takes POST, not PUT" in told[0], told
    # Catch-alls name no methods: any path below, or a top-level one beside.
    for catch_all in ("/{path:path}", "/{slug}"):
        routes = [Route(catch_all, _page, methods=["GET"])]
        assert _near_misses(routes, [], ["POST /chat"]) == [], catch_all
    # Under a root path too.
    served = starlette_served([agent, Route("/{path:path}", _page, methods=["PUT"])], "/app")
    told = near_misses(RuleSet([], ["GET /app/api/agents/a/chat"]).exact_matches, served)
    assert len(told) == 1, told
    assert "takes POST, not GET" in told[0], told


def test_flask_routes_with_parameters_name_their_methods() -> None:
    from flask import Flask

    flask_app = Flask("items")

    @flask_app.post("/items/<int:n>")
    def item(n: int) -> str:
        return str(n)

    served = wsgi_served(flask_app.wsgi_app, {"SCRIPT_NAME": ""})
    assert served is not None
    told = near_misses(RuleSet([], ["GET /items/7"]).exact_matches, served)
    assert len(told) == 1, told
    assert "write 'POST /items/7'" in told[0], told


# C (medium, wrong advice): Django's SPA catch-all re_path(r"^.*$", ...) has no group,
# so it was taken for a route written for the path: "POST /api/chat" was told "write
# 'GET /api/chat'" (the SPA's page), and "GET /api/agents/sales/chat" "write 'GET
# /api/agents/sales/chat/'" (the SPA again).
def test_django_regex_catch_all_is_no_route_of_the_path(django_app: Any) -> None:
    from django.test import override_settings

    rules = RuleSet([], ["POST /api/chat", "GET /api/agents/sales/chat", "PUT /api/chat/"])
    with override_settings(ROOT_URLCONF="tests.apps.django_spa_urls"):
        served = wsgi_served(django_app, _environ())
        assert served is not None
        told = near_misses(rules.exact_matches, served)
        # A re_path() of a literal regex is a route of its path; the catch-all is not.
        assert served("/robots.txt", "GET", True) == (True, set())
        assert served("/robots.txt/", "GET", True) == (False, set())
    assert len(told) == 3, told
    slash = next(line for line in told if "rule 'POST /api/chat'" in line)
    assert "write 'POST /api/chat/'" in slash, slash
    agent = next(line for line in told if "rule 'GET /api/agents/sales/chat'" in line)
    assert "write 'POST /api/agents/sales/chat'" in agent, agent
    put = next(line for line in told if "rule 'PUT /api/chat/'" in line)
    assert "write 'POST /api/chat/'" in put, put


# D (medium, a missed near miss): Litestar answers a path of a route without parameters
# from that route alone (405 for other methods), whatever catch-all also takes it; the
# catch-all was taken to serve it, so an SPA's "GET /api/chat" was never told. And a
# HEAD-only route made a slash warning Litestar cannot have ("write 'POST /probe/'").
def test_litestar_a_plain_route_decides_its_path() -> None:
    from litestar import Litestar, get, head, post
    from litestar.params import FromPath

    from agentsight_middleware._routes import litestar_served

    @get("/{p:path}", media_type="text/html")
    async def spa(p: FromPath[str]) -> str:
        return "<html>app</html>"

    @post("/api/chat", status_code=200)
    async def chat() -> dict[str, str]:
        return {"reply": "hi"}

    @head("/probe")
    async def probe() -> None:
        return None

    app = Litestar(route_handlers=[spa, chat, probe], logging_config=None, openapi_config=None)
    served = litestar_served(app)
    assert served is not None
    assert served("/api/chat", "GET", False) == (False, {"POST", "OPTIONS"})
    assert served("/elsewhere", "GET", False) == (True, set())
    told = near_misses(RuleSet([], ["GET /api/chat", "POST /probe"]).exact_matches, served)
    assert len(told) == 1, told
    assert "write 'POST /api/chat'" in told[0], told


def _spa(chat_path: str, files: Any) -> FastAPI:
    """A chat API and, mounted at "/", the single-page app's files."""
    app = FastAPI()

    @app.post(chat_path)
    def chat() -> dict[str, str]:
        return {"reply": "hi"}

    app.mount("/", files)
    return app


def _starlette_told(app: Any, widget: list[str], chat: list[str]) -> list[str]:
    routes = starlette_routes(app)
    assert routes is not None
    return near_misses(RuleSet(widget, chat).exact_matches, starlette_served(routes))


# F (routereview, older than the catch-all change): a Mount counted as serving every
# method, so the most common FastAPI SPA, StaticFiles mounted at "/", hid every near miss
# of the API's rules, while the app answers 405 to them (StaticFiles takes GET and HEAD).
def test_static_files_mounted_at_the_root_hide_no_near_miss(tmp_path: Path) -> None:
    from fastapi.staticfiles import StaticFiles

    (tmp_path / "index.html").write_text("<html>app</html>")
    app = _spa("/api/chat/", StaticFiles(directory=tmp_path, html=True))
    with uvicorn_server(app) as url:  # what the app answers, which the warning must say
        assert httpx.post(url + "/api/chat").status_code == 405
        assert httpx.post(url + "/api/chat/").status_code == 200
        assert httpx.put(url + "/api/chat/").status_code == 405
        assert httpx.get(url + "/pricing").status_code == 404
    told = _starlette_told(app, ["/", "/pricing"], ["POST /api/chat", "PUT /api/chat/"])
    assert len(told) == 2, told  # "/" is the SPA's page; "/pricing" is no route's at all
    slash = next(line for line in told if "rule 'POST /api/chat'" in line)
    assert "write 'POST /api/chat/'" in slash, slash
    method = next(line for line in told if "rule 'PUT /api/chat/'" in line)
    assert "takes POST, not PUT" in method, method
    assert "GET" not in method, method  # the files' methods are no advice


# routereview2 C: StaticFiles answered every GET in the check, so at its mount the GET
# rules' near misses stayed hidden ("GET /api/chat" for a POST route, a directory's
# missing slash) while it answers 404 where it has no file, 307 to a directory's slash.
def test_static_files_answer_a_get_only_where_they_have_a_file(tmp_path: Path) -> None:
    from fastapi.staticfiles import StaticFiles

    (tmp_path / "index.html").write_text("<html>app</html>")
    (tmp_path / "guide").mkdir()
    (tmp_path / "guide" / "index.html").write_text("<html>guide</html>")

    class SPA(StaticFiles):  # answers its index.html for any path: not asked
        pass

    for files in (StaticFiles, SPA):
        app = _spa("/api/chat", files(directory=tmp_path, html=True))
        if files is StaticFiles:
            with uvicorn_server(app) as url:  # what the warnings must say
                assert httpx.get(url + "/api/chat").status_code == 404
                assert httpx.get(url + "/guide").status_code == 307
                assert httpx.get(url + "/guide/").status_code == 200
                assert httpx.get(url + "/").status_code == 200
        told = _starlette_told(app, ["/", "/guide"], ["GET /api/chat", "POST /api/nothing"])
        if files is SPA:
            assert told == [], told
            continue
        assert len(told) == 2, told  # no route takes /api/nothing: no advice
        method = next(line for line in told if "rule 'GET /api/chat'" in line)
        assert "takes POST, not GET" in method, method
        slash = next(line for line in told if "rule '/guide'" in line)
        assert "write '/guide/'" in slash, slash


# Django REST framework: APIView.dispatch finds handlers as Django's View.dispatch does, and
# a ViewSet's route has its methods in the actions the router gave it (none was guessed).
def _drf_told(django_app: Any, chat: list[str]) -> list[str]:
    from django.test import override_settings

    with override_settings(ROOT_URLCONF="tests.apps.django_drf_urls"):
        served = wsgi_served(django_app, _environ())
        assert served is not None
        return near_misses(RuleSet([], chat).exact_matches, served)


@pytest.mark.parametrize(
    ("rule", "takes"),
    [
        ("PUT /api/chat/", "POST"),  # an APIView with post()
        ("GET /api/function-chat/", "POST"),  # @api_view(["POST"])
        ("PUT /api/messages/", "GET, POST"),  # a ViewSet's list and create
    ],
)
def test_drf_views_methods_are_told(django_app: Any, rule: str, takes: str) -> None:
    told = _drf_told(django_app, [rule])
    assert len(told) == 1, told
    method = rule.split()[0]
    assert f"takes {takes}, not {method}" in told[0], told


@pytest.mark.parametrize(
    "rule", ["POST /api/chat/", "POST /api/function-chat/", "POST /api/messages/", "PUT /api/own/"]
)
def test_drf_views_taking_the_rule_s_method_or_not_guessed_are_not_told(
    django_app: Any, rule: str
) -> None:
    assert _drf_told(django_app, [rule]) == []


def test_drf_chat_view_is_tracked(django_app: Any) -> None:
    from django.test import override_settings

    tracker = RecordingTracker()
    app = AgentSightWSGIMiddleware(django_app, chat_routes=["POST /api/chat/"], tracker=tracker)
    # No django.contrib.auth in the example: DRF's anonymous user is its model's.
    with (
        override_settings(
            ROOT_URLCONF="tests.apps.django_drf_urls", REST_FRAMEWORK={"UNAUTHENTICATED_USER": None}
        ),
        _serve_wsgi(app) as url,
    ):
        answer = httpx.post(url + "/api/chat/", json={"conversation_id": "conv_0123456789ab"})
    assert answer.json() == {"reply": "hi"}
    assert app.flush(5)
    assert [call["conversation_id"] for call in tracker.used] == ["conv_0123456789ab"]
