"""Resident memory of a process that served many requests through agentsight-middleware.

    .venv/bin/python benchmarks/memory.py                      # 1,000,000 a scenario, ~2 min
    .venv/bin/python benchmarks/memory.py --requests 200000    # a quicker look
    .venv/bin/python benchmarks/memory.py --json               # the table, then one JSON document

Each scenario runs in a fresh child process (``--child``) that drives an ASGI app
directly: raw ASGI calls (``await app(scope, receive, send)`` in one event loop), no
sockets, no test client. The requests are a mix of widget page views (``GET /`` as
Chrome sends it, 70 %) and chat requests (``POST /api/chat`` with a JSON body, 30 %),
none with a cookie: every request mints a new conversation id, so N requests are N
distinct conversations. The user agent cycles through ``--user-agents`` (100,000)
distinct, realistic strings (Chrome, Edge, Safari, Firefox, Samsung Internet on
Windows, macOS, Linux, Android and iOS, generated from version and device lists); the
client address cycles through 65,536 addresses.

Scenarios:

* ``bare``: the same loop on the app without the middleware (the baseline);
* ``backend up``: the middleware with ``api_key=`` / ``endpoint=`` pointing at the
  stand-in AgentSight API (``python -m agentsight_middleware._standin``) in its own
  process on 127.0.0.1, its default in-memory queue (``queue_size=10_000``);
* ``backend down``: the same with ``endpoint=`` at a closed port on 127.0.0.1 for the
  whole run (every send is refused; events are retried, then given up or dropped).

VmRSS (from ``/proc/self/status``) is sampled every ``--sample-every`` requests. The
table shows the series, each scenario's excess over ``bare`` at the same point, and the
level-off figure: the largest excess over ``bare`` at any sample. Target: under 50 MB,
backend up or down, and flat (< 2 MB of growth) over the last 30 % of the run.

The loop is as fast as one event loop goes, far faster than the worker can deliver to a
real API, so the in-memory queues are full most of the run and most events are dropped
(counted in ``stats()``): the worst case for memory. Each scenario also reports what the
middleware counted (enqueued, dropped, sent during the run and at close, what it held
at the end) and, with the backend up, how many requests the stand-in says it received.

On the 2-core machine this was written on a middleware scenario of 1,000,000 requests takes
about 50 s (the bare one 3 s), so the default is the full million.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from machine import describe
from standin_cli import StandInCLI, free_port, generate_api_key

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ("bare", "backend up", "backend down")
TARGET_MB = 50.0
FLAT_MB = 2.0  # "levelled off": less growth than this over the last 30 % of the run
PAGE_SHARE = 0.7  # of the requests: widget page views; the rest are chat requests
CHAT_SLOTS = frozenset({2, 5, 8})  # of every 10 requests, these are chat requests
HOST = b"shop.example.com"
PAGE = (
    b"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>Shop</title>"
    + b"<link rel='stylesheet' href='/static/app.css'></head><body><main>"
    + b"<p>Products, prices and a chat widget.</p>" * 40
    + b"</main><script src='/static/widget.js' defer></script></body></html>"
)
CHAT_REPLY = b'{"reply":"Yes, we ship to Canada: 3-5 business days."}'
LANGUAGES = (
    b"en-US,en;q=0.9",
    b"en-GB,en;q=0.9",
    b"de-DE,de;q=0.9,en;q=0.8",
    b"fr-FR,fr;q=0.9,en-US;q=0.8,en;q=0.7",
    b"es-ES,es;q=0.9",
    b"pt-BR,pt;q=0.9,en;q=0.8",
    b"ja-JP,ja;q=0.9",
    b"nl-NL,nl;q=0.9,en;q=0.8",
)
PAGE_HEADERS = (
    (b"host", HOST),
    (
        b"accept",
        b"text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,"
        b"image/webp,image/apng,*/*;q=0.8,application/signed-exchange;v=b3;q=0.7",
    ),
    (b"accept-encoding", b"gzip, deflate, br, zstd"),
    (b"sec-fetch-dest", b"document"),
    (b"sec-fetch-mode", b"navigate"),
    (b"sec-fetch-site", b"none"),
    (b"upgrade-insecure-requests", b"1"),
)
CHAT_HEADERS = (
    (b"host", HOST),
    (b"accept", b"*/*"),
    (b"content-type", b"application/json"),
    (b"origin", b"https://shop.example.com"),
    (b"referer", b"https://shop.example.com/"),
    (b"sec-fetch-dest", b"empty"),
    (b"sec-fetch-mode", b"cors"),
)


# ---------------------------------------------------------------------------
# User agents
# ---------------------------------------------------------------------------

_DESKTOPS = (
    "Windows NT 10.0; Win64; x64",
    "Macintosh; Intel Mac OS X 10_15_7",
    "X11; Linux x86_64",
    "Windows NT 10.0; WOW64",
    "X11; CrOS x86_64 14541.0.0",
)
_ANDROIDS = (
    "SM-S918B",
    "SM-A546B",
    "SM-G991B",
    "SM-A145R",
    "Pixel 8",
    "Pixel 7a",
    "Pixel 6",
    "M2101K6G",
    "23049PCD8G",
    "CPH2581",
    "moto g 5G",
    "K",
)
_FIREFOX_OS = (
    "Windows NT 10.0; Win64; x64",
    "Macintosh; Intel Mac OS X 10.15",
    "X11; Ubuntu; Linux x86_64",
    "X11; Linux x86_64",
    "Android 14; Mobile",
)


def _chrome(j: int) -> tuple[int, int, int]:
    """A distinct (major, build, patch) for each j: Chrome-shaped version numbers."""
    return 100 + j % 32, 4896 + (j // 32) % 2000, j // 64000


def _family(kind: int, j: int) -> str:
    major, build, patch = _chrome(j)
    if kind == 0:
        desktop = _DESKTOPS[j % len(_DESKTOPS)]
        return (
            f"Mozilla/5.0 ({desktop}) AppleWebKit/537.36 (KHTML, like Gecko) "
            f"Chrome/{major}.0.{build}.{patch} Safari/537.36"
        )
    if kind == 1:
        model = _ANDROIDS[j % len(_ANDROIDS)]
        android = 10 + (j // len(_ANDROIDS)) % 5
        return (
            f"Mozilla/5.0 (Linux; Android {android}; {model}) AppleWebKit/537.36 "
            f"(KHTML, like Gecko) Chrome/{major}.0.{build}.{patch} Mobile Safari/537.36"
        )
    if kind == 2:
        ios, minor = 15 + j % 4, (j // 4) % 7
        device = ("iPhone; CPU iPhone OS", "iPad; CPU OS")[(j // 28) % 2]
        return (
            f"Mozilla/5.0 ({device} {ios}_{minor} like Mac OS X) AppleWebKit/605.1.15 "
            f"(KHTML, like Gecko) Version/{ios}.{minor} Mobile/{15 + j % 7}E{100 + j // 56} "
            "Safari/604.1"
        )
    if kind == 3:
        desktop = _DESKTOPS[j % 2]
        return (
            f"Mozilla/5.0 ({desktop}) AppleWebKit/537.36 (KHTML, like Gecko) "
            f"Chrome/{major}.0.0.0 Safari/537.36 Edg/{major}.0.{build}.{patch}"
        )
    if kind == 4:
        version = 100 + j % 36
        return (
            f"Mozilla/5.0 ({_FIREFOX_OS[(j // 36) % len(_FIREFOX_OS)]}; rv:{version}.0) "
            f"Gecko/20100101 Firefox/{version}.0"
        )
    if kind == 5:
        model = _ANDROIDS[j % 4]
        return (
            f"Mozilla/5.0 (Linux; Android {11 + j % 4}; {model}) AppleWebKit/537.36 "
            f"(KHTML, like Gecko) SamsungBrowser/{20 + (j // 4) % 6}.{j // 24 % 10} "
            f"Chrome/{major}.0.{build}.{patch} Mobile Safari/537.36"
        )
    minor = j % 7
    return (
        f"Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 "
        f"(KHTML, like Gecko) Version/{16 + j % 3}.{minor}.{j // 21} Safari/605.1.15"
    )


# Shares of the families, roughly as on the web: Chrome desktop, Chrome Android, iOS
# Safari, Edge, Firefox, Samsung Internet, macOS Safari.
_WEIGHTS = (30, 25, 20, 8, 5, 6, 6)


def user_agents(count: int) -> list[bytes]:
    """``count`` distinct user agents, the families interleaved by their shares."""
    order = [kind for kind, weight in enumerate(_WEIGHTS) for _ in range(weight)]
    seen: set[str] = set()
    result: list[bytes] = []
    counters = [0] * len(_WEIGHTS)
    for kind in itertools.cycle(order):
        if len(result) >= count:
            break
        ua = _family(kind, counters[kind])
        counters[kind] += 1
        if ua not in seen:  # small families (Firefox) run out of variety and repeat
            seen.add(ua)
            result.append(ua.encode("latin-1"))
    return result


# ---------------------------------------------------------------------------
# The app and the loop
# ---------------------------------------------------------------------------


async def shop_app(scope: Scope, receive: Receive, send: Send) -> None:
    """A raw ASGI app: an HTML page, and a chat endpoint that reads its JSON body."""
    if scope["method"] == "POST":
        more = True
        while more:
            message = await receive()
            more = message.get("more_body", False)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(CHAT_REPLY)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": CHAT_REPLY})
        return
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"text/html; charset=utf-8"),
                (b"content-length", str(len(PAGE)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": PAGE})


async def _discard(message: Message) -> None:
    pass


def _receiver(body: bytes) -> Receive:
    async def receive() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


def _rss_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def _requests(agents: list[bytes]) -> Iterator[tuple[Scope, Receive]]:
    """Endless (scope, receive) pairs: the mix of page views and chat requests."""
    empty = _receiver(b"")
    for i in itertools.count():
        agent = agents[i % len(agents)]
        language = LANGUAGES[i % len(LANGUAGES)]
        client = (f"198.51.{(i >> 8) & 255}.{i & 255}", 40000 + i % 20000)
        if i % 10 in CHAT_SLOTS:
            body = b'{"message":"Hi! Do you ship to Canada? (%d)"}' % i
            headers = [
                *CHAT_HEADERS,
                (b"user-agent", agent),
                (b"accept-language", language),
                (b"content-length", str(len(body)).encode()),
            ]
            yield _scope("POST", "/api/chat", headers, client), _receiver(body)
        else:
            headers = [*PAGE_HEADERS, (b"user-agent", agent), (b"accept-language", language)]
            yield _scope("GET", "/", headers, client), empty


def _scope(method: str, path: str, headers: list[tuple[bytes, bytes]], client: Any) -> Scope:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "https",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": client,
        "server": ("10.0.0.5", 8000),
    }


@dataclass
class ChildResult:
    scenario: str
    samples: list[dict[str, float]] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    rss_after_close_mb: float = 0.0
    error: str | None = None


def run_child(args: argparse.Namespace) -> int:
    """One scenario in this process; one JSON line per sample on stdout, then a summary."""
    agents = user_agents(args.user_agents)
    app: Any = shop_app
    middleware: Any = None
    if args.child != "bare":
        from agentsight_middleware import AgentSightMiddleware

        middleware = AgentSightMiddleware(
            shop_app,
            widget_pages=["/"],
            chat_routes=["POST /api/chat"],
            api_key=args.api_key,
            endpoint=args.endpoint,
            environment="production",
            shutdown_timeout=2.0,
        )
        app = middleware

    def emit(record: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(record) + "\n")
        sys.stdout.flush()

    async def drive() -> None:
        requests = _requests(agents)
        every = args.sample_every
        started = time.perf_counter()
        emit(
            {"sample": 0, "rss_kib": _rss_kib(), "seconds": 0.0, "blocks": sys.getallocatedblocks()}
        )
        for done in range(1, args.requests + 1):
            scope, receive = next(requests)
            await app(scope, receive, _discard)
            if done % every == 0 or done == args.requests:
                record: dict[str, Any] = {
                    "sample": done,
                    "rss_kib": _rss_kib(),
                    "seconds": round(time.perf_counter() - started, 2),
                    "blocks": sys.getallocatedblocks(),
                }
                if middleware is not None:
                    record["stats"] = middleware.stats()
                emit(record)
                # Let the worker thread have the GIL for a moment, as idle time would.
                await asyncio.sleep(0)

    started = time.perf_counter()
    asyncio.run(drive())
    seconds = time.perf_counter() - started
    summary: dict[str, Any] = {"done": True, "seconds": round(seconds, 2)}
    if middleware is not None:
        # What the worker still holds, then a bounded close (the backend-down run gives up).
        summary["stats"] = middleware.stats()
        middleware.close(2.0)
        summary["stats_after_close"] = middleware.stats()
    summary["rss_after_close_kib"] = _rss_kib()
    emit(summary)
    return 0


# ---------------------------------------------------------------------------
# The parent: stand-in, children, table
# ---------------------------------------------------------------------------


def run_scenario(
    name: str, args: argparse.Namespace, progress: Callable[[str], None]
) -> tuple[ChildResult, list[str], int | None]:
    """Run one scenario in a child; its result, its log lines, and the stand-in's count."""
    standin: StandInCLI | None = None
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        "bare" if name == "bare" else "middleware",
        "--requests",
        str(args.requests),
        "--sample-every",
        str(args.sample_every),
        "--user-agents",
        str(args.user_agents),
    ]
    if name == "backend up":
        standin = StandInCLI()
        command += ["--endpoint", standin.url, "--api-key", standin.api_key]
    elif name == "backend down":
        key = generate_api_key()
        command += ["--endpoint", f"http://127.0.0.1:{free_port()}", "--api-key", key]
    result = ChildResult(name)
    received: int | None = None
    with tempfile.TemporaryFile("w+") as log:
        try:
            result = _read_child(name, command, log, progress)
        finally:
            if standin is not None:
                received = standin.stop()
        log.seek(0)
        lines = log.read().splitlines()
    return result, lines, received


