"""The WSGI middleware in front of a real Flask app, through Werkzeug's test client
and through Werkzeug's real HTTP server on 127.0.0.1."""

from __future__ import annotations

import contextlib
import io
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from flask import Flask, Response, jsonify, request, stream_with_context
from werkzeug.serving import make_server
from werkzeug.test import Client

from agentsight_middleware import AgentSightWSGIMiddleware, Conversation, current_conversation
from agentsight_middleware.testing import RecordingTracker

from .conftest import (
    APP_COOKIE_CASES,
    BROWSER,
    GOOGLEBOT,
    IPHONE,
    check_shared_cache_outcome,
    wait_for_the_parser,
    wait_until_serving,
)

PAGE = "<!doctype html><title>Shop</title><p>hello</p>"


def make_flask(tracker: RecordingTracker | None = None) -> Flask:
    app = Flask(__name__)

    @app.get("/")
    @app.get("/pricing")
    def page() -> str:
        return PAGE

    @app.get("/json")
    def json_page() -> Any:
        return jsonify(ok=True)

    @app.get("/missing")
    def missing() -> Any:
        return PAGE, 404

    @app.get("/boom")
    def boom() -> Any:
        raise RuntimeError("handler failed")

    @app.post("/api/chat")
    def chat() -> Any:
        conversation: Conversation = request.environ["agentsight.conversation"]
        current = current_conversation()
        seen = [c["conversation_id"] for c in tracker.used] if tracker else []
        return jsonify(
            body=request.get_data(as_text=True),
            environ_id=conversation.id,
            contextvar_id=current.id if current else None,
            seen_by_handler=seen,
        )

    @app.post("/api/stream")
    def stream() -> Response:
        def generate() -> Iterator[str]:
            yield from ("a", "b", "c")

        return Response(stream_with_context(generate()), mimetype="text/plain")

    return app


def wrap(tracker: Any, **options: Any) -> AgentSightWSGIMiddleware:
    app = make_flask(tracker if isinstance(tracker, RecordingTracker) else None)
    options.setdefault("widget_pages", ["/", "/pricing", "/json", "/missing", "/boom"])
    options.setdefault("chat_routes", ["POST /api/chat", "POST /api/stream"])
    app.wsgi_app = AgentSightWSGIMiddleware(app.wsgi_app, tracker=tracker, **options)  # type: ignore[method-assign]
    return app  # type: ignore[return-value]


def middleware_of(app: Any) -> AgentSightWSGIMiddleware:
    mw = app.wsgi_app
    assert isinstance(mw, AgentSightWSGIMiddleware)
    return mw


def test_flask_page_then_chat(tracker: RecordingTracker) -> None:
    app = wrap(tracker)
    client = Client(app)
    page = client.get("/pricing", headers=BROWSER, environ_base={"REMOTE_ADDR": "198.51.100.4"})
    assert page.status_code == 200
    assert page.get_data(as_text=True) == PAGE
    cookie = page.headers["Set-Cookie"]
    conversation_id = cookie.split(";")[0].split("=", 1)[1]
    chat = client.post(
        "/api/chat", json={"message": "hi"}, environ_base={"REMOTE_ADDR": "198.51.100.4"}
    )
    data = chat.get_json()
    assert data["body"] == '{"message": "hi"}'
    assert data["environ_id"] == data["contextvar_id"] == conversation_id
    assert data["seen_by_handler"] == [conversation_id], "get_or_create ran before the handler"
    assert middleware_of(app).flush(5)
    [initialized] = tracker.initialized
    assert initialized["conversation_id"] == conversation_id
    assert initialized["customer_ip_address"] == "198.51.100.4"
    assert initialized["device"] == "desktop"
    assert initialized["language"] == "en-US"
    assert initialized["metadata"]["page_url"] == "http://localhost/pricing"


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        pytest.param("/json", BROWSER, id="json-answer"),
        pytest.param("/missing", BROWSER, id="404"),
        pytest.param("/", {**BROWSER, "accept": "*/*"}, id="accepts-anything"),
        pytest.param("/", {**BROWSER, "user-agent": ""}, id="empty-user-agent"),
        pytest.param("/", {**BROWSER, "sec-purpose": "prefetch"}, id="prefetch"),
    ],
)
def test_flask_not_a_page_view(
    tracker: RecordingTracker, path: str, headers: dict[str, str]
) -> None:
    app = wrap(tracker)
    response = Client(app).get(path, headers=headers)
    assert "Set-Cookie" not in response.headers
    assert middleware_of(app).flush(5)
    assert tracker.calls == []


def test_flask_error_page_is_not_a_view_and_is_unchanged(tracker: RecordingTracker) -> None:
    app = wrap(tracker)
    response = Client(app).get("/boom", headers=BROWSER)
    assert response.status_code == 500
    assert middleware_of(app).flush(5)
    assert tracker.calls == []


def test_flask_bot_probe_and_mobile(tracker: RecordingTracker) -> None:
    app = wrap(tracker)
    Client(app).get("/", headers={**BROWSER, "user-agent": GOOGLEBOT})
    probe = Client(app).get("/", headers={**BROWSER, "user-agent": "kube-probe/1.29"})
    assert "Set-Cookie" in probe.headers  # told apart in the background, not here
    Client(app).get("/", headers={**BROWSER, "user-agent": IPHONE})
    assert middleware_of(app).flush(5)
    [call] = tracker.initialized
    assert call["device"] == "mobile"
    assert middleware_of(app).stats()["skipped_bots"] == 2


def test_flask_widget_page_framed_by_another_site_is_not_a_page_view(
    tracker: RecordingTracker,
) -> None:
    # Its SameSite=Lax cookie is neither stored nor sent there: a view no chat links to.
    app = wrap(tracker)
    framed = {**BROWSER, "sec-fetch-dest": "iframe"}
    cross = Client(app).get("/", headers={**framed, "sec-fetch-site": "cross-site"})
    own = Client(app).get("/", headers={**framed, "sec-fetch-site": "same-origin"})
    assert "Set-Cookie" not in cross.headers
    assert "Set-Cookie" in own.headers
    assert middleware_of(app).flush(5)
    assert len(tracker.initialized) == 1


