"""Every example app, driven like a visitor would: load the page, then chat.

The demo also runs under a real uvicorn server on 127.0.0.1, and the Django
project under Werkzeug's real WSGI server.
"""

from __future__ import annotations

import ast
import asyncio
import importlib
import logging
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from werkzeug.serving import make_server
from werkzeug.test import Client

from agentsight_middleware import AgentSightMiddleware, AgentSightWSGIMiddleware
from agentsight_middleware.testing import RecordingTracker

from .conftest import BROWSER, uvicorn_server


def _check(tracker: RecordingTracker, page_cookie: str, chat_json: dict[str, Any]) -> None:
    conversation_id = page_cookie.split(";")[0].split("=", 1)[1]
    tracker.wait_for(initialized=1, used=1)
    assert tracker.initialized[0]["conversation_id"] == conversation_id
    assert tracker.used[0]["conversation_id"] == conversation_id
    assert chat_json["conversation_id"] == conversation_id
    assert chat_json["reply"] == "You said: hello"


ASGI_EXAMPLES = {
    "demo (FastAPI)": lambda t: importlib.import_module("examples.demo").create_app(tracker=t),
    "starlette": lambda t: importlib.import_module("examples.starlette_app").create_app(tracker=t),
    "django asgi": lambda t: importlib.import_module(
        "examples.django_site.asgi"
    ).create_application(tracker=t),
    "litestar": lambda t: importlib.import_module("examples.litestar_app").create_app(tracker=t),
}


@pytest.mark.anyio
@pytest.mark.parametrize("name", list(ASGI_EXAMPLES))
async def test_asgi_examples(name: str, tracker: RecordingTracker) -> None:
    app = ASGI_EXAMPLES[name](tracker)
    chat_path = "/api/chat/" if "django" in name else "/api/chat"
    transport = httpx.ASGITransport(app=app, client=("198.51.100.1", 1234))
    async with httpx.AsyncClient(transport=transport, base_url="http://shop.test") as client:
        page = await client.get("/", headers=BROWSER)
        assert page.status_code == 200
        assert "chat-form" in page.text
        chat = await client.post(chat_path, json={"message": "hello"})
    _check(tracker, page.headers["set-cookie"], chat.json())


WSGI_EXAMPLES: dict[str, Callable[[RecordingTracker], Any]] = {
    "flask": lambda t: importlib.import_module("examples.flask_app").create_app(tracker=t),
    "django wsgi": lambda t: importlib.import_module(
        "examples.django_site.wsgi"
    ).create_application(tracker=t),
}


@pytest.mark.parametrize("name", list(WSGI_EXAMPLES))
def test_wsgi_examples(name: str, tracker: RecordingTracker) -> None:
    app = WSGI_EXAMPLES[name](tracker)
    chat_path = "/api/chat/" if "django" in name else "/api/chat"
    client = Client(app)
    page = client.get("/", headers=BROWSER)
    assert page.status_code == 200
    assert "chat-form" in page.get_data(as_text=True)
    chat = client.post(chat_path, json={"message": "hello"})
    _check(tracker, page.headers["Set-Cookie"], chat.get_json())


@pytest.fixture
def uvicorn_demo(tracker: RecordingTracker) -> Iterator[str]:
    from examples.demo import create_app

    with uvicorn_server(create_app(tracker=tracker)) as url:
        yield url


def test_demo_under_real_uvicorn(uvicorn_demo: str, tracker: RecordingTracker) -> None:
    with httpx.Client(base_url=uvicorn_demo) as client:
        page = client.get("/", headers=BROWSER)
        chat = client.post("/api/chat", json={"message": "hello"})
    _check(tracker, page.headers["set-cookie"], chat.json())
    assert tracker.initialized[0]["customer_ip_address"] == "127.0.0.1"


