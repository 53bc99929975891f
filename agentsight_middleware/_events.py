"""The record handed from the request path to the background worker."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

from ._conversation import Conversation, clamp

__all__ = ["ENGAGE", "INITIALIZE", "Event", "is_robot_view", "new_event", "tracker_kwargs"]

#: A widget page was viewed: the visitor had the chance to chat (``is_used: false``).
INITIALIZE = "initialize"
#: A chat request: the visitor really chatted (``is_used: true``).
ENGAGE = "engage"


class Event(NamedTuple):
    """What the request path hands to the worker; a tuple because one is built per event."""

    kind: str
    conversation: Conversation
    #: ``time.time()`` when the request was seen, not when the event is delivered.
    timestamp: float


#: ``new_event((kind, conversation, timestamp))``: tuple.__new__ skips the named
#: tuple's Python-level constructor, which costs the request path ~0.2 us.
new_event: Callable[[tuple[str, Conversation, float]], Event] = functools.partial(
    tuple.__new__, Event
)


def is_robot_view(event: Event, is_probe: Callable[[str], bool] | None) -> bool:
    """Whether ``event`` is a page view by a probe, monitor, script or crawler.

    Slow for a user agent not seen before (a regex over it, then ua-parser), so
    it runs in the background: a bot rotating its user agent would otherwise make
    every one of its requests pay, and the host app's requests with them.
    """
    if event.kind != INITIALIZE:
        return False
    conversation = event.conversation
    if is_probe is not None and is_probe(conversation.user_agent):
        return True
    return conversation.is_bot


def tracker_kwargs(
    conversation: Conversation, *, source: str | None, environment: str | None
) -> dict[str, Any]:
    """Keyword arguments for ``initialize_conversation`` / ``get_or_create_conversation``.

    This parses the user agent, so it runs off the event loop: in the worker for
    page views, in a thread for chat requests.
    """
    kwargs: dict[str, Any] = {
        "conversation_id": conversation.id,
        "customer_id": clamp(conversation.customer_id),
        "customer_ip_address": conversation.client_ip,
        "device": conversation.device,
        "source": clamp(source),
        "language": conversation.language,
        "metadata": conversation.metadata(),
    }
    # Only pass an environment the user chose: otherwise the tracker's own
    # configuration (``AGENTSIGHT_ENVIRONMENT`` for the SDK) decides.
    if environment is not None:
        kwargs["environment"] = environment
    return kwargs
