"""Rules that miss the app's own routes by a little, told once when the app starts.

A rule written ``/pricing/`` for a route ``/pricing``, or ``GET /api/chat`` for a route that
takes POST, never matches a request the app serves, and nothing else would say so: the
middleware only sees requests, and an unmatched request is the normal case. The app's
routes are asked with their own matching (Starlette's ``Route.matches``, so mounts, hosts
and path convertors count as the app counts them), once, at the lifespan's start: no request
pays for it. Only exact-path rules are checked, and only a near miss is reported (the same
path with or without its trailing slash, or the right path under other methods): a rule for
a path no route knows may be served by a mounted app or a catch-all, and says nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ._rules import WIDGET, Match, Rule

__all__ = ["near_misses", "starlette_routes"]

#: The methods a chat rule without methods is checked under: any one served will do.
_CHAT_METHODS = ("POST", "GET", "PUT", "PATCH", "DELETE")
#: The methods a route that does not list its own is asked under.
_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
# Middleware layers walked down to the router, at most (a chain is a few deep).
_MAX_DEPTH = 32


def starlette_routes(app: Any) -> Sequence[Any] | None:
    """The routes of the Starlette router inside ``app`` (the app itself, a FastAPI app, or
    the middleware layers Starlette builds around its router), or None if there is none."""
    seen = 0
    while app is not None and seen < _MAX_DEPTH:
        routes = getattr(app, "routes", None)
        if isinstance(routes, list) and all(callable(getattr(r, "matches", None)) for r in routes):
            return routes
        app = getattr(app, "router", None) or getattr(app, "app", None)
        seen += 1
    return None


def near_misses(
    exact_matches: Mapping[str, Mapping[str, Match | None]], routes: Sequence[Any]
) -> list[str]:
    """What to warn about: one line for each exact-path rule that no route serves, where a
    route serves its path with the trailing slash changed, or under other methods."""
    from starlette.routing import Match as RouteMatch

    def served(path: str, method: str, *, literal: bool = False) -> tuple[bool, set[str]]:
        """Whether a route takes ``method`` on ``path``; the methods of those that take
        the path under others. ``literal``: only routes that match without a path
        parameter count (a catch-all such as ``/{slug}`` serves any one-segment path,
        ``/app`` for a rule ``/app/`` written for the home page under a root_path too)."""
        others: set[str] = set()
        scope = {"type": "http", "path": path, "root_path": "", "method": method,
                 "headers": [], "query_string": b""}  # fmt: skip
        for route in routes:
            found, child = route.matches(scope)
            if found == RouteMatch.NONE or (literal and child.get("path_params")):
                continue
            if found == RouteMatch.FULL:
                return True, set()
            if found == RouteMatch.PARTIAL:
                taken = getattr(route, "methods", None)
                if not taken:
                    # A route that does not list its methods (FastAPI's included
                    # routers): asked under each.
                    taken = {
                        m
                        for m in _METHODS
                        if route.matches({**scope, "method": m})[0] == RouteMatch.FULL
                    }
                others |= set(taken)
        return False, others

    told: list[str] = []
    rules: dict[Rule, str] = {}
    for path, by_method in exact_matches.items():
        for match in by_method.values():
            # Only the rules written for this very path: a pattern rule ("/**") that
            # also matches it under some method is no exact-path rule.
            if match is not None and _is_exact(match.rule, path):
                rules.setdefault(match.rule, path)
    for rule, path in rules.items():
        argument = "widget_pages" if rule.kind == WIDGET else "chat_routes"
        methods: Iterable[str] = (
            ("GET",) if rule.kind == WIDGET else sorted(rule.methods or _CHAT_METHODS)
        )
        others: set[str] = set()
        for method in methods:
            ok, taken = served(path, method)
            if ok:
                break
            others |= taken
        else:
            if others:
                names = sorted(others - {"HEAD"}) or sorted(others)
                if rule.kind == WIDGET:
                    fix = "widget rules match GET only: a chat route goes in chat_routes"
                else:
                    fix = f"write {','.join(names) + ' ' + path!r}"
                told.append(
                    f"{argument} rule {rule.source!r}: the app's route for {path!r} takes "
                    f"{', '.join(names)}, not {', '.join(methods)}: the rule matches no "
                    f"request the app serves ({fix})"
                )
                continue
            alternative = path[:-1] if path.endswith("/") and len(path) > 1 else path + "/"
            if any(any(served(alternative, method, literal=True)) for method in methods):
                told.append(
                    f"{argument} rule {rule.source!r}: no route of the app serves {path!r}, "
                    f"one serves {alternative!r} (a rule's path is matched exactly, its "
                    f"trailing slash too): write {alternative!r}"
                )
    return told


def _is_exact(rule: Rule, path: str) -> bool:
    """Whether ``rule`` is the exact-path rule for ``path`` (its source is the path,
    after its methods if any), not a pattern that matches it too."""
    source = rule.source
    return source.endswith(path) and "/" not in source[: len(source) - len(path)]
