"""WSGI glue: Flask, Django, plain Werkzeug, any PEP 3333 app.

::

    flask_app.wsgi_app = AgentSightWSGIMiddleware(flask_app.wsgi_app, widget_pages=["/"],
                                                  chat_routes=["POST /api/chat"], tracker=tracker)

Requests whose path matches no rule go straight to the app.
"""

from __future__ import annotations

import contextvars
import io
import sys
import time
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from contextlib import AbstractContextManager
from typing import Any

from ._base import MiddlewareBase, Options, Unpack, _the_app
from ._body import peek_wsgi
from ._config import NEED_BODY
from ._conversation import (
    MINTED,
    Conversation,
    cookie_value,
    mint_id,
    pending_conversation,
    set_cookie_value,
)
from ._core import (
    CDN_CACHE_HEADERS,
    NOT_SET,
    AppCookie,
    handling,
    is_html_success,
    is_page_view,
    is_shared_cacheable,
    tracked_further_out,
    viewed_conversation,
)
from ._device import build_soon
from ._events import ENGAGE, INITIALIZE, new_event
from ._facts import (
    TrustedProxies,
    client_scheme,
    forwarded_client_ip,
    names_address,
)
from ._fork import reset_in_child
from ._log import logger
from ._rules import WIDGET, Match

__all__ = ["AgentSightWSGIMiddleware"]

Environ = MutableMapping[str, Any]
StartResponse = Callable[..., Any]

#: Where handlers find the request's :class:`~agentsight_middleware.Conversation`.
ENVIRON_KEY = "agentsight.conversation"


def _environ_key(header: str) -> str:
    if header in ("content-type", "content-length"):
        return header.upper().replace("-", "_")
    return "HTTP_" + header.upper().replace("-", "_")