def _read_child(
    name: str, command: list[str], log: IO[str], progress: Callable[[str], None]
) -> ChildResult:
    result = ChildResult(name)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    assert proc.stdout is not None
    for line in proc.stdout:
        record = json.loads(line)
        if record.get("done"):
            result.seconds = record["seconds"]
            result.stats = record.get("stats_after_close") or {}
            before = record.get("stats", {})
            result.stats["sent_during_run"] = before.get("sent", 0)
            result.stats["retried_during_run"] = before.get("retried", 0)
            result.stats["queued_before_close"] = before.get("queued", 0)
            result.stats["pending_before_close"] = before.get("pending", 0)
            result.rss_after_close_mb = record["rss_after_close_kib"] / 1024
            continue
        result.samples.append(
            {
                "requests": record["sample"],
                "rss_mb": record["rss_kib"] / 1024,
                "seconds": record["seconds"],
                "blocks": record["blocks"],
            }
        )
        if record["sample"]:
            progress(
                f"  {name}: {record['sample']:>9,} requests, RSS {record['rss_kib'] / 1024:6.1f} "
                f"MB, {record['seconds']:6.1f} s"
            )
    if proc.wait() != 0:
        result.error = f"exit status {proc.returncode}"
    return result


def machine() -> dict[str, Any]:
    return describe(
        (
            "agentsight-middleware",
            "starlette",
            "anyio",
            "httpx",
            "httpcore",
            "user-agents",
            "ua-parser",
        )
    )


