"""What is held when the app stops is delivered: at interpreter exit (a tracker's calls still
running, its own buffer), at the stop of an ASGI app without lifespan (Django's), when no
thread can be started (Python 3.12 at interpreter exit); and the classic SDK called where a
chat request's context is lost is told."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from werkzeug.test import Client

from agentsight_middleware import AgentSightMiddleware, AgentSightWSGIMiddleware
from agentsight_middleware.testing import RecordingTracker, StandInAgentSightAPI

from .conftest import BROWSER, in_forked_child

ROOT = Path(__file__).resolve().parent.parent


def wsgi_page(environ: Any, start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/html")])
    return [b"<p>shop</p>"]


class Buffering(RecordingTracker):
    """Keeps page views in a buffer of its own until agentsight_flush(), as the 0.1.x SDK."""

    def __init__(self) -> None:
        super().__init__()
        self.flushed: list[str] = []
        self._buffer: list[str] = []

    def initialize_conversation(self, conversation_id: str, **kwargs: Any) -> None:
        self._buffer.append(conversation_id)
        super().initialize_conversation(conversation_id, **kwargs)

    def agentsight_flush(self, timeout: float) -> bool:
        self.flushed += self._buffer
        self._buffer = []
        return True


class AsyncBuffering(Buffering):
    """The same with coroutine methods, its flush included."""

    async def initialize_conversation(  # type: ignore[override]
        self, conversation_id: str, **kwargs: Any
    ) -> None:
        await asyncio.sleep(0)
        Buffering.initialize_conversation(self, conversation_id, **kwargs)

    async def get_or_create_conversation(  # type: ignore[override]
        self, conversation_id: str, **kwargs: Any
    ) -> None:
        await asyncio.sleep(0)

    async def agentsight_flush(self, timeout: float) -> bool:  # type: ignore[override]
        await asyncio.sleep(0.01)
        return Buffering.agentsight_flush(self, timeout)


def test_a_coroutine_agentsight_flush_is_awaited() -> None:
    # Called and never awaited ("coroutine ... was never awaited"), and flush() said True.
    tracker = AsyncBuffering()
    mw = AgentSightWSGIMiddleware(wsgi_page, widget_pages=["/"], tracker=tracker)
    assert Client(mw).get("/", headers=BROWSER).status_code == 200
    assert mw.flush(5) is True
    assert len(tracker.flushed) == 1
    mw.close()


_AT_EXIT = """
import asyncio, sys
from werkzeug.test import Client
from agentsight_middleware import AgentSightWSGIMiddleware
from tests.conftest import BROWSER
from tests.test_lifecycle import Buffering, wsgi_page

class SlowAsync(Buffering):
    async def initialize_conversation(self, conversation_id, **kwargs):
        await asyncio.sleep(1.0)  # still running when the interpreter exits
        print("page view", conversation_id, flush=True)

    async def get_or_create_conversation(self, conversation_id, **kwargs):
        pass

class Flushing(Buffering):
    def agentsight_flush(self, timeout):
        print("flushed", self._buffer, flush=True)
        return True

tracker = SlowAsync() if sys.argv[1] == "async" else Flushing()
mw = AgentSightWSGIMiddleware(wsgi_page, widget_pages=["/"], tracker=tracker)
assert Client(mw).get("/", headers=BROWSER).status_code == 200
deadline = __import__("time").monotonic() + 5
while mw.stats()["processed"] < 1 and __import__("time").monotonic() < deadline:
    __import__("time").sleep(0.01)
