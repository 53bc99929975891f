"""The middleware under the servers the other tests do not run: Hypercorn (HTTP/1.1, HTTP/2
over TLS, its trio worker; a plain ASGI app and Quart), Daphne, waitress and gunicorn's
gthread worker. Each serves a page view, chats whose id comes from the cookie, a header
and the JSON body, bodies the app gets byte for byte, a stream of server-sent events, and
delivers what is still queued when it is stopped as it is in production (SIGTERM)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trustme

from agentsight_middleware.testing import StandInAgentSightAPI

from .apps.servers_app import PAGE
from .conftest import BROWSER, outbox_rows

ROOT = Path(__file__).parent.parent
COOKIE = "agentsight_conversation_id"
APP = "tests.apps.servers_app:"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    verify: ssl.SSLContext | bool
    http2: bool
    process: subprocess.Popen[bytes]
    log: Path

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, verify=self.verify, http2=self.http2, timeout=10)

    def stop(self) -> int:
        """SIGTERM, as a container's stop sends; the exit code."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)


@pytest.fixture
def api() -> Iterator[StandInAgentSightAPI]:
    with StandInAgentSightAPI() as api:
        # Answers come after the stop is sent: the stop itself must deliver them.
        api.set_latency(0.5)
        yield api


@pytest.fixture
def certificates(tmp_path: Path) -> tuple[Path, Path, ssl.SSLContext]:
    """A certificate for 127.0.0.1 and its key (files), and a client context trusting it."""
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    issued.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    issued.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return tmp_path / "cert.pem", tmp_path / "key.pem", context


@contextlib.contextmanager
def serving(
    command: list[str],
    api: StandInAgentSightAPI,
    tmp_path: Path,
    *,
    tls: ssl.SSLContext | None = None,
    outbox: Path | None = None,
) -> Iterator[Server]:
    """``command`` (``{port}`` in it replaced) serving on 127.0.0.1; killed on exit if the
    test did not stop it."""
    port = _free_port()
    env = {
        **os.environ,
        "AGENTSIGHT_API_KEY": api.api_key,
        "AGENTSIGHT_API_ENDPOINT": api.url,
        "SERVERS_TEST_OUTBOX": "" if outbox is None else str(outbox),
    }
    log = tmp_path / f"server-{port}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [part.replace("{port}", str(port)) for part in command],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    server = Server(
        f"{'https' if tls else 'http'}://127.0.0.1:{port}", tls or False, bool(tls), process, log
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with server.client() as c:
                    c.get("/missing", timeout=0.5)
                break
            except httpx.TransportError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{command[:3]} did not start:\n{log.read_text()}") from None
                time.sleep(0.05)
        yield server
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def visit_and_chat(server: Server) -> set[tuple[str, bool]]:
    """A page view, then chats that name their conversation each way; checks every answer
    is the app's, and returns the events the stand-in API must get: (id, is_used)."""
    with server.client() as c:
        page = c.get("/", headers=BROWSER)
        assert page.status_code == 200
        assert page.content == PAGE
        assert page.http_version == ("HTTP/2" if server.http2 else "HTTP/1.1")
        viewed = c.cookies[COOKIE]
        # Secure over TLS; under HTTP/2, a header name with a capital is a protocol error.
        assert ("; Secure" in page.headers["set-cookie"]) == server.http2
        if server.http2:
            assert all(name == name.lower() for name, _ in page.headers.raw)
        chat = c.post("/api/chat", json={"message": "hi"})
        assert chat.headers["x-conversation"] == viewed  # the cookie's
        # The JSON body's, over one socket write: the app reads all of it.
        body = json.dumps({"conversation_id": "conv_0000000000b0", "m": "x" * 50_000}).encode()
        chat = c.post("/api/chat", content=body, headers={"content-type": "application/json"})
        assert (chat.content, chat.headers["x-conversation"]) == (body, "conv_0000000000b0")
        # Chunked (no Content-Length; under HTTP/2 DATA frames), and past the peek's limit.
        big = b'{"m": "' + b"y" * 1_000_000 + b'"}'
        parts = (big[i : i + 65_536] for i in range(0, len(big), 65_536))
        headers = {"content-type": "application/json", "x-conversation-id": "conv_0000000000c0"}
        chat = c.post("/api/chat", content=parts, headers=headers)
        assert (chat.content, chat.headers["x-conversation"]) == (big, "conv_0000000000c0")
        with c.stream("POST", "/api/sse", json={"conversation_id": "conv_0000000000d0"}) as sse:
            assert sse.headers["content-type"].startswith("text/event-stream")
            assert "content-length" not in sse.headers
            events = b"".join(sse.iter_raw())
        assert events == b"".join(b"data: %d:conv_0000000000d0\n\n" % i for i in range(3))
    return {(viewed, False), (viewed, True)} | {(f"conv_0000000000{x}0", True) for x in "bcd"}


