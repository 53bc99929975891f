"""``agentsight-middleware send``: deliver a local events file to the AgentSight API.

For events gathered before there was an API key. Idempotent: an event the API
accepted is marked in the file and never sent again, so an interrupted replay
is simply run again.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TextIO

import httpx

from .__version__ import __version__
from ._credentials import Credentials
from ._retry import ACCEPTED, REJECTED, THROTTLED, backoff, classify, retry_after
from ._store import LocalStore, connect_readonly, mark_sent, unsent

__all__ = ["ReplaySummary", "replay"]

_BATCH = 200
_ATTEMPTS = 4


@dataclass
class ReplaySummary:
    sent: int = 0
    #: Already sent by an earlier run: not sent again.
    skipped: int = 0
    failed: int = 0
    #: The server's words for the first refusal, to show the user.
    first_error: str | None = None


def _counts(path: str | os.PathLike[str]) -> tuple[int, int]:
    conn = connect_readonly(path)
    try:
        total, done = conn.execute("SELECT count(*), count(sent_at) FROM events").fetchone()
    finally:
        conn.close()
    return int(total), int(done)


def _post(client: httpx.Client, url: str, payload: dict[str, Any]) -> tuple[bool, str | None]:
    """(accepted, error) after bounded retries of what can be retried."""
    error: str | None = None
    for attempt in range(1, _ATTEMPTS + 1):
        try:
            response = client.post(url, json=payload)
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        else:
            outcome = classify(response.status_code)
            if outcome == ACCEPTED:
                return True, None
            error = f"HTTP {response.status_code}: {response.text[:200]}"
            if outcome == REJECTED:
                return False, error
            if outcome == THROTTLED:
                time.sleep(retry_after(response.headers.get("retry-after"), now=time.time()))
                continue
        if attempt < _ATTEMPTS:
            time.sleep(backoff(attempt))
    return False, error


def replay(
    path: str | os.PathLike[str],
    credentials: Credentials,
    *,
    concurrency: int = 8,
    progress: TextIO | None = None,
    transport: httpx.BaseTransport | None = None,
) -> ReplaySummary:
    """Send every not-yet-sent event of ``path``; ``progress`` gets a bar when it is a terminal."""
    total, done = _counts(path)
    summary = ReplaySummary(skipped=done)
    todo = total - done
    show: Callable[[int], None] = _progress_bar(progress, todo)
    url = credentials.conversations_url
    headers = {
        "Authorization": f"Api-Key {credentials.api_key}",
        "User-Agent": f"agentsight-middleware/{__version__}",
    }
    with (
        LocalStore(path) as store,
        httpx.Client(headers=headers, timeout=15.0, transport=transport, trust_env=False) as client,
        ThreadPoolExecutor(concurrency) as pool,
    ):
        after = 0
        while batch := unsent(store, _BATCH, after):
            after = batch[-1][0]
            results = list(pool.map(lambda row: _post(client, url, row[1]), batch))
            accepted = [row[0] for row, (ok, _) in zip(batch, results, strict=True) if ok]
            mark_sent(store, accepted)
            summary.sent += len(accepted)
            for ok, error in results:
                if not ok:
                    summary.failed += 1
                    summary.first_error = summary.first_error or error
            show(summary.sent + summary.failed)
    show(-1)
    return summary


def _progress_bar(stream: TextIO | None, total: int) -> Callable[[int], None]:
    if stream is None or not stream.isatty() or total == 0:
        return lambda n: None
    width = 30

    def show(n: int) -> None:
        if n < 0:
            stream.write("\n")
        else:
            filled = width * n // total
            stream.write(f"\rsending {n}/{total} [{'=' * filled}{' ' * (width - filled)}]")
        stream.flush()

    return show
