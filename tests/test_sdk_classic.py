"""The classic ``agentsight`` SDK (0.0.12 - 0.0.44) behind the middleware, for real.

Each test serves ``tests/apps/sdk_classic_app.py`` in a subprocess running an
isolated venv with the pinned SDK, points the SDK at the stand-in API started here,
and has 12 visitors (each with its own cookie jar) load the widget page and then
chat at the same moment. The stand-in records every ``/api/conversations/`` and
``/api/track/`` post, which tells which conversation each message was filed under.

What really happens (issue 5): the SDK keeps the current conversation in
``tracker.config.conversation_id``, one attribute for the whole process.
``get_or_create_conversation`` sets it, the handler's ``track_*`` calls and
``send_tracked_data`` read it later, so concurrent chat requests file their
messages under each other's conversation (or lose them: ``send_tracked_data`` of
one request sends, then deletes, another request's items). ``ClassicTracker``
makes the attribute per-request, and then every message lands where it belongs.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from agentsight_middleware.testing import RecordingTracker, StandInAgentSightAPI
from tests.apps.sdk_harness import (
    COOKIE,
    Visitor,
    app_python,
    drive_visitors,
    make_visitors,
    serve,
)
from tests.conftest import in_forked_child

MODULE = "tests.apps.sdk_classic_app"
ROOT = Path(__file__).resolve().parent.parent
#: The last release of each classic generation (0.0.43 is 0.0.44's code; 0.0.12 is
#: 0.0.18's without the ``name`` field).
CLASSIC = ["0.0.44", "0.0.18"]
VISITORS = 12
MESSAGES = 2  # chat requests per visitor, one after the other
WAIT = 20.0  # seconds the stand-in is waited for, at most


@pytest.fixture(params=CLASSIC)
def sdk_version(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def api() -> Iterator[StandInAgentSightAPI]:
    # A fresh stand-in per test: its conversation rows are numbered from 1, so the
    # ``conversation`` key of a message post (the row the SDK got back when it
    # posted the conversation) is the index of that row in ``api.conversations``.
    with StandInAgentSightAPI() as stand_in:
        yield stand_in


@dataclass
class Filing:
    """Where the message posts went."""

    expected: int  # messages the visitors' requests tracked: a user and an agent message each
    posts: int  # /api/track/ posts received
    wrong_id: int  # posts whose conversation_id is another visitor's
    wrong_row: int  # right conversation_id, but linked to no row or another's (``conversation``)
    lost: int  # messages never posted under their own conversation
    details: list[str]

    @property
    def misfiled(self) -> int:
        return self.wrong_id + self.wrong_row

    def __str__(self) -> str:
        return (
            f"{self.misfiled}/{self.posts} posts misfiled ({self.wrong_id} under another "
            f"visitor's conversation_id, {self.wrong_row} linked to no or another row), "
            f"{self.lost}/{self.expected} messages never filed right; e.g. {self.details[:3]}"
        )


def filing(api: StandInAgentSightAPI, visitors: list[Visitor]) -> Filing:
    owner: dict[str, str | None] = {}
    for visitor in visitors:
        for message in visitor.messages:
            owner[message] = visitor.conversation_id
            owner[f"echo: {message}"] = visitor.conversation_id
    rows = api.conversations
    wrong_id = wrong_row = 0
    delivered: Counter[str] = Counter()
    details: list[str] = []
    posts = api.messages
    for post in posts:
        content = post.get("content")
        expected = owner.get(content) if isinstance(content, str) else None
        key = post.get("conversation")
        row = rows[key - 1] if isinstance(key, int) and 0 < key <= len(rows) else None
        filed = f"{content!r} of {expected} filed under {post.get('conversation_id')}"
        if expected is None or post.get("conversation_id") != expected:
            wrong_id += 1
            details.append(filed)
        elif row is None or row["conversation_id"] != expected or row["is_used"] is not True:
            wrong_row += 1
            details.append(f"{filed}, row {key} ({row['conversation_id'] if row else None})")
        else:
            assert isinstance(content, str)  # expected was found for it
            delivered[content] += 1
    lost = sum(1 for content in owner if delivered[content] == 0)
    return Filing(len(owner), len(posts), wrong_id, wrong_row, lost, details)


def run(
    sdk_version: str, framework: str, mode: str, api: StandInAgentSightAPI
) -> tuple[list[Visitor], Filing]:
    python = app_python(sdk_version)
    env = {"AGENTSIGHT_API_KEY": api.api_key, "AGENTSIGHT_API_ENDPOINT": api.url}
    visitors = make_visitors(VISITORS, MESSAGES)
    with serve(python, MODULE, [framework, mode], env) as url:
        drive_visitors(url, visitors)
        # Page views are sent by the middleware's background worker: wait for them
        # while the app still runs. Message posts were sent before each response.
        api.wait_for(
            lambda a: sum(1 for c in a.conversations if c["is_used"] is False) >= VISITORS,
            timeout=WAIT,
        )
    return visitors, filing(api, visitors)


def record(name: str, result: Filing) -> None:
    """Kept for the report: ``pytest -s`` shows what really happened."""
    print(f"\n[{name}] {result}")


# -- what really happens ---------------------------------------------------------------------


def test_naive_tracker_files_messages_under_other_visitors_conversations(
    sdk_version: str, api: StandInAgentSightAPI
) -> None:
    """The reported set-up: uvicorn, a sync FastAPI handler, and a middleware calling the
    tracker's ``get_or_create_conversation`` before the handler (no adapter)."""
    visitors, result = run(sdk_version, "fastapi-sync", "naive", api)
    record(f"{sdk_version} naive fastapi-sync", result)
    assert result.misfiled + result.lost > 0, "the race did not show: is the handler concurrent?"
    # Some requests even find their data gone: another request sent and deleted it.
    assert any(reply["tracking_error"] for v in visitors for reply in v.replies) or result.lost


