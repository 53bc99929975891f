"""A chat request the app refuses (a 4xx answer) is no chat under the built-in delivery.

The SDKs' own flow calls their tracking inside the chat handler, which a request refused
before it (no CSRF token, not signed in, an invalid body, throttled, no such route) never
reaches: counted as used, a site whose every chat failed a CSRF check showed a healthy
interaction rate. Any other answer (2xx, a redirect, a 5xx), or none at all (the app failed,
the client left), is a chat. Real servers, real frameworks, the local store.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Header, HTTPException
from fastapi.responses import RedirectResponse, StreamingResponse
from pydantic import BaseModel
from werkzeug.serving import make_server

from agentsight_middleware import AgentSightMiddleware, AgentSightWSGIMiddleware
from agentsight_middleware._store import LocalStore, unsent

from .conftest import serving, uvicorn_server

ID = "X-Conversation-ID"
SIGNED_IN = {"x-signed-in": "yes"}


def _used(db: Path) -> list[str]:
    """The ids of the chats (``is_used`` events) the file holds, sorted."""
    with LocalStore(db) as store:
        rows = unsent(store, 1000)
    return sorted(p["conversation_id"] for _, p in rows if p is not None and p["is_used"])


class Message(BaseModel):
    message: str


def _fastapi() -> FastAPI:
    api = FastAPI()

    @api.post("/api/chat")
    async def chat(body: Message, x_signed_in: str | None = Header(default=None)) -> Any:
        if x_signed_in is None:
            raise HTTPException(401, "sign in first")
        if body.message == "boom":
            raise RuntimeError("the model is down")
        if body.message == "redirect":  # a form that posts, then shows the answer
            return RedirectResponse("/", status_code=303)
        if body.message == "stream":

            async def tokens() -> Any:
                for token in ("Hel", "lo"):
                    yield f"data: {token}\n\n"

            return StreamingResponse(tokens(), media_type="text/event-stream")
        return {"reply": "hi"}

    return api


def test_asgi_refused_chats_are_not_sent(tmp_path: Path) -> None:
    db = tmp_path / "events.sqlite3"
    mw = AgentSightMiddleware(_fastapi(), chat_routes=["POST /api/chat"], local_store=db)
    asked = [
        ("conv_0000000000ok", SIGNED_IN, {"message": "hi"}, 200),
        ("conv_00000000n401", {}, {"message": "hi"}, 401),
        ("conv_00000000n422", SIGNED_IN, {"text": "hi"}, 422),
        ("conv_000000000500", SIGNED_IN, {"message": "boom"}, 500),
        ("conv_000000000303", SIGNED_IN, {"message": "redirect"}, 303),
        ("conv_0000000stream", SIGNED_IN, {"message": "stream"}, 200),
    ]
    # A connection each: uvicorn closes one whose app raised, racing the next request on it.
    fresh = {"connection": "close"}
    with uvicorn_server(mw) as url, httpx.Client(base_url=url, headers=fresh) as client:
        for cid, headers, body, status in asked:
            answer = client.post("/api/chat", json=body, headers={ID: cid, **headers})
            assert answer.status_code == status, (cid, answer.text)  # the app's own answer
        assert mw.flush(10)
        assert mw.stats()["refused_chats"] == 2
    assert _used(db) == sorted(
        ["conv_0000000000ok", "conv_000000000500", "conv_000000000303", "conv_0000000stream"]
    )


def test_asgi_a_chat_the_visitor_left_before_its_answer_is_sent(tmp_path: Path) -> None:
    # No answer at all, so no status to read: the visitor chatted, then went away.
    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            return
        while (await receive())["type"] != "http.disconnect":
            pass

    db = tmp_path / "events.sqlite3"
    mw = AgentSightMiddleware(app, chat_routes=["POST /api/chat"], local_store=db)
    with uvicorn_server(mw) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as visitor:
            visitor.sendall(
                b"POST /api/chat HTTP/1.1\r\nHost: shop\r\nContent-Length: 2\r\n"
                b"X-Conversation-ID: conv_0000000000gone\r\n\r\n{}"
            )
            time.sleep(0.2)  # the app is waiting for the visitor's next move
        deadline = time.monotonic() + 10
        while mw.stats()["enqueued"] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert mw.flush(10)
    assert _used(db) == ["conv_0000000000gone"]


def _flask() -> Any:
    from flask import Flask, abort, redirect, request

    app = Flask(__name__)

    @app.post("/api/chat")
    def chat() -> Any:
        if "X-Signed-In" not in request.headers:
            abort(401)
        message = (request.get_json(silent=True) or {}).get("message")
        if message == "boom":
            raise RuntimeError("the model is down")  # Flask answers 500
        if message == "redirect":
            return redirect("/", 303)
        return {"reply": "hi"}

    return app


def _werkzeug(app: Any) -> Any:
    return serving(make_server("127.0.0.1", 0, app, threaded=True))


def test_wsgi_refused_chats_are_not_sent(tmp_path: Path) -> None:
    db = tmp_path / "events.sqlite3"
    flask = _flask()
    mw = AgentSightWSGIMiddleware(
        flask.wsgi_app, chat_routes=["POST /api/chat", "POST /api/chat/*"], local_store=db
    )
    flask.wsgi_app = mw
    asked = [
        ("/api/chat", "conv_0000000000ok", SIGNED_IN, {"message": "hi"}, 200),
        ("/api/chat", "conv_00000000n401", {}, {"message": "hi"}, 401),
        ("/api/chat/nowhere", "conv_00000000n404", SIGNED_IN, {"message": "hi"}, 404),
        ("/api/chat", "conv_000000000500", SIGNED_IN, {"message": "boom"}, 500),
        ("/api/chat", "conv_000000000303", SIGNED_IN, {"message": "redirect"}, 303),
    ]
    with _werkzeug(flask) as url, httpx.Client(base_url=url) as client:
        for path, cid, headers, body, status in asked:
            answer = client.post(path, json=body, headers={ID: cid, **headers})
            assert answer.status_code == status, (cid, answer.text)
        assert mw.flush(10)
        assert mw.stats()["refused_chats"] == 2
    mw.close()
    assert _used(db) == sorted(["conv_0000000000ok", "conv_000000000500", "conv_000000000303"])


def test_wsgi_a_chat_whose_app_fails_before_answering_is_sent(tmp_path: Path) -> None:
    # A generator app calls start_response at its first step; failing before it, there
    # is no status to read: the server answers 500, and the visitor did chat.
    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        # The body read first: Werkzeug's server drains an unread one with a blocking read.
        environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        raise RuntimeError("the model is down")
        yield b""  # a generator: nothing runs until the server iterates it

    db = tmp_path / "events.sqlite3"
    mw = AgentSightWSGIMiddleware(app, chat_routes=["POST /api/chat"], local_store=db)
    with _werkzeug(mw) as url, httpx.Client(base_url=url) as client:
        answer = client.post("/api/chat", json={}, headers={ID: "conv_000000000500"})
        assert answer.status_code == 500
        assert mw.flush(10)
    mw.close()
    assert _used(db) == ["conv_000000000500"]


@pytest.fixture
def django_csrf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    monkeypatch.chdir(tmp_path)  # the example's module keeps a local store in the cwd
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "examples.django_site.settings")
    import django
    from django.test import override_settings

    django.setup()
    with override_settings(
        ROOT_URLCONF="tests.apps.django_csrf_urls",
        MIDDLEWARE=["django.middleware.csrf.CsrfViewMiddleware"],
    ):
        yield


@pytest.mark.usefixtures("django_csrf")
def test_django_a_chat_refused_by_its_csrf_check_is_not_sent(tmp_path: Path) -> None:
    from django.core.wsgi import get_wsgi_application

    db = tmp_path / "events.sqlite3"
    mw = AgentSightWSGIMiddleware(
        get_wsgi_application(), chat_routes=["POST /api/chat/"], local_store=db
    )
    secret = "a" * 32  # Django takes an unmasked secret in the header as a token too
    with _werkzeug(mw) as url, httpx.Client(base_url=url) as client:
        refused = client.post("/api/chat/", json={}, headers={ID: "conv_0000000n403"})
        assert refused.status_code == 403
        client.cookies.set("csrftoken", secret)
        token = {"X-CSRFToken": secret}
        answered = client.post("/api/chat/", json={}, headers={ID: "conv_00000000ok", **token})
        assert answered.status_code == 200, answered.text
        assert mw.flush(10)
        assert mw.stats()["refused_chats"] == 1
    mw.close()
    assert _used(db) == ["conv_00000000ok"]
