"""How fast one process delivers events to the AgentSight API, and what enqueueing costs.

    .venv/bin/pip install -r benchmarks/requirements.txt
    .venv/bin/python benchmarks/delivery.py [--events 20000] [--sdk-calls 1000] [--json]
    .venv/bin/python benchmarks/delivery.py --profile 2000   # + where the worker's CPU goes

The stand-in AgentSight API runs in a child process on 127.0.0.1 (as the real API runs on
another machine); this process plays the web server. Each row submits ``--events`` page
views (first visits: each mints an id and enqueues one ``initialize`` event) through
``AgentSightMiddleware`` around a raw ASGI page, as fast as one event loop can, and times
from the first request until the stand-in has accepted them all. A row that is not done
within ``--row-seconds`` reports the rate it reached by then (what was queued is then
dropped at close, or left in the outbox file, which is deleted).

Rows: the in-memory queue (sized to hold the burst); the default ``queue_size`` (how much of
a 20,000-request burst it keeps); the durable SQLite ``outbox=``; a steady stream
(``--steady`` events a second for ``--steady-seconds``, as a busy site sends them: the
worker finds a few events at each look, and its CPU per event is what a live app pays);
the same stream at ``--slow-rate`` events a second to an API answering each request in
50 ms (many requests in flight), to one answering at once but a 50 ms round trip away
(through the delaying proxy of ``distance.py``: the real API is across the internet), and
to an API that is down (nothing listens: the CPU per
page view that an outage costs the app's process, and what is kept meanwhile); the classic SDK's
blocking ``initialize_conversation`` (agentsight 0.0.44 in its own venv under
``.sdk-venvs/``, created here if missing), called sequentially; and what the stand-in
serves to a minimal asyncio HTTP/1.1 client sending one request at a time on each of 8
keep-alive connections (the middleware pipelines, which costs both ends less per event).

``--profile N`` delivers N more events with cProfile running inside the worker thread,
timed by that thread's own CPU clock, and splits the worker's CPU per event by where
it goes (payload building, JSON, HTTP client, socket system calls, event loop...).

The enqueue cost is ``BackgroundDelivery.submit`` (and ``Event`` + submit) timed alone on
the request thread. Targets: >= 2,000 events/s delivered, enqueue < 5 µs.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import logging
import os
import pstats
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from distance import DistantAPI
from overhead import (
    CHROME,
    NullSink,
    StandInProcess,
    conditions,
    discard,
    machine_info,
    page_headers,
    print_machine,
    receiver,
)

from agentsight_middleware import AgentSightMiddleware
from agentsight_middleware._standin import generate_api_key
from agentsight_middleware.sinks import _http11

ROOT = Path(__file__).resolve().parent.parent
SDK_VERSION = "0.0.44"
SDK_VENV = ROOT / ".sdk-venvs" / f"agentsight-{SDK_VERSION}"
TARGET_RATE = 2000.0
TARGET_ENQUEUE_US = 5.0

PAGE = b"<!doctype html><html><body><h1>Shop</h1><script src=/w.js></script></body></html>"


async def page_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The smallest HTML page: the middleware is the only work."""
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/html; charset=utf-8")],
        }
    )
    await send({"type": "http.response.body", "body": PAGE})


def page_view_scope() -> dict[str, Any]:
    """A first visit to the widget page, as Chrome sends it through one proxy."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "server": ("10.0.0.5", 8000),
        "client": ("10.0.0.2", 51234),
        "scheme": "http",
        "method": "GET",
        "root_path": "",
        "path": "/",
        "raw_path": b"/",
        "query_string": b"",
        "headers": [(k.encode(), v.encode()) for k, v in page_headers(cookie=None)],
    }


@dataclass
class Row:
    name: str
    events: int
    submit_us: float | None = None  # per request through the middleware, during the burst
    delivered: int = 0
    seconds: float = 0.0
    complete: bool = False
    worker_cpu_us: float | None = None  # CPU of this process's other threads per event
    dropped: int = 0
    note: str = ""
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.delivered / self.seconds if self.seconds else 0.0


def warmed_up(
    api: StandInProcess, endpoint: str | None = None, **options: Any
) -> tuple[AgentSightMiddleware, asyncio.AbstractEventLoop, dict[str, Any], int]:
    """The middleware around the page, its worker started (and the user-agent cache warm)
    by one page view delivered; a loop to drive it, the page view's scope, and the count
    of events the stand-in has by then. ``endpoint``: the API's address, if not the
    stand-in's own (a proxy in front of it)."""
    mw = AgentSightMiddleware(
        page_app,
        widget_pages=["/"],
        trusted_proxies=["10.0.0.0/8"],
        api_key=api.api_key,
        endpoint=endpoint or api.url,
        **options,
    )
    loop = asyncio.new_event_loop()
    template = page_view_scope()
    loop.run_until_complete(mw(dict(template), receiver(()), discard))
    mw.flush(30)
    return mw, loop, template, api.accepted()


