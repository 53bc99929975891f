"""The WSGI middleware under gunicorn's gevent worker (``-k gevent``), with and without
``--preload``: page views and chats answer at once, the worker keeps answering, and every
event reaches the stand-in API, the local store or a tracker, what is queued at SIGTERM
included.

The worker monkey-patches ``threading``, ``socket`` and ``time`` after the fork: with
``--preload`` the middleware was built in the master, and the locks it made there (and in its
at-fork hooks, which run before the patching) are the operating system's. One held across a
thread's start, which under gevent switches greenlets, froze the whole worker for good when
the next request's greenlet waited for it: each worker's first requests come at once here."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from agentsight_middleware.testing import StandInAgentSightAPI

from .apps.gevent_app import PAGE
from .conftest import BROWSER

ROOT = Path(__file__).parent.parent
COOKIE = "agentsight_conversation_id"
BURST = 24


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def workers(self) -> list[int]:
        """The pids of the workers gunicorn booted, from its log."""
        return [
            int(pid) for pid in re.findall(r"Booting worker with pid: (\d+)", self.log.read_text())
        ]

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Its workers stopped (SIGSTOP) meanwhile: the connections made wait in the listening
        socket's backlog, and a worker let go takes them together, a greenlet each."""
        workers = self.workers()
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            for pid in workers:
                os.kill(pid, signal.SIGCONT)

    def stop(self) -> int:
        """SIGTERM, as a container's stop sends; the exit code."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)


@pytest.fixture
def api() -> Iterator[StandInAgentSightAPI]:
    with StandInAgentSightAPI() as api:
        # Answers come after the stop is sent: the stop itself must deliver them.
        api.set_latency(0.3)
        yield api


@contextlib.contextmanager
def serving(
    api: StandInAgentSightAPI, tmp_path: Path, *, sink: str, preload: bool, workers: int
) -> Iterator[Server]:
    port = _free_port()
    env = {**os.environ, "GEVENT_TEST_SINK": sink, "GEVENT_TEST_FILE": str(tmp_path / sink)}
    env.pop("AGENTSIGHT_API_KEY", None)
    if sink in ("api", "outbox"):
        env.update(AGENTSIGHT_API_KEY=api.api_key, AGENTSIGHT_API_ENDPOINT=api.url)
    command = [
        sys.executable, "-m", "gunicorn", "-k", "gevent", "-w", str(workers), "--timeout", "60",
        "-b", f"127.0.0.1:{port}", *(["--preload"] if preload else []),
        "tests.apps.gevent_app:app",
    ]  # fmt: skip
    log = tmp_path / "gunicorn.log"
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", process, log)
    try:
        deadline = time.monotonic() + 30
        while len(re.findall("Booting worker", log.read_text())) < workers:
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        while True:  # /health is the app's, not the middleware's: no worker has seen a request
            try:
                httpx.get(f"{server.url}/health", timeout=0.5)
                break
            except httpx.TransportError:
                assert process.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
        time.sleep(0.5)  # every worker listening
        yield server
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
            # A frozen worker never sees its master go: killed too, or it stays for good.
            for pid in server.workers():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def visit_and_chat(url: str, i: int) -> str:
    """A visitor's page view then chat; the conversation."""
    with httpx.Client(base_url=url, timeout=10) as c:
        page = c.get("/", headers=BROWSER)
        assert (page.status_code, page.content) == (200, PAGE)
        conversation = c.cookies[COOKIE]
        chat = c.post("/api/chat", json={"message": f"hi {i}"})
        assert chat.headers["x-conversation"] == conversation
    return conversation


def chat_only(url: str, i: int) -> str:
    """A chat naming its conversation in the JSON body, with no page view before it."""
    conversation = f"conv_{i:012x}"
    chat = httpx.post(f"{url}/api/chat", json={"conversation_id": conversation}, timeout=10)
    assert chat.headers["x-conversation"] == conversation
    return conversation


