"""Plain Starlette, middleware wrapping the app: ``uvicorn examples.starlette_app:app``."""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from agentsight_middleware import AgentSightMiddleware

from .common import WIDGET_PAGE, reply_to


async def index(request: Request) -> Response:
    return HTMLResponse(WIDGET_PAGE)


async def chat(request: Request) -> Response:
    data = await request.json()
    return JSONResponse(
        {
            "reply": reply_to(str(data.get("message", ""))),
            "conversation_id": request.state.agentsight.id,
        }
    )


def create_app(**options: Any) -> AgentSightMiddleware:
    app = Starlette(routes=[Route("/", index), Route("/api/chat", chat, methods=["POST"])])
    return AgentSightMiddleware(app, widget_pages=["/"], chat_routes=["POST /api/chat"], **options)


# No tracker: AGENTSIGHT_API_KEY if set, else the local store (agentsight-events.sqlite3).
app = create_app()
