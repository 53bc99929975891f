"""Rules that miss the app's own routes by a little, told once when the app starts.

A rule written ``/pricing/`` for a route ``/pricing``, or ``GET /api/chat`` for a route that
takes POST, never matches a request the app serves, and nothing else would say so: the
middleware only sees requests, and an unmatched request is the normal case. The app's
routes are asked with their own matching, so mounts, hosts, path convertors and script
names count as the app counts them: Starlette's ``Route.matches`` once the lifespan's start
completes (no request pays for it), Werkzeug's ``MapAdapter.match`` (Flask) and Django's
``resolve`` at the first request of a WSGI process (WSGI has no start-up hook; its first
request already starts the worker), Litestar's public ``app.routes`` with the lifespan too,
and any of them at the first tracked request of an ASGI app that gets no lifespan. Only
exact-path rules are checked, and only a near miss is reported (the same path with or
without its trailing slash, or the right path under other methods; Django's URLs do not
know methods, its class-based views do; or, in a Django URL conf of ``i18n_patterns``, the
path under language prefixes only, where LocaleMiddleware redirects it): a rule for a path
no route knows may be served by a mounted app or a catch-all, and says nothing.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from typing import Any, NamedTuple

from ._rules import WIDGET, Match, Rule

__all__ = [
    "app_served",
    "language_prefixed",
    "litestar_served",
    "near_miss_rules",
    "near_misses",
    "outside_root_path",
    "script_name",
    "starlette_routes",
    "starlette_served",
    "wsgi_served",
]

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


def starlette_served(routes: Sequence[Any], root_path: str = "", depth: int = 0) -> Served:
    """Served, asked of Starlette routes, served under ``root_path`` (a mount's or the
    server's: Starlette matches the path past it, as a rule's path includes it)."""
    from starlette.routing import Match as RouteMatch

    root_path = root_path.rstrip("/")
    # The routes of the Starlette apps and routers mounted here (app.mount("/shop", sub)),
    # by mount: asked as the mount asks them, under its path.
    inside: dict[int, Sequence[Any] | None] = {}

    def served(path: str, method: str, literal: bool) -> tuple[bool, set[str]]:
        # ``literal``: a catch-all such as ``/{slug}`` serves any one-segment path, ``/app``
        # for a rule ``/app/`` written for the home page under a root_path too.
        if root_path and not _under(path, root_path):
            # Starlette matches such a path whole, but no request has it: the middleware
            # puts the root path before every request's (see outside_root_path).
            return False, set()
        others: set[str] = set()
        scope = {"type": "http", "path": path, "root_path": root_path, "method": method,
                 "headers": [], "query_string": b""}  # fmt: skip
        for route in routes:
            found, child = route.matches(scope)
            if found == RouteMatch.NONE or (literal and child.get("path_params")):
                continue
            if found == RouteMatch.FULL:
                mounted = _mounted_routes(route, inside, depth)
                if mounted is not None:
                    # The mount takes the request (no route after it is asked), and its app
                    # answers 404 or 405 where none of its own routes serves the path: a
                    # rule that misses a sub-app's route by a slash or a method was said
                    # to be served.
                    inner_root = str(child.get("root_path", root_path))
                    return starlette_served(mounted, inner_root, depth + 1)(path, method, literal)
                if not _is_static_files(route):
                    return True, set()
                # StaticFiles (an SPA's app.mount("/", StaticFiles(..., html=True))) takes
                # the request, whatever its method, and answers 405 but to GET and HEAD,
                # and 404 to those where it has no file: what no route before it took
                # stops there. A catch-all: its methods are no advice.
                if method in _STATIC_METHODS and _static_file(route.app, {**scope, **child}):
                    return True, set()
                return False, others
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


def _mounted_routes(
    route: Any, inside: dict[int, Sequence[Any] | None], depth: int
) -> Sequence[Any] | None:
    """The routes of the Starlette app or router a ``Mount`` serves, or None (not a mount, or
    another kind of app: a mounted WSGI app, StaticFiles, an ASGI function)."""
    key = id(route)
    if key not in inside:
        found = None
        if type(route).__name__ == "Mount" and depth < _MAX_DEPTH:
            found = starlette_routes(getattr(route, "app", None))
        inside[key] = found
    return inside[key]


def litestar_served(app: Any, root_path: str = "") -> Served | None:
    """Served, asked of the routes of the Litestar app in or under ``app`` (``Litestar.routes``,
    its public list of routes), served under ``root_path``; or None.

    Litestar serves a path with or without its trailing slash alike, so only methods can be
    missed. Its router is private: a route with path parameters is taken to serve any path of
    its shape (``{n:int}`` a ``/items/abc`` too), which can only leave a warning out.
    """
    module = sys.modules.get("litestar.app")
    if module is None:
        return None
    for _ in range(_MAX_DEPTH):
        if app is None or isinstance(app, module.Litestar):
            break
        app = getattr(app, "app", None)
    if not isinstance(app, module.Litestar):
        return None
    from litestar.routes import ASGIRoute, HTTPRoute

    # Litestar answers a path of a route without parameters (a "plain route", WebSocket
    # ones too) from that route alone: its methods, else 405, whatever mount or route with
    # parameters also takes the path. None: an ASGI handler's, any method.
    exact: dict[str, set[str] | None] = {}
    shaped: list[tuple[re.Pattern[str], frozenset[str] | None]] = []  # None: any method
    for route in app.routes:
        if isinstance(route, HTTPRoute):
            methods: frozenset[str] | None = frozenset(route.methods)
        elif isinstance(route, ASGIRoute):
            methods = None  # an ASGI handler takes any method; a mount, any path under it
        else:
            methods = frozenset()  # a WebSocket route: no HTTP method
        path = _litestar_path(route.path)
        if isinstance(route, ASGIRoute) and getattr(route.route_handler, "is_mount", False):
            shaped.append((re.compile(re.escape(path.rstrip("/")) + "(?:/.*)?"), None))
        elif route.path_parameters:
            if methods != frozenset():
                shaped.append((_litestar_shape(path), methods))
        elif methods is None:
            exact[path] = None
        else:
            taken = exact.setdefault(path, set())
            if taken is not None:
                taken.update(methods)
    root_path = root_path.rstrip("/")

    def served(path: str, method: str, literal: bool) -> tuple[bool, set[str]]:
        inside = _path_info(path, root_path)
        if inside is None:
            return False, set()
        inside = _litestar_path(inside)
        if inside in exact:
            taken = exact[inside]
            if taken is None or method in taken:
                return True, set()
            return False, set(taken)
        for shape, methods in shaped:
            if (methods is not None and literal) or not shape.fullmatch(inside):
                continue
            if methods is None or method in methods:
                return True, set()
        # A route with parameters is not known to take the path (a static segment of
        # another route, or its parameter's type, may win): its methods are not named.
        return False, set()

    return served


def _litestar_path(path: str) -> str:
    # Litestar matches a path without its trailing slash.
    return path.rstrip("/") or "/"


_LITESTAR_PARAMETER = re.compile(r"\{[^{}:]*(?::([^{}]*))?\}")


def _litestar_shape(path: str) -> re.Pattern[str]:
    """A route path with parameters as a pattern: ``{p:path}`` any rest, others a segment."""
    parts: list[str] = []
    end = 0
    for parameter in _LITESTAR_PARAMETER.finditer(path):
        parts.append(re.escape(path[end : parameter.start()]))
        parts.append(".*" if (parameter.group(1) or "").strip() == "path" else "[^/]+")
        end = parameter.end()
    parts.append(re.escape(path[end:]))
    return re.compile("".join(parts))


_STATIC_METHODS = frozenset({"GET", "HEAD"})


def _is_static_files(route: Any) -> bool:
    module = sys.modules.get("starlette.staticfiles")
    return module is not None and isinstance(getattr(route, "app", None), module.StaticFiles)


def _static_file(app: Any, scope: dict[str, Any]) -> bool:
    """Whether StaticFiles ``app`` answers a GET of ``scope`` with a file, as its
    get_response() finds one: not with a 404 (404.html too) or the redirect that adds a
    directory's slash. True for a subclass (an SPA's answers its index.html for any path)
    and for what cannot be asked."""
    import os
    import stat

    from starlette.staticfiles import StaticFiles

    if type(app) is not StaticFiles:
        return True
    try:
        path = app.get_path(scope)
        found = app.lookup_path(path)[1]
        if found is not None and stat.S_ISREG(found.st_mode):
            return True
        if found is None or not stat.S_ISDIR(found.st_mode) or not app.html:
            return False
        index = app.lookup_path(os.path.join(path, "index.html"))[1]
        return index is not None and stat.S_ISREG(index.st_mode) and scope["path"].endswith("/")
    except Exception:  # a path StaticFiles refuses (401), a layout of another version
        return True


def wsgi_served(app: Any, environ: MutableMapping[str, Any]) -> Served | None:
    """Served, asked of the Flask (Werkzeug) URL map or the Django URL conf found inside
    ``app``, as it serves requests like ``environ`` (its script name); or None."""
    return app_served(app, script_name(environ))


def script_name(environ: MutableMapping[str, Any]) -> str:
    """The script name of ``environ`` as text: the root path of a WSGI app's requests."""
    return _text(environ.get("SCRIPT_NAME", ""))