def test_flask_load_inside_another_sites_frame_is_not_a_page_view(
    tracker: RecordingTracker,
) -> None:
    # A link followed inside that frame: Sec-Fetch-Site same-origin, the cookie lost all
    # the same; Chromium says so with Sec-Fetch-Storage-Access.
    app = wrap(tracker)
    framed = {**BROWSER, "sec-fetch-dest": "iframe", "sec-fetch-site": "same-origin"}
    inside = Client(app).get("/", headers={**framed, "sec-fetch-storage-access": "none"})
    own = Client(app).get("/", headers=framed)
    assert "Set-Cookie" not in inside.headers
    assert "Set-Cookie" in own.headers
    assert middleware_of(app).flush(5)
    assert len(tracker.initialized) == 1


def test_flask_chat_sending_the_cookies_id_in_the_header_too_slides_the_cookie(
    tracker: RecordingTracker,
) -> None:
    # As the demo widget sends it: the cookie's id in X-Conversation-ID, the cookie along.
    client = Client(wrap(tracker))
    client.set_cookie("agentsight_conversation_id", "conv_00000000000a")
    chat = client.post(
        "/api/chat", json={"message": "hi"}, headers={"X-Conversation-ID": "conv_00000000000a"}
    )
    other = client.post(
        "/api/chat", json={"message": "hi"}, headers={"X-Conversation-ID": "conv_00000000000b"}
    )
    assert chat.get_json()["environ_id"] == "conv_00000000000a"
    renewed = chat.headers.get("Set-Cookie")
    assert renewed is not None
    assert renewed.startswith("agentsight_conversation_id=conv_00000000000a;")
    assert "Max-Age=1800" in renewed
    assert "Set-Cookie" not in other.headers  # another id than the cookie's: left alone


def test_flask_streaming_chat_passes_through(tracker: RecordingTracker) -> None:
    app = wrap(tracker)
    response = Client(app).post("/api/stream", headers={"X-Conversation-ID": "conv_s"})
    assert response.get_data() == b"abc"
    assert tracker.used[0]["conversation_id"] == "conv_s"


def test_script_name_mount(tracker: RecordingTracker) -> None:
    app = wrap(tracker, widget_pages=["/app/pricing"], chat_routes=["POST /app/api/chat"])
    client = Client(app)
    base = "http://localhost/app/"  # SCRIPT_NAME=/app, as a server mounting the app there sets
    client.get("/pricing", headers=BROWSER, base_url=base)
    client.post("/api/chat", json={}, base_url=base)
    assert middleware_of(app).flush(5)
    assert tracker.initialized[0]["metadata"]["page_path"] == "/app/pricing"
    assert tracker.used[0]["metadata"]["page_path"] == "/app/api/chat"


def test_raising_tracker_leaves_flask_untouched() -> None:
    class Raising:
        def initialize_conversation(self, conversation_id: str, **kw: Any) -> None:
            raise RuntimeError("down")

        def get_or_create_conversation(self, conversation_id: str, **kw: Any) -> None:
            raise RuntimeError("down")

    app = wrap(Raising())
    client = Client(app)
    assert client.get("/", headers=BROWSER).get_data(as_text=True) == PAGE
    assert client.post("/api/chat", json={"a": 1}).get_json()["body"] == '{"a": 1}'
    assert middleware_of(app).stats()["errors"] >= 1


@pytest.fixture
def live_flask(tracker: RecordingTracker) -> Iterator[tuple[str, Any]]:
    app = wrap(tracker, trusted_proxies=["127.0.0.1"])
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", app
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_real_werkzeug_server_chunked_body_and_proxy(
    live_flask: tuple[str, Any], tracker: RecordingTracker
) -> None:
    url, app = live_flask

    def body() -> Iterator[bytes]:
        yield b'{"conversation_id": '
        time.sleep(0.01)
        yield b'"conv_chunked00001", "message": "hi"}'

    with httpx.Client(base_url=url) as client:
        page = client.get("/", headers={**BROWSER, "x-forwarded-for": "6.6.6.6, 192.0.2.10"})
        assert page.status_code == 200
        response = client.post(
            "/api/chat", content=body(), headers={"content-type": "application/json"}
        )
    assert response.json()["body"] == '{"conversation_id": "conv_chunked00001", "message": "hi"}'
    assert middleware_of(app).flush(5)
    assert tracker.initialized[0]["customer_ip_address"] == "192.0.2.10"
    assert tracker.used[0]["conversation_id"] == "conv_chunked00001"


def test_flask_secure_flag_follows_the_proxy_only_for_a_trusted_peer(
    tracker: RecordingTracker,
) -> None:
    app = wrap(tracker, trusted_proxies=["10.0.0.0/8"])
    https = {**BROWSER, "X-Forwarded-Proto": "https"}
    for peer, headers, secure in [
        ("10.0.0.2", https, True),
        ("203.0.113.7", https, False),
        ("10.0.0.2", https, True),
        ("10.0.0.2", {**BROWSER, "X-Forwarded-Proto": "http"}, False),
        ("10.0.0.2", {**BROWSER, "Forwarded": "for=198.51.100.9;proto=https"}, True),
        ("10.0.0.2", {**BROWSER, "X-Forwarded-Proto": "x" * 4000 + ", https"}, True),
        ("203.0.113.7", {**BROWSER, "X-Forwarded-Proto": "y" * 4000 + ", https"}, False),
    ]:
        page = Client(app).get("/", headers=headers, environ_base={"REMOTE_ADDR": peer})
        assert ("Secure" in page.headers["Set-Cookie"]) is secure, (peer, headers)
    cache = middleware_of(app)._core.secure_answers
    assert len(cache) == 3
    assert all(len(key[2] or "") <= 16 for key in cache)


