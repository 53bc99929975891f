"""The API body the worker builds for each event."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from agentsight_middleware._conversation import Conversation
from agentsight_middleware._events import ENGAGE, INITIALIZE, Event, tracker_kwargs
from agentsight_middleware._payload import build_payload, iso_timestamp

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
