"""A widget page behind the middleware with ``tracker=AgentSightSDK()`` (agentsight 0.1.x),
for bursts of page views.

Run by ``tests/test_sdk_otel.py`` under an SDK venv's interpreter as::

    python -m tests.apps.sdk_burst_app FRAMEWORK FD

FRAMEWORK is ``starlette`` (uvicorn) or ``flask`` (werkzeug's threaded server); FD is a
listening socket. ``GET /stats`` answers the middleware's ``stats()`` and what it said at
WARNING and above (``said``). From the environment: ``TEST_MAX_QUEUE_SIZE`` (the SDK's
``max_queue_size``), ``TEST_QUEUE_WAIT`` (``AgentSightSDK.queue_wait``) and
``TEST_EXPORT_INTERVAL_MS``; OpenTelemetry reads ``OTEL_BSP_MAX_EXPORT_BATCH_SIZE`` itself.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

from agentsight_middleware import AgentSightMiddleware, AgentSightWSGIMiddleware
from agentsight_middleware.sdk import AgentSightSDK
from tests.apps.sdk_shop import PAGE, serve


class Said(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(logging.Formatter().format(record))  # with its traceback


said = Said()
logging.getLogger("agentsight_middleware").addHandler(said)


def options() -> dict[str, Any]:
    init: dict[str, Any] = {
        "auto_instrument": False,
        "export_interval_ms": int(os.environ.get("TEST_EXPORT_INTERVAL_MS", "5000")),
    }
    if "TEST_MAX_QUEUE_SIZE" in os.environ:
        init["max_queue_size"] = int(os.environ["TEST_MAX_QUEUE_SIZE"])
    tracker = AgentSightSDK(**init)
    if "TEST_QUEUE_WAIT" in os.environ:
        tracker.queue_wait = float(os.environ["TEST_QUEUE_WAIT"])
    return {"widget_pages": ["/"], "tracker": tracker}


def report(middleware: Any) -> str:
    return json.dumps({"stats": middleware.stats(), "said": said.lines})


def starlette_shop() -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, PlainTextResponse, Response
    from starlette.routing import Route

    middlewares: list[AgentSightMiddleware] = []

    async def page(request: Request) -> HTMLResponse:
        return HTMLResponse(PAGE)

    async def health(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    async def stats(request: Request) -> Response:
        return Response(report(middlewares[0]), media_type="application/json")

    app = Starlette(routes=[Route("/", page), Route("/health", health), Route("/stats", stats)])
    middlewares.append(AgentSightMiddleware(app, **options()))
    return middlewares[0]


def flask_shop() -> Any:
    from flask import Flask

    app = Flask(__name__)
    middleware = AgentSightWSGIMiddleware(app.wsgi_app, **options())

    @app.get("/")
    def page() -> str:
        return PAGE

    @app.get("/health")
    def health() -> str:
        return "ok"

    @app.get("/stats")
    def stats() -> Any:
        return app.response_class(report(middleware), mimetype="application/json")

    app.wsgi_app = middleware  # type: ignore[method-assign]
    return app


def main() -> None:
    framework, fd = sys.argv[1], int(sys.argv[2])
    serve(framework, fd, starlette_shop if framework == "starlette" else flask_shop)


if __name__ == "__main__":
    main()
