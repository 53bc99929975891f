"""A client behind a trusted proxy cannot choose its scheme, nor, under Werkzeug's ProxyFix,
go unnoticed choosing its IP.

The scheme is the cookie's ``Secure`` flag and the page URL's ``https``. nginx terminating TLS
sets ``X-Forwarded-Proto $scheme`` and passes a client's own ``Forwarded`` through: with the
default ``trusted_proxy_header="auto"``, a client's ``Forwarded: proto=http`` (naming no
address, or naming its own) used to win over the proxy's ``https``. The scheme is now read
from the header the client IP is read from.

ProxyFix in front of the middleware has put an ``X-Forwarded-For`` address in
``REMOTE_ADDR`` before the middleware reads it: with ``trusted_proxies=`` the middleware then
walks the headers from an address that is not the proxy's. Behind nginx writing
``X-Real-IP`` only (the README's pinned set-up), a client's own ``X-Forwarded-For`` becomes
the IP recorded. The middleware says so once, and what to change.

The client connects from 127.0.0.2, nginx from 127.0.0.1 (the trusted proxy), the app runs
under a real uvicorn (its own proxy headers off) or Werkzeug's server.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.serving import make_server

from agentsight_middleware import AgentSightMiddleware, AgentSightWSGIMiddleware
from agentsight_middleware import wsgi as wsgi_module
from agentsight_middleware.testing import RecordingTracker

from .conftest import BROWSER, serving, uvicorn_server
from .test_security_proxy import CLIENT, FORGED, _nginx

PAGE = "<!doctype html><title>Shop</title><p>hello</p>"
WSGIApp = Any


def _asgi_page(tracker: RecordingTracker, **options: Any) -> AgentSightMiddleware:
    async def page(request: Request) -> HTMLResponse:
        return HTMLResponse(PAGE)

    inner = Starlette(routes=[Route("/", page)])
    return AgentSightMiddleware(inner, widget_pages=["/"], tracker=tracker, **options)


def _wsgi_page(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/html; charset=utf-8")])
    return [PAGE.encode()]


def _tracked(tracker: RecordingTracker, app: WSGIApp = _wsgi_page, **options: Any) -> WSGIApp:
    return AgentSightWSGIMiddleware(app, widget_pages=["/"], tracker=tracker, **options)


@contextlib.contextmanager
def _page_server(kind: str, tracker: RecordingTracker, **options: Any) -> Iterator[str]:
    if kind == "uvicorn":
        with uvicorn_server(_asgi_page(tracker, **options), proxy_headers=False) as url:
            yield url
    else:
        with _werkzeug(_tracked(tracker, **options)) as url:
            yield url


@contextlib.contextmanager
def _werkzeug(app: WSGIApp) -> Iterator[str]:
    with serving(make_server("127.0.0.1", 0, app, threaded=True)) as url:
        yield url


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 (certificate file, key file)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return str(cert), str(key)


def _client(url: str, cafile: str | None = None) -> httpx.Client:
    verify: Any = ssl.create_default_context(cafile=cafile) if cafile else True
    transport = httpx.HTTPTransport(local_address=CLIENT, verify=verify)
    return httpx.Client(base_url=url, transport=transport)


# What a client behind nginx sends to be recorded as on http (and given a cookie without
# Secure) although it came over https.
FORGED_SCHEMES = [
    pytest.param({"Forwarded": "proto=http"}, id="forwarded-proto-only"),
    pytest.param({"Forwarded": f"for={CLIENT};proto=http"}, id="forwarded-naming-itself"),
    pytest.param({"Forwarded": 'for="'}, id="forwarded-malformed"),
]


@pytest.mark.parametrize("server", ["uvicorn", "werkzeug"])
@pytest.mark.parametrize("trusted", [["127.0.0.1"], 1], ids=["by-address", "hop-count"])
@pytest.mark.parametrize("writes", ["x-forwarded-for", "x-real-ip"])
@pytest.mark.parametrize("forged", FORGED_SCHEMES)
def test_client_cannot_choose_its_scheme_behind_nginx(
    certificate: tuple[str, str], server: str, trusted: Any, writes: str, forged: dict[str, str]
) -> None:
    tracker = RecordingTracker()
    with (
        # trusted_proxy_header: the default, "auto"
        _page_server(server, tracker, trusted_proxies=trusted) as upstream,
        _nginx(upstream, f"{writes}+x-forwarded-proto", tls=certificate) as url,
        _client(url, certificate[0]) as client,
    ):
        honest = client.get("/", headers=BROWSER)
        client.cookies.clear()
        attacked = client.get("/", headers={**BROWSER, **forged})
        tracker.wait_for(initialized=2)
    for response in (honest, attacked):
        assert response.status_code == 200
        assert "; Secure" in response.headers["set-cookie"], response.headers["set-cookie"]
    urls = [call["metadata"]["page_url"] for call in tracker.initialized]
    assert urls == ["https://127.0.0.1/"] * 2
    assert tracker.initialized[0]["customer_ip_address"] == CLIENT


@pytest.mark.parametrize("server", ["uvicorn", "werkzeug"])
@pytest.mark.parametrize("tls", [True, False], ids=["https", "http"])
def test_a_proxy_writing_forwarded_for_only_keeps_its_x_forwarded_proto(
    certificate: tuple[str, str], server: str, tls: bool
) -> None:
    # A proxy that writes "Forwarded: for=" (no proto=) and X-Forwarded-Proto for the
    # scheme: its https visitors' cookies lost Secure and their pages were recorded http
    # once the scheme followed Forwarded alone. Its https is taken (a forged one could only
    # add Secure); on plain http nothing is added.
    tracker = RecordingTracker()
    scheme = "https" if tls else "http"
    with (
        _page_server(server, tracker, trusted_proxies=["127.0.0.1"]) as upstream,
        _nginx(
            upstream, "forwarded-for+x-forwarded-proto", tls=certificate if tls else None
        ) as url,
        _client(url, certificate[0] if tls else None) as client,
    ):
        response = client.get("/", headers=BROWSER)
        tracker.wait_for(initialized=1)
    assert response.status_code == 200
    assert ("; Secure" in response.headers["set-cookie"]) is tls, response.headers["set-cookie"]
    [view] = tracker.initialized
    assert view["metadata"]["page_url"].startswith(f"{scheme}://127.0.0.1"), view["metadata"]
    assert view["customer_ip_address"] == CLIENT


def _proxy_fix_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "ProxyFix" in r.getMessage()]


def test_proxy_fix_in_front_with_trusted_proxies_is_warned_about(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # nginx writes X-Real-IP $remote_addr and passes a client's X-Forwarded-For through;
    # ProxyFix (x_for=1, its default) takes that for REMOTE_ADDR, an address that is not
    # the proxy's: the middleware's trusted_proxies= no longer decides anything.
    monkeypatch.setattr(wsgi_module, "_proxy_fix_warned", False, raising=False)
    tracker = RecordingTracker()
    app = ProxyFix(
        _tracked(tracker, trusted_proxies=["127.0.0.1"], trusted_proxy_header="x-real-ip")
    )
    with (
        caplog.at_level(logging.WARNING, logger="agentsight_middleware"),
        _werkzeug(app) as upstream,
        _nginx(upstream, "x-real-ip") as url,
        _client(url) as client,
    ):
        for _ in range(2):
            client.cookies.clear()
            response = client.get("/", headers={**BROWSER, "X-Forwarded-For": FORGED})
            assert response.status_code == 200
        tracker.wait_for(initialized=2)
    warnings = _proxy_fix_warnings(caplog)
    assert len(warnings) == 1, warnings  # once per process
    assert f"address '127.0.0.1' with '{FORGED}' (from" in warnings[0]
    assert "AgentSightWSGIMiddleware(ProxyFix(app)" in warnings[0]
    assert "trusted_proxies=None" in warnings[0]
    # Told, not undone (see _warn_if_proxy_fixed): the app's own answer is ProxyFix's too.
    assert [call["customer_ip_address"] for call in tracker.initialized] == [FORGED] * 2


@pytest.mark.parametrize(
    ("order", "trusted"),
    [
        # The warning's first advice: the middleware reads the environ before ProxyFix does.
        pytest.param("outside", ["127.0.0.1"], id="middleware-wraps-proxyfix"),
        # Its second: ProxyFix's answer, right when its x_for= counts the appending proxies.
        pytest.param("inside", None, id="trusted-proxies-none"),
        # A hop count reads the headers whatever the peer is: ProxyFix changes nothing.
        pytest.param("inside", 1, id="hop-count"),
    ],
)
def test_the_warnings_advice_records_the_client(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, order: str, trusted: Any
) -> None:
    monkeypatch.setattr(wsgi_module, "_proxy_fix_warned", False, raising=False)
    tracker = RecordingTracker()
    seen: list[str] = []

    def page(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.append(environ["REMOTE_ADDR"])
        return _wsgi_page(environ, start_response)

    if order == "outside":
        app = _tracked(tracker, ProxyFix(page), trusted_proxies=trusted)
    else:
        app = ProxyFix(_tracked(tracker, page, trusted_proxies=trusted))
    with (
        caplog.at_level(logging.WARNING, logger="agentsight_middleware"),
        _werkzeug(app) as upstream,
        _nginx(upstream, "x-forwarded-for") as url,
        _client(url) as client,
    ):
        # nginx appends the client's address to what it wrote: "6.6.6.6, 127.0.0.2".
        response = client.get("/", headers={**BROWSER, "X-Forwarded-For": FORGED})
        assert response.status_code == 200
        tracker.wait_for(initialized=1)
    assert not _proxy_fix_warnings(caplog)
    assert tracker.initialized[0]["customer_ip_address"] == CLIENT
    assert seen == [CLIENT]  # the app keeps ProxyFix's answer either way


@pytest.mark.parametrize("forged", [{}, {"X-Forwarded-For": FORGED}], ids=["honest", "forged-xff"])
def test_proxy_fix_in_front_that_agrees_with_the_middleware_is_not_warned_about(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, forged: dict[str, str]
) -> None:
    # Flask's documented set-up: ProxyFix(x_for=1, x_proto=1) behind one nginx appending to
    # X-Forwarded-For and setting X-Forwarded-Proto, trusted_proxies= naming that nginx.
    # ProxyFix hands over the client's address, which the middleware records as it would
    # have from the connection as it came: the warning that a client chooses its IP was wrong.
    monkeypatch.setattr(wsgi_module, "_proxy_fix_warned", False, raising=False)
    tracker = RecordingTracker()
    app = ProxyFix(_tracked(tracker, trusted_proxies=["127.0.0.1"]), x_for=1, x_proto=1)
    with (
        caplog.at_level(logging.WARNING, logger="agentsight_middleware"),
        _werkzeug(app) as upstream,
        _nginx(upstream, "x-forwarded-for+x-forwarded-proto") as url,
        _client(url) as client,
    ):
        for _ in range(2):
            client.cookies.clear()
            assert client.get("/", headers={**BROWSER, **forged}).status_code == 200
        tracker.wait_for(initialized=2)
    assert not _proxy_fix_warnings(caplog)
    assert [call["customer_ip_address"] for call in tracker.initialized] == [CLIENT] * 2


def test_a_request_proxy_fix_left_alone_sets_off_no_warning(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ProxyFix records the environ on every request; with no X-Forwarded-* it changes
    # nothing, and the one warning must not be spent (nor raised falsely) on that.
    monkeypatch.setattr(wsgi_module, "_proxy_fix_warned", False, raising=False)
    tracker = RecordingTracker()
    app = ProxyFix(_tracked(tracker, trusted_proxies=["127.0.0.1"]))
    with (
        caplog.at_level(logging.WARNING, logger="agentsight_middleware"),
        _werkzeug(app) as url,
        _client(url) as client,
    ):
        assert client.get("/", headers=BROWSER).status_code == 200
        tracker.wait_for(initialized=1)
    assert not _proxy_fix_warnings(caplog)
    assert wsgi_module._proxy_fix_warned is False
    assert tracker.initialized[0]["customer_ip_address"] == CLIENT


def test_proxy_fix_in_front_that_agrees_costs_no_walk_per_event(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # While ProxyFix agrees it is never warned about, so both readings were worked out for
    # every event in the worker: two walks of the forwarding headers an event, uncached,
    # beside the conversation's own remembered one. A returning visitor now walks none.
    import agentsight_middleware._facts as facts_module

    monkeypatch.setattr(wsgi_module, "_proxy_fix_warned", False, raising=False)
    walks: list[str | None] = []
    walk = facts_module.client_ip

    def counted(peer: str | None, **headers: Any) -> str | None:
        walks.append(peer)
        return walk(peer, **headers)

    monkeypatch.setattr(facts_module, "client_ip", counted)
    monkeypatch.setattr(wsgi_module, "client_ip", counted, raising=False)
    tracker = RecordingTracker()
    app = ProxyFix(_tracked(tracker, trusted_proxies=["127.0.0.1"]), x_for=1, x_proto=1)
    with (
        _werkzeug(app) as upstream,
        _nginx(upstream, "x-forwarded-for+x-forwarded-proto") as url,
        _client(url) as client,
    ):
        for count in range(1, 6):
            client.cookies.clear()  # a new visit each time, from the same address
            assert client.get("/", headers=BROWSER).status_code == 200
            tracker.wait_for(initialized=count)
    assert [call["customer_ip_address"] for call in tracker.initialized] == [CLIENT] * 5
    # Once from the address ProxyFix handed over, once from the proxy's: not once an event.
    assert sorted(walks, key=str) == sorted([CLIENT, "127.0.0.1"], key=str), walks
