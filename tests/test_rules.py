"""Which requests count as widget page views and which as chats, and config errors."""

from __future__ import annotations

import re
import uuid
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentsight_middleware._rules import CHAT, WIDGET, Match, Rule, RuleSet, _regex_prefix

Patterns = list[Any]
UUID = "123e4567-e89b-12d3-a456-426614174000"


def kind_of(match: Match | None) -> str | None:
    return None if match is None else match.rule.kind


# ---------------------------------------------------------------------------
# Pattern kinds: (id, rule, path, params captured or None for "no match").
# Each rule is tried both as a widget page (GET) and as a chat route (POST):
# pattern semantics do not depend on the kind.
# ---------------------------------------------------------------------------
PATTERNS: list[tuple[str, str | re.Pattern[str], str, dict[str, str] | None]] = [
    # exact
    ("exact-root", "/", "/", {}),
    ("exact-hit", "/pricing", "/pricing", {}),
    ("exact-no-trailing-slash-fold", "/pricing", "/pricing/", None),
    ("exact-no-prefix-match", "/pricing", "/pricing/team", None),
    ("exact-case-sensitive", "/pricing", "/Pricing", None),
    ("exact-dot-is-literal", "/a.b", "/axb", None),
    ("exact-regex-chars-literal", "/a+(b)", "/a+(b)", {}),
    ("exact-root-not-other", "/", "/about", None),
    # single-segment glob
    ("glob-one-segment", "/docs/*", "/docs/intro", {}),
    ("glob-empty-segment", "/docs/*", "/docs/", {}),
    ("glob-not-nested", "/docs/*", "/docs/a/b", None),
    ("glob-needs-slash", "/docs/*", "/docs", None),
    ("glob-not-sibling", "/docs/*", "/docsx/a", None),
    ("glob-mid-segment", "/f/*.html", "/f/a.html", {}),
    ("glob-mid-segment-miss", "/f/*.html", "/f/a.htm", None),
    ("glob-inner", "/u/*/profile", "/u/42/profile", {}),
    ("glob-inner-miss", "/u/*/profile", "/u/4/2/profile", None),
    # multi-segment glob
    ("globstar-nested", "/docs/**", "/docs/a/b", {}),
    ("globstar-empty", "/docs/**", "/docs/", {}),
    ("globstar-needs-slash", "/docs/**", "/docs", None),
    ("globstar-newline", "/docs/**", "/docs/a\nb", {}),
    ("globstar-root", "/**", "/anything/at/all", {}),
    # templates
    ("tpl-str", "/c/{cid}/messages", "/c/abc/messages", {"cid": "abc"}),
    ("tpl-str-explicit", "/c/{cid:str}", "/c/abc", {"cid": "abc"}),
    ("tpl-str-not-empty", "/c/{cid}/m", "/c//m", None),
    ("tpl-str-one-segment", "/c/{cid}", "/c/a/b", None),
    ("tpl-int", "/c/{n:int}", "/c/42", {"n": "42"}),
    ("tpl-int-rejects-letters", "/c/{n:int}", "/c/4a", None),
    ("tpl-int-rejects-sign", "/c/{n:int}", "/c/-4", None),
    ("tpl-float", "/c/{x:float}", "/c/1.5", {"x": "1.5"}),
    ("tpl-float-integral", "/c/{x:float}", "/c/2", {"x": "2"}),
    ("tpl-float-rejects-dot-end", "/c/{x:float}", "/c/2.", None),
    ("tpl-path", "/f/{rest:path}", "/f/a/b/c", {"rest": "a/b/c"}),
    ("tpl-path-empty", "/f/{rest:path}", "/f/", {"rest": ""}),
    ("tpl-uuid", "/c/{id:uuid}", f"/c/{UUID}", {"id": UUID}),
    ("tpl-uuid-upper", "/c/{id:uuid}", f"/c/{UUID.upper()}", {"id": UUID.upper()}),
    (
        "tpl-uuid-hyphen-less",
        "/c/{id:uuid}",
        f"/c/{UUID.replace('-', '')}",
        {"id": UUID.replace("-", "")},
    ),
    ("tpl-uuid-rejects-short", "/c/{id:uuid}", "/c/123e4567", None),
    ("tpl-uuid-rejects-non-hex", "/c/{id:uuid}", f"/c/{UUID[:-1]}g", None),
    ("tpl-two-params", "/u/{user}/c/{n:int}", "/u/bo/c/7", {"user": "bo", "n": "7"}),
    ("tpl-and-glob", "/t/{tenant}/**", "/t/acme/x/y", {"tenant": "acme"}),
    ("tpl-literal-dot", "/c/{id}.json", "/c/7.json", {"id": "7"}),
    ("tpl-literal-dot-miss", "/c/{id}.json", "/c/7xjson", None),
    # compiled regexes
    ("regex-named-group", re.compile(r"/v(?P<ver>\d+)/chat"), "/v2/chat", {"ver": "2"}),
    ("regex-fullmatch-not-search", re.compile(r"/v\d+/chat"), "/v2/chat/x", None),
    ("regex-unnamed-group", re.compile(r"/chat(/.*)?"), "/chat/a", {}),
    ("regex-drops-unmatched-group", re.compile(r"/c(?:/(?P<id>\d+))?"), "/c", {}),
    ("regex-keeps-matched-group", re.compile(r"/c(?:/(?P<id>\d+))?"), "/c/9", {"id": "9"}),
    ("regex-alternation", re.compile(r"/chat|/talk"), "/talk", {}),
    ("regex-ignorecase", re.compile(r"/CHAT", re.IGNORECASE), "/chat", {}),
    ("regex-inline-ignorecase", re.compile(r"(?i)/CHAT"), "/chat", {}),
    ("regex-optional-first-letter", re.compile(r"/a?b"), "/b", {}),
    ("regex-caret", re.compile(r"^/chat$"), "/chat", {}),
    ("regex-miss", re.compile(r"/(en|fr)/home"), "/de/home", None),
]


