"""A chat app using the OpenTelemetry-based ``agentsight`` SDK (0.1.x) behind the middleware.

Run by ``tests/test_sdk_otel.py`` under an SDK venv's interpreter as::

    python -m tests.apps.sdk_otel_app FRAMEWORK FD

FRAMEWORK is ``fastapi-async`` (an ``async def`` endpoint), ``fastapi-sync`` (a ``def``
endpoint: Starlette's thread pool) or ``flask`` (threaded werkzeug server); FD is a
listening socket. AGENTSIGHT_API_KEY and AGENTSIGHT_API_ENDPOINT point the SDK at the
stand-in API.

The chat handler opens no conversation itself: the middleware's
``AgentSightSDK()`` tracker runs it inside ``agentsight.conversation(<visitor's id>, ...)``.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import agentsight
from pydantic import BaseModel

from agentsight_middleware import AgentSightMiddleware, AgentSightWSGIMiddleware
from agentsight_middleware.sdk import AgentSightSDK

#: How long the "LLM" takes: long enough for concurrent requests to overlap.
THINK_SECONDS = 0.05


class Chat(BaseModel):
    message: str


def reply_to(message: str) -> str:
    return f"echo: {message}"


def chat_blocking(message: str) -> dict[str, Any]:
    with agentsight.turn():
        agentsight.user_message(message)
        time.sleep(THINK_SECONDS)
        reply = reply_to(message)
        agentsight.agent_message(reply)
    return {"reply": reply}


def options() -> dict[str, Any]:
    return {
        "widget_pages": ["/"],
        "chat_routes": ["POST /api/chat"],
        # A short export interval: the test waits for the batches.
        "tracker": AgentSightSDK(export_interval_ms=100, auto_instrument=False),
    }


def fastapi_app(framework: str) -> Any:
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse, PlainTextResponse

    app = FastAPI()

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return "<html><body>chat widget</body></html>"

    @app.get("/health", response_class=PlainTextResponse)
    def health() -> str:
        return "ok"

    if framework == "fastapi-sync":

        @app.post("/api/chat")
        def chat(body: Chat) -> dict[str, Any]:
            return chat_blocking(body.message)

    else:

        @app.post("/api/chat")
        async def chat_async(body: Chat) -> dict[str, Any]:
            with agentsight.turn():
                agentsight.user_message(body.message)
                await asyncio.sleep(THINK_SECONDS)
                reply = reply_to(body.message)
                agentsight.agent_message(reply)
            return {"reply": reply}

    app.add_middleware(AgentSightMiddleware, **options())
    return app


def flask_app() -> Any:
    from flask import Flask, jsonify, request

    app = Flask(__name__)

    @app.get("/")
    def page() -> str:
        return "<html><body>chat widget</body></html>"

    @app.get("/health")
    def health() -> str:
        return "ok"

    @app.post("/api/chat")
    def chat() -> Any:
        return jsonify(chat_blocking(request.get_json()["message"]))

    app.wsgi_app = AgentSightWSGIMiddleware(app.wsgi_app, **options())  # type: ignore[method-assign]
    return app


def main() -> None:
    framework, fd = sys.argv[1], int(sys.argv[2])
    if framework == "flask":
        from werkzeug.serving import make_server

        server = make_server("127.0.0.1", 0, flask_app(), threaded=True, fd=fd)
        server.serve_forever()
    else:
        import uvicorn

        config = uvicorn.Config(fastapi_app(framework), fd=fd, log_level="warning", lifespan="on")
        uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