def app_served(app: Any, script_name: str) -> Served | None:
    """Served, asked of the Werkzeug URL map (Flask) or the Django URL conf (its WSGI or
    ASGI handler) found inside ``app``, served under ``script_name``; or None."""
    werkzeug = sys.modules.get("werkzeug.routing")
    django = sys.modules.get("django.core.handlers.base")
    # Paths a dispatcher on the way hands to other apps (Werkzeug's DispatcherMiddleware):
    # not asked of the router found below it.
    mounted: list[str] = []
    found: Served | None = None
    for layer in _layers(app):
        url_map = getattr(layer, "url_map", None)
        if werkzeug is not None and isinstance(url_map, werkzeug.Map):
            found = _werkzeug_served(url_map)
            break
        if django is not None and isinstance(layer, django.BaseHandler):
            found = _django_served()
            break
        mounts = getattr(layer, "mounts", None)
        if isinstance(mounts, Mapping):
            mounted.extend(str(prefix).rstrip("/") for prefix in mounts)
    if found is None:
        return None
    router: Served = found
    script_name = script_name.rstrip("/")

    def served(path: str, method: str, literal: bool) -> tuple[bool, set[str]]:
        path_info = _path_info(path, script_name)
        if path_info is None or any(_under(path_info, prefix) for prefix in mounted):
            return False, set()
        return router(path_info, method, literal)

    return served


