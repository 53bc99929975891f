"""A chat app using the OpenTelemetry-based ``agentsight`` SDK (0.1.x) behind the middleware.

Run by ``tests/test_sdk_otel.py`` under an SDK venv's interpreter as::

    python -m tests.apps.sdk_otel_app FRAMEWORK FD

FRAMEWORK is ``fastapi-async`` (an ``async def`` endpoint), ``fastapi-sync`` (a ``def``
endpoint: Starlette's thread pool), ``flask`` (threaded werkzeug server), ``django-asgi``
(Django's ASGI handler under uvicorn, no lifespan of its own) or ``fastapi-failing-shutdown``
(the async one, with a lifespan of its own that raises at shutdown); FD is a
listening socket. AGENTSIGHT_API_KEY and AGENTSIGHT_API_ENDPOINT point the SDK at the
stand-in API.

The chat handler opens no conversation itself: the middleware's
``AgentSightSDK()`` tracker runs it inside ``agentsight.conversation(<visitor's id>, ...)``.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import agentsight  # type: ignore[import-not-found]  # only in the SDK's own venv

from agentsight_middleware.sdk import AgentSightSDK
from tests.apps.sdk_shop import (
    THINK_SECONDS,
    django_shop,
    fastapi_shop,
    flask_shop,
    reply_to,
    serve,
)


def chat_blocking(message: str) -> dict[str, Any]:
    with agentsight.turn():
        agentsight.user_message(message)
        time.sleep(THINK_SECONDS)
        reply = reply_to(message)
        agentsight.agent_message(reply)
    return {"reply": reply}


def options() -> dict[str, Any]:
    return {
        "widget_pages": ["/"],
        "chat_routes": ["POST /api/chat"],
        # A short export interval: the test waits for the batches (one test sets a long
        # one: what is sent then is what the shutdown flushed).
        "tracker": AgentSightSDK(
            export_interval_ms=int(os.environ.get("TEST_EXPORT_INTERVAL_MS", "100")),
            auto_instrument=False,
        ),
    }


async def chat_async(message: str) -> dict[str, Any]:
    with agentsight.turn():
        agentsight.user_message(message)
        await asyncio.sleep(THINK_SECONDS)
        reply = reply_to(message)
        agentsight.agent_message(reply)
    return {"reply": reply}


def main() -> None:
    framework, fd = sys.argv[1], int(sys.argv[2])
    if framework == "flask":
        serve(framework, fd, lambda: flask_shop(options(), chat_blocking))
    elif framework == "django-asgi":
        serve(framework, fd, lambda: django_shop(options(), chat_blocking))
    elif framework == "fastapi-failing-shutdown":
        serve(framework, fd, failing_shutdown_shop)
    else:
        serve(framework, fd, lambda: fastapi_shop(framework, options(), chat_blocking, chat_async))


def failing_shutdown_shop() -> Any:
    """The async shop whose own lifespan fails at shutdown (a pool closed twice, say)."""
    app = fastapi_shop("fastapi-async", options(), chat_blocking, chat_async)

    @asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        yield
        raise RuntimeError("the database pool was closed already")

    app.router.lifespan_context = lifespan
    return app


if __name__ == "__main__":
    main()