class AgentSightWSGIMiddleware(MiddlewareBase):
    """Tracks chat-widget page views and chat requests of a WSGI app."""

    def __init__(self, app: Any = None, /, **options: Unpack[Options]) -> None:
        # Positional for Starlette's add_middleware() (its factory protocol passes the
        # app positional-only), or app= as Litestar's DefineMiddleware passes it.
        rest: dict[str, Any] = dict(options)
        super().__init__(_the_app(app, rest, "AgentSightWSGIMiddleware"), **rest)
        self._cookie_prefix = f"{self._settings.cookie_name}="
        self._id_key = _environ_key(self._settings.id_header)
        self._idle = True
        # A server that forks a child for each request and ends it with os._exit()
        # (socketserver's ForkingMixIn: Werkzeug's run_simple(processes=N), Flask's
        # app.run(processes=N)) runs no exit hook: what the child queued would be lost.
        self._flush_each = False
        reset_in_child(self._after_fork)

    def _after_fork(self) -> None:
        self._idle = True

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        if self._idle:
            return self._first_request(environ, start_response)
        path: str = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
        if not path.isascii():
            # PEP 3333 hands the path over as latin-1-decoded bytes; rules are text.
            path = path.encode("latin-1", "replace").decode("utf-8", "replace")
        # RuleSet.match's answer without calling it for most requests (see
        # ``RuleSet.exact_matches``): this runs on every request of the app.
        by_method = self._exact_matches.get(path)
        if by_method is None:
            if not path.startswith(self._prefixes):
                return self.app(environ, start_response)  # type: ignore[no-any-return]
            match = self._match(environ.get("REQUEST_METHOD", "GET"), path)
        else:
            method = environ.get("REQUEST_METHOD", "GET")
            match = by_method[method] if method in by_method else self._match(method, path)
        if match is None:
            return self.app(environ, start_response)  # type: ignore[no-any-return]
        if tracked_further_out():
            # Tracked already, by one of ours further out (an app wrapped twice, or under a
            # DispatcherMiddleware that is wrapped too): once is the count.
            self._tracked_further_out(path)
            return self.app(environ, start_response)  # type: ignore[no-any-return]
        handle = self._widget if match.rule.kind == WIDGET else self._chat
        if not self._flush_each:
            return handle(environ, start_response, match, path)
        try:
            result = handle(environ, start_response, match, path)
        except BaseException:
            # The app raised: no response, no close() to wait at, and the server's 500
            # is the child's last act (a chat with no answer is one: queued as it failed).
            self.flush()
            raise
        return _at_close(result, self.flush)

    def _first_request(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        try:
            wraps_itself = getattr(self.app, "wsgi_app", None) is self
        except Exception:  # an app whose __getattr__ raises (not AttributeError): not Flask
            wraps_itself = False
        if wraps_itself:
            # app.wsgi_app = AgentSightWSGIMiddleware(app): Flask's __call__ calls its
            # wsgi_app, which is this, which calls the app... A RecursionError said
            # nothing of why; said here on every request until it is fixed.
            raise RuntimeError(
                "AgentSightWSGIMiddleware wraps the app whose wsgi_app it is, so it calls "
                "itself: wrap the app's wsgi_app instead, "
                "app.wsgi_app = AgentSightWSGIMiddleware(app.wsgi_app, ...)"
            )
        # WSGI has no start-up hook: the first request of the serving process starts
        # the worker, so a durable outbox left by the last run is sent.
        self._idle = False
        self._serving()
        self._flush_each = _in_a_child_forked_for_the_request()
        self._core.delivery.ensure_started()
        self._check_routes(environ)
        # And, tracked or not, once it is answered, the user-agent parser's build (see
        # _device.build_soon): before the first page view when anything else comes first
        # (a probe), and not beside the first request itself, whose handler would share
        # the GIL with the build's Python half (+5-13 ms, started as it came).
        try:
            result = self(environ, start_response)
        except BaseException:
            build_soon()
            raise
        if _as_it_is(result, environ):
            # Not wrapped (the server's fast paths, len() and sendfile, must see them): the
            # app has answered, and the build starts while the server sends it.
            build_soon()
            return result
        return _at_close(result, build_soon)

    def _check_routes(self, environ: Environ) -> None:
        """Rules that miss the app's routes by a little (see _routes), said at the first
        request: WSGI has no start-up hook, and its routes are all declared by then."""
        try:
            from ._routes import language_prefixed, script_name, wsgi_served

            served = wsgi_served(self.app, environ)
            if served is not None:
                root = script_name(environ)
                prefixed = language_prefixed(self.app, root, self._core.is_widget_page)
                self._tell_near_misses(served, root, prefixed)
        except Exception as exc:  # a check, never in the way of the request
            logger.debug("could not compare the rules with the app's routes: %r", exc)

    def _conversation(
        self,
        environ: Environ,
        match: Match,
        path: str,
        conversation_id: str,
        id_source: str,
    ) -> Conversation:
        get = environ.get
        customer_id = extra = None
        if self._has_hooks:
            customer_id, extra = self._core.hooks(_werkzeug_request, environ)
        trusted = self._trusted
        # The environ's values, not the environ: the app may change it, and a queued
        # event must not keep a request's whole environ (and body stream) alive.
        # Forwarding headers only when proxies are trusted (read in the worker).
        raw = (
            get("REMOTE_ADDR"),
            get("HTTP_HOST"),
            get("SERVER_NAME"),
            get("SERVER_PORT"),
            get("wsgi.url_scheme", "http"),
            get("QUERY_STRING", ""),
            get("HTTP_USER_AGENT", ""),
            get("HTTP_ACCEPT_LANGUAGE"),
            get("HTTP_REFERER"),
            trusted,
            None if trusted is None else get("HTTP_FORWARDED"),
            None if trusted is None else get("HTTP_X_FORWARDED_FOR"),
            None if trusted is None else get("HTTP_X_REAL_IP"),
            None if trusted is None else get("HTTP_X_FORWARDED_PROTO"),
            # What Werkzeug's ProxyFix in front of us saw, told of in the worker (one
            # lookup: the environ is not kept).
            None if trusted is None else get(_PROXY_FIX_ORIG),
        )
        rule = match.rule
        conversation = pending_conversation(
            conversation_id, id_source, rule.kind, rule.source, path, customer_id, extra,
            _facts, raw,
        )  # fmt: skip
        environ[ENVIRON_KEY] = conversation
        return conversation

    def _is_secure(self, environ: Environ) -> bool:
        """Whether the visitor used HTTPS, for the cookie's Secure flag."""
        get = environ.get
        forwarded = get("HTTP_FORWARDED")
        if forwarded is None:
            return self._core.is_secure(
                get("wsgi.url_scheme", "http"),
                get("REMOTE_ADDR"),
                None,
                get("HTTP_X_FORWARDED_PROTO"),
            )
        # Under "auto" the scheme is read from the header the IP is (see _facts): Forwarded,
        # or X-Forwarded-Proto when X-Forwarded-For or X-Real-IP names the client too.
        addressed = names_address(get("HTTP_X_FORWARDED_FOR")) or names_address(
            get("HTTP_X_REAL_IP")
        )
        return self._core.is_secure(
            get("wsgi.url_scheme", "http"),
            get("REMOTE_ADDR"),
            forwarded,
            get("HTTP_X_FORWARDED_PROTO"),
            addressed,
        )

    def _widget(
        self, environ: Environ, start_response: StartResponse, match: Match, path: str
    ) -> Iterable[bytes]:
        core = self._core
        cookie = environ.get("HTTP_COOKIE")
        found = cookie_value(cookie, self._cookie_name) if cookie else None
        if found is None:
            # Only a new id is a new chance to chat, hence the only view with an event.
            conversation_id, id_source, started = mint_id(), MINTED, time.time()
        else:
            conversation_id, id_source, started = found, "cookie", 0.0
        conversation = self._conversation(environ, match, path, conversation_id, id_source)
        if not _is_page_view(environ):
            return _respond(self.app, environ, start_response, core.current, conversation, None)
        set_cookie = (
            "Set-Cookie",
            self._settings.set_cookie_text(conversation_id, self._is_secure(environ)),
        )
        # Only a new id is a new chance to chat: a reload or the next page of
        # the same visit keeps the conversation (and its cookie).
        minted = id_source == MINTED
        initialize = self._submit or core.delivery.initialize
        cookie_prefix = self._cookie_prefix
        # The view's event, held until the response's headers are final (the app's return,
        # or its body's first bytes): until then a start_response with exc_info may still
        # replace the page with an error page, which is no view.
        held: list[Any] = []

        def wrapped_start_response(
            status: str, response_headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Any:
            if type(response_headers) is not list:
                # A one-shot iterable (a generator) is read once here and once by the
                # server: hand the server the list read.
                response_headers = list(response_headers)
            # A second call with exc_info is the error path: never a view.
            if exc_info is not None:
                held.clear()
            else:
                content_type, cache_control, for_cdns, own = _page_headers(
                    response_headers, cookie_prefix
                )
                code = _status_code(status)
                if not is_html_success(code, content_type):
                    if 200 <= code < 300 and code != 204:
                        core.not_a_page(match.rule.source, path, code, content_type)
                    elif 300 <= code < 400:
                        core.redirected(match.rule.source, path, code, _location(response_headers))
                    return _start(start_response, status, response_headers, exc_info)
                if core.redirects:  # empty unless a widget page was redirected
                    core.settle(match.rule.source)
                if (cache_control or for_cdns) and is_shared_cacheable(cache_control, for_cdns):
                    # Left as it is: a stored copy would hand this cookie to others.
                    core.shared_page(path)
                    return _start(start_response, status, response_headers, exc_info)
                if own is NOT_SET:
                    response_headers = [*response_headers, set_cookie]
                chosen = viewed_conversation(conversation, minted, own)
                if chosen is not None:
                    held.append(new_event((INITIALIZE, chosen, started or time.time())))
            return _start(start_response, status, response_headers, exc_info)

        def headers_final() -> None:
            if held:
                initialize(held.pop())

        return _respond(
            self.app, environ, wrapped_start_response, core.current, conversation, None,
            headers_final,
        )  # fmt: skip

    def _chat(
        self, environ: Environ, start_response: StartResponse, match: Match, path: str
    ) -> Iterable[bytes]:
        started = time.time()
        core = self._core
        settings = self._settings
        get = environ.get
        query = get("QUERY_STRING", "")
        id_header, content_type, cookie = get(self._id_key), get("CONTENT_TYPE"), get("HTTP_COOKIE")
        found = settings.find_id(match.params, id_header, content_type, cookie, query, None)
        if found is NEED_BODY:
            # Not when the client waits for a go-ahead: reading would give it (see asgi.py).
            body = b"" if "HTTP_EXPECT" in environ else peek_wsgi(environ, settings.max_body_peek)
            found = settings.find_id(match.params, id_header, content_type, cookie, query, body)
        if found is None or found is NEED_BODY:  # (asked with the body, it never needs it)
            conversation_id, id_source = mint_id(), MINTED
        else:
            conversation_id, id_source = found
        conversation = self._conversation(environ, match, path, conversation_id, id_source)
        event = new_event((ENGAGE, conversation, started))
        handler_scope: AbstractContextManager[None] | None
        pending = None
        hold = self._hold
        if hold is not None:
            # The built-in delivery waits for the answer's status (see asgi.py): settled
            # at start_response, or, however the request ends without one, by the scope
            # (or by the worker, after ANSWER_WAIT).
            handler_scope = pending = hold(event)
        else:
            # Waited for before the app (tracker_timeout at most): a handler using the
            # SDK finds the conversation already in place.
            delivery = core.delivery
            current = core.current
            token = current.set(conversation)
            try:
                delivery.engage_sync(event)
            finally:
                current.reset(token)
            handler_scope = delivery.scope(event)
        app_start_response = start_response
        set_cookie = None
        if settings.renews_cookie(id_source, conversation_id, cookie):
            # Keep later chat requests of this browser on the same conversation (and slide
            # the cookie's expiry while the visitor is chatting).
            set_cookie = (
                "Set-Cookie",
                settings.set_cookie_text(conversation_id, self._is_secure(environ)),
            )
        if set_cookie is not None or pending is not None:
            cookie_prefix = self._cookie_prefix

            def wrapped_start_response(
                status: str, response_headers: list[tuple[str, str]], exc_info: Any = None
            ) -> Any:
                if pending is not None:
                    pending.answered(isinstance(status, str) and status[:1] == "4")
                if set_cookie is not None:
                    if type(response_headers) is not list:
                        response_headers = list(response_headers)  # one-shot: see above
                    _, cache_control, for_cdns, own = _page_headers(response_headers, cookie_prefix)
                    # Unless the app sets the cookie itself (a new conversation, say), or
                    # sends the answer for shared caches (a stored copy would hand the
                    # cookie on).
                    if own is NOT_SET and not (
                        (cache_control or for_cdns) and is_shared_cacheable(cache_control, for_cdns)
                    ):
                        response_headers = [*response_headers, set_cookie]
                return _start(start_response, status, response_headers, exc_info)

            app_start_response = wrapped_start_response
        return _respond(
            self.app, environ, app_start_response, core.current, conversation, handler_scope
        )


def _respond(
    app: Any,
    environ: Environ,
    start_response: StartResponse,
    current: contextvars.ContextVar[Conversation | None],
    conversation: Conversation,
    handler_scope: AbstractContextManager[None] | None,
    headers_final: Callable[[], None] | None = None,
) -> Iterable[bytes]:
    """The app's response, called and iterated with the conversation current.

    A WSGI app may produce its body after it returns (Flask's
    ``stream_with_context``, Django's ``StreamingHttpResponse``): the handler's
    generator runs while the server iterates. So the conversation is set again for
    each step of the body (and its ``close()``), and the tracker's scope stays
    entered until the body is complete or closed, as an ASGI app's whole response
    runs inside the middleware's call. All of it in the server's own context, as
    before (what the app sets there, code around it still sees), and between the
    steps nothing of ours is left set: a harness that never reads or closes the
    body (a test client) finds no stale conversation afterwards.

    ``headers_final`` is called once the response's headers can no longer change: when
    the app returns a list, tuple or file, else at its body's first bytes (or its end).
    """
    token = current.set(conversation)
    key = id(conversation)
    handling.add(key)
    if handler_scope is not None:
        handler_scope.__enter__()
    try:
        result = app(environ, start_response)
    except BaseException as exc:
        if handler_scope is not None:
            _exit_scope(handler_scope, exc)
        raise
    finally:
        handling.discard(key)
        current.reset(token)
    if _as_it_is(result, environ):
        # No code of the app's runs while these are read (and a server's fast
        # paths for them, len() or sendfile, must still see them).
        if handler_scope is not None:
            _exit_scope(handler_scope, None)
        if headers_final is not None:
            headers_final()
        return result  # type: ignore[no-any-return]
    streamed = _Streamed(result, current, conversation, handler_scope, headers_final)
    if hasattr(result, "__len__"):
        # wsgiref and waitress work out a Content-Length from len() when there is one.
        try:
            return _SizedStreamed(streamed, len(result))
        except Exception:
            pass
    return streamed


def _in_a_child_forked_for_the_request() -> bool:
    """Whether this request runs in a child a ``socketserver.ForkingMixIn`` server forked
    for it alone: the child serves it, then leaves with ``os._exit()``, past every exit
    hook (the worker's flush at exit among them)."""
    socketserver = sys.modules.get("socketserver")
    if socketserver is None:
        return False
    frame: Any = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name == "process_request" and isinstance(
            frame.f_locals.get("self"), socketserver.ForkingMixIn
        ):
            return True
        frame = frame.f_back
    return False


def _at_close(result: Iterable[bytes], then: Callable[[], object]) -> Iterable[bytes]:
    """``result``, whose ``close()`` (the server's, once the answer is sent) calls ``then``
    after the app's own."""
    return _SizedAtClose(result, then) if hasattr(result, "__len__") else _AtClose(result, then)


class _AtClose:
    """A response whose ``close()`` also calls ``then``: the flush that waits for the events
    queued so far (up to ``shutdown_timeout``, as a flush at exit would) in a child that
    ``os._exit()`` ends right after the request (see above), or the user-agent parser's
    build after a process's first request."""

    __slots__ = ("_result", "_then")

    def __init__(self, result: Iterable[bytes], then: Callable[[], object]) -> None:
        self._result = result
        self._then = then

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._result)

    def close(self) -> None:
        try:
            close = getattr(self._result, "close", None)
            if close is not None:
                close()
        finally:
            self._then()


class _SizedAtClose(_AtClose):
    """:class:`_AtClose` of a response with a length, which it keeps (wsgiref works out a
    Content-Length from it)."""

    __slots__ = ()

    def __len__(self) -> int:
        return len(self._result)  # type: ignore[arg-type]


def _exit_scope(scope: AbstractContextManager[None], exc: BaseException | None) -> None:
    # The guarded scope logs its own failures and lets the app's error go on.
    if exc is None:
        scope.__exit__(None, None, None)
    else:
        scope.__exit__(type(exc), exc, exc.__traceback__)


def _as_it_is(result: object, environ: Environ) -> bool:
    """Whether ``result`` is handed to the server unwrapped: a list, a tuple or a file."""
    return type(result) is list or type(result) is tuple or _is_file(result, environ)


def _is_file(result: object, environ: Environ) -> bool:
    wrapper = environ.get("wsgi.file_wrapper")
    if wrapper is None:
        return False
    if isinstance(wrapper, type):
        return isinstance(result, wrapper)
    # uWSGI's is a function that returns the very file object it was given, and the
    # server sends it with sendfile() only if it gets that object back: wrapped, it
    # iterates it by lines instead (a file without newlines read whole into memory).
    # A file object, or anything with a file descriptor (uWSGI's test for sendfile, as
    # PyObject_AsFileDescriptor reads it: Django's File of a FileField or a storage,
    # tempfile's NamedTemporaryFile, neither of them io.IOBase): sent by the server, no code
    # of the app's runs for it. An app's lazy body that only offers read() (an
    # iterable-to-file adapter) produces its parts while the server iterates, with its
    # conversation.
    if isinstance(result, io.IOBase):
        return True
    try:
        fd = result.fileno()  # type: ignore[attr-defined]
    except Exception:  # none, io.UnsupportedOperation, a __getattr__ that raises
        return False
    return type(fd) is int and fd >= 0


_END: Any = object()


class _Streamed:
    """An app's response iterable whose steps run with the conversation current."""

    __slots__ = ("_body", "_close", "_conversation", "_current", "_scope")

    def __init__(
        self,
        result: Iterable[bytes],
        current: contextvars.ContextVar[Conversation | None],
        conversation: Conversation,
        scope: AbstractContextManager[None] | None,
        headers_final: Callable[[], None] | None = None,
    ) -> None:
        self._current = current
        self._conversation = conversation
        self._scope = scope
        self._close = getattr(result, "close", None)
        # A generator: each step and the end of the body cost next to nothing (an
        # iterator class paid ~2 us a request).
        self._body = self._run(result, headers_final)

    def __iter__(self) -> Iterator[bytes]:
        return self._body

    def _run(
        self, result: Iterable[bytes], headers_final: Callable[[], None] | None
    ) -> Iterator[bytes]:
        current, conversation = self._current, self._conversation
        # As in _respond: an app that calls the one it wraps as its body is read (a
        # generator) calls it here, and one of ours in there is nested.
        key, add, discard = id(conversation), handling.add, handling.discard
        try:
            token = current.set(conversation)
            add(key)
            try:
                steps = iter(result)
            finally:
                discard(key)
                current.reset(token)
            # Set for each step, reset before the server writes what it gave: a step may
            # run in another thread's context than the last. (Set and reset in one frame
            # with no context switched between: the reset cannot fail.) next() with a
            # default ends the loop without an exception in this frame.
            set_, reset, end = current.set, current.reset, _END
            while True:
                token = set_(conversation)
                add(key)
                try:
                    chunk = next(steps, end)
                finally:
                    discard(key)
                    reset(token)
                if chunk is end:
                    break
                if headers_final is not None and chunk:
                    # The server sends the headers with the first bytes (PEP 3333).
                    headers_final()
                    headers_final = None
                yield chunk
        except GeneratorExit:
            # Abandoned half-way. Not passed on to the app's iterator (``yield from``
            # would): close() calls the app's close(), once.
            raise
        except BaseException as exc:
            self._leave(exc)
            raise
        # The body is complete: leave the scope now rather than at close(), which a
        # server should call but a test client may never.
        if headers_final is not None:
            headers_final()  # an empty body: the headers went at its end
        self._leave(None)

    def close(self) -> None:
        # PEP 3333: the server calls this once, however the iteration ended.
        close, self._close = self._close, None
        body: Any = self._body  # a generator
        try:
            try:  # noqa: SIM105 - suppress() costs ~0.5 us, and this runs per request
                body.close()
            except ValueError:
                pass  # running in another thread (a watchdog closing): it leaves at its end
            if close is not None:
                token = self._current.set(self._conversation)
                try:
                    close()
                finally:
                    self._current.reset(token)
        finally:
            if not body.gi_running:
                self._leave(None)

    def _leave(self, exc: BaseException | None) -> None:
        scope, self._scope = self._scope, None
        if scope is not None:
            _exit_scope(scope, exc)


class _SizedStreamed:
    """:class:`_Streamed` of a response that has a length, which it keeps."""

    __slots__ = ("_length", "_streamed", "close")

    def __init__(self, streamed: _Streamed, length: int) -> None:
        self._streamed = streamed
        self._length = length
        self.close = streamed.close

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._streamed)