def delivered(api: StandInAgentSightAPI) -> set[tuple[str, bool]]:
    return {(body["conversation_id"], body["is_used"]) for body in api.conversations}


HYPERCORN = [sys.executable, "-m", "hypercorn", "-b", "127.0.0.1:{port}"]
DAPHNE = [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", "{port}", APP + "asgi"]
GTHREAD = [
    sys.executable, "-m", "gunicorn", "-k", "gthread", "--threads", "4", "-w", "2",
    "-b", "127.0.0.1:{port}", APP + "flask()",
]  # fmt: skip
WAITRESS_SERVE = [
    sys.executable, "-m", "waitress", "--listen=127.0.0.1:{port}", "--call", APP + "flask",
]  # fmt: skip
#: As the README says to run it, SIGTERM exiting as Ctrl-C does.
WAITRESS = [*WAITRESS_SERVE[:-1], APP + "waitress_app"]


@pytest.mark.parametrize(
    ("command", "tls"),
    [
        pytest.param([*HYPERCORN, APP + "asgi"], False, id="hypercorn-asyncio"),
        pytest.param([*HYPERCORN, "-k", "trio", APP + "asgi"], False, id="hypercorn-trio"),
        pytest.param([*HYPERCORN, APP + "quart()"], True, id="hypercorn-h2-quart"),
        pytest.param([*HYPERCORN, "-k", "trio", APP + "asgi"], True, id="hypercorn-h2-trio"),
        pytest.param(DAPHNE, False, id="daphne"),
        pytest.param(GTHREAD, False, id="gunicorn-gthread"),
        pytest.param(WAITRESS, False, id="waitress"),
    ],
)
def test_tracks_and_delivers_at_the_stop(
    command: list[str],
    tls: bool,
    api: StandInAgentSightAPI,
    tmp_path: Path,
    certificates: tuple[Path, Path, ssl.SSLContext],
) -> None:
    cert, key, context = certificates
    if tls:  # HTTP/2: Hypercorn offers h2 by ALPN, httpx takes it
        command = [*command[:-1], "--certfile", str(cert), "--keyfile", str(key), command[-1]]
    with serving(command, api, tmp_path, tls=context if tls else None) as server:
        expected = visit_and_chat(server)
        assert delivered(api) < expected  # some still on their way at the stop
        assert server.stop() == 0, server.log.read_text()
    assert delivered(api) == expected, server.log.read_text()
    # The page's address as the browser had it (HTTP/2's :scheme and :authority too).
    (view,) = [body for body in api.conversations if not body["is_used"]]
    assert view["metadata"]["page_url"] == server.url + "/"
    assert view["device"] == "desktop"


@pytest.mark.parametrize(
    "command",
    [
        pytest.param([*HYPERCORN, APP + "asgi"], id="hypercorn"),
        pytest.param(DAPHNE, id="daphne"),
    ],
)
def test_a_websocket_under_a_chat_rule_passes_through_untouched(
    command: list[str], api: StandInAgentSightAPI, tmp_path: Path
) -> None:
    import wsproto
    from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage

    with serving(command, api, tmp_path) as server:
        port = int(server.url.rsplit(":", 1)[1])
        ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        cookie = (b"cookie", COOKIE.encode() + b"=conv_0000000000e0")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(ws.send(Request(host="127.0.0.1", target="/ws", extra_headers=[cookie])))
            events: list[object] = []
            for text in ("hello", "again"):
                while not any(isinstance(e, AcceptConnection) for e in events):
                    ws.receive_data(sock.recv(65536))
                    events += ws.events()
                sock.sendall(ws.send(TextMessage(data=text)))
                answer: list[TextMessage] = []
                while not answer:
                    ws.receive_data(sock.recv(65536))
                    answer = [e for e in ws.events() if isinstance(e, TextMessage)]
                # No conversation set around a websocket, and nothing recorded.
                assert [e.data for e in answer] == [f"{text}:none"]
            sock.sendall(ws.send(CloseConnection(code=1000)))
        assert server.stop() == 0
    assert api.conversations == []


def test_waitress_ended_by_sigterm_loses_nothing_with_an_outbox(
    api: StandInAgentSightAPI, tmp_path: Path
) -> None:
    # waitress-serve leaves SIGTERM to its default action: the process ends at once, and
    # no exit hook delivers what it holds in memory (the README says so, and how to have
    # it exit as at Ctrl-C). With outbox= it is on disk, and the next start sends it.
    outbox = tmp_path / "outbox.sqlite3"
    api.set_latency(10)  # none answered before the stop
    with serving(WAITRESS_SERVE, api, tmp_path, outbox=outbox) as server:
        expected = visit_and_chat(server)
        deadline = time.monotonic() + 15
        while outbox_rows(outbox) < len(expected):  # on disk: the promise starts there
            assert time.monotonic() < deadline, f"{outbox_rows(outbox)} on disk"
            time.sleep(0.02)
        assert server.stop() == -signal.SIGTERM
    assert api.conversations == []
    api.set_latency(0)
    with serving(WAITRESS_SERVE, api, tmp_path, outbox=outbox) as server:
        api.wait_for(conversations=len(expected), timeout=30)
        assert server.stop() == -signal.SIGTERM
    assert delivered(api) == expected


def test_cookie_crumbs_over_http2_keep_the_conversation(
    api: StandInAgentSightAPI, tmp_path: Path, certificates: tuple[Path, Path, ssl.SSLContext]
) -> None:
    # Browsers send each cookie as a field of its own over HTTP/2 (RFC 9113 8.2.3), and
    # Hypercorn hands them to the app as they came: ours, among others, is still read.
    import h2.config
    import h2.connection
    import h2.events

    cert, key, context = certificates
    command = [*HYPERCORN, "--certfile", str(cert), "--keyfile", str(key), APP + "asgi"]
    with serving(command, api, tmp_path, tls=context) as server:
        port = int(server.url.rsplit(":", 1)[1])
        context.set_alpn_protocols(["h2"])
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            conn = h2.connection.H2Connection(
                h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
            )
            conn.initiate_connection()
            crumbs = ["theme=dark", f"{COOKIE}=conv_0000000000f0", "consent=1"]
            conn.send_headers(1, [
                (":method", "POST"), (":scheme", "https"), (":authority", f"127.0.0.1:{port}"),
                (":path", "/api/chat"), ("content-type", "application/json"),
                *[("cookie", crumb) for crumb in crumbs],
            ])  # fmt: skip
            conn.send_data(1, b'{"message": "hi"}', end_stream=True)
            sock.sendall(conn.data_to_send())
            headers: list[tuple[str, str]] = []
            ended = False
            while not ended:
                for event in conn.receive_data(sock.recv(65536)):
                    if isinstance(event, h2.events.ResponseReceived):
                        headers = [(str(k), str(v)) for k, v in event.headers or ()]
                    ended = ended or isinstance(event, h2.events.StreamEnded)
                sock.sendall(conn.data_to_send())
        assert dict(headers)["x-conversation"] == "conv_0000000000f0"
        assert server.stop() == 0
    assert delivered(api) == {("conv_0000000000f0", True)}
