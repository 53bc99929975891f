"""Per-request cost of agentsight-middleware next to the bare app and its peers.

    .venv/bin/pip install -r benchmarks/requirements.txt
    .venv/bin/python benchmarks/overhead.py [--requests 4000] [--runs 5] [--json]
    .venv/bin/python benchmarks/overhead.py --profile --no-peers   # the hot-path profile

Each wrapped app is driven directly, with no sockets and no test client: raw ASGI
calls (``await app(scope, receive, send)``, all in one event loop) on a Starlette app,
raw WSGI calls (``app(environ, start_response)``, the body iterable consumed) on a
Flask app. Requests carry what Chrome sends through one reverse proxy (``10.0.0.2``,
``X-Forwarded-For`` / ``-Proto``), and the middleware trusts that proxy.

Every stack is measured on every request kind (peers that cost the same on any request on
three): ``--runs`` timed runs of ``--requests`` requests each after a warm-up, the stacks
taking turns every 100 requests so that other processes' bursts hit them alike. The table
shows the median over the runs of the mean µs per request, the median single request
(p50, which such noise barely moves), and each one's difference to the bare app.
``bg µs`` is the CPU the process spent outside the request loop (the middleware's worker
thread, an exporter's thread) during the requests and the flush after them, per request:
the cost that does not show on the request path.

Ours sends for real: ``api_key`` / ``endpoint`` point at the stand-in AgentSight API
running in a child process (as the real API would be, on another machine), so the
worker's delivery competes with the requests as it does in production. At the end the
middleware's stats must show every enqueued event delivered, and the stand-in must have
accepted exactly as many; the run fails otherwise. Then each target of the request path
is judged (``TARGETS_US``, p50 added over bare; the rotating user agent against the
first visit; every ASGI row against OpenTelemetry's), met or missed with the figure.

``--profile`` adds a breakdown of our hot path per request kind: each piece (header
reading, rule match, cookie parse, client_ip, Conversation, Event, send wrapper...)
timed alone, in a loop, on the same inputs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import gc
import io
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import timeit
from array import array
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from machine import cpu_model, package_versions, verdict_lines

from agentsight_middleware import AgentSightMiddleware, AgentSightWSGIMiddleware
from agentsight_middleware._conversation import mint_id

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

HOST = "shop.example.com"
PROXY = "10.0.0.2"  # the reverse proxy: the socket peer the app sees
VISITOR = "203.0.113.7"
COOKIE_NAME = "agentsight_conversation_id"
KNOWN_ID = "conv_3f9a1c2b7d4e"
PAGE = (
    "<!doctype html><html lang=en><head><meta charset=utf-8><title>Shop</title></head>"
    "<body><h1>Shop</h1><p>Ask our assistant.</p>"
    "<script src=/static/widget.js defer></script></body></html>"
)
REPLY = {"reply": "Yes, we ship to Germany; delivery takes 2-3 working days."}

#: Our configuration: a few widget pages and chat routes, as a real site has them.
OURS_RULES: dict[str, Any] = {
    "widget_pages": ["/", "/pricing", "/docs/**"],
    "chat_routes": ["POST /api/chat", "POST /api/chat/{conversation_id}/messages"],
    "trusted_proxies": ["10.0.0.0/8"],
}

CHROME = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36"
)
SITE_COOKIES = (
    "_ga=GA1.1.1408290311.1718000000; _ga_7QK3D1X2ZB=GS1.1.1718000000.3.1.1718000456.0.0.0; "
    "cookie_consent=necessary%2Canalytics; csrftoken=q8JrW1mZ6xk0Lr3uT2vA9sYpN4bC7eHd"
)
PAGE_ACCEPT = (
    "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,"
    "image/apng,*/*;q=0.8,application/signed-exchange;v=b3;q=0.7"
)


def _chrome_ua(major: int, build: int, patch: int) -> str:
    return (
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
        f"(KHTML, like Gecko) Chrome/{major}.0.{build}.{patch} Safari/537.36"
    )


def _firefox_ua(major: int, minor: int) -> str:
    return (
        f"Mozilla/5.0 (Macintosh; Intel Mac OS X 10.15; rv:{major}.{minor}) "
        f"Gecko/20100101 Firefox/{major}.{minor}"
    )


def _safari_ua(major: int, minor: int, build: int) -> str:
    return (
        f"Mozilla/5.0 (iPhone; CPU iPhone OS {major}_{minor} like Mac OS X) "
        f"AppleWebKit/605.1.15 (KHTML, like Gecko) Version/{major}.{minor} "
        f"Mobile/15E{build} Safari/604.1"
    )


class RotatingAgents:
    """Realistic browser user agents, never the same one twice in a process."""

    def __init__(self) -> None:
        self._n = 0

    def next(self) -> str:
        n = self._n
        self._n += 1
        kind, k = n % 3, n // 3
        if kind == 0:
            return _chrome_ua(100 + k % 30, 5000 + k // 30 % 2000, k // 60000)
        if kind == 1:
            return _firefox_ua(100 + k % 30, k // 30)
        return _safari_ua(15 + k % 4, k // 4 % 10, k // 40)


AGENTS = RotatingAgents()


def page_headers(*, cookie: str | None, user_agent: str = CHROME) -> list[tuple[str, str]]:
    """What Chrome sends when navigating to a page, as a proxy passes it on."""
    headers = [
        ("host", HOST),
        ("connection", "close"),
        ("x-real-ip", VISITOR),
        ("x-forwarded-for", VISITOR),
        ("x-forwarded-proto", "https"),
        ("sec-ch-ua", '"Chromium";v="126", "Google Chrome";v="126", "Not.A/Brand";v="24"'),
        ("sec-ch-ua-mobile", "?0"),
        ("sec-ch-ua-platform", '"Windows"'),
        ("upgrade-insecure-requests", "1"),
        ("user-agent", user_agent),
        ("accept", PAGE_ACCEPT),
        ("sec-fetch-site", "same-origin"),
        ("sec-fetch-mode", "navigate"),
        ("sec-fetch-user", "?1"),
        ("sec-fetch-dest", "document"),
        ("referer", f"https://{HOST}/pricing"),
        ("accept-encoding", "gzip, deflate, br, zstd"),
        ("accept-language", "en-US,en;q=0.9,de;q=0.8"),
    ]
    if cookie is not None:
        headers.append(("cookie", cookie))
    return headers


def chat_headers(
    body: bytes, conversation_id: str, *, id_header: bool = False
) -> list[tuple[str, str]]:
    """What the widget's ``fetch()`` sends; the browser adds the site's cookies, ours too."""
    headers = [
        ("host", HOST),
        ("connection", "close"),
        ("content-length", str(len(body))),
        ("x-real-ip", VISITOR),
        ("x-forwarded-for", VISITOR),
        ("x-forwarded-proto", "https"),
        ("sec-ch-ua", '"Chromium";v="126", "Google Chrome";v="126", "Not.A/Brand";v="24"'),
        ("sec-ch-ua-platform", '"Windows"'),
        ("sec-ch-ua-mobile", "?0"),
        ("user-agent", CHROME),
        ("content-type", "application/json"),
        ("accept", "*/*"),
        ("origin", f"https://{HOST}"),
        ("sec-fetch-site", "same-origin"),
        ("sec-fetch-mode", "cors"),
        ("sec-fetch-dest", "empty"),
        ("referer", f"https://{HOST}/"),
        ("accept-encoding", "gzip, deflate, br, zstd"),
        ("accept-language", "en-US,en;q=0.9,de;q=0.8"),
        ("cookie", f"{SITE_COOKIES}; {COOKIE_NAME}={conversation_id}"),
    ]
    if id_header:
        headers.insert(12, ("x-conversation-id", conversation_id))
    return headers


def chat_body(size: int, *, with_id: bool) -> bytes:
    """A chat message as JSON; ``size`` > 0 pads it with history to about that many bytes."""
    data: dict[str, Any] = {}
    if with_id:
        data["conversation_id"] = KNOWN_ID
    data["message"] = "Hi! Do you ship to Germany, and how long does delivery take?"
    if size:
        turn = {"role": "assistant", "content": "Our jackets come in five sizes. " * 3}
        data["history"] = []
        while len(json.dumps(data)) + len(json.dumps(turn)) + 2 < size:
            data["history"].append(turn)
        data["client"] = {"locale": "en-US", "pad": ""}
        data["client"]["pad"] = "x" * max(size - len(json.dumps(data)), 0)
    return json.dumps(data, separators=(",", ":")).encode()


_ids = itertools.count(0x10000)


def new_id() -> str:
    """A conversation id shaped like ours, never the same twice in a process."""
    return f"conv_{next(_ids):012x}"


Build = Callable[[str], tuple[list[tuple[str, str]], bytes]]


@dataclass(frozen=True)
class Kind:
    """One kind of request: what is sent, and what ours must do with it."""

    key: str
    label: str
    method: str
    path: str
    #: The headers and body of one such request from the visitor with this id.
    build: Build
    #: Each request from another visitor (another id, or another user agent).
    varies: bool = False
    chunk: int = 0  # ASGI body message size; 0 = one message
    #: How many events ours enqueues for one such request.
    events: int = 0
    #: Whether ours adds a Set-Cookie to the response.
    sets_cookie: bool = False


SMALL_BODY = chat_body(0, with_id=False)
BODY_1K = chat_body(1024, with_id=True)
BODY_64K = chat_body(64_000, with_id=True)


def _returning(cid: str) -> str:
    return f"{SITE_COOKIES}; {COOKIE_NAME}={cid}"


def _json_chat(body: bytes) -> Build:
    def build(cid: str) -> tuple[list[tuple[str, str]], bytes]:
        own = body.replace(KNOWN_ID.encode(), cid.encode())
        return chat_headers(own, cid), own

    return build


KINDS: tuple[Kind, ...] = (
    Kind("norule", "GET /about (no rule)", "GET", "/about",
         lambda cid: (page_headers(cookie=_returning(cid)), b"")),
    Kind("first", "widget page, first visit", "GET", "/",
         lambda cid: (page_headers(cookie=None), b""), events=1, sets_cookie=True),
    Kind("return", "widget page, returning", "GET", "/",
         lambda cid: (page_headers(cookie=_returning(cid)), b""), sets_cookie=True),
    Kind("chat_cookie", "chat, id in cookie", "POST", "/api/chat",
         lambda cid: (chat_headers(SMALL_BODY, cid), SMALL_BODY), varies=True, events=1,
         sets_cookie=True),
    # The browser sends the cookie along (same origin), with the same id: it slides.
    Kind("chat_header", "chat, id in header", "POST", "/api/chat",
         lambda cid: (chat_headers(SMALL_BODY, cid, id_header=True), SMALL_BODY), varies=True,
         events=1, sets_cookie=True),
    Kind("chat_1k", "chat, id in 1 KB JSON", "POST", "/api/chat", _json_chat(BODY_1K),
         varies=True, events=1, sets_cookie=True),
    Kind("chat_64k", "chat, id in 64 KB JSON", "POST", "/api/chat", _json_chat(BODY_64K),
         varies=True, chunk=16_384, events=1, sets_cookie=True),
    Kind("bot_ua", "widget page, rotating UA", "GET", "/",
         lambda cid: (page_headers(cookie=None, user_agent=AGENTS.next()), b""), varies=True,
         events=1, sets_cookie=True),
)  # fmt: skip


# ---------------------------------------------------------------------------
# The stand-in API, in a child process
# ---------------------------------------------------------------------------

_CHILD = r"""
import sys
from agentsight_middleware.testing import StandInAgentSightAPI