def _layers(app: Any) -> Iterator[Any]:
    """``app`` and the WSGI (or ASGI) apps it wraps, down to the router, each once: the
    apps a layer keeps are walked after it is handed back (not if the caller stops)."""
    seen: set[int] = set()
    layers = [app]
    while layers and len(seen) < _MAX_DEPTH:
        layer = layers.pop()
        if layer is None or id(layer) in seen:
            continue
        seen.add(id(layer))
        yield layer
        layers.extend(getattr(layer, name, None) for name in _WSGI_LAYERS)


#: Languages tried for a rule, at most: each is activated to resolve under its prefix (its
#: translations loaded), and Django's own LANGUAGES, where a site sets none, lists ~100.
_MAX_LANGUAGES = 12


class LanguagePaths(NamedTuple):
    """Where the app serves a path (the client's) under a language prefix (Django's
    i18n_patterns): ``(script name, language, path inside its prefix)`` for each language
    tried that serves it (``""``, ``"en"``, ``"/pricing/"``), none where the default
    language's does not; and how many languages were not tried (see _MAX_LANGUAGES)."""

    found: list[tuple[str, str, str]]
    untried: int


Prefixed = Callable[[str], LanguagePaths]


def language_prefixed(
    app: Any, script_name: str, covered: Callable[[str], bool] | None = None
) -> Prefixed | None:
    """Prefixed, for the Django app (its WSGI or ASGI handler) found inside ``app`` when
    its URL conf puts routes under a language prefix (``i18n_patterns``); else None.

    Such a route is served at ``/en/pricing/`` and ``/fr/pricing/``, not at ``/pricing``,
    which ``LocaleMiddleware`` redirects to the visitor's language: a rule ``/pricing``
    (or ``/``) matches nothing but that redirect, which is no page view. Paths that
    ``covered`` says a widget rule matches already are none to add: where they all are,
    the rule is a harmless leftover, and nothing is found."""
    django = sys.modules.get("django.core.handlers.base")
    if django is None or not any(isinstance(layer, django.BaseHandler) for layer in _layers(app)):
        return None
    from django.conf import settings
    from django.conf.urls.i18n import is_language_prefix_patterns_used
    from django.urls import Resolver404, resolve
    from django.utils import translation

    if getattr(settings, "ROOT_HOSTCONF", None) or getattr(settings, "PUBLIC_SCHEMA_URLCONF", None):
        return None  # a URL conf per host (see _django_served)
    if not is_language_prefix_patterns_used(settings.ROOT_URLCONF)[0]:
        return None
    every = [str(code) for code, _ in settings.LANGUAGES]
    try:
        default = translation.get_supported_language_variant(settings.LANGUAGE_CODE)
    except LookupError:
        default = settings.LANGUAGE_CODE
    # The default language first: where LocaleMiddleware sends a visitor whose browser
    # names no language it has.
    codes = [default, *(code for code in every if code != default)][:_MAX_LANGUAGES]
    untried = max(0, len(every) - len(codes))
    base = script_name.rstrip("/")

    def prefixed(path: str) -> LanguagePaths:
        inside = _path_info(path, base)
        if inside is None:
            return LanguagePaths([], untried)
        candidates = [inside]
        if inside != "/":
            candidates.append(inside[:-1] if inside.endswith("/") else inside + "/")
        found: list[tuple[str, str, str]] = []
        for code in codes:
            with translation.override(code):
                for candidate in candidates:
                    try:
                        resolve(f"/{code}{candidate}")
                    except Resolver404:
                        continue
                    found.append((base, code, candidate))
                    break
            if not found:
                break  # not under the default language's prefix: not what misses
        if covered is not None and all(covered(f"{b}/{c}{r}") for b, c, r in found):
            found = []
        return LanguagePaths(found, untried)

    return prefixed