@pytest.mark.parametrize(
    ("kind", "method"), [(WIDGET, "GET"), (CHAT, "POST")], ids=["widget", "chat"]
)
@pytest.mark.parametrize(
    ("rule", "path", "params"),
    [case[1:] for case in PATTERNS],
    ids=[case[0] for case in PATTERNS],
)
def test_pattern_kinds(
    kind: str,
    method: str,
    rule: str | re.Pattern[str],
    path: str,
    params: dict[str, str] | None,
) -> None:
    rules = RuleSet([rule], []) if kind == WIDGET else RuleSet([], [rule])
    match = rules.match(method, path)
    if params is None:
        assert match is None
    else:
        source = rule if isinstance(rule, str) else rule.pattern
        assert match == Match(Rule(kind, source, None), params)


# ---------------------------------------------------------------------------
# Methods: which methods each rule answers to.
# ---------------------------------------------------------------------------
METHODS: list[tuple[str, Patterns, Patterns, str, str, str | None]] = [
    ("widget-get", ["/"], [], "GET", "/", WIDGET),
    ("widget-explicit-get", ["GET /"], [], "GET", "/", WIDGET),
    ("widget-never-post", ["/"], [], "POST", "/", None),
    ("widget-never-head", ["/"], [], "HEAD", "/", None),
    ("widget-never-options", ["/docs/*"], [], "OPTIONS", "/docs/a", None),
    ("chat-default-post", [], ["/api/chat"], "POST", "/api/chat", CHAT),
    ("chat-default-get", [], ["/api/chat"], "GET", "/api/chat", CHAT),
    ("chat-default-put", [], ["/api/chat"], "PUT", "/api/chat", CHAT),
    ("chat-default-delete", [], ["/api/chat"], "DELETE", "/api/chat", CHAT),
    ("chat-default-extension-method", [], ["/api/chat"], "PROPFIND", "/api/chat", CHAT),
    ("chat-default-never-head", [], ["/api/chat"], "HEAD", "/api/chat", None),
    ("chat-default-never-options", [], ["/api/chat"], "OPTIONS", "/api/chat", None),
    ("chat-pattern-never-head", [], ["/c/{id}"], "HEAD", "/c/1", None),
    ("chat-pattern-never-options", [], ["/c/{id}"], "OPTIONS", "/c/1", None),
    ("chat-regex-never-options", [], [re.compile("/c.*")], "OPTIONS", "/c/1", None),
    ("chat-post-only-hit", [], ["POST /api/chat"], "POST", "/api/chat", CHAT),
    ("chat-post-only-get-miss", [], ["POST /api/chat"], "GET", "/api/chat", None),
    ("chat-post-only-extension-miss", [], ["POST /api/chat"], "PROPFIND", "/api/chat", None),
    ("chat-post-only-pattern-miss", [], ["POST /c/{id}"], "PUT", "/c/1", None),
    ("chat-comma-list-get", [], ["GET,POST /c"], "GET", "/c", CHAT),
    ("chat-comma-list-post", [], ["GET,POST /c"], "POST", "/c", CHAT),
    ("chat-comma-list-put-miss", [], ["GET,POST /c"], "PUT", "/c", None),
    ("chat-pipe-list", [], ["PUT|PATCH /c"], "PATCH", "/c", CHAT),
    ("chat-spaced-list", [], ["put , patch /c"], "PATCH", "/c", CHAT),
    ("chat-lowercase-config", [], ["post /api/chat"], "POST", "/api/chat", CHAT),
    ("request-method-lowercase", ["/"], [], "get", "/", WIDGET),
    ("request-method-lowercase-chat", [], ["POST /c"], "post", "/c", CHAT),
]


