"""The OpenTelemetry-based ``agentsight`` SDK (0.1.x) behind the middleware, for real.

``tests/apps/sdk_otel_app.py`` runs in a subprocess with agentsight 0.1.4 in an
isolated venv; its chat handler does only ``with agentsight.turn():
agentsight.user_message(...); agentsight.agent_message(...)``. The middleware's
``AgentSightSDK()`` tracker opens the conversation on the page view
(``agentsight.open_conversation``) and runs the handler inside
``agentsight.conversation(<visitor's id>, ip, device, language, ...)``.

What the SDK sends to ``/api/ingest/`` (agentsight 0.1.4 ``sdk/exporter.py``) is not
OTLP protobuf but JSON: ``{"sdk": {...}, "conversations": [{"conversation_id", the
conversation fields, "metadata", "spans": [...]}]}``, gzip-compressed only when
``GET /api/me/`` advertised ``gzip-ingest`` (the stand-in answers 404 there).
"""

from __future__ import annotations

import fcntl
import gzip
import json
import os
import subprocess
import sys
import threading
import time
import types
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from agentsight_middleware.testing import StandInAgentSightAPI
from tests.apps.sdk_harness import (
    CHROME_DESKTOP,
    REQUEST_TIMEOUT,
    Visitor,
    app_python,
    drive_visitors,
    make_visitors,
    serve,
)
from tests.sdk_env import REPO, SDK_VENVS, sdk_env

SDK = "0.1.4"
MODULE = "tests.apps.sdk_otel_app"
VISITORS = 12
MESSAGES = 2
WAIT = 20.0

CONVERSATION_ID = "agentsight.conversation.id"
MESSAGE_CONTENT = "agentsight.message.content"
MESSAGE_SENDER = "agentsight.message.sender"


