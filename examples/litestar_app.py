"""Litestar, registered through its own middleware list: ``uvicorn examples.litestar_app:app``."""

from __future__ import annotations

from typing import Any

from litestar import Litestar, Request, get, post
from litestar.middleware import DefineMiddleware

from agentsight_middleware import AgentSightMiddleware, current_conversation

from .common import WIDGET_PAGE, reply_to


@get("/", media_type="text/html")
async def index() -> str:
    return WIDGET_PAGE


@post("/api/chat")
async def chat(request: Request[Any, Any, Any]) -> dict[str, Any]:
    data = await request.json()
    conversation = current_conversation()
    return {
        "reply": reply_to(str(data.get("message", ""))),
        "conversation_id": conversation.id if conversation else None,
    }


def create_app(**options: Any) -> Litestar:
    return Litestar(
        route_handlers=[index, chat],
        middleware=[
            DefineMiddleware(
                AgentSightMiddleware, widget_pages=["/"], chat_routes=["POST /api/chat"], **options
            )
        ],
    )


# No tracker: AGENTSIGHT_API_KEY if set, else the local store (agentsight-events.sqlite3).
app = create_app()