def test_concurrent_visitors_under_real_uvicorn(
    uvicorn_demo: str, tracker: RecordingTracker
) -> None:
    async def visitor(client: httpx.AsyncClient) -> tuple[str, str]:
        page = await client.get("/", headers=BROWSER)
        chat = await client.post("/api/chat", json={"message": "hello"})
        return page.cookies["agentsight_conversation_id"], chat.json()["conversation_id"]

    async def crowd() -> list[tuple[str, str]]:
        clients = [httpx.AsyncClient(base_url=uvicorn_demo) for _ in range(12)]
        try:
            return await asyncio.gather(*(visitor(c) for c in clients))
        finally:
            for c in clients:
                await c.aclose()

    pairs = asyncio.run(crowd())
    assert all(page_id == chat_id for page_id, chat_id in pairs)
    assert len({page_id for page_id, _ in pairs}) == 12
    tracker.wait_for(initialized=12, used=12)
    assert {c["conversation_id"] for c in tracker.initialized} == {p for p, _ in pairs}
    assert {c["conversation_id"] for c in tracker.used} == {p for p, _ in pairs}


def test_django_under_real_wsgi_server(tracker: RecordingTracker) -> None:
    from examples.django_site.wsgi import create_application

    app = create_application(tracker=tracker)
    assert isinstance(app, AgentSightWSGIMiddleware)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{server.server_port}") as client:
            page = client.get("/", headers=BROWSER)
            chat = client.post("/api/chat/", json={"message": "hello"})
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    _check(tracker, page.headers["set-cookie"], chat.json())
    assert isinstance(AgentSightMiddleware, type)


def test_django_wsgi_keeps_the_cookie_the_app_sets_itself(tracker: RecordingTracker) -> None:
    # Django's WSGI handler sends " agentsight_conversation_id=..." (SimpleCookie's output
    # with a leading blank): our own cookie was added after it, and the browser kept ours.
    from django.test import override_settings

    from examples.django_site.wsgi import create_application

    with override_settings(ROOT_URLCONF="tests.apps.django_own_cookie_urls"):
        app = create_application(tracker=tracker)
        server = make_server("127.0.0.1", 0, app, threaded=True)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{server.server_port}") as client:
                page = client.get("/", headers=BROWSER)
                kept = client.cookies.get("agentsight_conversation_id")
        finally:
            server.shutdown()
            server.server_close()
            thread.join(5)
    assert page.status_code == 200
    assert len(page.headers.get_list("set-cookie")) == 1  # the app's, and no second one
    assert kept == "conv_restored0001"
    tracker.wait_for(initialized=1)
    assert [
        (c["conversation_id"], c["metadata"]["conversation_id_source"]) for c in tracker.initialized
    ] == [("conv_restored0001", "app")]


def test_litestar_under_real_uvicorn(tracker: RecordingTracker) -> None:
    # The Litestar app wrapped as a whole; a chunked body must reach request.json() whole
    # after the peek, and Litestar's lifespan goes through the middleware.
    from examples.litestar_app import create_app

    def body() -> Iterator[bytes]:
        yield b'{"message": '
        yield b'"hello"}'

    with uvicorn_server(create_app(tracker=tracker)) as url, httpx.Client(base_url=url) as client:
        page = client.get("/", headers=BROWSER)
        chat = client.post(
            "/api/chat", content=body(), headers={"content-type": "application/json"}
        )
    assert chat.status_code == 201  # Litestar's default for POST, unchanged
    _check(tracker, page.headers["set-cookie"], chat.json())
    assert tracker.initialized[0]["customer_ip_address"] == "127.0.0.1"


def test_app_given_twice_or_not_at_all_is_a_clear_error() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("not called")

    with pytest.raises(TypeError, match="got the app twice"):
        AgentSightMiddleware(app, app=app, widget_pages=["/"])
    with pytest.raises(TypeError, match=r"needs the app it wraps"):
        AgentSightWSGIMiddleware(widget_pages=["/"])


