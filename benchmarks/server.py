"""Real servers under real load: agentsight-middleware in uvicorn and gunicorn, driven by wrk.

    .venv/bin/pip install -e . -r benchmarks/requirements.txt
    apt-get install -y wrk          # done by the script when run as root and wrk is missing
    .venv/bin/python benchmarks/server.py                          # about 3 minutes
    .venv/bin/python benchmarks/server.py --seconds 10 --connections 20 --json
    .venv/bin/python benchmarks/server.py --sections manual --seconds 5   # one section
    .venv/bin/python benchmarks/server.py --sections uvicorn,gunicorn,paced --rounds 3

Everything runs on this machine and talks over 127.0.0.1 only. For each server the script
starts, in their own processes:

* the stand-in AgentSight API (``python -m agentsight_middleware._standin --port P
  --api-key KEY [--latency S]``), which the middleware delivers to;
* the server: uvicorn (1 worker, its default event loop and HTTP parser) serving a
  FastAPI app, or gunicorn (1 sync worker: one request at a time, no keep-alive) serving
  a Flask app, each bare and wrapped in the middleware (``api_key=`` + ``endpoint=``,
  no tracker: events are queued and a background thread sends them);
* wrk (Debian's, ``--threads 2``, ``--connections 20`` by default, ``--seconds`` per
  row) with a Lua script that sets the method, headers and body and reports the
  percentiles as JSON.

Rows (section ``uvicorn`` and ``gunicorn``):

* ``no rule``: ``GET /api/products`` (JSON), a path that matches no rule;
* ``widget, first visit``: ``GET /`` as Chrome loads a page (accept ``text/html``,
  ``sec-fetch-dest: document``...), no cookie, so every request mints an id and
  enqueues one ``initialize`` event;
* ``chat, id in cookie``: ``POST /api/chat`` with a JSON body and the conversation id in
  the cookie (a new id per request), one ``engage`` event each.

Variant ``path only`` (widget and chat rows): the middleware with its events thrown away
where they would be queued (``BackgroundDelivery.submit`` made a no-op in the server
process), to tell the request path's cost from delivery's.

Section ``paced``: the same servers and rows under a bounded load, well below what
either serves saturated (``PACED_LOAD``: each of wrk's connections pauses
``connections / load`` between requests, with wrk's ``delay()`` hook), so that bare and
middleware are offered the same load (closed loop: a slower server gets a little less)
and their latencies compare like for like.

Section ``manual``: the AgentSight docs' manual flow, a FastAPI app whose
``POST /api/track-interaction`` (called by the page's script) calls the classic SDK's
blocking ``initialize_conversation`` inside an ``async def`` (agentsight 0.0.44 in its
own venv under ``.sdk-venvs/``, built by ``tests/sdk_env.py`` and given fastapi and
uvicorn by ``tests/apps/sdk_harness.py`` when missing), next to the middleware's
FastAPI app recording the same page views by itself (the widget first-visit row), each
with the stand-in answering at once and after 50 ms.

Per row: requests/s, p50 and p99 latency, socket errors + non-2xx answers, the ratio to
the bare row (in section ``manual``: to the SDK app at the same API latency), and the CPU
used meanwhile (100 % = one core; everything shares this machine's cores) by the server
process, by its threads other than the main one (the middleware's worker and HTTP
sender threads: the endpoints are ``async def`` and gunicorn's sync worker serves on its
main thread), by the stand-in and by wrk.

Targets, judged at the end of a run: with the middleware, at least 97 % of bare's
requests/s on widget and chat rows, 99 % on the no-rule row; in section ``paced``, p99
at most bare's + 1 ms.

Delivery check, for the middleware rows: the events the middleware enqueued during the
row, sent while wrk ran (and the rate), sent after it (the script waits up to
``--drain-seconds`` for the queues to empty), dropped at a full queue, given up, still
queued, and its background threads' CPU per event; then, once each server has stopped,
the number of requests the stand-in says it received against what the middleware (or
the SDK app) reported sent. Server logs (anything the middleware or the SDK printed) are
shown at the end. A full run takes about 5 minutes.

``--rounds N`` runs every server and row N times, in turn (all of round 1, then all of
round 2...), and reports each row as the median of its rounds; each target's verdict is
judged on the medians and lists every round's own figure (bare and middleware of the same
round compared). On this shared 2-core machine one 8 s row moves by a few percent from run
to run, and a paced p99 by about 1 ms: the size of the 99 % and +1 ms targets themselves.
"""

# No ``from __future__ import annotations`` here: FastAPI must see the real class of the
# chat endpoint's body model, which is local to fastapi_app().
import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import IO, Any

from machine import cpu_model, package_versions, verdict_lines
from standin_cli import StandInCLI

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SDK_VERSION = "0.0.44"
SECTIONS = ("uvicorn", "gunicorn", "paced", "manual")
#: Section ``paced``: the load each server is offered, well below what it serves bare or
#: with the middleware, as a site that is not saturated sees it.
PACED_LOAD = {"uvicorn": 2000.0, "gunicorn": 1000.0}
START_TIMEOUT = 30.0
COOKIE = "agentsight_conversation_id"