def _raw_exchange(port: int, request_bytes: bytes) -> bytes:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request_bytes)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _echo_flask(wrap_it: bool) -> Any:
    app = Flask(__name__)

    @app.post("/api/chat")
    def chat() -> Any:
        return jsonify(body=request.get_data(as_text=True))

    if wrap_it:
        app.wsgi_app = AgentSightWSGIMiddleware(  # type: ignore[method-assign]
            app.wsgi_app, chat_routes=["POST /api/chat"], tracker=RecordingTracker()
        )
    return app


_CHUNKED = b'{"conversation_id": "conv_abc", "message": "hello"}'


@pytest.mark.parametrize(
    ("head", "body"),
    [
        # str.isdigit() takes a superscript two; int() does not.
        (b"Content-Length: \xb2\r\n", b"{}"),
        # Past 4,300 digits int() refuses any string.
        (b"Content-Length: " + b"1" * 4301 + b"\r\n", b"{}"),
        # De-chunked by the server, which keeps the header: the stream is the body.
        (
            b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
            b"%x\r\n%s\r\n0\r\n\r\n" % (len(_CHUNKED), _CHUNKED),
        ),
    ],
    ids=["superscript-length", "4301-digit-length", "chunked-with-length"],
)
def test_odd_request_bodies_reach_the_app_as_without_us(head: bytes, body: bytes) -> None:
    # Werkzeug's development server (flask run) lets these through; the app's answer
    # must be the same with the middleware in front.
    answers = []
    for wrap_it in (False, True):
        server = make_server("127.0.0.1", 0, _echo_flask(wrap_it), threaded=True)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            answers.append(
                _raw_exchange(
                    server.server_port,
                    b"POST /api/chat HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                    + head
                    + b"Connection: close\r\n\r\n"
                    + body,
                )
            )
        finally:
            server.shutdown()
            server.server_close()
    plain, wrapped = (answer.split(b"\r\n\r\n", 1) for answer in answers)
    assert plain[0].split(b"\r\n")[0] == wrapped[0].split(b"\r\n")[0] == b"HTTP/1.1 200 OK"
    assert wrapped[1] == plain[1]


def test_a_two_argument_start_response_is_called_with_two() -> None:
    # PEP 3333 servers take exc_info, but test harnesses are often written without it.
    calls: list[tuple[str, list[tuple[str, str]]]] = []

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        calls.append((status, headers))

    app = wrap(RecordingTracker())
    for method, path in (("GET", "/"), ("POST", "/api/chat")):
        environ = {
            "REQUEST_METHOD": method,
            "PATH_INFO": path,
            "SERVER_NAME": "t",
            "SERVER_PORT": "80",
            "wsgi.url_scheme": "http",
            "wsgi.input": io.BytesIO(b"{}"),
            "CONTENT_TYPE": "application/json",
            "CONTENT_LENGTH": "2",
            "HTTP_ACCEPT": "text/html",
            "HTTP_USER_AGENT": "Mozilla/5.0",
        }
        result = middleware_of(app)(environ, start_response)
        b"".join(result)
        getattr(result, "close", lambda: None)()
    assert [status for status, _ in calls] == ["200 OK", "200 OK"]
    assert all(any(name == "Set-Cookie" for name, _ in headers) for _, headers in calls)


def test_list_and_file_responses_are_handed_over_as_they_are() -> None:
    # Servers take fast paths on these (len() for Content-Length, sendfile).
    from werkzeug.wsgi import FileWrapper

    body = [b"<p>hi</p>"]
    wrapped_file = FileWrapper(io.BytesIO(b"file body"))

    def app(environ: Any, start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "text/html")])
        return wrapped_file if environ["PATH_INFO"] == "/file" else body

    mw = AgentSightWSGIMiddleware(app, widget_pages=["/", "/file"], tracker=RecordingTracker())
    for path, expected in (("/", body), ("/file", wrapped_file)):
        environ = {
            "REQUEST_METHOD": "GET",
            "PATH_INFO": path,
            "wsgi.file_wrapper": FileWrapper,
            "HTTP_ACCEPT": "text/html",
            "HTTP_USER_AGENT": "Mozilla/5.0",
        }
        assert mw(environ, lambda status, headers, exc_info=None: None) is expected


def test_a_file_from_a_file_wrapper_function_is_handed_over_as_it_is() -> None:
    # uWSGI's wsgi.file_wrapper is a function that returns the very file it was given,
    # and sends the file with sendfile() only if the app hands that object back: wrapped,
    # uWSGI iterated it by lines (30 MB of short lines: 0.15 s -> 5.8 s; a 200 MB file
    # without newlines read whole into memory).
    def uwsgi_file_wrapper(filelike: Any, block_size: int = 8192) -> Any:
        return filelike

    page = io.BytesIO(b"<p>a page</p>")

    def app(environ: Any, start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "text/html")])
        return environ["wsgi.file_wrapper"](page, 4096)

    mw = AgentSightWSGIMiddleware(
        app, widget_pages=["/"], chat_routes=["POST /api/chat"], tracker=RecordingTracker()
    )
    for method, path in (("GET", "/"), ("POST", "/api/chat")):
        environ = {
            "REQUEST_METHOD": method,
            "PATH_INFO": path,
            "wsgi.file_wrapper": uwsgi_file_wrapper,
            "wsgi.input": io.BytesIO(),
            "HTTP_ACCEPT": "text/html",
            "HTTP_USER_AGENT": "Mozilla/5.0",
        }
        assert mw(environ, lambda status, headers, exc_info=None: None) is page
    assert current_conversation() is None


