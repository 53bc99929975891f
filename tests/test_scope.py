"""A tracker's ``conversation_scope`` wraps the handler: the way the OpenTelemetry
based SDK attributes work to a conversation through context variables."""

from __future__ import annotations

import contextvars
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