def received(api: StandInAgentSightAPI, sink: str, tmp_path: Path) -> set[tuple[str, bool]]:
    """(conversation id, is_used) of what reached the sink."""
    path = tmp_path / sink
    if sink in ("api", "outbox"):
        return {(body["conversation_id"], body["is_used"]) for body in api.conversations}
    if sink == "store":
        with contextlib.closing(sqlite3.connect(path)) as conn:
            rows = conn.execute("SELECT conversation_id, is_used FROM events").fetchall()
        return {(conversation_id, bool(is_used)) for conversation_id, is_used in rows}
    calls = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return {
        (call["conversation_id"], call["method"] == "get_or_create_conversation") for call in calls
    }


# One worker takes every connection waiting at once (a greenlet each) and so meets the first
# requests together; with more, gunicorn has each take one connection per turn of its loop,
# and they meet only by chance.
@pytest.mark.parametrize(
    ("sink", "preload", "workers"),
    [
        pytest.param("api", True, 2, id="api-preload"),
        pytest.param("api", False, 2, id="api"),
        pytest.param("api", True, 1, id="api-preload-1"),
        pytest.param("store", True, 1, id="store-preload-1"),
        pytest.param("tracker", True, 1, id="tracker-preload-1"),
        pytest.param("pooled-tracker", True, 1, id="pooled-tracker-preload-1"),
        pytest.param("async-tracker", True, 1, id="async-tracker-preload-1"),
    ],
)
def test_gevent_workers_answer_and_deliver(
    sink: str, preload: bool, workers: int, api: StandInAgentSightAPI, tmp_path: Path
) -> None:
    with serving(api, tmp_path, sink=sink, preload=preload, workers=workers) as server:
        # Each worker's first requests at once: one waiting for a lock another holds while it
        # switches greenlets would block its worker, and every request after it, for good.
        with ThreadPoolExecutor(2 * BURST) as pool:
            with server.paused():
                # Chats and page views taking turns: a chat's tracker call and a page view's
                # worker each start a thread of their own at the first.
                chats, visits = [], []
                for i in range(BURST):
                    chats.append(pool.submit(chat_only, server.url, i))
                    visits.append(pool.submit(visit_and_chat, server.url, i))
                time.sleep(0.5)  # the page views and chats sent, none answered
            first = [visit.result() for visit in visits]
            chatted = {(chat.result(), True) for chat in chats}
        then = [visit_and_chat(server.url, i) for i in range(BURST, BURST + 100)]
        expected = {(c, used) for c in first + then for used in (False, True)} | chatted
        assert len(expected) == 2 * (BURST + 100) + BURST
        if sink == "api":  # the stand-in answers in 0.3 s: the stop itself must deliver
            assert received(api, sink, tmp_path) < expected
        assert server.stop() == 0, server.log.read_text()
    assert received(api, sink, tmp_path) == expected, server.log.read_text()
    if sink == "api":
        (view, *_) = [body for body in api.conversations if not body["is_used"]]
        assert view["device"] == "desktop"


def last_json_line(script: str, *args: str, timeout: float) -> Any:
    """What ``script``, run in a fresh interpreter, printed last, as JSON; a process frozen
    for ``timeout`` seconds is killed (subprocess.run kills it) and fails the test."""
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


# What the scripts below run first: gevent's patching, then a WSGI shop to wrap.
_GEVENT_SHOP = """
import asyncio, json, sqlite3, sys

from gevent import monkey

monkey.patch_all()

import gevent
from werkzeug.test import Client

from agentsight_middleware import AgentSightWSGIMiddleware
from tests.conftest import BROWSER


def shop(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/html")])
    return [b"<p>shop</p>"]


# A coroutine tracker: the page views it made, each delay s after its call.
class Tracker:
    def __init__(self, delay=0.0):
        self.delay = delay
        self.initialized = []

    async def initialize_conversation(self, conversation_id, **kwargs):
        if self.delay:
            await asyncio.sleep(self.delay)  # its API's answer
        self.initialized.append(conversation_id)

    async def get_or_create_conversation(self, conversation_id, **kwargs):
        pass
"""