def level_off(result: ChildResult, bare: ChildResult) -> dict[str, float]:
    """Excess over bare at each sample: its maximum and final value, and the growth over the
    last 30 % of the run (flat once the queues are full, if nothing leaks)."""
    pairs = list(zip(result.samples, bare.samples, strict=False))
    excess = [s["rss_mb"] - b["rss_mb"] for s, b in pairs]
    samples = result.samples
    last = samples[-1]
    since = min(samples, key=lambda s: abs(s["requests"] - 0.7 * last["requests"]))
    return {
        "max_above_bare_mb": round(max(excess), 1),
        "final_above_bare_mb": round(excess[-1], 1),
        "growth_last_30pct_mb": round(last["rss_mb"] - since["rss_mb"], 1),
    }


def _log_summary(lines: list[str]) -> list[tuple[str, int]]:
    """Distinct log messages (numbers replaced by N), each with its count, first seen first."""
    counts: dict[str, int] = {}
    for line in lines:
        key = re.sub(r"\d+(\.\d+)?", "N", line.strip())
        counts[key] = counts.get(key, 0) + 1
    return list(counts.items())


def print_table(results: dict[str, ChildResult]) -> None:
    bare = results["bare"]
    names = [n for n in SCENARIOS if n in results]
    head = f"{'requests':>10}" + "".join(f"{n + ' MB':>16}" for n in names)
    head += "".join(f"{n + ' - bare':>22}" for n in names if n != "bare")
    print(head)
    print("-" * len(head))
    for i, sample in enumerate(bare.samples):
        row = f"{sample['requests']:>10,}"
        values = [
            results[n].samples[i]["rss_mb"] if i < len(results[n].samples) else None for n in names
        ]
        row += "".join(f"{v:>16.1f}" if v is not None else f"{'-':>16}" for v in values)
        for n, v in zip(names, values, strict=True):
            if n != "bare":
                row += f"{v - sample['rss_mb']:>+22.1f}" if v is not None else f"{'-':>22}"
        print(row)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=1_000_000, help="per scenario")
    parser.add_argument("--sample-every", type=int, default=0, help="default: requests / 10")
    parser.add_argument("--user-agents", type=int, default=100_000, help="distinct UAs cycled")
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=("bare", "middleware"), help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    parser.add_argument("--api-key", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.requests < 1 or args.user_agents < 1:
        parser.error("--requests and --user-agents must be >= 1")
    if args.sample_every <= 0:
        args.sample_every = max(args.requests // 10, 1)
    if args.child:
        return run_child(args)

    def progress(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    info = machine()
    print(f"CPU      {info['cpu']}, {info['cores']} cores; 1-min load {info['load_1min']}")
    print(f"Python   {info['python']} on {info['platform']}")
    print("Packages " + ", ".join(f"{k} {v}" for k, v in info["packages"].items()))
    print(
        f"Load     {args.requests:,} requests per scenario ({PAGE_SHARE:.0%} widget page views, "
        f"the rest chat POSTs), every one a new conversation, {args.user_agents:,} distinct "
        "user agents cycled; raw ASGI calls in one event loop"
    )
    print(flush=True)
    wanted = [s.strip() for s in args.scenarios.split(",")]
    if "bare" not in wanted:
        wanted.insert(0, "bare")
    results: dict[str, ChildResult] = {}
    logs: dict[str, list[str]] = {}
    received: dict[str, int | None] = {}
    for name in SCENARIOS:
        if name not in wanted:
            continue
        progress(f"{name}: running")
        results[name], logs[name], received[name] = run_scenario(name, args, progress)
        if results[name].error:
            print(f"{name}: the child failed ({results[name].error}):")
            print("\n".join(logs[name][-30:]))
            return 1

    print("VmRSS, MB, after N requests (the '- bare' columns: excess over bare at the same N)")
    print_table(results)
    print()
    bare = results["bare"]
    summary: dict[str, Any] = {}
    ok = True
    for name, result in results.items():
        rate = args.requests / result.seconds if result.seconds else 0.0
        line = f"{name:<13} {result.seconds:6.1f} s ({rate:,.0f} req/s)"
        if name == "bare":
            print(f"{line}; peak RSS {max(s['rss_mb'] for s in bare.samples):.1f} MB")
            summary[name] = {"seconds": result.seconds}
            continue
        figures = level_off(result, bare)
        flat = figures["growth_last_30pct_mb"] < FLAT_MB
        within = figures["max_above_bare_mb"] < TARGET_MB and flat
        ok = ok and within
        stats = result.stats
        print(
            f"{line}; level-off: max {figures['max_above_bare_mb']:+.1f} MB above bare "
            f"(final {figures['final_above_bare_mb']:+.1f}), growth over the last 30 % "
            f"{figures['growth_last_30pct_mb']:+.1f} MB -> "
            f"{'OK' if within else 'OVER TARGET'} (< {TARGET_MB:.0f} MB, < {FLAT_MB:.0f} MB)"
        )
        print(
            f"{'':<13} events: {stats.get('enqueued', 0):,} enqueued, "
            f"{stats.get('dropped', 0):,} dropped at a full queue, "
            f"{stats.get('sent_during_run', 0):,} sent during the run and "
            f"{stats.get('sent', 0) - stats.get('sent_during_run', 0):,} at close, "
            f"{stats.get('failed', 0):,} given up, {stats.get('retried', 0):,} retries, "
            f"{stats.get('errors', 0):,} errors"
        )
        print(
            f"{'':<13} held at the end of the run: {stats.get('queued_before_close', 0):,} in the "
            f"intake queue, {stats.get('pending_before_close', 0):,} in the outbox; RSS after "
            f"close {result.rss_after_close_mb:.1f} MB"
        )
        if received.get(name) is not None:
            print(
                f"{'':<13} the stand-in received {received[name]:,} request(s) "
                f"(middleware counted {stats.get('sent', 0) + stats.get('rejected', 0):,} answered)"
            )
        warnings = [ln for ln in logs[name] if ln.strip()]
        for message, count in _log_summary(warnings):
            print(f"{'':<13} log: {message[:160]}" + (f"  (x{count})" if count > 1 else ""))
        summary[name] = {
            "seconds": result.seconds,
            "stats": stats,
            **figures,
            "stand_in_received": received.get(name),
            "log": warnings[:20],
        }
    if args.json:
        print(
            json.dumps(
                {
                    "machine": info,
                    "requests": args.requests,
                    "user_agents": args.user_agents,
                    "series": {n: r.samples for n, r in results.items()},
                    "summary": summary,
                },
                indent=2,
            )
        )
    return 0 if ok else 2


if __name__ == "__main__":
    sys.exit(main())