# no close(): a WSGI server's worker exits (gunicorn's sync worker at SIGTERM)
"""


@pytest.mark.parametrize("kind", ["async", "flush"])
def test_at_exit_the_trackers_running_calls_and_own_buffer_are_delivered(kind: str) -> None:
    # At exit only the worker's queue was flushed: a coroutine tracker's page view still
    # running was dropped, and the tracker's own buffer (agentsight_flush) never sent.
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_AT_EXIT), kind],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    expected = "page view conv_" if kind == "async" else "flushed ['conv_"
    assert expected in done.stdout, (done.stdout, done.stderr)


class Bare:
    """An ASGI app without lifespan support: raising at it, as Django's ASGIHandler, or
    returning at once."""

    def __init__(self, raises: bool = True) -> None:
        self.raises = raises

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            if not self.raises:
                return
            raise ValueError("Django can only handle ASGI/HTTP connections, not lifespan.")
        headers = [(b"content-type", b"text/html")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"<p>shop</p>"})


async def _run_lifespan(app: Any, between: Any) -> list[str]:
    """Drive the lifespan as uvicorn does: startup, ``between()``, shutdown."""
    incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    answers: list[str] = []

    async def send(message: dict[str, Any]) -> None:
        answers.append(message["type"])

    task = asyncio.ensure_future(
        app({"type": "lifespan", "asgi": {"version": "3.0"}}, incoming.get, send)
    )
    await incoming.put({"type": "lifespan.startup"})
    for _ in range(200):
        if answers or task.done():
            break
        await asyncio.sleep(0.01)
    if task.done():
        task.result()  # the app's error, as the server would see it
    await between()
    await incoming.put({"type": "lifespan.shutdown"})
    await asyncio.wait_for(task, 10)
    return answers


@pytest.mark.parametrize("raises", [True, False], ids=["raises", "returns"])
def test_an_app_without_lifespan_still_has_its_events_delivered_at_shutdown(raises: bool) -> None:
    # uvicorn ran no lifespan for it ("appears unsupported"), so nothing ever closed the
    # middleware, and a SIGTERM ends uvicorn by the signal (no atexit): the SDK's batch
    # and what was queued were lost at every stop of a Django ASGI app.
    tracker = Buffering()
    app = AgentSightMiddleware(Bare(raises), widget_pages=["/"], tracker=tracker)

    async def page_view() -> None:
        import httpx

        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://shop") as client:
            assert (await client.get("/", headers=BROWSER)).status_code == 200

    answers = asyncio.run(_run_lifespan(app, page_view))
    assert answers == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert len(tracker.flushed) == 1  # closed at the shutdown: the buffer was sent


def test_an_apps_own_failing_lifespan_still_fails() -> None:
    class Failing:
        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            await receive()
            await send({"type": "lifespan.startup.failed", "message": "no database"})
            raise RuntimeError("no database")

    app = AgentSightMiddleware(Failing(), widget_pages=["/"], tracker=RecordingTracker())

    async def nothing() -> None:
        pass

    with pytest.raises(RuntimeError, match="no database"):
        asyncio.run(_run_lifespan(app, nothing))


class FailingShutdown:
    """An app whose own lifespan shutdown raises: answering lifespan.shutdown.failed, as
    Starlette's router does, or without a word to the server, as a hand-written app may."""

    def __init__(self, says_so: bool) -> None:
        self.says_so = says_so

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await Bare()(scope, receive, send)
            return
        await receive()
        await send({"type": "lifespan.startup.complete"})
        await receive()
        if self.says_so:
            await send({"type": "lifespan.shutdown.failed", "message": "pool closed"})
        raise RuntimeError("pool closed")


@pytest.mark.parametrize("says_so", [True, False], ids=["shutdown.failed", "raises"])
def test_a_failing_shutdown_of_the_apps_own_still_delivers_what_is_held(says_so: bool) -> None:
    # Closed only at lifespan.shutdown.complete: under uvicorn's SIGTERM (no atexit after
    # it) the tracker's buffer and the queue were lost at every stop whose shutdown failed.
    tracker = Buffering()
    app = AgentSightMiddleware(FailingShutdown(says_so), widget_pages=["/"], tracker=tracker)

    async def page_view() -> None:
        import httpx

        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://shop") as client:
            assert (await client.get("/", headers=BROWSER)).status_code == 200

    with pytest.raises(RuntimeError, match="pool closed"):  # still the server's to report
        asyncio.run(_run_lifespan(app, page_view))
    assert len(tracker.flushed) == 1