api = StandInAgentSightAPI().start()
print(api.url, api.api_key, flush=True)
accepted = 0
answered = {}

def total():
    return accepted + len(api._conversations)

for line in sys.stdin:
    command, *args = line.split()
    if command == "count":
        with api._cond:
            print(total(), flush=True)
    elif command == "wait":
        wanted, timeout = int(args[0]), float(args[1])
        with api._cond:
            api._cond.wait_for(lambda: total() >= wanted, timeout)
            print(total(), flush=True)
    elif command == "trim":
        # Forget the bodies (memory) but keep the counts.
        with api._cond:
            accepted = total()
            for request in api._requests:
                answered[request.status] = answered.get(request.status, 0) + 1
            api.reset()
        print(accepted, flush=True)
    elif command == "statuses":
        with api._cond:
            counts = dict(answered)
            for request in api._requests:
                counts[request.status] = counts.get(request.status, 0) + 1
        print(" ".join(f"{k}:{v}" for k, v in sorted(counts.items())), flush=True)
    elif command == "latency":
        api.set_latency(float(args[0]))
        print("ok", flush=True)
    elif command == "quit":
        break
api.stop()
"""


class StandInProcess:
    """``StandInAgentSightAPI`` in a child process, so its HTTP handling never competes
    with the measured process for the GIL (the real API runs on another machine)."""

    def __init__(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        assert self._proc.stdout is not None
        self.url, self.api_key = self._proc.stdout.readline().split()
        self._lock = threading.Lock()

    def _ask(self, line: str) -> str:
        assert self._proc.stdin is not None
        assert self._proc.stdout is not None
        with self._lock:
            self._proc.stdin.write(line + "\n")
            self._proc.stdin.flush()
            return self._proc.stdout.readline().strip()

    def accepted(self) -> int:
        """Conversations (events) accepted so far."""
        return int(self._ask("count"))

    def wait_for(self, conversations: int, timeout: float) -> int:
        """Block until that many were accepted (or ``timeout``); how many were."""
        return int(self._ask(f"wait {conversations} {timeout}"))

    def trim(self) -> int:
        return int(self._ask("trim"))

    def set_latency(self, seconds: float) -> None:
        """Answer each request ``seconds`` late from now on (0: at once)."""
        self._ask(f"latency {seconds}")

    def statuses(self) -> dict[int, int]:
        text = self._ask("statuses")
        return {int(k): int(v) for k, v in (p.split(":") for p in text.split())}

    def close(self) -> None:
        if self._proc.poll() is None:
            assert self._proc.stdin is not None
            self._proc.stdin.write("quit\n")
            self._proc.stdin.close()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def __enter__(self) -> StandInProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------
# Machine
# ---------------------------------------------------------------------------

PACKAGES = (
    "agentsight-middleware",
    "starlette",
    "flask",
    "werkzeug",
    "anyio",
    "httpx",
    "asgi-correlation-id",
    "opentelemetry-sdk",
    "opentelemetry-instrumentation-asgi",
    "opentelemetry-instrumentation-wsgi",
    "apitally",
)


def machine_info() -> dict[str, Any]:
    versions = package_versions(PACKAGES)
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "packages": versions,
    }


def conditions() -> dict[str, float]:
    """How busy the machine is right now: load average, and the speed of a fixed loop."""
    loop_us = min(timeit.repeat("sum(range(1000))", number=2000, repeat=5)) / 2000 * 1e6
    return {"load_1min": round(os.getloadavg()[0], 2), "sum_range_1000_us": round(loop_us, 2)}


def print_machine(info: dict[str, Any]) -> None:
    print(f"CPU     {info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable)")
    print(f"Python  {info['python']} on {info['platform']}")
    packages = ", ".join(f"{k} {v}" for k, v in info["packages"].items() if v is not None)
    missing = [k for k, v in info["packages"].items() if v is None]
    print(f"Pkgs    {packages}")
    if missing:
        print(f"        not installed: {', '.join(missing)}")
    before, after = info.get("conditions_before"), info.get("conditions_after")
    if before and after:
        print(
            f"Load    1-min load average {before['load_1min']} at start, {after['load_1min']} at "
            f"end; sum(range(1000)) took {before['sum_range_1000_us']} / "
            f"{after['sum_range_1000_us']} µs (an idle modern x86 core: about 8)"
        )


# ---------------------------------------------------------------------------
# The apps
# ---------------------------------------------------------------------------


def starlette_app() -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse
    from starlette.routing import Route

    async def page(request: Request) -> HTMLResponse:
        return HTMLResponse(PAGE)

    async def chat(request: Request) -> JSONResponse:
        data = await request.json()
        return JSONResponse({**REPLY, "echo": len(data)})

    return Starlette(
        routes=[
            Route("/", page),
            Route("/about", page),
            Route("/pricing", page),
            Route("/api/chat", chat, methods=["POST"]),
        ]
    )


def flask_app() -> Any:
    from flask import Flask, request

    app = Flask("bench")

    @app.get("/")
    @app.get("/about", endpoint="about")
    @app.get("/pricing", endpoint="pricing")
    def page() -> str:
        return PAGE

    @app.post("/api/chat")
    def chat() -> dict[str, Any]:
        data = request.get_json()
        return {**REPLY, "echo": len(data)}

    return app


@dataclass
class Stack:
    """One way of wrapping the app: what is timed, and how to settle its background work."""

    name: str
    app: Any
    flush: Callable[[], None] = lambda: None
    ours: Any = None  # our middleware instance, for its stats
    note: str = ""
    #: The request kinds it is measured on (None: all). Peers that cost the same on any
    #: request are measured on a few, to keep the run short; OpenTelemetry on all (the ratio).
    kinds: frozenset[str] | None = None

    def runs_on(self, kind: Kind) -> bool:
        return self.kinds is None or kind.key in self.kinds


#: Requests timed in one go before the next stack takes its turn.
CHUNK = 100

#: Where the peers that are not the yardstick are measured.
PEER_KINDS = frozenset({"norule", "return", "chat_1k"})


class PassThrough:
    """The floor: an ASGI middleware that does nothing but call the app."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