@pytest.mark.parametrize(
    ("widget", "chat", "method", "path", "kind"),
    [case[1:] for case in METHODS],
    ids=[case[0] for case in METHODS],
)
def test_methods(
    widget: Patterns, chat: Patterns, method: str, path: str, kind: str | None
) -> None:
    assert kind_of(RuleSet(widget, chat).match(method, path)) == kind


@pytest.mark.parametrize(
    ("pattern", "methods"),
    [
        ("/api/chat", None),
        ("POST /api/chat", frozenset({"POST"})),
        ("get,Post /api/chat", frozenset({"GET", "POST"})),
        ("PUT|patch /api/chat", frozenset({"PUT", "PATCH"})),
    ],
    ids=["none", "one", "comma-mixed-case", "pipe"],
)
def test_rule_methods_stored_uppercase(pattern: str, methods: frozenset[str] | None) -> None:
    rules = RuleSet([], [pattern])
    match = rules.match("PUT" if methods and "PUT" in methods else "POST", "/api/chat")
    assert match is not None
    assert match.rule == Rule(CHAT, pattern, methods)


# ---------------------------------------------------------------------------
# Precedence: (id, widget_pages, chat_routes, method, path, source of the winner)
# ---------------------------------------------------------------------------
RX = re.compile(r"/c/\d")
PRECEDENCE: list[tuple[str, Patterns, Patterns, str, str, str]] = [
    ("chat-beats-widget-exact", ["/c"], ["/c"], "GET", "/c", "/c"),
    ("chat-pattern-beats-widget-exact", ["/c/1"], ["/c/{id}"], "GET", "/c/1", "/c/{id}"),
    ("chat-regex-beats-widget-exact", ["/c/1"], [RX], "GET", "/c/1", RX.pattern),
    ("chat-beats-widget-pattern", ["/**"], ["/c"], "GET", "/c", "/c"),
    ("widget-when-chat-method-differs", ["/c"], ["POST /c"], "GET", "/c", "/c"),
    ("widget-exact-beats-widget-pattern", ["/d/*", "/d/x"], [], "GET", "/d/x", "/d/x"),
    ("widget-exact-after-chat-miss", ["/d/*", "/d/x"], ["/e/{x}"], "GET", "/d/x", "/d/x"),
    ("chat-exact-beats-chat-pattern", [], ["/c/{id}", "/c/new"], "POST", "/c/new", "/c/new"),
    ("chat-exact-beats-chat-regex", [], [RX, "/c/1"], "POST", "/c/1", "/c/1"),
    ("first-pattern-wins", [], ["/c/{a}", "/c/*"], "POST", "/c/1", "/c/{a}"),
    ("first-pattern-wins-reversed", [], ["/c/*", "/c/{a}"], "POST", "/c/1", "/c/*"),
    ("first-regex-before-template", [], [RX, "/c/{a}"], "POST", "/c/1", RX.pattern),
    ("first-template-before-regex", [], ["/c/{a}", RX], "POST", "/c/1", "/c/{a}"),
    ("template-regex-template", [], ["/x/{a}", RX, "/c/{a}"], "POST", "/c/1", RX.pattern),
    ("first-exact-duplicate-wins", [], ["POST /c", "/c"], "POST", "/c", "POST /c"),
    ("exact-after-method-miss", [], ["POST /c", "/c"], "PUT", "/c", "/c"),
    ("pattern-after-method-miss", [], ["POST /c/*", "/c/{a}"], "PUT", "/c/1", "/c/{a}"),
]


