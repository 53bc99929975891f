"""The demo: a shop page with a chat widget, an echo chat endpoint, the middleware in front.

Run it with ``make demo`` (or ``python -m examples.demo``), open the URL it prints,
chat a little, then press Ctrl-C to see the interaction rate. With no
``AGENTSIGHT_API_KEY`` the events are kept in ``agentsight-events.sqlite3``; with one,
they go to AgentSight.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse

from agentsight_middleware import AgentSightMiddleware

from .common import WIDGET_PAGE, reply_to


def create_app(**options: Any) -> FastAPI:
    """The demo app; ``options`` go to the middleware (``tracker=``, ``local_store=``...)."""
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

    # The one line this project is about (no tracker: the API key, else the local store):
    app.add_middleware(
        AgentSightMiddleware, widget_pages=["/"], chat_routes=["POST /api/chat"], **options
    )
    return app


def main(argv: list[str] | None = None) -> None:
    import os

    from agentsight_middleware._base import check_local_store
    from agentsight_middleware._credentials import Credentials, resolve_environment
    from agentsight_middleware._store import DEFAULT_PATH
    from agentsight_middleware.cli import main as cli

    parser = argparse.ArgumentParser(description="AgentSight middleware demo shop")
    parser.add_argument("--host", default="127.0.0.1", help="interface (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument("--db", default=DEFAULT_PATH, help="local events file (no API key)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    has_key = bool(os.environ.get("AGENTSIGHT_API_KEY"))
    app = create_app() if has_key else create_app(local_store=args.db)
    try:
        # As the middleware will at the lifespan's start, but before the URL is printed:
        # a malformed AGENTSIGHT_* variable (or --db) then stops the demo with one line, not a link
        # to a server that is about to exit and the error twice (our log and uvicorn's).
        Credentials.resolve(api_key=None, endpoint=None, environment=None)
        resolve_environment(None)
        if not has_key:
            check_local_store(args.db)  # --db in a missing folder, another program's file
    except ValueError as error:
        raise SystemExit(f"agentsight-middleware is misconfigured: {error}") from None
    taken = _port_taken(args.host, args.port)
    if taken:
        # Before the URL is printed: it would point at whatever holds the port.
        raise SystemExit(
            f"{args.host}:{args.port} cannot be used ({taken}): pick another port, "
            f'e.g. make demo DEMO_ARGS="--port {args.port + 1}" or --port {args.port + 1}'
        )
    print(f"Demo shop with a chat widget: http://{args.host}:{args.port}/  (Ctrl-C to stop)")
    # uvicorn raises the signal that stopped it again once it has shut down: a SIGTERM
    # (kill, timeout, docker stop) then ended the demo before its report. Stopped so,
    # it ends as after Ctrl-C (uvicorn has its own handler while it serves).
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # lifespan="on": Starlette builds the middleware at the lifespan's start, and a bad
    # AGENTSIGHT_API_KEY must stop the demo there, not turn every request into a 500
    # (uvicorn's default, "auto", takes a failing lifespan for one the app lacks).
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", lifespan="on")
    if not has_key:
        print()
        if not os.path.exists(args.db):  # stopped before any visit: nothing was written
            print("No events: open the shop page and chat, then stop the demo again.")
            return
        cli(["report", "--db", args.db])


def _port_taken(host: str, port: int) -> str | None:
    """Why the demo could not listen on ``host:port`` (None when it can): uvicorn's own
    error comes after the start-up lines, with no hint."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as probe:
            # As uvicorn binds: a port left in TIME_WAIT by the last run is free.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


if __name__ == "__main__":
    main()