def _start(
    start_response: StartResponse, status: str, headers: list[tuple[str, str]], exc_info: Any
) -> Any:
    # Two arguments unless there is an error to report: PEP 3333 servers take
    # three, but test harnesses and hand-written servers often take two.
    if exc_info is None:
        return start_response(status, headers)
    return start_response(status, headers, exc_info)


def _facts(raw: tuple[Any, ...]) -> tuple[Any, ...]:
    """A conversation's request facts (``_conversation._LAZY_FIELDS``) from the environ
    values the request path kept; called on first use, mostly by the worker."""
    (peer, host, server_name, server_port, scheme, query, user_agent, language, referer,
     trusted, forwarded, forwarded_for, real_ip, proto, proxy_fixed) = raw  # fmt: skip
    if host is None and server_name:
        host = f"{server_name}:{server_port or ''}".rstrip(":")
    forwarding = None
    if trusted is not None:
        forwarding = (forwarded, forwarded_for, real_ip)
        if proxy_fixed is not None and not _proxy_fix_warned:
            _warn_if_proxy_fixed(peer, scheme, proxy_fixed, trusted, forwarding, proto)
        scheme = _client_scheme(peer, scheme, forwarding, proto, trusted)
    return (peer, user_agent, language, scheme, host, query, referer, forwarding, trusted)