def burst(
    api: StandInProcess,
    name: str,
    events: int,
    row_seconds: float,
    *,
    wait: bool = True,
    on_start: Callable[[Any], None] | None = None,
    on_end: Callable[[Any], None] | None = None,
    **options: Any,
) -> Row:
    """``events`` first visits through the middleware, timed until the stand-in has them."""
    mw, loop, template, baseline = warmed_up(api, **options)
    scopes = [dict(template) for _ in range(events)]
    receives = [receiver(()) for _ in range(events)]

    async def submit_all() -> None:
        for scope, receive in zip(scopes, receives, strict=True):
            await mw(scope, receive, discard)

    row = Row(name, events)
    if on_start is not None:
        on_start(mw)
    cpu, own = time.process_time(), time.thread_time()
    started = time.monotonic()
    loop.run_until_complete(submit_all())
    row.submit_us = (time.monotonic() - started) / events * 1e6
    loop.close()
    if wait:
        left = max(row_seconds - (time.monotonic() - started), 0.1)
        accepted = api.wait_for(baseline + events, left) - baseline
        row.seconds = time.monotonic() - started
        row.delivered = accepted
        row.complete = accepted >= events
        row.worker_cpu_us = (
            ((time.process_time() - cpu) - (time.thread_time() - own)) / accepted * 1e6
            if accepted
            else None
        )
    else:
        # Only how much of the burst the queue kept: wait until the worker took it all.
        deadline = time.monotonic() + row_seconds
        while mw.stats().get("queued", 0) and time.monotonic() < deadline:
            time.sleep(0.01)
    if on_end is not None:
        on_end(mw)
    row.stats = mw.stats()
    row.dropped = row.stats.get("dropped", 0)
    mw.close(1.0)
    api.trim()
    return row


def _paced(
    mw: AgentSightMiddleware, template: dict[str, Any], rate: float, seconds: float
) -> Callable[[], Awaitable[int]]:
    """Page views at ``rate`` a second for ``seconds``, the request loop catching up every
    millisecond, as a busy site sends them; how many were sent."""

    async def paced() -> int:
        sent = 0
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < seconds:
            while sent < elapsed * rate:
                await mw(dict(template), receiver(()), discard)
                sent += 1
            await asyncio.sleep(0.001)
        return sent

    return paced


def steady(
    api: StandInProcess,
    name: str,
    rate: float,
    seconds: float,
    *,
    latency: float = 0.0,
    endpoint: str | None = None,
) -> Row:
    """First visits at ``rate`` a second for ``seconds``, as a busy site sends them, not as
    one burst: the worker then finds a few events at each look, and its CPU per event is
    what a live app pays for delivery. ``latency``: the API answers each request that late
    (a slow API: many requests in flight at once). ``endpoint``: a proxy in front of the
    stand-in (see distance.py)."""
    mw, loop, template, baseline = warmed_up(api, endpoint)
    reads = ReadCounter()
    if latency:
        api.set_latency(latency)
    cpu, own = time.process_time(), time.thread_time()
    started = time.monotonic()
    try:
        events = loop.run_until_complete(_paced(mw, template, rate, seconds)())
        loop.close()
        mw.flush(30 + 100 * latency)
    finally:
        if latency:
            api.set_latency(0)
    row = Row(name, events)
    row.delivered = api.wait_for(baseline + events, 30) - baseline
    row.seconds = time.monotonic() - started
    row.complete = row.delivered >= events
    if row.delivered:
        background = (time.process_time() - cpu) - (time.thread_time() - own)
        row.worker_cpu_us = background / row.delivered * 1e6
    row.stats = mw.stats()
    row.dropped = row.stats.get("dropped", 0)
    reads.stop()
    row.note = f"{row.stats.get('senders', 0)} connections at the end"
    if reads.answers:
        # Each read is a loop wake-up, a recv and a parser feed: answers read in one go save it.
        row.note += f"; {reads.reads / reads.answers:.2f} socket reads an answer"
    mw.close(1.0)
    api.trim()
    return row