def test_a_seekable_input_stays_seekable_after_the_peek(tracker: RecordingTracker) -> None:
    # waitress, uWSGI with post-buffering and test clients hand the app a seekable input;
    # WebOb seeks one it was told is seekable (webob.is_body_seekable, set by a WebOb
    # layer in front): a replay without seek() failed that request with a 500.
    body = b'{"conversation_id": "conv_seekable0001", "message": "hi"}'

    def app(environ: Any, start_response: Any) -> list[bytes]:
        stream = environ["wsgi.input"]
        first = stream.read()
        stream.seek(0)
        again = stream.read()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"%d %d %d" % (len(first), len(again), stream.tell())]

    answers = []
    for wrap_it in (False, True):
        wsgi: Any = app
        if wrap_it:
            wsgi = AgentSightWSGIMiddleware(app, chat_routes=["POST /api/chat"], tracker=tracker)
        environ = {
            "REQUEST_METHOD": "POST",
            "PATH_INFO": "/api/chat",
            "CONTENT_TYPE": "application/json",
            "CONTENT_LENGTH": str(len(body)),
            "wsgi.input": io.BytesIO(body),
        }
        answers.append(b"".join(wsgi(environ, lambda status, headers, exc_info=None: None)))
    assert answers == [b"57 57 57", b"57 57 57"]
    assert tracker.used[0]["conversation_id"] == "conv_seekable0001"


def test_expect_100_continue_leaves_the_body_to_the_app(tracker: RecordingTracker) -> None:
    class Unread(io.BytesIO):
        def read(self, size: int | None = -1) -> bytes:
            raise AssertionError("the middleware read a body the client has not sent")

    def app(environ: Any, start_response: Any) -> list[bytes]:
        start_response("401 Unauthorized", [("Content-Type", "text/plain")])
        return [b"unauthorized"]

    mw = AgentSightWSGIMiddleware(app, chat_routes=["POST /api/chat"], tracker=tracker)
    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/api/chat",
        "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": "30",
        "HTTP_EXPECT": "100-continue",
        "HTTP_COOKIE": "agentsight_conversation_id=conv_waiting0000",
        "wsgi.input": Unread(),
    }
    assert list(mw(environ, lambda status, headers, exc_info=None: None)) == [b"unauthorized"]
    assert mw.flush(5)
    assert tracker.used[0]["conversation_id"] == "conv_waiting0000"


@pytest.mark.parametrize(("request_cookie", "app_cookie", "events"), APP_COOKIE_CASES)
def test_the_apps_own_cookie_is_never_overridden(
    tracker: RecordingTracker,
    request_cookie: str | None,
    app_cookie: str,
    events: list[tuple[str, str]],
) -> None:
    app = Flask(__name__)

    @app.get("/")
    def page() -> Any:
        response = Response(PAGE, mimetype="text/html")
        response.headers.add("Set-Cookie", "theme=dark; Path=/")
        response.headers.add("Set-Cookie", app_cookie)
        return response

    @app.post("/api/chat")
    def chat() -> Any:
        response = jsonify(ok=True)
        response.headers.add("Set-Cookie", "agentsight_conversation_id=conv_fromchat00001")
        return response

    app.wsgi_app = AgentSightWSGIMiddleware(  # type: ignore[method-assign]
        app.wsgi_app, widget_pages=["/"], chat_routes=["POST /api/chat"], tracker=tracker
    )
    browser = Client(app)
    if request_cookie:
        browser.set_cookie("agentsight_conversation_id", request_cookie)
    page_response = browser.get("/", headers=BROWSER)
    chat_response = browser.post("/api/chat", json={})
    assert page_response.headers.getlist("Set-Cookie") == ["theme=dark; Path=/", app_cookie]
    assert chat_response.headers.getlist("Set-Cookie") == [
        "agentsight_conversation_id=conv_fromchat00001"
    ]
    assert middleware_of(app).flush(5)
    assert [
        (call["conversation_id"], call["metadata"]["conversation_id_source"])
        for call in tracker.initialized
    ] == events


def test_the_last_of_the_apps_own_cookies_counts(tracker: RecordingTracker) -> None:
    app = Flask(__name__)

    @app.get("/")
    def page() -> Any:
        response = Response(PAGE, mimetype="text/html")
        response.delete_cookie("agentsight_conversation_id")
        response.set_cookie("agentsight_conversation_id", "conv_final0000001")
        return response

    app.wsgi_app = AgentSightWSGIMiddleware(  # type: ignore[method-assign]
        app.wsgi_app, widget_pages=["/"], tracker=tracker
    )
    response = Client(app).get("/", headers=BROWSER)
    assert len(response.headers.getlist("Set-Cookie")) == 2  # the app's, none of ours
    assert middleware_of(app).flush(5)
    assert [call["conversation_id"] for call in tracker.initialized] == ["conv_final0000001"]


def test_a_body_abandoned_half_way_is_closed_once(tracker: RecordingTracker) -> None:
    # A client gone mid-stream: the server stops iterating and calls close(). Flask's
    # call_on_close callbacks (Werkzeug's ClosingIterator) must run once, as without us.
    calls: list[str] = []
    app = Flask(__name__)

    @app.post("/api/chat")
    def chat() -> Any:
        def tokens() -> Iterator[str]:
            yield from ("a", "b", "c")

        response = Response(tokens(), mimetype="text/plain")
        response.call_on_close(lambda: calls.append("closed"))
        return response

    results = []
    for wrap_it in (False, True):
        wsgi: Any = app.wsgi_app
        if wrap_it:
            wsgi = AgentSightWSGIMiddleware(wsgi, chat_routes=["POST /api/chat"], tracker=tracker)
        environ = {
            "REQUEST_METHOD": "POST",
            "PATH_INFO": "/api/chat",
            "SERVER_NAME": "t",
            "SERVER_PORT": "80",
            "wsgi.url_scheme": "http",
            "wsgi.input": io.BytesIO(b""),
            "HTTP_X_CONVERSATION_ID": "conv_gone",
        }
        result: Any = wsgi(environ, lambda status, headers, exc_info=None: None)
        assert next(iter(result)) == b"a"
        result.close()
        results.append(calls.count("closed"))
        calls.clear()
    assert results == [1, 1]
    assert current_conversation() is None


