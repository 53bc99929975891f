"""The JSON body of ``POST /api/conversations/``, built the way the official SDK builds it."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from json.encoder import encode_basestring_ascii
from typing import Any

from ._conversation import clamp
from ._events import ENGAGE, Event

__all__ = [
    "DEFAULT_ENVIRONMENT",
    "MAX_EVENT_CHARS",
    "build_payload",
    "encode_event",
    "iso_timestamp",
    "own_json",
    "without_extra_metadata",
]

# The classic SDK's generation of the "Track Interaction" docs (0.0.12-0.0.18)
# defaults to production; 0.0.4x defaults to development. A middleware in front
# of a live site is production unless told otherwise.
DEFAULT_ENVIRONMENT = "production"

# The date and time of one whole second, "YYYY-MM-DDTHH:MM:SS": events come in
# bursts within the same second, and formatting a datetime costs ~1.5 us an event.
_second: tuple[float, str] = (math.nan, "")


def iso_timestamp(seconds: float) -> str:
    """``datetime.fromtimestamp(seconds, timezone.utc).isoformat()``, character for character
    (microseconds rounded half to even, as datetime rounds them), for ``seconds`` >= 0."""
    global _second
    fraction, whole = math.modf(seconds)
    micro = round(fraction * 1e6)
    if micro >= 1_000_000:
        whole += 1.0
        micro -= 1_000_000
    cached, text = _second
    if cached != whole:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        _second = (whole, text)
    return f"{text}.{micro:06d}+00:00" if micro else f"{text}+00:00"


def build_payload(event: Event, *, source: str | None, environment: str | None) -> dict[str, Any]:
    """The API body for ``event``: ``is_used`` false for a page view, true for a chat.

    The timestamp is when the request was seen, not when it is sent: an event
    delivered late (after an outage, from the outbox) keeps its real time. The
    fields are those of ``tracker_kwargs`` (the SDK trackers' keywords), written out
    here: this runs once per event in the worker.
    """
    conversation = event.conversation
    return {
        "timestamp": iso_timestamp(event.timestamp),
        "conversation_id": conversation.id,
        "customer_id": clamp(conversation.customer_id),
        "customer_ip_address": conversation.client_ip,
        "device": conversation.device,
        "source": clamp(source),
        "language": conversation.language,
        "name": None,
        "environment": environment or DEFAULT_ENVIRONMENT,
        "metadata": conversation.metadata(),
        "is_used": event.kind == ENGAGE,
    }


#: An event's JSON at most, in chars. Ours is ~1 KiB; only a metadata hook's values make
#: more. Past it, the event goes without them (see without_extra_metadata): a queue of
#: 10,000 such events would otherwise hold gigabytes, and the API's echo of a huge event
#: (its answer holds the conversation) would pass the client's 1 MiB limit on answers.
MAX_EVENT_CHARS = 64 * 1024

#: The metadata keys the middleware writes, in Conversation.metadata's order; the others are
#: a hook's.
_OWN_KEYS = ["page_path", "page_url", "referrer", "user_agent", "rule", "conversation_id_source"]
OWN_METADATA = frozenset(_OWN_KEYS)


def without_extra_metadata(payload: dict[str, Any]) -> dict[str, Any]:
    """``payload`` with only the middleware's own metadata keys: the event still counts."""
    metadata = payload.get("metadata")
    if not isinstance(metadata, dict):
        return payload
    return {**payload, "metadata": {k: v for k, v in metadata.items() if k in OWN_METADATA}}


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities (which JSON cannot hold) as None, at any depth."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def encode_event(payload: dict[str, Any], encode: Callable[[Any], str]) -> tuple[str, str | None]:
    """``(json, what was left out or None)`` for an event, by ``encode`` (strict JSON, with
    ``default=str``): whatever a metadata hook returned, the event itself gets through.

    NaN and infinities go as null; a value whose ``str()`` raises (a lazy user object) or
    a key JSON cannot hold, and an event past :data:`MAX_EVENT_CHARS`, go without the
    hook's metadata values. Raises only if the event cannot be encoded even so.
    """
    note = None
    try:
        body = encode(payload)
    except ValueError:
        payload = _finite(payload)
        note = "NaN or infinity in the metadata hook's values, sent as null"
        try:
            body = encode(payload)
        except Exception:
            payload = without_extra_metadata(payload)
            body = encode(payload)
    except Exception as exc:
        note = f"the metadata hook's values could not be sent as JSON ({exc!r}); left out"
        payload = without_extra_metadata(payload)
        body = encode(payload)
    if len(body) > MAX_EVENT_CHARS:
        note = (
            f"an event was {len(body)} chars of JSON with the metadata hook's values, over "
            f"the {MAX_EVENT_CHARS} an event may be; sent without them"
        )
        body = encode(without_extra_metadata(payload))
    return body, note


#: The keys build_payload writes, in its order.
_KEYS = [
    "timestamp",
    "conversation_id",
    "customer_id",
    "customer_ip_address",
    "device",
    "source",
    "language",
    "name",
    "environment",
    "metadata",
    "is_used",
]


def own_json(payload: dict[str, Any]) -> str | None:
    """``payload``'s JSON as the HTTP sink's encoder (``separators=(",", ":")``, ASCII)
    writes it, or None where this cannot tell: other keys or key order (a hook's
    metadata), or a value other than a string or None (an ``is_used`` other than a bool).

    Written from its parts by json's own C string encoder, ~2x faster than the encoder's
    walk of the two dicts (~5.5 us an event, a tenth of the worker's CPU per event)."""
    if type(payload) is not dict:  # a subclass may give the encoder other items
        return None
    metadata = payload.get("metadata")
    if type(metadata) is not dict or list(metadata) != _OWN_KEYS or list(payload) != _KEYS:
        return None
    used = payload["is_used"]
    if used is not True and used is not False:
        return None
    esc = encode_basestring_ascii  # TypeError for None or a value other than a string
    # Fields build_payload may leave None are tested, the others go to esc as they are.
    customer = payload["customer_id"]
    address = payload["customer_ip_address"]
    device = payload["device"]
    source = payload["source"]
    language = payload["language"]
    name = payload["name"]
    referrer = metadata["referrer"]
    agent = metadata["user_agent"]
    try:
        return (
            f'{{"timestamp":{esc(payload["timestamp"])}'
            f',"conversation_id":{esc(payload["conversation_id"])}'
            f',"customer_id":{"null" if customer is None else esc(customer)}'
            f',"customer_ip_address":{"null" if address is None else esc(address)}'
            f',"device":{"null" if device is None else esc(device)}'
            f',"source":{"null" if source is None else esc(source)}'
            f',"language":{"null" if language is None else esc(language)}'
            f',"name":{"null" if name is None else esc(name)}'
            f',"environment":{esc(payload["environment"])}'
            f',"metadata":{{"page_path":{esc(metadata["page_path"])}'
            f',"page_url":{esc(metadata["page_url"])}'
            f',"referrer":{"null" if referrer is None else esc(referrer)}'
            f',"user_agent":{"null" if agent is None else esc(agent)}'
            f',"rule":{esc(metadata["rule"])}'
            f',"conversation_id_source":{esc(metadata["conversation_id_source"])}}}'
            f',"is_used":{"true" if used else "false"}}}'
        )
    except TypeError:  # a value other than a string (or None where it may be): the encoder's
        return None
