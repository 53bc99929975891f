"""Security review (session 16), finding F2: a rule with more than one variable-length
wildcard (``/docs/**/v/**/index.html``, ``/a/*x*/b``, ``/c/{a}-{b}/x``,
``/api/{p:path}/x/{q:path}/y``) is matched by backtracking: a request path made of many
near-matches costs the event loop (or the WSGI worker) time quadratic in its length, cubic
with three wildcards. uvicorn with httptools (which this package installs) takes request
targets up to ~80 KB: one request held the event loop 4.8 s with two ``**``; three ``**``
took 24 s on an 8 KB path in isolation (0.7 s at 2 KB).

A path that matches no rule must cost the same whatever its length, within reason.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from agentsight_middleware import AgentSightMiddleware
from agentsight_middleware._rules import RuleSet
from agentsight_middleware.testing import RecordingTracker

from .conftest import uvicorn_server


def _elapsed(rules: RuleSet, method: str, path: str) -> float:
    started = time.perf_counter()
    assert rules.match(method, path) is None
    return time.perf_counter() - started


# (widget_pages, chat_routes, method, a hostile path of about n chars)
CASES = [
    pytest.param(["/docs/**/v/**/index.html"], [], "GET", lambda n: "/docs/" + "v/" * (n // 2),
                 id="two-globstars"),
    pytest.param(["/d/**/v/**/w/**/z"], [], "GET", lambda n: "/d/" + "v/w/" * (n // 4),
                 id="three-globstars"),
    pytest.param(["/a/*x*/b"], [], "GET", lambda n: "/a/" + "x" * n, id="two-stars-one-segment"),
    pytest.param([], ["POST /c/{a}-{b}/x"], "POST", lambda n: "/c/" + "-" * n,
                 id="two-params-one-segment"),
    pytest.param([], ["POST /api/{p:path}/x/{q:path}/y"], "POST",
                 lambda n: "/api/" + "x/" * (n // 2), id="two-path-params"),
]  # fmt: skip


@pytest.mark.parametrize(("widget", "chat", "method", "make"), CASES)
def test_rule_matching_time_is_bounded(widget: Any, chat: Any, method: str, make: Any) -> None:
    rules = RuleSet(widget, chat)
    # 2 KB: an ordinary long URL; 16 KB: h11's limit on a request head; 64 KB: httptools'.
    for length in (2_048, 16_000, 64_000):
        elapsed = _elapsed(rules, method, make(length))
        assert elapsed < 0.5, f"{length} chars: {elapsed:.3f} s"


@pytest.mark.parametrize(
    ("rule", "path"),
    [
        ("/docs/**/v/**/index.html", "/docs/" + "v/" * 32_000),  # 64 KB: under httptools' limit
        # Three segments of two competing parts each: under the bound a first count gave it.
        ("/*-*/*-*/*-*/end", "/" + "/".join(["-" * 300] * 3) + "/enX"),
    ],
)
def test_one_request_cannot_hold_the_event_loop(rule: str, path: str) -> None:
    async def anything(request: Any) -> PlainTextResponse:
        return PlainTextResponse("not found", status_code=404)

    app = AgentSightMiddleware(
        Starlette(routes=[Route("/{p:path}", anything)]),
        widget_pages=[rule],
        tracker=RecordingTracker(),
    )
    with uvicorn_server(app) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            started = time.perf_counter()
            sock.sendall(
                f"GET {path} HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n".encode()
            )
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
            elapsed = time.perf_counter() - started
    assert answer.startswith(b"HTTP/1.1 404")
    # Seconds before the bound (4.8 s and 6.4 s here), milliseconds with it.
    assert elapsed < 2.0, f"one request held the event loop {elapsed:.2f} s"