def steady_down(name: str, rate: float, seconds: float) -> Row:
    """The steady stream while the API cannot be reached (nothing listens at its address):
    the background CPU it costs the app's process per page view, and what is kept."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"  # closed again: refused
    mw = AgentSightMiddleware(
        page_app,
        widget_pages=["/"],
        trusted_proxies=["10.0.0.0/8"],
        api_key=generate_api_key(),
        endpoint=dead,
        shutdown_timeout=0.5,
    )
    loop = asyncio.new_event_loop()
    template = page_view_scope()
    loop.run_until_complete(mw(dict(template), receiver(()), discard))
    time.sleep(1.0)  # the worker's start (the user-agent parser's) is not the outage's cost
    cpu, own = time.process_time(), time.thread_time()
    events = loop.run_until_complete(_paced(mw, template, rate, seconds)())
    loop.close()
    row = Row(name, events)
    row.worker_cpu_us = ((time.process_time() - cpu) - (time.thread_time() - own)) / events * 1e6
    row.stats = mw.stats()
    row.dropped = row.stats.get("dropped", 0)
    row.note = (
        f"per page view; {row.stats.get('retried', 0)} connection attempts, "
        f"{row.stats.get('failed', 0)} events given up, "
        f"{row.stats.get('pending', 0) + row.stats.get('queued', 0):,} kept"
        + (f", {row.dropped:,} dropped (queue full)" if row.dropped else "")
    )
    logging.getLogger("agentsight_middleware").disabled = True  # the events lost at close
    try:
        mw.close(0.5)
    finally:
        logging.getLogger("agentsight_middleware").disabled = False
    return row


class ReadCounter:
    """Socket reads of the delivery's HTTP connections, and the answers they brought, from
    now until ``stop()`` (httptools' connections, the default engine on CPython)."""

    def __init__(self) -> None:
        self.reads = self.answers = 0
        self._original = original = _http11._FastConnection.data_received

        def counted(connection: Any, data: bytes) -> None:
            self.reads += 1
            self.answers += data.count(b"HTTP/1.1 ")
            original(connection, data)

        _http11._FastConnection.data_received = counted  # type: ignore[method-assign,assignment]

    def stop(self) -> None:
        _http11._FastConnection.data_received = self._original  # type: ignore[method-assign]


def enqueue_cost(n: int) -> dict[str, float]:
    """µs per ``submit`` of a built event, and per ``Event(...)`` + submit, best of 5."""
    from agentsight_middleware._conversation import Conversation
    from agentsight_middleware._delivery import BackgroundDelivery
    from agentsight_middleware._events import INITIALIZE, Event

    conversation = Conversation(
        id="conv_0123456789ab",
        id_source="minted",
        kind="widget",
        rule="/",
        peer="203.0.113.7",
        user_agent=CHROME,
        accept_language="en-US,en;q=0.9",
        scheme="https",
        host="shop.example.com",
        path="/",
        query="",
    )
    # The request-path side is the shipped one; only the sink behind the worker differs,
    # so that 100,000 timing events need not travel.
    delivery = BackgroundDelivery(NullSink, source="web", environment=None, queue_size=n + 1)
    delivery.ensure_started()
    event = Event(INITIALIZE, conversation, 0.0)
    submit = delivery.submit
    best_submit = best_both = float("inf")
    for _ in range(5):
        delivery.flush(30)
        started = time.perf_counter_ns()
        for _ in range(n):
            submit(event)
        best_submit = min(best_submit, (time.perf_counter_ns() - started) / n / 1000)
        delivery.flush(30)
        started = time.perf_counter_ns()
        for _ in range(n):
            submit(Event(INITIALIZE, conversation, 0.0))
        best_both = min(best_both, (time.perf_counter_ns() - started) / n / 1000)
    delivery.close(10)
    return {"submit_us": best_submit, "event_and_submit_us": best_both}


# ---------------------------------------------------------------------------
# The classic SDK, in its own venv
# ---------------------------------------------------------------------------

_SDK_CHILD = r"""
import json, sys, time
import agentsight
from agentsight import ConversationTracker

tracker = ConversationTracker()
n = int(sys.argv[1])
ids = [f"conv_{i:012x}" for i in range(0x5D0000, 0x5D0000 + n)]
metadata = {"page_path": "/", "page_url": "https://shop.example.com/", "rule": "/"}
errors = 0
cpu = time.process_time()
started = time.perf_counter()
for conversation_id in ids:
    try:
        tracker.initialize_conversation(
            conversation_id=conversation_id,
            customer_ip_address="203.0.113.7",
            device="desktop",
            source="web",
            language="en-US",
            environment="production",
            metadata=metadata,
        )
    except Exception:
        errors += 1
seconds = time.perf_counter() - started
cpu = time.process_time() - cpu
print(json.dumps({"seconds": seconds, "cpu": cpu, "errors": errors}))
"""


def sdk_python(progress: Callable[[str], None]) -> Path | None:
    """The SDK venv's python, created (venv + pip install) when it does not exist yet."""
    python = SDK_VENV / "bin" / "python"
    if python.exists():
        # The SDK builds a tracker at import time, which wants a (well-formed) key.
        env = {**os.environ, "AGENTSIGHT_API_KEY": f"ags_{'0' * 32}_{'0' * 6}"}
        check = subprocess.run(
            [str(python), "-I", "-c", "import agentsight"],
            capture_output=True,
            check=False,
            env=env,
        )
        if check.returncode == 0:
            return python
    progress(f"creating {SDK_VENV} (agentsight=={SDK_VERSION})")
    try:
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(SDK_VENV)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", f"agentsight=={SDK_VERSION}"],
            check=True,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        progress(f"could not create the SDK venv: {exc}")
        return None
    return python


def sdk_row(api: StandInProcess, calls: int, progress: Callable[[str], None]) -> Row:
    row = Row(f"classic SDK {SDK_VERSION}: initialize_conversation, sequential", calls)
    python = sdk_python(progress)
    if python is None:
        row.note = "SDK venv unavailable"
        return row
    baseline = api.accepted()
    env = {
        **os.environ,
        "AGENTSIGHT_API_KEY": api.api_key,
        "AGENTSIGHT_API_ENDPOINT": api.url,
        "AGENTSIGHT_LOG_LEVEL": "ERROR",
    }
    started = time.monotonic()
    done = subprocess.run(
        [str(python), "-I", "-c", _SDK_CHILD, str(calls)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    if done.returncode != 0:
        row.note = f"SDK run failed: {done.stderr.strip()[-300:]}"
        return row
    result = json.loads(done.stdout.strip().splitlines()[-1])
    row.delivered = api.wait_for(baseline + calls, 10) - baseline
    row.seconds = result["seconds"]
    row.worker_cpu_us = result["cpu"] / calls * 1e6
    row.complete = row.delivered >= calls and not result["errors"]
    row.note = (
        f"one blocking POST per call in the caller's thread ({result['errors']} errors); "
        f"CPU column: the SDK process's CPU per call; {time.monotonic() - started:.1f} s "
        f"with start-up"
    )
    api.trim()
    return row


# ---------------------------------------------------------------------------
# The stand-in, one request at a time per connection
# ---------------------------------------------------------------------------


async def _raw_client(url: str, api_key: str, bodies: list[bytes], connections: int) -> int:
    host, _, port = url.removeprefix("http://").partition(":")
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    head = (
        f"POST /api/conversations/ HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Authorization: Api-Key {api_key}\r\nContent-Type: application/json\r\n"
    )
    accepted = 0

    async def worker() -> None:
        nonlocal accepted
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while not queue.empty():
                body = queue.get_nowait()
                writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
                status = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in status.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                if status.startswith(b"HTTP/1.1 201"):
                    accepted += 1
        finally:
            writer.close()

    await asyncio.gather(*(worker() for _ in range(connections)))
    return accepted


def ceiling_row(api: StandInProcess, n: int) -> Row:
    """What the stand-in accepts from a minimal client sending one request at a time."""
    body = {
        "timestamp": "2026-01-01T00:00:00+00:00",
        "customer_id": None,
        "customer_ip_address": "203.0.113.7",
        "device": "desktop",
        "source": "web",
        "language": "en-US",
        "name": None,
        "environment": "production",
        "metadata": {"page_path": "/", "page_url": "https://shop.example.com/"},
        "is_used": False,
    }
    bodies = [
        json.dumps({**body, "conversation_id": f"conv_{i:012x}"}).encode()
        for i in range(0x7E0000, 0x7E0000 + n)
    ]
    started, cpu = time.monotonic(), time.thread_time()
    accepted = asyncio.run(_raw_client(api.url, api.api_key, bodies, 8))
    row = Row("stand-in, minimal client: 8 connections, 1 request each", n)
    row.seconds = time.monotonic() - started
    row.worker_cpu_us = (time.thread_time() - cpu) / n * 1e6
    row.delivered = accepted
    row.complete = accepted == n
    row.note = (
        "prebuilt bodies, no payload building, no pipelining: the stand-in's limit for "
        "such a client on this machine; CPU column: this client's CPU per POST"
    )
    api.trim()
    return row


# ---------------------------------------------------------------------------
# Where the worker's CPU goes
# ---------------------------------------------------------------------------

# Where a function's own time goes, by the file it is defined in (first match wins).
_BUCKETS: tuple[tuple[str, str], ...] = (
    ("<frozen importlib", "imports"),
    ("/asyncio/", "event loop (asyncio)"),
    ("/selectors.py", "event loop (asyncio)"),
    ("/httptools/", "HTTP client (pool, parser)"),
    ("/h11/", "HTTP client (pool, parser)"),
    ("/sinks/_http11", "HTTP client (pool, parser)"),
    ("/httpx/", "HTTP client (pool, parser)"),
    ("/sinks/http", "HTTP sink (senders, outcomes)"),
    ("/sqlite3/", "outbox"),
    ("/sinks/outbox", "outbox"),
    ("/json/", "JSON encoding"),
    ("/user_agents/", "user agents"),
    ("/ua_parser", "user agents"),
    ("/_device", "user agents"),
    ("/_payload", "payload building"),
    ("/_events", "payload building"),
    ("/_facts", "payload building"),
    ("/_conversation", "payload building"),
    ("/urllib/", "payload building"),
    ("/datetime", "payload building"),
    ("/_delivery", "worker loop"),
)


def _bucket(file: str, name: str) -> str | None:
    if file == "~":  # a built-in function: named for the system calls, else its caller's
        if "of '_socket.socket'" in name:
            return "socket system calls"
        if "of 'select.epoll'" in name:
            return "waiting (epoll)"
        return None
    for needle, bucket in _BUCKETS:
        if needle in file:
            return bucket
    return f"other ({os.path.basename(file)})"


def split_profile(stats: dict[Any, Any]) -> dict[str, float]:
    """Seconds of own time per bucket; a built-in's time goes to its biggest caller."""
    totals: dict[str, float] = {}
    for (file, _, name), (_, _, own, _, callers) in stats.items():
        bucket = _bucket(file, name)
        if bucket is None:
            caller = max(callers.items(), key=lambda kv: kv[1][2], default=None)
            bucket = "other (built-ins)"
            if caller is not None:
                (caller_file, _, caller_name), _ = caller
                bucket = _bucket(caller_file, caller_name) or bucket
        totals[bucket] = totals.get(bucket, 0.0) + own
    return totals


class WorkerProfiler:
    """cProfile inside the delivery worker's thread; the time it waits in epoll left out.

    A sampler in another thread of the same process cannot do this: it only runs when
    the worker lets go of the GIL, which is in its socket and epoll calls, so those
    would get every sample. cProfile is exact about calls but adds a cost to each,
    so it shows shares (call-heavy Python code a little over-weighted), which are
    applied to the CPU per event measured without it. Its clock is perf_counter:
    a thread CPU clock is a system call per reading here, which would swamp the shares.
    """

    def __init__(self) -> None:
        self.profile = cProfile.Profile(time.perf_counter)

    def _in_worker(self, mw: Any, action: Callable[[], None]) -> None:
        loop = mw._core.delivery._loop
        done = threading.Event()

        def run() -> None:
            action()
            done.set()

        loop.call_soon_threadsafe(run)
        if not done.wait(10):
            raise RuntimeError("the delivery worker did not run the profiler's call")

    def start(self, mw: Any) -> None:
        self._in_worker(mw, self.profile.enable)

    def stop(self, mw: Any) -> None:
        self._in_worker(mw, self.profile.disable)

    def shares(self) -> list[tuple[str, float]]:
        totals = split_profile(pstats.Stats(self.profile).stats)  # type: ignore[attr-defined]
        totals.pop("waiting (epoll)", None)
        whole = sum(totals.values()) or 1.0
        shares: dict[str, float] = {}
        for bucket, seconds in totals.items():
            share = seconds / whole
            key = bucket if share >= 0.005 or not bucket.startswith("other") else "other"
            shares[key] = shares.get(key, 0.0) + share
        return sorted(shares.items(), key=lambda kv: -kv[1])


def worker_profile(api: StandInProcess, events: int) -> tuple[Row, list[tuple[str, float]]]:
    """Deliver ``events`` (in-memory queue) under the profiler; each bucket's share."""
    profiler = WorkerProfiler()
    row = burst(
        api, "profiled", events, 300, queue_size=events,
        on_start=profiler.start, on_end=profiler.stop,
    )  # fmt: skip
    return row, profiler.shares()


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--events", type=int, default=20_000, help="page views per row")
    parser.add_argument("--sdk-calls", type=int, default=1000, help="0 skips the SDK row")
    parser.add_argument(
        "--row-seconds",
        type=float,
        default=40.0,
        help="longest wait for one row's delivery; the rate reached is reported (default 40)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--steady",
        type=float,
        default=3000.0,
        metavar="RATE",
        help="events a second of the steady row (default 3000; 0 skips it)",
    )
    parser.add_argument(
        "--slow-rate",
        type=float,
        default=1000,
        help="events a second of the rows with the API slow (50 ms an answer), 50 ms away, "
        "and down (default 1000; 0 skips them)",
    )
    parser.add_argument(
        "--steady-seconds", type=float, default=8.0, help="how long each steady row runs"
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="also deliver N events while sampling the background threads, and show "
        "where their CPU goes",
    )
    args = parser.parse_args(argv)
    if args.events < 1:
        parser.error("--events must be >= 1")

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    began = time.monotonic()
    info = machine_info()
    info["conditions_before"] = conditions()
    rows: list[Row] = []
    n = args.events
    with StandInProcess() as api, tempfile.TemporaryDirectory() as tmp:
        progress("enqueue cost")
        enqueue = enqueue_cost(n)
        progress(f"in-memory queue, queue_size={n}")
        rows.append(burst(api, f"ours, in-memory queue (queue_size={n:,})", n, args.row_seconds,
                          queue_size=n))  # fmt: skip
        progress("default queue_size")
        row = burst(api, "ours, default queue_size=10,000: burst kept", n, 30, wait=False)
        row.note = f"{row.dropped:,} of {n:,} dropped (queue full)" if row.dropped else "none lost"
        rows.append(row)
        progress("SQLite outbox")
        rows.append(burst(api, "ours, outbox= SQLite (durable)", n, args.row_seconds,
                          queue_size=n, outbox=os.path.join(tmp, "outbox.sqlite3")))  # fmt: skip
        if args.steady:
            progress(f"steady {args.steady:,.0f} events/s")
            name = f"ours, steady {args.steady:,.0f} events/s for {args.steady_seconds:g} s"
            rows.append(steady(api, name, args.steady, args.steady_seconds))
        if args.slow_rate:
            progress(f"steady {args.slow_rate:,.0f} events/s, API answering in 50 ms")
            name = f"ours, steady {args.slow_rate:,.0f}/s, API answering in 50 ms"
            rows.append(steady(api, name, args.slow_rate, args.steady_seconds, latency=0.05))
            progress(f"steady {args.slow_rate:,.0f} events/s, API 50 ms away")
            name = f"ours, steady {args.slow_rate:,.0f}/s, API 50 ms away, answering at once"
            with DistantAPI(api.url, 0.025) as distant:
                rows.append(
                    steady(api, name, args.slow_rate, args.steady_seconds, endpoint=distant.url)
                )
            progress(f"steady {args.slow_rate:,.0f} events/s, API down")
            name = f"ours, steady {args.slow_rate:,.0f}/s, API down (refused)"
            rows.append(steady_down(name, args.slow_rate, args.steady_seconds))
        if args.sdk_calls:
            progress(f"classic SDK, {args.sdk_calls} calls")
            rows.append(sdk_row(api, args.sdk_calls, progress))
        progress("stand-in, one request at a time")
        rows.append(ceiling_row(api, min(n, 5000)))
        profile: list[tuple[str, float]] = []
        profiled: Row | None = None
        if args.profile:
            progress(f"worker profile, {args.profile} events")
            profiled, profile = worker_profile(api, args.profile)
        accepted = api.trim()
        statuses = api.statuses()
    info["conditions_after"] = conditions()
    elapsed = time.monotonic() - began
    problems = [f"the stand-in answered {statuses}"] if set(statuses) - {200, 201} else []
    for row in rows:
        bad = {k: v for k, v in row.stats.items() if k in ("errors", "rejected", "failed") and v}
        if bad:
            problems.append(f"{row.name}: {bad}")

    if args.json:
        print(
            json.dumps(
                {
                    "machine": info,
                    "enqueue": enqueue,
                    "rows": [{**asdict(r), "events_per_s": round(r.rate, 1)} for r in rows],
                    "standin": {"accepted": accepted, "statuses": statuses},
                    "worker_profile_shares": dict(profile),
                    "problems": problems,
                    "seconds": round(elapsed, 1),
                },
                indent=2,
            )
        )
        return 1 if problems else 0

    print_machine(info)
    print()
    print(f"Delivery from one process to the stand-in AgentSight API on loopback ({n:,} events)")
    print(f"  {'':<58}{'events/s':>9}{'delivered':>11}{'s':>7}{'req µs':>8}{'bg µs/ev':>9}")
    for row in rows:
        rate = f"{row.rate:,.0f}" if row.seconds else "-"
        done = f"{row.delivered:,}" + ("" if row.complete or not row.seconds else "*")
        seconds = f"{row.seconds:.1f}" if row.seconds else "-"
        submit = f"{row.submit_us:.1f}" if row.submit_us is not None else "-"
        cpu = f"{row.worker_cpu_us:,.0f}" if row.worker_cpu_us is not None else "-"
        if not row.seconds:
            done = "-"
        print(f"  {row.name:<58}{rate:>9}{done:>11}{seconds:>7}{submit:>8}{cpu:>9}")
        if row.note:
            print(f"      {row.note}")
    print(
        "  *: not all delivered within --row-seconds; the rate is what was reached by then.\n"
        "  req µs: one request through the middleware (raw ASGI page) during the burst.\n"
        "  bg µs/ev: CPU of the process's other threads (worker, senders) per delivered event."
    )
    print()
    print(
        f"Enqueue on the request path: submit() {enqueue['submit_us']:.2f} µs, "
        f"Event(...) + submit() {enqueue['event_and_submit_us']:.2f} µs per event"
    )
    best = max((r.rate for r in rows if r.name.startswith("ours, in-memory queue (")), default=0)
    print(
        f"Targets: delivery >= {TARGET_RATE:,.0f} events/s: "
        f"{'met' if best >= TARGET_RATE else 'NOT met'} ({best:,.0f}); enqueue < "
        f"{TARGET_ENQUEUE_US:g} µs: "
        f"{'met' if enqueue['event_and_submit_us'] < TARGET_ENQUEUE_US else 'NOT met'}"
    )
    if profiled is not None:
        # The shares are applied to the in-memory row's CPU: same work, measured unprofiled.
        base = rows[0].worker_cpu_us or 0.0
        print()
        print(
            f"Worker CPU per delivered event, by where it goes ({profiled.delivered:,} events "
            f"under cProfile in the worker thread, waits in epoll left out; its shares "
            f"applied to the in-memory row's {base:,.0f} µs):"
        )
        for bucket, share in profile:
            print(f"  {bucket:<56}{share * base:>8,.1f} µs {share:>6.1%}")
    print(f"Stand-in API accepted {accepted:,} events in all; answers: {statuses}")
    if problems:
        print("PROBLEMS: " + "; ".join(problems))
    print(f"({elapsed:.0f} s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
