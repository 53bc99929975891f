"""How long ``agentsight-middleware report`` takes on a file of 1,000,000 events.

    .venv/bin/python benchmarks/report_million.py [--events 1000000] [--db PATH] [--keep]

Builds the file (unless ``--db`` names one that exists) with realistic synthetic traffic:
visitors view one to four widget pages, a quarter of them chat, a few chats come without a
page view; 90 days, 30 pages, three devices, a dozen languages. Then it times
``build_report`` (all five breakdowns and the daily trend), with and without ``--since 7d``,
and prints the figures, after the write speed of ``LocalStore.write`` in batches of 100.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from agentsight_middleware._payload import iso_timestamp
from agentsight_middleware._report import build_report, parse_since
from agentsight_middleware._store import _INSERT, LocalStore, _row

PAGES = ["/", "/pricing", "/docs", "/contact", "/blog", "/signup"] + [
    f"/docs/guide/{n}" for n in range(24)
]
DEVICES: list[str | None] = ["desktop", "desktop", "desktop", "mobile", "mobile", "tablet", None]
LANGUAGES: list[str | None] = [
    "en-US",
    "en-US",
    "en-GB",
    "de-DE",
    "fr-FR",
    "es-ES",
    "it-IT",
    "nl-NL",
    "pt-BR",
]
LANGUAGES += ["ja-JP", "pl-PL", "sv-SE", None]
USER_AGENT = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36"
)
DAYS = 90


def payload(
    ts: float, conversation_id: str, path: str, device: str | None, lang: str | None, used: bool
) -> dict[str, Any]:
    return {
        "timestamp": iso_timestamp(ts),
        "conversation_id": conversation_id,
        "customer_id": None,
        "customer_ip_address": "203.0.113.7",
        "device": device,
        "source": "web",
        "language": lang,
        "name": None,
        "environment": "production",
        "metadata": {
            "page_path": path,
            "page_url": f"https://shop.example{path}",
            "referrer": None,
            "user_agent": USER_AGENT,
            "rule": path,
            "conversation_id_source": "cookie" if used else "minted",
        },
        "is_used": used,
    }


def synthetic(count: int, end: float, seed: int = 1) -> Iterator[dict[str, Any]]:
    """About ``count`` events (exactly ``count``: the last conversation is cut short)."""
    rng = random.Random(seed)
    made = 0
    n = 0
    while made < count:
        n += 1
        cid = f"conv_{n:012x}"
        device = rng.choice(DEVICES)
        lang = rng.choice(LANGUAGES)
        ts = end - rng.random() * DAYS * 86400
        events = []
        if rng.random() >= 0.02:  # 2 % of chats come with no page view (an API client)
            for _ in range(rng.randint(1, 4)):
                events.append(payload(ts, cid, rng.choice(PAGES), device, lang, False))
                ts += rng.random() * 120
        if not events or rng.random() < 0.25:
            for _ in range(rng.randint(1, 3)):
                events.append(payload(ts, cid, "/api/chat", device, lang, True))
                ts += rng.random() * 60
        yield from events[: count - made]
        made += min(len(events), count - made)


def fill(path: str, count: int) -> float:
    """Writes ``count`` events in one transaction; returns the seconds it took."""
    start = time.perf_counter()
    with LocalStore(path) as store:
        with store._reading() as conn:
            # One transaction larger than the page cache spills and rewrites pages.
            conn.execute("PRAGMA cache_size = -1000000")
        with store._transaction() as conn:
            conn.executemany(_INSERT, (_row(p) for p in synthetic(count, time.time())))
    return time.perf_counter() - start


def write_speed(batches: int = 500, size: int = 100) -> float:
    """Rows per second through ``LocalStore.write`` in batches of ``size``, as the worker does."""
    payloads = list(synthetic(batches * size, time.time(), seed=2))
    with (
        tempfile.TemporaryDirectory(prefix="agentsight-bench-") as directory,
        LocalStore(os.path.join(directory, "write-speed.sqlite3")) as store,
    ):
        store.write(payloads[:size])  # open the file and create the schema first
        start = time.perf_counter()
        for n in range(1, batches):
            store.write(payloads[n * size : (n + 1) * size])
        seconds = time.perf_counter() - start
    return (batches - 1) * size / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--db", help="events file to build or reuse (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary file")
    args = parser.parse_args(argv)
    speeds = [write_speed() for _ in range(3)]
    print(
        f"LocalStore.write, batches of 100: best {max(speeds):,.0f} rows/s, "
        f"worst {min(speeds):,.0f} rows/s"
    )
    directory = None
    path = args.db
    if path is None:
        directory = tempfile.mkdtemp(prefix="agentsight-bench-")
        path = os.path.join(directory, "events.sqlite3")
    if not os.path.exists(path):
        seconds = fill(path, args.events)
        print(f"wrote {args.events:,} events in {seconds:.1f} s ({args.events / seconds:,.0f}/s)")
    size = os.path.getsize(path) / 1e6
    print(f"file: {path} ({size:.0f} MB)")
    for label, since in (("all time", None), ("--since 7d", parse_since("7d"))):
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            report = build_report(path, since=since)
            runs.append(time.perf_counter() - start)
        print(
            f"report, {label}: best {min(runs):.2f} s, worst {max(runs):.2f} s "
            f"({report.events:,} events, {report.initialized:,} initialized, "
            f"{report.used:,} used, rate {report.interaction_rate_percent:.1f} %)"
        )
    if directory is not None and not args.keep:
        shutil.rmtree(directory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
