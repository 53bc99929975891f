"""Trackers that are slow, hang, raise what is not an Exception, hide their coroutines
behind decorators or keep loop-bound resources: the page views and chats still get through,
under real servers (uvicorn for ASGI, Werkzeug's for WSGI)."""

from __future__ import annotations

import asyncio
import datetime
import functools
import inspect
import logging
import math
import re
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any
from unittest import mock

import anyio
import httpx
import pytest
from flask import Flask
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from werkzeug.serving import make_server

import agentsight_middleware
from agentsight_middleware import AgentSightMiddleware, AgentSightWSGIMiddleware
from agentsight_middleware.sdk import ClassicTracker
from agentsight_middleware.testing import RecordingTracker, StandInAgentSightAPI

from .conftest import BROWSER, in_forked_child, serving, uvicorn_server

PAGE = "<!doctype html><title>Shop</title><p>hello</p>"
RULES: dict[str, Any] = {"widget_pages": ["/"], "chat_routes": ["POST /api/chat"]}


async def _page(request: Request) -> Response:
    return HTMLResponse(PAGE)


async def _chat(request: Request) -> Response:
    await request.body()
    return JSONResponse({"ok": True})


def asgi_app(tracker: Any, **options: Any) -> AgentSightMiddleware:
    app = Starlette(routes=[Route("/", _page), Route("/api/chat", _chat, methods=["POST"])])
    return AgentSightMiddleware(app, tracker=tracker, **{**RULES, **options})


def wsgi_app(tracker: Any, **options: Any) -> AgentSightWSGIMiddleware:
    app = Flask(__name__)
    app.add_url_rule("/", "page", lambda: PAGE)
    app.add_url_rule("/api/chat", "chat", lambda: {"ok": True}, methods=["POST"])
    return AgentSightWSGIMiddleware(app.wsgi_app, tracker=tracker, **{**RULES, **options})