# Where Werkzeug's ProxyFix keeps the environ values it replaced (Werkzeug 1.0+).
_PROXY_FIX_ORIG = "werkzeug.proxy_fix.orig"
_proxy_fix_warned = False


def _reading(
    peer: Any,
    scheme: Any,
    forwarding: tuple[Any, Any, Any],
    proto: Any,
    trusted: TrustedProxies,
) -> tuple[str | None, str]:
    """The IP and scheme the middleware records for a request from ``peer`` over
    ``scheme`` with these forwarding headers (as _facts and the conversation read them)."""
    # Remembered as the conversation's own IP is: this runs for every event while ProxyFix
    # agrees (never warned), and a visitor's next events then walk no header again.
    address = forwarded_client_ip(peer, forwarding, trusted)
    return address, _client_scheme(peer, scheme, forwarding, proto, trusted)


def _client_scheme(
    peer: Any, scheme: Any, forwarding: tuple[Any, Any, Any], proto: Any, trusted: TrustedProxies
) -> str:
    forwarded, forwarded_for, real_ip = forwarding
    return client_scheme(
        scheme, forwarded=forwarded, x_forwarded_proto=proto, peer=peer, trusted=trusted,
        x_forwarded_for=forwarded_for, x_real_ip=real_ip,
    )  # fmt: skip