def test_close_from_another_thread_during_a_step_is_as_without_us(
    tracker: RecordingTracker,
) -> None:
    # A watchdog closing the response while the server thread is inside next().
    inside, release = threading.Event(), threading.Event()
    closed: list[int] = []

    class Body:
        def __iter__(self) -> Iterator[bytes]:
            inside.set()
            release.wait(5)
            yield b"late"

        def close(self) -> None:
            closed.append(1)

    def app(environ: Any, start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return Body()

    mw = AgentSightWSGIMiddleware(app, chat_routes=["POST /api/chat"], tracker=tracker)
    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/api/chat", "wsgi.input": io.BytesIO()}
    result: Any = mw(environ, lambda status, headers, exc_info=None: None)
    chunks: list[bytes] = []
    server = threading.Thread(target=lambda: chunks.extend(result))
    server.start()
    assert inside.wait(5)
    result.close()  # no "generator already executing"
    release.set()
    server.join(5)
    assert closed == [1]
    assert chunks == [b"late"]


def test_a_body_never_read_leaves_no_conversation_behind(tracker: RecordingTracker) -> None:
    # A test client that never reads or closes a streamed body: the thread must not keep
    # the conversation, or later code outside any request would see a stale one.
    def app(environ: Any, start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "text/html")])
        return iter([b"<p>hi</p>"])

    mw = AgentSightWSGIMiddleware(app, widget_pages=["/"], tracker=tracker)
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/",
        "HTTP_ACCEPT": "text/html",
        "HTTP_USER_AGENT": "Mozilla/5.0",
    }
    result = mw(environ, lambda status, headers, exc_info=None: None)
    assert current_conversation() is None
    assert result is not None


def test_a_page_revalidated_with_304_is_a_page_view() -> None:
    # Flask's conditional responses, as for any ETag-validated page: see the ASGI test.
    tracker = RecordingTracker()
    flask_app = Flask(__name__)

    @flask_app.get("/")
    def page() -> Any:
        response = Response(PAGE, mimetype="text/html")
        response.set_etag("v1")
        return response.make_conditional(request)

    flask_app.wsgi_app = AgentSightWSGIMiddleware(  # type: ignore[method-assign]
        flask_app.wsgi_app, widget_pages=["/"], tracker=tracker
    )
    c = Client(flask_app)
    first = c.get("/", headers={**BROWSER, "If-None-Match": '"v1"'})
    assert first.status_code == 304
    [minted] = [v for v in first.headers.getlist("Set-Cookie") if v.startswith("agentsight")]
    minted_id = minted.split(";")[0].split("=", 1)[1]
    again = c.get("/", headers={**BROWSER, "If-None-Match": '"v1"'})  # the client sends it back
    assert again.status_code == 304
    assert [v for v in again.headers.getlist("Set-Cookie") if v.startswith("agentsight")] == [
        minted
    ]
    assert middleware_of(flask_app).flush(5)
    assert [call["conversation_id"] for call in tracker.initialized] == [minted_id]


@pytest.mark.parametrize(
    ("cache_control", "tracked"),
    [
        (["public, max-age=600"], False),
        (["s-maxage=600"], False),
        (["public", "no-store"], True),
        (["private"], True),
        ([], True),
        (["private", "CDN-Cache-Control: max-age=600"], False),
        (["private", "Surrogate-Control: no-store"], True),
    ],
)
def test_a_widget_page_for_shared_caches_is_left_as_it_is(
    caplog: pytest.LogCaptureFixture, cache_control: list[str], tracked: bool
) -> None:
    # See the ASGI test: a stored copy would hand one visitor's cookie to every other.
    from .conftest import serving

    flask_app = Flask(__name__)

    @flask_app.get("/")
    def page() -> Response:
        response = Response("<!doctype html><p>shop</p>", mimetype="text/html")
        for value in cache_control:
            name, _, cdn_value = value.partition(": ")
            if cdn_value:
                response.headers.add(name, cdn_value)
            else:
                response.headers.add("Cache-Control", value)
        return response

    tracker = RecordingTracker()
    mw = AgentSightWSGIMiddleware(flask_app, widget_pages=["/"], tracker=tracker)
    server = make_server("127.0.0.1", 0, mw, threaded=True)
    with serving(server) as url, httpx.Client(base_url=url) as client:
        answers = [client.get("/", headers=BROWSER) for _ in range(2)]
    check_shared_cache_outcome(answers, cache_control, tracked, mw, tracker, caplog)