@pytest.mark.parametrize(
    ("widget", "chat", "method", "path", "source"),
    [case[1:] for case in PRECEDENCE],
    ids=[case[0] for case in PRECEDENCE],
)
def test_precedence(widget: Patterns, chat: Patterns, method: str, path: str, source: str) -> None:
    match = RuleSet(widget, chat).match(method, path)
    assert match is not None
    assert match.rule.source == source


# ---------------------------------------------------------------------------
# Configuration errors: (id, argument, its value, fragments the message needs).
# The other argument is empty. When the value is a list, the message must also
# name the argument and the index of its last item, which is the bad one.
# ---------------------------------------------------------------------------
W, C = "widget_pages", "chat_routes"
ERRORS: list[tuple[str, str, Any, list[str]]] = [
    ("bad-method", C, ["PSOT /api/chat"], ["'PSOT' is not an HTTP method in 'PSOT /api/chat'"]),
    ("bad-method-in-list", C, ["/ok", "GET,PSOT /x"], ["'PSOT'", "'GET,PSOT /x'", "POST"]),
    ("extension-method", C, ["PROPFIND /x"], ["'PROPFIND' is not an HTTP method"]),
    (
        "no-leading-slash",
        W,
        ["/", "/x", "docs/*"],
        ["'docs/*' must start with '/' (e.g. '/docs/*')"],
    ),
    ("no-slash-after-method", C, ["POST api/chat"], ["'api/chat' must start", "'POST /api/chat'"]),
    ("leading-space", W, ["  /x"], ["'  /x' must start with '/'", "'/x'"]),
    ("word-not-path", W, ["pricing"], ["'pricing' must start with '/'", "'/pricing'"]),
    ("method-without-path", C, ["POST"], ["no path in 'POST'"]),
    (
        "unknown-convertor",
        C,
        ["/ok", "/c/{id:integer}"],
        ["unknown convertor 'integer' in '/c/{id:integer}'", "float, int, path, str, uuid"],
    ),
    ("empty-convertor", C, ["/c/{id:}"], ["unknown convertor '' in '/c/{id:}'"]),
    ("unclosed-brace", C, ["/c/{id"], ["unbalanced", "'/c/{id'", "'{'"]),
    ("unopened-brace", C, ["/c/id}"], ["unbalanced", "'/c/id}'", "'}'"]),
    ("nested-brace", C, ["/c/{a{b}}"], ["unbalanced", "'/c/{a{b}}'"]),
    ("empty-param", C, ["/c/{}"], ["'{}' has no name in '/c/{}'", "'{id}'"]),
    ("empty-param-with-convertor", C, ["/c/{:int}"], ["'{:int}' has no name"]),
    ("param-not-identifier", C, ["/c/{1d}"], ["'1d' in '/c/{1d}' is not an identifier"]),
    ("param-with-dash", W, ["/p/{my-slug}"], ["'my-slug'", "not an identifier"]),
    (
        "duplicate-param",
        C,
        ["/u/{id}/{id:int}"],
        ["duplicate parameter 'id' in '/u/{id}/{id:int}'"],
    ),
    ("widget-post", W, ["POST /x"], ["only match GET", "'POST' in 'POST /x'", "chat_routes"]),
    ("widget-head", W, ["HEAD /x"], ["only match GET", "'HEAD'"]),
    ("widget-get-and-post", W, ["/", "GET,POST /x"], ["'POST' in 'GET,POST /x'"]),
    (
        "chat-options",
        C,
        ["OPTIONS /c"],
        ["'OPTIONS' requests never count as a chat", "'OPTIONS /c'"],
    ),
    ("chat-head", C, ["GET,HEAD /c"], ["'HEAD' requests never count as a chat", "'GET,HEAD /c'"]),
    ("bare-string", W, "/", [f"{W} must be a list of patterns, not a single string", "['/']"]),
    ("bare-string-chat", C, "POST /c", [f"{C} must be a list of patterns, not a single string"]),
    ("bare-bytes", W, b"/", [f"{W} must be a list of patterns, not a single string"]),
    ("bare-regex", C, re.compile("/c"), [f"{C} must be a list of patterns, not a single regex"]),
    ("not-iterable", W, None, [f"{W} must be a list of patterns, not NoneType"]),
    ("bytes-regex", C, [re.compile(b"/c")], ["bytes regex", "b'/c'", "re.compile('/c')"]),
    ("int-item", W, ["/", 42], ["got int (42)"]),
    ("bytes-item", W, [b"/x"], ["got bytes (b'/x')"]),
    ("none-item", C, [None], ["got NoneType"]),
    ("empty-pattern", W, [""], ["empty pattern"]),
    ("empty-regex", C, [re.compile("")], ["empty regex"]),
    # A regex must match the whole path: without its "/" it matched nothing, unsaid.
    (
        "regex-no-leading-slash",
        C,
        [re.compile(r"api/v\d+/chat")],
        ["must match the whole path, which starts with '/'", "re.compile('/api/v\\\\d+/chat')"],
    ),
    ("regex-anchored-no-slash", W, [re.compile("^pricing$")], ["re.compile('^/pricing$')"]),
    (
        "regex-no-slash-flags",
        W,
        [re.compile("pricing", re.IGNORECASE)],
        ["re.compile('/pricing', re.IGNORECASE)"],
    ),
    # Rules that could never match the decoded path they are tried on.
    ("query", W, ["/pricing?plan=pro"], ["without a ?query or #fragment", "write '/pricing'"]),
    # The fix suggested keeps the rule's methods: without them it matches every method.
    ("query-chat", C, ["POST /c?stream=1"], ["'/c?stream=1'", "write 'POST /c'"]),
    ("fragment", W, ["/docs/#intro"], ["#fragment", "write '/docs/'"]),
    ("only-query", W, ["/?x=1"], ["write '/'"]),
    ("percent-escape", W, ["/caf%C3%A9"], ["match the decoded path", "write '/café'"]),
    ("escaped-question-mark", W, ["/what%3F"], ["re.compile('/what\\\\?')"]),
    ("question-mark-in-convertor", W, ["/x/{opt:ab?}"], ["unknown convertor 'ab?'"]),
    ("trailing-blank", C, ["POST /api/chat "], ["'/api/chat ' has blanks", "'POST /api/chat'"]),
    ("percent-escape-chat", C, ["POST /caf%C3%A9"], ["write 'POST /café'"]),
    # The column counts in the rule as written, methods included.
    ("unclosed-brace-chat", C, ["POST /c/{id"], ["'{' has no closing '}' at column 8"]),
    # A regular expression written as a string: it started, and never matched.
    ("regex-anchored", C, ["^/api/chat$"], ["regular expression", "re.compile('^/api/chat$')"]),
    # Typos whose advice must be what was meant, not the text with a "/" before it.
    ("method-glued", C, ["POST/api/chat"], ["(e.g. 'POST /api/chat')"]),
    ("method-comma", C, ["POST, /api/chat"], ["(e.g. 'POST /api/chat')"]),
    ("method-colon", C, ["post:/api/chat"], ["(e.g. 'POST /api/chat')"]),
    ("method-brackets", C, ["[POST] /api/chat"], ["(e.g. 'POST /api/chat')"]),
    ("whole-url", W, ["https://shop.example/"], ["(e.g. '/')"]),
    ("whole-url-path", C, ["POST https://shop.example/api/chat"], ["(e.g. 'POST /api/chat')"]),
]


