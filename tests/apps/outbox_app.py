"""An app with the built-in client and a durable outbox, served by uvicorn.

Run as ``python -m tests.apps.outbox_app PORT OUTBOX`` with AGENTSIGHT_API_KEY and
AGENTSIGHT_API_ENDPOINT set. Tests kill it with SIGKILL in the middle of an outage.
``flask_app()`` is the same for gunicorn.
"""

from __future__ import annotations

import sys
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from agentsight_middleware import AgentSightMiddleware


async def page(request: Request) -> Response:
    return HTMLResponse("<p>page</p>")


def main() -> None:
    port, outbox = int(sys.argv[1]), sys.argv[2]
    app = AgentSightMiddleware(
        Starlette(routes=[Route("/", page)]), widget_pages=["/"], outbox=outbox
    )
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main()


def flask_app() -> Any:
    """A Flask app with the outbox at $AGENTSIGHT_TEST_OUTBOX, for gunicorn (a factory:
    ``tests.apps.outbox_app:flask_app()``); each page and chat (``POST /api/chat``)
    answers its worker's pid. With $AGENTSIGHT_TEST_SLOW_START (seconds), a worker's
    one-time work at its start takes that much longer, as on a busy machine."""
    import os

    from flask import Flask

    from agentsight_middleware import AgentSightWSGIMiddleware

    slow = float(os.environ.get("AGENTSIGHT_TEST_SLOW_START", "0"))
    if slow:
        import time

        from agentsight_middleware import _device

        build = _device._build

        def slow_build() -> Any:
            time.sleep(slow)
            return build()

        _device._build = slow_build

    app = Flask(__name__)

    @app.get("/")
    def index() -> tuple[str, dict[str, str]]:
        return "<p>page</p>", {"X-Pid": str(os.getpid())}

    @app.post("/api/chat")
    def chat() -> tuple[str, dict[str, str]]:
        return '{"answer": "hi"}', {"X-Pid": str(os.getpid()), "Content-Type": "application/json"}

    app.wsgi_app = AgentSightWSGIMiddleware(  # type: ignore[method-assign]
        app.wsgi_app,
        widget_pages=["/"],
        chat_routes=["POST /api/chat"],
        outbox=os.environ["AGENTSIGHT_TEST_OUTBOX"],
    )
    return app