class WSGIPassThrough:
    """The floor: a WSGI middleware that does nothing but call the app."""

    def __init__(self, app: WSGIApp) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        return self.app(environ, start_response)


#: The yardstick's row name.
LEAST = "hand-written minimum (yardstick)"
#: The request kinds the hand-written minimum handles (it reads no bodies).
LEAST_KINDS = frozenset({"norule", "first", "return", "chat_cookie", "chat_header"})
_LEAST_COOKIE = b"; Path=/; Max-Age=1800; SameSite=Lax; Secure; HttpOnly"


class LeastTracker:
    """A yardstick, not a peer: the least any ASGI middleware must do for these targets.

    Widget page: find our cookie in the headers, mint an id when there is none, put it in
    a context variable, add a Set-Cookie to a 2xx response and queue an event on a first
    visit. Chat: take the id from the header or the cookie, set the context variable,
    queue an event. No page-view tests, no proxies, no request facts, no hooks, no body
    lookup: whatever ours costs above this row is what its features cost. Ids come
    from our own minting function, which any tracker needs in some form.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.events: deque[tuple[str, str, Any]] = deque()
        self.current: contextvars.ContextVar[str | None] = contextvars.ContextVar(
            "least", default=None
        )

    def _find(self, headers: Any, header: bytes) -> str | None:
        for name, value in headers:
            if name == header:
                return str(value.decode("latin-1"))
            if name == b"cookie":
                text = value.decode("latin-1")
                at = text.find(COOKIE_NAME + "=")
                if at >= 0:
                    end = text.find(";", at)
                    return str(text[at + len(COOKIE_NAME) + 1 : end if end >= 0 else None])
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if path == "/":
            found = self._find(scope["headers"], b"")
            first = found is None
            cid = mint_id() if found is None else found
            cookie = (b"set-cookie", COOKIE_NAME.encode() + b"=" + cid.encode() + _LEAST_COOKIE)
            events = self.events

            async def send_cookie(message: Message) -> None:
                if message["type"] == "http.response.start" and 200 <= message["status"] < 300:
                    message = {**message, "headers": [*message.get("headers", ()), cookie]}
                    if first:
                        events.append(("initialize", cid, scope))
                await send(message)

            token = self.current.set(cid)
            try:
                await self.app(scope, receive, send_cookie)
            finally:
                self.current.reset(token)
        elif path == "/api/chat":
            cid = self._find(scope["headers"], b"x-conversation-id") or mint_id()
            token = self.current.set(cid)
            self.events.append(("engage", cid, scope))
            try:
                await self.app(scope, receive, send)
            finally:
                self.current.reset(token)
        else:
            await self.app(scope, receive, send)


class WSGILeastTracker:
    """:class:`LeastTracker` for WSGI."""

    def __init__(self, app: WSGIApp) -> None:
        self.app = app
        self.events: deque[tuple[str, str, Any]] = deque()
        self.current: contextvars.ContextVar[str | None] = contextvars.ContextVar(
            "least", default=None
        )

    @staticmethod
    def _cookie(environ: dict[str, Any]) -> str | None:
        text = environ.get("HTTP_COOKIE")
        if text:
            at = text.find(COOKIE_NAME + "=")
            if at >= 0:
                end = text.find(";", at)
                return str(text[at + len(COOKIE_NAME) + 1 : end if end >= 0 else None])
        return None

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        path = environ.get("PATH_INFO", "")
        if path == "/":
            found = self._cookie(environ)
            first = found is None
            cid = mint_id() if found is None else found
            cookie = ("Set-Cookie", f"{COOKIE_NAME}={cid}" + _LEAST_COOKIE.decode())
            events = self.events

            def cookie_start_response(
                status: str, headers: list[tuple[str, str]], exc_info: Any = None
            ) -> Any:
                if exc_info is None and status[:1] == "2":
                    headers = [*headers, cookie]
                    if first:
                        events.append(("initialize", cid, environ))
                return start_response(status, headers, exc_info)

            token = self.current.set(cid)
            try:
                return self.app(environ, cookie_start_response)
            finally:
                self.current.reset(token)
        if path == "/api/chat":
            cid = environ.get("HTTP_X_CONVERSATION_ID") or self._cookie(environ) or mint_id()
            token = self.current.set(cid)
            self.events.append(("engage", cid, environ))
            try:
                return self.app(environ, start_response)
            finally:
                self.current.reset(token)
        return self.app(environ, start_response)


def _least(app: Any, *, asgi: bool) -> Stack:
    least = LeastTracker(app) if asgi else WSGILeastTracker(app)
    return Stack(LEAST, least, least.events.clear, kinds=LEAST_KINDS)


def _tracer_provider() -> tuple[Any, Callable[[], None]]:
    """An SDK TracerProvider exporting to nowhere, batched as in production."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    # Any where the benchmark peers are not installed (make test does not install them).
    class NullExporter(SpanExporter):  # type: ignore[misc, unused-ignore]
        def __init__(self) -> None:
            self.spans = 0

        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            self.spans += len(spans)
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(NullExporter()))

    def flush() -> None:
        provider.force_flush()

    return provider, flush


def ours_options(api: StandInProcess) -> dict[str, Any]:
    return {**OURS_RULES, "api_key": api.api_key, "endpoint": api.url}


def asgi_stacks(api: StandInProcess, *, peers: bool = True) -> list[Stack]:
    app = starlette_app()
    stacks = [
        Stack("bare Starlette app", app),
        Stack("pass-through (floor)", PassThrough(app)),
        _least(app, asgi=True),
    ]
    if not peers:
        mw = AgentSightMiddleware(app, **ours_options(api))
        return [*stacks, Stack("agentsight-middleware (ours)", mw, lambda: _flush_ours(mw), mw)]
    try:
        from asgi_correlation_id import CorrelationIdMiddleware

        stacks.append(Stack("asgi-correlation-id", CorrelationIdMiddleware(app), kinds=PEER_KINDS))
    except ImportError:
        print("asgi-correlation-id is not installed: skipped", file=sys.stderr)

    from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
    from starlette.requests import Request
    from starlette.responses import Response

    class CallNext(BaseHTTPMiddleware):
        async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
            return await call_next(request)

    stacks.append(Stack("BaseHTTPMiddleware(call_next)", CallNext(app), kinds=PEER_KINDS))
    try:
        from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

        provider, flush = _tracer_provider()
        stacks.append(
            Stack(
                "opentelemetry-instrumentation-asgi",
                OpenTelemetryMiddleware(app, tracer_provider=provider),
                flush,
            )
        )
    except ImportError:
        print("opentelemetry-instrumentation-asgi is not installed: skipped", file=sys.stderr)
    stacks.extend(_apitally_stack())
    mw = AgentSightMiddleware(app, **ours_options(api))
    stacks.append(Stack("agentsight-middleware (ours)", mw, lambda: _flush_ours(mw), mw))
    return stacks