CHROME = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36"
)
PAGE_HEADERS = {
    "User-Agent": CHROME,
    "Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,"
    "image/apng,*/*;q=0.8,application/signed-exchange;v=b3;q=0.7",
    "Accept-Language": "en-US,en;q=0.9",
    "Accept-Encoding": "gzip, deflate, br, zstd",
    "Sec-Fetch-Dest": "document",
    "Sec-Fetch-Mode": "navigate",
    "Sec-Fetch-Site": "none",
    "Sec-Fetch-User": "?1",
    "Upgrade-Insecure-Requests": "1",
}
API_HEADERS = {
    "User-Agent": CHROME,
    "Accept": "application/json",
    "Accept-Language": "en-US,en;q=0.9",
    "Referer": "http://127.0.0.1/",
    "Sec-Fetch-Dest": "empty",
    "Sec-Fetch-Mode": "cors",
}
CHAT_HEADERS = {**API_HEADERS, "Accept": "*/*", "Content-Type": "application/json"}
CHAT_BODY = '{"message":"Hi! Do you ship to Canada?"}'

PAGE = (
    "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>Shop</title>"
    "<link rel='stylesheet' href='/static/app.css'></head><body><main>"
    + "<p>Products, prices and a chat widget.</p>" * 40
    + "</main><script src='/static/widget.js' defer></script></body></html>"
)
PRODUCTS = [{"id": i, "name": f"Product {i}", "price": 10 + i} for i in range(10)]
REPLY = "Yes, we ship to Canada: 3-5 business days."


# ---------------------------------------------------------------------------
# The apps: factories that uvicorn (--factory) and gunicorn ("server:flask_app()")
# import from this file. Configured by environment variables set by the runner.
# Module level imports stay standard-library only: the SDK venv imports this file too.
# ---------------------------------------------------------------------------


def _middleware_options() -> dict[str, Any] | None:
    if os.environ.get("BENCH_MIDDLEWARE") != "1":
        return None
    if os.environ.get("BENCH_NO_DELIVERY") == "1":
        # The "path only" rows: everything the middleware does on the request path, and
        # events thrown away where they would be queued, so that the cost of the request
        # path and the cost of delivery can be told apart.
        from agentsight_middleware._delivery import BackgroundDelivery

        BackgroundDelivery.submit = lambda self, event: None  # type: ignore[method-assign]
    return {
        "widget_pages": ["/"],
        "chat_routes": ["POST /api/chat"],
        "api_key": os.environ["BENCH_API_KEY"],
        "endpoint": os.environ["BENCH_ENDPOINT"],
        "environment": "production",
    }


def fastapi_app() -> Any:
    """The FastAPI app; wrapped in ``AgentSightMiddleware`` when BENCH_MIDDLEWARE=1."""
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse, PlainTextResponse
    from pydantic import BaseModel

    class Chat(BaseModel):
        message: str

    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    options = _middleware_options()
    holder: dict[str, Any] = {}

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return PAGE

    @app.get("/api/products")
    async def products() -> list[dict[str, Any]]:
        return PRODUCTS

    @app.post("/api/chat")
    async def chat(body: Chat) -> dict[str, str]:
        return {"reply": REPLY}

    @app.get("/health", response_class=PlainTextResponse)
    async def health() -> str:
        return "ok"

    @app.get("/_bench/stats")
    async def stats() -> dict[str, Any]:
        return _stats(holder.get("middleware"))

    if options is None:
        return app
    from agentsight_middleware import AgentSightMiddleware

    middleware = AgentSightMiddleware(app, **options)
    holder["middleware"] = middleware
    return middleware


def flask_app() -> Any:
    """The Flask app; its ``wsgi_app`` wrapped in the WSGI middleware when BENCH_MIDDLEWARE=1."""
    from flask import Flask, jsonify, request

    app = Flask(__name__)
    holder: dict[str, Any] = {}

    @app.get("/")
    def page() -> str:
        return PAGE

    @app.get("/api/products")
    def products() -> Any:
        return jsonify(PRODUCTS)

    @app.post("/api/chat")
    def chat() -> Any:
        data = request.get_json()
        if not isinstance(data, dict) or not isinstance(data.get("message"), str):
            return jsonify({"detail": "message required"}), 422
        return jsonify({"reply": REPLY})

    @app.get("/health")
    def health() -> str:
        return "ok"

    @app.get("/_bench/stats")
    def stats() -> Any:
        return jsonify(_stats(holder.get("middleware")))

    options = _middleware_options()
    if options is not None:
        from agentsight_middleware import AgentSightWSGIMiddleware

        middleware = AgentSightWSGIMiddleware(app.wsgi_app, **options)
        holder["middleware"] = middleware
        app.wsgi_app = middleware  # type: ignore[method-assign]
    return app


def _stats(middleware: Any) -> dict[str, Any]:
    stats: dict[str, Any] = dict(middleware.stats()) if middleware is not None else {}
    stats["pid"] = os.getpid()
    return stats


def sdk_app() -> Any:
    """The docs' manual flow: the page's script POSTs to ``/api/track-interaction``, whose
    ``async def`` calls the classic SDK's ``initialize_conversation`` (blocking HTTP).
    Runs under the SDK venv's interpreter; AGENTSIGHT_API_KEY / _ENDPOINT set by the runner."""
    from agentsight import ConversationTracker  # type: ignore[import-not-found]
    from fastapi import FastAPI, Request
    from fastapi.responses import PlainTextResponse

    tracker = ConversationTracker()
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    counts = {"calls": 0, "errors": 0}

    @app.post("/api/track-interaction")
    async def track_interaction(request: Request) -> dict[str, str]:
        data = await request.json()
        user_agent = request.headers.get("user-agent", "")
        counts["calls"] += 1
        try:
            tracker.initialize_conversation(
                conversation_id=data["conversation_id"],
                customer_ip_address=request.client.host if request.client else None,
                device="mobile" if "Mobi" in user_agent else "desktop",
                source="web",
                language=request.headers.get("accept-language", "").split(",")[0] or None,
                environment="production",
                metadata={"page_url": data.get("page_url"), "user_agent": user_agent},
            )
        except Exception as exc:  # a tracking failure must not fail the page's request
            counts["errors"] += 1
            return {"status": "error", "detail": type(exc).__name__}
        return {"status": "ok"}

    @app.get("/health", response_class=PlainTextResponse)
    async def health() -> str:
        return "ok"

    @app.get("/_bench/stats")
    async def stats() -> dict[str, Any]:
        return {**counts, "pid": os.getpid()}

    return app


