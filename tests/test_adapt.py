"""The middleware adapts what it is given: a classic tracker is made per-request safe,
and an adapter that needs no engage call is spared it."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from agentsight_middleware import AgentSightMiddleware
from agentsight_middleware.sdk import ClassicTracker
from agentsight_middleware.testing import RecordingTracker


class Config:
    conversation_id: str | None = None


class ClassicLookAlike(RecordingTracker):
    """The classic SDK's shape: the current id lives on ``config``."""

    def __init__(self) -> None:
        super().__init__()
        self.config = Config()
        self.ids_seen_by_handler: list[Any] = []

    def send_tracked_data(self) -> None:
        pass


async def chat(request: Request) -> Response:
    return PlainTextResponse("ok")


def test_a_classic_tracker_is_wrapped_automatically() -> None:
    classic = ClassicLookAlike()
    mw = AgentSightMiddleware(Starlette(), chat_routes=["POST /chat"], tracker=classic)
    assert isinstance(mw._core.delivery.tracker, ClassicTracker)  # type: ignore[union-attr]


@pytest.mark.anyio
async def test_an_adapter_that_skips_engage_is_not_called() -> None:
    class ScopeOnly(RecordingTracker):
        agentsight_skip_engage = True

    tracker = ScopeOnly()
    app = Starlette(routes=[Route("/chat", chat, methods=["POST"])])
    mw = AgentSightMiddleware(app, chat_routes=["POST /chat"], tracker=tracker)
    transport = httpx.ASGITransport(app=mw)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        response = await c.post("/chat", headers={"x-conversation-id": "conv_1"})
    assert response.text == "ok"
    assert tracker.used == []