@pytest.fixture
def fresh_instance_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """The count of live middlewares with the same rules, and its warning, from nothing."""
    from agentsight_middleware import _base

    monkeypatch.setattr(_base, "_instances", {})
    monkeypatch.setattr(_base, "_same_rules_warned", False)


def same_rules_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if "instances with the same rules" in r.getMessage()
    ]


@pytest.mark.usefixtures("fresh_instance_count")
def test_one_middleware_per_route_is_warned_about(
    tracker: RecordingTracker, caplog: pytest.LogCaptureFixture
) -> None:
    # Litestar's middleware=[DefineMiddleware(...)] builds one middleware per route: 62 for
    # 21 routes, each with its own queue and worker thread.
    from litestar import Litestar, get
    from litestar.middleware import DefineMiddleware

    def page(n: int) -> Any:
        @get(f"/p{n}", media_type="text/html", name=f"p{n}")
        async def handler() -> str:
            return "<p>page</p>"

        return handler

    with caplog.at_level(logging.WARNING, logger="agentsight_middleware"):
        app = Litestar(
            route_handlers=[page(n) for n in range(5)],
            middleware=[
                DefineMiddleware(AgentSightMiddleware, widget_pages=["/p*"], tracker=tracker)
            ],
        )
        with uvicorn_server(app) as url, httpx.Client(base_url=url) as client:
            for n in range(5):
                assert client.get(f"/p{n}", headers=BROWSER).status_code == 200
    warnings = same_rules_warnings(caplog)
    assert len(warnings) == 1
    assert "Wrap the whole app once instead" in warnings[0]


@pytest.mark.usefixtures("fresh_instance_count")
def test_an_app_built_per_test_is_not_taken_for_one_middleware_per_route(
    tracker: RecordingTracker, caplog: pytest.LogCaptureFixture
) -> None:
    # A test suite's app factory builds one middleware per test, each dropped before the
    # next: the warning counted the dropped ones too, and blamed per-route building.
    import gc

    from starlette.applications import Starlette

    with caplog.at_level(logging.WARNING, logger="agentsight_middleware"):
        for _ in range(5):
            middleware = AgentSightMiddleware(Starlette(), widget_pages=["/"], tracker=tracker)
            middleware.close()
            del middleware
            gc.collect()
        kept = [AgentSightMiddleware(Starlette(), widget_pages=["/"], tracker=tracker)]
    assert not same_rules_warnings(caplog)
    kept[0].close()


@pytest.mark.usefixtures("fresh_instance_count")
def test_apps_served_one_after_another_are_not_taken_for_one_middleware_per_route(
    tracker: RecordingTracker, caplog: pytest.LogCaptureFixture
) -> None:
    # A FastAPI app holds reference cycles: one a script served and stopped stays in memory
    # until the garbage collector runs, and a third such app (a script trying three
    # configurations) was taken for one middleware per route. Each is closed at its
    # lifespan's shutdown; the list keeps them as an uncollected cycle would.
    demo = importlib.import_module("examples.demo")
    stopped: list[Any] = []
    with caplog.at_level(logging.WARNING, logger="agentsight_middleware"):
        for _ in range(3):
            app = demo.create_app(tracker=tracker)
            with uvicorn_server(app) as url, httpx.Client(base_url=url) as client:
                assert client.get("/", headers=BROWSER).status_code == 200
            stopped.append(app)
        tracker.wait_for(initialized=3)
    assert not same_rules_warnings(caplog)
    # Not closed, they still count: the warning is still said for them.
    kept = [AgentSightMiddleware(app, widget_pages=["/"], tracker=tracker) for _ in range(3)]
    assert same_rules_warnings(caplog)
    for middleware in kept:
        middleware.close()


