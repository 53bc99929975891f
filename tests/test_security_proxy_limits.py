"""Trusted-proxy settings at their limits: a huge header, every address, one address.

F1: with ``trusted_proxies=`` set, the check for a server that rewrote the peer from
X-Forwarded-For (uvicorn's --proxy-headers) split the whole header on every request from a
peer that is no trusted proxy. uvicorn's httptools parser takes a 1 MB header: a client
talking to the app directly held the GIL ~0.1 s a request with one of commas, in the
request's thread when a handler (or a tracker) read a fact, where the client IP itself reads
no more than the last 32 entries.

F2: ``trusted_proxies=["0.0.0.0/0", "::/0"]`` trusts every peer as ``"*"`` does, but went
without the guards ``"*"`` has: behind nginx writing both X-Real-IP and X-Forwarded-For, a
client's own X-Forwarded-For chose the IP recorded ("*" records None there).

F3: ``trusted_proxies=2`` with ``trusted_proxy_header="x-real-ip"`` was accepted, and every
visitor was recorded without an IP: X-Real-IP holds one address.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

from agentsight_middleware import AgentSightMiddleware, _facts, current_conversation
from agentsight_middleware import asgi as asgi_module
from agentsight_middleware._facts import TrustedProxies, client_ip
from agentsight_middleware.testing import RecordingTracker

from .conftest import uvicorn_server
from .test_security_proxy import CLIENT, FORGED, _nginx, _server

BROWSER = {"Accept": "text/html", "User-Agent": "Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0"}


def test_a_huge_x_forwarded_for_from_a_direct_client_costs_what_the_ip_reads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(asgi_module, "_rewrite_warned", False)  # the check runs until it warns
    costs: list[float] = []
    ips: list[str | None] = []

    async def page(request: Request) -> HTMLResponse:
        conversation = current_conversation()
        assert conversation is not None
        started = time.thread_time()
        ips.append(conversation.client_ip)  # the first fact read works them all out
        costs.append(time.thread_time() - started)
        return HTMLResponse("<p>shop</p>", headers={"Cache-Control": "no-cache"})

    mw = AgentSightMiddleware(
        Starlette(routes=[Route("/", page)]),
        widget_pages=["/"],
        tracker=RecordingTracker(),
        trusted_proxies=["10.0.0.0/8"],
    )
    # httptools, as uvicorn's default --http auto picks when installed: no header size limit.
    with uvicorn_server(mw, http="httptools") as url, httpx.Client(base_url=url, timeout=60) as c:
        for _ in range(3):
            response = c.get("/", headers={**BROWSER, "X-Forwarded-For": "," * 1_000_000})
            assert response.status_code == 200
    assert ips == ["127.0.0.1"] * 3  # the peer: it is no trusted proxy
    # ~0.1 s of CPU each before; reading the last 32 entries and the first costs ~1 ms.
    assert min(costs) < 0.02, costs


@pytest.mark.parametrize("server", ["uvicorn", "werkzeug"])
@pytest.mark.parametrize(
    "trusted", ["*", ["0.0.0.0/0", "::/0"], ["0.0.0.0/0"]], ids=["star", "both-zero", "v4-zero"]
)
def test_a_network_of_every_address_is_guarded_as_star(server: str, trusted: Any) -> None:
    # client 127.0.0.2 -> a real nginx writing X-Real-IP $remote_addr and appending to
    # X-Forwarded-For -> the app, which trusts every peer.
    tracker = RecordingTracker()
    with (
        _server(server, tracker, trusted_proxies=trusted) as upstream,
        _nginx(upstream, "x-real-ip+x-forwarded-for") as url,
        httpx.Client(base_url=url, transport=httpx.HTTPTransport(local_address=CLIENT)) as c,
    ):
        assert c.post("/api/chat", json={}).status_code == 200
        assert c.post("/api/chat", json={}, headers={"X-Forwarded-For": FORGED}).status_code == 200
        tracker.wait_for(used=2)
    honest, attacked = (call["customer_ip_address"] for call in tracker.used)
    assert honest == CLIENT
    assert attacked in (CLIENT, None), f"the client chose its recorded IP: {attacked}"


def test_the_warning_under_a_network_of_every_address_gives_stars_advice(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_facts, "_disagreement_warned", False)
    caplog.set_level(logging.WARNING, logger="agentsight_middleware")
    ip = client_ip(
        "10.0.0.2", forwarded=None, x_forwarded_for=f"{FORGED}, 1.2.3.4", x_real_ip="1.2.3.4",
        trusted=TrustedProxies(["0.0.0.0/0"]),
    )  # fmt: skip
    assert ip is None
    # Pinning X-Forwarded-For there believes its left-most entry, the client's.
    assert "'x-forwarded-for' for nginx" not in caplog.text, caplog.text
    assert "0.0.0.0/0" in caplog.text


@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
def test_a_hop_count_over_x_real_ip_fails_at_start_up(kind: str) -> None:
    # F3: a load balancer, then nginx setting X-Real-IP $remote_addr (the balancer's
    # address): trusted_proxies=2 with trusted_proxy_header="x-real-ip" was accepted, and
    # every visitor was recorded without an IP (X-Real-IP holds one address, never the
    # second from the end). It is refused where the middleware is built, saying why.
    from .test_security_proxy import _app, _wsgi_app

    build = _app if kind == "asgi" else _wsgi_app
    with pytest.raises(ValueError, match="'x-real-ip' holds one address") as error:
        build(RecordingTracker(), trusted_proxies=2, trusted_proxy_header="x-real-ip")
    assert "'x-forwarded-for' or 'forwarded'" in str(error.value)
    build(RecordingTracker(), trusted_proxies=1, trusted_proxy_header="x-real-ip")  # one: fine
