"""A Flask shop whose ``/parser`` route tells whether this process has the user-agent parser
(``built``), is building it now (``building``, the build's lock is held) or has not started
(``none``), then its pid (``built 1234``). ``make_app()`` for gunicorn
(``tests.apps.parser_app:make_app()``), its events kept in the local store that
PARSER_TEST_STORE names."""

from __future__ import annotations

import os

from flask import Flask

from agentsight_middleware import AgentSightWSGIMiddleware


def parser_state() -> str:
    from agentsight_middleware import _device

    if _device._engine is not None:
        return "built"
    return "building" if _device._lock.locked() else "none"


def make_app() -> Flask:
    app = Flask(__name__)

    @app.get("/")
    def page() -> str:
        return "<!doctype html><title>shop</title><p>shop</p>"

    @app.get("/parser")
    def parser() -> str:
        return f"{parser_state()} {os.getpid()}"

    app.wsgi_app = AgentSightWSGIMiddleware(  # type: ignore[method-assign]
        app.wsgi_app, widget_pages=["/"], local_store=os.environ["PARSER_TEST_STORE"]
    )
    return app