# A close() meeting a worker's start under way: under gevent the start switches greenlets
# once the lock is let go, and a close() run meanwhile found the thread set but not started.
_CLOSE_DURING_START = (
    _GEVENT_SHOP
    + """
from agentsight_middleware._dispatch import Dispatcher

handled = []
dispatcher = Dispatcher(handled.append, name="agentsight-test", shutdown_timeout=5.0)
started = gevent.spawn(dispatcher.submit, "item")
closed = gevent.spawn(dispatcher.close)
gevent.joinall([started, closed])
later = dispatcher.submit("later")
dispatcher.close()

mw = AgentSightWSGIMiddleware(shop, widget_pages=["/"], local_store=sys.argv[1])
delivery = mw._core.delivery
starting = gevent.spawn(delivery.ensure_started)
closing = gevent.spawn(delivery.close, 5.0)
gevent.joinall([starting, closing])
worker = delivery._thread
if worker is not None:  # a close() that did not wait for it: it ends on the stop now
    worker.join(10)
Client(mw).get("/", headers=BROWSER)  # a page view after the close: a worker starts again
flushed = mw.flush(5.0)
mw.close(5.0)
with sqlite3.connect(sys.argv[1]) as conn:
    try:
        rows = conn.execute("SELECT count(*) FROM events").fetchone()[0]
    except sqlite3.OperationalError:  # no table: nothing was ever written
        rows = 0
print(json.dumps({
    "close": repr(closed.exception), "handled": handled, "flushed": flushed, "rows": rows,
}))
"""
)


def test_a_close_meeting_a_start_under_way_waits_for_it(tmp_path: Path) -> None:
    outcome = last_json_line(_CLOSE_DURING_START, str(tmp_path / "store.db"), timeout=120)
    # join() on the thread not started raised; the worker it became ended on the stop with
    # the dispatcher still "started": the next item was queued for nobody.
    assert outcome == {"close": "None", "handled": ["item", "later"], "flushed": True, "rows": 1}


# A tracker's own flush under a --preload worker: the middleware (and its locks) made before
# gevent patched threading, the flush's thread started under one of those locks.
_FLUSHES_AT_ONCE = """
import json

from agentsight_middleware import AgentSightWSGIMiddleware
from agentsight_middleware.testing import RecordingTracker


class Flushing(RecordingTracker):
    def agentsight_flush(self, timeout):
        return True


def shop(environ, start_response):
    start_response("200 OK", [])
    return [b""]


mw = AgentSightWSGIMiddleware(shop, widget_pages=["/"], tracker=Flushing())

from gevent import monkey

monkey.patch_all()

import gevent

flushes = [gevent.spawn(mw.flush, 5.0) for _ in range(2)]
gevent.joinall(flushes)
print(json.dumps([flush.value for flush in flushes]))
"""


def test_flushes_at_once_in_a_preloaded_gevent_worker() -> None:
    # The second flush waited for the lock the first held while its thread's start switched
    # greenlets: an OS lock, it blocked the process for good (killed by the timeout here).
    assert last_json_line(_FLUSHES_AT_ONCE, timeout=60) == [True, True]


# The user-agent parser's build in a thread (a WSGI process's first request answered) in a
# gevent worker whose package was imported before gevent patched threading (gunicorn's master
# importing it for a config file's hook): the build's lock, the OS's, was taken and then held
# across the thread's start, which switches greenlets.
_BUILD_SOON = """
import json

from agentsight_middleware import _device

from gevent import monkey

monkey.patch_all()

import gevent

UA = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148"
# A first request's build, and the worker classifying a page view while it starts.
jobs = [gevent.spawn(_device.build_soon), gevent.spawn(_device.classify_user_agent, UA)]
gevent.joinall(jobs)
print(json.dumps(jobs[1].value))
"""


