"""Security review (session 16), finding F1: with ``trusted_proxies`` set and the default
``trusted_proxy_header="auto"``, a client behind an ordinary reverse proxy chooses the IP
recorded for it, by sending a forwarding header that the proxy does not write.

Every common proxy writes one header and passes the others through untouched: nginx
(``X-Forwarded-For $proxy_add_x_forwarded_for``, or ``X-Real-IP $remote_addr``), HAProxy
``option forwardfor``, AWS ALB, Traefik, Caddy: none strips a client's ``Forwarded``. In
"auto" the middleware believes ``Forwarded`` first, then ``X-Forwarded-For``, then
``X-Real-IP``: whichever the proxy does *not* write, the client does.

The client connects from 127.0.0.2 (a loopback address of its own), the proxy runs on
127.0.0.1 (the trusted proxy), the app under a real uvicorn with its own proxy headers
off, as the README says to run it with ``trusted_proxies=``. The IP recorded must be
127.0.0.2 or None, never the address the client wrote.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from agentsight_middleware import AgentSightMiddleware, AgentSightWSGIMiddleware
from agentsight_middleware.testing import RecordingTracker

from .conftest import serving, uvicorn_server

CLIENT = "127.0.0.2"  # the real visitor's address
FORGED = "6.6.6.6"


def _app(tracker: RecordingTracker, **options: Any) -> AgentSightMiddleware:
    async def chat(request: Any) -> JSONResponse:
        await request.body()
        return JSONResponse({"reply": "hi"})

    inner = Starlette(routes=[Route("/api/chat", chat, methods=["POST"])])
    return AgentSightMiddleware(inner, chat_routes=["POST /api/chat"], tracker=tracker, **options)


def _wsgi_app(tracker: RecordingTracker, **options: Any) -> AgentSightWSGIMiddleware:
    def chat(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        start_response("200 OK", [("Content-Type", "application/json")])
        return [b'{"reply": "hi"}']

    return AgentSightWSGIMiddleware(
        chat, chat_routes=["POST /api/chat"], tracker=tracker, **options
    )


@contextlib.contextmanager
def _server(kind: str, tracker: RecordingTracker, **options: Any) -> Iterator[str]:
    """The app under a real server: uvicorn (its own proxy headers off, as the README says
    to run it with trusted_proxies=) or Werkzeug's threaded server."""
    if kind == "uvicorn":
        with uvicorn_server(_app(tracker, **options), proxy_headers=False) as url:
            yield url
    else:
        from werkzeug.serving import make_server

        with serving(
            make_server("127.0.0.1", 0, _wsgi_app(tracker, **options), threaded=True)
        ) as url:
            yield url