def test_a_widget_page_that_answers_json_is_said_once_for_each_rule(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # See the ASGI test: a widget page's route answering JSON was tracked silently never.
    import logging

    from .conftest import serving

    flask_app = Flask(__name__)

    @flask_app.get("/")
    def home() -> Any:
        return jsonify(page="shop")

    @flask_app.get("/about")
    def about() -> str:
        return "<p>about</p>"

    @flask_app.get("/files/<name>")
    def file(name: str) -> Response:  # a file a widget pattern takes in: not warned about
        return Response(b"%PDF-1.7", mimetype="application/pdf")

    tracker = RecordingTracker()
    mw = AgentSightWSGIMiddleware(
        flask_app, widget_pages=["/", "/missing", "/about", "/files/*"], tracker=tracker
    )
    server = make_server("127.0.0.1", 0, mw, threaded=True)
    with (
        caplog.at_level(logging.WARNING, logger="agentsight_middleware"),
        serving(server) as url,
        httpx.Client(base_url=url) as client,
    ):
        answers = []
        for path in ["/", "/", "/missing", "/about", "/files/report.pdf"]:
            client.cookies.clear()
            answers.append(client.get(path, headers=BROWSER))
    assert answers[0].json() == {"page": "shop"}
    assert "set-cookie" not in answers[0].headers
    assert answers[3].headers["set-cookie"].startswith("agentsight_conversation_id=")
    said = [r.getMessage() for r in caplog.records if "not an HTML page" in r.getMessage()]
    assert said == [
        "the widget page '/' (rule '/') answered a browser's page view with 200 and "
        "Content-Type 'application/json', not an HTML page: no cookie and no view are "
        "recorded for such an answer. Send the page as text/html (FastAPI: "
        "response_class=HTMLResponse); said once for each rule."
    ]
    assert mw.flush(5)
    assert len(tracker.initialized) == 1
    mw.close()


def page_or_chat(path: str) -> dict[str, Any]:
    """A browser's GET of "/" or an empty POST to "/api/chat", as a WSGI server hands it."""
    return {
        "REQUEST_METHOD": "GET" if path == "/" else "POST",
        "PATH_INFO": path,
        "HTTP_ACCEPT": "text/html",
        "HTTP_USER_AGENT": BROWSER["user-agent"],
        "CONTENT_LENGTH": "0",
        "wsgi.input": io.BytesIO(b""),
    }


@pytest.mark.parametrize("path", ["/", "/api/chat"])
def test_headers_the_app_gives_as_a_one_shot_iterable_all_reach_the_server(path: str) -> None:
    # PEP 3333 asks for a list, but Werkzeug's and gunicorn's servers take any iterable:
    # read once by the middleware, the headers reached the server empty (found by a
    # differential run; the ASGI glue already reads such headers only once).
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        headers = [("Content-Type", "text/html"), ("Cache-Control", "no-cache"), ("X-App", "1")]
        start_response("200 OK", (header for header in headers))
        return [PAGE.encode()]

    mw = AgentSightWSGIMiddleware(
        app, widget_pages=["/"], chat_routes=["POST /api/chat"], tracker=RecordingTracker()
    )
    sent: list[Any] = []
    environ = page_or_chat(path)
    mw(environ, lambda status, headers, exc_info=None: sent.append(list(headers)))
    names = [name for name, _ in sent[0]]
    assert names[:3] == ["Content-Type", "Cache-Control", "X-App"]
    assert names[3:] == ["Set-Cookie"]
    mw.close()


@pytest.mark.parametrize("path", ["/", "/api/chat"])
def test_a_header_value_that_is_not_a_str_is_passed_on_unread(path: str) -> None:
    # ("Content-Length", 46): not PEP 3333, but Werkzeug's server sends it; the chat route
    # raised TypeError in the middleware (a 500) where the bare app worked.
    body = PAGE.encode()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/html"), ("Content-Length", len(body))])
        return [body]

    mw = AgentSightWSGIMiddleware(
        app, widget_pages=["/"], chat_routes=["POST /api/chat"], tracker=RecordingTracker()
    )
    sent: list[Any] = []
    environ = page_or_chat(path)
    assert mw(environ, lambda status, headers, exc_info=None: sent.append(headers)) == [body]
    assert sent[0][:2] == [("Content-Type", "text/html"), ("Content-Length", len(body))]
    mw.close()


@pytest.mark.parametrize(
    ("cache_control", "cookie"),
    [("public, max-age=60", False), ("private", True), (None, True)],
)
def test_a_chat_answer_for_shared_caches_gets_no_cookie_the_chat_counts(
    cache_control: str | None, cookie: bool
) -> None:
    # See the ASGI test.
    from .conftest import serving

    flask_app = Flask(__name__)

    @flask_app.get("/api/chat")
    def history() -> Any:
        response = jsonify(messages=[])
        if cache_control is not None:
            response.headers["Cache-Control"] = cache_control
        return response

    tracker = RecordingTracker()
    mw = AgentSightWSGIMiddleware(flask_app, chat_routes=["GET /api/chat"], tracker=tracker)
    server = make_server("127.0.0.1", 0, mw, threaded=True)
    with serving(server) as url, httpx.Client(base_url=url) as client:
        client.cookies.set("agentsight_conversation_id", "conv_0123456789ab")
        answer = client.get("/api/chat")
    assert answer.json() == {"messages": []}
    assert answer.headers.get("cache-control") == cache_control
    assert bool(answer.headers.get_list("set-cookie")) is cookie
    tracker.wait_for(used=1)
    assert tracker.used[0]["conversation_id"] == "conv_0123456789ab"
    mw.close()


def test_wrapping_the_flask_app_instead_of_its_wsgi_app_says_so() -> None:
    # app.wsgi_app = AgentSightWSGIMiddleware(app, ...): every request raised a
    # RecursionError, which said nothing of the cause.
    flask_app = Flask(__name__)

    @flask_app.get("/")
    def home() -> str:
        return PAGE

    mw = AgentSightWSGIMiddleware(flask_app, widget_pages=["/"], tracker=RecordingTracker())
    flask_app.wsgi_app = mw  # type: ignore[method-assign]
    client = Client(flask_app)
    for _ in range(2):  # every request, not the first one only
        with pytest.raises(
            RuntimeError, match=r"app.wsgi_app = AgentSightWSGIMiddleware\(app.wsgi_app"
        ):
            client.get("/", headers=BROWSER)
    mw.close()


def test_an_app_whose_getattr_raises_is_served() -> None:
    # The wrap check above asks the app for its wsgi_app: an app object answering an
    # unknown attribute with another error than AttributeError failed every request.
    class Strict:
        def __getattr__(self, name: str) -> Any:
            raise KeyError(name)

        def __call__(self, environ: Any, start_response: Any) -> list[bytes]:
            start_response("200 OK", [("Content-Type", "text/html")])
            return [PAGE.encode()]

    tracker = RecordingTracker()
    mw = AgentSightWSGIMiddleware(Strict(), widget_pages=["/"], tracker=tracker)
    client = Client(mw)
    for _ in range(2):  # the first visit (an event), then the returning one
        assert client.get("/", headers=BROWSER).text == PAGE
    tracker.wait_for(initialized=1)
    mw.close()


def test_a_lazy_body_with_a_read_method_runs_with_its_conversation_under_a_wrapper_function() -> (
    None
):
    # Under uWSGI (a wsgi.file_wrapper function) any result with a read() was taken for a
    # file and handed over unwrapped: an app's lazy body offering read() too (an
    # iterable-to-file adapter) then produced its parts with no current conversation,
    # where it has one under gunicorn or Werkzeug's server.
    def uwsgi_file_wrapper(filelike: Any, block_size: int = 8192) -> Any:
        return filelike

    def part() -> bytes:
        conversation = current_conversation()
        return b"none" if conversation is None else conversation.id.encode()

    class Lazy:
        def __iter__(self) -> Iterator[bytes]:
            yield part()

        def read(self, size: int = -1) -> bytes:
            return part()

    def app(environ: Any, start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return Lazy()

    mw = AgentSightWSGIMiddleware(app, chat_routes=["POST /api/chat"], tracker=RecordingTracker())
    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/api/chat",
        "HTTP_X_CONVERSATION_ID": "conv_lazyread00001",
        "wsgi.file_wrapper": uwsgi_file_wrapper,
        "wsgi.input": io.BytesIO(),
    }
    result = mw(environ, lambda status, headers, exc_info=None: None)
    assert b"".join(result) == b"conv_lazyread00001"


@pytest.mark.parametrize("where", ["before returning", "in its body, before any bytes"])
def test_a_page_replaced_by_an_error_page_through_exc_info_is_no_view(where: str) -> None:
    # PEP 3333 lets an app call start_response again, with exc_info, until the first body
    # bytes are sent: a 200 HTML page replaced so by a 500 still counted as a view (the
    # event went at the first call). It goes once the headers are final now.
    import sys

    from .conftest import serving

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "text/html")])

        def fail() -> None:
            try:
                raise RuntimeError("the template failed")
            except RuntimeError:
                start_response("500 Internal Server Error", [("Content-Type", "text/plain")],
                               sys.exc_info())  # fmt: skip

        if environ["PATH_INFO"] == "/ok":
            return iter([b"", PAGE.encode()])  # an empty first part sends no headers
        if where == "before returning":
            fail()
            return [b"error"]

        def body() -> Iterator[bytes]:
            fail()
            yield b"error"

        return body()

    tracker = RecordingTracker()
    mw = AgentSightWSGIMiddleware(app, widget_pages=["/", "/ok"], tracker=tracker)
    server = make_server("127.0.0.1", 0, mw, threaded=True)
    with serving(server) as url, httpx.Client(base_url=url) as client:
        failed = client.get("/", headers=BROWSER)
        shown = client.get("/ok", headers=BROWSER)
    assert (failed.status_code, failed.text) == (500, "error")
    assert shown.status_code == 200
    assert mw.flush(5)
    # The page that was shown is the one view; the error page is none.
    assert [call["metadata"]["page_path"] for call in tracker.initialized] == ["/ok"]
    mw.close()