def _text(wsgi: str) -> str:
    """A WSGI (latin-1) string as text, as the middleware reads the request's path."""
    return wsgi if wsgi.isascii() else wsgi.encode("latin-1", "replace").decode("utf-8", "replace")


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


def _path_info(path: str, script_name: str) -> str | None:
    """``path`` (a rule's, as the client sends it) inside the app's script name."""
    if not script_name:
        return path
    if _under(path, script_name):
        return path[len(script_name) :] or "/"
    return None


def _werkzeug_served(url_map: Any) -> Served | None:
    from werkzeug.exceptions import HTTPException, MethodNotAllowed

    # Rules match the path under any host: every subdomain's (or host's) routes count, not
    # the first request's alone. A host or subdomain with a variable part cannot be asked.
    where = {
        (rule.host if url_map.host_matching else rule.subdomain) or ""
        for rule in url_map.iter_rules()
    }
    if any("<" in name for name in where):
        return None
    adapters = [
        url_map.bind(name) if url_map.host_matching else url_map.bind("", subdomain=name)
        for name in sorted(where)
    ]

    def served(path_info: str, method: str, literal: bool) -> tuple[bool, set[str]]:
        others: set[str] = set()
        for adapter in adapters:
            try:
                # websocket=False: HTTP routes, whatever the first request was (an upgrade
                # matches WebSocket routes only).
                rule, values = adapter.match(
                    path_info, method=method, return_rule=True, websocket=False
                )
            except MethodNotAllowed as exc:
                # The methods of WebSocket routes too (Quart's, at GET): only those an
                # HTTP route takes, or the advice names a rule that matches nothing either.
                others |= {
                    other
                    for other in exc.valid_methods or ()
                    if _werkzeug_takes(adapter, path_info, other, literal)
                }
                continue
            except HTTPException:  # not found, or a redirect (``/pricing`` to ``/pricing/``)
                continue
            if not literal or _no_parameters(rule, values):
                return True, set()
        return False, others

    return served


def _no_parameters(rule: Any, values: Mapping[str, Any]) -> bool:
    # A route's defaults are no path parameters (Flask's first page of a list).
    return values.keys() <= (rule.defaults or {}).keys()


def _werkzeug_takes(adapter: Any, path_info: str, method: str, literal: bool) -> bool:
    """Whether an HTTP route serves ``path_info`` under ``method`` (with no path parameters
    when ``literal``)."""
    try:
        rule, values = adapter.match(path_info, method=method, return_rule=True, websocket=False)
    except Exception:  # an HTTPException (a WebSocket route's), or a converter that fails
        return False
    return not literal or _no_parameters(rule, values)


