"""What the examples share: the chat widget page, and the tracker they report to."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

logger = logging.getLogger("examples")

# Plain HTML and JavaScript, no build step: the page a newcomer sees in the demo.
WIDGET_PAGE = (Path(__file__).parent / "widget.html").read_text(encoding="utf-8")


def reply_to(message: str) -> str:
    return f"You said: {message}" if message else "Say something!"


class ConsoleTracker:
    """Logs each call; stands in for ``agentsight.ConversationTracker`` without an API key."""

    def __init__(self) -> None:
        self.initialized: set[str] = set()
        self.used: set[str] = set()
        self._lock = threading.Lock()

    def initialize_conversation(self, conversation_id: str, **fields: Any) -> None:
        with self._lock:
            self.initialized.add(conversation_id)
        logger.info(
            "initialize_conversation %s device=%s language=%s ip=%s page=%s",
            conversation_id,
            fields.get("device"),
            fields.get("language"),
            fields.get("customer_ip_address"),
            (fields.get("metadata") or {}).get("page_path"),
        )

    def get_or_create_conversation(self, conversation_id: str, **fields: Any) -> None:
        with self._lock:
            self.used.add(conversation_id)
        logger.info("get_or_create_conversation %s", conversation_id)

    def summary(self) -> str:
        with self._lock:
            initialized, used = len(self.initialized), len(self.used & self.initialized)
        rate = 100.0 * used / initialized if initialized else 0.0
        return f"{initialized} initialized, {used} used: interaction rate {rate:.1f} %"


def make_tracker() -> Any:
    """The official SDK's tracker when an API key is configured, else a console one."""
    if os.environ.get("AGENTSIGHT_API_KEY"):
        from agentsight import ConversationTracker  # type: ignore[import-not-found]

        return ConversationTracker()
    return ConsoleTracker()
