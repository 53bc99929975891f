"""Flask: ``flask --app examples.flask_app run``."""

from __future__ import annotations

from typing import Any

from flask import Flask, jsonify, request

from agentsight_middleware import AgentSightWSGIMiddleware

from .common import WIDGET_PAGE, reply_to


def create_app(**options: Any) -> Flask:
    app = Flask(__name__)

    @app.get("/")
    def index() -> str:
        return WIDGET_PAGE

    @app.post("/api/chat")
    def chat() -> Any:
        data = request.get_json(silent=True) or {}
        conversation = request.environ["agentsight.conversation"]
        return jsonify(
            reply=reply_to(str(data.get("message", ""))), conversation_id=conversation.id
        )

    app.wsgi_app = AgentSightWSGIMiddleware(  # type: ignore[method-assign]
        app.wsgi_app, widget_pages=["/"], chat_routes=["POST /api/chat"], **options
    )
    return app


# No tracker: AGENTSIGHT_API_KEY if set, else the local store (agentsight-events.sqlite3).
app = create_app()
