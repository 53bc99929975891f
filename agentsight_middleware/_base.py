"""The constructor and public methods shared by the ASGI and WSGI middleware."""

from __future__ import annotations

import os
import re
import sys
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, TypedDict

# At run time too: typing.get_type_hints() on the middleware's __init__ (dependency
# injection, documentation tools) resolves it. Imported from here by the glue.
if sys.version_info >= (3, 11):
    from typing import Unpack as Unpack
else:
    from typing_extensions import Unpack as Unpack

if TYPE_CHECKING:
    from ._routes import Prefixed, Served

from ._config import Settings, positive_seconds
from ._conversation import ID_SOURCES
from ._core import Core, Delivery
from ._delivery import BATCH, HTTP_STATS, STORE_STATS, BackgroundDelivery, Sink
from ._device import build_before_fork
from ._facts import DEFAULT_NON_BROWSER_AGENTS, ForwardedHeader
from ._log import logger
from ._tracker import TrackerDelivery
from .sdk import adapt_tracker

__all__ = ["MiddlewareBase"]


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")


# Instances built with the same rules in this process: a framework that builds one per
# route (Litestar's middleware=[DefineMiddleware(...)] does, 62 for 21 routes) multiplies
# the queue, the worker thread and the connections, and said "no AGENTSIGHT_API_KEY" 62
# times. Said once, with what to do instead.
_instances: dict[tuple[str, str], int] = {}
_SAME_RULES_WARNING_AT = 3


_same_rules_warned = False


def _count_instance(owner: object, name: str, rules: str) -> Callable[[], object]:
    """Count ``owner`` among the instances with these rules built and not yet serving,
    until it serves, is closed or is dropped. A framework builds its per-route instances
    together, before any serves; a test suite builds an app, and a middleware, per test,
    each serving before the next is built: the earlier ones wait, uncollected, for the
    garbage collector (FastAPI and Flask apps hold reference cycles), and with
    ``TestClient(create_app())`` never closed, the third test was told of per-route
    building. Calling the returned finalizer uncounts it, once."""
    global _same_rules_warned
    key = (name, rules)
    count = _instances[key] = _instances.get(key, 0) + 1
    uncount = weakref.finalize(owner, _forget_instance, key)
    uncount.atexit = False
    if count == _SAME_RULES_WARNING_AT and not _same_rules_warned:
        _same_rules_warned = True
        logger.warning(
            "%d %s instances with the same rules in this process, each with its own queue and "
            "background worker: the framework builds one per route (Litestar's "
            "middleware=[DefineMiddleware(...)] does, as does Starlette's "
            "Route(..., middleware=[Middleware(...)])). Wrap the whole app once instead: "
            "app = %s(app, widget_pages=..., chat_routes=...)",
            count,
            name,
            name,
        )
    return uncount


# Forks whose children serve no request: subprocess's (with ``preexec_fn``: the child
# runs another program at once) and multiprocessing's and Celery's billiard's (the child
# runs the tasks it is handed). A process that never serves (a test suite, a script, a
# Celery master importing the project) built the parser there: ~0.15 s and ~28 MB for none.
_FORKS_FOR_OTHER_WORK: Final = frozenset({"subprocess", "multiprocessing", "billiard"})


def _build_before_fork() -> None:
    """A process holding a middleware that has not served yet and forks: the app was built
    to be served by the children (gunicorn ``--preload``, a Werkzeug server forking for
    each request), which then inherit the user-agent parser built once, here, before any
    of them serves (see _device.build_soon), not each at its first request."""
    if _instances:
        # Who called os.fork(): none when a server forks from C (uWSGI's fork hooks).
        caller = sys._getframe().f_back
        forking = "" if caller is None else str(caller.f_globals.get("__name__", ""))
        if forking.partition(".")[0] not in _FORKS_FOR_OTHER_WORK:
            build_before_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_build_before_fork)


def _forget_instance(key: tuple[str, str]) -> None:
    left = _instances.get(key, 0) - 1
    if left > 0:
        _instances[key] = left
    else:
        _instances.pop(key, None)