def test_a_file_proxy_with_a_descriptor_is_handed_over_under_a_wrapper_function(
    tmp_path: Any,
) -> None:
    # Django's FileResponse of a FileField's or a storage's file (django.core.files.File),
    # Werkzeug's send_file of a NamedTemporaryFile: not io.IOBase, yet uWSGI sends them
    # with sendfile() (they have a fileno()) if it gets them back. Wrapped, uWSGI iterated
    # them: a 50 MB file without newlines through Django's File took 14.7 s and +130 MB
    # in the worker instead of 0.11 s.
    import tempfile

    from django.core.files import File

    def uwsgi_file_wrapper(filelike: Any, block_size: int = 8192) -> Any:
        return filelike

    path = tmp_path / "page.html"
    path.write_bytes(b"<p>a page</p>")
    makers: list[Any] = [
        lambda: File(path.open("rb")),
        lambda: tempfile.NamedTemporaryFile(),  # noqa: SIM115 - closed below
    ]
    for make in makers:
        page: Any = make()

        def app(environ: Any, start_response: Any) -> Any:
            start_response("200 OK", [("Content-Type", "text/html")])
            return environ["wsgi.file_wrapper"](page, 4096)  # noqa: B023

        mw = AgentSightWSGIMiddleware(app, widget_pages=["/"], tracker=RecordingTracker())
        environ = {
            "REQUEST_METHOD": "GET",
            "PATH_INFO": "/",
            "wsgi.file_wrapper": uwsgi_file_wrapper,
            "wsgi.input": io.BytesIO(),
            "HTTP_ACCEPT": "text/html",
            "HTTP_USER_AGENT": "Mozilla/5.0",
        }
        try:
            handed = mw(environ, lambda status, headers, exc_info=None: None)
            same = handed is page  # (an assert on "is" would narrow page's type)
            assert same
        finally:
            page.close()
            mw.close()


_FORKING_APP = """
import sys
from flask import Flask
from werkzeug.serving import run_simple
from agentsight_middleware import AgentSightWSGIMiddleware

app = Flask(__name__)

@app.get("/")
def page():
    return "<!doctype html><p>shop</p>"

@app.post("/api/chat")
def chat():
    return {"ok": True}

app.wsgi_app = AgentSightWSGIMiddleware(
    app.wsgi_app, widget_pages=["/"], chat_routes=["POST /api/chat"]
)
# app.run(processes=2) does the same: a child forked for each request, ended by os._exit().
run_simple("127.0.0.1", int(sys.argv[1]), app, threaded=False, processes=2)
"""


