"""Helpers for testing an app that uses the middleware: a tracker that records
calls, and a stand-in AgentSight API server speaking real HTTP on 127.0.0.1.

::

    from agentsight_middleware.testing import RecordingTracker

    tracker = RecordingTracker()
    app.add_middleware(AgentSightMiddleware, widget_pages=["/"], tracker=tracker)
    ...  # load "/" with a browser-like request
    tracker.wait_for(initialized=1)
    assert tracker.initialized[0]["device"] == "desktop"
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ._standin import RecordedRequest, StandInAgentSightAPI

__all__ = ["RecordedRequest", "RecordingTracker", "StandInAgentSightAPI", "TrackerCall"]


@dataclass(frozen=True)
class TrackerCall:
    method: str
    kwargs: dict[str, Any]
    thread_id: int = field(default_factory=threading.get_ident)
    at: float = field(default_factory=time.monotonic)

    @property
    def conversation_id(self) -> str:
        return str(self.kwargs["conversation_id"])


class RecordingTracker:
    """A thread-safe tracker with the classic SDK's two methods that records every call."""

    def __init__(self) -> None:
        self._calls: list[TrackerCall] = []
        self._changed = threading.Condition()

    def _record(self, method: str, kwargs: dict[str, Any]) -> None:
        with self._changed:
            self._calls.append(TrackerCall(method, kwargs))
            self._changed.notify_all()

    def initialize_conversation(self, conversation_id: str, **kwargs: Any) -> None:
        self._record("initialize_conversation", {"conversation_id": conversation_id, **kwargs})

    def get_or_create_conversation(self, conversation_id: str, **kwargs: Any) -> None:
        self._record("get_or_create_conversation", {"conversation_id": conversation_id, **kwargs})

    @property
    def calls(self) -> list[TrackerCall]:
        with self._changed:
            return list(self._calls)

    @property
    def initialized(self) -> list[dict[str, Any]]:
        """Keyword arguments of every ``initialize_conversation`` call, in order."""
        return [c.kwargs for c in self.calls if c.method == "initialize_conversation"]

    @property
    def used(self) -> list[dict[str, Any]]:
        """Keyword arguments of every ``get_or_create_conversation`` call, in order."""
        return [c.kwargs for c in self.calls if c.method == "get_or_create_conversation"]

    def wait_for(
        self,
        *,
        initialized: int = 0,
        used: int = 0,
        timeout: float = 5.0,
    ) -> None:
        """Block until at least this many calls of each kind arrived, or fail."""

        def done() -> bool:
            return len(self.initialized) >= initialized and len(self.used) >= used

        self._wait(done, timeout, f"{initialized} initialized and {used} used")

    def _wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    # Counts and the last ten: a test that made thousands of calls must not
                    # get a message of hundreds of kilobytes.
                    last = [(c.method, c.conversation_id) for c in self._calls[-10:]]
                    views = sum(1 for c in self._calls if c.method == "initialize_conversation")
                    raise AssertionError(
                        f"timed out after {timeout:g} s waiting for {what}; calls so far: "
                        f"{views} initialized and {len(self._calls) - views} used, the last "
                        f"{len(last)}: {last}"
                    )
                self._changed.wait(remaining)

    def clear(self) -> None:
        with self._changed:
            self._calls.clear()