class Options(TypedDict, total=False):
    """The keyword options of the middleware, for type checkers: a misspelt option is an
    error there, as it is at start-up (``MiddlewareBase.__init__`` documents each)."""

    app: Any  # Litestar's DefineMiddleware passes the app as app=
    widget_pages: Iterable[str | re.Pattern[str]]
    chat_routes: Iterable[str | re.Pattern[str]]
    tracker: Any
    trusted_proxies: Sequence[str] | int | None
    trusted_proxy_header: ForwardedHeader
    cookie_name: str
    cookie_max_age: int | None
    conversation_id_sources: Sequence[str]
    conversation_id_header: str
    conversation_id_field: str
    max_body_peek: int
    non_browser_agents: Iterable[str]
    source: str | None
    environment: str | None
    customer_id: Callable[[Any], Any] | None
    metadata: Mapping[str, Any] | Callable[[Any], Mapping[str, Any] | None] | None
    tracker_timeout: float
    queue_size: int
    api_key: str | None
    endpoint: str | None
    outbox: str | os.PathLike[str] | None
    shutdown_timeout: float
    delivery_concurrency: int
    local_store: str | os.PathLike[str] | None


def _the_app(app: Any, options: dict[str, Any], name: str) -> Any:
    """The wrapped app, given positionally or as ``app=``."""
    if "app" in options:
        if app is not None:
            raise TypeError(f"{name}() got the app twice: positionally and as app=")
        app = options.pop("app")
    if app is None:
        raise TypeError(f"{name}() needs the app it wraps: {name}(app, widget_pages=[...], ...)")
    known = _option_names()
    for option in options:
        if option not in known:
            import difflib  # only on this error path

            close = difflib.get_close_matches(option, known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else "the options are " + ", ".join(known)
            message = f"{name}() got an unknown option {option!r}: {hint}"
            # At ERROR too, as the other configuration errors (see MiddlewareBase).
            logger.error("agentsight-middleware is misconfigured: %s", message)
            raise TypeError(message)
    return app


def _option_names() -> list[str]:
    """The keyword options of ``MiddlewareBase.__init__``, in their order."""
    code = MiddlewareBase.__init__.__code__
    return list(code.co_varnames[code.co_argcount : code.co_argcount + code.co_kwonlyargcount])


def _open_outbox(path: str | os.PathLike[str]) -> Any:
    import sqlite3  # loaded by the outbox anyway, and only then

    from .sinks.outbox import SQLiteOutbox

    try:
        return SQLiteOutbox(path)
    except sqlite3.Error as exc:
        raise ValueError(
            f"outbox={os.fspath(path)!r} cannot be used as an SQLite outbox ({exc}): "
            "check that its folder exists and is writable, or pass another path"
        ) from None


class MiddlewareBase:
    def __init__(
        self,
        app: Any,
        *,
        widget_pages: Iterable[str | re.Pattern[str]] = (),
        chat_routes: Iterable[str | re.Pattern[str]] = (),
        tracker: Any = None,
        trusted_proxies: Sequence[str] | int | None = None,
        trusted_proxy_header: ForwardedHeader = "auto",
        cookie_name: str = "agentsight_conversation_id",
        cookie_max_age: int | None = 1800,
        conversation_id_sources: Sequence[str] = ID_SOURCES,
        conversation_id_header: str = "X-Conversation-ID",
        conversation_id_field: str = "conversation_id",
        max_body_peek: int = 64 * 1024,
        non_browser_agents: Iterable[str] = DEFAULT_NON_BROWSER_AGENTS,
        source: str | None = "web",
        environment: str | None = None,
        customer_id: Callable[[Any], Any] | None = None,
        metadata: Mapping[str, Any] | Callable[[Any], Mapping[str, Any] | None] | None = None,
        tracker_timeout: float = 5.0,
        queue_size: int = 10_000,
        api_key: str | None = None,
        endpoint: str | None = None,
        outbox: str | os.PathLike[str] | None = None,
        shutdown_timeout: float = 5.0,
        delivery_concurrency: int = 64,
        local_store: str | os.PathLike[str] | None = None,
    ) -> None:
        """Wrap ``app``.

        :param widget_pages: paths of pages that show the chat widget; a real page
            view of one calls ``initialize_conversation`` (``is_used: false``).
        :param chat_routes: chat API routes (``"POST /api/chat"``,
            ``"/api/chat/{conversation_id}/messages"``); a request to one calls
            ``get_or_create_conversation`` (``is_used: true``), unless the app answers it
            with a 4xx (a tracker's is called before the app runs).
        :param tracker: an object with ``initialize_conversation()`` and
            ``get_or_create_conversation()``, such as
            ``agentsight_middleware.sdk.AgentSightSDK()`` (agentsight 0.1.x) or the classic
            SDK's ``agentsight.ConversationTracker()`` (0.0.x, which needs an API key when
            it is built).
        :param trusted_proxies: IPs/CIDRs of your reverse proxies (or a hop count);
            only then are ``Forwarded`` / ``X-Forwarded-For`` believed.
        :param trusted_proxy_header: the one header your proxy writes (``"forwarded"``,
            ``"x-forwarded-for"``, ``"x-real-ip"``); with the default ``"auto"``, a request
            carrying more than one of them is recorded with the address only when they all
            agree, else without an IP (a proxy passes the others through from the client).
            The scheme (the cookie's ``Secure`` flag) is read from the same header.
        :param cookie_name: the cookie carrying the conversation id from page to chat.
        :param cookie_max_age: seconds of inactivity after which a visit is a new
            conversation (refreshed on every page view); None for a session cookie.
        :param conversation_id_sources: where a chat request's id is looked for, in order.
        :param conversation_id_header: the header source's name.
        :param conversation_id_field: the name of the path parameter, query parameter,
            JSON field and form field that carry the id.
        :param max_body_peek: at most this many body bytes are read to find an id.
        :param non_browser_agents: user-agent substrings (any case) of probes,
            monitors and scripts whose page loads are never views (dropped by the
            background worker, with bots). A list replaces the default one,
            ``agentsight_middleware.DEFAULT_NON_BROWSER_AGENTS``; to add to it, pass
            ``[*DEFAULT_NON_BROWSER_AGENTS, "my-monitor"]``.
        :param source: the conversation's ``source`` field.
        :param environment: ``"production"`` or ``"development"``; None: with
            ``tracker``, left to the tracker (the SDK reads ``AGENTSIGHT_ENVIRONMENT``),
            else ``AGENTSIGHT_ENVIRONMENT``, or ``"production"`` without it.
        :param customer_id: ``callable(request) -> id | None`` for signed-in users.
        :param metadata: a dict, or ``callable(request) -> dict``, merged into the metadata.
        :param tracker_timeout: seconds a chat request waits for the tracker at most.
        :param queue_size: events waiting in memory for the background worker at most,
            and as many again waiting for the API (no outbox); past that the newest
            are dropped and counted.
        :param api_key: an AgentSight API key (default: ``AGENTSIGHT_API_KEY``); with one
            and no ``tracker``, the built-in client sends both calls to the API.
        :param endpoint: the API's base URL (default: ``AGENTSIGHT_API_ENDPOINT`` or
            ``https://api.agentsight.io``).
        :param outbox: a SQLite file that keeps every event until the API accepted it,
            across crashes and restarts; several processes may share it.
        :param shutdown_timeout: seconds spent delivering what is left at shutdown (to the
            API, the local store or the tracker).
        :param delivery_concurrency: connections to the API at most, each carrying one
            request, or up to 16 written at once (HTTP/1.1 pipelining) while events
            queue. Eight at first, doubled while all are waiting for answers with events
            queued and the API accepts events. An API that answers each connection's
            requests one at a time, 50 ms each, takes 64 / 50 ms = 1,280 events/s.
        :param local_store: with no tracker and no API key, the SQLite file that keeps
            the events (default ``./agentsight-events.sqlite3``).
        """
        self.app = app
        try:
            settings = Settings(
                widget_pages=widget_pages,
                chat_routes=chat_routes,
                trusted_proxies=trusted_proxies,
                trusted_proxy_header=trusted_proxy_header,
                cookie_name=cookie_name,
                cookie_max_age=cookie_max_age,
                conversation_id_sources=conversation_id_sources,
                conversation_id_header=conversation_id_header,
                conversation_id_field=conversation_id_field,
                max_body_peek=max_body_peek,
                non_browser_agents=non_browser_agents,
                source=source,
                environment=environment,
                customer_id=customer_id,
                metadata=metadata,
                tracker_timeout=tracker_timeout,
            )
            delivery = _choose_delivery(
                settings,
                tracker=tracker,
                api_key=api_key,
                endpoint=endpoint,
                outbox=outbox,
                local_store=local_store,
                queue_size=queue_size,
                shutdown_timeout=shutdown_timeout,
                delivery_concurrency=delivery_concurrency,
            )
        except ValueError as exc:
            # Said here too, at ERROR: Starlette builds its middleware at the first ASGI
            # call (the lifespan's start), where a server may not print the error (the
            # ASGI glue reports it as lifespan.startup.failed there; see asgi.py).
            logger.error("agentsight-middleware is misconfigured: %s", exc)
            raise
        # Serving (see _serving) or closed (an ASGI lifespan's shutdown, close()) is
        # uncounted at once: a FastAPI or Flask app holds reference cycles, so a dropped one
        # waits for the garbage collector, and a script or test building an app per
        # configuration was told it built one middleware per route.
        self._uncount = _count_instance(self, type(self).__name__, repr(settings.rules))
        self._settings = settings
        self._core = core = Core(settings, delivery)
        if isinstance(delivery, BackgroundDelivery):
            # A middleware dropped (a test suite builds hundreds) stops its worker, which
            # delivers what it has and ends: its thread held the delivery for good.
            weakref.finalize(self, delivery.stop).atexit = False
        self._match = settings.rules.match
        # What the glue reads on every tracked request, as plain attributes.
        self._exact_matches = settings.rules.exact_matches
        self._near_misses_told: set[str] = set()
        self._prefixes = settings.rules.prefixes
        self._trusted = core.trusted
        self._secure_answers = core.secure_answers
        self._has_hooks = settings.has_hooks
        self._cookie_name = settings.cookie_name
        self._submit = core.submit
        self._hold = core.hold
        self._nested_told = False

    def _tell_near_misses(
        self, served: Served, root_path: str = "", prefixed: Prefixed | None = None
    ) -> None:
        """Warn about the rules that miss the app's routes by a little (see _routes), and
        (ASGI) those outside the root path the app is served under."""
        from ._routes import near_miss_rules, outside_root_path

        lines = outside_root_path(self._exact_matches, root_path)
        missed = near_miss_rules(self._exact_matches, served, prefixed)
        for line in lines + list(missed.values()):
            if line not in self._near_misses_told:  # a second check tells what is new
                self._near_misses_told.add(line)
                logger.warning("%s", line)
        for rule in missed:
            # Their redirects (a slash added, a language prefix) are what was just said.
            self._core.settle(rule.source)

    def _tracked_further_out(self, path: str) -> None:
        """Said once: another of ours, further out, already tracks this request (one on the
        main app, another on an app it mounts, or the app wrapped twice). This one leaves it
        alone: a second event would count the visit or the chat twice."""
        if not self._nested_told:
            self._nested_told = True
            logger.warning(
                "%s: %s is tracked already by another agentsight-middleware further out "
                "(on an app that mounts this one, or the same app wrapped twice), so this one "
                "leaves it to that one, and does for every such request: wrap the app once, "
                "the outermost (its rules see the whole path)",
                type(self).__name__,
                path,
            )

    def _serving(self) -> None:
        """This instance serves (its lifespan started, or its first request came): no
        longer one of a burst built per route (see _count_instance)."""
        self._uncount()

    def stats(self) -> dict[str, int]:
        """Counts of the background work; the keys depend on where events go (README,
        "Visible"): ``enqueued``, ``sent``, ``retried``, ... with the built-in client,
        ``stored`` with the local store, ``submitted``, ``processed``, ... with a tracker."""
        return self._core.delivery.stats()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until what was queued is delivered, stored or handed to the tracker; False
        on time-out. Settled counts as done: events the API refused, or that were given up
        on after their retries, leave nothing to wait for (``stats()`` counts them as
        ``rejected`` and ``failed``)."""
        return self._core.delivery.flush(timeout)

    def close(self, timeout: float | None = None) -> None:
        """Flush and stop the background worker (also done at interpreter exit)."""
        self._core.delivery.close(timeout)
        self._uncount()


def _choose_delivery(
    settings: Settings,
    *,
    tracker: Any,
    api_key: str | None,
    endpoint: str | None,
    outbox: str | os.PathLike[str] | None,
    local_store: str | os.PathLike[str] | None,
    queue_size: int,
    shutdown_timeout: float,
    delivery_concurrency: int,
) -> Delivery:
    """Your tracker if given; else the built-in client if there is a key; else the local store."""
    # Imported here, not at module level: an app that passes tracker= never loads
    # httpx or sqlite3, and importing the package stays cheap for every app.
    from ._credentials import Credentials, in_clear_warning, mask_key, resolve_environment
    from ._payload import DEFAULT_ENVIRONMENT
    from ._store import DEFAULT_PATH, LocalStore
    from .sinks.outbox import MemoryOutbox, Outbox
    from .sinks.store import StoreSink

    _positive_int("queue_size", queue_size)
    _positive_int("delivery_concurrency", delivery_concurrency)
    shutdown_timeout = positive_seconds("shutdown_timeout", shutdown_timeout, allow_zero=True)
    if tracker is not None:
        given = [
            name
            for name, value in (
                ("api_key=", api_key),
                ("endpoint=", endpoint),
                ("outbox=", outbox),
                ("local_store=", local_store),
            )
            if value is not None
        ]
        if given:
            raise ValueError(
                f"pass either tracker= (your own tracker does the sending) or "
                f"{' / '.join(given)} (the built-in client sends or keeps events), not both"
            )
        adapted = adapt_tracker(tracker)
        if adapted is not tracker:
            logger.info(
                "tracker is a classic agentsight ConversationTracker: wrapped in "
                "agentsight_middleware.sdk.ClassicTracker so that concurrent chat requests "
                "keep their own conversation id"
            )
        return TrackerDelivery(
            adapted,
            source=settings.source,
            environment=settings.environment,
            timeout=settings.tracker_timeout,
            queue_size=queue_size,
            is_probe=settings.is_non_browser,
            shutdown_timeout=shutdown_timeout,
        )
    credentials = Credentials.resolve(
        api_key=api_key, endpoint=endpoint, environment=settings.environment
    )
    if credentials is not None:
        if local_store is not None:
            # Warned, not refused (as outbox= without a key is): the key may come from the
            # environment of a deployment whose code keeps local_store= for development.
            logger.warning(
                "local_store=%r is not used: with an API key (%s) events go to the "
                "AgentSight API; unset the key to keep them in the file",
                os.fspath(local_store),
                "api_key=" if api_key is not None else "AGENTSIGHT_API_KEY",
            )
        # Opened now: a path that cannot be opened fails at start-up.
        durable = _open_outbox(outbox) if outbox is not None else None
        # The one line that says delivery is on (an operator could not tell from the log).
        logger.info(
            "sending AgentSight events to %s (key %s, environment %s), %s",
            credentials.conversations_url,
            mask_key(credentials.api_key),
            credentials.environment or DEFAULT_ENVIRONMENT,
            f"kept in the outbox {os.fspath(outbox)!r} until accepted"
            if outbox is not None
            else f"queued in memory (up to {queue_size})",
        )
        if credentials.in_clear:
            logger.warning(
                "%s",
                in_clear_warning(
                    credentials, "endpoint=" if endpoint is not None else "AGENTSIGHT_API_ENDPOINT"
                ),
            )

        def http_sink() -> Sink:
            from .sinks.http import HttpSink  # httpx: loaded by the worker thread

            # A memory outbox belongs to one process's worker: a child forked after
            # the parent's worker started gets its own, not a copy of the parent's
            # events (which the parent sends) and leases (which nobody would end).
            # One batch of headroom: the worker stops taking events once the outbox
            # is full, but a batch already taken must still fit.
            store: Outbox = durable if durable is not None else MemoryOutbox(queue_size + BATCH)
            return HttpSink(
                credentials,
                outbox=store,
                concurrency=delivery_concurrency,
                max_pending=queue_size,
            )

        return BackgroundDelivery(
            http_sink,
            source=settings.source,
            environment=credentials.environment,
            queue_size=queue_size,
            shutdown_timeout=shutdown_timeout,
            is_probe=settings.is_non_browser,
            stats_keys=HTTP_STATS,
            release=durable.close if durable is not None else None,
            idle_counts=durable.counts if durable is not None else None,
            starting=durable.starting if durable is not None else None,
        )
    if outbox is not None:
        raise ValueError(
            "outbox= needs an API key: pass api_key= (or set AGENTSIGHT_API_KEY); "
            "without one, events are kept in the local store (local_store=)"
        )
    if local_store is not None and not isinstance(local_store, (str, bytes, os.PathLike)):
        raise ValueError(
            f"local_store must be a file path (str or pathlib.Path), got {local_store!r}"
        )
    if local_store is not None:
        local_store = os.fsdecode(local_store)  # a bytes path too, as open() takes one
    local = LocalStore(local_store if local_store is not None else DEFAULT_PATH)
    check_local_store(os.fspath(local.path))
    # As an API key's environment would be (AGENTSIGHT_ENVIRONMENT unless given): `send`
    # replays the stored bodies as they are.
    environment = resolve_environment(settings.environment)
    logger.warning(
        "no AGENTSIGHT_API_KEY: keeping AgentSight events in %s. "
        "'agentsight-middleware report --db %s' shows the interaction rate; "
        "set AGENTSIGHT_API_KEY (or api_key=) to send events to AgentSight, and "
        "'agentsight-middleware send --db %s' sends the ones kept so far",
        local.path,
        local.path,
        local.path,
    )
    return BackgroundDelivery(
        lambda: StoreSink(local),
        source=settings.source,
        environment=environment,
        queue_size=queue_size,
        shutdown_timeout=shutdown_timeout,
        is_probe=settings.is_non_browser,
        stats_keys=STORE_STATS,
    )


def check_local_store(local_store: str) -> None:
    """A ValueError naming ``local_store`` when no event could be kept there.

    Checked at start-up: the file itself is only opened at the first event, and a typo must
    not surface as an error logged for every page view (and every event lost). The demo
    asks before it prints its URL."""
    from ._store import DEFAULT_PATH, not_writable_reason  # loaded with the store only

    path = os.path.abspath(local_store)
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise ValueError(
            f"local_store={local_store!r}: the folder {folder!r} does not exist; "
            "create it or pass another path"
        )
    if os.path.isdir(path):
        raise ValueError(
            f"local_store={local_store!r} is a folder; name a file in it, e.g. "
            f"{os.path.join(local_store, DEFAULT_PATH)!r}"
        )
    # SQLite writes beside the file too (its -wal and -shm files).
    if not os.access(folder, os.W_OK | os.X_OK) or (
        os.path.exists(path) and not os.access(path, os.R_OK | os.W_OK)
    ):
        raise ValueError(
            f"local_store={local_store!r}: this process cannot write "
            f"{'it' if os.path.exists(path) else 'in ' + repr(folder)}; "
            "pass a path it can write, or fix the permissions"
        )
    # An existing file that is no events file (the app's own database, a newer release's,
    # not SQLite at all) started the app, then lost every event with an error logged.
    if os.path.isfile(path) and os.path.getsize(path) > 0:
        problem = not_writable_reason(path)
        if problem is not None:
            raise ValueError(f"local_store={local_store!r}: {problem}")
