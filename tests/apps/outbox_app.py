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
    ``tests.apps.outbox_app:flask_app()``); each page answers its worker's pid."""
    import os

    from flask import Flask

    from agentsight_middleware import AgentSightWSGIMiddleware

    app = Flask(__name__)

    @app.get("/")
    def index() -> tuple[str, dict[str, str]]:
        return "<p>page</p>", {"X-Pid": str(os.getpid())}

    app.wsgi_app = AgentSightWSGIMiddleware(  # type: ignore[method-assign]
        app.wsgi_app, widget_pages=["/"], outbox=os.environ["AGENTSIGHT_TEST_OUTBOX"]
    )
    return app