@pytest.mark.anyio
@pytest.mark.usefixtures("fresh_instance_count")
async def test_a_test_suite_s_app_per_test_without_lifespan_is_not_taken_for_one_per_route(
    tracker: RecordingTracker, caplog: pytest.LogCaptureFixture
) -> None:
    # A user's suite builds the app per test and drives it with no lifespan (the README's
    # TestClient(app) without `with`, httpx.ASGITransport, Flask's test_client): nothing
    # closes those middlewares, and the apps' reference cycles keep them until the garbage
    # collector runs. The third test was told its framework built one per route.
    demo = importlib.import_module("examples.demo")
    flask_app = importlib.import_module("examples.flask_app")
    served: list[Any] = []  # as uncollected cycles keep them
    with caplog.at_level(logging.WARNING, logger="agentsight_middleware"):
        for _ in range(3):
            app = demo.create_app(tracker=tracker)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                assert (await client.get("/", headers=BROWSER)).status_code == 200
            served.append(app)
        for _ in range(3):
            wsgi = flask_app.create_app(tracker=tracker)
            assert wsgi.test_client().get("/", headers=BROWSER).status_code == 200
            served.append(wsgi)
        tracker.wait_for(initialized=6)
    assert not same_rules_warnings(caplog)
    for app in served:
        middleware = app.wsgi_app if hasattr(app, "wsgi_app") else app.middleware_stack
        while not isinstance(middleware, (AgentSightMiddleware, AgentSightWSGIMiddleware)):
            middleware = middleware.app
        middleware.close()


ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize(
    ("variable", "value"),
    [("AGENTSIGHT_API_KEY", "sk-live-1234567890abcdef"), ("AGENTSIGHT_ENVIRONMENT", "staging")],
)
def test_the_demo_stops_at_start_up_on_a_bad_variable(variable: str, value: str) -> None:
    # Under uvicorn's default lifespan handling a bad key turned every request into a 500
    # while the demo ran on; then it stopped at the lifespan's start, but after printing
    # its URL, and said the error twice. Now it stops before, saying why once.
    import os
    import subprocess
    import sys

    env = {**os.environ, variable: value}
    done = subprocess.run(
        [sys.executable, "-m", "examples.demo", "--port", str(_free_port())],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode != 0
    assert done.stderr.count(f"agentsight-middleware is misconfigured: {variable}") == 1
    assert "http://" not in done.stdout
    assert "1234567890abcdef" not in done.stderr + done.stdout


@pytest.mark.parametrize("kind", ["missing-folder", "folder", "not-an-events-file"])
def test_the_demo_stops_before_its_url_on_a_db_it_cannot_use(tmp_path: Path, kind: str) -> None:
    # It printed its URL, then uvicorn stopped at the lifespan's start with the error twice
    # (exit code 3); for a file that is no events file it served on, losing every event.
    import os
    import subprocess
    import sys

    db = {"missing-folder": tmp_path / "nowhere" / "e.sqlite3", "folder": tmp_path}.get(
        kind, tmp_path / "notes.txt"
    )
    if kind == "not-an-events-file":
        db.write_text("my notes, not a database " * 100)
    env = {k: v for k, v in os.environ.items() if k != "AGENTSIGHT_API_KEY"}
    done = subprocess.run(
        [sys.executable, "-m", "examples.demo", "--port", str(_free_port()), "--db", str(db)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.count("agentsight-middleware is misconfigured: local_store=") == 1
    assert "http://" not in done.stdout


def test_the_demo_says_which_port_to_try_when_its_own_is_taken(tmp_path: Path) -> None:
    # It printed its URL (someone else's server), then failed to bind, with no hint.
    import socket
    import subprocess
    import sys

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "examples.demo", "--port", str(port), "--db",
             str(tmp_path / "demo.sqlite3")],
            cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert done.returncode == 1
    assert "Demo shop" not in done.stdout
    assert f"127.0.0.1:{port} cannot be used (Address already in use)" in done.stderr
    assert f'make demo DEMO_ARGS="--port {port + 1}"' in done.stderr


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_the_demo_reports_what_it_saw_on_ctrl_c(tmp_path: Path, stop: str) -> None:
    # SIGTERM (kill, timeout, docker stop): uvicorn raises it again once it has shut down,
    # which ended the demo before its report.
    import os
    import signal
    import subprocess
    import sys
    import time

    port = _free_port()
    db = tmp_path / "demo.sqlite3"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTSIGHT_")}
    demo = subprocess.Popen(
        [sys.executable, "-m", "examples.demo", "--port", str(port), "--db", str(db)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                page = httpx.get(f"http://127.0.0.1:{port}/", headers=BROWSER, timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the demo did not start"
                time.sleep(0.1)
        assert page.status_code == 200
        chat = httpx.post(
            f"http://127.0.0.1:{port}/api/chat",
            json={"message": "hello"},
            cookies=page.cookies,
            timeout=5,
        )
        assert chat.status_code == 200
    finally:
        demo.send_signal(getattr(signal, stop))
        out, err = demo.communicate(timeout=60)
    assert demo.returncode == 0, err
    assert "1 conversation initialized, 1 used: interaction rate 100.0 %" in out


def test_make_demo_passes_demo_args_to_the_demo() -> None:
    # `make demo` always bound 127.0.0.1:8000: a busy port could not be changed.
    import shutil
    import subprocess

    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    done = subprocess.run(
        [make, "-n", "demo", "DEMO_ARGS=--port 8001 --db demo.sqlite3"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert "-m examples.demo --port 8001 --db demo.sqlite3\n" in done.stdout
    # Its own extra, not the test toolchain (playwright, mypy, Django, uWSGI...: ~450 MB).
    assert "pip install --quiet -e '.[demo]'" in done.stdout
    assert ".[test]" not in done.stdout


def _readme_test_headers() -> dict[str, str]:
    """The headers the README's "Testing your app" gives a test's page view."""
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Testing your app", 1)[1].split("\n## ", 1)[0]
    match = re.search(r'client\.get\("/", headers=(\{[^}]*\})\)', section)
    assert match is not None, "the README's Testing section shows no page view"
    headers = ast.literal_eval(match.group(1))
    assert isinstance(headers, dict)
    return headers


# The README told tests to send Accept: text/html alone, naming httpx: under httpx (its
# ASGITransport, as FastAPI's async tests use) that records no view, since httpx's own
# user agent is a script's (DEFAULT_NON_BROWSER_AGENTS). Its advice must work as written.
@pytest.mark.anyio
async def test_the_readme_s_test_page_view_records_a_view_under_httpx(
    tracker: RecordingTracker,
) -> None:
    app = importlib.import_module("examples.demo").create_app(tracker=tracker)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://shop.test") as client:
        page = await client.get("/", headers=_readme_test_headers())
    assert page.status_code == 200
    tracker.wait_for(initialized=1)


def test_the_readme_s_test_page_view_records_a_view_under_flask_s_client(
    tracker: RecordingTracker,
) -> None:
    app = importlib.import_module("examples.flask_app").create_app(tracker=tracker)
    page = app.test_client().get("/", headers=_readme_test_headers())
    assert page.status_code == 200
    tracker.wait_for(initialized=1)


def test_django_s_test_client_skips_the_middleware_the_readme_s_transport_does_not(
    tracker: RecordingTracker,
) -> None:
    # Django's test Client calls Django's handler, not wsgi.py's application: the README
    # says so, and the way it gives to test through the middleware must track.
    application = importlib.import_module("examples.django_site.wsgi").create_application(
        tracker=tracker
    )
    from django.test import Client as DjangoClient

    bypassed = DjangoClient().post(
        "/api/chat/", {"message": "hello"}, content_type="application/json"
    )
    assert bypassed.json()["conversation_id"] is None  # current_conversation() is None there
    transport = httpx.WSGITransport(app=application)
    with httpx.Client(transport=transport, base_url="http://testserver") as client:
        page = client.get("/", headers=_readme_test_headers())
        chat = client.post("/api/chat/", json={"message": "hello"})
    _check(tracker, page.headers["set-cookie"], chat.json())
    application.close()
