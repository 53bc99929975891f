"""The JSON body of ``POST /api/conversations/``, built the way the official SDK builds it."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from ._events import ENGAGE, Event, tracker_kwargs

__all__ = ["DEFAULT_ENVIRONMENT", "build_payload", "iso_timestamp"]

# The classic SDK's generation of the "Track Interaction" docs (0.0.12-0.0.18)
# defaults to production; 0.0.4x defaults to development. A middleware in front
# of a live site is production unless told otherwise.
DEFAULT_ENVIRONMENT = "production"


def iso_timestamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat()


def build_payload(event: Event, *, source: str | None, environment: str | None) -> dict[str, Any]:
    """The API body for ``event``: ``is_used`` false for a page view, true for a chat.

    The timestamp is when the request was seen, not when it is sent: an event
    delivered late (after an outage, from the outbox) keeps its real time.
    """
    kwargs = tracker_kwargs(event.conversation, source=source, environment=None)
    return {
        "timestamp": iso_timestamp(event.timestamp),
        "conversation_id": kwargs["conversation_id"],
        "customer_id": kwargs["customer_id"],
        "customer_ip_address": kwargs["customer_ip_address"],
        "device": kwargs["device"],
        "source": kwargs["source"],
        "language": kwargs["language"],
        "name": None,
        "environment": environment or DEFAULT_ENVIRONMENT,
        "metadata": kwargs["metadata"],
        "is_used": event.kind == ENGAGE,
    }
