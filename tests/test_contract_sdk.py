"""Contract with the official SDK: the built-in client sends what ``agentsight`` sends.

For each pinned SDK release, in a venv of its own (see ``sdk_env``), both sides talk
to one stand-in API:

* ours: the middleware with ``api_key=`` in front of a Starlette app, driven by a
  page view and a chat request whose headers carry known facts, delivered through
  the real background worker and ``HttpSink``;
* the SDK: ``ConversationTracker().initialize_conversation(...)`` and
  ``get_or_create_conversation(...)`` + ``send_tracked_data()``, called with the
  values those facts stand for, written out literally below.

Then the bodies are compared field for field (``timestamp`` only has to be ISO 8601
in UTC on both sides: each side stamps its own clock) and so are the headers the
API reads. The expected values are literal, so this also pins what the middleware
derives from a request: it must be what a hand-written SDK call would have sent.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from agentsight_middleware import AgentSightMiddleware
from agentsight_middleware.__version__ import __version__
from agentsight_middleware.testing import RecordedRequest, StandInAgentSightAPI

from .conftest import CHROME_DESKTOP, IPHONE
from .sdk_env import SDKEnvironmentError, sdk_env, sdk_python

#: 0.0.44: the latest classic release. 0.0.18: the "Track Interaction" docs' generation.
SDK_VERSIONS = ("0.0.44", "0.0.18")

#: The shape of the SDK's ``generate_conversation_id()`` (both generations).
SDK_ID = re.compile(r"conv_[0-9a-f]{12}")

#: The app's own metadata (``metadata=``): every JSON type, and text that is not ASCII.
EXTRA_METADATA: dict[str, Any] = {
    "plan": "pro",
    "seats": 3,
    "ratio": 0.5,
    "trial": False,
    "tags": ["beta", "eu"],
    "owner": {"team": "growth", "since": None},
    "note": "café ☕",
}

#: A signed-in visitor on a desktop browser loads the widget page from a search result.
PAGE_HEADERS = {
    "user-agent": CHROME_DESKTOP,
    "accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
    "accept-language": "fr-CA,fr;q=0.9,en;q=0.8",
    "sec-fetch-dest": "document",
    "sec-fetch-mode": "navigate",
    "referer": "https://www.google.com/search?q=shop&token=abc",
    "x-customer": "cust-42",
}
PAGE_PEER = "203.0.113.7"
#: What the SDK is told for that page view (the conversation id is the minted one).
PAGE_INPUTS: dict[str, Any] = {
    "customer_id": "cust-42",
    "customer_ip_address": "203.0.113.7",
    "device": "desktop",
    "source": "web",
    "language": "fr-CA",
    "environment": "production",
    "metadata": {
        "page_path": "/",
        "page_url": "http://shop.test/?utm_source=newsletter",
        "referrer": "https://www.google.com/search?q=shop",
        "user_agent": CHROME_DESKTOP,
        "rule": "/",
        "conversation_id_source": "minted",
        **EXTRA_METADATA,
    },
}

#: An anonymous visitor on a phone (IPv6) chats; the widget sends the id in a header.
CHAT_ID = "conv_0123456789ab"
CHAT_HEADERS = {
    "user-agent": IPHONE,
    "accept": "application/json",
    "accept-language": "de-DE,de;q=0.9",
    "content-type": "application/json",
    "x-conversation-id": CHAT_ID,
}
CHAT_PEER = "2001:db8::7"
#: What the SDK is told for that chat request.
CHAT_INPUTS: dict[str, Any] = {
    "conversation_id": CHAT_ID,
    "customer_id": None,
    "customer_ip_address": "2001:db8::7",
    "device": "mobile",
    "source": "web",
    "language": "de-DE",
    "environment": "production",
    "metadata": {
        "page_path": "/api/chat",
        "page_url": "http://shop.test/api/chat",
        "referrer": None,
        "user_agent": IPHONE,
        "rule": "POST /api/chat",
        "conversation_id_source": "header",
        **EXTRA_METADATA,
    },
}

# Runs in the SDK's venv (isolated mode: nothing of ours is importable there).
# The tracker reads AGENTSIGHT_API_KEY / _API_ENDPOINT / _ENVIRONMENT like any app's would.
SDK_SCRIPT = """
import json, sys
from agentsight import ConversationTracker