def test_the_parsers_build_in_a_thread_does_not_block_a_gevent_worker() -> None:
    # The classifying greenlet waited for the lock the first held while its thread's start
    # switched greenlets: an OS lock, it blocked the process for good (in a gunicorn worker,
    # until --timeout killed it, losing what it held; killed by the timeout here).
    assert last_json_line(_BUILD_SOON, timeout=30) == ["mobile", False]


def written(api: StandInAgentSightAPI, sink: str, tmp_path: Path) -> set[tuple[str, bool]]:
    """received(), none while the local store's file is not made (a look would make it)."""
    if sink == "store" and not (tmp_path / sink).exists():
        return set()
    try:
        return received(api, sink, tmp_path)
    except sqlite3.OperationalError:  # no table yet
        return set()


# A worker waiting for the events file's write lock, held by another process (a backup, a
# VACUUM, a sqlite3 shell left in a transaction, another worker's long claim): SQLite's busy
# wait sleeps in C, which under gevent stops the one thread every greenlet runs on.
@pytest.mark.parametrize(
    ("sink", "preload"),
    [pytest.param("store", True, id="store-preload"), pytest.param("outbox", False, id="outbox")],
)
def test_a_worker_waiting_for_a_locked_file_keeps_answering(
    sink: str, preload: bool, api: StandInAgentSightAPI, tmp_path: Path
) -> None:
    api.set_latency(0)
    with serving(api, tmp_path, sink=sink, preload=preload, workers=1) as server:
        first = visit_and_chat(server.url, 0)
        deadline = time.monotonic() + 10
        while len(written(api, sink, tmp_path)) < 2:  # the worker started, the file made
            assert time.monotonic() < deadline, server.log.read_text()
            time.sleep(0.05)
        with contextlib.closing(sqlite3.connect(tmp_path / sink, isolation_level=None)) as other:
            other.execute("BEGIN IMMEDIATE")
            try:
                waiting = visit_and_chat(server.url, 1)  # its events wait for the lock
                time.sleep(0.5)  # the worker has taken them, and waits
                began = time.monotonic()
                answer = httpx.get(f"{server.url}/nowhere", timeout=30)  # touches no file
                took = time.monotonic() - began
            finally:
                other.execute("COMMIT")
        assert answer.status_code == 404
        # Not held up by the wait (up to the busy timeout, 5 s for the store and 10 s for the
        # outbox a try, tries chained: gunicorn's --timeout killed a worker waiting longer).
        assert took < 1.0
        then = visit_and_chat(server.url, 2)
        assert server.stop() == 0, server.log.read_text()
    expected = {(c, used) for c in (first, waiting, then) for used in (False, True)}
    assert received(api, sink, tmp_path) == expected, server.log.read_text()


# A coroutine tracker in a gevent worker: its page views run on the middleware's own loop,
# whose thread is a greenlet. Every greenlet shares the OS thread's running loop, so the
# caller of flush() and close() seemed to run on that loop, and its calls were not waited for.
_WAITS_FOR_THE_OWN_LOOP = (
    _GEVENT_SHOP
    + """
tracker = Tracker(delay=0.3)
mw = AgentSightWSGIMiddleware(shop, widget_pages=["/"], tracker=tracker, shutdown_timeout=30)
made = []
for ending in (mw.flush, mw.close):
    Client(mw).get("/", headers=BROWSER)
    while mw.stats()["processed"] < len(made) + 1:  # handed to the loop
        gevent.sleep(0.01)
    flushed = ending(30)
    made.append([flushed, len(tracker.initialized)])
print(json.dumps(made))
"""
)


def test_flush_and_close_wait_for_a_coroutine_trackers_page_views_under_gevent() -> None:
    # flush() said True and close() returned before the call was made (each found none).
    assert last_json_line(_WAITS_FOR_THE_OWN_LOOP, timeout=120) == [[True, 1], [None, 2]]


