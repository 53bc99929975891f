"""The middleware under granian, a Rust-backed server: its ASGI receive() is a future of its
own kind (not an asyncio future), its WSGI input reads otherwise than a file. The body peek
must never lose a part of a chat request's body under either."""

from __future__ import annotations

import contextlib
import importlib.util
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from agentsight_middleware import _body

ROOT = Path(__file__).parent.parent
BODY = b'{"message": "hello there", "conversation_id": "conv_0123456789ab"}'


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def granian(tmp_path: Path, interface: str = "asgi", app: str | None = None) -> Iterator[int]:
    """granian serving ``tests/apps/granian_app.py`` on 127.0.0.1 (one worker), its ASGI
    ``app`` (or another, named) or its ``wsgi_app``; yields its port, and stops it with
    SIGTERM."""
    assert importlib.util.find_spec("granian"), "pip install granian (a test dependency)"
    port = _free_port()
    command = [
        sys.executable, "-m", "granian", "--interface", interface, "--host", "127.0.0.1",
        "--port", str(port), "--workers", "1",
        "tests.apps.granian_app:" + (app or ("app" if interface == "asgi" else "wsgi_app")),
    ]  # fmt: skip
    log = (tmp_path / "granian.log").open("ab")
    process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"granian did not start:\n{(tmp_path / 'granian.log').read_text()}"
                    ) from None
                time.sleep(0.05)
        yield port
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
        finally:
            log.close()


def _chat(port: int, pause: float) -> bytes:
    """A chat request whose body comes in two parts, ``pause`` seconds apart; the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.sendall(
            b"POST /api/chat HTTP/1.1\r\nHost: shop.example\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (len(BODY), BODY[:20])
        )
        time.sleep(pause)
        client.sendall(BODY[20:])
        answer = b""
        with contextlib.suppress(socket.timeout):  # no answer: the app waits for a lost part
            while chunk := client.recv(65536):
                answer += chunk
    return answer


def test_a_body_part_that_comes_as_the_peek_gives_up_reaches_the_app(tmp_path: Path) -> None:
    # The peek cancelled granian's pending receive at its bound; a part that came in that
    # moment was taken off the connection and then dropped with the cancelled future: the
    # app read a truncated body (a 500 from a framework's JSON parse), or hung waiting for
    # the last part. The rest of the body comes around the bound, a few times each.
    pauses = [_body.PEEK_WAIT - 0.005 + i * 0.0005 for i in range(36)]
    with granian(tmp_path) as port:
        answers = {pause: _chat(port, pause) for pause in pauses}
    whole = b"\r\n\r\n" + BODY
    wrong = {
        round(pause, 4): answer[-60:]
        for pause, answer in answers.items()
        if not (answer.startswith(b"HTTP/1.1 200") and answer.endswith(whole))
    }
    assert not wrong, wrong


def _partial_chat(port: int, path: str) -> tuple[bytes, float]:
    """A chat whose body's rest never comes (the client waits for the answer first): the
    answer, and how long after the request the server closed the connection (up to the
    client's own limit, 5 s)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        client.sendall(
            b"POST %s HTTP/1.1\r\nHost: shop.example\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (path.encode(), len(BODY), BODY[:20])
        )
        started = time.monotonic()
        answer = b""
        with contextlib.suppress(socket.timeout):
            while chunk := client.recv(65536):
                answer += chunk
        return answer, time.monotonic() - started


def test_a_chat_refused_unread_ends_its_connection_as_without_us(tmp_path: Path) -> None:
    # The app answers unread after the peek's bound, and granian closes the connection, as
    # it does at once without us. A receive of the peek's left pending kept it open until
    # the client gave up.
    with granian(tmp_path) as port:
        answer, closed_after = _partial_chat(port, "/api/chat/unread")
    assert answer.startswith(b"HTTP/1.1 401"), answer
    assert closed_after < _body.PEEK_WAIT + 1, closed_after


def test_a_request_cancelled_while_the_peek_waits_ends_its_connection(tmp_path: Path) -> None:
    # A time limit around the app expires while the peek waits for the body's rest: granian
    # answers the 504 and closes the connection once its request is freed. The cancel went
    # through frames of the peek that kept it in a local, a reference cycle (see _body._throw)
    # that held the request, and the connection open, until the collector's next pass: in
    # a few requests in a hundred, and in 10-28 of 40 with the collector off, as it is in
    # this server process (never without the middleware). Before the fix this failed in 3 of
    # 4 runs; the deterministic check of the cycle is in test_peek_iterator_awaitable.py.
    with granian(tmp_path, app="timed") as port:
        for _ in range(5):
            answer, closed_after = _partial_chat(port, "/api/chat")
            assert answer.startswith(b"HTTP/1.1 504"), answer
            assert closed_after < 2, closed_after


def test_a_chunked_body_over_the_peek_s_limit_reaches_a_wsgi_app_whole(tmp_path: Path) -> None:
    # The peek reads a chunked body up to its limit and one byte more with sized reads;
    # the app's read() to the end then went to granian's input as a read() without a size,
    # which answers with only part of what is left after sized reads: the app got 134,632
    # of 200,055 bytes (Flask's get_data() as well), without us all of them.
    body = b'{"conversation_id": "conv_0123456789ab", "message": "' + b"x" * 200_000 + b'"}'
    chunked = b"".join(
        b"%x\r\n%s\r\n" % (len(body[i : i + 50_000]), body[i : i + 50_000])
        for i in range(0, len(body), 50_000)
    )
    with (
        granian(tmp_path, "wsgi") as port,
        socket.create_connection(("127.0.0.1", port), timeout=10) as client,
    ):
        client.sendall(
            b"POST /api/chat HTTP/1.1\r\nHost: shop.example\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            + chunked
            + b"0\r\n\r\n"
        )
        answer = b"".join(iter(lambda: client.recv(65536), b""))
    head, _, echoed = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert len(echoed) == len(body)
    assert echoed == body
