"""The API body the worker builds for each event."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from agentsight_middleware._conversation import Conversation
from agentsight_middleware._events import ENGAGE, INITIALIZE, Event, tracker_kwargs
from agentsight_middleware._payload import build_payload, encode_event, iso_timestamp, own_json
from agentsight_middleware.sinks.http import _encode, _event_json

CHROME = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36"
)


@given(
    st.one_of(
        st.floats(min_value=0, max_value=4_102_444_800, allow_nan=False),  # up to 2100
        # Whole seconds, and microseconds on the rounding edge (x.5 us), both ways.
        st.integers(min_value=0, max_value=4_102_444_800).map(float),
        st.integers(min_value=0, max_value=10**12).map(lambda n: n / 1e6 + 0.5e-6),
    )
)
@example(1764133697.9999996)  # rounds up into the next second
@example(1764133697.0000004)
@example(0.0)
def test_iso_timestamp_is_datetime_isoformat_character_for_character(seconds: float) -> None:
    expected = datetime.fromtimestamp(seconds, timezone.utc).isoformat()
    assert iso_timestamp(seconds) == expected
    assert iso_timestamp(seconds) == expected  # the second's text, now from the cache


def _conversation(**fields: Any) -> Conversation:
    base: dict[str, Any] = {
        "id": "conv_0123456789ab",
        "id_source": "cookie",
        "kind": "widget",
        "rule": "/",
        "peer": "203.0.113.7",
        "user_agent": CHROME,
        "accept_language": "de-CH,de;q=0.9,en;q=0.8",
        "scheme": "https",
        "host": "shop.example",
        "path": "/pricing",
        "query": "utm_source=news",
        "referrer": "https://www.example.org/a",
    }
    base.update(fields)
    return Conversation(**base)


@pytest.mark.parametrize("kind", [INITIALIZE, ENGAGE])
@pytest.mark.parametrize(
    ("fields", "source", "environment"),
    [
        ({}, "web", None),
        ({"customer_id": "c" * 300, "extra_metadata": {"plan": "pro"}}, "s" * 300, "development"),
        ({"customer_id": "", "peer": None, "user_agent": ""}, None, None),
        ({"customer_id": "cust-1", "accept_language": None}, "", "production"),
        ({"customer_id": "cust\x00-1", "path": "/docs/a\x00b"}, "w\x00eb", None),
    ],
    ids=["plain", "clamped", "empty", "no-language", "nul"],
)
def test_the_payload_carries_the_trackers_fields(
    kind: str, fields: dict[str, Any], source: str | None, environment: str | None
) -> None:
    # The SDK trackers get tracker_kwargs(); the API body must say the same things.
    conversation = _conversation(**fields)
    payload = build_payload(
        Event(kind, conversation, 1764133697.25), source=source, environment=environment
    )
    expected = tracker_kwargs(conversation, source=source, environment=None)
    assert payload == {
        "timestamp": "2025-11-26T05:08:17.250000+00:00",
        **expected,
        "name": None,
        "environment": environment or "production",
        "is_used": kind == ENGAGE,
    }


def test_no_nul_reaches_the_api_in_a_string() -> None:
    # A decoded path may hold one (/docs/a%00b under a catch-all rule), a customer_id hook
    # may return one: Django REST framework's CharField answers 400 to a NUL, PostgreSQL
    # refuses one in text and jsonb, and the event was lost.
    conversation = _conversation(customer_id="cust\x00-1", path="/docs/a\x00b")
    payload = build_payload(Event(ENGAGE, conversation, 1764133697.25), source="w\x00eb",
                            environment=None)  # fmt: skip
    assert payload["customer_id"] == "cust-1"
    assert payload["source"] == "web"
    assert payload["metadata"]["page_path"] == "/docs/a%00b"
    assert payload["metadata"]["page_url"] == "https://shop.example/docs/a%00b?utm_source=news"


def test_no_nul_reaches_the_api_in_the_user_agent_or_referrer() -> None:
    # uWSGI and Werkzeug pass a NUL in a header value through (uvicorn and gunicorn answer
    # 400): metadata.user_agent and metadata.referrer carried it to the API, whose store
    # refuses it in jsonb as in text (see the test above), and the event was lost.
    conversation = _conversation(
        user_agent=CHROME + "\x00", referrer="https://www.example.org/a?q=x\x00y"
    )
    payload = build_payload(Event(INITIALIZE, conversation, 1764133697.25), source=None,
                            environment=None)  # fmt: skip
    assert payload["metadata"]["user_agent"] == CHROME
    assert payload["metadata"]["referrer"] == "https://www.example.org/a?q=x%00y"
    assert "\\u0000" not in json.dumps(payload)


def test_no_nul_reaches_the_api_in_the_page_urls_query() -> None:
    # Werkzeug's server passes a raw NUL in the query string through (QUERY_STRING
    # "a=b\x00c", tried): page_url keeps the query as received, and carried it to the API.
    conversation = _conversation(query="utm_source=a\x00b")
    payload = build_payload(Event(INITIALIZE, conversation, 1764133697.25), source=None,
                            environment=None)  # fmt: skip
    assert payload["metadata"]["page_url"] == "https://shop.example/pricing?utm_source=a%00b"
    assert "\\u0000" not in json.dumps(payload)


def test_a_path_of_nuls_stays_within_the_url_length_once_escaped() -> None:
    from agentsight_middleware._facts import MAX_URL_LENGTH

    conversation = _conversation(path="/" + "\x00" * 3000)
    payload = build_payload(Event(INITIALIZE, conversation, 1764133697.25), source=None,
                            environment=None)  # fmt: skip
    page_path = payload["metadata"]["page_path"]
    assert len(page_path) <= MAX_URL_LENGTH
    assert page_path.startswith("/%00%00")
    assert page_path.endswith("%00")  # no torn escape


_TEXT = st.text(st.characters(), max_size=40)  # NUL, non-ASCII, lone surrogates included


@given(
    user_agent=_TEXT,
    accept_language=st.one_of(st.none(), _TEXT),
    host=st.one_of(st.none(), _TEXT),
    path=_TEXT.map(lambda text: "/" + text),
    query=_TEXT,
    referrer=st.one_of(st.none(), _TEXT.map(lambda text: "https://example.org/" + text)),
    conversation_id=_TEXT,
    customer_id=st.one_of(st.none(), _TEXT),
    source=st.one_of(st.none(), _TEXT),
    environment=st.one_of(st.none(), _TEXT),
    kind=st.sampled_from([INITIALIZE, ENGAGE]),
)
@settings(deadline=None, max_examples=300)
def test_own_json_writes_what_the_http_sinks_encoder_writes(
    user_agent: str,
    accept_language: str | None,
    host: str | None,
    path: str,
    query: str,
    referrer: str | None,
    conversation_id: str,
    customer_id: str | None,
    source: str | None,
    environment: str | None,
    kind: str,
) -> None:
    conversation = _conversation(
        id=conversation_id,
        user_agent=user_agent,
        accept_language=accept_language,
        host=host,
        path=path,
        query=query,
        referrer=referrer,
        customer_id=customer_id,
    )
    payload = build_payload(
        Event(kind, conversation, 1764133697.25), source=source, environment=environment
    )
    assert own_json(payload) == _encode(payload)
    assert _event_json(payload) == encode_event(payload, _encode)


class _Items(dict[str, Any]):
    """A dict whose items() the encoder reads, and not its keys and values."""

    def items(self) -> Any:
        return [("page_path", "/other")]


@pytest.mark.parametrize(
    "change",
    [
        lambda p: p["metadata"].update(plan="pro"),  # a hook's metadata
        lambda p: p["metadata"].update(rule=7),
        lambda p: p.update(is_used=1),
        lambda p: p.update(language=1.5),
        lambda p: p.update(device=["desktop"]),
        lambda p: p.update(metadata=None),
        lambda p: p.pop("name"),
        lambda p: p.update(name=p.pop("name")),  # the same keys in another order
        lambda p: p.update(metadata=_Items(p["metadata"])),
        lambda p: p.update(environment=None),  # None where build_payload writes none
        lambda p: p["metadata"].update(rule=None),
    ],
)
def test_own_json_leaves_to_the_encoder_what_build_payload_does_not_write(
    change: Callable[[dict[str, Any]], None],
) -> None:
    payload = build_payload(
        Event(INITIALIZE, _conversation(), 1764133697.25), source="web", environment=None
    )
    assert own_json(payload) is not None
    change(payload)
    assert own_json(payload) is None
    assert _event_json(payload) == encode_event(payload, _encode)


def test_event_json_leaves_an_event_too_long_to_the_encoder() -> None:
    # Only the configuration's strings (an environment, a rule) are not cut to a length.
    payload = build_payload(
        Event(INITIALIZE, _conversation(), 1764133697.25), source="web", environment="e" * 70_000
    )
    body = own_json(payload)
    assert body is not None
    assert body == _encode(payload)
    assert _event_json(payload) == encode_event(payload, _encode)
    assert _event_json(payload)[1] is not None  # said, as before