def _apitally_stack() -> list[Stack]:
    """apitally 1.x is OpenTelemetry plus its own span processing and an OTLP exporter.

    It needs no network to serve requests: its exporter thread sends to a closed local
    port here and fails quietly in the background.
    """
    try:
        import logging

        import apitally.starlette
        from apitally.shared import activation
    except ImportError as exc:
        print(f"apitally is not usable ({exc}): skipped", file=sys.stderr)
        return []
    logging.getLogger("apitally").setLevel(logging.CRITICAL)
    app = starlette_app()
    apitally.starlette.init(
        app,
        write_token="apt_" + "a1B2c3D4e5F6g7H8i9J0k1L2",
        env="bench",
        otlp_endpoint="http://127.0.0.1:9",  # discard port: nothing listens
        capture_logs=False,
    )
    activation.activate()
    if not activation.is_activated():
        print("apitally did not activate: skipped", file=sys.stderr)
        return []

    def flush() -> None:
        processor = activation.span_processor
        if processor is not None:
            processor.force_flush()

    return [
        Stack(
            "apitally (OTel + exporter)",
            app,
            flush,
            note="exports to a closed port",
            kinds=PEER_KINDS,
        )
    ]


def wsgi_stacks(api: StandInProcess, *, peers: bool = True) -> list[Stack]:
    app = flask_app()
    stacks = [
        Stack("bare Flask app", app),
        Stack("pass-through (floor)", WSGIPassThrough(app)),
        _least(app, asgi=False),
    ]
    if not peers:
        mw = AgentSightWSGIMiddleware(app, **ours_options(api))
        return [*stacks, Stack("agentsight-middleware (ours)", mw, lambda: _flush_ours(mw), mw)]
    from werkzeug.middleware.proxy_fix import ProxyFix

    stacks.append(Stack("werkzeug ProxyFix(x_for=1)", ProxyFix(app, x_for=1), kinds=PEER_KINDS))
    try:
        from opentelemetry.instrumentation.wsgi import OpenTelemetryMiddleware

        provider, flush = _tracer_provider()
        stacks.append(
            Stack(
                "opentelemetry-instrumentation-wsgi",
                OpenTelemetryMiddleware(app, tracer_provider=provider),
                flush,
            )
        )
    except ImportError:
        print("opentelemetry-instrumentation-wsgi is not installed: skipped", file=sys.stderr)
    mw = AgentSightWSGIMiddleware(app, **ours_options(api))
    stacks.append(Stack("agentsight-middleware (ours)", mw, lambda: _flush_ours(mw), mw))
    return stacks


def _flush_ours(mw: Any) -> None:
    if not mw.flush(60):
        raise SystemExit(f"our middleware did not deliver within 60 s: {mw.stats()}")


# ---------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------

ASGI_BASE: dict[str, Any] = {
    "type": "http",
    "asgi": {"version": "3.0", "spec_version": "2.4"},
    "http_version": "1.1",
    "server": ("10.0.0.5", 8000),
    "client": (PROXY, 51234),
    "scheme": "http",
    "root_path": "",
    "query_string": b"",
}


def asgi_request(kind: Kind, cid: str = KNOWN_ID) -> tuple[Scope, tuple[Message, ...]]:
    headers, body = kind.build(cid)
    scope = {
        **ASGI_BASE,
        "method": kind.method,
        "path": kind.path,
        "raw_path": kind.path.encode(),
        "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
    }
    if kind.chunk and len(body) > kind.chunk:
        parts = [body[i : i + kind.chunk] for i in range(0, len(body), kind.chunk)]
        messages = tuple(
            {"type": "http.request", "body": part, "more_body": i < len(parts) - 1}
            for i, part in enumerate(parts)
        )
    else:
        messages = ({"type": "http.request", "body": body, "more_body": False},)
    return scope, messages


def receiver(messages: tuple[Message, ...]) -> Receive:
    """The server's ``receive``: the body, then (as a server does) wait for a disconnect."""
    pending = iter(messages)

    async def receive() -> Message:
        message = next(pending, None)
        if message is not None:
            return message
        await asyncio.get_running_loop().create_future()  # cancelled by whoever waits
        raise AssertionError("unreachable")

    return receive


async def discard(message: Message) -> None:
    pass


