"""A tracker's ``conversation_scope`` wraps the handler: the way the OpenTelemetry
based SDK attributes work to a conversation through context variables."""

from __future__ import annotations

import contextvars
import io
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from flask import Flask, jsonify
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from werkzeug.test import Client

from agentsight_middleware import AgentSightMiddleware, AgentSightWSGIMiddleware
from agentsight_middleware.testing import RecordingTracker

active: contextvars.ContextVar[str | None] = contextvars.ContextVar("active", default=None)


class ScopedTracker(RecordingTracker):
    def __init__(self, fail_enter: bool = False) -> None:
        super().__init__()
        self.fail_enter = fail_enter
        self.exits: list[str | None] = []

    @contextmanager
    def conversation_scope(self, conversation_id: str, **fields: Any) -> Iterator[None]:
        if self.fail_enter:
            raise RuntimeError("scope broke")
        token = active.set(conversation_id)
        try:
            yield
        except Exception as exc:
            self.exits.append(type(exc).__name__)
            raise
        else:
            self.exits.append(None)
        finally:
            active.reset(token)


async def async_chat(request: Request) -> Response:
    return JSONResponse({"active": active.get()})


def sync_chat(request: Request) -> Response:
    return JSONResponse({"active": active.get()})


async def failing_chat(request: Request) -> Response:
    raise ValueError("handler failed")


def asgi_app(tracker: ScopedTracker) -> AgentSightMiddleware:
    app = Starlette(
        routes=[
            Route("/async", async_chat, methods=["POST"]),
            Route("/sync", sync_chat, methods=["POST"]),
            Route("/fail", failing_chat, methods=["POST"]),
        ]
    )
    return AgentSightMiddleware(app, chat_routes=["POST /*"], tracker=tracker)


@pytest.mark.anyio
@pytest.mark.parametrize("path", ["/async", "/sync"])
async def test_asgi_handlers_run_inside_the_scope(path: str) -> None:
    tracker = ScopedTracker()
    transport = httpx.ASGITransport(app=asgi_app(tracker))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        response = await c.post(path, headers={"x-conversation-id": "conv_scoped"})
    assert response.json() == {"active": "conv_scoped"}
    assert tracker.exits == [None]
    assert active.get() is None