def _python_proxy(upstream: str, writes: str) -> ThreadingHTTPServer:
    """A reverse proxy as nginx's usual config behaves: ``writes="x-forwarded-for"`` appends
    the peer to X-Forwarded-For (``$proxy_add_x_forwarded_for``); ``writes="x-real-ip"``
    sets X-Real-IP to the peer (``$remote_addr``). Every other header passes through."""
    host, port = upstream.removeprefix("http://").split(":")

    class Proxy(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            peer = self.client_address[0]
            headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
            if writes == "x-forwarded-for":
                before = [v for k, v in self.headers.items() if k.lower() == "x-forwarded-for"]
                headers = {k: v for k, v in headers.items() if k.lower() != "x-forwarded-for"}
                headers["X-Forwarded-For"] = ", ".join([*before, peer])
            else:
                headers = {k: v for k, v in headers.items() if k.lower() != "x-real-ip"}
                headers["X-Real-IP"] = peer
            upstream_conn = http.client.HTTPConnection(host, int(port), timeout=10)
            upstream_conn.request("POST", self.path, body=body, headers=headers)
            answer = upstream_conn.getresponse()
            data = answer.read()
            self.send_response(answer.status)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            upstream_conn.close()

        def log_message(self, *args: object) -> None:
            pass

    return ThreadingHTTPServer(("127.0.0.1", 0), Proxy)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_NGINX_LINES = {
    "x-forwarded-for": "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
    "x-real-ip": "proxy_set_header X-Real-IP $remote_addr;",
    "x-forwarded-proto": "proxy_set_header X-Forwarded-Proto $scheme;",
    # RFC 7239's header with the address only, as HAProxy's "set-header Forwarded for=%[src]".
    "forwarded-for": 'proxy_set_header Forwarded "for=$remote_addr";',
}


@contextlib.contextmanager
def _nginx(upstream: str, writes: str, tls: tuple[str, str] | None = None) -> Iterator[str]:
    """A real nginx in front of ``upstream``, with the header config of the docs' examples;
    ``tls``: (certificate, key) files to serve https with."""
    nginx = shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None
    )
    if nginx is None:
        pytest.skip("nginx is not installed (apt-get install nginx-light)")
    port = _free_port()
    # "x-real-ip+x-forwarded-for": both, as nginx's docs and most tutorials set them.
    line = " ".join(_NGINX_LINES[header] for header in writes.split("+"))
    listen = f"127.0.0.1:{port}"
    if tls is not None:
        listen += f" ssl; ssl_certificate {tls[0]}; ssl_certificate_key {tls[1]}"
    with tempfile.TemporaryDirectory() as folder:
        conf = os.path.join(folder, "nginx.conf")
        with open(conf, "w") as f:
            f.write(
                f"daemon off; master_process off; pid {folder}/nginx.pid;"
                f"error_log {folder}/error.log; events {{}}"
                f"http {{ access_log off; client_body_temp_path {folder};"
                f" proxy_temp_path {folder};"
                f" server {{ listen {listen};"
                f"  location / {{ proxy_pass {upstream}; proxy_set_header Host $host; {line} }}"
                " } }"
            )
        process = subprocess.Popen([nginx, "-c", conf, "-p", folder])
        try:
            deadline = time.monotonic() + 10
            while True:
                with (
                    contextlib.suppress(OSError),
                    socket.create_connection(("127.0.0.1", port), 0.2),
                ):
                    break
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("nginx did not start")
                time.sleep(0.05)
            yield f"{'http' if tls is None else 'https'}://127.0.0.1:{port}"
        finally:
            process.terminate()
            process.wait(10)


@contextlib.contextmanager
def _proxy(kind: str, upstream: str, writes: str) -> Iterator[str]:
    if kind == "nginx":
        with _nginx(upstream, writes) as url:
            yield url
    else:
        with serving(_python_proxy(upstream, writes)) as url:
            yield url


# (what the proxy writes, the header the client forges)
CASES = [
    pytest.param(
        "x-forwarded-for", {"Forwarded": f"for={FORGED}"}, id="xff-proxy+forged-forwarded"
    ),
    pytest.param("x-real-ip", {"X-Forwarded-For": FORGED}, id="real-ip-proxy+forged-xff"),
    pytest.param("x-real-ip", {"Forwarded": f"for={FORGED}"}, id="real-ip-proxy+forged-forwarded"),
]


@pytest.mark.parametrize("server", ["uvicorn", "werkzeug"])
@pytest.mark.parametrize("proxy_kind", ["python", "nginx"])
@pytest.mark.parametrize("trusted", [["127.0.0.1"], 1], ids=["by-address", "hop-count"])
@pytest.mark.parametrize(("writes", "forged"), CASES)
def test_client_cannot_choose_its_ip_behind_a_trusted_proxy(
    server: str, proxy_kind: str, trusted: Any, writes: str, forged: dict[str, str]
) -> None:
    tracker = RecordingTracker()
    with (
        # trusted_proxy_header: the default, "auto"
        _server(server, tracker, trusted_proxies=trusted) as upstream,
        _proxy(proxy_kind, upstream, writes) as url,
        httpx.Client(base_url=url, transport=httpx.HTTPTransport(local_address=CLIENT)) as client,
    ):
        # An honest request first: the set-up records the visitor's real address.
        assert client.post("/api/chat", json={}).status_code == 200
        assert client.post("/api/chat", json={}, headers=forged).status_code == 200
        tracker.wait_for(used=2)
    honest, attacked = (call["customer_ip_address"] for call in tracker.used)
    assert honest == CLIENT
    assert attacked in (CLIENT, None), f"the client chose its recorded IP: {attacked}"