def test_an_app_failing_before_its_first_look_at_the_lifespan_still_fails() -> None:
    # Start-up work done before the first receive() (Starlette builds the app's middleware
    # stack there; a hand-written app may connect to its database): the middleware took the
    # error for "no lifespan" and answered startup.complete, so `uvicorn --lifespan on`
    # served on with a broken app instead of stopping, and Hypercorn's warning was gone.
    class FailingEarly:
        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            raise RuntimeError("no database")

    app = AgentSightMiddleware(FailingEarly(), widget_pages=["/"], tracker=RecordingTracker())

    async def nothing() -> None:
        pass

    with pytest.raises(RuntimeError, match="no database"):
        asyncio.run(_run_lifespan(app, nothing))


class ThreadedBuffering(Buffering):
    agentsight_initialize_threads = 8  # as the classic SDK's adapter


def test_page_views_are_delivered_when_no_thread_can_be_started(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Python 3.12 starts no thread once the interpreter has begun to exit, which is when
    # atexit delivers what is left: the pool's first thread could not start, the worker
    # died of the RuntimeError, and every queued page view was lost (after a wait of
    # shutdown_timeout). Started only as needed, the pool has none yet here.
    tracker = ThreadedBuffering()
    mw = AgentSightWSGIMiddleware(wsgi_page, widget_pages=["/"], tracker=tracker)
    mw._core.delivery.ensure_started()  # the worker's own thread, as in a serving app

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't create new thread at interpreter shutdown")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    for _ in range(3):  # three visitors
        assert Client(mw).get("/", headers=BROWSER).status_code == 200
    assert mw.flush(5) is True
    assert len(tracker.initialized) == 3
    monkeypatch.undo()
    started = time.monotonic()
    mw.close()
    assert time.monotonic() - started < 2


class _Config:
    def __init__(self) -> None:
        self.conversation_id: str | None = None


class _Classic:
    """The classic SDK's shape (0.0.44): the current conversation in config."""

    def __init__(self) -> None:
        self.config = _Config()
        self.items: dict[str | None, list[str]] = {}

    def initialize_conversation(self, conversation_id: str, **fields: Any) -> None:
        pass

    def get_or_create_conversation(self, conversation_id: str, **fields: Any) -> None:
        self.config.conversation_id = conversation_id
        self.items.setdefault(conversation_id, []).append("conversation")

    def track_human_message(self, text: str) -> None:
        self.items.setdefault(self.config.conversation_id, []).append(text)

    def send_tracked_data(self) -> list[str]:
        return self.items.pop(self.config.conversation_id)


def test_the_sdk_called_where_the_request_context_is_lost_is_told(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An async handler sending with loop.run_in_executor() (no context copied): wrapped,
    # the SDK found no current conversation there and every send failed, with nothing said
    # (unwrapped, one visitor at a time, it had worked).
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from agentsight_middleware import sdk

    if hasattr(sdk, "_lost"):
        monkeypatch.setattr(sdk, "_lost", [False, False])  # told once a process
    tracker = _Classic()
    outcomes: list[str] = []

    async def chat(request: Request) -> JSONResponse:
        tracker.track_human_message("hi")
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, tracker.send_tracked_data)
            outcomes.append("sent")
        except KeyError:
            outcomes.append("nothing to send")
        return JSONResponse({})

    inner = Starlette(routes=[Route("/api/chat", chat, methods=["POST"])])
    app = AgentSightMiddleware(inner, chat_routes=["POST /api/chat"], tracker=tracker)

    async def post() -> None:
        import httpx

        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://shop") as client:
            assert (await client.post("/api/chat", json={})).status_code == 200

    asyncio.run(post())
    assert outcomes == ["nothing to send"]  # the SDK's own limitation, as documented
    told = [r.getMessage() for r in caplog.records if "outside a chat request" in r.getMessage()]
    assert len(told) == 1, told
    assert "run_in_executor" in told[0], told


def test_a_worker_ending_where_no_thread_can_start_logs_no_error(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # asyncio.run() ends by starting a thread to shut its default executor down; Python 3.12
    # starts none once the interpreter has begun to exit, which is when atexit has the
    # worker deliver what is left: after every exit's delivery, an ERROR "the delivery
    # worker stopped" and a traceback.
    with StandInAgentSightAPI() as api:
        mw = AgentSightWSGIMiddleware(
            wsgi_page, widget_pages=["/"], api_key=api.api_key, endpoint=api.url
        )
        assert Client(mw).get("/", headers=BROWSER).status_code == 200
        assert mw.flush(10) is True

        def refuse(self: threading.Thread) -> None:
            raise RuntimeError("can't create new thread at interpreter shutdown")

        monkeypatch.setattr(threading.Thread, "start", refuse)
        assert Client(mw).get("/", headers=BROWSER).status_code == 200
        mw.close()
        monkeypatch.undo()
        assert len(api.conversations) == 2
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


_AT_EXIT_NO_THREAD = """
import asyncio, atexit, sys, threading
import httpx
from agentsight_middleware import AgentSightMiddleware
from tests.conftest import BROWSER
from tests.test_lifecycle import AsyncBuffering, Bare

class Printing(AsyncBuffering):
    async def agentsight_flush(self, timeout):
        await asyncio.sleep(0.01)
        print("flushed", self._buffer, flush=True)
        self._buffer = []
        return True

tracker = Printing()
app = AgentSightMiddleware(Bare(), widget_pages=["/"], tracker=tracker)

async def main():
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://shop") as client:
        assert (await client.get("/", headers=BROWSER)).status_code == 200
    if sys.argv[1] == "delivered":
        while not tracker._buffer:
            await asyncio.sleep(0.01)

asyncio.run(main())  # the app's loop is gone, and no lifespan shutdown closed the middleware

def refuse(self):
    raise RuntimeError("can't create new thread at interpreter shutdown")

# Registered after the middleware's own hook, so run before it: Python 3.12+ at exit.
atexit.register(setattr, threading.Thread, "start", refuse)
"""


@pytest.mark.parametrize("page_view", ["delivered", "pending"])
def test_a_coroutine_flush_at_exit_where_no_thread_can_start_is_awaited_and_never_hangs(
    page_view: str,
) -> None:
    # The flush needed the tracker's own loop, whose thread cannot start there: the flush was
    # never awaited (an ERROR and a "may be lost" WARNING at every exit, after a lifespan's
    # close had flushed already), and with a page view still queued, whose call had left a
    # loop that never runs as the tracker's, the exit hung for ever on the flush.
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_AT_EXIT_NO_THREAD), page_view],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "agentsight_flush' was never awaited" not in done.stderr, done.stderr
    assert "agentsight_flush() failed" not in done.stderr, done.stderr
    if page_view == "delivered":
        assert "flushed ['conv_" in done.stdout, (done.stdout, done.stderr)
    else:
        assert "flushed [" in done.stdout, (done.stdout, done.stderr)


