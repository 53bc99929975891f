"""Classify a request's (method, path) as a widget page view or a chat API call.

Rules are parsed, validated and compiled once, when the middleware is built.
``RuleSet.match`` then runs on every request of the host app, so the common
case, a path that matches no rule, costs one dict lookup and one
``str.startswith`` and allocates nothing.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import unquote, urlsplit

from ._log import logger

__all__ = ["CHAT", "WIDGET", "Match", "Rule", "RuleSet"]

WIDGET = "widget"
CHAT = "chat"

_HTTP_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)
# A browser sends an OPTIONS preflight before every cross-origin chat POST, and
# HEAD is a probe with no body: counting either would inflate the chat count.
_NEVER_CHAT = frozenset({"HEAD", "OPTIONS"})

_CONVERTORS = {
    "float": r"[0-9]+(?:\.[0-9]+)?",
    "int": "[0-9]+",
    "path": ".*",
    "str": "[^/]+",
    # As Starlette's: its router sends a hyphen-less UUID to the route too.
    "uuid": "[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}",
}

# Methods are only looked for when the text does not start with "/", so a
# path that happens to contain spaces is never mistaken for "METHOD path".
_METHODS_THEN_PATH = re.compile(r"([A-Za-z]+(?:\s*[,|]\s*[A-Za-z]+)*)\s+(.*)", re.DOTALL)
_ONLY_METHODS = re.compile(r"[A-Za-z]+(?:\s*[,|]\s*[A-Za-z]+)*\s*")
_METHOD_SEPARATOR = re.compile(r"\s*[,|]\s*")
# A lone "{" or "}" is reported as unbalanced; "{...}" must not nest.
_SPECIAL = re.compile(r"\*\*?|\{([^{}]*)\}|[{}]")

# Characters that are always literal in a regex (outside a class). Used to read
# a safe literal prefix off a user's compiled regex for the prefilter.
_REGEX_LITERAL = frozenset("/_-~%,;=@:!&'")
_QUANTIFIERS = frozenset("*?{")


@dataclass(frozen=True, slots=True)
class Rule:
    """One configured rule; ``source`` is the text as given, for logs and metadata."""

    kind: str
    source: str
    methods: frozenset[str] | None


class Match(NamedTuple):
    """A request that matched ``rule``, with the path parameters it captured.

    A named tuple rather than a frozen dataclass: one is built on every matching
    request, and a tuple is built in C (a frozen dataclass costs ~0.5 us more).
    """

    rule: Rule
    params: dict[str, str]


# (group name in the combined regex, parameter name as the user spelled it)
_Groups = tuple[tuple[str, str], ...]


class _Compiled(NamedTuple):
    rule: Rule
    exact: str | None  # the path, for rules without wildcards or parameters
    regex: str | None  # source of a generated (glob/template) pattern
    user: re.Pattern[str] | None  # a regex the user compiled
    groups: _Groups
    prefix: str  # literal text every matching path starts with
    position: int  # index among all rules; names the rule's regex groups
    wildcards: int = 0  # variable-length parts of a generated pattern (see _max_length)


class _Matcher(NamedTuple):
    regex: re.Pattern[str]
    # Generated rules share one alternation; ``lastgroup`` names the winner.
    # None for a user regex, which is matched on its own.
    dispatch: dict[str | None, tuple[Rule, _Groups]] | None
    rule: Rule | None
    # Longer paths are not tried (see _max_length).
    max_length: int = sys.maxsize


def _max_length(wildcards: int) -> int:
    """The longest path a generated pattern is tried on, by the degree k of its worst case
    (see _translate: one more than its branching parts). ``re`` backtracks: a path of
    near-matches costs time of the order of its length to the k-th power
    (``/docs/**/v/**/index.html`` held uvicorn's event loop 4.8 s on one 64 KB request
    path; ``/d/**/v/**/w/**/z`` 0.7 s on 2 KB, 24 s on 8 KB; ``/*-*/*-*/*-*/end``, k=4,
    8 s on 907 chars). Bounded so that length**k stays near a million steps, a few ms
    (tens at worst); paths that long name no real page or chat route. k <= 1 is linear,
    however long the path."""
    if wildcards <= 1:
        return sys.maxsize
    return int(_MATCH_BUDGET ** (1 / wildcards))


#: The backtracking steps a pattern of several competing parts may take on one path.
_MATCH_BUDGET = 1_000_000


class _Table(NamedTuple):
    exact: dict[str, Rule]
    prefixes: tuple[str, ...]
    matchers: tuple[_Matcher, ...]


class RuleSet:
    """The widget-page and chat-route rules, compiled for fast per-request matching."""

    __slots__ = ("_other", "_tables", "exact_matches", "prefixes", "rules")

    def __init__(
        self,
        widget_pages: Iterable[str | re.Pattern[str]],
        chat_routes: Iterable[str | re.Pattern[str]],
    ) -> None:
        compiled: list[_Compiled] = []
        # Chat rules go first: precedence is "chat beats widget", and building
        # every table in precedence order lets the first hit win.
        for argument, kind, items in (
            ("chat_routes", CHAT, chat_routes),
            ("widget_pages", WIDGET, widget_pages),
        ):
            for index, item in enumerate(_as_list(argument, items)):
                where = f"{argument}[{index}]"
                compiled.append(_compile(where, kind, item, len(compiled)))
        self.rules: tuple[Rule, ...] = tuple(c.rule for c in compiled)
        # One table per method so that method filtering costs nothing at match
        # time; ``_other`` serves extension methods, which only default chat
        # rules can match.
        self._tables = {method: _build_table(compiled, method) for method in _HTTP_METHODS}
        self._other = _build_table(compiled, None)
        # The glue's per-request prefilter, inlined in its ``__call__``: a path that
        # is not a key of ``exact_matches`` and does not start with one of
        # ``prefixes`` matches no rule under any method, so most requests never
        # call ``match``. The union over every table keeps that a safe "no".
        tables = (*self._tables.values(), self._other)
        self.prefixes: tuple[str, ...] = _minimal_prefixes(
            {prefix for table in tables for prefix in table.prefixes}
        )
        # An exact path's answer depends on nothing but (method, path), so it is
        # worked out here once; methods not listed (extension or lower-case ones)
        # go to ``match``. The Match objects, and their empty params, are shared
        # by all requests: nothing ever mutates them.
        self.exact_matches: dict[str, dict[str, Match | None]] = {
            path: {method: self.match(method, path) for method in _HTTP_METHODS}
            for path in {path for table in tables for path in table.exact}
        }

    def match(self, method: str, path: str) -> Match | None:
        """Return the rule matching this request, or None."""
        table = self._tables.get(method)
        if table is None:
            table = self._tables.get(method.upper(), self._other)
        exact, prefixes, matchers = table
        rule = exact.get(path)
        if rule is None:
            # The per-request miss path: keep it to this one test.
            if path.startswith(prefixes):
                return _scan(matchers, path, chat_only=False)
            return None
        if rule.kind == CHAT or not path.startswith(prefixes):
            return Match(rule, {})
        # An exact widget page still loses to a chat pattern.
        return _scan(matchers, path, chat_only=True) or Match(rule, {})

    def __bool__(self) -> bool:
        return bool(self.rules)

    def __repr__(self) -> str:
        widget = [r.source for r in self.rules if r.kind == WIDGET]
        chat = [r.source for r in self.rules if r.kind == CHAT]
        return f"RuleSet(widget_pages={widget!r}, chat_routes={chat!r})"


def _scan(matchers: tuple[_Matcher, ...], path: str, *, chat_only: bool) -> Match | None:
    for regex, dispatch, rule, max_length in matchers:
        if len(path) > max_length:
            continue
        found = regex.fullmatch(path)
        if found is None:
            continue
        if dispatch is not None:
            rule, groups = dispatch[found.lastgroup]
            params = {name: found[group] for group, name in groups}
        elif rule is not None:
            params = {k: v for k, v in found.groupdict().items() if v is not None}
        else:  # pragma: no cover - every matcher has one or the other
            continue
        # Matchers run in precedence order, chat rules first, so the first
        # widget hit means no chat pattern matches this path.
        if chat_only and rule.kind == WIDGET:
            return None
        return Match(rule, params)
    return None


def _as_list(argument: str, items: Iterable[str | re.Pattern[str]]) -> list[str | re.Pattern[str]]:
    # A bare string is iterable, so without this check "/pricing" would become
    # nine one-character rules and fail with a confusing message.
    if isinstance(items, (str, bytes)):
        raise ValueError(
            f"{argument} must be a list of patterns, not a single string: "
            f"write {argument}=[{items!r}]"
        )
    if isinstance(items, re.Pattern):
        raise ValueError(
            f"{argument} must be a list of patterns, not a single regex: "
            f"write {argument}=[re.compile({items.pattern!r})]"
        )
    try:
        return list(items)
    except TypeError:
        raise ValueError(
            f"{argument} must be a list of patterns, not {type(items).__name__}"
        ) from None


def _compile(where: str, kind: str, item: object, position: int) -> _Compiled:
    if isinstance(item, re.Pattern):
        pattern = item.pattern
        if isinstance(pattern, bytes):
            example = pattern.decode(errors="replace")
            raise ValueError(
                f"{where}: bytes regex {item!r} cannot match a str path; "
                f"compile a str pattern instead, e.g. re.compile({example!r})"
            )
        if not pattern:
            raise ValueError(f"{where}: empty regex; it would only match an empty path")
        if _starts_without_slash(item):
            # A regex must match the whole path (fullmatch), which starts with "/": refused
            # as a string rule without its "/" is, not left to match nothing in silence.
            anchor = "^" if pattern.startswith("^") else ""
            fixed = anchor + "/" + pattern[len(anchor) :]
            flags = item.flags & ~re.UNICODE  # str patterns have it whatever was written
            with_flags = f", {re.RegexFlag(flags)}" if flags else ""
            raise ValueError(
                f"{where}: {item!r} must match the whole path, which starts with '/'; "
                f"write re.compile({fixed!r}{with_flags})"
            )
        rule = Rule(kind, pattern, None)
        return _Compiled(rule, None, None, item, (), _regex_prefix(item), position)
    if not isinstance(item, str):
        raise ValueError(
            f"{where}: expected a str or re.Pattern[str], got {type(item).__name__} ({item!r})"
        )
    if not item:
        raise ValueError(f"{where}: empty pattern; use '/' for the site root")
    methods: frozenset[str] | None = None
    path = item
    if not item.startswith("/"):
        split = _METHODS_THEN_PATH.fullmatch(item)
        if split is not None:
            methods = _parse_methods(where, kind, item, split[1])
            path = split[2]
        elif _ONLY_METHODS.fullmatch(item) and all(
            token.upper() in _HTTP_METHODS for token in _METHOD_SEPARATOR.split(item.strip())
        ):
            raise ValueError(f"{where}: no path in {item!r}; write e.g. '{item.strip()} /api/chat'")
    # What comes before the path (its methods), kept in every fix suggested: a suggestion
    # without them would widen a POST-only rule to every method.
    lead = item[: len(item) - len(path)]
    if not path.startswith("/"):
        if path.startswith("^"):
            raise ValueError(
                f"{where}: {path!r} is a regular expression written as a string; "
                f"pass re.compile({path!r})"
            )
        raise ValueError(f"{where}: {path!r} must start with '/' (e.g. {lead + _suggest(path)!r})")
    _check_path(where, path, lead)
    rule = Rule(kind, item, methods)
    regex, groups, prefix, wildcards = _translate(where, item, path, position)
    if regex is None:
        return _Compiled(rule, path, None, None, (), path, position)
    if wildcards >= 3:
        logger.warning(
            "%s: %r has %d wildcards or parameters that may match the same characters: it "
            "is only tried on paths of up to %d characters (matching a longer one could take "
            "seconds); fewer such parts lift the bound, as does re.compile() of a regex whose "
            "parts cannot compete (the same pattern as a regex backtracks the same)",
            where,
            item,
            wildcards,
            _max_length(wildcards),
        )
    return _Compiled(rule, None, regex, None, groups, prefix, position, wildcards)


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_GLUED_METHOD = re.compile(r"\[?([A-Za-z]+)\]?[^A-Za-z/]*(/.*)", re.DOTALL)
_PERCENT = re.compile(r"%[0-9A-Fa-f]{2}")
_PARAMETER = re.compile(r"\{[^{}]*\}")


def _suggest(path: str) -> str:
    """What a pattern that does not start with "/" was most likely meant to be."""
    if _URL.match(path):
        return urlsplit(path).path or "/"  # a whole URL: its path
    glued = _GLUED_METHOD.fullmatch(path.strip())
    if glued is not None and glued[1].upper() in _HTTP_METHODS:
        return f"{glued[1].upper()} {glued[2]}"  # "POST/api/chat", "POST:/x", "[POST] /x"
    return "/" + path.lstrip().lstrip("/")


# In a string rule, signs of a regular expression written as a string: "\d", "(a|b)",
# "^...", "...$", "[a-z]", ".+" ("*" is a glob wildcard: "/v1.*" is a fine rule).
_REGEX_LIKE = re.compile(r"[\\|^\[\]]|\.\+|\$\Z")
_BRACKET_NAME = re.compile(r"\[([A-Za-z_][A-Za-z0-9_]*)\]")


def _check_path(where: str, path: str, lead: str = "") -> None:
    """Refuse what a path the rules are matched against (decoded, without query) can never
    hold, and would thus make a rule that silently never matches. ``lead`` is what the rule
    has before its path (its methods), kept in the fix suggested."""
    if path != path.strip():
        raise ValueError(f"{where}: {path!r} has blanks around it; write {lead + path.strip()!r}")
    # Outside {parameters}: a template's convertor is reported as such (_translate).
    literal = _PARAMETER.sub(lambda match: "_" * len(match[0]), path)
    cut = min((i for i in (literal.find("?"), literal.find("#")) if i >= 0), default=-1)
    if cut >= 0:
        raise ValueError(
            f"{where}: {path!r}: rules match the path alone, without a ?query or #fragment; "
            f"write {lead + (path[:cut] or '/')!r}"
        )
    if _REGEX_LIKE.search(literal):
        # Said, not refused: the decoded path of a request for "/a%7Cb" does hold a "|".
        bracket = _BRACKET_NAME.search(literal)
        advice = (
            f"write {{{bracket[1]}}} for a path parameter"
            if bracket
            else f"pass re.compile({path!r}) for a regular expression"
        )
        logger.warning(
            "%s: %r is matched as a path, character for character (with *, ** and "
            "{param}); it looks like a regular expression: %s",
            where,
            path,
            advice,
        )
    if _PERCENT.search(literal):
        decoded = unquote(path)
        advice = (
            # An escaped "?" or "#": only a regex can name a path holding one.
            f"match it with re.compile({re.escape(decoded)!r})"
            if "?" in decoded or "#" in decoded
            else f"write {lead + decoded!r}"
        )
        raise ValueError(
            f"{where}: {path!r}: rules match the decoded path (as the app's router sees it); "
            f"{advice}"
        )


def _parse_methods(where: str, kind: str, item: str, text: str) -> frozenset[str]:
    methods = []
    for token in _METHOD_SEPARATOR.split(text):
        method = token.upper()
        if method not in _HTTP_METHODS:
            raise ValueError(
                f"{where}: {token!r} is not an HTTP method in {item!r}; "
                f"use one of {', '.join(sorted(_HTTP_METHODS))}"
            )
        if kind == WIDGET and method != "GET":
            raise ValueError(
                f"{where}: widget pages are page views and only match GET, "
                f"not {token!r} in {item!r}; drop the method or move the rule to chat_routes"
            )
        if kind == CHAT and method in _NEVER_CHAT:
            raise ValueError(
                f"{where}: {token!r} requests never count as a chat (HEAD and OPTIONS "
                f"are excluded), so {item!r} could not match; remove {token!r}"
            )
        methods.append(method)
    return frozenset(methods)


def _translate(
    where: str, item: str, path: str, position: int
) -> tuple[str | None, _Groups, str, int]:
    """Turn a glob/template path into regex source; None means an exact path. Also says
    the degree of its worst case on a long path (0 or 1: linear; see _max_length)."""
    parts: list[str] = []
    groups: list[tuple[str, str]] = []
    prefix: str | None = None
    literal_start = 0
    # Parts whose end a matcher may have to try at many places ("branching"): a part
    # followed by another one, when the characters between them (or the next part itself,
    # if they touch) could also be taken by the part. Each multiplies the work of what
    # follows by the path's length; one that ends where the next literal starts ("{user}/",
    # "{year:int}-"), or the last part, only scans. See _max_length.
    branching = 0
    previous: str | None = None  # the characters the previous variable part may take
    for special in _SPECIAL.finditer(path):
        token = special[0]
        if token == "{" or token == "}":
            side = "opening '{' has no closing '}'" if token == "{" else "'}' has no opening '{'"
            raise ValueError(
                f"{where}: unbalanced braces in {item!r}: {side} at column "
                f"{len(item) - len(path) + special.start()}; "
                "write parameters as '{name}' or '{name:int}'"
            )
        if prefix is None:
            prefix = path[: special.start()]
        between = path[literal_start : special.start()]
        if previous is not None and (not between or _may_take(previous, between[0])):
            branching += 1
        parts.append(re.escape(between))
        literal_start = special.end()
        if token == "**":
            previous = "path"
            parts.append(".*")
        elif token == "*":
            previous = "str"
            parts.append("[^/]*")
        else:
            name, colon, convertor = special[1].partition(":")
            if not name:
                raise ValueError(
                    f"{where}: parameter {token!r} has no name in {item!r}; "
                    "name it, e.g. '{id}' or '{id:int}'"
                )
            if not name.isidentifier():
                raise ValueError(
                    f"{where}: parameter name {name!r} in {item!r} is not an identifier; "
                    "use letters, digits and '_', not starting with a digit"
                )
            if any(name == existing for _, existing in groups):
                raise ValueError(
                    f"{where}: duplicate parameter {name!r} in {item!r}; "
                    "give each parameter a distinct name"
                )
            if not colon:
                convertor = "str"
            # A uuid's length is fixed, give or take hyphens: a few ends, not the path's length.
            previous = None if convertor == "uuid" else convertor
            if convertor not in _CONVERTORS:
                raise ValueError(
                    f"{where}: unknown convertor {convertor!r} in {item!r}; "
                    f"use one of {', '.join(sorted(_CONVERTORS))}"
                )
            # User names may clash across rules sharing one alternation, so
            # groups get positional names and are mapped back on a hit.
            group = f"r{position}_{len(groups)}"
            groups.append((group, name))
            parts.append(f"(?P<{group}>{_CONVERTORS[convertor]})")
    if prefix is None:
        return None, (), path, 0
    parts.append(re.escape(path[literal_start:]))
    # k branching parts: up to length**k ends tried, each followed by a linear scan.
    return "".join(parts), tuple(groups), prefix, branching + 1 if branching else 0


def _may_take(convertor: str, char: str) -> bool:
    """Whether a part of this convertor ("*" is "str", "**" is "path") may match ``char``."""
    if convertor == "path":
        return True
    if convertor == "int":
        return char in "0123456789"
    if convertor == "float":
        return char in "0123456789."
    return char != "/"


def _starts_without_slash(pattern: re.Pattern[str]) -> bool:
    """Whether every fullmatch of ``pattern`` starts with a literal character other than
    "/" (so it matches no path). Conservative: False when unsure."""
    text = pattern.pattern
    if pattern.flags & re.VERBOSE or "|" in text:
        return False
    if text.startswith("^"):
        text = text[1:]
    first, after = text[:1], text[1:2]
    return (
        first != "/" and (first.isalnum() or first in _REGEX_LITERAL) and after not in _QUANTIFIERS
    )


def _regex_prefix(pattern: re.Pattern[str]) -> str:
    """Literal text every fullmatch of ``pattern`` starts with; "" if unsure.

    Deliberately conservative: a wrong prefix would silently drop matches,
    while a too-short one only costs speed.
    """
    if pattern.flags & (re.IGNORECASE | re.VERBOSE):
        return ""
    text = pattern.pattern
    # Any "|" might be a top-level alternation that makes the prefix optional.
    if "|" in text:
        return ""
    # "^" is a no-op at the start of a fullmatch.
    if text.startswith("^") and text[1:2] and text[1:2] in _REGEX_LITERAL:
        text = text[1:]
    end = 0
    while end < len(text) and (text[end].isalnum() or text[end] in _REGEX_LITERAL):
        end += 1
    # A quantifier after the last literal may make that character optional.
    if end and text[end : end + 1] in _QUANTIFIERS:
        end -= 1
    return text[:end]


def _applies(rule: Rule, method: str | None) -> bool:
    """Whether ``rule`` can match ``method``; None stands for any extension method."""
    if rule.kind == WIDGET:
        return method == "GET"
    if rule.methods is None:
        return method not in _NEVER_CHAT
    return method in rule.methods


def _build_table(compiled: list[_Compiled], method: str | None) -> _Table:
    exact: dict[str, Rule] = {}
    prefixes: set[str] = set()
    matchers: list[_Matcher] = []
    run: list[_Compiled] = []

    def flush_run() -> None:
        if run:
            # Group names derive from the rule's global position, as its
            # parameter groups do, so they are unique within any alternation.
            source = "|".join(f"(?P<r{c.position}>{c.regex})" for c in run)
            dispatch: dict[str | None, tuple[Rule, _Groups]] = {
                f"r{c.position}": (c.rule, c.groups) for c in run
            }
            # DOTALL: a decoded path may hold "\n" and "**" promises anything.
            regex = re.compile(source, re.DOTALL)
            matchers.append(_Matcher(regex, dispatch, None, _max_length(run[0].wildcards)))
            run.clear()

    for c in compiled:
        if not _applies(c.rule, method):
            continue
        if c.exact is not None:
            # First rule wins; chat rules come first, so they win over widgets.
            exact.setdefault(c.exact, c.rule)
            continue
        prefixes.add(c.prefix)
        if c.user is None:
            # One alternation per bound on the path's length (see _max_length).
            if run and _max_length(run[0].wildcards) != _max_length(c.wildcards):
                flush_run()
            run.append(c)
        else:
            flush_run()
            matchers.append(_Matcher(c.user, None, c.rule))
    flush_run()
    return _Table(exact, _minimal_prefixes(prefixes), tuple(matchers))


def _minimal_prefixes(prefixes: set[str]) -> tuple[str, ...]:
    # A prefix that extends a shorter one adds nothing to the startswith test.
    kept: list[str] = []
    for prefix in sorted(prefixes, key=len):
        if not any(prefix.startswith(shorter) for shorter in kept):
            kept.append(prefix)
    return tuple(sorted(kept))