@pytest.mark.parametrize(
    ("argument", "value", "fragments"),
    [case[1:] for case in ERRORS],
    ids=[case[0] for case in ERRORS],
)
def test_config_errors(argument: str, value: Any, fragments: list[str]) -> None:
    if isinstance(value, list):
        fragments = [f"{argument}[{len(value) - 1}]: ", *fragments]
    with pytest.raises(ValueError) as info:  # noqa: PT011 - the message is checked below
        RuleSet(value, []) if argument == W else RuleSet([], value)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize(
    "pattern", [r".*/chat", r"a?/chat", r"x|/chat", r"(?i)/CHAT", r"\/chat", r"[/]chat", r"(/chat)"]
)
def test_a_regex_that_may_start_with_a_slash_is_taken(pattern: str) -> None:
    assert RuleSet([], [re.compile(pattern)]).match("POST", "/chat") is not None


# ---------------------------------------------------------------------------
# Odds and ends
# ---------------------------------------------------------------------------
def test_empty_ruleset_is_falsy() -> None:
    assert not RuleSet([], [])
    assert RuleSet(["/"], [])
    assert RuleSet([], [re.compile("/c")])
    assert RuleSet([], []).match("GET", "/") is None


def test_accepts_any_iterable() -> None:
    rules = RuleSet((p for p in ["/a"]), ("POST /c",))
    assert kind_of(rules.match("GET", "/a")) == WIDGET
    assert kind_of(rules.match("POST", "/c")) == CHAT