# ---------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------


_TICK = os.sysconf("SC_CLK_TCK")


def _descendants(pid: int) -> list[int]:
    found = [pid]
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as children:
                for child in children.read().split():
                    found += _descendants(int(child))
    return found


def _ticks(path: str) -> int:
    with contextlib.suppress(OSError, IndexError, ValueError):
        with open(path, encoding="ascii") as stat:
            fields = stat.read().rpartition(")")[2].split()
        return int(fields[11]) + int(fields[12])
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its descendants (gunicorn's worker), so far."""
    return sum(_ticks(f"/proc/{each}/stat") for each in _descendants(pid)) / _TICK


def background_cpu_seconds(pid: int) -> float:
    """CPU of every thread but the main one, in the process and its descendants: in these
    servers (async endpoints, sync gunicorn worker) that is the middleware's worker and
    sender threads. Threads that have exited are not counted."""
    total = 0
    for each in _descendants(pid):
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{each}/task"):
                if int(task) != each:
                    total += _ticks(f"/proc/{each}/task/{task}/stat")
    return total / _TICK


@dataclass
class Server:
    """A server process serving on a socket bound here (no port race), with its log."""

    name: str
    proc: subprocess.Popen[bytes]
    url: str
    log: IO[bytes]

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
                return int(response.status), bytes(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def stats(self) -> dict[str, Any]:
        return dict(json.loads(self.get("/_bench/stats")[1]))

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def serve(name: str, command: list[str], env: dict[str, str]) -> Iterator[Server]:
    """Run ``command`` serving on 127.0.0.1: ``{fd}`` in it is replaced by the number of a
    listening socket bound here (no port race), ``{port}`` by a free port.

    uvicorn gets a port: its ``--fd`` takes any socket for AF_UNIX, so asyncio leaves
    Nagle's algorithm on and every keep-alive response waits ~40 ms for a delayed ACK.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    port = str(listener.getsockname()[1])
    url = f"http://127.0.0.1:{port}"
    fd = str(listener.fileno())
    if not any("{fd}" in part for part in command):
        listener.close()  # freed for the server to bind
    with contextlib.ExitStack() as stack:
        log = stack.enter_context(tempfile.TemporaryFile())
        try:
            proc = subprocess.Popen(
                [part.replace("{fd}", fd).replace("{port}", port) for part in command],
                pass_fds=[listener.fileno()] if listener.fileno() >= 0 else [],
                env=env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        finally:
            listener.close()
        server = Server(name, proc, url, log)
        stack.callback(server.stop)

        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{server.output()}")
            with contextlib.suppress(OSError):
                if server.get("/health", 1.0)[0] == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start in {START_TIMEOUT:g} s")
            time.sleep(0.05)
        yield server


def uvicorn_command(python: str, factory: str) -> list[str]:
    return [
        python,
        "-m",
        "uvicorn",
        "--host",
        "127.0.0.1",
        "--port",
        "{port}",
        "--factory",
        "--app-dir",
        str(HERE),
        f"server:{factory}",
        "--workers",
        "1",
        "--no-access-log",
        "--log-level",
        "warning",
        "--timeout-graceful-shutdown",
        "10",
    ]


def gunicorn_command(python: str) -> list[str]:
    return [
        python,
        "-m",
        "gunicorn",
        "--bind",
        "fd://{fd}",
        "--workers",
        "1",
        "--worker-class",
        "sync",
        "--backlog",
        "1024",
        "--chdir",
        str(HERE),
        "--log-level",
        "warning",
        "--graceful-timeout",
        "10",
        "server:flask_app()",
    ]


# ---------------------------------------------------------------------------
# wrk
# ---------------------------------------------------------------------------

_LUA = r"""
-- Written by benchmarks/server.py. Sets the request, makes a fresh conversation id per
-- request where __ID__ appears, and prints the result as one JSON line.
local threads = {}
local counter = 1
function setup(thread)
  thread:set("tid", counter)
  table.insert(threads, thread)
  counter = counter + 1
end

wrk.method = __METHOD__
wrk.path = __PATH__
wrk.body = __BODY__
wrk.headers = __HEADERS__
local dynamic = __DYNAMIC__
local n = 0
-- Paced rows: each connection waits this long (ms) before its next request, which
-- bounds the load offered instead of sending as fast as the server answers.
local pace = __PACE__
if pace > 0 then
  function delay()
    return pace
  end
end

function request()
  if not dynamic then
    return wrk.format()
  end
  n = n + 1
  local id = string.format("conv_%x%011x", tid, n)
  local headers = {}
  for k, v in pairs(wrk.headers) do
    headers[k] = string.gsub(v, "__ID__", id)
  end
  local body = wrk.body and string.gsub(wrk.body, "__ID__", id) or nil
  return wrk.format(nil, nil, headers, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"bench":1,"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,'
    .. '"write":%d,"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,'
    .. '"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, latency.mean))
end
"""


def _lua_string(text: str | None) -> str:
    if text is None:
        return "nil"
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True)
class Kind:
    """One kind of request, as wrk sends it."""

    key: str
    label: str
    method: str
    path: str
    headers: dict[str, str]
    body: str | None = None

    @property
    def dynamic(self) -> bool:
        return "__ID__" in (self.body or "") or any("__ID__" in v for v in self.headers.values())

    def lua(self, pace_ms: int = 0) -> str:
        pairs = (f"[{_lua_string(k)}] = {_lua_string(v)}" for k, v in self.headers.items())
        headers = "{" + ", ".join(pairs) + "}"
        return (
            _LUA.replace("__METHOD__", _lua_string(self.method))
            .replace("__PATH__", _lua_string(self.path))
            .replace("__BODY__", _lua_string(self.body))
            .replace("__HEADERS__", headers)
            .replace("__DYNAMIC__", "true" if self.dynamic else "false")
            .replace("__PACE__", str(pace_ms))
        )

    def example(self, n: int) -> tuple[str, dict[str, str], bytes | None]:
        """The same request for a warm-up (ids made here)."""
        cid = f"conv_ff{n:010x}"
        headers = {k: v.replace("__ID__", cid) for k, v in self.headers.items()}
        body = self.body.replace("__ID__", cid).encode() if self.body else None
        return self.method, headers, body


NO_RULE = Kind("no_rule", "no rule: GET /api/products", "GET", "/api/products", API_HEADERS)
WIDGET = Kind("widget", "widget, first visit: GET /", "GET", "/", PAGE_HEADERS)
CHAT = Kind(
    "chat",
    "chat, id in cookie: POST /api/chat",
    "POST",
    "/api/chat",
    {**CHAT_HEADERS, "Cookie": f"{COOKIE}=__ID__; theme=dark"},
    CHAT_BODY,
)
TRACK = Kind(
    "track",
    "manual: POST /api/track-interaction",
    "POST",
    "/api/track-interaction",
    {**API_HEADERS, "Content-Type": "application/json"},
    '{"conversation_id":"__ID__","page_url":"http://127.0.0.1/"}',
)


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() != 0:
        sys.exit("wrk is not installed: `sudo apt-get install -y wrk` (Debian/Ubuntu), then again")
    print("wrk is missing: apt-get install -y wrk", file=sys.stderr, flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    done = subprocess.run(["apt-get", "install", "-y", "wrk"], env=env, capture_output=True)
    if done.returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, check=False)
        subprocess.run(["apt-get", "install", "-y", "wrk"], env=env, capture_output=True)
    found = shutil.which("wrk")
    if not found:
        sys.exit("could not install wrk with apt-get; install it and run again")
    return found


def run_wrk(
    wrk: str,
    url: str,
    kind: Kind,
    seconds: float,
    connections: int,
    threads: int,
    tmp: Path,
    pace_ms: int = 0,
) -> dict[str, Any]:
    """Run wrk; the JSON line its ``done()`` printed."""
    script = tmp / f"{kind.key}.lua"
    script.write_text(kind.lua(pace_ms))
    command = [
        wrk,
        "--threads",
        str(threads),
        "--connections",
        str(connections),
        "--duration",
        f"{seconds:g}s",
        "--timeout",
        "10s",
        "--script",
        str(script),
        url + kind.path,
    ]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=seconds + 60)
    for line in out.splitlines():
        if line.startswith('{"bench"'):
            return dict(json.loads(line))
    raise RuntimeError(f"wrk printed no result:\n{out}")


def _children_cpu() -> float:
    usage = os.times()
    return usage.children_user + usage.children_system


def warm_up(server: Server, kinds: list[Kind], count: int = 30) -> None:
    """A few requests of each kind: imports, first-use caches, the worker's start."""
    for n in range(count):
        for kind in kinds:
            method, headers, body = kind.example(n)
            request = urllib.request.Request(
                server.url + kind.path, data=body, headers=headers, method=method
            )
            with urllib.request.urlopen(request, timeout=10) as response:
                response.read()


# ---------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------


@dataclass
class Row:
    section: str
    stack: str
    variant: str  # "bare", "middleware", "manual (SDK)"
    kind: str
    label: str
    api_latency_ms: float | None = None
    #: Paced rows: the load offered (requests/s at most); 0 = as fast as answered.
    offered: float = 0.0
    rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    requests: int = 0
    errors: int = 0
    non_2xx: int = 0
    ratio: float | None = None
    server_cpu: float = 0.0
    background_cpu: float = 0.0
    api_cpu: float = 0.0
    wrk_cpu: float = 0.0
    events: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    #: With --rounds: which round measured it; on a merged row, each round's figures.
    round: int = 0
    rounds: list[dict[str, float]] = field(default_factory=list)


def _delta(after: dict[str, Any], before: dict[str, Any], key: str) -> int:
    return int(after.get(key, 0)) - int(before.get(key, 0))


def wait_drained(server: Server, seconds: float) -> tuple[dict[str, Any], float, bool]:
    """Poll the middleware's stats until nothing is queued, pending or in flight."""
    started = time.monotonic()
    while True:
        stats = server.stats()
        idle = not stats.get("queued") and not stats.get("pending") and not stats.get("in_flight")
        elapsed = time.monotonic() - started
        if idle or elapsed >= seconds:
            return stats, elapsed, idle
        time.sleep(0.1)


def measure(
    server: Server,
    standin: StandInCLI,
    kind: Kind,
    row: Row,
    args: argparse.Namespace,
    wrk: str,
    tmp: Path,
) -> Row:
    tracked = row.variant == "middleware"
    before = server.stats()
    cpu_server, cpu_api = cpu_seconds(server.proc.pid), cpu_seconds(standin.proc.pid)
    cpu_background = background_cpu_seconds(server.proc.pid)
    cpu_children = _children_cpu()
    started = time.monotonic()
    pace_ms = max(1, round(args.connections / row.offered * 1000)) if row.offered else 0
    result = run_wrk(
        wrk, server.url, kind, args.seconds, args.connections, args.threads, tmp, pace_ms
    )
    wall = time.monotonic() - started
    after_load = server.stats()
    row.server_cpu = (cpu_seconds(server.proc.pid) - cpu_server) / wall * 100
    background = background_cpu_seconds(server.proc.pid) - cpu_background
    row.background_cpu = background / wall * 100
    row.api_cpu = (cpu_seconds(standin.proc.pid) - cpu_api) / wall * 100
    row.wrk_cpu = (_children_cpu() - cpu_children) / wall * 100
    seconds = result["duration_us"] / 1e6
    row.requests = result["requests"]
    row.rps = result["requests"] / seconds
    row.p50_ms = result["p50_us"] / 1000
    row.p99_ms = result["p99_us"] / 1000
    row.errors = result["connect"] + result["read"] + result["write"] + result["timeout"]
    row.non_2xx = result["status"]
    if tracked:
        drained, waited, idle = wait_drained(server, args.drain_seconds)
        events = {
            "enqueued": _delta(after_load, before, "enqueued"),
            "sent_during_load": _delta(after_load, before, "sent"),
            "sent_after_load": _delta(drained, after_load, "sent"),
            "dropped": _delta(drained, before, "dropped"),
            "failed": _delta(drained, before, "failed") + _delta(drained, before, "errors"),
            "rejected": _delta(drained, before, "rejected"),
            "retried": _delta(drained, before, "retried"),
            # Where the backlog was when wrk stopped: the intake queue (not yet taken by the
            # worker) or the outbox (built, waiting for a sender).
            "intake_at_end_of_load": int(after_load.get("queued", 0)),
            "outbox_at_end_of_load": int(after_load.get("pending", 0)),
            "left_queued": int(drained.get("queued", 0)) + int(drained.get("pending", 0)),
            "drain_seconds": round(waited, 1),
            "drained": idle,
        }
        events["delivery_rate_during_load"] = round(events["sent_during_load"] / seconds, 1)
        # The middleware's threads' CPU per event they handled while wrk ran.
        handled = max(events["sent_during_load"], 1)
        events["background_cpu_ms_per_event"] = round(background / handled * 1000, 2)
        row.events = events
    elif row.variant == SDK:
        stats_after = server.stats()
        row.events = {
            "sdk_calls": _delta(stats_after, before, "calls"),
            "sdk_errors": _delta(stats_after, before, "errors"),
        }
    return row


# Start-up chatter, not warnings: uvicorn's banner, the classic SDK's INFO lines.
_QUIET_LOG = ("Press CTRL+C", "successfully initialized")


def app_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENTSIGHT_", "BENCH_"))}
    env.update({"PYTHONUNBUFFERED": "1", "NO_PROXY": "*", "no_proxy": "*"})
    env.update(extra)
    return env


@dataclass
class ServerRun:
    """One server process: its rows, the stand-in's count, what its log said."""

    name: str
    rows: list[Row]
    standin_received: int | None = None
    middleware_sent: int | None = None
    middleware_pending: int | None = None
    log: list[str] = field(default_factory=list)


@dataclass
class Plan:
    """One server to start, and the rows to measure on it."""

    section: str
    stack: str
    variant: str  # "bare", "middleware" or SDK
    command: list[str]
    kinds: list[Kind]
    latency: float = 0.0  # the stand-in's, seconds
    offered: float = 0.0  # requests/s offered in paced rows; 0 = saturating


VARIANTS = ("bare", "middleware")
SDK = "manual (SDK)"
PATH_ONLY = "path only"


def run_server(
    plan: Plan, *, args: argparse.Namespace, wrk: str, tmp: Path, progress: Callable[[str], None]
) -> ServerRun:
    section, stack, variant, latency = plan.section, plan.stack, plan.variant, plan.latency
    standin = StandInCLI(latency)
    name = f"{stack} {variant}" + (f", API +{latency * 1000:.0f} ms" if latency else "")
    run = ServerRun(name, [])
    try:
        full_env = app_env(
            {
                "BENCH_API_KEY": standin.api_key,
                "BENCH_ENDPOINT": standin.url,
                "BENCH_MIDDLEWARE": "1" if variant in ("middleware", PATH_ONLY) else "0",
                "BENCH_NO_DELIVERY": "1" if variant == PATH_ONLY else "0",
            }
        )
        if variant == SDK:
            # The classic SDK reads its configuration from the environment.
            full_env.update(
                {"AGENTSIGHT_API_KEY": standin.api_key, "AGENTSIGHT_API_ENDPOINT": standin.url}
            )
        with serve(name, plan.command, full_env) as server:
            warm_up(server, plan.kinds)
            if variant == "middleware":
                wait_drained(server, args.drain_seconds)
            for kind in plan.kinds:
                progress(f"  {name}: {kind.label} ({args.seconds:g} s)")
                row = Row(
                    section, stack, variant, kind.key, kind.label, latency * 1000, plan.offered
                )
                run.rows.append(measure(server, standin, kind, row, args, wrk, tmp))
            if variant == "middleware":
                last = server.stats()
                run.middleware_sent = int(last.get("sent", 0)) + int(last.get("rejected", 0))
                run.middleware_pending = int(last.get("queued", 0)) + int(last.get("pending", 0))
            elif variant == SDK:
                run.middleware_sent = int(server.stats().get("calls", 0))
            server.stop()
            run.log = [
                line
                for line in server.output().splitlines()
                if line.strip() and not any(quiet in line for quiet in _QUIET_LOG)
            ]
    finally:
        run.standin_received = standin.stop()
    return run


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def machine(wrk: str, sdk_python: str | None) -> dict[str, Any]:
    model = cpu_model()
    packages = package_versions(
        (
            "agentsight-middleware",
            "uvicorn",
            "gunicorn",
            "fastapi",
            "starlette",
            "pydantic",
            "flask",
            "werkzeug",
            "httpx",
            "httpcore",
            "h11",
            "uvloop",
            "httptools",
        )
    )
    version = subprocess.run([wrk, "--version"], capture_output=True, text=True, check=False)
    sdk = None
    if sdk_python:
        code = "import importlib.metadata as m; print(m.version('agentsight'))"
        probe = subprocess.run(
            [sdk_python, "-I", "-c", code], capture_output=True, text=True, check=False
        )
        sdk = probe.stdout.strip() or None
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "load_1min": round(os.getloadavg()[0], 2),
        "wrk": (version.stdout + version.stderr).splitlines()[0].strip(),
        "agentsight_sdk": sdk,
        "packages": packages,
    }


def merge_rounds(rows: list[Row]) -> list[Row]:
    """One row per (section, server, variant, request, API latency): the median of its
    rounds' requests/s, latencies and CPU, each round's figures kept in ``rounds``."""
    groups: dict[tuple[Any, ...], list[Row]] = {}
    for row in rows:
        key = (row.section, row.stack, row.variant, row.kind, row.api_latency_ms, row.offered)
        groups.setdefault(key, []).append(row)
    merged = []
    for samples in groups.values():
        first = samples[0]
        if len(samples) == 1:
            merged.append(first)
            continue
        row = replace(
            first,
            rps=statistics.median(r.rps for r in samples),
            p50_ms=statistics.median(r.p50_ms for r in samples),
            p99_ms=statistics.median(r.p99_ms for r in samples),
            requests=sum(r.requests for r in samples),
            errors=sum(r.errors for r in samples),
            non_2xx=sum(r.non_2xx for r in samples),
            server_cpu=statistics.median(r.server_cpu for r in samples),
            background_cpu=statistics.median(r.background_cpu for r in samples),
            api_cpu=statistics.median(r.api_cpu for r in samples),
            wrk_cpu=statistics.median(r.wrk_cpu for r in samples),
            rounds=[{"rps": r.rps, "p50_ms": r.p50_ms, "p99_ms": r.p99_ms} for r in samples],
        )
        merged.append(row)
    return merged


def fill_ratios(rows: list[Row]) -> None:
    bare = {(r.section, r.stack, r.kind): r.rps for r in rows if r.variant == "bare"}
    for row in rows:
        base = bare.get((row.section, row.stack, row.kind))
        if row.variant != "bare" and base:
            row.ratio = row.rps / base


def print_table(rows: list[Row], args: argparse.Namespace) -> None:
    head = (
        f"{'server':<16}{'variant':<12}{'API':>6}  {'request':<37}{'req/s':>8}{'p50 ms':>9}"
        f"{'p99 ms':>9}{'err':>6}{'x bare':>8}{'srv%':>6}{'bg%':>5}{'api%':>6}{'wrk%':>6}"
    )
    print(head)
    print("-" * len(head))
    for row in rows:
        api = f"{row.api_latency_ms:.0f}ms" if row.variant not in ("bare", PATH_ONLY) else "-"
        ratio = f"{row.ratio:.2f}" if row.ratio is not None else "-"
        errors = row.errors + row.non_2xx
        print(
            f"{row.stack:<16}{row.variant:<12}{api:>6}  {row.label[:36]:<37}{row.rps:>8,.0f}"
            f"{row.p50_ms:>9.2f}{row.p99_ms:>9.1f}{errors:>6}{ratio:>8}{row.server_cpu:>6.0f}"
            f"{row.background_cpu:>5.0f}"
            f"{row.api_cpu:>6.0f}{row.wrk_cpu:>6.0f}"
        )


def server_targets(rows: list[Row]) -> list[dict[str, Any]]:
    """The real-server targets: requests/s against bare when saturated (tracked routes
    97 %, others 99 %), and p99 at most bare's + 1 ms under the paced load."""
    out: list[dict[str, Any]] = []
    for row in rows:
        if row.variant not in ("middleware", PATH_ONLY) or row.section == "manual":
            continue
        bare = next(
            (r for r in rows if (r.section, r.stack, r.kind, r.variant)
             == (row.section, row.stack, row.kind, "bare")),
            None,
        )  # fmt: skip
        if bare is None or not bare.rps:
            continue
        what = f"{row.stack} {row.variant}, {row.label.split(':')[0]}"
        # Round by round (bare and middleware of the same round side by side): the
        # spread says how much of the verdict is this machine's noise.
        pairs = list(zip(row.rounds, bare.rounds, strict=False))
        if row.section == "paced":
            spread = ", ".join(f"{m['p99_ms'] - b['p99_ms']:+.1f}" for m, b in pairs)
            out.append(
                {"target": f"paced, {what}: p99 at most bare + 1 ms",
                 "reached": f"{row.p99_ms:.1f} vs {bare.p99_ms:.1f} ms"
                 + (f" (each round, over bare: {spread} ms)" if pairs else ""),
                 "met": row.p99_ms <= bare.p99_ms + 1.0}
            )  # fmt: skip
        else:
            least = 0.99 if row.kind == NO_RULE.key else 0.97
            spread = ", ".join(f"{m['rps'] / b['rps']:.2f}" for m, b in pairs if b["rps"])
            out.append(
                {"target": f"{what}: at least {least:.2f}x bare requests/s",
                 "reached": f"{row.rps / bare.rps:.2f}x"
                 + (f" (each round: {spread})" if pairs else ""),
                 "met": row.rps >= least * bare.rps}
            )  # fmt: skip
    return out


def print_delivery(runs: list[ServerRun]) -> None:
    print(
        "Delivery check: events enqueued during the row, sent while wrk ran ('sent in', at "
        "'ev/s'), sent 'after' it, dropped at a full queue, failed; the backlog when wrk "
        "stopped, in the 'intake' queue (not yet taken by the worker) and the 'outbox' (waiting "
        "for a sender); 'left' after waiting 'drain s'; the middleware threads' CPU per event."
    )
    head = (
        f"{'server / row':<52}{'enqueued':>9}{'sent in':>9}{'ev/s':>7}{'after':>8}"
        f"{'dropped':>9}{'failed':>7}{'intake':>8}{'outbox':>8}{'left':>7}{'drain s':>8}"
        f"{'bg ms/ev':>9}"
    )
    print(head)
    print("-" * len(head))
    for run in runs:
        for row in run.rows:
            if not row.events or "enqueued" not in row.events:
                continue
            e = row.events
            print(
                f"{(run.name + ': ' + row.kind)[:51]:<52}{e['enqueued']:>9,}"
                f"{e['sent_during_load']:>9,}{e['delivery_rate_during_load']:>7,.0f}"
                f"{e['sent_after_load']:>8,}{e['dropped']:>9,}{e['failed']:>7,}"
                f"{e['intake_at_end_of_load']:>8,}{e['outbox_at_end_of_load']:>8,}"
                f"{e['left_queued']:>7,}{e['drain_seconds']:>8.1f}"
                f"{e['background_cpu_ms_per_event'] if e['enqueued'] else 0:>9.2f}"
            )
    print()
    for run in runs:
        if run.middleware_sent is None:
            continue
        what = "SDK calls" if SDK in run.name else "events reported sent"
        received = "?" if run.standin_received is None else f"{run.standin_received:,}"
        verdict = ""
        if run.standin_received is not None:
            gap = run.standin_received - run.middleware_sent
            if gap == 0 and not run.middleware_pending:
                verdict = "OK: all received"
            elif run.middleware_pending:
                verdict = (
                    f"{run.middleware_pending:,} still queued when the server stopped; "
                    f"{gap:+,} more arrived during its shutdown"
                )
            else:
                verdict = f"difference {gap:+,}"
        print(
            f"  {run.name:<44} stand-in received {received:>8} / {what} "
            f"{run.middleware_sent:,} (incl. warm-up)  {verdict}"
        )


def print_logs(runs: list[ServerRun]) -> None:
    noisy = [run for run in runs if run.log]
    if not noisy:
        print("Server logs: nothing at WARNING or above.")
        return
    print("Server logs (WARNING and above; repeated lines counted):")
    for run in noisy:
        counts: dict[str, int] = {}
        for line in run.log:
            counts[line] = counts.get(line, 0) + 1
        print(f"  {run.name}:")
        for line, count in list(counts.items())[:12]:
            print(f"    {line[:150]}" + (f"  (x{count})" if count > 1 else ""))
        if len(counts) > 12:
            print(f"    ... {len(counts) - 12} more distinct lines")


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def sdk_interpreter(progress: Callable[[str], None]) -> str | None:
    """The agentsight==0.0.44 venv's python with fastapi + uvicorn (built when missing)."""
    sys.path.insert(0, str(ROOT))
    try:
        from tests.apps.sdk_harness import app_python
        from tests.sdk_env import SDKEnvironmentError

        progress(f"checking the SDK venv (agentsight=={SDK_VERSION}); built on first use")
        try:
            return str(app_python(SDK_VERSION))
        except SDKEnvironmentError as exc:
            progress(f"the SDK venv could not be built: {exc}")
            return None
    finally:
        sys.path.remove(str(ROOT))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="wrk duration per row")
    parser.add_argument("--connections", type=int, default=20, help="wrk connections")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument(
        "--drain-seconds",
        type=float,
        default=5.0,
        help="after a middleware row, wait at most this long for the queue to empty",
    )
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"any of {', '.join(SECTIONS)}"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every server and row this many times, in turn; each row is the median of "
        "its rounds, and each target shows every round's figure",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s): {', '.join(sorted(unknown))}")
    if args.connections < args.threads:
        parser.error("--connections must be >= --threads")

    def progress(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    wrk = ensure_wrk()
    sdk_python = sdk_interpreter(progress) if "manual" in sections else None
    info = machine(wrk, sdk_python)
    packages = ", ".join(f"{k} {v}" for k, v in info["packages"].items() if v)
    missing = [k for k, v in info["packages"].items() if not v]
    print(f"CPU      {info['cpu']}, {info['cores']} cores (shared by servers, stand-in and wrk)")
    print(f"Python   {info['python']} on {info['platform']}; 1-min load {info['load_1min']}")
    print(f"Packages {packages}" + (f"; not installed: {', '.join(missing)}" if missing else ""))
    print(f"wrk      {info['wrk']}; classic SDK agentsight {info['agentsight_sdk'] or '-'}")
    print(
        "Servers  uvicorn: 1 worker; gunicorn: 1 worker, sync worker class (no keep-alive: "
        "wrk reconnects for every request)"
    )
    print(flush=True)

    python = sys.executable
    kinds = [NO_RULE, WIDGET, CHAT]
    plans: list[Plan] = []
    if "uvicorn" in sections:
        command = uvicorn_command(python, "fastapi_app")
        plans += [Plan("uvicorn", "uvicorn+FastAPI", v, command, kinds) for v in VARIANTS]
        plans.append(Plan("uvicorn", "uvicorn+FastAPI", PATH_ONLY, command, [WIDGET, CHAT]))
    if "gunicorn" in sections:
        command = gunicorn_command(python)
        plans += [Plan("gunicorn", "gunicorn+Flask", v, command, kinds) for v in VARIANTS]
        plans.append(Plan("gunicorn", "gunicorn+Flask", PATH_ONLY, command, [WIDGET, CHAT]))
    if "paced" in sections:
        for stack, command, load in (
            ("uvicorn+FastAPI", uvicorn_command(python, "fastapi_app"), PACED_LOAD["uvicorn"]),
            ("gunicorn+Flask", gunicorn_command(python), PACED_LOAD["gunicorn"]),
        ):
            plans += [Plan("paced", stack, v, command, kinds, offered=load) for v in VARIANTS]
            plans.append(Plan("paced", stack, PATH_ONLY, command, [WIDGET, CHAT], offered=load))
    if "manual" in sections:
        for latency in (0.0, 0.05):
            if sdk_python:
                command = uvicorn_command(sdk_python, "sdk_app")
                plans.append(
                    Plan("manual", "uvicorn+FastAPI", SDK, command, [TRACK], latency=latency)
                )
            command = uvicorn_command(python, "fastapi_app")
            plans.append(
                Plan("manual", "uvicorn+FastAPI", "middleware", command, [WIDGET], latency=latency)
            )
    runs: list[ServerRun] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmpdir:
        for round_ in range(args.rounds):
            for plan in plans:
                where = f"round {round_ + 1}/{args.rounds}: " if args.rounds > 1 else ""
                progress(f"{where}{plan.stack} {plan.variant} (API +{plan.latency * 1000:.0f} ms)")
                run = run_server(plan, args=args, wrk=wrk, tmp=Path(tmpdir), progress=progress)
                for row in run.rows:
                    row.round = round_
                runs.append(run)
    elapsed = time.monotonic() - started
    rows = merge_rounds([row for run in runs for row in run.rows])
    fill_ratios(rows)
    for row in rows:
        if row.section == "manual":
            # Within the manual section, the middleware rows compare to the SDK at the same
            # API latency: how many more page views per second the app serves.
            sdk = [
                r
                for r in rows
                if r.section == "manual"
                and r.variant == SDK
                and r.api_latency_ms == row.api_latency_ms
            ]
            is_sdk = row.variant == SDK
            row.ratio = None if is_sdk or not sdk else row.rps / sdk[0].rps
    info["load_1min_end"] = round(os.getloadavg()[0], 2)

    print(
        f"wrk --threads {args.threads} --connections {args.connections} --duration "
        f"{args.seconds:g}s per row. err = socket errors + non-2xx answers. CPU, % of one core "
        "during the row: srv = the server process (all threads), bg = its threads other than "
        "the main one (the middleware's worker and HTTP senders), api = the stand-in, wrk = "
        "the load generator. All share the same cores.\n"
    )
    for section in sections:
        chosen = [r for r in rows if r.section == section]
        if not chosen:
            continue
        print(
            {
                "uvicorn": "== uvicorn (1 worker) + FastAPI ==",
                "gunicorn": "== gunicorn (1 sync worker) + Flask ==",
                "paced": "== Paced, as a site that is not saturated sees it: each wrk "
                "connection pauses between requests, offering at most "
                f"{PACED_LOAD['uvicorn']:,.0f} req/s to uvicorn and "
                f"{PACED_LOAD['gunicorn']:,.0f} to gunicorn; compare the latencies ==",
                "manual": "== The docs' manual flow (classic SDK in an async def) vs the "
                "middleware; 'x bare' here = x the SDK app at the same API latency ==",
            }[section]
        )
        print_table(chosen, args)
        print()
    verdicts = server_targets(rows)
    if verdicts:
        print("Targets (the 'path only' rows show what the request path alone reaches):")
        for line in verdict_lines(verdicts):
            print(line)
        print()
    print_delivery(runs)
    print()
    print_logs(runs)
    print(
        f"\nTotal {elapsed:.0f} s; 1-min load {info['load_1min']} at start, "
        f"{info['load_1min_end']} at end"
    )
    if args.json:
        document = {
            "machine": info,
            "options": vars(args),
            "rows": [asdict(row) for row in rows],
            "targets": verdicts,
            "servers": [
                {
                    "name": run.name,
                    "standin_received": run.standin_received,
                    "middleware_sent": run.middleware_sent,
                    "middleware_pending": run.middleware_pending,
                    "log": run.log[:50],
                }
                for run in runs
            ],
        }
        print(json.dumps(document, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
