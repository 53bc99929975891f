"""A chat app using the classic ``agentsight`` SDK (0.0.12 - 0.0.44) behind the middleware.

Run by ``tests/test_sdk_classic.py`` under an SDK venv's interpreter as::

    python -m tests.apps.sdk_classic_app FRAMEWORK MODE FD

FRAMEWORK is ``fastapi-sync`` (a ``def`` endpoint: Starlette's thread pool),
``fastapi-async`` (an ``async def`` endpoint), ``fastapi-executor`` (an ``async def``
endpoint calling the SDK in ``loop.run_in_executor()``, which the README says not to do:
no request context there) or ``flask`` (threaded werkzeug server);
MODE is ``naive`` (the middleware calls the ``ConversationTracker``'s
``initialize_conversation`` / ``get_or_create_conversation`` directly) or ``adapter``
(``tracker=ClassicTracker(ConversationTracker())``); FD is a listening socket.
AGENTSIGHT_API_KEY and AGENTSIGHT_API_ENDPOINT point the SDK at the stand-in API.

The chat handler does only what an app using the SDK does: record the visitor's
message, "think" (a short sleep standing in for the LLM), record the reply, send.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from agentsight import ConversationTracker  # type: ignore[import-not-found]  # SDK venv only

from agentsight_middleware.sdk import ClassicTracker
from tests.apps.sdk_shop import THINK_SECONDS, fastapi_shop, flask_shop, reply_to, serve

tracker = ConversationTracker()
# 0.0.4x: track_human_message / track_agent_message; 0.0.12 - 0.0.18: track_question / ...
track_user: Callable[[str], None] = (
    getattr(tracker, "track_human_message", None) or tracker.track_question
)
track_agent: Callable[[str], None] = (
    getattr(tracker, "track_agent_message", None) or tracker.track_answer
)


def send() -> str | None:
    """``send_tracked_data()``; a tracking failure must not fail the chat."""
    try:
        tracker.send_tracked_data()
    except Exception as exc:  # NoDataToSendException when another request took our data
        return f"{type(exc).__name__}: {exc}"
    return None


def chat_blocking(message: str) -> dict[str, Any]:
    track_user(message)
    time.sleep(THINK_SECONDS)
    reply = reply_to(message)
    track_agent(reply)
    return {"reply": reply, "tracking_error": send()}


def options(mode: str) -> dict[str, Any]:
    if mode == "naive":
        # The middleware calling the SDK's two methods as it calls any tracker, as a
        # naive middleware does (and as ours would if it ever adapted a classic
        # tracker by itself: this keeps showing what the SDK does on its own).
        middleware_tracker: Any = SimpleNamespace(
            initialize_conversation=tracker.initialize_conversation,
            get_or_create_conversation=tracker.get_or_create_conversation,
        )
    else:
        middleware_tracker = ClassicTracker(tracker)
        if "UNSENT_GRACE" in os.environ:  # a test's: how long an untracked item may wait
            middleware_tracker.unsent_grace = float(os.environ["UNSENT_GRACE"])
    return {
        "widget_pages": ["/"],
        "chat_routes": ["POST /api/chat"],
        "tracker": middleware_tracker,
    }


async def chat_async(message: str) -> dict[str, Any]:
    from starlette.concurrency import run_in_threadpool

    track_user(message)
    await asyncio.sleep(THINK_SECONDS)
    reply = reply_to(message)
    track_agent(reply)
    # Blocking HTTP: off the event loop (the thread gets the request's context).
    error = await run_in_threadpool(send)
    return {"reply": reply, "tracking_error": error}


async def chat_in_executor(message: str) -> dict[str, Any]:
    """The SDK called from the loop's default executor: a thread without the request's
    context, where the SDK has no current conversation."""
    return await asyncio.get_running_loop().run_in_executor(None, chat_blocking, message)


def held() -> dict[str, int]:
    """What the SDK holds in memory, unsent: conversations and items."""
    data = tracker._tracked_data
    return {"conversations": len(data), "items": sum(len(c["items"]) for c in data.values())}


def main() -> None:
    framework, mode, fd = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if framework == "flask":

        def flask_app() -> Any:
            app = flask_shop(options(mode), chat_blocking)
            app.get("/debug/held")(held)
            return app

        serve(framework, fd, flask_app)
    else:

        def fastapi_app() -> Any:
            if framework == "fastapi-executor":
                app = fastapi_shop("fastapi-async", options(mode), chat_blocking, chat_in_executor)
            else:
                app = fastapi_shop(framework, options(mode), chat_blocking, chat_async)
            app.get("/debug/held")(held)
            return app

        serve(framework, fd, fastapi_app)


if __name__ == "__main__":
    main()