# Middlewares with a coroutine tracker closed in a gevent worker (an app factory's): each
# kept its loop's greenlet running for good. One used after close() makes a new loop.
_CLOSES_ITS_LOOP = (
    _GEVENT_SHOP
    + """
import threading, time


class Recording:
    def __init__(self):
        self.calls = []

    async def initialize_conversation(self, conversation_id, **kwargs):
        await asyncio.sleep(0)
        self.calls.append("page view")

    async def get_or_create_conversation(self, conversation_id, **kwargs):
        await asyncio.sleep(0)
        self.calls.append("chat")


def loops():
    return [t for t in threading.enumerate() if t.name.startswith("agentsight-tracker-loop")]


def ended():
    deadline = time.monotonic() + 10  # generous: not hung
    for thread in loops():
        thread.join(max(deadline - time.monotonic(), 0))
    return len(loops())


def use(mw):
    Client(mw).get("/", headers=BROWSER)
    Client(mw).post("/api/chat", headers={"X-Conversation-ID": "c1"})
    return mw.flush(30)


made = []
for _ in range(5):
    tracker = Recording()
    mw = AgentSightWSGIMiddleware(
        shop, widget_pages=["/"], chat_routes=["POST /api/chat"], tracker=tracker
    )
    made.append([use(mw), sorted(tracker.calls)])
    mw.close()
left = ended()
made.append([use(mw), sorted(tracker.calls)])
mw.close()
print(json.dumps([left, ended(), made]))
"""
)


def test_closing_ends_a_coroutine_trackers_loop_under_gevent() -> None:
    once = [True, ["chat", "page view"]]
    again = [True, ["chat", "chat", "page view", "page view"]]
    assert last_json_line(_CLOSES_ITS_LOOP, timeout=120) == [0, 0, [once] * 5 + [again]]


# A view running asyncio in a gevent worker (asyncio.run(), Flask's ``async def`` views):
# Python keeps the running loop per OS thread, and the middleware's loops (the delivery
# worker's, a coroutine tracker's own) run in threads that are greenlets of that one thread.
@pytest.mark.parametrize("sink", ["store", "api", "async-tracker"])
def test_a_views_asyncio_runs_beside_the_middlewares_loops_under_gevent(
    sink: str, api: StandInAgentSightAPI, tmp_path: Path
) -> None:
    api.set_latency(0)
    with serving(api, tmp_path, sink=sink, preload=False, workers=1) as server:
        first = visit_and_chat(server.url, 0)  # the middleware's loop started
        with ThreadPoolExecutor(4) as pool:
            # Its loop busy meanwhile. The views one at a time: two loops of the app's at
            # once in a gevent worker collide without the middleware too.
            visits = [pool.submit(visit_and_chat, server.url, i) for i in range(1, 9)]
            answers = [
                httpx.get(f"{server.url}{path}", timeout=10)
                for _ in range(4)
                for path in ("/run", "/async")
            ]
            conversations = [first] + [visit.result() for visit in visits]
        # "asyncio.run() cannot be called from a running event loop" (a 500) from the first.
        assert [(a.status_code, a.content) for a in answers] == [(200, b"looked up")] * 8, (
            server.log.read_text()
        )
        assert server.stop() == 0, server.log.read_text()
    expected = {(c, used) for c in conversations for used in (False, True)}
    assert received(api, sink, tmp_path) == expected, server.log.read_text()