def test_naive_tracker_under_flask_too(api: StandInAgentSightAPI) -> None:
    """Not an ASGI artefact: threaded WSGI servers race the same way."""
    _, result = run("0.0.44", "flask", "naive", api)
    record("0.0.44 naive flask", result)
    assert result.misfiled + result.lost > 0


# -- made correct --------------------------------------------------------------------------


@pytest.mark.parametrize("framework", ["fastapi-sync", "fastapi-async", "flask"])
def test_classic_tracker_files_every_message_under_its_own_conversation(
    sdk_version: str, framework: str, api: StandInAgentSightAPI
) -> None:
    visitors, result = run(sdk_version, framework, "adapter", api)
    record(f"{sdk_version} adapter {framework}", result)
    assert [reply["tracking_error"] for v in visitors for reply in v.replies] == [None] * (
        VISITORS * MESSAGES
    )
    assert (result.misfiled, result.lost) == (0, 0), str(result)
    assert result.posts == result.expected == VISITORS * MESSAGES * 2, "each message posted once"
    assert_conversations(api, visitors)


@pytest.mark.parametrize("framework", ["fastapi-sync", "flask"])
def test_chat_requests_whose_handler_tracks_nothing_leave_nothing_behind(
    sdk_version: str, framework: str, api: StandInAgentSightAPI
) -> None:
    # Requests to the chat route that the handler never tracks (a body FastAPI refuses with
    # 422, a Flask handler failing with 500): the SDK's stored is_used:true item of each
    # stayed in its memory (15,000 requests: +48 MB), and the conversation's next
    # send_tracked_data() posted one per earlier request (61 items, 3.2 s, for one chat).
    # Such an item now waits at most unsent_grace (a handler may send later), and only the
    # newest of a conversation waits. The grace must outlast the 40 requests below: 1 s
    # did not on a loaded machine (20 of 21 left, the first stranger's expired).
    grace = 3.0
    python = app_python(sdk_version)
    env = {
        "AGENTSIGHT_API_KEY": api.api_key,
        "AGENTSIGHT_API_ENDPOINT": api.url,
        "UNSENT_GRACE": str(grace),
    }
    [visitor] = make_visitors(1, 1)
    with serve(python, MODULE, [framework, "adapter"], env) as url:
        with httpx.Client(base_url=url, timeout=30) as browser:
            assert browser.get("/", headers=visitor.headers).status_code == 200
            conversation_id = browser.cookies.get(COOKIE)
            for _ in range(20):
                assert browser.post("/api/chat", json={}).status_code >= 400
        with httpx.Client(base_url=url, timeout=30) as stranger:  # no cookie: a new id each
            for _ in range(20):
                assert stranger.post("/api/chat", json={}).status_code >= 400
                stranger.cookies.clear()
            # 21 waiting: the visitor's newest, and the strangers' (within their grace).
            assert stranger.get("/debug/held").json() == {"conversations": 21, "items": 21}
        time.sleep(grace + 0.2)
        with httpx.Client(base_url=url, timeout=30) as browser:
            browser.cookies.set(COOKIE, str(conversation_id))
            reply = browser.post("/api/chat", json={"message": "hello"})
            assert reply.status_code == 200
            assert reply.json()["tracking_error"] is None
            # The chat request dropped the stale ones, then sent its own.
            assert browser.get("/debug/held").json() == {"conversations": 0, "items": 0}
        api.wait_for(lambda a: any(c["is_used"] is False for c in a.conversations), timeout=WAIT)
    used = [c["conversation_id"] for c in api.conversations if c["is_used"] is True]
    assert used == [conversation_id]
    assert [m["conversation_id"] for m in api.messages] == [conversation_id] * 2