def test_events_of_a_child_forked_for_its_request_are_delivered(tmp_path: Any) -> None:
    # Werkzeug's forking server (run_simple(processes=N), Flask's app.run(processes=N)) ends
    # each request's child with os._exit(): no exit hook runs there, and every event the
    # child had queued was lost, silently.
    import os
    import socket
    import subprocess
    import sys

    from agentsight_middleware.testing import StandInAgentSightAPI

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with StandInAgentSightAPI() as api:
        env = {**os.environ, "AGENTSIGHT_API_KEY": api.api_key, "AGENTSIGHT_API_ENDPOINT": api.url}
        log = (tmp_path / "server.log").open("wb")
        server = subprocess.Popen(
            [sys.executable, "-c", _FORKING_APP, str(port)],
            env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}"
            wait_until_serving(url, server, tmp_path / "server.log")
            with httpx.Client(base_url=url, headers=BROWSER) as client:
                page = client.get("/")
                assert page.status_code == 200
                chat = client.post("/api/chat", json={"message": "hi"})
                assert chat.status_code == 200
            api.wait_for(conversations=2, timeout=10)
            minted = page.cookies["agentsight_conversation_id"]
            # Each from its own process: in either order, as from two gunicorn workers.
            sent = sorted((c["conversation_id"], c["is_used"]) for c in api.conversations)
            assert sent == [(minted, False), (minted, True)]
        finally:
            server.terminate()
            server.wait(10)
            log.close()


def test_the_user_agent_parser_is_built_once_the_first_request_is_answered(
    unbuilt_parser: list[str], tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # WSGI has no start-up hook: the worker built the user-agent parser (~0.2 s, ~130 ms of
    # it in one call into ua-parser-rs that holds the GIL) at the process's first page
    # view, freezing the requests in flight then. The first request of any kind (a probe,
    # say) starts the build now, in a thread of its own, once it is answered: the first
    # page view finds it built, and no request's thread or handler runs beside it.
    import sqlite3

    from .apps.parser_app import make_app
    from .conftest import serving

    monkeypatch.setenv("PARSER_TEST_STORE", str(tmp_path / "events.sqlite3"))
    app = make_app()
    server = make_server("127.0.0.1", 0, app, threaded=True)
    with serving(server) as url, httpx.Client(base_url=url, headers=BROWSER) as client:
        assert client.get("/parser").text.split()[0] == "none"  # not while it is served
        wait_for_the_parser(client)  # no page view yet
        assert client.get("/").status_code == 200
    app.wsgi_app.close()  # type: ignore[attr-defined]
    assert unbuilt_parser == ["agentsight-ua-parser"]
    with contextlib.closing(sqlite3.connect(tmp_path / "events.sqlite3")) as conn:
        assert conn.execute("SELECT device FROM events").fetchall() == [("desktop",)]


def test_gunicorn_preload_workers_inherit_the_parser_built_before_the_fork(
    tmp_path: Any,
) -> None:
    # With --preload the app, and the middleware, are built in gunicorn's master: the
    # parser is built there too, once, before it forks, and no worker builds one (each did
    # at its first page view, and a worker restarted under traffic froze its first requests).
    import os
    import signal
    import socket
    import sqlite3
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = tmp_path / "events.sqlite3"
    command = [
        sys.executable, "-m", "gunicorn", "--preload", "-w", "2", "-b", f"127.0.0.1:{port}",
        "tests.apps.parser_app:make_app()",
    ]  # fmt: skip
    log = tmp_path / "gunicorn.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            command,
            env={**os.environ, "PARSER_TEST_STORE": str(store)},
            cwd=Path(__file__).resolve().parent.parent,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        # No other request first: the first one a worker serves asks how its parser is.
        states: list[tuple[int, str]] = []
        deadline = time.monotonic() + 30
        while not states:
            try:
                state, pid = httpx.get(f"{url}/parser", timeout=5).text.split()
                states.append((int(pid), state))
            except httpx.TransportError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"gunicorn did not start:\n{log.read_text()}") from None
                time.sleep(0.05)
        with httpx.Client(base_url=url) as client:
            for _ in range(10):
                client.cookies.clear()
                assert client.get("/", headers=BROWSER).status_code == 200
                state, pid = client.get("/parser").text.split()
                states.append((int(pid), state))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
    assert {state for _, state in states} == {"built"}, states
    assert server.pid not in {pid for pid, _ in states}  # answered by the workers
    with contextlib.closing(sqlite3.connect(store)) as conn:
        devices = conn.execute("SELECT device FROM events").fetchall()
    assert devices == [("desktop",)] * 10


def test_a_fork_while_the_parser_is_being_built_leaves_the_child_a_working_parser() -> None:
    # The first request starts the parser's build in a thread; a fork then (a warm-up request
    # in gunicorn --preload's master, an app forking a helper) copied ua_parser half imported,
    # its import lock held by a thread the child does not have: the child's own build hung
    # at that import, or took ua_parser for missing and classified with user-agents' parser,
    # 0.4-1 ms an agent, for good. The fork waits for the build; the child inherits it.
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run(
        [sys.executable, "-m", "tests.apps.fork_mid_build"],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().split() == ["ua-parser-rs"], done.stderr.decode()


def test_a_fork_for_other_work_builds_no_parser(
    unbuilt_parser: list[str], tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A process holding a middleware it has not served (a test suite, a script, a Celery
    # master importing the project) built the parser (~0.15 s, ~28 MB) at any fork: for a
    # subprocess's preexec_fn, whose child runs another program, or a multiprocessing
    # pool's, whose children run tasks. Only a fork whose child may serve builds it.
    import multiprocessing
    import subprocess
    import sys

    from .apps.parser_app import make_app

    monkeypatch.setenv("PARSER_TEST_STORE", str(tmp_path / "events.sqlite3"))
    app = make_app()  # built, not served
    subprocess.run([sys.executable, "-c", "pass"], check=True, preexec_fn=lambda: None)
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.map(abs, [-1]) == [1]
    assert unbuilt_parser == []
    app.wsgi_app.close()  # type: ignore[attr-defined]
