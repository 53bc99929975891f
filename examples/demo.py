"""The demo: a shop page with a chat widget, an echo chat endpoint, the middleware in front.

Run it with ``make demo`` (or ``python -m examples.demo``), open the URL it prints,
chat a little, then press Ctrl-C to see the interaction rate.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse

from agentsight_middleware import AgentSightMiddleware

from .common import WIDGET_PAGE, ConsoleTracker, make_tracker, reply_to


def create_app(tracker: Any) -> FastAPI:
    app = FastAPI(title="AgentSight middleware demo")

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return WIDGET_PAGE

    @app.post("/api/chat")
    async def chat(request: Request) -> dict[str, str]:
        data = await request.json()
        return {
            "reply": reply_to(str(data.get("message", ""))),
            "conversation_id": request.state.agentsight.id,
        }

    # The one line this project is about:
    app.add_middleware(
        AgentSightMiddleware, widget_pages=["/"], chat_routes=["POST /api/chat"], tracker=tracker
    )
    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    tracker = make_tracker()
    print(f"Demo shop with a chat widget: http://{args.host}:{args.port}/  (Ctrl-C to stop)")
    try:
        uvicorn.run(create_app(tracker), host=args.host, port=args.port, log_level="warning")
    finally:
        if isinstance(tracker, ConsoleTracker):
            print(tracker.summary())


if __name__ == "__main__":
    main()
