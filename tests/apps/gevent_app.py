"""The Flask shop behind the middleware, for gunicorn's gevent worker (``tests/test_gevent.py``).

GEVENT_TEST_SINK picks where the events go: ``api`` (the built-in client, AGENTSIGHT_API_KEY
and AGENTSIGHT_API_ENDPOINT pointing at the stand-in API), ``store`` (no key: the local store,
GEVENT_TEST_FILE), ``outbox`` (the built-in client with a durable outbox, GEVENT_TEST_FILE),
``tracker`` (a tracker of blocking methods writing one line per call to
GEVENT_TEST_FILE), ``pooled-tracker`` (the same, taking 8 page views at once) or
``async-tracker`` (the same, of coroutines). ``/health`` is answered before the middleware: a
test waiting for the server to start does not make the first request the middleware sees."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from flask import Flask, Response, request

from agentsight_middleware import AgentSightWSGIMiddleware, current_conversation

PAGE = b"<!doctype html><title>shop</title><p>shop</p>"
SINK = os.environ.get("GEVENT_TEST_SINK", "api")
FILE = os.environ.get("GEVENT_TEST_FILE", "")


class FileTracker:
    """A tracker as an app writes one: blocking calls (a sleep standing in for its HTTP
    request), each written as a JSON line."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._lock = threading.Lock()

    def _write(self, method: str, conversation_id: str) -> None:
        time.sleep(0.01)
        line = json.dumps({"method": method, "conversation_id": conversation_id})
        with self._lock, open(self._path, "a", encoding="utf-8") as out:
            out.write(line + "\n")

    def initialize_conversation(self, conversation_id: str, **kwargs: Any) -> None:
        self._write("initialize_conversation", conversation_id)

    def get_or_create_conversation(self, conversation_id: str, **kwargs: Any) -> None:
        self._write("get_or_create_conversation", conversation_id)


class PooledFileTracker(FileTracker):
    """One that takes page views from several threads at once, as the classic SDK's adapter
    (``ClassicTracker``) says it does."""

    agentsight_initialize_threads = 8


class AsyncFileTracker(FileTracker):
    """One of coroutines: under WSGI the middleware runs them on a loop of its own."""

    async def initialize_conversation(self, conversation_id: str, **kwargs: Any) -> None:  # type: ignore[override]
        self._write("initialize_conversation", conversation_id)

    async def get_or_create_conversation(self, conversation_id: str, **kwargs: Any) -> None:  # type: ignore[override]
        self._write("get_or_create_conversation", conversation_id)


def _options() -> dict[str, Any]:
    rules: dict[str, Any] = {
        "widget_pages": ["/"],
        "chat_routes": ["POST /api/chat"],
        "shutdown_timeout": 10,
    }
    if SINK == "store":
        return {**rules, "local_store": FILE}
    if SINK == "outbox":
        return {**rules, "outbox": FILE}
    if SINK == "tracker":
        return {**rules, "tracker": FileTracker(FILE)}
    if SINK == "pooled-tracker":
        return {**rules, "tracker": PooledFileTracker(FILE)}
    if SINK == "async-tracker":
        return {**rules, "tracker": AsyncFileTracker(FILE)}
    return rules


shop = Flask(__name__)


@shop.get("/")
def index() -> Response:
    return Response(PAGE, content_type="text/html; charset=utf-8")


@shop.post("/api/chat")
def chat() -> Response:
    conversation = current_conversation()
    named = "none" if conversation is None else conversation.id
    return Response(
        request.get_data(),
        content_type="application/octet-stream",
        headers={"X-Conversation": named},
    )


async def _looked_up() -> bytes:
    await asyncio.sleep(0.05)  # a coroutine library's request: the greenlet switches out
    return b"looked up"


@shop.get("/run")
def run() -> Response:
    """A view using a coroutine library, as a WSGI app does: in a loop of its own."""
    return Response(asyncio.run(_looked_up()), content_type="text/plain")


@shop.get("/async")
async def async_view() -> Response:
    """Flask's ``async def`` view (asgiref's AsyncToSync)."""
    return Response(await _looked_up(), content_type="text/plain")


shop.wsgi_app = AgentSightWSGIMiddleware(shop.wsgi_app, **_options())  # type: ignore[method-assign]


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    if environ.get("PATH_INFO") == "/health":
        start_response("204 No Content", [])
        return [b""]
    return shop(environ, start_response)
