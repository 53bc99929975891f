from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from playwright.sync_api import Browser, sync_playwright

from agentsight_middleware.testing import RecordingTracker, StandInAgentSightAPI

CHROME_DESKTOP = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36"
)
IPHONE = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1"
)
#: A desktop Chrome on Linux, for the browser tests: headless Chromium's own user agent
#: says HeadlessChrome, whose page views are not counted (no one there to chat).
CHROME_LINUX = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/156.0.0.0 Safari/537.36"
)
GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"

#: What Chrome sends when the user navigates to a page.
BROWSER = {
    "user-agent": CHROME_DESKTOP,
    "accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
    "accept-language": "en-us,en;q=0.9,fr;q=0.5",
    "sec-fetch-dest": "document",
    "sec-fetch-mode": "navigate",
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def tracker() -> RecordingTracker:
    return RecordingTracker()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# What the workplace's probe found necessary: no sandbox as root, and no
# background traffic to hosts this closed network cannot reach.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def unbuilt_parser(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """This process as one that has not built the user-agent parser yet; the names of the
    threads that build it from now on."""
    from agentsight_middleware import _device

    build = _device._build
    builders: list[str] = []

    def recorded() -> Any:
        builders.append(threading.current_thread().name)
        return build()

    monkeypatch.setattr(_device, "_engine", None)
    monkeypatch.setattr(_device, "_build", recorded)
    _device._classify.cache_clear()  # no agent classified yet: each asks for the parser
    yield builders
    _device._lock.acquire()  # a build still under way ends before the next test
    _device._lock.release()


def wait_for_the_parser(client: httpx.Client) -> None:
    """Until the app's ``/parser`` (see tests.apps.parser_app) says the user-agent parser is
    built; fails after 10 s."""
    deadline = time.monotonic() + 10
    while (state := client.get("/parser").text.split()[0]) != "built":
        assert time.monotonic() < deadline, f"the user-agent parser is {state!r}, not built"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if CHROMIUM is None:
        pytest.fail("Debian's chromium is not installed: apt-get install chromium (.ci/run does)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def uvicorn_server(app: Any, **options: Any) -> Iterator[str]:
    """Serve ``app`` with a real uvicorn on a free 127.0.0.1 port; yields its base URL.
    ``options`` are more ``uvicorn.Config`` arguments."""
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", **options)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@contextmanager
def gunicorn_outbox_app(
    tmp_path: Path, api: StandInAgentSightAPI, workers: int, **env: str
) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    """gunicorn serving ``tests.apps.outbox_app:flask_app()`` with ``workers`` workers, their
    outbox ``tmp_path / "outbox.sqlite3"``, delivering to ``api``; yields (url, the master
    process, its log) once it serves, and stops it after. ``env`` is added to its
    environment."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    log = tmp_path / "gunicorn.log"
    environ = {
        **os.environ,
        "AGENTSIGHT_API_KEY": api.api_key,
        "AGENTSIGHT_API_ENDPOINT": api.url,
        "AGENTSIGHT_TEST_OUTBOX": str(tmp_path / "outbox.sqlite3"),
        **env,
    }
    command = [
        sys.executable, "-m", "gunicorn", "-w", str(workers), "-b", f"127.0.0.1:{port}",
        "tests.apps.outbox_app:flask_app()",
    ]  # fmt: skip
    with log.open("wb") as out:
        server = subprocess.Popen(
            command, env=environ, cwd=Path(__file__).resolve().parent.parent, stdout=out, stderr=out
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(url, server, log)
        yield url, server, log
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            server.wait(30)


def gunicorn_workers(master: int) -> set[int]:
    """The pids of a gunicorn master's workers (Linux: read from /proc)."""
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return {int(pid) for pid in children}


def wait_until_serving(url: str, server: subprocess.Popen[bytes], log: Path) -> None:
    """Wait (30 s at most) until a server started in ``server`` answers at ``url`` (any
    status); if it exits or never answers, fail with its log (``log``)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(f"{url}/missing", timeout=0.5)
            return
        except httpx.TransportError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start:\n{log.read_text()}") from None
            time.sleep(0.05)


@contextmanager
def website_answering_200() -> Iterator[str]:
    """A real server that answers every POST with 200 and a web page, as a site's
    catch-all route (or a captive portal) at a mistyped API endpoint does; yields its URL."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Website(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["content-length"]))
            body = b"<!doctype html><p>Welcome to our shop</p>"
            self.send_response(200)
            self.send_header("content-type", "text/html")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    with serving(ThreadingHTTPServer(("127.0.0.1", 0), Website)) as url:
        yield url


@contextmanager
def serving(server: Any) -> Iterator[str]:
    """Run a ``socketserver``-style server (``http.server``, Werkzeug's ``make_server``)
    on 127.0.0.1 in a thread; yields its base URL, and stops it after."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


_OURS = "agentsight_conversation_id="
#: (cookie the request carries, the app's own Set-Cookie, page views reported as
#: (id, id_source)): the app's own id cookie is never overridden (ASGI and WSGI).
APP_COOKIE_CASES = [
    # A first visit that the app gives a conversation of its own (a signed-in visitor).
    pytest.param(None, _OURS + "conv_restored0001; Path=/", [("conv_restored0001", "app")],
                 id="first-visit"),
    # A returning visitor whose id the app re-sets as it is: nothing new.
    pytest.param("conv_known0000001", _OURS + "conv_known0000001; Path=/", [], id="same-id"),
    # A returning visitor the app moves to another conversation: that one is new.
    pytest.param("conv_known0000001", _OURS + "conv_moved0000001; Path=/",
                 [("conv_moved0000001", "app")], id="another-id"),
    # The app deletes the cookie: no id of ours goes back, and nothing is counted.
    pytest.param(None, _OURS + "; Max-Age=0; Path=/", [], id="deleted"),
]  # fmt: skip


def check_shared_cache_outcome(
    answers: list[Any],
    cache_control: list[str],
    tracked: bool,
    middleware: Any,
    tracker: RecordingTracker,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two page loads of a widget page sent with ``cache_control``: a page for shared
    caches is left as it is (no cookie, no view) and said once; any other is tracked."""
    sent = [value for value in cache_control if ": " not in value]  # not the CDN headers
    assert [answer.headers.get_list("cache-control") for answer in answers] == [sent] * 2
    cookies = [answer.headers.get("set-cookie") for answer in answers]
    warned = [r for r in caplog.records if "shared caches" in r.getMessage()]
    if tracked:
        assert all(cookie and cookie.startswith(_OURS) for cookie in cookies)
        tracker.wait_for(initialized=1)
        assert warned == []
    else:
        assert cookies == [None, None]
        assert middleware.flush(5)
        assert tracker.initialized == []
        assert len(warned) == 1  # once, not on every page view
        assert warned[0].levelname == "WARNING"
        assert "Cache-Control: no-cache" in warned[0].getMessage()


def outbox_rows(path: Path) -> int:
    """Events in an outbox file: 0 before it exists, or before its table does."""
    if not path.exists():
        return 0
    with contextlib.closing(sqlite3.connect(path, timeout=5)) as conn:
        try:
            return int(conn.execute("SELECT count(*) FROM outbox").fetchone()[0])
        except sqlite3.OperationalError:  # the table is not created yet
            return 0


def in_forked_child(work: Callable[[], bytes], *, timeout: float = 20.0) -> bytes:
    """What ``work`` returns when run in a thread of a child forked now; b"" when it
    raises or does not return within ``timeout`` (a lock held at the fork by a thread
    the child does not have: the child's next use of it hangs)."""
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
        pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            told: list[bytes] = []
            thread = threading.Thread(target=lambda: told.append(work()), daemon=True)
            thread.start()
            thread.join(timeout)
            if told:
                os.write(write_end, told[0])
        finally:
            os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    with open(read_end, "rb") as pipe:
        return pipe.read()
