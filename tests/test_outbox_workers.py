"""A conversation's page view reaches the API before its chat when gunicorn's workers share
an outbox and one of them has just started: real gunicorn workers, the stand-in API."""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from agentsight_middleware.testing import StandInAgentSightAPI

from .conftest import BROWSER, gunicorn_outbox_app, gunicorn_workers

# How much longer than SETTLE (1 s) a started worker's one-time work takes here: its first
# events, views served in that time among them, reach the file that much later.
SLOW_START = 2.5


@pytest.fixture
def api() -> Iterator[StandInAgentSightAPI]:
    with StandInAgentSightAPI() as server:
        yield server


def _visit(client: httpx.Client) -> tuple[str, int, int]:
    """A page view, then a chat of its conversation: (id, pid of each one's worker)."""
    client.cookies.clear()
    view = client.get("/", headers=BROWSER)
    conversation_id = client.cookies["agentsight_conversation_id"]
    chat = client.post(
        "/api/chat", json={"message": "hi"}, headers={"user-agent": BROWSER["user-agent"]}
    )
    assert view.status_code == chat.status_code == 200
    return conversation_id, int(view.headers["x-pid"]), int(chat.headers["x-pid"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for the workers")
def test_a_view_served_by_a_worker_still_starting_reaches_the_api_before_its_chat(
    tmp_path: Path, api: StandInAgentSightAPI
) -> None:
    # gunicorn -w 4 with workers restarted (SIGKILL, --max-requests, a worker timeout) on a
    # busy machine: a new worker's first writes come after its one-time work (the HTTP
    # client's import, the user-agent parser's build: 0.6-2.6 s measured), past the
    # second a chat waits in the file for its view. A chat served meanwhile by a worker
    # that had started already reached the API before its view (29-45 in 20 s of such
    # restarts, ~0.7 % of the chats).
    visits: list[tuple[str, int, int]] = []
    slow = {"AGENTSIGHT_TEST_SLOW_START": str(SLOW_START)}
    with gunicorn_outbox_app(tmp_path, api, workers=1, **slow) as (url, server, log):
        with httpx.Client(base_url=url) as c:
            visits.append(_visit(c))
        api.wait_for(conversations=2, timeout=30)  # the first worker has started
        [started] = gunicorn_workers(server.pid)
        server.send_signal(signal.SIGTTIN)  # one more worker: it starts now
        deadline = time.monotonic() + 30
        while len(gunicorn_workers(server.pid)) < 2:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        stop = threading.Event()

        def visitor() -> None:
            with httpx.Client(base_url=url) as c:
                while not stop.is_set():
                    visits.append(_visit(c))

        visitors = [threading.Thread(target=visitor) for _ in range(4)]
        for thread in visitors:
            thread.start()
        # Until the new worker has served for its whole start, and some more.
        deadline = time.monotonic() + 60
        new_seen_at = None
        while new_seen_at is None or time.monotonic() < new_seen_at + SLOW_START + 1:
            assert time.monotonic() < deadline, log.read_text()
            if new_seen_at is None and any(view != started for _, view, _ in visits):
                new_seen_at = time.monotonic()
            time.sleep(0.05)
        stop.set()
        for thread in visitors:
            thread.join(30)
        api.wait_for(conversations=2 * len(visits), timeout=60)
    # The case at stake happened, with a margin: views served by the new worker, their
    # chats by the one started before.
    crossed = [cid for cid, view, chat in visits if view != started and chat == started]
    assert len(crossed) >= 5, (len(crossed), len(visits))
    order: dict[str, list[bool]] = {}
    for body in api.conversations:
        order.setdefault(body["conversation_id"], []).append(body["is_used"])
    chat_first = [cid for cid, _, _ in visits if order[cid] != [False, True]]
    assert chat_first == [], (
        f"{len(chat_first)} of {len(visits)} conversations reached the API chat first "
        f"({len(set(chat_first) & set(crossed))} of them viewed at the new worker)"
    )
