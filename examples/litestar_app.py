"""Litestar, wrapped as a whole: ``uvicorn examples.litestar_app:app``.

Not through ``Litestar(middleware=[DefineMiddleware(AgentSightMiddleware, ...)])``: Litestar
builds its middleware once per route, so that way each route gets its own queue and
worker thread, mounted apps hide their mount point from it, and it never sees lifespan
(which flushes the events at shutdown). Wrapped, it is one middleware for the app.
"""

from __future__ import annotations

from typing import Any

from litestar import Litestar, Request, get, post

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


def create_app(**options: Any) -> AgentSightMiddleware:
    return AgentSightMiddleware(
        Litestar(route_handlers=[index, chat]),
        widget_pages=["/"],
        chat_routes=["POST /api/chat"],
        **options,
    )


# No tracker: AGENTSIGHT_API_KEY if set, else the local store (agentsight-events.sqlite3).
app = create_app()