# The middleware's loops starting while a view runs a loop of its own (asyncio.run()) in its
# greenlet, which switched out meanwhile: the OS thread's running loop was the view's, and
# ours would not run ("Cannot run the event loop while another loop is running").
_STARTS_BESIDE_A_VIEWS_LOOP = (
    _GEVENT_SHOP
    + """
tracker = Tracker()
stored = AgentSightWSGIMiddleware(shop, widget_pages=["/"], local_store=sys.argv[1])
tracked = AgentSightWSGIMiddleware(shop, widget_pages=["/"], tracker=tracker)
view = gevent.spawn(asyncio.run, asyncio.sleep(0.5))  # another request's view
gevent.sleep(0.05)
for mw in (stored, tracked):
    Client(mw).get("/", headers=BROWSER)
flushed = [mw.flush(3) for mw in (stored, tracked)]
view.join()
for mw in (stored, tracked):
    mw.close(3)
with sqlite3.connect(sys.argv[1]) as conn:
    try:
        rows = conn.execute("SELECT count(*) FROM events").fetchone()[0]
    except sqlite3.OperationalError:  # no table: nothing was ever written
        rows = 0
print(json.dumps({"flushed": flushed, "rows": rows, "made": len(tracker.initialized)}))
"""
)


def test_the_middlewares_loops_start_beside_a_views_loop_under_gevent(tmp_path: Path) -> None:
    outcome = last_json_line(_STARTS_BESIDE_A_VIEWS_LOOP, str(tmp_path / "store.db"), timeout=60)
    # The delivery worker stopped on the error (its events waited for its restart) and the
    # tracker's own loop never ran: flush() gave up, the page view was never made.
    assert outcome == {"flushed": [True, True], "rows": 1, "made": 1}


# A coroutine tracker reading a response in chunks (an async generator, as httpx's
# aiter_bytes) while a view's asyncio.run() runs beside it: Python keeps the asyncgen hooks
# per OS thread too, the view's loop took the generator for its own, and closed it as it
# ended (shutdown_asyncgens) at the generator's first yield.
_CHUNKS_BESIDE_A_VIEWS_LOOP = """
import asyncio, json

from gevent import monkey

monkey.patch_all()

import gevent
from werkzeug.test import Client

from agentsight_middleware import AgentSightWSGIMiddleware
from tests.conftest import BROWSER

read = []


async def chunks():
    for i in range(5):
        yield i


class Tracker:
    async def initialize_conversation(self, conversation_id, **kwargs):
        async for chunk in chunks():
            read.append(chunk)
            await asyncio.sleep(0.05)  # meanwhile the generator waits at its yield

    async def get_or_create_conversation(self, conversation_id, **kwargs):
        pass


async def view():
    while not read:  # ends once the tracker has read its first chunk
        await asyncio.sleep(0.005)


def shop(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/html")])
    return [b"<p>shop</p>"]


tracked = AgentSightWSGIMiddleware(shop, widget_pages=["/"], tracker=Tracker())
Client(tracked).get("/", headers=BROWSER)  # the tracker's own loop started
flushed = [tracked.flush(10)]
read.clear()
viewing = gevent.spawn(asyncio.run, view())  # another request's view
gevent.sleep(0.05)
Client(tracked).get("/", headers=BROWSER)
flushed.append(tracked.flush(10))
viewing.join()
tracked.close(3)
print(json.dumps({"flushed": flushed, "read": read}))
"""


def test_a_views_loop_leaves_a_coroutine_trackers_async_generators_alone_under_gevent() -> None:
    outcome = last_json_line(_CHUNKS_BESIDE_A_VIEWS_LOOP, timeout=60)
    # The view's loop closed the tracker's generator: its ``async for`` ended after one chunk.
    assert outcome == {"flushed": [True, True], "read": [0, 1, 2, 3, 4]}


