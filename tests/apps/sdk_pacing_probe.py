"""``AgentSightSDK``'s pacing against the real agentsight 0.1.x SDK and OpenTelemetry, in
process, with an exporter that hangs (as against an API that never answers).

Run by ``tests/test_sdk_otel.py`` under an SDK venv's interpreter as::

    python -m tests.apps.sdk_pacing_probe MODE

and prints one JSON line. MODE:

- ``paced``: 300 page views; how many were not handed over (``errors``) and the most the
  SDK's export queue held.
- ``reinit``: the same after ``agentsight.shutdown()`` and a second ``init()``.
- ``shutting-down``: a page view while ``agentsight.shutdown()`` waits for the hung
  exporter (the SDK is disabled, its queue full for good): whether it raised, and how long
  it took.

``OTEL_BSP_MAX_EXPORT_BATCH_SIZE`` is read by OpenTelemetry from the environment.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import agentsight  # type: ignore[import-not-found]  # only in the SDK's own venv
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from agentsight_middleware.sdk import AgentSightSDK

QUEUE = 200
release = threading.Event()


class Hung(SpanExporter):  # type: ignore[misc,unused-ignore]  # Any where opentelemetry is not installed
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        release.wait()
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        release.set()


def init() -> None:
    agentsight.init(
        span_exporter=Hung(), auto_instrument=False, max_queue_size=QUEUE, export_interval_ms=200
    )


def queue_length() -> int:
    from agentsight.sdk import core  # type: ignore[import-not-found]

    processor: Any = core._state.provider._active_span_processor._span_processors[0]._downstream
    holder = getattr(processor, "_batch_processor", processor)
    spans = getattr(holder, "_queue", None)
    return len(spans if spans is not None else holder.queue)


def burst(tracker: AgentSightSDK, count: int) -> dict[str, int]:
    errors = most = 0
    for number in range(count):
        try:
            tracker.initialize_conversation(f"conv_{number}")
        except Exception:
            errors += 1
        most = max(most, queue_length())
    return {"errors": errors, "most_queued": most}


def main() -> None:
    mode = sys.argv[1]
    tracker = AgentSightSDK()
    tracker.queue_wait = 0.05
    init()
    report: dict[str, Any] = {}
    if mode == "reinit":
        tracker.initialize_conversation("before")  # the pipeline's queue, looked up
        release.set()  # the first pipeline's shutdown exports what it holds
        agentsight.shutdown()
        release.clear()
        init()
    if mode in ("paced", "reinit"):
        report = burst(tracker, 300)
    elif mode == "shutting-down":
        burst(tracker, 200)  # the queue at the page views' share, the exporter hung
        stopping = threading.Thread(target=agentsight.shutdown, daemon=True)
        stopping.start()
        while agentsight.is_enabled():
            time.sleep(0.01)
        tracker.queue_wait = 5.0
        started = time.monotonic()
        try:
            tracker.initialize_conversation("after")
            report["raised"] = None
        except Exception as exc:
            report["raised"] = type(exc).__name__
        report["took"] = time.monotonic() - started
        report["queued"] = queue_length()
    release.set()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
