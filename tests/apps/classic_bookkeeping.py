"""Run by ``tests/test_sdk_classic.py`` under an SDK venv's interpreter: ``ClassicTracker``'s
bookkeeping of stored items against the real classic SDK, which posts to the stand-in API
named by AGENTSIGHT_API_ENDPOINT. Prints what it saw as JSON.

A chat request waits for its LLM while 60 other visitors chat (each tracks and sends), then 60
requests are never tracked, with ``max_unsent`` at 50: the sent items must not count, the
untracked ones are dropped past the cap, and the waiting request keeps its conversation item.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable

from agentsight import ConversationTracker  # type: ignore[import-not-found]  # SDK venv only

from agentsight_middleware.sdk import ClassicTracker

logging.disable(logging.CRITICAL)
tracker = ConversationTracker()
track_user: Callable[[str], None] = (
    getattr(tracker, "track_human_message", None) or tracker.track_question
)
track_agent: Callable[[str], None] = (
    getattr(tracker, "track_agent_message", None) or tracker.track_answer
)
adapter = ClassicTracker(tracker)
adapter.max_unsent = 50
entered, answered = threading.Event(), threading.Event()


def slow_chat() -> None:
    with adapter.conversation_scope("conv_000000005100", metadata={"page_path": "/api/chat"}):
        entered.set()
        answered.wait(30)  # the LLM
        track_user("slow question")
        track_agent("slow answer")
        tracker.send_tracked_data()


thread = threading.Thread(target=slow_chat)
thread.start()
entered.wait(30)
for n in range(60):
    with adapter.conversation_scope(f"conv_{n:012x}", metadata={"page_path": "/api/chat"}):
        track_user(f"question {n}")
        track_agent(f"answer {n}")
        tracker.send_tracked_data()
waiting_bookkeeping = len(adapter._unsent)
for n in range(60, 120):  # a flood of requests the handler never tracks (422s, say)
    with adapter.conversation_scope(f"conv_{n:012x}", metadata={"page_path": "/api/chat"}):
        pass
flooded_bookkeeping = len(adapter._unsent)
answered.set()
thread.join(30)
with adapter.conversation_scope("conv_ffffffffffff", metadata={}):
    pass  # a later chat request: it forgets what was sent meanwhile
print(
    json.dumps(
        {
            "bookkeeping_while_waiting": waiting_bookkeeping,
            "bookkeeping_after_flood": flooded_bookkeeping,
            "bookkeeping_after": len(adapter._unsent),
            "held_after": sum(len(e["items"]) for e in tracker._tracked_data.values()),
        }
    )
)