def wsgi_environ(kind: Kind, cid: str = KNOWN_ID) -> tuple[dict[str, Any], bytes]:
    headers, body = kind.build(cid)
    environ: dict[str, Any] = {
        "REQUEST_METHOD": kind.method,
        "SCRIPT_NAME": "",
        "PATH_INFO": kind.path,
        "QUERY_STRING": "",
        "SERVER_NAME": HOST,
        "SERVER_PORT": "8000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": PROXY,
        "REMOTE_PORT": "51234",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    for name, value in headers:
        key = name.upper().replace("-", "_")
        if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            key = "HTTP_" + key
        # A new str, as a server decodes one per request (not a shared constant).
        environ[key] = value.encode("latin-1").decode("latin-1")
    return environ, body


def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
    return _write


def _write(data: bytes) -> None:
    pass


# ---------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------


class Batch:
    """``n`` requests of one kind, built before the clock starts.

    Requests of a ``varies`` kind come from many visitors: 256 ids in turn (a user agent
    never seen before on every request for the rotating-UA bot). Every request has header
    objects of its own, as a server's parser makes them: a row sharing one header list
    across its requests would run on warmer caches than the rotating-UA row it is
    compared with.
    """

    def __init__(self, kind: Kind, n: int, *, asgi: bool) -> None:
        self.n = n
        distinct = (n if kind.key == "bot_ua" else min(n, 256)) if kind.varies else 1
        ids = [new_id() for _ in range(distinct)]
        if asgi:
            made = [asgi_request(kind, ids[i % distinct]) for i in range(n)]
            self.scopes = [scope for scope, _ in made]
            self.receives = [receiver(messages) for _, messages in made]
        else:
            self.environs = []
            for i in range(n):
                environ, body = wsgi_environ(kind, ids[i % distinct])
                self.environs.append({**environ, "wsgi.input": io.BytesIO(body)})


async def run_asgi(app: ASGIApp, batch: Batch, times: array[int]) -> int:
    clock = time.perf_counter_ns
    send = discard
    append = times.append
    started = last = clock()
    for scope, receive in zip(batch.scopes, batch.receives, strict=True):
        await app(scope, receive, send)
        now = clock()
        append(now - last)
        last = now
    return last - started


def run_wsgi(app: WSGIApp, batch: Batch, times: array[int]) -> int:
    clock = time.perf_counter_ns
    append = times.append
    started = last = clock()
    for environ in batch.environs:
        result = app(environ, start_response)
        for _ in result:
            pass
        close = getattr(result, "close", None)
        if close is not None:
            close()
        now = clock()
        append(now - last)
        last = now
    return last - started


@dataclass
class Cell:
    """The measurements of one stack on one request kind."""

    stack: str
    kind: str
    runs_ns: list[float] = field(default_factory=list)  # mean per request, one per run
    bg_ns: list[float] = field(default_factory=list)  # per request, one per run
    samples: array[int] = field(default_factory=lambda: array("q"))  # every request

    @property
    def us(self) -> float:
        """Median over the runs of the mean time per request."""
        return statistics.median(self.runs_ns) / 1000

    @property
    def p50_us(self) -> float:
        """Median single request over all runs: what other processes' noise barely moves."""
        return statistics.median(self.samples) / 1000

    @property
    def bg_us(self) -> float:
        return statistics.median(self.bg_ns) / 1000


def check_response(
    stack: Stack, kind: Kind, asgi: bool, loop: asyncio.AbstractEventLoop | None
) -> None:
    """One request with the response inspected: 200, and our cookie where it belongs."""
    sent: list[tuple[int, list[tuple[str, str]]]] = []
    if asgi:
        assert loop is not None

        async def record(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k.decode(), v.decode()) for k, v in message.get("headers", [])]
                sent.append((message["status"], headers))

        scope, messages = asgi_request(kind, new_id())
        loop.run_until_complete(stack.app(scope, receiver(messages), record))
    else:

        def recording_start_response(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Any:
            sent.append((int(status[:3]), [(k.lower(), v) for k, v in headers]))
            return _write

        environ, body = wsgi_environ(kind, new_id())
        environ["wsgi.input"] = io.BytesIO(body)
        result = stack.app(environ, recording_start_response)
        for _ in result:
            pass
        getattr(result, "close", lambda: None)()
    assert len(sent) == 1, f"{stack.name}, {kind.label}: no response"
    status, headers = sent[0]
    assert status == 200, f"{stack.name}, {kind.label}: status {status}"
    cookie = any(k == "set-cookie" and v.startswith(COOKIE_NAME) for k, v in headers)
    if stack.ours is not None:
        assert cookie == kind.sets_cookie, f"{stack.name}, {kind.label}: set-cookie {cookie}"


def measure(
    stacks: list[Stack],
    *,
    asgi: bool,
    requests: int,
    runs: int,
    warmup: int,
    api: StandInProcess,
    progress: Callable[[str], None],
    delivery_budget: float,
    plan: dict[str, Any],
) -> dict[tuple[str, str], Cell]:
    """Every stack on every kind; runs interleaved over the stacks, each from an empty queue.

    Every event ours enqueues is delivered to the stand-in before the next run starts. On
    kinds where ours sends an event, a run has fewer requests when the worker could not
    deliver ``requests`` x ``runs`` of them within ``delivery_budget`` seconds in all.
    """
    loop = asyncio.new_event_loop() if asgi else None
    cells: dict[tuple[str, str], Cell] = {}
    ours_stack = next(s for s in stacks if s.ours is not None)
    rate = delivery_rate(ours_stack, asgi, loop)
    event_kinds = sum(1 for k in KINDS if k.events)
    affordable = int(delivery_budget * rate / (event_kinds * (runs + 1)))
    event_requests = max(min(requests, affordable), 100)
    plan.update(delivery_rate_per_s=round(rate), event_requests=event_requests)
    progress(
        f"  worker delivered {rate:.0f} events/s: {event_requests} requests per run on "
        f"kinds where ours sends an event"
    )
    try:
        for kind in KINDS:
            started = time.monotonic()
            n = event_requests if kind.events else requests
            warm = min(warmup, n)
            here = [stack for stack in stacks if stack.runs_on(kind)]
            for stack in here:
                ours = stack.ours
                before = ours.stats()["enqueued"] if ours is not None else 0
                check_response(stack, kind, asgi, loop)
                _timed(stack, Batch(kind, warm, asgi=asgi), loop, array("q"))
                stack.flush()
                if ours is not None:
                    got = ours.stats()["enqueued"] - before
                    want = (warm + 1) * kind.events
                    assert got == want, f"{kind.label}: {got} events enqueued, expected {want}"
                cells[stack.name, kind.key] = Cell(stack.name, kind.key)
            # A run is cut in chunks, and the stacks take turns chunk by chunk: a burst of
            # another process's work then slows every stack alike.
            sizes = [CHUNK] * (n // CHUNK) + ([n % CHUNK] if n % CHUNK else [])
            for _ in range(runs):
                gc.collect()
                elapsed = dict.fromkeys((s.name for s in here), 0)
                bg = dict.fromkeys((s.name for s in here), 0)
                for turn, size in enumerate(sizes):
                    # Who goes first (just after ours' flush) changes every turn.
                    first = turn % len(here)
                    for stack in here[first:] + here[:first]:
                        batch = Batch(kind, size, asgi=asgi)
                        cpu, own = time.process_time_ns(), time.thread_time_ns()
                        samples = cells[stack.name, kind.key].samples
                        elapsed[stack.name] += _timed(stack, batch, loop, samples)
                        stack.flush()  # the background work this chunk caused, untimed
                        other = (time.process_time_ns() - cpu) - (time.thread_time_ns() - own)
                        bg[stack.name] += max(other, 0)
                for stack in here:
                    cell = cells[stack.name, kind.key]
                    cell.runs_ns.append(elapsed[stack.name] / n)
                    cell.bg_ns.append(bg[stack.name] / n)
            if kind.events:
                api.trim()  # the stand-in forgets the bodies, keeps the counts
            progress(f"  {kind.label}: {time.monotonic() - started:.0f} s")
    finally:
        if loop is not None:
            loop.close()
    return cells


def delivery_rate(stack: Stack, asgi: bool, loop: asyncio.AbstractEventLoop | None) -> float:
    """Events/s our worker delivers here: 300 first visits, timed until all are accepted."""
    kind = next(k for k in KINDS if k.key == "first")
    _timed(stack, Batch(kind, 50, asgi=asgi), loop, array("q"))  # start and warm the worker
    stack.flush()
    batch = Batch(kind, 300, asgi=asgi)
    started = time.monotonic()
    _timed(stack, batch, loop, array("q"))
    stack.flush()
    return 300 / (time.monotonic() - started)


def _timed(
    stack: Stack, batch: Batch, loop: asyncio.AbstractEventLoop | None, times: array[int]
) -> int:
    if loop is not None:
        return loop.run_until_complete(run_asgi(stack.app, batch, times))
    return run_wsgi(stack.app, batch, times)


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


def table(title: str, stacks: list[Stack], cells: dict[tuple[str, str], Cell]) -> list[str]:
    bare = stacks[0].name
    otel = next((s.name for s in stacks if s.name.startswith("opentelemetry")), None)
    width = max(len(s.name) for s in stacks) + 2
    lines = [
        title,
        f"  {'request':<26}{'stack':<{width}}{'µs/req':>8}{'+µs':>8}{'p50':>8}{'+p50':>8}"
        f"{'bg µs':>8}{'otel/ours':>10}",
    ]
    for kind in KINDS:
        base = cells[bare, kind.key]
        otel_extra = cells[otel, kind.key].p50_us - base.p50_us if otel else None
        for i, stack in enumerate(s for s in stacks if (s.name, kind.key) in cells):
            cell = cells[stack.name, kind.key]
            extra, extra50 = cell.us - base.us, cell.p50_us - base.p50_us
            ratio = ""
            if stack.ours is not None and otel_extra is not None:
                ratio = f"{otel_extra / extra50:.0f}x" if extra50 > otel_extra / 100 else ">100x"
            shown = "" if stack.name == bare else f"{extra:+.1f}"
            shown50 = "" if stack.name == bare else f"{extra50:+.1f}"
            label = kind.label if i == 0 else ""
            lines.append(
                f"  {label:<26}{stack.name:<{width}}{cell.us:>8.1f}{shown:>8}"
                f"{cell.p50_us:>8.1f}{shown50:>8}{cell.bg_us:>8.1f}{ratio:>10}"
            )
        lines.append("")
    return lines


def as_json(stacks: list[Stack], cells: dict[tuple[str, str], Cell]) -> list[dict[str, Any]]:
    out = []
    for kind in KINDS:
        base = cells[stacks[0].name, kind.key]
        for stack in stacks:
            if (stack.name, kind.key) not in cells:
                continue
            cell = cells[stack.name, kind.key]
            out.append(
                {
                    "kind": kind.key,
                    "request": kind.label,
                    "stack": stack.name,
                    "us_per_request": round(cell.us, 3),
                    "overhead_us": round(cell.us - base.us, 3),
                    "p50_us": round(cell.p50_us, 3),
                    "p50_overhead_us": round(cell.p50_us - base.p50_us, 3),
                    "background_us_per_request": round(cell.bg_us, 3),
                    "runs_us": [round(ns / 1000, 3) for ns in cell.runs_ns],
                    "note": stack.note,
                }
            )
    return out


#: The request-path targets (p50 added over the bare app, µs): ASGI, WSGI.
TARGETS_US: dict[str, tuple[float, float]] = {
    "norule": (0.5, 1.0),
    "first": (5.0, 5.0),
    "return": (5.0, 5.0),
    "chat_cookie": (8.0, 8.0),
    "chat_header": (8.0, 8.0),
    "chat_1k": (15.0, 15.0),
}
#: A new user agent on every request may cost this much more than a repeated one (noise).
ROTATING_SLACK_US = 1.0


def targets(
    interface: str, stacks: list[Stack], cells: dict[tuple[str, str], Cell]
) -> list[dict[str, Any]]:
    """Each target of the request path: the figure reached and whether it is met."""
    base_name = stacks[0].name
    ours = next(s.name for s in stacks if s.ours is not None)
    otel = next((s.name for s in stacks if s.name.startswith("opentelemetry")), None)
    column = 0 if interface == "asgi" else 1

    def added(stack: str, key: str) -> float | None:
        if (stack, key) not in cells:
            return None
        return cells[stack, key].p50_us - cells[base_name, key].p50_us

    out: list[dict[str, Any]] = []
    labels = {kind.key: kind.label for kind in KINDS}
    for key, limits in TARGETS_US.items():
        value = added(ours, key)
        if value is not None:
            limit = limits[column]
            reached = f"+{value:.1f} µs"
            least = added(LEAST, key)
            if least is not None:
                reached += f" (hand-written minimum +{least:.1f})"
            out.append(
                {"target": f"{labels[key]}: at most +{limit:g} µs", "reached": reached,
                 "met": value <= limit}
            )  # fmt: skip
    rotating, repeated = added(ours, "bot_ua"), added(ours, "first")
    if rotating is not None and repeated is not None:
        out.append(
            {
                "target": "a new user agent every request costs no more than a repeated one",
                "reached": f"+{rotating:.1f} vs +{repeated:.1f} µs",
                "met": rotating <= repeated + ROTATING_SLACK_US,
            }
        )
    if interface == "asgi" and otel is not None:
        ratios = []
        for kind in KINDS:
            theirs, mine = added(otel, kind.key), added(ours, kind.key)
            if theirs is not None and mine is not None:
                ratios.append(theirs / mine if mine > theirs / 100 else 100.0)
        if ratios:
            out.append(
                {
                    "target": "every row at least 10x lighter than OpenTelemetry (ASGI)",
                    "reached": f"lightest margin {min(ratios):.1f}x",
                    "met": min(ratios) >= 10,
                }
            )
    return out


# ---------------------------------------------------------------------------
# Profile of our hot path
# ---------------------------------------------------------------------------


_EMPTY: Callable[[], object] = lambda: None  # noqa: E731


def _ns(fn: Callable[[], object], number: int) -> float:
    """Nanoseconds per call of ``fn``, less the cost of calling an empty lambda."""
    best = min(timeit.repeat(fn, number=number, repeat=5))
    floor = min(timeit.repeat(_EMPTY, number=number, repeat=5))
    return max(best - floor, 0.0) / number * 1e9


def _async_ns(
    loop: asyncio.AbstractEventLoop,
    fn: Callable[[], Awaitable[object]],
    baseline: Callable[[], Awaitable[object]],
    number: int,
) -> float:
    """Nanoseconds per ``await fn()`` less ``await baseline()``, in a running loop."""

    async def run(f: Callable[[], Awaitable[object]]) -> int:
        started = time.perf_counter_ns()
        for _ in range(number):
            await f()
        return time.perf_counter_ns() - started

    best = min(loop.run_until_complete(run(fn)) for _ in range(5))
    floor = min(loop.run_until_complete(run(baseline)) for _ in range(5))
    return max(best - floor, 0) / number


async def _nothing() -> None:
    pass


@dataclass
class Piece:
    label: str
    ns: float | None  # None: could not be timed (the package changed)
    note: str = ""


class Pieces:
    """Collects timed pieces; a piece whose private name moved is shown as n/a."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.items: list[Piece] = []

    def sync(self, label: str, fn: Callable[[], object], number: int | None = None) -> None:
        try:
            fn()
            self.items.append(Piece(label, _ns(fn, number or self.number)))
        except Exception as exc:
            self.items.append(Piece(label, None, f"{type(exc).__name__}: {exc}"))

    def add(self, label: str, ns: Callable[[], float]) -> None:
        try:
            self.items.append(Piece(label, ns()))
        except Exception as exc:
            self.items.append(Piece(label, None, f"{type(exc).__name__}: {exc}"))

    def total(self) -> float:
        return sum(p.ns for p in self.items if p.ns is not None and not p.note)


class NullSink:
    """A sink that takes events and drops them: the enqueue cost without a delivery to wait for."""

    durable = False
    deadline = float("inf")
    storing = "dropping events"

    async def start(self) -> None:
        pass

    async def put(self, payloads: list[dict[str, Any]]) -> None:
        pass

    def pending(self) -> int:
        return 0

    def backed_up(self) -> bool:
        return False

    async def drain(self, deadline: float, *, closing: bool = False) -> int:
        return 0

    async def aclose(self) -> None:
        pass

    def stats(self) -> dict[str, int]:
        return {}


def null_delivery() -> Any:
    """The real ``BackgroundDelivery`` (request-path side unchanged) in front of a NullSink."""
    from agentsight_middleware._delivery import BackgroundDelivery

    return BackgroundDelivery(NullSink, source="web", environment=None)


def asgi_pieces(
    mw: Any, kind: Kind, loop: asyncio.AbstractEventLoop, number: int, delivery: Any
) -> Pieces:
    """Our ASGI request path for ``kind``, piece by piece (see ``asgi.py``)."""
    from agentsight_middleware import asgi as glue
    from agentsight_middleware._body import peek_asgi
    from agentsight_middleware._config import NEED_BODY
    from agentsight_middleware._conversation import MINTED, cookie_value
    from agentsight_middleware._core import NOT_SET
    from agentsight_middleware._events import ENGAGE, INITIALIZE, new_event
    from agentsight_middleware._rules import WIDGET

    p = Pieces(number)
    settings, core = mw._settings, mw._core
    scope, messages = asgi_request(kind)
    method, path = kind.method, kind.path

    def dispatch() -> object:
        if scope["type"] != "http":
            return None
        where = scope["path"]
        root = scope.get("root_path")
        if root and not where.startswith(root):
            where = root + where
        # As AgentSightMiddleware.__call__: exact paths answered from a table, other
        # paths prefiltered by their prefix before the full matcher.
        by_method = mw._exact_matches.get(where)
        if by_method is None:
            if not where.startswith(mw._prefixes):
                return None
            return mw._match(scope["method"], where)
        verb = scope["method"]
        return by_method[verb] if verb in by_method else mw._match(verb, where)

    p.sync("dispatch: scope reads + rule match", dispatch)
    match = mw._match(method, path)
    if match is None:
        return p
    p.sync("header dict (_header_dict: dict() in C)", lambda: glue._header_dict(scope))
    headers = glue._header_dict(scope)

    def text(name: bytes) -> str | None:
        value = headers.get(name)
        return None if value is None else value.decode("latin-1")

    id_header, content_type, cookie = text(mw._id_header), text(b"content-type"), text(b"cookie")
    widget = match.rule.kind == WIDGET
    if widget:
        if cookie:
            name = settings.cookie_name
            p.sync("cookie parse (cookie_value)", lambda: cookie_value(cookie, name))
        conversation_id = cookie_value(cookie, settings.cookie_name) if cookie else None
        source = "cookie"
        if conversation_id is None:
            p.sync("mint_id (secrets.token_hex)", mint_id)
            conversation_id, source = mint_id(), MINTED
    else:
        p.sync(
            "find_id, no body",
            lambda: settings.find_id(match.params, id_header, content_type, cookie, "", None),
        )
        found = settings.find_id(match.params, id_header, content_type, cookie, "", None)
        if found is NEED_BODY:
            length = text(b"content-length")
            limit = settings.max_body_peek

            async def peeked() -> None:
                _, replay = await peek_asgi(receiver(messages), length, limit)
                for _ in messages:
                    await replay()

            async def plain() -> None:
                receive = receiver(messages)
                for _ in messages:
                    await receive()

            p.add(
                f"peek_asgi + replay ({len(messages)} msg)",
                lambda: _async_ns(loop, peeked, plain, number // 4),
            )
            body = b"".join(m["body"] for m in messages)
            p.sync(
                "find_id with body (json_field)",
                lambda: settings.find_id(match.params, id_header, content_type, cookie, "", body),
                max(number // (1 + len(body) // 2048), 200),
            )
            found = settings.find_id(match.params, id_header, content_type, cookie, "", body)
        conversation_id, source = found if found else (mint_id(), MINTED)
    p.sync(
        "_conversation (raw values kept; decoded in the worker)",
        lambda: mw._conversation(scope, headers, match, path, conversation_id, source),
    )
    p.sync(
        "_is_secure (trusted-proxy scheme, for the cookie)", lambda: mw._is_secure(scope, headers)
    )
    conversation = mw._conversation(scope, headers, match, path, conversation_id, source)
    current = core.current

    def state_and_context() -> None:
        scope.setdefault("state", {})["agentsight"] = conversation
        token = current.set(conversation)
        current.reset(token)

    p.sync("scope state + contextvar set/reset", state_and_context)
    p.sync("time.time()", time.time)
    set_cookie = (b"set-cookie", settings.set_cookie(conversation_id, secure=True))
    start = {
        "type": "http.response.start",
        "status": 200,
        "headers": [(b"content-length", b"214"), (b"content-type", b"text/html; charset=utf-8")],
    }
    body_message = {"type": "http.response.body", "body": PAGE.encode()}

    async def through_wrapper() -> None:
        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = message["headers"]
                own = glue._page_cookie(message["status"], headers, b"agentsight_conversation_id=")
                if own is NOT_SET:
                    message = {**message, "headers": [*headers, set_cookie]}
            await discard(message)

        await send_wrapper(start)
        await send_wrapper(body_message)

    async def direct() -> None:
        await discard(start)
        await discard(body_message)

    if widget:
        p.sync("page-view test (_is_page_view)", lambda: glue._is_page_view(headers))
        if kind.key == "bot_ua":
            agents = [AGENTS.next() for _ in range(number * 6)]
            fresh = iter(agents)

            def new_agent() -> object:
                return glue._is_page_view({**headers, b"user-agent": next(fresh).encode()})

            copy_only = iter(agents)

            def copy_headers() -> object:
                return {**headers, b"x": next(copy_only).encode()}

            p.add(
                "  ... with a new user agent (lru miss)",
                lambda: _ns(new_agent, number) - _ns(copy_headers, number),
            )
        p.sync("settings.set_cookie", lambda: settings.set_cookie(conversation_id, secure=True))
        p.add(
            "send wrapper: closure + HTML check + Set-Cookie + 2 awaits",
            lambda: _async_ns(loop, through_wrapper, direct, number),
        )
        if source == MINTED:
            p.sync("new_event(...)", lambda: new_event((INITIALIZE, conversation, 0.0)))
            running_loop = glue._get_loop

            async def probe() -> None:
                running_loop()

            p.add("_get_loop()", lambda: _async_ns(loop, probe, _nothing, number))
            event = new_event((INITIALIZE, conversation, 0.0))
            p.sync("delivery.initialize (enqueue)", lambda: delivery.initialize(event, None), 1000)
            delivery.flush(30)
    else:
        p.sync("new_event(...)", lambda: new_event((ENGAGE, conversation, 0.0)))
        event = new_event((ENGAGE, conversation, 0.0))

        async def engage() -> None:
            await delivery.engage_async(event)

        p.add(
            "await delivery.engage_async (enqueue)",
            lambda: _async_ns(loop, engage, _nothing, 1000),
        )
        delivery.flush(30)
        if source in (MINTED, "cookie"):
            p.sync("settings.set_cookie", lambda: settings.set_cookie(conversation_id, secure=True))

            async def chat_wrapper() -> None:
                async def send_wrapper(message: Message) -> None:
                    if message["type"] == "http.response.start":
                        message = {**message, "headers": [*message.get("headers", ()), set_cookie]}
                    await discard(message)

                await send_wrapper(start)
                await send_wrapper(body_message)

            p.add(
                "send wrapper: closure + Set-Cookie + 2 awaits",
                lambda: _async_ns(loop, chat_wrapper, direct, number),
            )
    return p


def wsgi_pieces(mw: Any, kind: Kind, number: int) -> Pieces:
    """The WSGI-specific pieces (the shared ones cost the same as under ASGI)."""
    from agentsight_middleware import wsgi as wsgi_glue
    from agentsight_middleware._body import peek_wsgi
    from agentsight_middleware._config import NEED_BODY
    from agentsight_middleware._rules import WIDGET

    p = Pieces(number)
    environ, body = wsgi_environ(kind)

    def dispatch() -> object:
        where = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
        if not where.isascii():
            where = where.encode("latin-1", "replace").decode("utf-8", "replace")
        # As AgentSightWSGIMiddleware.__call__ (see the ASGI twin above).
        by_method = mw._exact_matches.get(where)
        if by_method is None:
            if not where.startswith(mw._prefixes):
                return None
            return mw._match(environ.get("REQUEST_METHOD", "GET"), where)
        verb = environ.get("REQUEST_METHOD", "GET")
        return by_method[verb] if verb in by_method else mw._match(verb, where)

    p.sync("dispatch: path + rule match", dispatch)
    match = mw._match(kind.method, kind.path)
    if match is None:
        return p
    p.sync(
        "_conversation (environ values kept)",
        lambda: mw._conversation(environ, match, kind.path, KNOWN_ID, "cookie"),
    )
    settings = mw._settings
    if match.rule.kind == WIDGET:
        p.sync("page-view test (_is_page_view)", lambda: wsgi_glue._is_page_view(environ))
    else:
        get = environ.get
        found = settings.find_id(
            match.params, get(mw._id_key), get("CONTENT_TYPE"), get("HTTP_COOKIE"), "", None
        )
        if found is NEED_BODY:

            def peeked() -> object:
                env: dict[str, Any] = {
                    "CONTENT_LENGTH": str(len(body)),
                    "wsgi.input": io.BytesIO(body),
                }
                peek_wsgi(env, settings.max_body_peek)
                return env["wsgi.input"].read(len(body))

            def plain() -> object:
                return io.BytesIO(body).read(len(body))

            p.add(
                "peek_wsgi + ReplayInput.read",
                lambda: _ns(peeked, number // 4) - _ns(plain, number // 4),
            )
    set_cookie = ("Set-Cookie", settings.set_cookie(KNOWN_ID, secure=True).decode("latin-1"))
    p.sync(
        "set_cookie tuple (bytes -> str)",
        lambda: ("Set-Cookie", settings.set_cookie(KNOWN_ID, secure=True).decode("latin-1")),
    )
    response_headers = [("Content-Type", "text/html; charset=utf-8"), ("Content-Length", "214")]

    def wrapped() -> object:
        def wrapped_start_response(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Any:
            return start_response(status, [*headers, set_cookie], exc_info)

        return wrapped_start_response("200 OK", response_headers)

    def unwrapped() -> object:
        return start_response("200 OK", response_headers)

    p.add(
        "start_response wrapper (closure + call)",
        lambda: _ns(wrapped, number) - _ns(unwrapped, number),
    )
    return p


def cprofile_calls(app: Any, kind: Kind, *, asgi: bool, n: int) -> tuple[float, list[str]]:
    """Function calls per request, and the package's heaviest functions under cProfile."""
    import cProfile
    import pstats

    batch = Batch(kind, n, asgi=asgi)
    profiler = cProfile.Profile()
    loop = asyncio.new_event_loop() if asgi else None
    try:
        profiler.enable()
        _timed(Stack("", app), batch, loop, array("q"))
        profiler.disable()
    finally:
        if loop is not None:
            loop.close()
    stats: dict[Any, Any] = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    calls = sum(row[1] for row in stats.values()) / n
    ours = [
        (row[2], key)
        for key, row in stats.items()
        if "agentsight_middleware" in key[0] and row[2] > 0
    ]
    ours.sort(reverse=True)
    top = [
        f"{name} ({os.path.basename(file)}:{line}) {tt / n * 1e6:.2f}"
        for tt, (file, line, name) in ours[:5]
    ]
    return calls, top


def run_profile(
    api: StandInProcess,
    cells: dict[str, dict[tuple[str, str], Cell]],
    stacks: dict[str, list[Stack]],
    number: int,
) -> tuple[list[str], dict[str, Any]]:
    lines = [
        "",
        "PROFILE of our request path: each piece timed alone, µs per request "
        f"(best of 5 x {number:,} calls). 'rest' = measured p50 overhead - sum of the pieces:"
        " in a request among others each piece costs several times its cost alone"
        " (benchmarks/RESULTS.md, 2026-11-28, session 27).",
    ]
    data: dict[str, Any] = {}
    loop = asyncio.new_event_loop()
    mw = AgentSightMiddleware(starlette_app(), **ours_options(api))
    wmw = AgentSightWSGIMiddleware(flask_app(), **ours_options(api))
    sink = null_delivery()
    try:
        for kind in KINDS:
            for interface in ("asgi", "wsgi"):
                asgi = interface == "asgi"
                bare = stacks[interface][0]
                ours_name = stacks[interface][-1].name
                cell, base = (
                    cells[interface][ours_name, kind.key],
                    cells[interface][bare.name, kind.key],
                )
                mean, p50 = cell.us - base.us, cell.p50_us - base.p50_us
                if asgi:
                    pieces = asgi_pieces(mw, kind, loop, number, sink)
                else:
                    pieces = wsgi_pieces(wmw, kind, number)
                ours_calls, top = cprofile_calls(mw if asgi else wmw, kind, asgi=asgi, n=300)
                base_calls, _ = cprofile_calls(bare.app, kind, asgi=asgi, n=300)
                lines.append("")
                lines.append(
                    f"{interface.upper()} {kind.label}: measured +{mean:.1f} µs mean, "
                    f"+{p50:.1f} µs p50; +{ours_calls - base_calls:.0f} Python calls/request"
                )
                for piece in pieces.items:
                    shown = "n/a" if piece.ns is None else f"{piece.ns / 1000:.2f}"
                    note = f"  ({piece.note})" if piece.note else ""
                    lines.append(f"    {piece.label:<62}{shown:>7}{note}")
                if asgi:
                    total = pieces.total() / 1000
                    lines.append(f"    {'sum of the pieces':<62}{total:>7.2f}")
                    lines.append(
                        f"    {'rest: the pieces in place (colder caches), frames, awaits':<62}"
                        f"{p50 - total:>7.2f}"
                    )
                if top:
                    lines.append(
                        "    heaviest package functions under cProfile (µs/req, inflated):"
                    )
                    lines.extend(f"      {entry}" for entry in top)
                data[f"{interface}:{kind.key}"] = {
                    "measured_overhead_us": round(mean, 3),
                    "measured_p50_overhead_us": round(p50, 3),
                    "extra_calls_per_request": round(ours_calls - base_calls, 1),
                    "pieces_us": {
                        piece.label.strip(): None if piece.ns is None else round(piece.ns / 1000, 3)
                        for piece in pieces.items
                    },
                    "cprofile_top": top,
                }
    finally:
        loop.close()
        sink.close(10)
        _flush_ours(mw)
        _flush_ours(wmw)
        data["_stats"] = {"asgi": mw.stats(), "wsgi": wmw.stats()}
        mw.close()
        wmw.close()
    return lines, data


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def _check(label: str, stats: dict[str, int]) -> list[str]:
    problems = []
    delivered = stats.get("sent", 0) + stats.get("skipped_bots", 0)
    if delivered != stats.get("enqueued"):
        problems.append(f"{label}: delivered {delivered} != enqueued {stats.get('enqueued')}")
    for key in ("dropped", "errors", "rejected", "failed", "pending", "queued", "in_flight"):
        if stats.get(key):
            problems.append(f"{label}: {key} = {stats[key]}")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, default=4000, help="requests per timed run")
    parser.add_argument("--runs", type=int, default=5, help="timed runs (the median is shown)")
    parser.add_argument("--warmup", type=int, default=500, help="untimed requests first")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--profile", action="store_true", help="add the hot-path profile")
    parser.add_argument(
        "--no-peers",
        action="store_true",
        help="measure only the bare app, the floor and ours (with --profile: a quick run)",
    )
    parser.add_argument("--only", choices=("asgi", "wsgi"), help="one interface only")
    parser.add_argument(
        "--delivery-budget",
        type=float,
        default=45.0,
        metavar="SECONDS",
        help="time the worker may spend delivering the events of one interface's runs; "
        "fewer requests per run on kinds with events when it is too slow (default 45)",
    )
    args = parser.parse_args(argv)
    if args.requests < 1 or args.runs < 1 or args.warmup < 0:
        parser.error("--requests and --runs must be >= 1, --warmup >= 0")

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    began = time.monotonic()
    info = machine_info()
    info["conditions_before"] = conditions()
    interfaces = [args.only] if args.only else ["asgi", "wsgi"]
    cells: dict[str, dict[tuple[str, str], Cell]] = {}
    stacks: dict[str, list[Stack]] = {}
    stats: dict[str, dict[str, int]] = {}
    plans: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    profile_lines: list[str] = []
    profile_data: dict[str, Any] = {}
    with StandInProcess() as api:
        for interface in interfaces:
            progress(f"{interface.upper()}: {args.runs} runs x {args.requests} requests")
            make = asgi_stacks if interface == "asgi" else wsgi_stacks
            stacks[interface] = make(api, peers=not args.no_peers)
            cells[interface] = measure(
                stacks[interface],
                asgi=interface == "asgi",
                requests=args.requests,
                runs=args.runs,
                warmup=args.warmup,
                api=api,
                progress=progress,
                delivery_budget=args.delivery_budget,
                plan=plans.setdefault(interface, {}),
            )
            ours = stacks[interface][-1].ours
            _flush_ours(ours)
            ours.close()
            stats[interface] = ours.stats()
            problems += _check(f"{interface} stats", stats[interface])
            _shutdown_peers()
        if args.profile and len(interfaces) == 2:
            progress("profile")
            profile_lines, profile_data = run_profile(api, cells, stacks, 20_000)
            for interface, values in profile_data["_stats"].items():
                problems += _check(f"profile {interface} stats", values)
        accepted = api.trim()
        statuses = api.statuses()
    sent = sum(s.get("sent", 0) for s in stats.values())
    sent += sum(s.get("sent", 0) for s in profile_data.get("_stats", {}).values())
    if accepted != sent:
        problems.append(f"the stand-in accepted {accepted} events, our stats say {sent} were sent")
    if set(statuses) - {200, 201}:
        problems.append(f"the stand-in answered {statuses}")
    elapsed = time.monotonic() - began
    info["conditions_after"] = conditions()

    if args.json:
        out = {
            "machine": info,
            "requests_per_run": args.requests,
            "runs": args.runs,
            "plans": plans,
            "results": {i: as_json(stacks[i], cells[i]) for i in interfaces},
            "targets": {i: targets(i, stacks[i], cells[i]) for i in interfaces},
            "middleware_stats": stats,
            "standin": {"accepted": accepted, "statuses": statuses},
            "profile": {k: v for k, v in profile_data.items() if not k.startswith("_")},
            "problems": problems,
            "seconds": round(elapsed, 1),
        }
        print(json.dumps(out, indent=2))
        return 1 if problems else 0

    print_machine(info)
    print(
        f"Runs    median of {args.runs} runs x {args.requests} requests after {args.warmup} "
        f"warm-up, stacks taking turns every {CHUNK}; raw ASGI/WSGI calls, no sockets"
    )
    for interface, plan in plans.items():
        if plan["event_requests"] < args.requests:
            print(
                f"        {interface.upper()}: our worker delivered {plan['delivery_rate_per_s']} "
                f"events/s in a probe, so kinds where ours sends an event ran "
                f"{plan['event_requests']} requests per run (all of them delivered)"
            )
    print()
    for interface in interfaces:
        title = (
            f"ASGI: Starlette {info['packages']['starlette']}, one event loop"
            if interface == "asgi"
            else f"WSGI: Flask {info['packages']['flask']}"
        )
        for line in table(title, stacks[interface], cells[interface]):
            print(line)
    print("bg µs: CPU of other threads (our worker and senders, an exporter) per request.")
    print("otel/ours: opentelemetry-instrumentation's +p50 divided by ours on that request.")
    print(
        "p50: the median single request of all runs; other processes' noise barely moves it.\n"
        "Peers other than the floor and OpenTelemetry run on 3 kinds: their cost does not\n"
        "depend on the request kind. apitally 1.0 is OpenTelemetry's ASGI middleware plus its\n"
        "own span processing; it runs without network (its exporter sends to a closed local\n"
        "port and fails quietly in the background)."
    )
    print()
    for interface in interfaces:
        print(f"Targets, {interface.upper()} (p50 added over the bare app):")
        for line in verdict_lines(targets(interface, stacks[interface], cells[interface])):
            print(line)
    print()
    for interface in interfaces:
        shown = ", ".join(f"{k}={v}" for k, v in stats[interface].items())
        print(f"{interface.upper()} middleware stats after flush: {shown}")
    print(f"Stand-in API accepted {accepted} events; answers: {statuses}")
    for line in profile_lines:
        print(line)
    if problems:
        print("NOT HONEST: " + "; ".join(problems))
    else:
        print("OK: every enqueued event was delivered and accepted (delivered == enqueued).")
    print(f"({elapsed:.0f} s)")
    return 1 if problems else 0


def _shutdown_peers() -> None:
    """Stop background threads of the peers so they do not disturb what comes next."""
    try:
        from apitally.shared import activation

        activation.shutdown()
    except Exception:
        pass


if __name__ == "__main__":
    sys.exit(main())