def test_same_param_name_in_many_rules() -> None:
    # Templates share one compiled alternation; their groups must not clash.
    rules = RuleSet(["/p/{id}"], ["/a/{id}", "/b/{id:int}", "/c/{id:uuid}"])
    assert rules.match("GET", "/p/x") == Match(Rule(WIDGET, "/p/{id}", None), {"id": "x"})
    assert rules.match("POST", "/b/7") == Match(Rule(CHAT, "/b/{id:int}", None), {"id": "7"})
    match = rules.match("POST", f"/c/{UUID}")
    assert match is not None
    assert uuid.UUID(match.params["id"]) == uuid.UUID(UUID)


def test_identical_rules_twice() -> None:
    rules = RuleSet(["/p/{id}", "/p/{id}"], ["/p/{id}", "/p/{id}"])
    assert kind_of(rules.match("GET", "/p/1")) == CHAT


def test_many_rules() -> None:
    chat = [f"/c{i}/{{a}}/{{b:int}}" for i in range(300)]
    rules = RuleSet([], chat)
    match = rules.match("POST", "/c299/x/5")
    assert match is not None
    assert match.rule.source == "/c299/{a}/{b:int}"
    assert match.params == {"a": "x", "b": "5"}
    assert rules.match("POST", "/c300/x/5") is None


def test_params_are_not_shared_between_matches() -> None:
    rules = RuleSet(["/"], ["/c/{id}"])
    first = rules.match("GET", "/")
    assert first is not None
    first.params["x"] = "y"
    assert rules.match("GET", "/") == Match(Rule(WIDGET, "/", None), {})
    hit = rules.match("POST", "/c/1")
    assert hit is not None
    hit.params["id"] = "changed"
    assert rules.match("POST", "/c/1") == Match(Rule(CHAT, "/c/{id}", None), {"id": "1"})


def test_rule_and_match_are_frozen() -> None:
    match = RuleSet(["/"], []).match("GET", "/")
    assert match is not None
    with pytest.raises(AttributeError):
        match.rule = Rule(CHAT, "/", None)  # type: ignore[misc]
    with pytest.raises(AttributeError):
        match.rule.kind = CHAT  # type: ignore[misc]


def test_repr_lists_sources() -> None:
    rules = RuleSet(["/"], ["POST /c", re.compile(r"/v\d")])
    assert repr(rules) == r"RuleSet(widget_pages=['/'], chat_routes=['POST /c', '/v\\d'])"


@pytest.mark.parametrize(
    ("regex", "prefix"),
    [
        (re.compile(r"/v(?P<ver>\d+)/chat"), "/v"),
        (re.compile(r"/api/chat"), "/api/chat"),
        (re.compile(r"^/api/chat"), "/api/chat"),
        (re.compile(r"/ab?c"), "/a"),
        (re.compile(r"/ab*c"), "/a"),
        (re.compile(r"/ab{0,2}c"), "/a"),
        (re.compile(r"/ab+c"), "/ab"),
        (re.compile(r"/a.c"), "/a"),
        (re.compile(r"/a\.c"), "/a"),
        (re.compile(r"/a[bc]"), "/a"),
        (re.compile(r"/a|/b"), ""),
        (re.compile(r"/a(?:b|c)"), ""),
        (re.compile(r"/api", re.IGNORECASE), ""),
        (re.compile(r"(?i)/api"), ""),
        (re.compile(r"/api", re.VERBOSE), ""),
        (re.compile(r".*/chat"), ""),
    ],
    ids=[
        "named-group",
        "all-literal",
        "caret",
        "optional",
        "star",
        "braces",
        "plus-keeps",
        "dot",
        "escape",
        "class",
        "alternation",
        "inner-alternation",
        "ignorecase",
        "inline-ignorecase",
        "verbose",
        "leading-wildcard",
    ],
)
def test_regex_prefix_is_conservative(regex: re.Pattern[str], prefix: str) -> None:
    assert _regex_prefix(regex) == prefix