# The middleware in OS threads of the app's own (gevent's unpatched threads, each with a hub
# of its own), one after another: the second took the first's ident once it ended, and was
# taken for a thread whose greenlet tracer was ours already.
_IN_OS_THREADS_ONE_AFTER_ANOTHER = """
import asyncio, json, sys

from gevent import monkey

monkey.patch_all()

import gevent
from werkzeug.test import Client

from agentsight_middleware import AgentSightWSGIMiddleware
from tests.conftest import BROWSER

start_new_thread = monkey.get_original("_thread", "start_new_thread")
allocate_lock = monkey.get_original("_thread", "allocate_lock")


def shop(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/html")])
    return [b"<p>shop</p>"]


def view():
    try:
        asyncio.run(asyncio.sleep(0.05))
        return "ran"
    except RuntimeError as error:
        return str(error)


def serve(store, views):
    middleware = AgentSightWSGIMiddleware(shop, widget_pages=["/"], local_store=store)
    Client(middleware).get("/", headers=BROWSER)  # its worker's loop started in this thread
    gevent.sleep(0.05)
    viewing = gevent.spawn(view)
    middleware.flush(5)
    viewing.join()
    middleware.close(5)
    views.append(viewing.value)


views = []
for n in range(2):
    done = allocate_lock()
    done.acquire()

    def run(store=f"{sys.argv[1]}{n}.db"):
        try:
            serve(store, views)
        finally:
            done.release()

    start_new_thread(run, ())
    done.acquire()
    monkey.get_original("time", "sleep")(0.1)  # the thread ended
print(json.dumps(views))
"""


def test_the_middlewares_loops_in_os_threads_one_after_another_under_gevent(
    tmp_path: Path,
) -> None:
    views = last_json_line(_IN_OS_THREADS_ONE_AFTER_ANOTHER, str(tmp_path / "store"), timeout=60)
    # The second: "asyncio.run() cannot be called from a running event loop".
    assert views == ["ran", "ran"]


# asyncio without its C accelerator (as on PyPy), imported after gevent's patching: it keeps
# the running loop in a threading.local, gevent's, a greenlet's own already. The tracer runs
# in the greenlet switched to, and set that one's: ours ran with none ("no running event
# loop"), the delivery worker stopped and the tracker's page views were never made.
_WITHOUT_ASYNCIOS_ACCELERATOR = """
import json, sqlite3, sys

sys.modules["_asyncio"] = None

from gevent import monkey

monkey.patch_all()

import asyncio

import gevent
from werkzeug.test import Client

from agentsight_middleware import AgentSightWSGIMiddleware
from tests.conftest import BROWSER


class Tracker:
    def __init__(self):
        self.initialized = []

    async def initialize_conversation(self, conversation_id, **kwargs):
        await asyncio.sleep(0.01)
        self.initialized.append(conversation_id)

    async def get_or_create_conversation(self, conversation_id, **kwargs):
        pass


def shop(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/html")])
    return [b"<p>shop</p>"]


def view():
    try:
        asyncio.run(asyncio.sleep(0.2))
        return "ran"
    except RuntimeError as error:
        return str(error)


tracker = Tracker()
stored = AgentSightWSGIMiddleware(shop, widget_pages=["/"], local_store=sys.argv[1])
tracked = AgentSightWSGIMiddleware(shop, widget_pages=["/"], tracker=tracker)
flushed = []
for _ in range(2):  # the second beside a view's loop
    viewing = gevent.spawn(view) if flushed else None
    for mw in (stored, tracked):
        Client(mw).get("/", headers=BROWSER)
    flushed += [mw.flush(3) for mw in (stored, tracked)]
gevent.joinall([viewing])
for mw in (stored, tracked):
    mw.close(3)
with sqlite3.connect(sys.argv[1]) as conn:
    try:
        rows = conn.execute("SELECT count(*) FROM events").fetchone()[0]
    except sqlite3.OperationalError:  # no table: nothing was ever written
        rows = 0
print(json.dumps({"flushed": flushed, "rows": rows, "made": len(tracker.initialized),
                  "view": viewing.value}))
"""


def test_the_middlewares_loops_run_under_gevent_with_asyncio_without_its_accelerator(
    tmp_path: Path,
) -> None:
    outcome = last_json_line(_WITHOUT_ASYNCIOS_ACCELERATOR, str(tmp_path / "store.db"), timeout=60)
    assert outcome == {"flushed": [True] * 4, "rows": 2, "made": 2, "view": "ran"}