def _warn_if_proxy_fixed(
    peer: Any,
    scheme: Any,
    original: Any,
    trusted: TrustedProxies,
    forwarding: tuple[Any, Any, Any],
    proto: Any,
) -> None:
    """Warn once if Werkzeug's ``ProxyFix`` in front of the middleware has replaced
    ``REMOTE_ADDR`` (from ``X-Forwarded-For``) or ``wsgi.url_scheme`` (from
    ``X-Forwarded-Proto``): the middleware then reads the forwarding headers again from an
    address that is not the proxy's, and ``trusted_proxies=`` no longer decides. The IP
    recorded is ProxyFix's pick (a client's own ``X-Forwarded-For`` behind a proxy that
    writes ``X-Real-IP`` or ``Forwarded``), or, for a client whose address is trusted, one
    it wrote. The WSGI twin of asgi's ``_warn_if_rewritten``; ProxyFix keeps what it
    replaced, so nothing is guessed. A hop count and ``"*"`` read the headers whatever the
    peer is, and the scheme from them too: nothing changes for them.

    Not undone (``REMOTE_ADDR`` taken from ``original``): ``original`` is only what the
    nearest ProxyFix saw (another fixer may stand further out), ProxyFix may have set the
    host the page URL is built from too, and the app runs on ProxyFix's answer: which of
    two disagreeing settings is meant only their owner can say. The middleware wrapping
    ProxyFix reads the environ before ProxyFix changes it, so both can stay.

    Said only when the two readings differ: ProxyFix set up as Flask's docs say (``x_for=1``
    behind one proxy appending to ``X-Forwarded-For``) hands over the client's address,
    which the middleware, finding it untrusted, records as it would have; a warning there
    that a client chooses its IP was wrong. Worked out in the worker, not on the request."""
    global _proxy_fix_warned
    if trusted.hop_count or trusted.trusts_all or not isinstance(original, dict):
        return
    before_peer = original.get("REMOTE_ADDR")
    before_scheme = original.get("wsgi.url_scheme")
    if before_peer == peer and before_scheme == scheme:
        return  # nothing forwarded on this request: ProxyFix changed nothing we read
    if _reading(peer, scheme, forwarding, proto, trusted) == _reading(
        before_peer, before_scheme, forwarding, proto, trusted
    ):
        return  # the same IP and scheme as from the connection as it came: nothing lost
    _proxy_fix_warned = True
    replaced = []
    if before_peer != peer:
        replaced.append(f"the connection's address {before_peer!r} with {peer!r}")
    if before_scheme != scheme:
        replaced.append(f"its scheme {before_scheme!r} with {scheme!r}")
    logger.warning(
        "Werkzeug's ProxyFix in front of the middleware replaced %s (from X-Forwarded-*): "
        "with trusted_proxies= the middleware reads the forwarding headers itself, now from "
        "an address that is not your proxy's, so a client can choose the IP or scheme it "
        "records (or they are wrong). Wrap ProxyFix in the middleware instead "
        "(AgentSightWSGIMiddleware(ProxyFix(app), trusted_proxies=...)): it then reads the "
        "connection as it came, and the app keeps ProxyFix's answer. Or pass "
        "trusted_proxies=None to record ProxyFix's answer, right only if its x_for= and "
        "x_proto= count the proxies that append to X-Forwarded-For and X-Forwarded-Proto.",
        " and ".join(replaced),
    )