def ingested_spans(api: StandInAgentSightAPI) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(conversation block, span) for every span the stand-in received."""
    found = []
    for request in api.ingested:
        body = request.json
        if body is None and request.headers.get("content-encoding") == "gzip":
            body = json.loads(gzip.decompress(request.body))
        assert isinstance(body, dict), f"ingest body is not the SDK's JSON: {request!r}"
        assert body["sdk"]["name"] == "agentsight-python"
        for block in body["conversations"]:
            for span in block["spans"]:
                found.append((block, span))
    return found


def _count(api: StandInAgentSightAPI, kind: str) -> int:
    return sum(1 for _, span in ingested_spans(api) if span["kind"] == kind)


@pytest.mark.parametrize("framework", ["fastapi-async", "fastapi-sync", "flask"])
def test_turns_land_in_the_visitors_conversation_with_the_middlewares_facts(
    framework: str,
) -> None:
    python = app_python(SDK)
    visitors = make_visitors(VISITORS, MESSAGES)
    with StandInAgentSightAPI() as api:
        env = {"AGENTSIGHT_API_KEY": api.api_key, "AGENTSIGHT_API_ENDPOINT": api.url}
        with serve(python, MODULE, [framework], env) as url:
            drive_visitors(url, visitors)
            api.wait_for(
                lambda a: (
                    _count(a, "turn") >= VISITORS * MESSAGES
                    and _count(a, "conversation") >= VISITORS
                ),
                timeout=WAIT,
            )
        spans = ingested_spans(api)
    misfiled = check_filing(spans, visitors)
    print(f"\n[{SDK} AgentSightSDK {framework}] {misfiled}/{VISITORS * MESSAGES} turns misfiled")
    assert misfiled == 0


def check_filing(
    spans: list[tuple[dict[str, Any], dict[str, Any]]], visitors: list[Visitor]
) -> int:
    owner = {m: v for v in visitors for m in v.messages}
    by_id = {v.conversation_id: v for v in visitors}
    assert len(by_id) == VISITORS, "every visitor got its own conversation id (cookie)"
    kinds: Counter[tuple[str | None, str]] = Counter()
    misfiled = 0
    for block, span in spans:
        cid = block["conversation_id"]
        assert span["attributes"][CONVERSATION_ID] == cid
        visitor = by_id.get(cid)
        assert visitor is not None, f"a conversation of nobody: {cid}"
        kinds[cid, span["kind"]] += 1
        # The middleware's facts, on the block (the conversation row) and on every span.
        mobile = visitor.index % 2 == 1
        facts = {
            "customer_ip_address": "127.0.0.1",
            "device": "mobile" if mobile else "desktop",
            "language": "fr-FR" if mobile else "en-US",
            "source": "web",
        }
        assert {key: block.get(key) for key in facts} == facts
        assert span["attributes"]["agentsight.conversation.device"] == facts["device"]
        assert span["attributes"]["agentsight.conversation.customer_ip"] == "127.0.0.1"
        metadata = json.loads(span["attributes"]["agentsight.conversation.metadata"])
        if span["kind"] == "conversation":
            assert span["name"] == "conversation_opened"
            assert metadata["page_path"] == "/", "the visit: the widget page"
            assert span["events"] == []
        else:
            assert span["kind"] == "turn"
            assert metadata["page_path"] == "/api/chat"
            assert span["attributes"]["agentsight.turn.complete"] is True
            events = [e["attributes"] for e in span["events"]]
            assert [e[MESSAGE_SENDER] for e in events] == ["end_user", "agent"]
            message = events[0][MESSAGE_CONTENT]
            assert events[1][MESSAGE_CONTENT] == f"echo: {message}"
            if owner[message] is not visitor:
                misfiled += 1
    for visitor in visitors:
        assert kinds[visitor.conversation_id, "conversation"] == 1, "one visit (is_used: false)"
        assert kinds[visitor.conversation_id, "turn"] == MESSAGES, "its turns (engaged)"
    return misfiled


# -- a burst of page views against the SDK's export queue --------------------------------------

BURST_APP = "tests.apps.sdk_burst_app"
#: The SDK's export queue scaled down tenfold (2,048 spans, batches of 512, by default), and
#: an API taking 0.5 s an answer: its exporter takes ~100 spans a second, a burst several
#: times that.
BURST_ENV = {
    "TEST_MAX_QUEUE_SIZE": "200",
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "50",
    "TEST_EXPORT_INTERVAL_MS": "200",
}


def burst(url: str, visitors: int, threads: int = 8) -> None:
    """``visitors`` distinct visitors (no cookie) load the widget page, as fast as can be."""
    headers = {
        "user-agent": CHROME_DESKTOP,
        "accept": "text/html",
        "sec-fetch-dest": "document",
        "sec-fetch-mode": "navigate",
    }
    failures: list[str] = []

    def run(count: int) -> None:
        with httpx.Client(timeout=REQUEST_TIMEOUT) as client:
            for _ in range(count):
                response = client.get(f"{url}/", headers=headers)
                client.cookies.clear()  # the next request is a new visitor
                if response.status_code != 200:
                    failures.append(f"{response.status_code} {response.text[:200]}")

    workers = [threading.Thread(target=run, args=(visitors // threads,)) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert not failures, failures[:3]


def app_report(url: str) -> dict[str, Any]:
    report: dict[str, Any] = httpx.get(f"{url}/stats", timeout=REQUEST_TIMEOUT).json()
    return report


def wait_until_settled(api: StandInAgentSightAPI, expected: int) -> int:
    """Page views received once ``expected`` came, or nothing came for 5 s (90 s at most)."""
    deadline = time.monotonic() + 90.0
    seen, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        batches = len(api.ingested)
        if batches != seen:
            seen, since = batches, time.monotonic()
            received = len(opened(api))
            if received >= expected:
                return received
        elif time.monotonic() - since > 5.0:
            break
        time.sleep(0.2)
    return len(opened(api))


def opened(api: StandInAgentSightAPI) -> set[str]:
    return {
        block["conversation_id"]
        for block, span in ingested_spans(api)
        if span["kind"] == "conversation"
    }


@pytest.mark.parametrize("framework", ["starlette", "flask"])
def test_a_burst_of_page_views_waits_for_room_in_the_sdks_export_queue(framework: str) -> None:
    # OpenTelemetry's batch processor drops its oldest span for each one past a full queue
    # (said once per 20 s on its own logger): a burst faster than the exporter lost page
    # views while stats() counted every one processed. With 0.1.4's defaults, 15 s at
    # ~700 page views/s against an API taking 1 s: 9,056 of 10,741 arrived (uvicorn),
    # 9,216 of 13,405 (werkzeug). They now wait in the middleware's queue.
    python = app_python(SDK)
    with StandInAgentSightAPI() as api:
        api.set_latency(0.5)
        env = {"AGENTSIGHT_API_KEY": api.api_key, "AGENTSIGHT_API_ENDPOINT": api.url, **BURST_ENV}
        with serve(python, BURST_APP, [framework], env) as url:
            burst(url, 1200)
            stats = app_report(url)["stats"]
            assert stats["submitted"] == 1200
            received = wait_until_settled(api, 1200)
            report = app_report(url)
    print(f"\n[{SDK} burst {framework}] {received}/1200 page views received, {report}")
    assert received == 1200
    stats = report["stats"]
    assert (stats["processed"], stats["errors"], stats["dropped"]) == (1200, 0, 0)


def test_page_views_the_sdk_cannot_take_are_counted_and_said() -> None:
    # An API that never answers: the SDK's exporter sits in its retries (15 s timeouts) and
    # its queue stays full. Handed over anyway, each page view dropped an older one, in
    # silence: stats() said all processed. Now one that found no room for queue_wait is
    # not handed over, and is counted (errors) and said; the rest wait in the middleware's
    # queue (bounded, and counted when it overflows).
    python = app_python(SDK)
    with StandInAgentSightAPI() as api:
        api.hang_next(1_000_000)
        env = {
            "AGENTSIGHT_API_KEY": api.api_key,
            "AGENTSIGHT_API_ENDPOINT": api.url,
            **BURST_ENV,
            "TEST_QUEUE_WAIT": "0.5",
        }
        with serve(python, BURST_APP, ["starlette"], env) as url:
            burst(url, 400)
            deadline = time.monotonic() + 30.0
            report = app_report(url)
            while report["stats"]["errors"] < 2 and time.monotonic() < deadline:
                time.sleep(0.2)
                report = app_report(url)
    stats = report["stats"]
    print(f"\n[{SDK} hung API] {stats}")
    assert stats["submitted"] == 400
    assert stats["errors"] >= 2
    # Handed to the SDK: at most its queue's half and one batch in the exporter's hands
    # (a page view not handed over counts as processed too, and in errors).
    assert stats["processed"] - stats["errors"] <= 99 + 50 + 1
    # None unaccounted for: handled, or still waiting (one may be in the tracker's hands).
    assert stats["processed"] + stats["queued"] >= 399
    assert any("export queue stayed at" in line for line in report["said"]), report["said"]


PACING_PROBE = "tests.apps.sdk_pacing_probe"
#: OpenTelemetry before 1.34 (the SDK takes opentelemetry-sdk 1.20 and later): the batch
#: processor's queue and sizes sat on the BatchSpanProcessor, without a leading underscore.
OLDER_OTEL = ("opentelemetry-sdk==1.33.0", "opentelemetry-api==1.33.0")


def pacing_probe(mode: str, python_path: str = "") -> dict[str, Any]:
    done = subprocess.run(
        [str(app_python(SDK)), "-m", PACING_PROBE, mode],
        env=sdk_env(
            {
                "PYTHONPATH": python_path + str(REPO),
                "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "50",
            }
        ),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


def check_paced(report: dict[str, Any]) -> None:
    """300 page views against a queue of 200 whose exporter hangs: at most 99 (its page
    views' share) waited in it, 50 more in the exporter's hands, the rest not handed over."""
    assert report["most_queued"] <= 99, report
    assert report["errors"] >= 300 - 99 - 50, report


def older_opentelemetry() -> Path:
    """A directory holding OpenTelemetry 1.33, put ahead of the SDK venv's own (1.45)."""
    target = SDK_VENVS / "opentelemetry-1.33"
    done = target / ".complete"
    with (SDK_VENVS / ".opentelemetry-1.33.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            # Resolved for the SDK venv's interpreter, which runs it.
            command = [sys.executable, "-m", "pip", "--python", str(app_python(SDK)), "install"]
            command += ["--disable-pip-version-check", "--no-input", "--quiet"]
            command += ["--target", str(target), *OLDER_OTEL]
            subprocess.run(command, capture_output=True, timeout=300, check=True)
            done.touch()
    return target


def test_page_views_are_paced_again_after_the_sdk_is_initialised_again() -> None:
    # The export queue was looked up once: after agentsight.shutdown() and a second
    # init(), page views were paced against the first pipeline's queue, and the new one
    # dropped its oldest spans again (all 300 handed over to a queue of 200, 0 errors).
    for mode in ("paced", "reinit"):
        check_paced(pacing_probe(mode))


def test_a_page_view_does_not_wait_for_the_queue_of_a_shut_down_sdk() -> None:
    # A shutdown against an API that hangs leaves the queue full for good (its exporter
    # stopped): every later page view waited queue_wait (here 5 s; 4 by default) for
    # room and was counted in errors, one at a time, while the SDK records nothing anyway.
    report = pacing_probe("shutting-down")
    assert report["queued"] == 99
    assert report["raised"] is None
    assert report["took"] < 2.5  # not the 5 s queue_wait


def test_page_views_are_paced_on_an_opentelemetry_before_1_34() -> None:
    # agentsight 0.1.x takes opentelemetry-sdk 1.20 and later; before 1.34 the queue was
    # BatchSpanProcessor.queue, not _batch_processor._queue, and page views went unpaced,
    # said only at DEBUG (300 into a queue of 200: 0 errors, the oldest spans dropped).
    older = older_opentelemetry()
    check_paced(pacing_probe("paced", f"{older}{os.pathsep}"))


# -- the adapter, in process, against a fake ``agentsight`` module -----------------------------


class FakeSDK(types.ModuleType):
    """The surface of agentsight 0.1.x the adapter uses, recording its calls."""

    def __init__(self, enabled: bool = True) -> None:
        super().__init__("agentsight")
        self.enabled = enabled
        self.calls: list[tuple[str, Any, dict[str, Any]]] = []

    def init(self, **options: Any) -> bool:
        self.calls.append(("init", None, options))
        self.enabled = True
        return True

    def is_enabled(self) -> bool:
        return self.enabled

    def open_conversation(self, conversation_id: str, **fields: Any) -> None:
        self.calls.append(("open_conversation", conversation_id, fields))

    @contextmanager
    def conversation(self, conversation_id: str | None = None, **fields: Any) -> Iterator[None]:
        self.calls.append(("conversation", conversation_id, fields))
        yield


@pytest.fixture
def fake_sdk(monkeypatch: pytest.MonkeyPatch) -> FakeSDK:
    sdk = FakeSDK(enabled=False)
    monkeypatch.setitem(sys.modules, "agentsight", sdk)
    return sdk


FIELDS: dict[str, Any] = {
    "conversation_id": "conv_1",
    "customer_id": "cust",
    "customer_ip_address": "203.0.113.9",
    "device": "mobile",
    "source": "web",
    "language": "fr-FR",
    "environment": "production",
    "metadata": {"page_path": "/"},
}


@pytest.mark.parametrize("framework", ["fastapi-async", "django-asgi", "fastapi-failing-shutdown"])
def test_uvicorns_sigterm_stop_sends_what_the_sdk_still_holds(framework: str) -> None:
    # The SDK batches (here: nothing on its own for a minute) and flushes at exit with
    # atexit, which does not run when uvicorn stops on SIGTERM (it re-raises the signal
    # after the lifespan shutdown): every page view and turn of the last batch was lost.
    # The middleware's close() at lifespan shutdown now flushes the SDK too; Django's ASGI
    # handler has no lifespan (uvicorn ran none for it): the middleware answers it. An app
    # whose own shutdown code raises answers lifespan.shutdown.failed: closed only at a
    # complete one, the middleware lost the whole batch there (0 of 3 page views).
    python = app_python(SDK)
    visitors = make_visitors(3, 1)
    with StandInAgentSightAPI() as api:
        env = {
            "AGENTSIGHT_API_KEY": api.api_key,
            "AGENTSIGHT_API_ENDPOINT": api.url,
            "TEST_EXPORT_INTERVAL_MS": "60000",
        }
        with serve(python, MODULE, [framework], env) as url:
            drive_visitors(url, visitors)
            assert _count(api, "conversation") == 0  # all still in the SDK's batch
        # Out of the block: SIGTERM, and the server has exited.
        assert _count(api, "conversation") == 3
        assert _count(api, "turn") == 3


def test_agentsight_sdk_maps_the_middlewares_calls(
    fake_sdk: FakeSDK, caplog: pytest.LogCaptureFixture
) -> None:
    from agentsight_middleware.sdk import AgentSightSDK

    tracker = AgentSightSDK()
    assert fake_sdk.calls == [], "no init() unless asked: the app may call it itself"
    tracker.initialize_conversation(**FIELDS)
    assert "agentsight.init() has not been called" in caplog.text
    tracker.get_or_create_conversation(**FIELDS)
    with tracker.conversation_scope(**{**FIELDS, "customer_id": None, "unknown": 1}):
        pass
    fields = {k: v for k, v in FIELDS.items() if k != "conversation_id"}
    assert fake_sdk.calls == [
        ("open_conversation", "conv_1", fields),
        ("conversation", "conv_1", {k: v for k, v in fields.items() if k != "customer_id"}),
    ]


def test_agentsight_sdk_can_init_the_sdk(
    fake_sdk: FakeSDK, caplog: pytest.LogCaptureFixture
) -> None:
    from agentsight_middleware.sdk import AgentSightSDK

    tracker = AgentSightSDK(export_interval_ms=100)
    tracker.initialize_conversation(conversation_id="conv_2")
    assert fake_sdk.calls == [
        ("init", None, {"export_interval_ms": 100}),
        ("open_conversation", "conv_2", {}),
    ]
    assert "has not been called" not in caplog.text


def test_agentsight_sdk_refuses_the_classic_sdk(monkeypatch: pytest.MonkeyPatch) -> None:
    from agentsight_middleware.sdk import AgentSightSDK

    classic = types.ModuleType("agentsight")
    classic.ConversationTracker = object  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "agentsight", classic)
    with pytest.raises(ImportError, match="ClassicTracker"):
        AgentSightSDK()


def test_agentsight_sdk_names_the_installed_classic_release_without_a_key() -> None:
    # agentsight 0.0.44 builds a tracker as it is imported: without an API key the import
    # raised NoApiKeyException ("API Key is missing"), and the user went after a key when
    # the release was what was wrong (with a key, the error named the release's lack).
    python = app_python("0.0.44")
    script = (
        "from agentsight_middleware.sdk import AgentSightSDK\n"
        "try:\n"
        "    AgentSightSDK()\n"
        "except BaseException as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    done = subprocess.run(
        [str(python), "-c", script],
        env=sdk_env({"PYTHONPATH": str(REPO)}),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ImportError agentsight 0.0.44 is installed"), done.stdout
    assert "ConversationTracker()" in done.stdout
