"""Apps with the built-in client, run in their own processes by the delivery tests.

``python -m tests.apps.delivery_app asgi PORT`` serves a Starlette app with uvicorn;
``tests.apps.delivery_app:flask_app`` is a WSGI app for gunicorn. AGENTSIGHT_API_KEY and
AGENTSIGHT_API_ENDPOINT point at the stand-in API.
"""

from __future__ import annotations

import sys

from flask import Flask
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from agentsight_middleware import AgentSightMiddleware, AgentSightWSGIMiddleware


async def page(request: Request) -> Response:
    return HTMLResponse("<p>page</p>")


def _flask() -> Flask:
    app = Flask(__name__)

    @app.get("/")
    def index() -> str:
        return "<p>page</p>"

    app.wsgi_app = AgentSightWSGIMiddleware(  # type: ignore[method-assign]
        app.wsgi_app, widget_pages=["/"], shutdown_timeout=10
    )
    return app


# Built at import: under gunicorn --preload that is in the master, before the fork.
flask_app = _flask()


def main() -> None:
    import uvicorn

    port = int(sys.argv[2])
    app = AgentSightMiddleware(
        Starlette(routes=[Route("/", page)]), widget_pages=["/"], shutdown_timeout=10
    )
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main()
