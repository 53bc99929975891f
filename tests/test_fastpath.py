"""The glue's inlined rule prefilter and precomputed exact matches agree with RuleSet.match."""

from __future__ import annotations

import re
from collections.abc import MutableMapping
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentsight_middleware import AgentSightMiddleware, AgentSightWSGIMiddleware
from agentsight_middleware._rules import _HTTP_METHODS, Match, RuleSet
from agentsight_middleware.testing import RecordingTracker

# Small alphabets so that generated paths often hit rules, prefixes and near misses.
_SEGMENT = st.text(alphabet="ab/.-{}*", min_size=0, max_size=4)
_PATH = st.lists(_SEGMENT, min_size=0, max_size=4).map(lambda parts: "/" + "/".join(parts))
_TEMPLATE = st.sampled_from(["{id}", "{id:int}", "*", "**", "{p:path}"])
_GLOB = st.lists(st.one_of(_SEGMENT, _TEMPLATE), min_size=0, max_size=3).map(
    lambda parts: "/" + "/".join(parts)
)
_REGEX = st.sampled_from(
    [re.compile(r"/a/[0-9]+"), re.compile(r"/b.*"), re.compile(r".*/x"), re.compile(r"/(a|b)")]
)
_METHOD = st.sampled_from([*sorted(_HTTP_METHODS), "get", "PROPFIND", "Post"])
_CHAT_PREFIX = st.sampled_from(["", "POST ", "GET ", "PUT|POST ", "DELETE "])


def _valid(candidate: str | re.Pattern[str]) -> bool:
    try:
        RuleSet([candidate], [])
    except ValueError:
        return False
    return True


_WIDGET_RULE = st.one_of(_PATH, _GLOB, _REGEX).filter(_valid)
_CHAT_RULE = st.one_of(
    st.tuples(_CHAT_PREFIX, st.one_of(_PATH, _GLOB))
    .map("".join)
    .filter(lambda rule: _valid_chat(rule)),
    _REGEX,
)


def _valid_chat(candidate: str) -> bool:
    try:
        RuleSet([], [candidate])
    except ValueError:
        return False
    return True


def _fast(rules: RuleSet, method: str, path: str) -> Match | None:
    """What the glue's ``__call__`` computes, written out as it is there."""
    by_method = rules.exact_matches.get(path)
    if by_method is None:
        if not path.startswith(rules.prefixes):
            return None
        return rules.match(method, path)
    return by_method[method] if method in by_method else rules.match(method, path)


@settings(max_examples=400, deadline=None)
@given(
    widget=st.lists(_WIDGET_RULE, max_size=4),
    chat=st.lists(_CHAT_RULE, max_size=4),
    requests=st.lists(st.tuples(_METHOD, st.one_of(_PATH, _GLOB)), min_size=1, max_size=8),
)
def test_fast_path_agrees_with_match(
    widget: list[Any], chat: list[Any], requests: list[tuple[str, str]]
) -> None:
    if not widget and not chat:
        widget = ["/"]
    rules = RuleSet(widget, chat)
    # Also every rule's own text as a request path: the exact entries themselves.
    paths = [path for _, path in requests]
    paths += [r.source.rpartition(" ")[2] for r in rules.rules if isinstance(r.source, str)]
    for method in {method for method, _ in requests} | {"GET", "POST"}:
        for path in paths:
            assert _fast(rules, method, path) == rules.match(method, path), (method, path)


@given(path=_PATH, method=_METHOD)
def test_prefilter_never_says_no_to_a_match(path: str, method: str) -> None:
    rules = RuleSet(
        ["/", "/pricing", "/docs/**", re.compile(r"/blog/[0-9]+")],
        ["POST /api/chat", "/api/chat/{conversation_id}/messages", "/a/*/b"],
    )
    if rules.match(method, path) is not None:
        assert path in rules.exact_matches or path.startswith(rules.prefixes)


def test_exact_matches_cover_every_standard_method() -> None:
    rules = RuleSet(["/", "/api/chat"], ["POST /api/chat"])
    assert set(rules.exact_matches) == {"/", "/api/chat"}
    for path, by_method in rules.exact_matches.items():
        assert set(by_method) == _HTTP_METHODS
        for method, match in by_method.items():
            assert match == rules.match(method, path)
    assert rules.exact_matches["/api/chat"]["POST"] is not None
    assert rules.exact_matches["/api/chat"]["POST"].rule.kind == "chat"
    assert rules.exact_matches["/api/chat"]["GET"].rule.kind == "widget"  # type: ignore[union-attr]
    assert rules.exact_matches["/"]["HEAD"] is None


def test_no_prefix_rules_mean_an_empty_prefix_tuple() -> None:
    rules = RuleSet(["/", "/pricing"], ["POST /api/chat"])
    assert rules.prefixes == ()
    assert not "/pricing/x".startswith(rules.prefixes)


@pytest.mark.anyio
async def test_asgi_extension_and_lower_case_methods_still_match() -> None:
    tracker = RecordingTracker()
    sent: list[MutableMapping[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    mw = AgentSightMiddleware(app, chat_routes=["/api/chat"], tracker=tracker)
    try:
        for method in ("PROPFIND", "post"):
            scope: dict[str, Any] = {
                "type": "http",
                "method": method,
                "path": "/api/chat",
                "headers": [],
                "query_string": b"",
            }
            await mw(scope, receive, send)
            assert "agentsight" in scope["state"]
    finally:
        mw.close()


def test_wsgi_extension_method_still_matches() -> None:
    tracker = RecordingTracker()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [])
        return [b"ok"]

    mw = AgentSightWSGIMiddleware(app, chat_routes=["/api/chat"], tracker=tracker)
    try:
        environ: dict[str, Any] = {"REQUEST_METHOD": "PROPFIND", "PATH_INFO": "/api/chat"}
        list(mw(environ, lambda status, headers, exc_info=None: None))
        assert "agentsight.conversation" in environ
    finally:
        mw.close()


_VALUES = st.sampled_from(
    [b"", b" ", b"\xa0", b"text/html", b"TEXT/HTML", b"*/*", b"document", b"Document",
     b"empty", b"iframe", b"IFrame", b"embed", b"prefetch", b"x", b"Mozilla/5.0", b" Mozilla",
     b"text/html,*/*;q=0.8", b"cross-site", b"Cross-Site ", b"same-origin", b"none"]
)  # fmt: skip
_NAMES = st.sampled_from(
    [b"accept", b"sec-fetch-dest", b"user-agent", b"sec-purpose", b"purpose", b"x-purpose",
     b"x-moz", b"cookie", b"sec-fetch-site", b"sec-fetch-storage-access"]
)  # fmt: skip


@given(st.dictionaries(_NAMES, _VALUES, max_size=10))
def test_page_view_fast_path_agrees_with_the_full_test(headers: dict[bytes, bytes]) -> None:
    from agentsight_middleware._core import is_page_view
    from agentsight_middleware.asgi import _is_page_view

    def text(name: bytes) -> str | None:
        value = headers.get(name)
        return None if value is None else value.decode("latin-1")

    purposes = [text(name) for name in (b"sec-purpose", b"purpose", b"x-purpose", b"x-moz")]
    purpose = ", ".join(p or "" for p in purposes) if any(p is not None for p in purposes) else None
    expected = is_page_view(
        text(b"accept"),
        text(b"sec-fetch-dest"),
        purpose,
        text(b"user-agent"),
        text(b"sec-fetch-site"),
        text(b"sec-fetch-storage-access"),
    )
    assert _is_page_view(headers) is expected