# ---------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------
exact_paths = st.text(
    alphabet=st.characters(exclude_characters="*{}", exclude_categories=["Cs"]), max_size=12
).map(lambda tail: "/" + tail)


# What a rule may be: refused are the paths no request can have (see the "query" errors).
rule_paths = exact_paths.filter(
    lambda path: path == path.strip() and not re.search(r"[?#]|%[0-9A-Fa-f]{2}", path)
)


@given(
    widget=st.lists(rule_paths, max_size=6),
    chat=st.lists(rule_paths, max_size=6),
    probes=st.lists(exact_paths, max_size=6),
)
def test_exact_rules_match_exactly_their_paths(
    widget: list[str], chat: list[str], probes: list[str]
) -> None:
    rules = RuleSet(widget, chat)
    configured = set(widget) | set(chat)
    for path in [*widget, *chat, *probes]:
        match = rules.match("GET", path)
        assert (match is not None) == (path in configured)
        if match is not None:
            assert match.rule.kind == (CHAT if path in chat else WIDGET)
            assert match.params == {}


segment_literal = st.text(alphabet="abcxyz-._~", min_size=1, max_size=4)
pieces = st.lists(
    st.one_of(
        segment_literal.map(lambda s: (s, s, None)),
        st.integers(0, 10**6).map(lambda n: ("{%s:int}", str(n), str(n))),
        segment_literal.map(lambda s: ("{%s}", s, s)),
        segment_literal.map(lambda s: ("*", s, None)),
    ),
    min_size=1,
    max_size=5,
)


@given(pieces=pieces, noise=st.lists(rule_paths, max_size=4))
def test_template_matches_its_own_paths(
    pieces: list[tuple[str, str, str | None]], noise: list[str]
) -> None:
    # Build a pattern and a path that fits it; whatever else is configured,
    # the prefilter must never hide that match.
    pattern_parts, path_parts, params = [], [], {}
    for index, (template, value, param) in enumerate(pieces):
        if param is None:
            pattern_parts.append(template)
        else:
            name = f"p{index}"
            pattern_parts.append(template % name)
            params[name] = param
        path_parts.append(value)
    pattern = "/" + "/".join(pattern_parts)
    path = "/" + "/".join(path_parts)
    rules = RuleSet(noise, [*noise, pattern])
    match = rules.match("POST", path)
    assert match is not None
    if path not in noise:
        assert match.rule.source == pattern
        assert match.params == params


@pytest.mark.parametrize(
    ("rule", "advice"),
    [
        (r"/v\d+/chat", r"re.compile('/v\\d+/chat')"),
        ("/api/(chat|message)", "re.compile('/api/(chat|message)')"),
        ("POST /api/chat$", "re.compile('/api/chat$')"),
        ("/docs/[a-z]+", "re.compile('/docs/[a-z]+')"),
        ("/blog/[slug]", "write {slug} for a path parameter"),
    ],
)
def test_a_rule_that_looks_like_a_regex_is_taken_as_a_path_and_said(
    rule: str, advice: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Such a rule started and never matched, silently. It is not refused: a request for
    # "/a%7Cb" does have a "|" in its decoded path.
    rules = RuleSet(widget_pages=[], chat_routes=[rule])
    [warning] = [r for r in caplog.records if r.levelname == "WARNING"]
    assert "looks like a regular expression" in warning.getMessage()
    assert advice in warning.getMessage()
    literal = rule.removeprefix("POST ")
    assert rules.match("POST", literal) is not None  # character for character


@pytest.mark.parametrize("rule", ["/docs/v1.*", "/files/*.*", "/api/chat.*", "/items/{id}.*"])
def test_glob_rules_with_a_dot_are_plain_rules(rule: str, caplog: pytest.LogCaptureFixture) -> None:
    rules = RuleSet(widget_pages=[rule], chat_routes=[])
    assert caplog.records == []
    path = rule.replace("{id}", "7").replace("*", "x")
    assert rules.match("GET", path) is not None