_AT_EXIT_HUNG_FLUSH = """
import asyncio, atexit, threading, time
from werkzeug.test import Client
from agentsight_middleware import AgentSightWSGIMiddleware
from tests.conftest import BROWSER
from tests.test_lifecycle import AsyncBuffering, wsgi_page

class Hung(AsyncBuffering):
    async def agentsight_flush(self, timeout):
        await asyncio.sleep(3600)  # an export that never ends, whatever its timeout
        return True

tracker = Hung()
mw = AgentSightWSGIMiddleware(wsgi_page, widget_pages=["/"], tracker=tracker, shutdown_timeout=1)
assert Client(mw).get("/", headers=BROWSER).status_code == 200
while not tracker._buffer:  # the page view ran on the tracker's own loop, which runs on
    time.sleep(0.01)

def refuse(self):
    raise RuntimeError("can't create new thread at interpreter shutdown")

# Registered after the middleware's own hook, so run before it: Python 3.12+ at exit.
atexit.register(setattr, threading.Thread, "start", refuse)
"""


def test_a_coroutine_flush_at_exit_on_the_trackers_running_loop_is_given_its_timeout() -> None:
    # Under WSGI a coroutine tracker's page views run on the tracker's own loop, in a thread
    # that still runs at exit. Where no flush thread could start (Python 3.12+ at exit) the
    # flush was awaited there on the caller's thread with no time limit: a flush that hung
    # (an API that does not answer) held the process's exit for ever.
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_AT_EXIT_HUNG_FLUSH)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 15, done.stderr