calls = json.load(sys.stdin)
tracker = ConversationTracker()
tracker.initialize_conversation(**calls["initialize"])
tracker.get_or_create_conversation(**calls["get_or_create"])
result = tracker.send_tracked_data()
if result["summary"]["errors"]:
    sys.exit("send_tracked_data failed: " + json.dumps(result, default=str))
"""
SDK_TIMEOUT = 60.0


@dataclass(frozen=True)
class Exchange:
    """What the stand-in received from each side, for one SDK release."""

    version: str
    api_key: str
    sdk_initialize: RecordedRequest
    sdk_get_or_create: RecordedRequest
    ours_initialize: RecordedRequest
    ours_engage: RecordedRequest
    started: float
    ended: float


async def _page(request: Request) -> Response:
    return HTMLResponse("<!doctype html><title>Shop</title><div id=chat-widget></div>")


async def _chat(request: Request) -> Response:
    return JSONResponse({"answer": "Hello!"})


def _customer(request: Request) -> str | None:
    return request.headers.get("x-customer")


async def _send(
    app: Any,
    method: str,
    url: str,
    *,
    headers: Mapping[str, str],
    peer: str,
    content: bytes | None = None,
) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, client=(peer, 50000))
    async with httpx.AsyncClient(transport=transport, base_url="http://shop.test") as client:
        return await client.request(method, url, headers=dict(headers), content=content)


def _run_ours(api: StandInAgentSightAPI) -> str:
    """A page view and a chat request through the middleware; the minted conversation id."""
    app = Starlette(routes=[Route("/", _page), Route("/api/chat", _chat, methods=["POST"])])
    mw = AgentSightMiddleware(
        app,
        widget_pages=["/"],
        chat_routes=["POST /api/chat"],
        api_key=api.api_key,
        endpoint=api.url,
        customer_id=_customer,
        metadata=EXTRA_METADATA,
    )
    try:
        page = asyncio.run(
            _send(
                mw,
                "GET",
                "/?utm_source=newsletter&access_token=s3cret",
                headers=PAGE_HEADERS,
                peer=PAGE_PEER,
            )
        )
        assert page.status_code == 200
        # Delivered in this order: the chat's conversation is not the page's.
        assert mw.flush(10), mw.stats()
        chat = asyncio.run(
            _send(
                mw,
                "POST",
                "/api/chat",
                headers=CHAT_HEADERS,
                peer=CHAT_PEER,
                content=b'{"message": "Hi"}',
            )
        )
        assert chat.status_code == 200
        assert mw.flush(10), mw.stats()
        stats = mw.stats()
    finally:
        mw.close(10)
    assert stats["sent"] == 2, stats
    minted = page.cookies.get("agentsight_conversation_id")
    assert minted is not None, page.headers
    return minted


def _run_sdk(python: Path, api: StandInAgentSightAPI, page_id: str) -> None:
    calls = {
        "initialize": {"conversation_id": page_id, **PAGE_INPUTS},
        "get_or_create": CHAT_INPUTS,
    }
    env = sdk_env(
        {
            "AGENTSIGHT_API_KEY": api.api_key,
            "AGENTSIGHT_API_ENDPOINT": api.url,
            "AGENTSIGHT_ENVIRONMENT": "production",
        }
    )
    try:
        done = subprocess.run(
            [str(python), "-I", "-c", SDK_SCRIPT],
            input=json.dumps(calls),
            capture_output=True,
            text=True,
            env=env,
            timeout=SDK_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"the SDK script did not finish within {SDK_TIMEOUT:g} s", pytrace=False)
    if done.returncode != 0:
        pytest.fail(
            f"the SDK script failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}",
            pytrace=False,
        )


def _conversation_posts(api: StandInAgentSightAPI) -> list[RecordedRequest]:
    return [r for r in api.requests if r.path == "/api/conversations/"]


@pytest.fixture(scope="module", params=SDK_VERSIONS, ids=lambda v: f"agentsight=={v}")
def exchange(request: pytest.FixtureRequest) -> Iterator[Exchange]:
    version: str = request.param
    python: Path | None = None
    error = ""
    try:
        python = sdk_python(version)
    except SDKEnvironmentError as exc:
        error = str(exc)
    if python is None:
        # A failure, never a skip: without the SDK the contract is not checked.
        # (Outside the except block, so the report is pip's words, not a chain.)
        pytest.fail(f"cannot build the venv for agentsight=={version}: {error}", pytrace=False)
    with pytest.MonkeyPatch.context() as mp, StandInAgentSightAPI() as api:
        # The same configuration as the SDK's process: only the environment comes from
        # the environment (key and endpoint are passed, as an app would).
        for name in ("AGENTSIGHT_API_KEY", "AGENTSIGHT_API_ENDPOINT"):
            mp.delenv(name, raising=False)
        mp.setenv("AGENTSIGHT_ENVIRONMENT", "production")
        started = time.time()
        page_id = _run_ours(api)
        ours = _conversation_posts(api)
        assert len(ours) == 2, ours
        _run_sdk(python, api, page_id)
        api.wait_for(conversations=4)
        ended = time.time()
        sdk = _conversation_posts(api)[2:]
        assert len(sdk) == 2, sdk
        yield Exchange(
            version=version,
            api_key=api.api_key,
            sdk_initialize=sdk[0],
            sdk_get_or_create=sdk[1],
            ours_initialize=ours[0],
            ours_engage=ours[1],
            started=started,
            ended=ended,
        )


def _body(request: RecordedRequest) -> dict[str, Any]:
    assert request.status == 201, request
    assert isinstance(request.json, dict), request
    return request.json


def _without_timestamp(body: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in body.items() if key != "timestamp"}


def _utc(value: object) -> datetime:
    assert isinstance(value, str), value
    moment = datetime.fromisoformat(value)
    assert moment.utcoffset() == timedelta(0), f"{value!r} is not in UTC"
    return moment


def test_the_minted_id_has_the_sdks_shape(exchange: Exchange) -> None:
    assert SDK_ID.fullmatch(_body(exchange.ours_initialize)["conversation_id"])


def test_initialize_body_matches_the_sdk_field_for_field(exchange: Exchange) -> None:
    sdk, ours = _body(exchange.sdk_initialize), _body(exchange.ours_initialize)
    assert set(ours) == set(sdk)
    assert _without_timestamp(ours) == _without_timestamp(sdk)
    # ...and both are what the inputs say: a page view, not yet used.
    expected = {
        "conversation_id": ours["conversation_id"],
        "name": None,
        "is_used": False,
        **PAGE_INPUTS,
    }
    assert _without_timestamp(sdk) == expected


def test_get_or_create_body_matches_the_sdk_field_for_field(exchange: Exchange) -> None:
    sdk, ours = _body(exchange.sdk_get_or_create), _body(exchange.ours_engage)
    assert set(ours) == set(sdk)
    assert _without_timestamp(ours) == _without_timestamp(sdk)
    expected = {"name": None, "is_used": True, **CHAT_INPUTS}
    assert _without_timestamp(sdk) == expected


def test_timestamps_are_iso_8601_in_utc_on_both_sides(exchange: Exchange) -> None:
    # Each side stamps its own clock: the SDK when it sends (initialize) or when the
    # call was made (get_or_create), ours when the request was seen. Same format.
    window = (exchange.started - 1, exchange.ended + 1)
    for request in (
        exchange.sdk_initialize,
        exchange.sdk_get_or_create,
        exchange.ours_initialize,
        exchange.ours_engage,
    ):
        moment = _utc(_body(request)["timestamp"])
        assert window[0] <= moment.timestamp() <= window[1], (moment, window)
        assert _body(request)["timestamp"].endswith("+00:00")


def test_headers_the_api_reads_match(exchange: Exchange) -> None:
    for request in (
        exchange.sdk_initialize,
        exchange.sdk_get_or_create,
        exchange.ours_initialize,
        exchange.ours_engage,
    ):
        assert request.method == "POST"
        assert request.path == "/api/conversations/"
        assert request.headers["authorization"] == f"Api-Key {exchange.api_key}"
        assert request.headers["content-type"] == "application/json"


def test_user_agents_name_each_client(exchange: Exchange) -> None:
    # The one deliberate header difference: ours names itself, the SDK sends requests'.
    for request in (exchange.sdk_initialize, exchange.sdk_get_or_create):
        assert request.headers["user-agent"].startswith("python-requests/")
    for request in (exchange.ours_initialize, exchange.ours_engage):
        assert request.headers["user-agent"] == f"agentsight-middleware/{__version__}"