def _django_served() -> Served | None:
    from django.conf import settings
    from django.urls import Resolver404, resolve

    if getattr(settings, "ROOT_HOSTCONF", None) or getattr(settings, "PUBLIC_SCHEMA_URLCONF", None):
        # django-hosts, django-tenants: a URL conf per host (request.urlconf), chosen by
        # their middleware; ROOT_URLCONF is one host's.
        return None
    # One resolve() a path (~0.5 ms on a big URL conf): whether a route serves it, whether
    # with path parameters, and the methods its view takes (None: any it may).
    resolved: dict[str, tuple[bool, bool, frozenset[str] | None]] = {}

    def served(path_info: str, method: str, literal: bool) -> tuple[bool, set[str]]:
        known = resolved.get(path_info)
        if known is None:
            try:
                found = resolve(path_info)
            except Resolver404:
                known = (False, False, None)
            else:
                # The kwargs a path() adds for its view are no path parameters; a
                # re_path() without groups (an SPA's r"^.*$") is a pattern all the same.
                captured = getattr(found, "captured_kwargs", found.kwargs)
                parametrized = bool(found.args or captured) or not _django_literal(
                    getattr(found, "route", None), path_info
                )
                known = (True, parametrized, _django_view_methods(found.func))
            resolved[path_info] = known
        ok, parametrized, methods = known
        if not ok or (literal and parametrized):
            return False, set()
        if methods is None or method in methods:
            return True, set()
        return False, set(methods)

    return served


def _django_literal(route: Any, path_info: str) -> bool:
    """Whether the route text ``resolve()`` matched (a path()'s, or a re_path()'s regex,
    includes joined) names ``path_info`` alone; True if Django does not say."""
    if not isinstance(route, str):
        return True
    text = route[1:] if route.startswith("^") else route
    text = re.sub(r"(?:\$|\\Z)$", "", text)
    return re.sub(r"\\(.)", r"\1", text) == path_info.lstrip("/")


def _django_view_methods(view: Any) -> frozenset[str] | None:
    """The methods a class-based view answers, found as Django's ``View.dispatch`` finds
    its handlers; None for anything else (a function view may take any method, and a view
    with a dispatch() of its own may route methods its own way)."""
    try:
        return _view_class_methods(view)
    except Exception:  # e.g. as_view(http_method_names=None): not guessed, others still told
        return None


# What View.dispatch finds handlers with: a class with its own may add others (a handler
# set on the instance in setup() or __init__, a 405 handler that serves).
_DISPATCH_HOOKS = ("setup", "__init__", "http_method_not_allowed", "__getattr__")


def _view_class_methods(view: Any) -> frozenset[str] | None:
    from django.views import View

    # Set by View.as_view() and kept by wraps(); a DRF ViewSet's as_view() sets only cls.
    view_class = getattr(view, "view_class", None) or getattr(view, "cls", None)
    if not (isinstance(view_class, type) and issubclass(view_class, View)):
        return None
    # A dispatch() of its own (LoginRequiredMixin's, a hand-written one) may take others:
    # not guessed. Django's own (under method_decorator(csrf_exempt, name="dispatch") too)
    # and Django REST framework's APIView's find handlers alike: theirs are known.
    bases = [View]
    drf = sys.modules.get("rest_framework.views")  # loaded by the URL conf if it uses DRF
    api_view = getattr(drf, "APIView", None)
    if isinstance(api_view, type) and issubclass(view_class, api_view):
        bases.insert(0, api_view)
    dispatch = getattr(view_class, "dispatch", None)
    known = {base.dispatch: base for base in bases}
    for _ in range(_MAX_DEPTH):
        if dispatch in known or dispatch is None:
            break
        dispatch = getattr(dispatch, "__wrapped__", None)
    base = known.get(dispatch) if dispatch is not None else None
    if base is None or any(
        getattr(view_class, name, None) is not getattr(base, name, None) for name in _DISPATCH_HOOKS
    ):
        return None
    # as_view(http_method_names=[...]) sets the instance's, which dispatch() reads.
    initkwargs = getattr(view, "view_initkwargs", None) or getattr(view, "initkwargs", None)
    names = set(
        initkwargs["http_method_names"]
        if isinstance(initkwargs, dict) and "http_method_names" in initkwargs
        else getattr(view_class, "http_method_names", ())
    )
    actions = getattr(view, "actions", None)
    if base is not View and isinstance(actions, dict):
        # A DRF ViewSet's route: as_view({"get": "list", "post": "create"}) sets each
        # method's handler to its action on the instance; the class's other handlers
        # (OPTIONS: the metadata) answer as on any APIView.
        handled = {
            method
            for method, action in actions.items()
            if isinstance(method, str)
            and isinstance(action, str)
            and callable(getattr(view_class, action, None))
        }
        names &= handled | {n for n in names if callable(getattr(view_class, n, None))}
        methods = {name.upper() for name in names}
    else:
        methods = {name.upper() for name in names if callable(getattr(view_class, name, None))}
    if "GET" in methods:
        methods.add("HEAD")  # View.setup() (a ViewSet's view too) answers HEAD with get()
    return frozenset(methods)


