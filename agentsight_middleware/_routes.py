"""Rules that miss the app's own routes by a little, told once when the app starts.

A rule written ``/pricing/`` for a route ``/pricing``, or ``GET /api/chat`` for a route that
takes POST, never matches a request the app serves, and nothing else would say so: the
middleware only sees requests, and an unmatched request is the normal case. The app's
routes are asked with their own matching, so mounts, hosts, path convertors and script
names count as the app counts them: Starlette's ``Route.matches`` once the lifespan's start
completes (no request pays for it), Werkzeug's ``MapAdapter.match`` (Flask) and Django's
``resolve`` at the first request of a WSGI process (WSGI has no start-up hook; its first
request already starts the worker). Only exact-path rules are checked, and only a near miss
is reported (the same path with or without its trailing slash, or the right path under
other methods; Django's URLs do not know methods, so only the slash there): a rule for a
path no route knows may be served by a mounted app or a catch-all, and says nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from typing import Any

from ._rules import WIDGET, Match, Rule

__all__ = ["near_misses", "starlette_routes", "starlette_served", "wsgi_served"]

#: Whether the app serves ``path`` under ``method`` (``literal``: by a route without path
#: parameters); if not, the methods it serves ``path`` under instead.
Served = Callable[[str, str, bool], tuple[bool, set[str]]]

#: The methods a chat rule without methods is checked under: any one served will do.
_CHAT_METHODS = ("POST", "GET", "PUT", "PATCH", "DELETE")
#: The methods a route that does not list its own is asked under.
_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
#: Methods frameworks add to a route on their own: named only when nothing else is.
_IMPLIED = frozenset({"HEAD", "OPTIONS"})
# Middleware layers walked down to the router, at most (a chain is a few deep).
_MAX_DEPTH = 32
# Where WSGI layers keep the app they wrap (Werkzeug's and most middlewares, Flask's
# bound wsgi_app, WhiteNoise's application).
_WSGI_LAYERS = ("app", "wsgi_app", "application", "__self__")


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


def starlette_served(routes: Sequence[Any]) -> Served:
    """Served, asked of Starlette routes."""
    from starlette.routing import Match as RouteMatch

    def served(path: str, method: str, literal: bool) -> tuple[bool, set[str]]:
        # ``literal``: a catch-all such as ``/{slug}`` serves any one-segment path, ``/app``
        # for a rule ``/app/`` written for the home page under a root_path too.
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

    return served


def wsgi_served(app: Any, environ: MutableMapping[str, Any]) -> Served | None:
    """Served, asked of the Flask (Werkzeug) URL map or the Django URL conf found inside
    ``app``, as it serves requests like ``environ`` (its host and script name); or None."""
    werkzeug = sys.modules.get("werkzeug.routing")
    django = sys.modules.get("django.core.handlers.base")
    seen: set[int] = set()
    layers = [app]
    while layers and len(seen) < _MAX_DEPTH:
        layer = layers.pop()
        if layer is None or id(layer) in seen:
            continue
        seen.add(id(layer))
        url_map = getattr(layer, "url_map", None)
        if werkzeug is not None and isinstance(url_map, werkzeug.Map):
            return _werkzeug_served(url_map, environ)
        if django is not None and isinstance(layer, django.BaseHandler):
            return _django_served(environ.get("SCRIPT_NAME", ""))
        layers.extend(getattr(layer, name, None) for name in _WSGI_LAYERS)
    return None


def _path_info(path: str, script_name: str) -> str | None:
    """``path`` (a rule's, as the client sends it) inside the app's script name."""
    script_name = script_name.rstrip("/")
    if not script_name:
        return path
    if path == script_name or path.startswith(script_name + "/"):
        return path[len(script_name) :] or "/"
    return None


def _werkzeug_served(url_map: Any, environ: MutableMapping[str, Any]) -> Served:
    from werkzeug.exceptions import HTTPException, MethodNotAllowed

    adapter = url_map.bind_to_environ(environ)

    def served(path: str, method: str, literal: bool) -> tuple[bool, set[str]]:
        path_info = _path_info(path, adapter.script_name)
        if path_info is None:
            return False, set()
        try:
            _, arguments = adapter.match(path_info, method=method)
        except MethodNotAllowed as exc:
            return False, set(exc.valid_methods or ())
        except HTTPException:  # not found, or a redirect (``/pricing`` to ``/pricing/``)
            return False, set()
        return not (literal and arguments), set()

    return served


def _django_served(script_name: str) -> Served:
    from django.urls import Resolver404, resolve

    def served(path: str, method: str, literal: bool) -> tuple[bool, set[str]]:
        path_info = _path_info(path, script_name)
        if path_info is None:
            return False, set()
        try:
            found = resolve(path_info)
        except Resolver404:
            return False, set()
        return not (literal and (found.args or found.kwargs)), set()

    return served


def near_misses(
    exact_matches: Mapping[str, Mapping[str, Match | None]], served: Served
) -> list[str]:
    """What to warn about: one line for each exact-path rule that no route serves, where a
    route serves its path with the trailing slash changed, or under other methods."""
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
            ok, taken = served(path, method, False)
            if ok:
                break
            others |= taken
        else:
            if others:
                names = sorted(others - _IMPLIED) or sorted(others)
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
            # Served there under some method: the slash is what to fix first.
            if any(any(served(alternative, method, True)) for method in methods):
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
