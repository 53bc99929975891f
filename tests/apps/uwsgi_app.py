"""A Flask shop for uWSGI (``tests/test_uwsgi.py``), with the built-in client.

Built at import, which under uWSGI's default (no ``--lazy-apps``) is in the master,
before the workers are forked. AGENTSIGHT_API_KEY and AGENTSIGHT_API_ENDPOINT point at
the stand-in API; UWSGI_TEST_PAGE is the file that ``/file`` sends, UWSGI_TEST_OUTBOX the
outbox file (none when empty).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

from flask import Flask, Response, send_file, stream_with_context

from agentsight_middleware import AgentSightWSGIMiddleware, current_conversation


def _id() -> str:
    conversation = current_conversation()
    return "none" if conversation is None else conversation.id


def _flask() -> Flask:
    app = Flask(__name__)

    @app.get("/")
    def index() -> str:
        return "<!doctype html><p>shop</p>"

    @app.get("/file")
    def file() -> Any:
        # Werkzeug hands the file to the server's wsgi.file_wrapper: under uWSGI, a
        # function that returns the very file object it was given.
        return send_file(os.environ["UWSGI_TEST_PAGE"], mimetype="text/html")

    @app.get("/slow")
    def slow() -> str:
        time.sleep(60)  # a request still in progress when uWSGI is stopped
        return "late"

    @app.post("/api/chat")
    def chat() -> dict[str, str]:
        return {"conversation_id": _id()}

    @app.post("/api/stream")
    def stream() -> Response:
        def generate() -> Iterator[str]:
            for part in ("a", "b", "c"):
                yield f"{part}:{_id()}\n"  # the body runs after the view returned

        return Response(stream_with_context(generate()), mimetype="text/plain")

    app.wsgi_app = AgentSightWSGIMiddleware(  # type: ignore[method-assign]
        app.wsgi_app,
        widget_pages=["/", "/file"],
        chat_routes=["POST /api/chat", "POST /api/stream"],
        shutdown_timeout=10,
        outbox=os.environ.get("UWSGI_TEST_OUTBOX") or None,
    )
    return app


app = _flask()