def test_wrapping_the_classic_sdk_again_after_chat_requests_is_not_told_as_a_lost_context(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An app factory building its app again (one app per test, the 0.0.4x SDK's tracker a
    # process-wide singleton): checking that the tracker is the classic SDK's read its
    # current conversation outside a request, which was told as the SDK called where a
    # request's context was lost; and, told once a process, a real loss went unsaid.
    from agentsight_middleware import sdk

    monkeypatch.setattr(sdk, "_lost", [False, False])
    tracker = _Classic()

    def chat(environ: Any, start_response: Any) -> list[bytes]:
        tracker.track_human_message("hi")
        start_response("200 OK", [("Content-Type", "application/json")])
        return [b"{}"]

    def build() -> AgentSightWSGIMiddleware:
        return AgentSightWSGIMiddleware(chat, chat_routes=["POST /api/chat"], tracker=tracker)

    with Client(build()).post("/api/chat", json={}) as answer:
        assert answer.status_code == 200
    build()
    told = [r.getMessage() for r in caplog.records if "outside a chat request" in r.getMessage()]
    assert told == [], told
    tracker.track_human_message("from a bare thread")  # a real loss is still told
    told = [r.getMessage() for r in caplog.records if "outside a chat request" in r.getMessage()]
    assert len(told) == 1, told


def test_a_log_once_held_at_a_fork_is_free_in_the_child() -> None:
    # The worker logs a failure under LogOnce's lock; a fork at that moment left the child's
    # copy held for ever, by a thread the child does not have: its next failure to log hung
    # its worker. (The user-agent parser's build lock: tests/test_device.py.)
    from agentsight_middleware._log import LogOnce

    log_once = LogOnce()
    log_once._lock.acquire()  # as the logging worker holds it at the fork

    def log() -> bytes:
        log_once("a sink", RuntimeError("disk full"))
        return b"logged"

    try:
        told = in_forked_child(log)
    finally:
        log_once._lock.release()
    assert told == b"logged"


def test_a_forked_child_s_tracker_delivery_has_its_own_counts_and_engage_slots() -> None:
    # Engage calls hung in the parent's threads hold their slots; a fork then left the
    # child's copy of the semaphore with those slots taken for ever (every chat's engage
    # skipped once all 16 were), and the child's stats counted the parent's bots, errors,
    # timeouts and drops beside its own zero submitted.
    import json

    from agentsight_middleware._tracker import ENGAGE_THREADS

    async def app(scope: Any, receive: Any, send: Any) -> None:
        pass

    mw = AgentSightMiddleware(app, widget_pages=["/"], tracker=RecordingTracker())
    delivery: Any = mw._core.delivery
    for _ in range(ENGAGE_THREADS):
        assert delivery._engage_slots.acquire(blocking=False)  # as hung engage calls hold them
    delivery.skipped_bots, delivery.timeouts, delivery.errors, delivery.dropped = 3, 16, 1, 2

    def look() -> bytes:
        free = delivery._engage_slots.acquire(blocking=False)
        return json.dumps([free, mw.stats()]).encode()

    free, stats = json.loads(in_forked_child(look))
    assert free is True
    assert [stats[k] for k in ("skipped_bots", "timeouts", "errors", "dropped")] == [0] * 4


def test_objects_reset_at_fork_add_no_fork_hook_each() -> None:
    # os.register_at_fork cannot unregister: a hook per object (middleware, delivery,
    # LogOnce, each worker start's sink) stayed for the process's life, and ran at every
    # fork (a suite's 20,000 middlewares: 60,000 hooks, a fork 80 -> 232 ms).
    import gc
    import os

    from agentsight_middleware import _fork
    from agentsight_middleware._log import LogOnce

    registered: list[Any] = []
    real = os.register_at_fork

    def register(**hooks: Any) -> None:
        registered.append(hooks)

    os.register_at_fork = register
    try:
        before = set(_fork._methods)
        guards = [LogOnce() for _ in range(100)]
        assert registered == []
        theirs = set(_fork._methods) - before
        assert len(theirs) == 100
        del guards
        gc.collect()
        assert not theirs & set(_fork._methods)  # gone with their objects
    finally:
        os.register_at_fork = real


_AT_EXIT_HELD_BY_GLOBALS = """
import sys

from werkzeug.test import Client
from agentsight_middleware import AgentSightWSGIMiddleware


def page(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/html")])
    return [b"<p>shop</p>"]


# As a Flask app module holds it (app.wsgi_app = ...), with a test client beside it.
middleware = AgentSightWSGIMiddleware(page, widget_pages=["/"], local_store=sys.argv[1])
client = Client(middleware)
"""


def test_a_wsgi_middleware_held_by_module_globals_exits_without_a_weakref_error(
    tmp_path: Path,
) -> None:
    # The at-fork registry held weakref.WeakMethod objects, whose callback reads the
    # WeakMethod back through a weak reference that is gone when both die at interpreter
    # exit: `flask --app examples.flask_app run` and Ctrl-C printed "Exception ignored in:
    # <function WeakMethod.__new__.<locals>._cb> ... AttributeError: 'NoneType' object has
    # no attribute '_alive'" at every stop.
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_AT_EXIT_HELD_BY_GLOBALS), str(tmp_path / "e.db")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "Exception ignored" not in done.stderr, done.stderr


@pytest.mark.parametrize("sink", ["store", "tracker"])
def test_events_queued_during_a_start_that_failed_are_kept_for_the_next(
    sink: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The worker's thread is started once its lock is let go (gevent, see
    # BackgroundDelivery._start): a request meanwhile finds the worker started and queues
    # its event. A start that then failed (no thread could start) was rolled back, and the
    # next start made a new queue: that event was lost, counted as queued, never as dropped.
    tracker = RecordingTracker()
    options: dict[str, Any] = (
        {"local_store": tmp_path / "store.db"} if sink == "store" else {"tracker": tracker}
    )
    mw = AgentSightWSGIMiddleware(wsgi_page, widget_pages=["/"], **options)

    def visit() -> None:  # a new visitor each: no cookie from the one before
        assert Client(mw).get("/", headers=BROWSER).status_code == 200

    def refuse(self: threading.Thread) -> None:
        monkeypatch.undo()  # the next start succeeds
        # A second visitor's request, on another thread, while this start goes on.
        other = threading.Thread(target=visit)
        other.start()
        other.join()
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    with pytest.raises(RuntimeError):  # as before the start left the lock
        Client(mw).get("/", headers=BROWSER)
    visit()  # starts the worker
    assert mw.flush(5) is True
    mw.close()
    if sink == "store":
        assert mw.stats()["stored"] == 2
    else:
        assert len(tracker.initialized) == 2