def wsgi_page(environ: Any, start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/html")])
    return [b"<p>shop</p>"]


class Hanging:
    """A blocking tracker whose page views hang until ``release`` is set."""

    def __init__(self, release: threading.Event) -> None:
        self._release = release

    def initialize_conversation(self, **kwargs: Any) -> None:
        self._release.wait(10)

    def get_or_create_conversation(self, **kwargs: Any) -> None:
        pass


def werkzeug_server(app: Any) -> AbstractContextManager[str]:
    return serving(make_server("127.0.0.1", 0, app, threaded=True))


@contextmanager
def hypercorn_trio_server(app: Any) -> Iterator[str]:
    """Serve ``app`` with Hypercorn's trio worker, in a thread; yields its base URL."""
    trio = pytest.importorskip("trio")
    from hypercorn.config import Config
    from hypercorn.trio import serve

    config = Config()
    config.bind = ["127.0.0.1:0"]
    bound: list[str] = []
    stop: list[Callable[[], None]] = []
    ready = threading.Event()

    async def main() -> None:
        stopping = trio.Event()
        token = trio.lowlevel.current_trio_token()
        stop.append(lambda: token.run_sync_soon(stopping.set))
        async with trio.open_nursery() as nursery:
            bound.extend(
                await nursery.start(
                    functools.partial(serve, app, config, shutdown_trigger=stopping.wait)
                )
            )
            ready.set()

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    try:
        assert ready.wait(10), "hypercorn did not start"
        yield bound[0]
    finally:
        if stop:
            stop[0]()
        thread.join(10)


def visit(url: str, times: int) -> None:
    """``times`` first visits (each a new id, so each a page view to report)."""
    with httpx.Client(base_url=url, timeout=30) as client:
        for _ in range(times):
            client.cookies.clear()
            assert client.get("/", headers=BROWSER).status_code == 200


# -- blocking trackers: several page views at once ------------------------------------------


INITIALIZE_THREADS = ClassicTracker.agentsight_initialize_threads


class SlowTracker(RecordingTracker):
    """A blocking SDK 100 ms from its API, safe to call from several threads (as the classic
    SDK's adapter, it says so); remembers how many calls ran at once."""

    agentsight_initialize_threads = INITIALIZE_THREADS

    def __init__(self, delay: float, block: threading.Event | None = None) -> None:
        super().__init__()
        self._delay = delay
        self._block = block
        self._lock = threading.Lock()
        self.running = 0
        self.most = 0
        self._started = False

    def initialize_conversation(self, conversation_id: str, **kwargs: Any) -> None:
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
            first = self.running + len(self.initialized) == 1 and not self._started
            self._started = True
        try:
            if self._block is not None and first:
                self._block.wait(30)  # the first call hangs until released
            time.sleep(self._delay)
        finally:
            with self._lock:
                self.running -= 1
        super().initialize_conversation(conversation_id, **kwargs)


@pytest.mark.parametrize("interface", ["asgi", "wsgi"])
def test_blocking_page_views_run_several_at_once(interface: str) -> None:
    # One at a time, a tracker 100 ms from its API sent ten page views a second whatever
    # the traffic, and at shutdown the rest were lost.
    tracker = SlowTracker(0.1)
    app = asgi_app(tracker) if interface == "asgi" else wsgi_app(tracker)
    server = uvicorn_server if interface == "asgi" else werkzeug_server
    with server(app) as url:
        visit(url, 3 * INITIALIZE_THREADS)
        assert app.flush(30)
    assert len(tracker.initialized) == 3 * INITIALIZE_THREADS
    assert tracker.most == INITIALIZE_THREADS  # bounded, and not one at a time
    app.close()


class ThreadBoundTracker(RecordingTracker):
    """Keeps a sqlite3 connection, which belongs to the thread that opened it."""

    def __init__(self) -> None:
        super().__init__()
        self._db: sqlite3.Connection | None = None

    def initialize_conversation(self, conversation_id: str, **kwargs: Any) -> None:
        if self._db is None:
            self._db = sqlite3.connect(":memory:")
            self._db.execute("CREATE TABLE views (id TEXT)")
        self._db.execute("INSERT INTO views VALUES (?)", (conversation_id,))
        time.sleep(0.01)
        super().initialize_conversation(conversation_id, **kwargs)


def test_a_tracker_that_does_not_say_otherwise_gets_one_thread() -> None:
    tracker = ThreadBoundTracker()
    app = asgi_app(tracker)
    with uvicorn_server(app) as url:
        visit(url, 20)
        assert app.flush(30)
    assert len(tracker.initialized) == 20
    assert app.stats()["errors"] == 0
    assert len({call.thread_id for call in tracker.calls}) == 1
    app.close()


def test_a_hung_page_view_stops_no_other_and_is_counted_late(
    caplog: pytest.LogCaptureFixture,
) -> None:
    release = threading.Event()
    tracker = SlowTracker(0.0, block=release)
    # 1 s: the others' calls (no delay) must not count as timed out on a loaded machine,
    # where one took 0.5 s once (a full run beside other work: 0.2 s was the limit then).
    app = asgi_app(tracker, tracker_timeout=1.0)
    with uvicorn_server(app) as url:
        visit(url, 1)
        deadline = time.monotonic() + 10
        while tracker.running == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        hung_since = time.monotonic()
        visit(url, 10)
        tracker.wait_for(initialized=10, timeout=10)  # the others got through meanwhile
        assert app.stats()["timeouts"] == 0
        time.sleep(max(0.0, hung_since + 1.3 - time.monotonic()))  # over tracker_timeout
        release.set()
        assert app.flush(10)
    assert len(tracker.initialized) == 11
    stats = app.stats()
    # The hung one succeeded in the end: slow, not a failure (before: a time-out, said at
    # ERROR as "failed").
    assert (stats["slow"], stats["timeouts"], stats["errors"]) == (1, 0, 0)
    assert stats["processed"] == 11
    said = [r for r in caplog.records if r.name == "agentsight_middleware"]
    assert not [r for r in said if r.levelno >= logging.ERROR]
    [slow] = [r for r in said if "over tracker_timeout" in r.getMessage()]
    assert slow.levelno == logging.WARNING
    assert "succeeded" in slow.getMessage()
    app.close()


def test_slow_page_views_are_said_once_not_per_page_view(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Every page view over tracker_timeout (an API slower than the timeout): one warning,
    # not one a page view.
    tracker = SlowTracker(0.05)
    app = wsgi_app(tracker, tracker_timeout=0.01)
    with werkzeug_server(app) as url:
        visit(url, 10)
        assert app.flush(30)
    assert len(tracker.initialized) == 10
    stats = app.stats()
    assert (stats["slow"], stats["timeouts"], stats["processed"]) == (10, 0, 10)
    said = [r for r in caplog.records if "over tracker_timeout" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.WARNING]
    app.close()


class FailsFirstPageView(RecordingTracker):
    """A page view that fails once, made again after ``wait`` s (agentsight_retry_in)."""

    def __init__(self, wait: float) -> None:
        super().__init__()
        self._retry_wait = wait
        self.attempts = 0

    def initialize_conversation(self, conversation_id: str, **kwargs: Any) -> None:
        self.attempts += 1
        if self.attempts == 1:
            raise RuntimeError("503 Service Unavailable")
        super().initialize_conversation(conversation_id, **kwargs)

    def agentsight_retry_in(self, exc: BaseException, attempt: int) -> float | None:
        return self._retry_wait if attempt == 1 else None


def test_a_retried_page_view_is_not_counted_slow_for_the_wait_before_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The wait before the second attempt is the middleware's backoff, not the tracker's
    # time: counted as the call taking it, a page view retried after a 503 from a tracker
    # answering at once was 'slow' and said so at WARNING.
    tracker = FailsFirstPageView(wait=1.5)
    app = wsgi_app(tracker, tracker_timeout=1.0)
    with werkzeug_server(app) as url:
        visit(url, 1)
        assert app.flush(30)
    assert len(tracker.initialized) == 1
    stats = app.stats()
    assert (stats["retried"], stats["processed"], stats["errors"]) == (1, 1, 0)
    assert stats["slow"] == 0
    assert not [r for r in caplog.records if "over tracker_timeout" in r.getMessage()]
    app.close()


class FailsFirstAttempt(RecordingTracker):
    """Each conversation's first page-view attempt fails (the first one once ``release`` is
    set); made again 0.2 s later (agentsight_retry_in), 4 attempts at most."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.started = threading.Event()
        self.attempts: list[str] = []

    def initialize_conversation(self, conversation_id: str, **kwargs: Any) -> None:
        first = not self.attempts
        self.attempts.append(conversation_id)
        if first:
            self.started.set()
            self.release.wait(10)
            raise RuntimeError("503 Service Unavailable")
        if self.attempts.count(conversation_id) == 1:
            raise RuntimeError("503 Service Unavailable")
        super().initialize_conversation(conversation_id, **kwargs)

    def agentsight_retry_in(self, exc: BaseException, attempt: int) -> float | None:
        return 0.2 if attempt < 4 else None


def test_a_close_that_ran_out_of_time_stops_the_retries_of_the_page_view_it_left() -> None:
    # close() cleared its flag on its way out: the page view still being attempted when it
    # gave up waiting was made again after the shutdown, three times.
    tracker = FailsFirstAttempt()
    app = wsgi_app(tracker)
    with werkzeug_server(app) as url:
        visit(url, 1)
        assert tracker.started.wait(10)
        app.close(0.2)  # the attempt still runs: close gives up on it
        tracker.release.set()
        assert app.flush(10)
        [first] = tracker.attempts
        assert (app.stats()["retried"], app.stats()["errors"]) == (0, 1)
        # A page view after the close (a second lifespan) is made again as before.
        visit(url, 1)
        assert app.flush(10)
    assert tracker.attempts[0] == first
    assert len(tracker.attempts) == 3
    assert [call["conversation_id"] for call in tracker.initialized] == [tracker.attempts[1]]
    assert app.stats()["retried"] == 1
    app.close()


class FailingAPI(RecordingTracker):
    """A blocking tracker on 8 threads, as the classic SDK's adapter, whose API answers 503
    to every page view until ``up`` is set (``fail_calls``: only those calls, by number
    from 1); a failure is made again ``wait`` s later, 4 attempts at most (its
    ``agentsight_retry_in``, shaped as ``ClassicTracker``'s)."""

    agentsight_initialize_threads = INITIALIZE_THREADS

    def __init__(self, wait: float, fail_calls: frozenset[int] | None = None) -> None:
        super().__init__()
        self.up = threading.Event()
        self._retry_wait = wait
        self._fail_calls = fail_calls
        self._lock = threading.Lock()
        self.attempts = 0

    def initialize_conversation(self, conversation_id: str, **kwargs: Any) -> None:
        with self._lock:
            self.attempts += 1
            call = self.attempts
        failing = call in self._fail_calls if self._fail_calls is not None else True
        if failing and not self.up.is_set():
            raise RuntimeError("503 Service Unavailable")
        super().initialize_conversation(conversation_id, **kwargs)

    def agentsight_retry_in(self, exc: BaseException, attempt: int) -> float | None:
        return self._retry_wait if attempt < 4 else None


def test_page_views_wait_out_an_outage_together_and_go_through_after_it() -> None:
    # Each page view sleeping out its own backoff on one of the 8 threads used its 4 attempts
    # within ~1 s here, and the next one took its thread: 16 of 20 lost in a 2 s outage, 60
    # requests to an API answering 503. They wait together now, one attempt alone after each
    # wait, and those queued go through once the API is back.
    tracker = FailingAPI(wait=0.3)
    app = wsgi_app(tracker)
    with werkzeug_server(app) as url:
        visit(url, 20)
        time.sleep(2.0)  # the outage
        during = tracker.attempts
        tracker.up.set()
        assert app.flush(30)
    stats = app.stats()
    # The 8 first attempts, then one alone every 0.3 s; a page view is lost after 4.
    assert during <= 8 + 10, during
    assert len(tracker.initialized) >= 18, stats
    assert stats["errors"] == 20 - len(tracker.initialized)
    app.close()


def test_one_page_view_the_api_fails_among_others_it_takes_waits_alone() -> None:
    # A 503 from one instance behind a balancer, while the API takes the other page views:
    # that page view waits out its backoff (30 s here), the others go on meanwhile.
    tracker = FailingAPI(wait=30.0, fail_calls=frozenset({5}))
    app = wsgi_app(tracker)
    with werkzeug_server(app) as url:
        visit(url, 4)
        tracker.wait_for(initialized=4, timeout=10)
        visit(url, 16)  # the first of them fails
        tracker.wait_for(initialized=19, timeout=20)
        started = time.monotonic()
        app.close(0.5)  # gives up the page view still waiting
        assert time.monotonic() - started < 10  # not its 30 s
    stats = app.stats()
    assert (stats["errors"], stats["retried"]) == (1, 0)


class HangsOnceBackAfterAnOutage(RecordingTracker):
    """A blocking tracker on 8 threads whose API answers 503 until ``up`` is set; then its
    first page view hangs until ``release`` is set and ends in a 504, made again ``LATE_WAIT``
    s later (its ``agentsight_retry_in``), the others are taken. A 503 is made again 0.2 s
    later, 4 attempts at most."""

    agentsight_initialize_threads = INITIALIZE_THREADS
    LATE_WAIT = 30.0

    def __init__(self) -> None:
        super().__init__()
        self.up = threading.Event()
        self.release = threading.Event()
        self.failed = threading.Event()
        self._lock = threading.Lock()
        self._after_up = 0

    def initialize_conversation(self, conversation_id: str, **kwargs: Any) -> None:
        if not self.up.is_set():
            self.failed.set()
            raise RuntimeError("503 Service Unavailable")
        with self._lock:
            self._after_up += 1
            hangs = self._after_up == 1
        if hangs:
            self.release.wait(20)
            raise RuntimeError("504 Gateway Timeout")
        super().initialize_conversation(conversation_id, **kwargs)

    def agentsight_retry_in(self, exc: BaseException, attempt: int) -> float | None:
        if attempt >= 4:
            return None
        return self.LATE_WAIT if "504" in str(exc) else 0.2


def test_a_page_view_gone_alone_that_fails_late_once_others_are_taken_waits_alone() -> None:
    # After an outage the page view going alone hung; another went beside it 2 s later and
    # was taken, and the rest with it. The hung one's late 504 then paused every page view
    # for its 30 s backoff, the API taking them all along: its failure is its own, as any
    # failure among page views the API takes.
    tracker = HangsOnceBackAfterAnOutage()
    app = wsgi_app(tracker)
    with werkzeug_server(app) as url:
        visit(url, 1)
        assert tracker.failed.wait(10)  # the outage: all page views wait 0.2 s
        tracker.up.set()
        visit(url, 5)  # one goes alone and hangs, one goes beside it after 2 s
        tracker.wait_for(initialized=5, timeout=20)
        visit(url, 1)
        tracker.wait_for(initialized=6, timeout=20)
        tracker.release.set()  # the hung one fails now, a page view taken just before
        time.sleep(0.5)
        visit(url, 5)
        tracker.wait_for(initialized=11, timeout=10)  # not its 30 s
        started = time.monotonic()
        app.close(0.5)  # gives up the page view waiting out its 30 s
        assert time.monotonic() - started < 10
    assert app.stats()["errors"] == 1


class HungChat(RecordingTracker):
    """A blocking tracker whose chat call hangs until ``release`` is set (or 5 s)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.returned = threading.Event()

    def get_or_create_conversation(self, conversation_id: str, **kwargs: Any) -> None:
        self.release.wait(5)
        super().get_or_create_conversation(conversation_id, **kwargs)
        self.returned.set()


def test_a_hung_chat_call_under_wsgi_costs_at_most_the_timeout() -> None:
    # In the request's own thread, the call held the chat (and the server's worker) for as
    # long as the tracker hung; under ASGI it was bounded by tracker_timeout already.
    tracker = HungChat()
    app = wsgi_app(tracker, tracker_timeout=0.3)
    with werkzeug_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        response = client.post("/api/chat", json={})
        answered_first = not tracker.returned.is_set()
        tracker.release.set()
        assert tracker.returned.wait(10)
    assert (response.status_code, response.json()) == (200, {"ok": True})
    assert answered_first  # before: answered only once the tracker returned
    assert app.stats()["timeouts"] == 1
    app.close()


class BusyChat(RecordingTracker):
    """A healthy blocking tracker whose chat calls all wait for ``release``; ``full`` is set
    once as many run as the middleware runs at once."""

    def __init__(self, full_at: int) -> None:
        super().__init__()
        self.release = threading.Event()
        self.full = threading.Event()
        self._full_at = full_at
        self._running = 0
        self._lock = threading.Lock()

    def get_or_create_conversation(self, conversation_id: str, **kwargs: Any) -> None:
        with self._lock:
            self._running += 1
            if self._running == self._full_at:
                self.full.set()
        self.release.wait(10)
        super().get_or_create_conversation(conversation_id, **kwargs)


@pytest.mark.parametrize("interface", ["asgi", "wsgi"])
def test_more_chats_at_once_than_threads_wait_for_one(interface: str) -> None:
    # In its request's thread, every chat's call was made. With the 16 threads busy (a
    # tracker 100 ms from its API, 48 chats at once), the 17th chat on went without its call
    # at once, counted as a time-out: 32 of 48 chats lost theirs. Under ASGI too: a burst
    # of 200 chats to a coroutine method behind a plain decorator (its wrapper in a thread
    # at every chat) lost up to 52 calls, the loop taking the slots before the threads
    # gave them back.
    from concurrent.futures import ThreadPoolExecutor

    from agentsight_middleware._tracker import ENGAGE_THREADS

    chats = ENGAGE_THREADS + 4
    tracker = BusyChat(ENGAGE_THREADS)
    app = (asgi_app if interface == "asgi" else wsgi_app)(tracker, tracker_timeout=30)
    server = uvicorn_server if interface == "asgi" else werkzeug_server

    def chat(client: httpx.Client, number: int) -> int:
        headers = {"X-Conversation-ID": f"c{number}"}
        return client.post("/api/chat", json={}, headers=headers).status_code

    limits = httpx.Limits(max_connections=chats)
    with (
        server(app) as url,
        httpx.Client(base_url=url, timeout=30, limits=limits) as client,
        ThreadPoolExecutor(chats) as pool,
    ):
        answers = [pool.submit(chat, client, number) for number in range(chats)]
        assert tracker.full.wait(10)
        # Skipped, the last 4 chats are answered now; waiting for a thread, they are not.
        deadline = time.monotonic() + 2
        while sum(a.done() for a in answers) < chats - ENGAGE_THREADS:
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        tracker.release.set()
        assert [a.result() for a in answers] == [200] * chats
    assert len(tracker.used) == chats
    assert app.stats()["timeouts"] == 0
    app.close()


@pytest.mark.parametrize("interface", ["asgi", "wsgi"])
def test_chats_go_on_at_once_once_a_hung_tracker_holds_every_thread(interface: str) -> None:
    # Waiting for a thread within tracker_timeout, every chat behind 16 hung calls paid the
    # whole tracker_timeout (200 chats: 4.5 s against 0.56): once the slots have been held
    # that long, the tracker hangs, and a chat goes on without its call at once.
    from concurrent.futures import ThreadPoolExecutor

    from agentsight_middleware._tracker import ENGAGE_THREADS

    tracker = BusyChat(ENGAGE_THREADS)
    timeout = 3.0
    app = (asgi_app if interface == "asgi" else wsgi_app)(tracker, tracker_timeout=timeout)
    server = uvicorn_server if interface == "asgi" else werkzeug_server

    def chat(client: httpx.Client, number: int) -> int:
        headers = {"X-Conversation-ID": f"c{number}"}
        return client.post("/api/chat", json={}, headers=headers).status_code

    later = 6
    limits = httpx.Limits(max_connections=ENGAGE_THREADS + later)
    try:
        with (
            server(app) as url,
            httpx.Client(base_url=url, timeout=30, limits=limits) as client,
            ThreadPoolExecutor(ENGAGE_THREADS + later) as pool,
        ):
            first = [pool.submit(chat, client, number) for number in range(ENGAGE_THREADS)]
            assert tracker.full.wait(10)
            hung_since = time.monotonic()
            assert [a.result() for a in first] == [200] * ENGAGE_THREADS  # each after 3 s
            time.sleep(max(hung_since + timeout - time.monotonic(), 0.0))
            started = time.monotonic()
            then = [pool.submit(chat, client, 100 + n) for n in range(later)]
            assert [a.result() for a in then] == [200] * later
            took = time.monotonic() - started
    finally:
        tracker.release.set()
    assert took < timeout / 2, took  # before: each waited the whole 3 s for a thread
    assert app.stats()["timeouts"] == ENGAGE_THREADS + later
    app.close()


def test_chat_calls_under_wsgi_go_on_in_a_forked_worker() -> None:
    # Built in the master, forked into workers (gunicorn --preload, uWSGI without
    # --lazy-apps): the parent's threads for these calls are not the child's.
    from werkzeug.test import Client

    tracker = RecordingTracker()
    app = wsgi_app(tracker)
    headers = {"X-Conversation-ID": "c1"}
    assert Client(app).post("/api/chat", json={}, headers=headers).status_code == 200

    def chat() -> bytes:
        response = Client(app).post("/api/chat", json={}, headers=headers)
        stats = app.stats()
        return f"{response.status_code} {len(tracker.used)} {stats['timeouts']}".encode()

    assert in_forked_child(chat) == b"200 2 0"  # the child's call made, not timed out
    app.close()


def test_chat_calls_under_wsgi_use_the_queue_a_forked_worker_patched() -> None:
    # gunicorn -k gevent --preload: the app is built in the master and the worker patches
    # threading and queue after the fork. A pool made at the fork kept the C SimpleQueue, its
    # idle thread (a greenlet by then) blocked the worker's only OS thread on it, and the
    # worker never answered again (a real gevent worker hung on its first chat request).
    import queue

    from werkzeug.test import Client

    tracker = RecordingTracker()
    app = wsgi_app(tracker)
    headers = {"X-Conversation-ID": "c1"}

    def chat() -> bytes:
        made: list[object] = []

        class Patched(queue.SimpleQueue):  # type: ignore[type-arg]
            def __init__(self) -> None:
                made.append(self)

        queue.SimpleQueue = Patched  # type: ignore[misc]  # as gevent's patch_queue does
        response = Client(app).post("/api/chat", json={}, headers=headers)
        return f"{response.status_code} {len(tracker.used)} {len(made)}".encode()

    assert in_forked_child(chat) == b"200 1 1"  # the call ran through a queue made after
    app.close()


def test_closing_ends_the_threads_chat_calls_ran_in_under_wsgi() -> None:
    # Each middleware closed after a chat left its idle threads waiting for good (a test
    # suite building an app per test: one thread more per test).
    from werkzeug.test import Client

    # Other tests' middlewares, never closed, may have left theirs: only this one's count.
    earlier = set(threading.enumerate())

    def engage_threads() -> list[threading.Thread]:
        return [
            t
            for t in threading.enumerate()
            if t.name.startswith("agentsight-tracker-engage") and t not in earlier
        ]

    assert engage_threads() == []
    tracker = RecordingTracker()
    app = wsgi_app(tracker)
    client = Client(app)
    assert client.post("/api/chat", json={}, headers={"X-Conversation-ID": "c1"}).status_code == 200
    assert engage_threads()
    app.close()
    for thread in engage_threads():
        thread.join(5)
    assert engage_threads() == []
    # A chat after close() (a second lifespan) still has its call made, in new threads.
    assert client.post("/api/chat", json={}, headers={"X-Conversation-ID": "c2"}).status_code == 200
    assert [call["conversation_id"] for call in tracker.used] == ["c1", "c2"]
    assert app.stats()["timeouts"] == 0
    app.close()
    for thread in engage_threads():
        thread.join(5)


class SkipsEngage(RecordingTracker):
    """As the SDK adapters: the chat call is theirs to skip (their scope does the work)."""

    agentsight_skip_engage = True


def test_an_adapter_that_skips_the_chat_call_is_not_called_under_wsgi() -> None:
    tracker = SkipsEngage()
    app = wsgi_app(tracker, tracker_timeout=0.3)
    with werkzeug_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        assert client.post("/api/chat", json={}).status_code == 200
    assert tracker.used == []
    assert app.stats()["timeouts"] == 0
    app.close()


def test_a_chat_call_under_wsgi_sees_the_requests_context() -> None:
    # In a thread of its own, the call still sees what the request's context holds (as
    # anyio's threads do under ASGI).
    seen: list[Any] = []

    class ContextTracker(RecordingTracker):
        def get_or_create_conversation(self, conversation_id: str, **kwargs: Any) -> None:
            seen.append(agentsight_middleware.current_conversation())
            super().get_or_create_conversation(conversation_id, **kwargs)

    tracker = ContextTracker()
    app = wsgi_app(tracker)
    with werkzeug_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        assert client.post("/api/chat", json={}, headers={"X-Conversation-ID": "c1"}).is_success
    assert len(tracker.used) == 1
    assert [getattr(c, "id", None) for c in seen] == ["c1"]
    app.close()


# -- what a tracker raises ---------------------------------------------------------------


class CancellingTracker(RecordingTracker):
    """Raises a BaseException (as asyncio's CancelledError or gevent's Timeout are) once."""

    def __init__(self, method: str) -> None:
        super().__init__()
        self._method = method
        self.raised = False

    def _maybe_raise(self, method: str) -> None:
        if method == self._method and not self.raised:
            self.raised = True
            raise asyncio.CancelledError

    def initialize_conversation(self, conversation_id: str, **kwargs: Any) -> None:
        self._maybe_raise("initialize_conversation")
        super().initialize_conversation(conversation_id, **kwargs)

    def get_or_create_conversation(self, conversation_id: str, **kwargs: Any) -> None:
        self._maybe_raise("get_or_create_conversation")
        super().get_or_create_conversation(conversation_id, **kwargs)


@pytest.mark.parametrize("interface", ["asgi", "wsgi"])
def test_a_base_exception_from_a_page_view_does_not_stop_the_worker(interface: str) -> None:
    tracker = CancellingTracker("initialize_conversation")
    app = asgi_app(tracker) if interface == "asgi" else wsgi_app(tracker)
    server = uvicorn_server if interface == "asgi" else werkzeug_server
    with server(app) as url:
        visit(url, 5)
        assert app.flush(10)  # before: never again True, and shutdown waited it out
    assert tracker.raised
    assert len(tracker.initialized) == 4
    assert app.stats()["errors"] == 1
    app.close()


def test_a_base_exception_from_a_chat_call_under_wsgi_leaves_the_chat_answered() -> None:
    tracker = CancellingTracker("get_or_create_conversation")
    app = wsgi_app(tracker)
    with werkzeug_server(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        first = client.post("/api/chat", json={})
        second = client.post("/api/chat", json={})
    assert (first.status_code, first.json()) == (200, {"ok": True})  # before: no answer
    assert second.status_code == 200
    assert len(tracker.used) == 1
    assert app.stats()["errors"] == 1
    app.close()


class AsyncCancellingTracker(RecordingTracker):
    """A coroutine tracker whose chat call awaits a task cancelled elsewhere: asyncio's
    CancelledError comes out of it though this request's task is not cancelled."""

    def __init__(self) -> None:
        super().__init__()
        self.raised = False

    async def get_or_create_conversation(self, conversation_id: str, **kwargs: Any) -> None:  # type: ignore[override]
        if not self.raised:
            self.raised = True
            shared = asyncio.get_running_loop().create_task(asyncio.sleep(10))
            shared.cancel()
            await shared
        super().get_or_create_conversation(conversation_id, **kwargs)


@pytest.mark.parametrize("kind", ["blocking", "coroutine"])
def test_a_cancelled_error_from_a_chat_call_under_asgi_leaves_the_chat_answered(
    kind: str,
) -> None:
    tracker = (
        CancellingTracker("get_or_create_conversation")
        if kind == "blocking"
        else AsyncCancellingTracker()
    )
    app = asgi_app(tracker)
    with uvicorn_server(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        first = client.post("/api/chat", json={})
        second = client.post("/api/chat", json={})
    assert second.status_code == 200
    assert tracker.raised
    assert len(tracker.used) == 1
    if kind == "coroutine" and sys.version_info < (3, 11):
        # Documented: 3.10's tasks cannot tell a tracker's own CancelledError from this
        # request's cancellation (no Task.cancelling()), so it ends the request there.
        assert (first.status_code, app.stats()["errors"]) == (500, 0)
    else:
        assert (first.status_code, first.json()) == (200, {"ok": True})  # before: a 500
        assert app.stats()["errors"] == 1
    app.close()


def test_the_requests_own_cancellation_still_ends_it_during_a_chat_call() -> None:
    # The task itself cancelled (a client gone, a timeout around the app) while the
    # tracker's call runs: that CancelledError is not the tracker's, and it goes on.
    entered = asyncio.Event()

    class Slow(RecordingTracker):
        async def get_or_create_conversation(self, conversation_id: str, **kwargs: Any) -> None:  # type: ignore[override]
            entered.set()
            await asyncio.sleep(10)

    app = asgi_app(Slow(), tracker_timeout=30)
    reached_app = False

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal reached_app
        reached_app = True

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/api/chat", "raw_path": b"/api/chat", "query_string": b"",
        "root_path": "", "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000),
    }  # fmt: skip

    async def main() -> None:
        task = asyncio.ensure_future(app(scope, receive, send))
        await asyncio.wait_for(entered.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert not reached_app  # the app was not run after the request was cancelled
    assert app.stats()["errors"] == 0
    app.close()


class _ClassLevelCallables:
    """A test fake: callables set on the class, which do not bind and work through it."""

    initialize_conversation = mock.Mock()
    get_or_create_conversation = mock.Mock()


def test_a_class_whose_methods_do_not_bind_is_a_tracker() -> None:
    mw = AgentSightMiddleware(_page, widget_pages=["/"], tracker=_ClassLevelCallables)
    mw.close()


class _PartialTracker:
    def _call(self, kind: str, conversation_id: str, **kwargs: Any) -> None:
        pass

    initialize_conversation = functools.partialmethod(_call, "page view")
    get_or_create_conversation = functools.partialmethod(_call, "chat")


@pytest.mark.parametrize(
    ("make", "built"),
    [
        (RecordingTracker, "RecordingTracker()"),
        # Its constructor takes the SDK's tracker: "ClassicTracker()" would fail in turn.
        (ClassicTracker, "ClassicTracker(...)"),
        (_PartialTracker, "_PartialTracker()"),
    ],
)
def test_a_tracker_class_instead_of_an_instance_fails_at_start_up(make: type, built: str) -> None:
    with pytest.raises(
        ValueError, match=rf"tracker={make.__name__} is a class.*tracker={re.escape(built)}$"
    ):
        AgentSightMiddleware(_page, widget_pages=["/"], tracker=make)


def test_a_timed_out_close_is_not_waited_out_again_at_exit(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The lifespan's close() ran out of shutdown_timeout on a hung blocking tracker; the
    # atexit close() after it waited (and warned) a second time: 2x shutdown_timeout.
    from werkzeug.test import Client

    release = threading.Event()
    mw = AgentSightWSGIMiddleware(
        wsgi_page,
        widget_pages=["/"],
        tracker=Hanging(release),
        tracker_timeout=1,
        shutdown_timeout=0.5,
    )
    try:
        for _ in range(2):
            client = Client(mw)
            assert client.get("/", headers=BROWSER).status_code == 200
        time.sleep(0.2)  # the first call has started, the second waits
        mw.close()
        started = time.monotonic()
        mw.close()  # as atexit does after the lifespan's
        again = time.monotonic() - started
    finally:
        release.set()
    assert again < 0.3  # before: another 0.5 s
    warnings = [r for r in caplog.records if "not delivered within" in r.getMessage()]
    assert len(warnings) == 1
    assert mw.flush(5)  # the worker still finishes what it had once the call returns


def test_page_views_after_a_timed_out_close_keep_to_one_call_at_a_time() -> None:
    # The first fix of the double wait stopped the worker at a timed-out close: the next
    # page view started a second worker beside the first (two calls at once on a tracker
    # that takes one), and stats() lost count of what the first still held.
    from werkzeug.test import Client

    class OneAtATime:
        def __init__(self) -> None:
            self.lock = threading.Lock()
            self.running = self.most = self.done = 0

        def initialize_conversation(self, **kwargs: Any) -> None:
            with self.lock:
                self.running += 1
                self.most = max(self.most, self.running)
            time.sleep(0.3)
            with self.lock:
                self.running -= 1
                self.done += 1

        def get_or_create_conversation(self, **kwargs: Any) -> None:
            pass

    tracker = OneAtATime()
    mw = AgentSightWSGIMiddleware(
        wsgi_page, widget_pages=["/"], tracker=tracker, shutdown_timeout=0.2
    )
    for _ in range(3):
        assert Client(mw).get("/", headers=BROWSER).status_code == 200
    time.sleep(0.05)
    mw.close()  # runs out of time: 3 x 0.3 s to go
    for _ in range(3):
        assert Client(mw).get("/", headers=BROWSER).status_code == 200
    assert mw.stats()["queued"] >= 3  # what waits is still counted
    assert mw.flush(10)
    assert tracker.done == 6
    assert tracker.most == 1


class FlushingTracker(RecordingTracker):
    """Buffers like the 0.1.x SDK; its flush takes ``delay`` whatever it is told."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay
        self.flushes = 0  # started
        self.finished = 0
        self._lock = threading.Lock()
        self.running = self.most = 0

    def agentsight_flush(self, timeout: float) -> bool:
        with self._lock:
            self.flushes += 1
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(self.delay)
        with self._lock:
            self.running -= 1
            self.finished += 1
        return True


def test_a_trackers_own_flush_is_bounded_by_the_shutdown_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # OpenTelemetry's force_flush exports its whole queue whatever timeout it is given
    # (~48 s a batch against an API that does not answer): waited for as long, a uvicorn
    # stop took 48 s with shutdown_timeout=1.
    tracker = FlushingTracker(delay=5)
    mw = AgentSightWSGIMiddleware(
        wsgi_page, widget_pages=["/"], tracker=tracker, shutdown_timeout=0.5
    )
    started = time.monotonic()
    assert mw.flush(0.5) is False
    mw.close()  # 1 s at least for the tracker's buffer (see the next tests)
    took = time.monotonic() - started
    assert took < 2.5  # before: 10 s
    assert tracker.flushes == 1  # one at a time: the close waits for the flush still running
    assert any("was not sent at shutdown" in r.getMessage() for r in caplog.records)


def test_flush_calls_that_give_up_leave_one_tracker_flush_running() -> None:
    # Each flush() that gave up on a hook ignoring its timeout left another thread in it,
    # all running at once (20 calls, 20 threads).
    tracker = FlushingTracker(delay=2)
    mw = AgentSightWSGIMiddleware(wsgi_page, widget_pages=["/"], tracker=tracker)
    for _ in range(5):
        assert mw.flush(0.05) is False
    assert tracker.flushes == 1  # before: 5 running at once
    # That one, then one of its own: what was handed over after the first began is in no
    # earlier flush (a first version answered with the old one's outcome).
    assert mw.flush(6) is True
    assert (tracker.flushes, tracker.finished, tracker.most) == (2, 2, 1)


def test_flush_calls_at_once_share_one_tracker_flush() -> None:
    # A request thread's flush() while the lifespan's close() runs, say. Unlocked, two
    # callers often both started a flush, and one read the other's (empty) outcome.
    tracker = FlushingTracker(delay=0.01)
    mw = AgentSightWSGIMiddleware(wsgi_page, widget_pages=["/"], tracker=tracker)
    answers: list[bool] = []
    for _ in range(50):
        callers = [threading.Thread(target=lambda: answers.append(mw.flush(5))) for _ in range(4)]
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join()
    assert answers == [True] * 200
    assert tracker.most == 1
    mw.close()


def test_a_second_close_does_not_wait_again_for_a_hung_tracker_flush(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tracker = FlushingTracker(delay=3)
    mw = AgentSightWSGIMiddleware(
        wsgi_page, widget_pages=["/"], tracker=tracker, shutdown_timeout=0.3
    )
    mw.close()  # gives up on it after 1 s
    started = time.monotonic()
    mw.close()  # the app's own close after the lifespan's, say
    assert time.monotonic() - started < 0.3  # before: another 1 s
    warned = [r for r in caplog.records if "was not sent at shutdown" in r.getMessage()]
    assert len(warned) == 1
    mw.close()


def test_a_page_view_that_uses_up_the_shutdown_timeout_leaves_the_tracker_a_second() -> None:
    # The tracker's buffer holds every earlier page view and turn: given what was left of
    # the shutdown timeout (nothing, here), it got 50 ms and the whole batch was lost.
    release = threading.Event()

    class SlowViewBufferingTracker(FlushingTracker):
        def initialize_conversation(self, conversation_id: str, **kwargs: Any) -> None:
            release.wait(5)
            super().initialize_conversation(conversation_id, **kwargs)

    from werkzeug.test import Client

    tracker = SlowViewBufferingTracker(delay=0.3)  # its export takes 0.3 s
    mw = AgentSightWSGIMiddleware(
        wsgi_page, widget_pages=["/"], tracker=tracker, shutdown_timeout=0.3
    )
    try:
        assert Client(mw).get("/", headers=BROWSER).status_code == 200
        time.sleep(0.1)
        mw.close()
    finally:
        release.set()
    assert (tracker.flushes, tracker.finished) == (1, 1)  # before: cut short after 50 ms


def test_a_second_lifespan_after_a_timed_out_shutdown_delivers_its_page_views() -> None:
    # A close() that ran out of time made every later one return at once: a second lifespan
    # of the same app (an in-process restart, a second TestClient block) lost its page views.
    first = threading.Event()

    class FirstHangs(FlushingTracker):
        def initialize_conversation(self, conversation_id: str, **kwargs: Any) -> None:
            if not first.is_set():
                first.set()
                time.sleep(1.5)  # past the first shutdown's timeout
            else:
                time.sleep(0.2)  # done only if the second shutdown waits for them
            super().initialize_conversation(conversation_id, **kwargs)

    tracker = FirstHangs(delay=0)
    mw = asgi_app(tracker, shutdown_timeout=1.0)
    with uvicorn_server(mw) as url:  # its lifespan's end closes the middleware
        visit(url, 1)
    time.sleep(1.0)  # the hung call is over
    with uvicorn_server(mw) as url:
        visit(url, 3)
    assert len(tracker.initialized) == 4  # before: 1, the second lifespan's 3 lost
    assert tracker.flushes == 2  # the tracker's own buffer at each shutdown


def test_flush_zero_with_nothing_held_answers_true() -> None:
    mw = AgentSightWSGIMiddleware(wsgi_page, widget_pages=["/"], tracker=FlushingTracker(delay=0))
    assert mw.flush(0) is True  # the first version said False at once, with nothing to send
    mw.close()


def test_a_class_whose_methods_need_no_instance_is_a_tracker() -> None:
    calls: list[str] = []

    class Namespace:
        @staticmethod
        def initialize_conversation(**kwargs: Any) -> None:
            calls.append("page view")

        @classmethod
        def get_or_create_conversation(cls, **kwargs: Any) -> None:
            calls.append("chat")

    from werkzeug.test import Client

    mw = AgentSightWSGIMiddleware(wsgi_page, widget_pages=["/"], tracker=Namespace)
    assert Client(mw).get("/", headers=BROWSER).status_code == 200
    assert mw.flush(5)
    assert calls == ["page view"]
    mw.close()


# -- coroutines ----------------------------------------------------------------------------


def logged(method: Callable[..., Any]) -> Callable[..., Any]:
    """A plain decorator: its wrapper is no coroutine function, what it returns is one."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return method(*args, **kwargs)

    return wrapper


class DecoratedAsyncTracker(RecordingTracker):
    """anyio's sleep: a chat's coroutine runs on the request's loop, trio's under trio."""

    @logged
    async def initialize_conversation(self, conversation_id: str, **kwargs: Any) -> None:
        await anyio.sleep(0)
        super().initialize_conversation(conversation_id, **kwargs)

    @logged
    async def get_or_create_conversation(self, conversation_id: str, **kwargs: Any) -> None:
        await anyio.sleep(0)
        super().get_or_create_conversation(conversation_id, **kwargs)


@pytest.mark.parametrize("interface", ["asgi", "asgi-trio", "wsgi"])
def test_coroutine_methods_behind_a_plain_decorator_are_awaited(interface: str) -> None:
    # Their coroutines were thrown away unawaited: 0 calls, counted as processed. Under
    # trio, the chat call's thread handed its coroutine back, which trio refuses ("Trio
    # expected a sync function"): every chat's call failed.
    tracker = DecoratedAsyncTracker()
    app = wsgi_app(tracker) if interface == "wsgi" else asgi_app(tracker)
    server = {"asgi": uvicorn_server, "asgi-trio": hypercorn_trio_server}.get(
        interface, werkzeug_server
    )
    with server(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        for _ in range(2):
            client.cookies.clear()
            assert client.get("/", headers=BROWSER).status_code == 200
            assert client.post("/api/chat", json={}).status_code == 200
        assert app.flush(10)
    assert (len(tracker.initialized), len(tracker.used)) == (2, 2)
    assert app.stats()["errors"] == 0
    app.close()


class AsyncClientTracker(RecordingTracker):
    """A coroutine tracker keeping one httpx.AsyncClient, as an async SDK does."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self._url = url
        self._client: httpx.AsyncClient | None = None
        self.loops: set[int] = set()

    async def _send(self) -> None:
        self.loops.add(id(asyncio.get_running_loop()))
        if self._client is None:
            self._client = httpx.AsyncClient()
        await self._client.get(self._url)

    async def initialize_conversation(self, conversation_id: str, **kwargs: Any) -> None:  # type: ignore[override]
        await self._send()
        super().initialize_conversation(conversation_id, **kwargs)

    async def get_or_create_conversation(self, conversation_id: str, **kwargs: Any) -> None:  # type: ignore[override]
        await self._send()
        super().get_or_create_conversation(conversation_id, **kwargs)


def test_a_coroutine_tracker_under_wsgi_keeps_one_loop() -> None:
    # A new loop per call (asyncio.run) closed the loop the tracker's AsyncClient was
    # bound to: "Event loop is closed" on every call after the first.
    with StandInAgentSightAPI() as api:
        tracker = AsyncClientTracker(api.url)
        app = wsgi_app(tracker)
        with werkzeug_server(app) as url, httpx.Client(base_url=url, timeout=10) as client:
            for _ in range(5):
                client.cookies.clear()
                assert client.get("/", headers=BROWSER).status_code == 200
                assert client.post("/api/chat", json={}).status_code == 200
            assert app.flush(10)
    assert (len(tracker.initialized), len(tracker.used)) == (5, 5)
    assert app.stats()["errors"] == 0
    assert len(tracker.loops) == 1
    app.close()


class AsyncTracker(RecordingTracker):
    """A coroutine tracker with a coroutine flush: under WSGI all three run on the
    middleware's own loop."""

    def __init__(self) -> None:
        super().__init__()
        self.flushed = 0

    async def initialize_conversation(self, conversation_id: str, **kwargs: Any) -> None:  # type: ignore[override]
        await asyncio.sleep(0)
        super().initialize_conversation(conversation_id, **kwargs)

    async def get_or_create_conversation(self, conversation_id: str, **kwargs: Any) -> None:  # type: ignore[override]
        await asyncio.sleep(0)
        super().get_or_create_conversation(conversation_id, **kwargs)

    async def agentsight_flush(self, timeout: float) -> bool:
        await asyncio.sleep(0)
        self.flushed += 1
        return True


def test_closing_ends_the_loop_coroutine_calls_ran_on_under_wsgi() -> None:
    # Each closed middleware kept its loop's thread running for the life of the process
    # (an app factory or a test suite building and closing 8 middlewares: 8 threads).
    earlier = set(threading.enumerate())

    def loop_threads() -> list[threading.Thread]:
        return [
            t
            for t in threading.enumerate()
            if t.name.startswith("agentsight-tracker-loop") and t not in earlier
        ]

    def ended() -> list[threading.Thread]:
        deadline = time.monotonic() + 10  # generous: not hung
        for thread in loop_threads():
            thread.join(max(deadline - time.monotonic(), 0.0))
        return loop_threads()

    def use(app: AgentSightWSGIMiddleware, conversation_id: str) -> None:
        with werkzeug_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
            assert client.get("/", headers=BROWSER).status_code == 200
            headers = {"X-Conversation-ID": conversation_id}
            assert client.post("/api/chat", json={}, headers=headers).status_code == 200

    trackers = [AsyncTracker() for _ in range(8)]
    apps = [wsgi_app(tracker) for tracker in trackers]
    for number, app in enumerate(apps):
        use(app, f"c{number}")
        assert loop_threads()
        app.close()
    assert ended() == []
    for tracker in trackers:  # each call made, and each flush, before its loop ended
        assert (len(tracker.initialized), len(tracker.used), tracker.flushed) == (1, 1, 1)
    # Used after close() (a second lifespan), a middleware makes its calls on a new loop.
    app, tracker = apps[0], trackers[0]
    use(app, "again")
    assert app.flush(10)
    assert (len(tracker.initialized), len(tracker.used), tracker.flushed) == (2, 2, 2)
    assert tracker.used[-1]["conversation_id"] == "again"
    assert sum(app.stats()[name] for name in ("errors", "timeouts", "dropped")) == 0
    app.close()
    assert ended() == []


class HungFlush(AsyncTracker):
    async def agentsight_flush(self, timeout: float) -> bool:
        await asyncio.sleep(60)  # an API that does not answer
        return True


def test_a_coroutine_flush_close_gave_up_on_ends_with_its_loop_under_wsgi(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Its thread waited on the loop for ever; cancelled by the loop's end, it is no failure
    # of the tracker's (close() said the buffer was not sent).
    earlier = set(threading.enumerate())
    app = wsgi_app(HungFlush(), tracker_timeout=0.5)
    with caplog.at_level(logging.WARNING, logger="agentsight_middleware"):
        app.close(0.2)
    ours = [t for t in threading.enumerate() if t not in earlier]
    assert {t.name for t in ours} >= {"agentsight-tracker-flush", "agentsight-tracker-loop"}
    deadline = time.monotonic() + 10  # generous: not hung
    for thread in ours:
        thread.join(max(deadline - time.monotonic(), 0.0))
    assert [t.name for t in ours if t.is_alive()] == []
    assert app.stats()["errors"] == 0
    assert [r.getMessage() for r in caplog.records if "flush() failed" in r.getMessage()] == []
    assert any("was not sent at shutdown" in r.getMessage() for r in caplog.records)


class SlowDecoratorTracker(RecordingTracker):
    """A coroutine chat method behind a plain decorator whose wrapper does blocking work
    first (``block`` s: from the ``block_from``-th call on, or until ``release`` is set);
    its coroutine hangs (cancelled at tracker_timeout). Keeps the coroutines it made."""

    def __init__(self, block: float, block_from: int = 1) -> None:
        super().__init__()
        self.block, self.block_from = block, block_from
        self.release = threading.Event()
        self.returned = threading.Event()
        self.coroutines: list[Any] = []
        self._calls_made = 0

    async def _hang(self, conversation_id: str) -> None:
        super().get_or_create_conversation(conversation_id)
        await asyncio.sleep(30)

    def get_or_create_conversation(self, conversation_id: str, **kwargs: Any) -> Any:
        self._calls_made += 1
        if self._calls_made >= self.block_from:
            self.release.wait(self.block)
        coroutine = self._hang(conversation_id)
        self.coroutines.append(coroutine)
        self.returned.set()
        return coroutine


@pytest.mark.parametrize("interface", ["asgi", "wsgi"])
def test_a_decorated_coroutine_chat_call_that_hangs_costs_one_timeout_not_two(
    interface: str,
) -> None:
    # Under WSGI the coroutine got a tracker_timeout of its own after its wrapper's work (in a
    # pool thread at the first chat, in the request's thread after): 3.2 s a chat, not 2.
    timeout = 2.0
    tracker = SlowDecoratorTracker(block=1.2)
    app = (asgi_app if interface == "asgi" else wsgi_app)(tracker, tracker_timeout=timeout)
    server = uvicorn_server if interface == "asgi" else werkzeug_server
    took = []
    with server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        for number in range(2):
            started = time.monotonic()
            headers = {"X-Conversation-ID": f"c{number}"}
            assert client.post("/api/chat", json={}, headers=headers).status_code == 200
            took.append(time.monotonic() - started)
    assert max(took) < timeout + 0.9, took  # before: 3.2 s each
    assert app.stats()["timeouts"] == 2
    app.close()


def test_a_decorated_coroutine_chat_call_under_wsgi_never_holds_the_request() -> None:
    # Taken for a coroutine function after its first call, its wrapper was called in the
    # request's thread from then on: blocking there, it held the chat for as long.
    tracker = SlowDecoratorTracker(block=10, block_from=2)
    app = wsgi_app(tracker, tracker_timeout=0.3)
    with werkzeug_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        assert client.post("/api/chat", json={}).status_code == 200
        tracker.returned.clear()
        assert client.post("/api/chat", json={}).status_code == 200
        answered_first = not tracker.returned.is_set()
        tracker.release.set()
        assert tracker.returned.wait(10)
    assert answered_first  # before: answered only once the wrapper returned
    app.close()


class HeldWrapperTracker(RecordingTracker):
    """A coroutine chat method behind a plain decorator whose wrapper, for conversation
    ``held``, does blocking work until ``release`` is set (a lock another thread holds)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.holding = threading.Event()

    async def _send(self, conversation_id: str) -> None:
        await asyncio.sleep(0)
        super().get_or_create_conversation(conversation_id)

    def get_or_create_conversation(self, conversation_id: str, **kwargs: Any) -> Any:
        if conversation_id == "held":
            self.holding.set()
            self.release.wait(10)
        return self._send(conversation_id)


@pytest.mark.parametrize("interface", ["asgi", "wsgi"])
def test_a_decorated_coroutine_chat_call_blocking_in_its_wrapper_holds_no_other_chat(
    interface: str,
) -> None:
    # Taken for a coroutine function after its first call, its wrapper was called on the
    # loop that awaits its coroutine: under ASGI the app's, so every request waited for the
    # wrapper; under WSGI the tracker's one loop, so the chats' calls were made one at a time
    # and another chat's timed out, never made.
    tracker = HeldWrapperTracker()
    app = (asgi_app if interface == "asgi" else wsgi_app)(tracker, tracker_timeout=3)
    server = uvicorn_server if interface == "asgi" else werkzeug_server
    fail_safe = threading.Timer(8, tracker.release.set)
    with server(app) as url, httpx.Client(base_url=url, timeout=30) as client:

        def held() -> None:
            with httpx.Client(base_url=url, timeout=30) as other:
                other.post("/api/chat", json={}, headers={"X-Conversation-ID": "held"})

        assert client.post("/api/chat", json={}, headers={"X-Conversation-ID": "c0"}).is_success
        holder = threading.Thread(target=held)
        holder.start()
        fail_safe.start()
        try:
            assert tracker.holding.wait(10)
            response = client.post("/api/chat", json={}, headers={"X-Conversation-ID": "c1"})
            answered_while_held = not tracker.release.is_set()
            made = [call["conversation_id"] for call in tracker.used]
        finally:
            tracker.release.set()
            fail_safe.cancel()
            holder.join(10)
    assert response.is_success
    assert answered_while_held  # before, under ASGI: only once the wrapper let the loop go
    assert made == ["c0", "c1"]  # before, under WSGI: c1 timed out behind the wrapper
    app.close()


@pytest.mark.parametrize("interface", ["asgi", "wsgi"])
def test_a_coroutine_that_comes_back_after_the_timeout_is_closed_not_left_unawaited(
    interface: str,
) -> None:
    # The request had gone on; what the wrapper returned then was dropped with the thread's
    # result, never awaited nor closed ("coroutine ... was never awaited" at its collection).
    tracker = SlowDecoratorTracker(block=10)
    app = (asgi_app if interface == "asgi" else wsgi_app)(tracker, tracker_timeout=0.3)
    server = uvicorn_server if interface == "asgi" else werkzeug_server
    with server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        assert client.post("/api/chat", json={}).status_code == 200
        answered_first = not tracker.returned.is_set()
        tracker.release.set()
        assert tracker.returned.wait(10)
        deadline = time.monotonic() + 5
        while inspect.getcoroutinestate(tracker.coroutines[0]) != inspect.CORO_CLOSED:
            assert time.monotonic() < deadline, inspect.getcoroutinestate(tracker.coroutines[0])
            time.sleep(0.02)
    assert answered_first
    assert tracker.used == []  # closed, not run after the request went on without it
    assert app.stats()["timeouts"] == 1
    app.close()


class LoopHeldTracker(RecordingTracker):
    """A coroutine tracker whose page view does blocking work (until ``release``), holding
    the loop its calls run on."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.holding = threading.Event()

    async def initialize_conversation(self, conversation_id: str, **kwargs: Any) -> None:  # type: ignore[override]
        self.holding.set()
        self.release.wait(10)
        super().initialize_conversation(conversation_id, **kwargs)

    async def get_or_create_conversation(self, conversation_id: str, **kwargs: Any) -> None:  # type: ignore[override]
        super().get_or_create_conversation(conversation_id, **kwargs)


def test_a_chat_call_under_wsgi_waits_one_timeout_for_a_held_loop() -> None:
    # The chat's coroutine, queued behind the page view on the tracker's loop, was waited
    # for tracker_timeout + 1 s: its own time limit starts only once the loop runs it.
    timeout = 1.5
    tracker = LoopHeldTracker()
    app = wsgi_app(tracker, tracker_timeout=timeout)
    try:
        with werkzeug_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
            assert client.get("/", headers=BROWSER).status_code == 200
            assert tracker.holding.wait(10)
            started = time.monotonic()
            assert client.post("/api/chat", json={}).status_code == 200
            took = time.monotonic() - started
    finally:
        tracker.release.set()
    assert took < timeout + 0.75, took  # before: 2.5 s
    assert app.stats()["timeouts"] == 1
    app.close()


class SometimesCoroutine(RecordingTracker):
    """Plain methods that return a coroutine every other call, and act at once otherwise
    (an SDK that sends through its async client when it has one)."""

    def __init__(self) -> None:
        super().__init__()
        self._made = {"initialize_conversation": 0, "get_or_create_conversation": 0}

    def _call(self, method: str, kwargs: dict[str, Any]) -> Any:
        self._made[method] += 1

        async def later() -> None:
            self._record(method, kwargs)

        if self._made[method] % 2:
            return later()
        self._record(method, kwargs)
        return None

    def initialize_conversation(self, conversation_id: str, **kwargs: Any) -> Any:
        return self._call("initialize_conversation", {"conversation_id": conversation_id})

    def get_or_create_conversation(self, conversation_id: str, **kwargs: Any) -> Any:
        return self._call("get_or_create_conversation", {"conversation_id": conversation_id})


class OwnLoopTracker(RecordingTracker):
    """Plain methods handing back a future of the tracker's own loop, in a thread of its own
    (an SDK that runs its async client there)."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.loops: set[int] = set()

    async def _send(self, method: str, conversation_id: str) -> None:
        await asyncio.sleep(0.01)
        self.loops.add(id(asyncio.get_running_loop()))
        self._record(method, {"conversation_id": conversation_id})

    def _future(self, method: str, conversation_id: str) -> Any:
        running = asyncio.run_coroutine_threadsafe(self._send(method, conversation_id), self.loop)
        return asyncio.wrap_future(running, loop=self.loop)

    def initialize_conversation(self, conversation_id: str, **kwargs: Any) -> Any:
        return self._future("initialize_conversation", conversation_id)

    def get_or_create_conversation(self, conversation_id: str, **kwargs: Any) -> Any:
        return self._future("get_or_create_conversation", conversation_id)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.mark.parametrize("make", [SometimesCoroutine, OwnLoopTracker])
@pytest.mark.parametrize("interface", ["asgi", "wsgi"])
def test_methods_returning_something_else_to_await_have_every_call_made(
    interface: str, make: Callable[[], RecordingTracker]
) -> None:
    # A method that returned a coroutine once was taken for a coroutine function, and its
    # plain result next time failed ("can't be used in 'await' expression"); a future of
    # the tracker's own loop was awaited on another ("attached to a different loop"):
    # errors, and the chat went on without waiting for its call.
    tracker = make()
    app = (asgi_app if interface == "asgi" else wsgi_app)(tracker)
    server = uvicorn_server if interface == "asgi" else werkzeug_server
    try:
        with server(app) as url, httpx.Client(base_url=url, timeout=10) as client:
            for number in range(4):
                client.cookies.clear()
                assert client.get("/", headers=BROWSER).status_code == 200
                headers = {"X-Conversation-ID": f"c{number}"}
                assert client.post("/api/chat", json={}, headers=headers).status_code == 200
                # The chat's call was waited for: made by the time the chat is answered.
                assert len(tracker.used) == number + 1
            assert app.flush(10)
    finally:
        if isinstance(tracker, OwnLoopTracker):
            tracker.stop()
    assert (len(tracker.initialized), len(tracker.used)) == (4, 4)
    assert app.stats()["errors"] == 0
    if isinstance(tracker, OwnLoopTracker):
        assert tracker.loops == {id(tracker.loop)}
    app.close()


class AsyncRecording(RecordingTracker):
    """A coroutine tracker: under WSGI its page views run on the middleware's own loop."""

    async def initialize_conversation(self, conversation_id: str, **kwargs: Any) -> None:  # type: ignore[override]
        super().initialize_conversation(conversation_id, **kwargs)

    async def get_or_create_conversation(self, conversation_id: str, **kwargs: Any) -> None:  # type: ignore[override]
        super().get_or_create_conversation(conversation_id, **kwargs)


@pytest.mark.parametrize("ending", ["flush", "close"])
def test_a_page_view_queued_before_the_own_loop_runs_is_waited_for(
    ending: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The middleware's own loop made and its thread started, but not running yet (here held
    # back until released; on a busy machine, for as long as its thread waits for the GIL):
    # the page view queued on it was taken for one of a loop that had stopped, forgotten, and
    # flush() said True, close() returned (and the process exited) before it was made.
    release = threading.Event()
    made = asyncio.new_event_loop

    def held_back() -> asyncio.AbstractEventLoop:
        loop = made()
        run = loop.run_forever

        def run_forever() -> None:
            release.wait(10)
            run()

        loop.run_forever = run_forever  # type: ignore[method-assign]
        return loop

    monkeypatch.setattr(asyncio, "new_event_loop", held_back)
    tracker = AsyncRecording()
    app = wsgi_app(tracker, shutdown_timeout=10)
    with werkzeug_server(app) as url:
        visit(url, 1)
        deadline = time.monotonic() + 10
        while app.stats()["processed"] < 1:  # handed to the loop, which does not run yet
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert tracker.initialized == []
        threading.Timer(0.5, release.set).start()
        if ending == "flush":
            assert app.flush(10) is True
        else:
            app.close()
        assert len(tracker.initialized) == 1
    app.close()


# -- odd trackers and values ----------------------------------------------------------------


def test_a_mock_tracker_gets_both_calls() -> None:
    # MagicMock answers any attribute, the adapter's "skip the chat call" flag too.
    tracker = mock.MagicMock()
    app = asgi_app(tracker)
    with uvicorn_server(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        assert client.get("/", headers=BROWSER).status_code == 200
        assert client.post("/api/chat", json={}).status_code == 200
        assert app.flush(10)
    assert tracker.initialize_conversation.call_count == 1
    assert tracker.get_or_create_conversation.call_count == 1
    app.close()


@pytest.mark.parametrize("interface", ["asgi", "wsgi"])
def test_a_tracker_gets_metadata_json_can_carry(interface: str) -> None:
    # The classic SDK encodes the metadata itself: a date from a hook failed there, and
    # the page view (and the chat's conversation row) was lost.
    tracker = RecordingTracker()
    hook = {"plan": "pro", "since": datetime.date(2026, 11, 26), "score": math.nan}
    app = (asgi_app if interface == "asgi" else wsgi_app)(tracker, metadata=hook)
    server = uvicorn_server if interface == "asgi" else werkzeug_server
    with server(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        assert client.get("/", headers=BROWSER).status_code == 200
        assert client.post("/api/chat", json={}).status_code == 200
        assert app.flush(10)
    for call in (*tracker.initialized, *tracker.used):
        metadata = call["metadata"]
        assert (metadata["plan"], metadata["since"], metadata["score"]) == (
            "pro",
            "2026-11-26",
            None,
        )
        assert metadata["page_path"] in ("/", "/api/chat")
    app.close()


@pytest.mark.parametrize("interface", ["asgi", "wsgi"])
def test_a_metadata_value_sent_as_null_is_a_warning_not_a_failure(
    interface: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Nothing failed: the event goes, NaN as null (README, Delivery), and the built-in
    # client says so in one WARNING. With tracker= it was an ERROR with a traceback,
    # "... sent as null failed; the request was served regardless".
    tracker = RecordingTracker()
    app = (asgi_app if interface == "asgi" else wsgi_app)(tracker, metadata={"score": math.nan})
    server = uvicorn_server if interface == "asgi" else werkzeug_server
    with (
        caplog.at_level(logging.INFO, logger="agentsight_middleware"),
        server(app) as url,
        httpx.Client(base_url=url, timeout=10) as client,
    ):
        for _ in range(2):
            client.cookies.clear()
            assert client.get("/", headers=BROWSER).status_code == 200
            assert client.post("/api/chat", json={}).status_code == 200
        assert app.flush(10)
    assert len(tracker.initialized) == len(tracker.used) == 2
    assert all(call["metadata"]["score"] is None for call in (*tracker.initialized, *tracker.used))
    said = [r for r in caplog.records if "sent as null" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.WARNING]
    assert "failed" not in said[0].getMessage()
    assert said[0].exc_info is None
    assert app.stats()["errors"] == 0
    app.close()


def test_a_forked_worker_says_its_own_metadata_warning() -> None:
    # Built and used in the parent, then forked (uWSGI without --lazy-apps, a Werkzeug
    # server forking for each request): the child's first metadata value sent as null went
    # at DEBUG only, where the built-in client, whose sink each process makes anew, says it
    # again at WARNING, and so does every other one-time message here (LogOnce).
    from werkzeug.test import Client

    tracker = RecordingTracker()
    app = wsgi_app(tracker, metadata={"score": math.nan})
    headers = {"X-Conversation-ID": "c1"}
    assert Client(app).post("/api/chat", json={}, headers=headers).status_code == 200

    said: list[logging.LogRecord] = []

    class Said(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            said.append(record)

    def chat() -> bytes:
        handler = Said()
        logger = logging.getLogger("agentsight_middleware")
        logger.addHandler(handler)
        level = logger.level
        logger.setLevel(logging.DEBUG)
        try:
            Client(app).post("/api/chat", json={}, headers=headers)
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
        levels = [r.levelname for r in said if "sent as null" in r.getMessage()]
        return " ".join(levels).encode()

    assert in_forked_child(chat) == b"WARNING"
    app.close()


def test_flush_without_a_timeout_stops_at_the_shutdown_timeout() -> None:
    # A blocking tracker call that hangs (tracker_timeout cannot cut a thread short):
    # flush() with no timeout waited as long as the tracker did, where the built-in
    # client's flush() stops at shutdown_timeout.
    from werkzeug.test import Client

    release = threading.Event()
    mw = AgentSightWSGIMiddleware(
        wsgi_page,
        widget_pages=["/"],
        tracker=Hanging(release),
        tracker_timeout=1,
        shutdown_timeout=1,
    )
    assert Client(mw).get("/", headers=BROWSER).status_code == 200
    time.sleep(0.2)  # the call has started
    started = time.monotonic()
    try:
        assert mw.flush() is False
        flushed_in = time.monotonic() - started
    finally:
        release.set()
    assert flushed_in < 3.0
    mw.close()