def near_misses(
    exact_matches: Mapping[str, Mapping[str, Match | None]],
    served: Served,
    prefixed: Prefixed | None = None,
) -> list[str]:
    """What to warn about: one line for each exact-path rule that no route serves, where a
    route serves its path with the trailing slash changed, or under other methods, or
    (``prefixed``: Django's i18n_patterns) under a language prefix."""
    return list(near_miss_rules(exact_matches, served, prefixed).values())


def near_miss_rules(
    exact_matches: Mapping[str, Mapping[str, Match | None]],
    served: Served,
    prefixed: Prefixed | None = None,
) -> dict[Rule, str]:
    """:func:`near_misses`, each line by its rule."""
    told: dict[Rule, str] = {}
    for rule, path in _exact_rules(exact_matches).items():
        argument = "widget_pages" if rule.kind == WIDGET else "chat_routes"
        methods: Sequence[str] = (
            ("GET",) if rule.kind == WIDGET else sorted(rule.methods or _CHAT_METHODS)
        )
        others: set[str] = set()
        shaped: set[str] = set()  # the methods of routes with path parameters there
        for method in methods:
            ok, taken = served(path, method, False)
            if ok:
                break
            # Methods from routes written for this path first: a catch-all with
            # parameters (an SPA's GET "/{path:path}") takes any path, and "write 'GET
            # /api/chat'" would turn a chat rule into one that counts page loads.
            literal = served(path, method, True)[1]
            others |= literal
            shaped |= set(taken) - literal
        else:
            if not others - _IMPLIED:
                # None: a route with parameters written for paths like this one
                # ("POST /api/agents/{agent}/chat") still names its methods; one that
                # also takes a path no app routes (a catch-all) does not.
                others = {m for m in shaped - _IMPLIED if not _takes_any(served, path, m)}
            # A route that answers only HEAD or OPTIONS there takes no request a rule can
            # name ("write 'OPTIONS /x'" would be refused at start-up): no method advice.
            names = sorted(others - _IMPLIED)
            if names:
                if rule.kind == WIDGET:
                    fix = "widget rules match GET only: a chat route goes in chat_routes"
                else:
                    fix = f"write {','.join(names) + ' ' + path!r}"
                told[rule] = (
                    f"{argument} rule {rule.source!r}: the app's route for {path!r} takes "
                    f"{', '.join(names)}, not {', '.join(methods)}: the rule matches no "
                    f"request the app serves ({fix})"
                )
                continue
            alternative = path[:-1] if path.endswith("/") and len(path) > 1 else path + "/"
            # Served there: the slash is what to fix first; with the rule's methods if a
            # route there takes one of them, else with the methods it takes.
            there = [served(alternative, method, True) for method in methods]
            if any(ok for ok, _ in there):
                fix = f"write {rule.source[: len(rule.source) - len(path)] + alternative!r}"
            else:
                languages = None if prefixed is None else prefixed(path)
                if languages is not None and languages.found:
                    told[rule] = _language_advice(rule, argument, path, languages)
                    continue
                names = sorted(set().union(*(taken for _, taken in there)) - _IMPLIED)
                if not names:
                    continue
                if rule.kind == WIDGET:
                    fix = (
                        f"it takes {', '.join(names)}: widget rules match GET only, a chat "
                        "route goes in chat_routes"
                    )
                else:
                    fix = f"write {','.join(names) + ' ' + alternative!r}"
            told[rule] = (
                f"{argument} rule {rule.source!r}: no route of the app serves {path!r}, "
                f"one serves {alternative!r} (a rule's path is matched exactly, its "
                f"trailing slash too): {fix}"
            )
    return told