def test_classic_tracker_keeps_a_waiting_request_s_item_and_forgets_sent_ones(
    sdk_version: str, api: StandInAgentSightAPI
) -> None:
    # Items already sent counted towards max_unsent: busy traffic dropped the item of a
    # request still waiting for its LLM (its messages then filed under no conversation),
    # and kept every sent chat's metadata alive (4.6 KiB a request, up to the cap).
    import json
    import subprocess

    env = {
        **os.environ,
        "AGENTSIGHT_API_KEY": api.api_key,
        "AGENTSIGHT_API_ENDPOINT": api.url,
        "PYTHONPATH": str(ROOT),
    }
    done = subprocess.run(
        [str(app_python(sdk_version)), "-m", "tests.apps.classic_bookkeeping"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["bookkeeping_while_waiting"] <= 2  # the waiting one (and the last sent)
    assert seen["bookkeeping_after_flood"] <= 50 + 1  # the cap, and the waiting one
    assert seen["bookkeeping_after"] <= 50 + 1
    assert seen["held_after"] <= 50 + 1
    rows = api.conversations
    slow = [m for m in api.messages if m["conversation_id"] == "conv_000000005100"]
    assert [m["content"] for m in slow] == ["slow question", "slow answer"]
    for message in slow:
        key = message["conversation"]
        assert isinstance(key, int), message
        assert rows[key - 1]["conversation_id"] == "conv_000000005100"


def test_the_sdk_called_outside_the_requests_context_sends_nothing(
    sdk_version: str, api: StandInAgentSightAPI
) -> None:
    # The README: called from a thread without the request's context (here
    # loop.run_in_executor()), "the SDK finds no conversation there and sends nothing".
    # It did so once: that send_tracked_data() made a conversation id up and kept it as
    # the process's current one, and from then on every visitor's messages were posted
    # under that one invented conversation (113 of 120, 20 visitors at once). The
    # messages tracked before it stayed in the SDK's memory for good.
    visitors, result = run(sdk_version, "fastapi-executor", "adapter", api)
    record(f"{sdk_version} adapter fastapi-executor", result)
    errors = [reply["tracking_error"] for v in visitors for reply in v.replies]
    assert all(str(e).startswith("NoDataToSendException") for e in errors), errors
    assert api.messages == [], f"{len(api.messages)} message(s) posted: {result}"
    ids = {v.conversation_id for v in visitors}
    assert {row["conversation_id"] for row in api.conversations} <= ids


def assert_conversations(api: StandInAgentSightAPI, visitors: list[Visitor]) -> None:
    """Issue 4's end-to-end promise: ``is_used: false`` on the page load, ``is_used: true``
    on every chat request, all under the visitor's one id, with the facts the middleware
    found (the visitor's IP, device and language)."""
    rows = api.conversations
    for visitor in visitors:
        assert visitor.conversation_id is not None
        mine = [row for row in rows if row["conversation_id"] == visitor.conversation_id]
        assert [row["is_used"] for row in mine].count(False) == 1, mine
        assert [row["is_used"] for row in mine].count(True) == MESSAGES, mine
        mobile = visitor.index % 2 == 1
        for row in mine:
            assert row["customer_ip_address"] == "127.0.0.1"
            assert row["device"] == ("mobile" if mobile else "desktop")
            assert row["language"] == ("fr-FR" if mobile else "en-US")
            assert row["source"] == "web"
            assert row["environment"] in ("production", "development")
            assert row["metadata"]["page_path"] in ("/", "/api/chat")
    assert len(rows) == VISITORS * (1 + MESSAGES), "no conversation posted for nobody"


def test_the_middleware_runs_without_the_sdk_installed() -> None:
    """``agentsight_middleware.sdk`` imports without the SDK (the main venv has none)."""
    import importlib.util

    from agentsight_middleware import sdk

    if importlib.util.find_spec("agentsight") is not None:
        pytest.skip("the agentsight SDK is installed in this environment")
    with pytest.raises(TypeError, match="classic agentsight SDK"):
        sdk.ClassicTracker(object())
    with pytest.raises(ImportError, match="pip install"):
        sdk.AgentSightSDK()


# -- the adapter, in process (no SDK needed: a stand-in with the SDK's shape) ---------------


class _Config:
    """Shaped like the SDK's ``Config`` dataclass: a plain ``conversation_id`` attribute."""

    def __init__(self) -> None:
        self.conversation_id: str | None = None
        self.environment = None


class _ClassicLike:
    """The classic tracker's relevant behaviour (agentsight 0.0.44 main_client.py)."""

    def __init__(self) -> None:
        self.config = _Config()
        self.items: dict[str | None, list[tuple[str, Any]]] = {}

    def initialize_conversation(self, conversation_id: str, **fields: Any) -> None:
        self.items.setdefault("sent", []).append(("initialize", conversation_id))

    def get_or_create_conversation(self, conversation_id: str, **fields: Any) -> None:
        self.config.conversation_id = conversation_id
        time.sleep(0)
        self.items.setdefault(self.config.conversation_id, []).append(("conversation", fields))

    def track_question(self, question: str) -> None:
        self.items.setdefault(self.config.conversation_id, []).append(("question", question))

    def send_tracked_data(self) -> list[tuple[str, Any]]:
        return self.items.pop(self.config.conversation_id)


def test_classic_tracker_is_per_request_and_leaves_the_rest_alone() -> None:
    import contextvars
    import threading

    from agentsight_middleware.sdk import ClassicTracker, adapt_tracker

    inner = _ClassicLike()
    inner.config.conversation_id = "outside"
    tracker = adapt_tracker(inner)
    assert isinstance(tracker, ClassicTracker)
    assert adapt_tracker(tracker) is tracker
    plain = RecordingTracker()
    assert adapt_tracker(plain) is plain, "other trackers are left alone"
    assert ClassicTracker(tracker).tracker is inner, "wrapping twice wraps the SDK's tracker"
    assert type(inner.config).__name__ == "_Config"
    assert isinstance(inner.config, _Config)
    barrier = threading.Barrier(2)
    sent: dict[str, Any] = {}

    def request(cid: str) -> None:
        # As the middleware does: the scope stores the conversation item (the middleware
        # skips its own get_or_create_conversation call for this adapter).
        assert tracker.agentsight_skip_engage is True
        with tracker.conversation_scope(cid, device="desktop"):
            barrier.wait(5)
            inner.track_question(f"from {cid}")
            barrier.wait(5)
            # The handler's thread (Starlette's pool) runs in a copy of the context:
            sent[cid] = contextvars.copy_context().run(tracker.send_tracked_data)

    threads = [threading.Thread(target=request, args=(c,)) for c in ("conv_a", "conv_b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert sent == {
        cid: [("conversation", {"device": "desktop"}), ("question", f"from {cid}")]
        for cid in ("conv_a", "conv_b")
    }
    assert inner.config.conversation_id == "outside", "outside requests: as before"
    inner.config.conversation_id = "changed"
    assert inner.config.conversation_id == "changed"
    with tracker.conversation_scope("conv_c"):
        inner.config.conversation_id = "set_inside"  # e.g. tracker.configure(conversation_id=)
        assert inner.config.conversation_id == "set_inside"
    assert inner.config.conversation_id == "changed"
    tracker.initialize_conversation("conv_d", device="mobile", unknown_field=1)
    assert inner.items["sent"] == [("initialize", "conv_d")]


def test_classic_tracker_held_at_a_fork_serves_the_child_s_chats() -> None:
    import threading

    from agentsight_middleware.sdk import ClassicTracker

    class WithStore(_ClassicLike):
        # The SDK's private store and its lock, which the adapter's bookkeeping looks after.
        def __init__(self) -> None:
            super().__init__()
            self._tracked_data: dict[str, Any] = {}
            self._lock = threading.Lock()

    tracker = ClassicTracker(WithStore())

    def chat() -> bytes:
        with tracker.conversation_scope("conv_child"):
            pass
        return b"served"

    tracker._unsent_lock.acquire()  # as a request thread holds it at the fork
    try:
        told = in_forked_child(chat)
    finally:
        tracker._unsent_lock.release()
    assert told == b"served"


class _WithStore(_ClassicLike):
    """The SDK's store, lock and send_tracked_data(), as 0.0.12 - 0.0.44 have them."""

    def __init__(self) -> None:
        super().__init__()
        self._tracked_data: dict[Any, dict[str, list[Any]]] = {}
        self._lock = threading.Lock()
        self.sent: list[tuple[str, list[Any]]] = []

    def get_or_create_conversation(self, conversation_id: str, **fields: Any) -> None:
        self.config.conversation_id = conversation_id
        self._add_tracking_item("conversation", {"conversation_id": conversation_id, **fields})

    def track_question(self, question: str) -> None:
        self._add_tracking_item("question", {"content": question})

    def _add_tracking_item(self, kind: str, data: dict[str, Any]) -> None:
        with self._lock:
            stored = self._tracked_data.setdefault(self.config.conversation_id, {"items": []})
            stored["items"].append({"type": kind, "data": data})

    def _get_or_generate_conversation_id(self) -> str:
        if self.config.conversation_id:
            return str(self.config.conversation_id)
        conversation_id = f"conv_{os.urandom(6).hex()}"
        self.config.conversation_id = conversation_id
        return conversation_id

    def send_tracked_data(self) -> list[Any]:
        conversation_id = self._get_or_generate_conversation_id()
        with self._lock:
            if conversation_id not in self._tracked_data:
                raise LookupError(f"No tracked data found for conversation: {conversation_id}")
            items = self._tracked_data.pop(conversation_id)["items"]
        self.sent.append((conversation_id, items))
        return items


def test_the_sdk_outside_a_request_keeps_no_made_up_conversation() -> None:
    from agentsight_middleware.sdk import ClassicTracker

    inner = _WithStore()
    tracker = ClassicTracker(inner)

    def stray(question: str) -> str:
        # As loop.run_in_executor() runs it: a thread without the request's context.
        failure: list[str] = []

        def run_it() -> None:
            inner.track_question(question)
            try:
                inner.send_tracked_data()
            except LookupError as exc:
                failure.append(str(exc))

        thread = threading.Thread(target=run_it)
        thread.start()
        thread.join(5)
        return failure[0] if failure else "sent"

    for visitor in ("conv_alice", "conv_bob", "conv_carol"):
        with tracker.conversation_scope(visitor):
            assert stray(f"{visitor}'s question").startswith("No tracked data")
    assert inner.sent == [], "sent under a conversation the SDK made up"
    assert inner.config.conversation_id is None
    # What was tracked outside any conversation the SDK never sends: gone at the next chat.
    with tracker.conversation_scope("conv_dave"):
        pass
    assert None not in inner._tracked_data
    inner.config.conversation_id = "conv_set_by_the_app"  # still the app's to set
    assert inner.config.conversation_id == "conv_set_by_the_app"


def test_classic_tracker_passes_only_fields_the_sdk_takes() -> None:
    from agentsight_middleware.sdk import ClassicTracker

    received: list[dict[str, Any]] = []

    class Old(_ClassicLike):
        # 0.0.12 has no ``name`` parameter: nothing it does not take is passed.
        def initialize_conversation(  # type: ignore[override]
            self, conversation_id: str, customer_id: str | None = None, device: str | None = None
        ) -> None:
            received.append({"conversation_id": conversation_id, "device": device})

    ClassicTracker(Old()).initialize_conversation("conv_x", device="mobile", name="n", source="w")
    assert received == [{"conversation_id": "conv_x", "device": "mobile"}]


# -- the API failing a page view -------------------------------------------------------------


@pytest.mark.parametrize("fault", ["503", "429"])
def test_a_page_view_the_api_fails_once_is_made_again(
    fault: str, api: StandInAgentSightAPI
) -> None:
    # The classic SDK posts a page view once whatever the API answers: a 503 or 429 raised
    # ConversationApiException and the page view was lost, where the built-in client retries.
    python = app_python("0.0.44")
    env = {"AGENTSIGHT_API_KEY": api.api_key, "AGENTSIGHT_API_ENDPOINT": api.url}
    [visitor] = make_visitors(1, 1)
    with serve(python, MODULE, ["flask", "adapter"], env) as url:
        if fault == "503":
            api.fail_next(1, status=503)
        else:
            api.throttle_next(1, retry_after="1")
        with httpx.Client(base_url=url, timeout=30) as browser:
            assert browser.get("/", headers=visitor.headers).status_code == 200
            conversation_id = browser.cookies.get(COOKIE)
        api.wait_for(lambda a: a.summary()["initialized"] >= 1, timeout=WAIT)
    assert [c["conversation_id"] for c in api.conversations] == [conversation_id]
    assert api.summary()["by_status"] == {fault: 1, "201": 1}


def test_page_views_wait_out_an_outage_and_go_through_once_the_api_is_back(
    api: StandInAgentSightAPI,
) -> None:
    # The API answering 503 to everything for 8 s. Each page view sleeping out its own backoff
    # on one of the 8 threads made its 4 attempts within 1.75-3.5 s, then the next took its
    # thread: all 16 lost, 64 requests to the failing API. They wait together now, one
    # attempt alone after each wait, and go through once the API is back.
    python = app_python("0.0.44")
    env = {"AGENTSIGHT_API_KEY": api.api_key, "AGENTSIGHT_API_ENDPOINT": api.url}
    visitors = make_visitors(16, 1)
    with serve(python, MODULE, ["flask", "adapter"], env) as url:
        api.fail_for(8.0)
        ids = []
        with httpx.Client(base_url=url, timeout=30) as browser:
            for visitor in visitors:
                browser.cookies.clear()
                assert browser.get("/", headers=visitor.headers).status_code == 200
                ids.append(browser.cookies.get(COOKIE))
        time.sleep(8.0)  # the outage
        # One attempt goes alone per wait (0.25-2 s), and a page view is lost only once 4 of
        # its own failed: most wait the outage out (2 lost, typically).
        api.wait_for(lambda a: a.summary()["initialized"] >= 8, timeout=WAIT)
        time.sleep(1.0)  # the rest, if any
    delivered = [c["conversation_id"] for c in api.conversations]
    assert set(delivered) <= set(ids)
    assert len(delivered) == len(set(delivered))
    assert api.summary()["by_status"]["503"] < 3 * len(visitors), api.summary()


def test_a_page_view_the_api_refuses_is_not_made_again(api: StandInAgentSightAPI) -> None:
    # A 4xx never succeeds: sent once, as the built-in client does.
    python = app_python("0.0.44")
    env = {"AGENTSIGHT_API_KEY": api.api_key, "AGENTSIGHT_API_ENDPOINT": api.url}
    [visitor] = make_visitors(1, 1)
    with serve(python, MODULE, ["flask", "adapter"], env) as url:
        api.fail_next(1, status=400)
        with httpx.Client(base_url=url, timeout=30) as browser:
            assert browser.get("/", headers=visitor.headers).status_code == 200
        api.wait_for(lambda a: a.summary()["requests"] >= 1, timeout=WAIT)
        time.sleep(1.5)  # past the first backoff a retry would have waited
        assert api.summary()["by_status"] == {"400": 1}