_PURPOSES = ("HTTP_SEC_PURPOSE", "HTTP_PURPOSE", "HTTP_X_PURPOSE", "HTTP_X_MOZ")


def _is_page_view(environ: Environ) -> bool:
    get = environ.get
    purpose = None
    if (
        "HTTP_SEC_PURPOSE" in environ
        or "HTTP_PURPOSE" in environ
        or "HTTP_X_PURPOSE" in environ
        or "HTTP_X_MOZ" in environ
    ):
        purpose = ", ".join(str(get(key, "")) for key in _PURPOSES)
    return is_page_view(
        get("HTTP_ACCEPT"),
        get("HTTP_SEC_FETCH_DEST"),
        purpose,
        get("HTTP_USER_AGENT"),
        get("HTTP_SEC_FETCH_SITE"),
        get("HTTP_SEC_FETCH_STORAGE_ACCESS"),
    )


def _str_headers(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The headers whose name and value are ``str``. Another (an ``int`` Content-Length)
    breaks PEP 3333, but Werkzeug's server sends it as digits: it is passed on as it is,
    unread, rather than fail the request here. Only then: a test on every header would
    cost every tracked response."""
    return [
        (name, value) for name, value in headers if isinstance(name, str) and isinstance(value, str)
    ]


def _status_code(status: str) -> int:
    code = status[:3]
    return int(code) if code.isdigit() else 0


def _page_headers(
    headers: list[tuple[str, str]], prefix: str
) -> tuple[str | None, str | None, str | None, AppCookie]:
    """``(Content-Type, Cache-Control, the headers for CDNs alone, our cookie's id)`` of a
    response, in one pass over its headers: the first ``Content-Type``; the cache headers
    each joined; the id of the app's own ``Set-Cookie`` for our cookie (``NOT_SET`` when it
    sets none, None when it sets an empty or invalid one: deletes it, say)."""
    content_type = cache_control = for_cdns = None
    own: AppCookie = NOT_SET
    try:
        for name, value in headers:
            lowered = name.lower()
            if lowered == "content-type":
                if content_type is None:
                    content_type = value
            elif lowered == "set-cookie":
                value = value.lstrip(" \t")  # Django's WSGI handler sends a leading blank
                if value.startswith(prefix):
                    # The last one: it is the one the browser keeps (a delete, then a set).
                    own = set_cookie_value(value, prefix)
            elif lowered == "cache-control":
                cache_control = value if cache_control is None else f"{cache_control}, {value}"
            elif lowered in CDN_CACHE_HEADERS:
                for_cdns = value if for_cdns is None else f"{for_cdns}, {value}"
    except (TypeError, AttributeError):
        return _page_headers(_str_headers(headers), prefix)
    return content_type, cache_control, for_cdns, own


def _location(headers: list[tuple[str, str]]) -> str | None:
    """The response's ``Location``, for a redirect (not on the way of a page)."""
    for name, value in _str_headers(headers):
        if name.lower() == "location":
            # PEP 3333's latin-1 string; an IRI's UTF-8 bytes read as text.
            return (
                value
                if value.isascii()
                else value.encode("latin-1", "replace").decode("utf-8", "replace")
            )
    return None


def _werkzeug_request(environ: Environ) -> Any:
    # Imported here: only apps that configure a request hook pay for it. Shallow:
    # a hook must not consume the body the app is about to read.
    from werkzeug.wrappers import Request

    return Request(environ, shallow=True)  # type: ignore[arg-type]