def _language_advice(rule: Rule, argument: str, path: str, languages: LanguagePaths) -> str:
    """The line for a rule whose path the app serves under language prefixes only."""
    found = languages.found
    methods = rule.source[: len(rule.source) - len(path)]
    paths = ", ".join(repr(f"{methods}{base}/{code}{rest}") for base, code, rest in found)
    fix = f"write {paths}"
    if not methods and len({rest for _, _, rest in found}) == 1:
        # One regex for every language, where the paths differ by it alone (a regex rule
        # has no methods: only for a rule without them).
        base, _, rest = found[0]
        # A hyphen is literal outside a class: "zh-hans", not re.escape's "zh\-hans".
        codes = "|".join(re.escape(code).replace("\\-", "-") for _, code, _ in found)
        fix += f", or one rule: re.compile(r'{re.escape(base)}/(?:{codes}){re.escape(rest)}')"
    if languages.untried:
        fix += (
            f"; {languages.untried} more languages of LANGUAGES were not checked: set "
            "LANGUAGES to the site's own"
        )
    return (
        f"{argument} rule {rule.source!r}: no route of the app serves {path!r}, its URL conf "
        f"serves it under a language prefix (Django's i18n_patterns), where LocaleMiddleware "
        f"redirects visitors: a redirect is no page view, so the rule records nothing ({fix})"
    )


def outside_root_path(
    exact_matches: Mapping[str, Mapping[str, Match | None]], root_path: str
) -> list[str]:
    """One line for each exact-path rule outside ``root_path`` (the server's, ``uvicorn
    --root-path``, a mount's, WSGI's script name): the glue puts it before every request's
    path, so
    such a rule (the app's own route path, ``/pricing`` for ``/site/pricing``) matches no
    request, and the slash or method advice would keep it outside."""
    base = root_path.rstrip("/")
    if not base:
        return []
    told: list[str] = []
    for rule, path in _exact_rules(exact_matches).items():
        if _under(path, base):
            continue
        argument = "widget_pages" if rule.kind == WIDGET else "chat_routes"
        fix = rule.source[: len(rule.source) - len(path)] + base + path
        told.append(
            f"{argument} rule {rule.source!r}: the app is served under the root path "
            f"{base!r}, which every request's path starts with: the rule matches no "
            f"request (write {fix!r})"
        )
    return told


def _exact_rules(exact_matches: Mapping[str, Mapping[str, Match | None]]) -> dict[Rule, str]:
    """The exact-path rules, each with its path."""
    rules: dict[Rule, str] = {}
    for path, by_method in exact_matches.items():
        for match in by_method.values():
            # Only the rules written for this very path: a pattern rule ("/**") that
            # also matches it under some method is no exact-path rule.
            if match is not None and _is_exact(match.rule, path):
                rules.setdefault(match.rule, path)
    return rules


#: A path segment no app routes: what serves it is a catch-all.
_NO_ROUTE = "agentsight-no-route-7c1f"


def _takes_any(served: Served, path: str, method: str) -> bool:
    """Whether what serves ``path`` under ``method`` also serves a path below it, or a
    top-level path beside it, that no route names: a catch-all (``/{path:path}``,
    ``/<path:path>``, ``re_path(r"^.*$")``, a top-level ``/{slug}``)."""
    probes = [path.rstrip("/") + "/" + _NO_ROUTE]
    if "/" not in path.strip("/"):
        probes.append("/" + _NO_ROUTE)
    try:
        return any(served(probe, method, False)[0] for probe in probes)
    except Exception:  # e.g. a converter of the app's that fails on the probe: not named
        return True


def _is_exact(rule: Rule, path: str) -> bool:
    """Whether ``rule`` is the exact-path rule for ``path`` (its source is the path,
    after its methods if any), not a pattern that matches it too."""
    source = rule.source
    return source.endswith(path) and "/" not in source[: len(source) - len(path)]