@pytest.mark.anyio
async def test_the_app_exception_passes_through_the_scope() -> None:
    tracker = ScopedTracker()
    transport = httpx.ASGITransport(app=asgi_app(tracker), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        response = await c.post("/fail", headers={"x-conversation-id": "conv_x"})
    assert response.status_code == 500
    assert tracker.exits == ["ValueError"]


@pytest.mark.anyio
async def test_a_broken_scope_changes_nothing() -> None:
    tracker = ScopedTracker(fail_enter=True)
    transport = httpx.ASGITransport(app=asgi_app(tracker))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        response = await c.post("/async", headers={"x-conversation-id": "conv_x"})
    assert response.json() == {"active": None}


def test_wsgi_handler_runs_inside_the_scope() -> None:
    tracker = ScopedTracker()
    app = Flask(__name__)

    @app.post("/chat")
    def chat() -> Any:
        return jsonify(active=active.get())

    app.wsgi_app = AgentSightWSGIMiddleware(  # type: ignore[method-assign]
        app.wsgi_app, chat_routes=["POST /chat"], tracker=tracker
    )
    response = Client(app).post("/chat", headers={"X-Conversation-ID": "conv_wsgi"})
    assert response.get_json() == {"active": "conv_wsgi"}
    assert tracker.exits == [None]


def _streaming_flask(tracker: ScopedTracker, seen: list[tuple[str, str | None, str | None]]) -> Any:
    from flask import Response, stream_with_context

    from agentsight_middleware import current_conversation

    app = Flask(__name__)

    def note(where: str) -> None:
        current = current_conversation()
        seen.append((where, active.get(), current.id if current else None))

    @app.post("/chat")
    def chat() -> Any:
        note("handler")

        def tokens() -> Iterator[str]:
            for token in ("a", "b"):
                note(f"stream {token}")
                yield token

        return Response(stream_with_context(tokens()), mimetype="text/plain")

    app.wsgi_app = AgentSightWSGIMiddleware(  # type: ignore[method-assign]
        app.wsgi_app, chat_routes=["POST /chat"], tracker=tracker
    )
    return app


def test_wsgi_streamed_body_runs_inside_the_scope_on_a_real_server() -> None:
    # A streamed answer is produced while the server iterates, after the app returned:
    # the conversation and the tracker's scope must still be those of the request.
    import threading

    from werkzeug.serving import make_server

    tracker = ScopedTracker()
    seen: list[tuple[str, str | None, str | None]] = []
    server = make_server("127.0.0.1", 0, _streaming_flask(tracker, seen), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/chat"
        for cid in ("conv_one", "conv_two"):
            response = httpx.post(url, headers={"x-conversation-id": cid})
            assert response.text == "ab"
    finally:
        server.shutdown()
        server.server_close()
    assert seen == [
        (where, cid, cid)
        for cid in ("conv_one", "conv_two")
        for where in ("handler", "stream a", "stream b")
    ]
    # Entered once per request, left once the server closed the response.
    assert tracker.exits == [None, None]


def test_wsgi_scope_is_left_at_close_not_before() -> None:
    tracker = ScopedTracker()
    seen: list[tuple[str, str | None, str | None]] = []
    app = _streaming_flask(tracker, seen)
    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/chat",
        "SERVER_NAME": "t",
        "SERVER_PORT": "80",
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(b""),
        "HTTP_X_CONVERSATION_ID": "conv_late",
    }
    result = app.wsgi_app(environ, lambda status, headers, exc_info=None: None)
    assert tracker.exits == []
    assert active.get() == "conv_late"  # still current while the server reads the body
    iterator = iter(result)
    assert next(iterator) == b"a"
    assert tracker.exits == []  # still inside while the body is produced
    assert next(iterator) == b"b"
    assert tracker.exits == []
    with pytest.raises(StopIteration):
        next(iterator)
    assert tracker.exits == [None]  # left when the body is complete
    assert active.get() is None
    result.close()
    result.close()  # a second close is harmless
    assert tracker.exits == [None]
    assert [s[1] for s in seen] == ["conv_late"] * 3
    # A response abandoned half-way is left at close().
    result = app.wsgi_app(environ, lambda status, headers, exc_info=None: None)
    assert next(iter(result)) == b"a"
    assert tracker.exits == [None]
    result.close()
    assert tracker.exits == [None, None]


def test_wsgi_error_while_streaming_propagates_and_close_leaves_the_scope() -> None:
    tracker = ScopedTracker()
    closed: list[bool] = []

    class Body:
        def __iter__(self) -> Iterator[bytes]:
            yield b"first"
            raise ValueError("generator failed")

        def close(self) -> None:
            closed.append(active.get() == "conv_err")

    def app(environ: Any, start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return Body()

    mw = AgentSightWSGIMiddleware(app, chat_routes=["POST /chat"], tracker=tracker)
    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/chat",
        "wsgi.input": io.BytesIO(b""),
        "HTTP_X_CONVERSATION_ID": "conv_err",
    }
    result: Any = mw(environ, lambda status, headers, exc_info=None: None)
    iterator = iter(result)
    assert next(iterator) == b"first"
    with pytest.raises(ValueError, match="generator failed"):
        next(iterator)
    # The scope is left with the error, as a handler raising inside it would be.
    assert tracker.exits == ["ValueError"]
    result.close()
    assert len(closed) == 1  # the app's close, once
    assert tracker.exits == ["ValueError"]


def test_context_variables_the_app_sets_stay_visible_around_it() -> None:
    # An outer middleware (an access log, say) reads what the app set in the server's
    # context, as it does without us: the app runs in that context, not a copy.
    user: contextvars.ContextVar[str | None] = contextvars.ContextVar("user", default=None)
    seen: list[str | None] = []

    def app(environ: Any, start_response: Any) -> Any:
        user.set(environ["HTTP_X_USER"])
        start_response("200 OK", [("Content-Type", "text/plain")])
        return iter([b"ok"])  # a streamed body

    mw = AgentSightWSGIMiddleware(app, chat_routes=["POST /chat"], tracker=ScopedTracker())

    def access_log(environ: Any, start_response: Any) -> Any:
        result = mw(environ, start_response)
        seen.append(user.get())
        return result

    for name in ("ann", "bob"):
        environ = {
            "REQUEST_METHOD": "POST",
            "PATH_INFO": "/chat",
            "wsgi.input": io.BytesIO(b""),
            "HTTP_X_USER": name,
        }
        context = contextvars.copy_context()  # a server thread's context
        result: Any = context.run(access_log, environ, lambda *args: None)
        assert context.run(b"".join, result) == b"ok"
        context.run(result.close)
    assert seen == ["ann", "bob"]


@pytest.mark.anyio
async def test_a_broken_scope_is_not_chained_to_the_apps_exception() -> None:
    # Tracebacks (and error trackers) must show the app's error alone, not "during
    # handling of the above exception" a tracker failure.
    class AppError(Exception):
        pass

    def wsgi_app(environ: Any, start_response: Any) -> Any:
        raise AppError("handler failed")

    async def asgi_app(scope: Any, receive: Any, send: Any) -> None:
        raise AppError("handler failed")

    asgi = AgentSightMiddleware(
        asgi_app, chat_routes=["POST /chat"], tracker=ScopedTracker(fail_enter=True)
    )
    wsgi = AgentSightWSGIMiddleware(
        wsgi_app, chat_routes=["POST /chat"], tracker=ScopedTracker(fail_enter=True)
    )
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/chat",
        "headers": [(b"x-conversation-id", b"conv_x")],
        "query_string": b"",
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        raise AssertionError("nothing is sent")

    with pytest.raises(AppError) as asgi_error:
        await asgi(scope, receive, send)
    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/chat",
        "wsgi.input": io.BytesIO(b""),
        "HTTP_X_CONVERSATION_ID": "conv_x",
    }
    with pytest.raises(AppError) as wsgi_error:
        wsgi(environ, lambda status, headers, exc_info=None: None)
    assert asgi_error.value.__context__ is None
    assert wsgi_error.value.__context__ is None
