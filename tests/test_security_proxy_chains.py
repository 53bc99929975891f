"""Two proxies that both write: an inner nginx setting both ``X-Real-IP $remote_addr`` and
``X-Forwarded-For $proxy_add_x_forwarded_for`` behind a load balancer or CDN. X-Real-IP names
the outer proxy, so it never agreed with X-Forwarded-For, and the first fix for spoofed
forwarding headers recorded every such request with None: a header whose addresses are the
right end of a longer one's chain agrees with it. A client still cannot choose its IP."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest

from agentsight_middleware import _facts
from agentsight_middleware._facts import TrustedProxies, client_ip
from agentsight_middleware.testing import RecordingTracker

from .conftest import serving
from .test_security_proxy import CLIENT, FORGED, _nginx, _python_proxy, _server


def _ip(trusted: Any, peer: str = "10.0.0.2", **headers: str | None) -> str | None:
    return client_ip(
        peer,
        forwarded=headers.get("forwarded"),
        x_forwarded_for=headers.get("x_forwarded_for"),
        x_real_ip=headers.get("x_real_ip"),
        trusted=TrustedProxies(trusted),
    )


# (trusted, X-Forwarded-For, X-Real-IP, the client): an AWS ALB / a CDN at 10.0.0.9 or
# 173.245.48.5, then nginx writing both headers, then the app.
LEGIT = [
    pytest.param(["10.0.0.0/8"], "1.2.3.4, 10.0.0.9", "10.0.0.9", "1.2.3.4", id="alb-nginx-vpc"),
    pytest.param(2, "1.2.3.4, 10.0.0.9", "10.0.0.9", "1.2.3.4", id="alb-nginx-hops2"),
    pytest.param(2, "9.9.9.9, 1.2.3.4, 10.0.0.9", "10.0.0.9", "1.2.3.4",
                 id="alb-nginx-hops2-client-xff"),
    pytest.param(["10.0.0.0/8", "173.245.48.0/20"], "1.2.3.4, 173.245.48.5", "173.245.48.5",
                 "1.2.3.4", id="cdn-traefik"),
]  # fmt: skip


@pytest.mark.parametrize(("trusted", "xff", "real_ip", "client"), LEGIT)
def test_two_proxies_with_nginx_writing_both_headers_keep_the_client_ip(
    trusted: Any, xff: str, real_ip: str, client: str
) -> None:
    assert _ip(trusted, x_forwarded_for=xff, x_real_ip=real_ip) == client


# What the fix below must still refuse: the single-hop header agreeing with the chain's
# last hop is the only relaxation, and it cannot help a client choose.
SPOOFS = [
    # nginx writes X-Real-IP only; the client sends X-Forwarded-For ending in its own IP
    pytest.param(["10.0.0.0/8"], f"{FORGED}, 1.2.3.4", "1.2.3.4", ("1.2.3.4", None),
                 id="xri-proxy+xff-ending-in-own-ip"),
    # ... or ending in a trusted address
    pytest.param(["10.0.0.0/8"], f"{FORGED}, 10.0.0.3", "1.2.3.4", ("1.2.3.4", None),
                 id="xri-proxy+xff-ending-in-trusted"),
    # nginx writes XFF only; the client sends X-Real-IP naming the proxy's peer
    pytest.param(["10.0.0.0/8"], "1.2.3.4", "10.0.0.3", ("1.2.3.4", None),
                 id="xff-proxy+xri-trusted"),
    # "*": every hop is trusted, the chain's left-most is the client's to write
    pytest.param("*", f"{FORGED}, 1.2.3.4", "1.2.3.4", ("1.2.3.4", None), id="star"),
    pytest.param(1, f"{FORGED}, 1.2.3.4", "1.2.3.4", ("1.2.3.4",), id="hops1"),
]  # fmt: skip


@pytest.mark.parametrize(("trusted", "xff", "real_ip", "allowed"), SPOOFS)
def test_a_client_still_cannot_choose(trusted: Any, xff: str, real_ip: str, allowed: Any) -> None:
    assert _ip(trusted, x_forwarded_for=xff, x_real_ip=real_ip) in allowed


def test_the_warning_does_not_advise_a_spoofable_setting_under_star(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # nginx writing both, trusted_proxies="*": a client's own X-Forwarded-For makes the
    # headers disagree. The warning says to pin 'x-forwarded-for' for nginx's
    # $proxy_add_x_forwarded_for, but under "*" that header's left-most entry is believed:
    # the client's.
    monkeypatch.setattr(_facts, "_disagreement_warned", False)
    caplog.set_level(logging.WARNING, logger="agentsight_middleware")
    assert _ip("*", x_forwarded_for=f"{FORGED}, 1.2.3.4", x_real_ip="1.2.3.4") is None
    advice = caplog.text
    pinned = client_ip(
        "10.0.0.2", forwarded=None, x_forwarded_for=f"{FORGED}, 1.2.3.4", x_real_ip="1.2.3.4",
        trusted=TrustedProxies("*", header="x-forwarded-for"),
    )  # fmt: skip
    assert pinned == FORGED  # what following the advice gives
    assert "'x-forwarded-for' for nginx" not in advice, advice


@pytest.mark.parametrize("server", ["uvicorn", "werkzeug"])
@pytest.mark.parametrize("trusted", [["127.0.0.1"], 2], ids=["by-address", "hop-count"])
def test_load_balancer_then_nginx_records_the_client(server: str, trusted: Any) -> None:
    # client 127.0.0.2 -> a load balancer appending to X-Forwarded-For (AWS ALB does)
    # -> a real nginx writing X-Real-IP and X-Forwarded-For -> the app.
    tracker = RecordingTracker()
    with (
        _server(server, tracker, trusted_proxies=trusted) as upstream,
        _nginx(upstream, "x-real-ip+x-forwarded-for") as nginx,
        serving(_python_proxy(nginx, "x-forwarded-for")) as url,
        httpx.Client(base_url=url, transport=httpx.HTTPTransport(local_address=CLIENT)) as c,
    ):
        assert c.post("/api/chat", json={}).status_code == 200
        assert c.post("/api/chat", json={}, headers={"X-Forwarded-For": FORGED}).status_code == 200
        tracker.wait_for(used=2)
    assert [call["customer_ip_address"] for call in tracker.used] == [CLIENT, CLIENT]
