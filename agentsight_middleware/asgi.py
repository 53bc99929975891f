"""ASGI glue: FastAPI, Starlette, Litestar, Django's ASGI handler, any ASGI 3 app.

::

    app.add_middleware(AgentSightMiddleware, widget_pages=["/"],
                       chat_routes=["POST /api/chat"], tracker=tracker)

Requests whose path matches no rule, and every websocket and lifespan message,
go straight to the app.
"""

from __future__ import annotations

import contextvars
import enum
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any, Final

from ._base import MiddlewareBase, Options, Unpack, _the_app
from ._body import peek_asgi
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
    is_html,
    is_page_view,
    is_shared_cacheable,
    tracked_further_out,
    viewed_conversation,
)
from ._delivery import HeldChat
from ._device import backend, build_soon
from ._events import ENGAGE, INITIALIZE, new_event
from ._facts import (
    _MAX_HOPS,
    TrustedProxies,
    client_scheme,
    hop_address_and_port,
    names_address,
    peer_address,
)
from ._log import logger
from ._rules import WIDGET, Match

if TYPE_CHECKING:
    import asyncio

__all__ = ["AgentSightMiddleware"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: The app's answers that end a lifespan's shutdown: after either the server ends the
#: process (uvicorn by the SIGTERM it re-raises, so no atexit hook runs).
_SHUTDOWN_ENDS: Final = frozenset({"lifespan.shutdown.complete", "lifespan.shutdown.failed"})


class AgentSightMiddleware(MiddlewareBase):
    """Tracks chat-widget page views and chat requests of an ASGI app."""

    _error: TypeError | ValueError  # only once it has become a _Misconfigured

    def __init__(self, app: Any = None, /, **options: Unpack[Options]) -> None:
        # Positional for Starlette's add_middleware() (its factory protocol passes the
        # app positional-only), or app= as Litestar's DefineMiddleware passes it.
        rest: dict[str, Any] = dict(options)
        try:
            super().__init__(_the_app(app, rest, "AgentSightMiddleware"), **rest)
        except (TypeError, ValueError) as error:
            # Starlette and FastAPI build their middleware inside the first ASGI call,
            # the lifespan's start, where uvicorn's default --lifespan auto (and the
            # `fastapi run` / `fastapi dev` commands, which cannot change it) takes a
            # raised error for "lifespan unsupported" and serves every request a 500.
            # Said through the lifespan protocol instead, the error stops the server.
            # Told by the caller's name: Starlette passes nothing that says who builds.
            # Should it be renamed, the error is raised as before (and logged).
            if sys._getframe(1).f_code.co_name != "build_middleware_stack":
                raise  # built by the app's own code (the wrap form): raised at import
            try:
                self.__class__ = _Misconfigured
            except TypeError:  # a subclass whose layout differs (__slots__): as before
                raise error from None
            self._error = error
            return
        self._cookie_prefix = f"{self._settings.cookie_name}=".encode("latin-1")
        self._id_header = self._settings.id_header.encode("latin-1")
        # Until the lifespan's start, the first request under a root path or the first
        # tracked request; _ROOT_PATH_UNKNOWN after a lifespan's check, whose scope has no
        # root_path: a request with one checks again under it.
        self._routes_unchecked: bool | str = True
        # Until a lifespan's start or the first request (see _first_request).
        self._idle = True

    # Typed Any: frameworks type ASGI differently (Starlette with mappings, Litestar
    # and asgiref with TypedDicts that a mapping parameter does not accept), and an
    # app handed to either must type-check there.
    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self._lifespan(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        if self._idle:
            await self._first_request(scope, receive, send)
            return
        path: str = scope["path"]
        root_path = scope.get("root_path")
        # Servers and routers disagree on whether ``path`` includes ``root_path``;
        # rules are written against the path the client sent, so rebuild it.
        if root_path:
            # At a segment boundary: "/shopping-cart" is not under "/shop"; and a
            # root_path of "/" (or ending in one) must not double the slash.
            base = root_path.rstrip("/")
            if root_path[-1] == "/" and path.startswith(root_path + "/"):
                # uvicorn --root-path /app/ hands over "/app//page" for "/page".
                path = base + path[len(root_path) :]
            if base and not (
                path.startswith(base) and (len(path) == len(base) or path[len(base)] == "/")
            ):
                path = base + path
            if self._routes_unchecked:
                # The first request under a root path checks, tracked or not: rules written
                # with it (or a mount's) go unchecked at the lifespan's start, and with
                # every rule a near miss, the site's own requests are never tracked.
                self._check_routes(root_path)
        # RuleSet.match's answer without calling it for most requests (see
        # ``RuleSet.exact_matches``): this runs on every request of the app.
        by_method = self._exact_matches.get(path)
        if by_method is None:
            if not path.startswith(self._prefixes):
                await self.app(scope, receive, send)
                return
            match = self._match(scope["method"], path)
        else:
            method = scope["method"]
            match = by_method[method] if method in by_method else self._match(method, path)
        if match is None:
            await self.app(scope, receive, send)
            return
        if tracked_further_out():
            # Tracked already, by one of ours on an app that mounts this one (or the app
            # wrapped twice), handling this request with its conversation: once is the
            # count. (Not any conversation current here: see _core.handling.)
            self._tracked_further_out(path)
            await self.app(scope, receive, send)
            return
        if self._routes_unchecked:
            # No lifespan (Django's ASGI handler has none, uvicorn --lifespan off) and no
            # root path: the first tracked request checks instead, an untracked one pays
            # nothing.
            self._check_routes(scope.get("root_path") or "")
        if match.rule.kind == WIDGET:
            await self._widget(scope, receive, send, match, path)
        else:
            await self._chat(scope, receive, send, match, path)

    async def _first_request(self, scope: Any, receive: Any, send: Any) -> None:
        """The first request, tracked or not, once no lifespan has come first (Daphne,
        uvicorn --lifespan off, whose worker built the user-agent parser at the first page
        view): served, then the parser's build starts in a thread of its own (see
        _device.build_soon), not beside the request (+5-13 ms, started as it came)."""
        self._idle = False
        try:
            await self(scope, receive, send)
        finally:
            build_soon()

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The app's lifespan, or, for an app that has none (Django's ASGI handler raises
        at the lifespan scope), the middleware's own: without it the server (uvicorn's
        ``--lifespan auto``) runs none, no shutdown ever closes the middleware, and on
        SIGTERM uvicorn ends the process by the signal, so no atexit hook runs either:
        what was queued, and the tracker's own buffer, were lost at every stop."""
        answered = received = False  # an app that reads or answers has a lifespan
        shutting_down = ended = False
        lifespan_send = self._lifespan_send(send)

        async def app_receive() -> Message:
            nonlocal received, shutting_down
            received = True
            message: Message = await receive()
            if message.get("type") == "lifespan.shutdown":
                shutting_down = True
            return message

        async def app_send(message: Message) -> None:
            nonlocal answered, ended
            answered = True
            if message.get("type") in _SHUTDOWN_ENDS:
                ended = True
            await lifespan_send(message)

        try:
            await self.app(scope, app_receive, app_send)
        except Exception as exc:
            if answered or received:
                if shutting_down and not ended:
                    # Its shutdown raised without a word to the server (a hand-written
                    # app): what is held is delivered all the same, as at a failed one.
                    await self._close_in_thread()
                raise  # the app's own lifespan failed: the server says so
            if "lifespan" not in str(exc).lower():
                # Not an app without lifespan saying so (Django's "... not lifespan.",
                # Channels' "No application configured for scope type 'lifespan'") but one
                # failing before its first look (Starlette building its middleware stack,
                # start-up work done first): the server's to report, and with
                # ``--lifespan on`` to stop on, as it did.
                raise
            logger.info(
                "the app does not support the ASGI lifespan (%r): the middleware answers "
                "it, to deliver what is held when the server stops",
                exc,
            )
        else:
            if answered or received:
                return
            # Returned without a look at it (``if scope["type"] != "http": return``): no
            # shutdown would come to the app, nor to us.
        await receive()  # lifespan.startup
        await lifespan_send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        await lifespan_send({"type": "lifespan.shutdown.complete"})

    def _lifespan_send(self, send: Send) -> Send:
        async def lifespan_send(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                # In the serving process, after any fork: events left in a durable
                # outbox by the last run are sent now, not at the first page view.
                self._core.delivery.ensure_started()
                self._check_routes("", lifespan=True)
                # The user-agent parser, before the server serves: built by the worker at
                # the first page view instead (~0.2-0.3 s, ~130 ms of it in one call into
                # ua-parser-rs that holds the GIL), it froze every request and stream in
                # flight. In a thread: the loop may run other lifespans meanwhile.
                import anyio.to_thread

                self._idle = False  # built here, before the server serves
                try:
                    await anyio.to_thread.run_sync(backend)
                except Exception as exc:
                    # Never the app's start-up: a parser that cannot be built is tried
                    # again at the first page view, and classifies nothing (see _classify).
                    logger.warning("could not build the user-agent parser: %r", exc)
            elif message["type"] in _SHUTDOWN_ENDS:
                # Deliver what is queued while the server still waits for us. At a failed
                # shutdown too (the app's own shutdown code raised): closed only at a
                # complete one, the tracker's buffer and the queue were lost at every such
                # stop under uvicorn's SIGTERM (no atexit hook runs there).
                await self._close_in_thread()
            await send(message)

        return lifespan_send

    async def _close_in_thread(self) -> None:
        # In a thread, because closing joins the worker thread.
        import anyio.to_thread

        await anyio.to_thread.run_sync(self.close)

    def _check_routes(self, root_path: str, *, lifespan: bool = False) -> None:
        """Rules that miss the app's routes by a little (see _routes), said once the app
        has started (its routes are all declared by then): at the lifespan's start, where
        no request pays for it, or else at the first tracked request, which does, with the
        event loop (20 rules: 2 ms on a 1,000-route Django URL conf of includes, 125 ms on
        a 1,000-route FastAPI app). A lifespan has no root_path (``uvicorn --root-path``):
        the first request under one checks again, tracked or not, and tells what is new."""
        again = self._routes_unchecked == _ROOT_PATH_UNKNOWN
        self._routes_unchecked = _ROOT_PATH_UNKNOWN if lifespan else False
        self._serving()
        if again and not root_path.rstrip("/"):
            return  # as the lifespan's check asked (a root_path of "/" is none)
        try:
            from ._routes import (
                app_served,
                language_prefixed,
                litestar_served,
                starlette_routes,
                starlette_served,
            )

            routes = starlette_routes(self.app)
            served = (
                litestar_served(self.app, root_path) or app_served(self.app, root_path)
                if routes is None
                else starlette_served(routes, root_path)
            )
            if served is not None:
                prefixed = (
                    None
                    if routes is not None
                    else language_prefixed(self.app, root_path, self._core.is_widget_page)
                )
                self._tell_near_misses(served, root_path, prefixed)
        except Exception as exc:  # a check, never in the way of the app's start
            logger.debug("could not compare the rules with the app's routes: %r", exc)

    def _conversation(
        self,
        scope: Scope,
        headers: dict[bytes, bytes],
        match: Match,
        path: str,
        conversation_id: str,
        id_source: str,
    ) -> Conversation:
        get = headers.get
        customer_id = extra = None
        if self._has_hooks:
            customer_id, extra = self._core.hooks(_starlette_request, scope)
        trusted = self._trusted
        # Forwarding headers only when proxies are trusted: the client IP is read
        # from them in the worker, where walking a chain costs the request nothing.
        raw = (
            scope.get("client"),
            scope.get("server"),
            scope.get("scheme", "http"),
            scope.get("query_string", b""),
            get(b"user-agent"),
            get(b"accept-language"),
            get(b"referer"),
            get(b"host"),
            trusted,
            None if trusted is None else get(b"forwarded"),
            None if trusted is None else get(b"x-forwarded-for"),
            None if trusted is None else get(b"x-real-ip"),
            None if trusted is None else get(b"x-forwarded-proto"),
        )
        rule = match.rule
        return pending_conversation(
            conversation_id, id_source, rule.kind, rule.source, path, customer_id, extra,
            _facts, raw,
        )  # fmt: skip

    def _is_secure(self, scope: Scope, headers: dict[bytes, bytes]) -> bool:
        """Whether the visitor used HTTPS, for the cookie's Secure flag."""
        scheme: str = scope.get("scheme", "http")
        if self._trusted is None:
            return scheme == "https"
        forwarded = headers.get(b"forwarded")
        proto = headers.get(b"x-forwarded-proto")
        if forwarded is None:
            if proto is None:
                return scheme == "https"
            client = scope.get("client")
            peer = client[0] if client else None
            # Core's answer for the proxy's usual value, looked up without the call.
            try:
                secure = self._secure_answers.get((scheme, peer, proto))
            except TypeError:  # unhashable (a bytearray value): Core decides, as before
                secure = None
            if secure is not None:
                return secure
        else:
            client = scope.get("client")
            peer = client[0] if client else None
            # Under "auto" the scheme is read from the header the IP is: Forwarded, or
            # X-Forwarded-Proto when X-Forwarded-For or X-Real-IP names the client too.
            addressed = names_address(headers.get(b"x-forwarded-for")) or names_address(
                headers.get(b"x-real-ip")
            )
            return self._core.is_secure(scheme, peer, forwarded, proto, addressed)
        # The raw bytes: Core looks the answer up before anything is decoded.
        return self._core.is_secure(scheme, peer, forwarded, proto)

    async def _widget(
        self, scope: Scope, receive: Receive, send: Send, match: Match, path: str
    ) -> None:
        core = self._core
        headers = _header_dict(scope)
        cookie = headers.get(b"cookie")
        found = cookie_value(cookie.decode("latin-1"), self._cookie_name) if cookie else None
        if found is None:
            # Only a new id is a new chance to chat, hence the only view with an event.
            conversation_id, id_source, started = mint_id(), MINTED, time.time()
        else:
            conversation_id, id_source, started = found, "cookie", 0.0
        conversation = self._conversation(scope, headers, match, path, conversation_id, id_source)
        scope.setdefault("state", {})["agentsight"] = conversation
        current = core.current
        token = current.set(conversation)
        key = id(conversation)
        handling.add(key)
        try:
            if scope["method"] != "GET" or not _is_page_view(headers):
                await self.app(scope, *_server_side(current, receive, send))
                return
            receive = _server_receive(current, receive)
            set_cookie = (
                b"set-cookie",
                self._settings.set_cookie(conversation_id, secure=self._is_secure(scope, headers)),
            )
            # Only a new id is a new chance to chat: a reload or the next page of
            # the same visit keeps the conversation (and its cookie).
            minted = id_source == MINTED
            submit = self._submit
            cookie_prefix = self._cookie_prefix

            async def send_wrapper(message: Message) -> None:
                if message["type"] == "http.response.start":
                    headers = message.get("headers", ())
                    if type(headers) is not list and type(headers) is not tuple:
                        # Any iterable will do (ASGI): read a one-shot one only once.
                        headers = list(headers)
                        message = {**message, "headers": headers}
                    own = _page_cookie(message["status"], headers, cookie_prefix)
                    if own is NOT_SET:
                        # A new message and header list: the app may reuse its own objects.
                        message = {**message, "headers": [*headers, set_cookie]}
                    if isinstance(own, _Page):
                        # A page shared caches may store is left as it is: a stored copy
                        # would hand this visitor's cookie to the next ones.
                        chosen = None
                        status = message["status"]
                        if own is _SHARED_PAGE:
                            core.shared_page(path)
                            if core.redirects:
                                core.settle(match.rule.source)
                        elif 200 <= status < 300 and status != 204:
                            core.not_a_page(match.rule.source, path, status, _content_type(headers))
                        elif 300 <= status < 400:
                            core.redirected(match.rule.source, path, status, _location(headers))
                    else:
                        if core.redirects:  # empty unless a widget page was redirected
                            core.settle(match.rule.source)
                        chosen = viewed_conversation(conversation, minted, own)
                    if chosen is not None:
                        event = new_event((INITIALIZE, chosen, started or time.time()))
                        if submit is not None:
                            submit(event)
                        else:
                            core.delivery.initialize(event, _get_loop())
                unset = current.set(None)  # the server's code: see _server_side
                try:
                    await send(message)
                finally:
                    current.reset(unset)

            await self.app(scope, receive, send_wrapper)
        finally:
            handling.discard(key)
            current.reset(token)

    async def _chat(
        self, scope: Scope, receive: Receive, send: Send, match: Match, path: str
    ) -> None:
        started = time.time()
        core = self._core
        settings = self._settings
        headers = _header_dict(scope)
        get = headers.get
        query = scope.get("query_string", b"").decode("latin-1")
        raw_id = get(self._id_header)
        raw_type = get(b"content-type")
        raw_cookie = get(b"cookie")
        id_header = None if raw_id is None else raw_id.decode("latin-1")
        content_type = None if raw_type is None else raw_type.decode("latin-1")
        cookie = None if raw_cookie is None else raw_cookie.decode("latin-1")
        found = settings.find_id(match.params, id_header, content_type, cookie, query, None)
        found_in_body = found is NEED_BODY
        if found_in_body:
            if b"expect" in headers:
                # The client waits for a go-ahead (100 Continue) before it sends the
                # body: reading it would give one on the app's behalf, to an app that
                # may refuse the request unread. The later sources still count.
                body = b""
            else:
                length = get(b"content-length")
                body, receive = await peek_asgi(
                    receive,
                    None if length is None else length.decode("latin-1"),
                    settings.max_body_peek,
                )
            found = settings.find_id(match.params, id_header, content_type, cookie, query, body)
        if found is None or found is NEED_BODY:  # (asked with the body, it never needs it)
            conversation_id, id_source = mint_id(), MINTED
        else:
            conversation_id, id_source = found
        conversation = self._conversation(scope, headers, match, path, conversation_id, id_source)
        scope.setdefault("state", {})["agentsight"] = conversation
        current = core.current
        token = current.set(conversation)
        key = id(conversation)
        handling.add(key)
        hold = self._hold
        # With the built-in delivery, the event waits for the answer: one the app refuses
        # (a 4xx: no CSRF token, not signed in, an invalid body, throttled) is no chat,
        # as the SDKs' own flow never reaches the handler's tracking calls then. At most
        # ANSWER_WAIT (_delivery): a chat the app still works on by then is one.
        pending: HeldChat | None = None
        try:
            event = new_event((ENGAGE, conversation, started))
            handler_scope = None
            if hold is not None:
                pending = hold(event)
            else:
                delivery = core.delivery
                await delivery.engage_async(event)
                handler_scope = delivery.scope(event)
            set_cookie = None
            if settings.renews_cookie(id_source, conversation_id, cookie):
                # Keep later chat requests of this browser on the same conversation
                # (and slide the cookie's expiry while the visitor is chatting, whichever
                # source the id was read from).
                set_cookie = (
                    b"set-cookie",
                    settings.set_cookie(conversation_id, secure=self._is_secure(scope, headers)),
                )
            app_receive: Receive
            app_send: Send
            if set_cookie is not None or pending is not None:
                cookie_prefix = self._cookie_prefix

                async def send_wrapper(message: Message) -> None:
                    if message["type"] == "http.response.start":
                        if pending is not None:
                            status = message.get("status")
                            # Any int: Starlette, FastAPI and Litestar pass an app's
                            # HTTPStatus member on as it is.
                            pending.answered(isinstance(status, int) and 400 <= status < 500)
                        if set_cookie is not None:
                            headers = list(message.get("headers", ()))
                            # Unless the app sets the cookie itself (a new conversation,
                            # say), or sends the answer for shared caches (a stored copy
                            # would hand the cookie on).
                            if _app_cookie(headers, cookie_prefix) is NOT_SET:
                                headers.append(set_cookie)
                            message = {**message, "headers": headers}
                    unset = current.set(None)  # the server's code: see _server_side
                    try:
                        await send(message)
                    finally:
                        current.reset(unset)

                app_receive, app_send = _server_receive(current, receive), send_wrapper
            else:
                app_receive, app_send = _server_side(current, receive, send)
            if handler_scope is None:
                await self.app(scope, app_receive, app_send)
            else:
                with handler_scope:
                    await self.app(scope, app_receive, app_send)
        finally:
            handling.discard(key)
            current.reset(token)
            if pending is not None:
                # No answer went out: the app failed (the server answers 500) or the
                # visitor left while it worked. Either way the visitor chatted.
                pending.settle()
            if found_in_body:
                abandon = getattr(receive, "abandon", None)
                if abandon is not None:
                    abandon()  # a receive of the peek's the app never took up


_PURPOSES = (b"sec-purpose", b"purpose", b"x-purpose", b"x-moz")
# Names the glue reads when they are sent more than once: cookies are split over
# several fields by HTTP/2, and a list header means the list of all its fields.
# The forwarding headers above all: a proxy that adds its own field after the
# client's (HAProxy's add-header, Apache's RequestHeader add) must be the one
# believed, as WSGI servers, which join repeated fields, already have it.
_JOINED = {
    b"cookie": b"; ",
    b"forwarded": b", ",
    b"x-forwarded-for": b", ",
    b"x-real-ip": b", ",
    b"x-forwarded-proto": b", ",
    b"accept": b", ",
    b"accept-language": b", ",
    **dict.fromkeys(_PURPOSES, b", "),
}


_ROOT_PATH_UNKNOWN: Final = "root_path unknown"


def _server_side(
    current: contextvars.ContextVar[Conversation | None], receive: Receive, send: Send
) -> tuple[Receive, Send]:
    """``receive`` and ``send`` for the app, calling the server's with no conversation
    current: the server's code they run keeps the context it runs in for the connection's
    later requests (uvicorn resumes a paused connection's reading there, past 64 KiB of a
    body, and starts a pipelined request's task), which ran with this one's conversation
    (current_conversation() said it, and the middleware took them for nested ones)."""

    async def server_send(message: Message) -> None:
        token = current.set(None)
        try:
            await send(message)
        finally:
            current.reset(token)

    return _server_receive(current, receive), server_send


def _server_receive(
    current: contextvars.ContextVar[Conversation | None], receive: Receive
) -> Receive:
    """``receive`` called with no conversation current (see _server_side)."""

    async def server_receive() -> Message:
        token = current.set(None)
        try:
            return await receive()
        finally:
            current.reset(token)

    return server_receive


def _header_dict(scope: Scope) -> dict[bytes, bytes]:
    """The request's headers by name (lower case, as ASGI servers send them).

    ``dict()`` builds it in C, several times faster than a loop over the fields;
    only a request that repeats a name takes the slow path, which joins the fields
    of a list header and keeps the first of any other.
    """
    raw = scope["headers"]
    if type(raw) is not list:
        # Any iterable will do (ASGI): one read only once must still reach the app.
        raw = scope["headers"] = list(raw)
    headers = dict(raw)
    if len(headers) == len(raw):
        return headers
    headers = {}
    # Values of a list header collected, then joined once: joining as they come copies
    # the growing value each time (30,000 repeated fields: 5 s on the event loop).
    repeated: dict[bytes, list[bytes]] = {}
    for name, value in raw:
        if name not in headers:
            headers[name] = value
        elif name in _JOINED:
            values = repeated.get(name)
            if values is None:
                values = repeated[name] = [headers[name]]
            values.append(value)
    for name, values in repeated.items():
        headers[name] = _JOINED[name].join(values)
    return headers


def _facts(raw: tuple[Any, ...]) -> tuple[Any, ...]:
    """A conversation's request facts (``_conversation._LAZY_FIELDS``) from what the
    request path kept of the scope and headers; called on first use, mostly by the worker."""
    (client, server, scheme, query, user_agent, language, referer, raw_host, trusted,
     forwarded, forwarded_for, real_ip, proto) = raw  # fmt: skip
    peer = client[0] if client else None
    host: str | None
    if raw_host is not None:
        host = raw_host.decode("latin-1")
    elif server:
        host = f"{server[0]}:{server[1]}" if server[1] else str(server[0])
    else:
        host = None
    forwarding = None
    if trusted is not None:
        forwarding = (
            None if forwarded is None else forwarded.decode("latin-1"),
            None if forwarded_for is None else forwarded_for.decode("latin-1"),
            None if real_ip is None else real_ip.decode("latin-1"),
        )
        if forwarding[1] is not None and peer is not None and not _rewrite_warned:
            _warn_if_rewritten(peer, client[1], forwarding[1], trusted)
        if forwarded is not None or proto is not None:
            scheme = client_scheme(
                scheme,
                forwarded=forwarding[0],
                x_forwarded_proto=None if proto is None else proto.decode("latin-1"),
                peer=peer,
                trusted=trusted,
                x_forwarded_for=forwarding[1],
                x_real_ip=forwarding[2],
            )
    return (
        peer,
        "" if user_agent is None else user_agent.decode("latin-1"),
        None if language is None else language.decode("latin-1"),
        scheme,
        host,
        query.decode("latin-1"),
        None if referer is None else referer.decode("latin-1"),
        forwarding,
        trusted,
    )


_rewrite_warned = False


def _warn_if_rewritten(
    peer: str, port: int | None, forwarded_for: str, trusted: TrustedProxies
) -> None:
    """Warn once if the server already replaced the socket peer with an X-Forwarded-For
    address (uvicorn's --proxy-headers, on for 127.0.0.1 by default): the middleware then
    reads the headers again from an address that is not the proxy's, and believes a
    client-written one. Checked in the worker, where the facts are read.

    Told by the port too: uvicorn takes the entry's (0 when it names none, as most do),
    where a connection has its own, so a client naming itself does not set this off (unless
    it writes the port its connection has as well)."""
    global _rewrite_warned
    if trusted.hop_count or peer in trusted:  # by position, or the peer is our proxy
        return
    address = peer_address(peer)
    # The server takes the right-most entry it does not trust, or the left-most when it
    # trusts them all ("*"): only those ends are compared. Splitting it all cost ~0.1 s of
    # the GIL for a direct client's 1 MB header of commas (uvicorn's httptools takes one),
    # on every such request, where the client IP reads no more than the last 32 entries.
    entries = forwarded_for.rsplit(",", _MAX_HOPS)
    if len(entries) > _MAX_HOPS:
        entries[0] = entries[0].partition(",")[0]
    if not any(
        host == address and int(entry_port or 0) == (port or 0)
        for host, entry_port in map(hop_address_and_port, entries)
        if entry_port.isdigit() or not entry_port
    ):
        return
    _rewrite_warned = True
    logger.warning(
        "the ASGI server put %r from X-Forwarded-For in place of the connection's address "
        "(uvicorn does so for connections from 127.0.0.1, --proxy-headers): with "
        "trusted_proxies= the middleware reads the forwarding headers itself, and a client "
        "can now choose the IP it records. Start uvicorn with --forwarded-allow-ips='' (or "
        "--no-proxy-headers), or pass trusted_proxies=None to keep the server's answer.",
        peer,
    )


def _is_page_view(headers: dict[bytes, bytes]) -> bool:
    get = headers.get
    accept = get(b"accept")
    user_agent = get(b"user-agent")
    # A browser's navigation, decided on the bytes: what nearly every page view
    # sends. Anything else goes through the full test below.
    if (
        accept is not None
        and b"text/html" in accept
        and get(b"sec-fetch-dest", b"document") == b"document"
        and user_agent is not None
        and b"!" <= user_agent[:1] <= b"~"
        and b"sec-purpose" not in headers
        and b"purpose" not in headers
        and b"x-purpose" not in headers
        and b"x-moz" not in headers
    ):
        return True
    purpose = None
    if (
        b"sec-purpose" in headers
        or b"purpose" in headers
        or b"x-purpose" in headers
        or b"x-moz" in headers
    ):
        purpose = ", ".join(get(name, b"").decode("latin-1") for name in _PURPOSES)
    dest = get(b"sec-fetch-dest")
    site = get(b"sec-fetch-site")
    storage = get(b"sec-fetch-storage-access")
    return is_page_view(
        None if accept is None else accept.decode("latin-1"),
        None if dest is None else dest.decode("latin-1"),
        purpose,
        None if user_agent is None else user_agent.decode("latin-1"),
        None if site is None else site.decode("latin-1"),
        None if storage is None else storage.decode("latin-1"),
    )


# ``http.response.start`` content types seen, and whether each is HTML: a page's
# responses carry one or two distinct values, and parsing one costs a microsecond.
_HTML_TYPES: dict[bytes, bool] = {}


def _latin1(value: Any) -> bytes:
    """A header value as bytes: ASGI says bytes, but apps send bytearrays, and a ``str``
    gets through some servers (h11 encodes it); the answer must be what it was without us."""
    if type(value) is bytes:
        return value
    if isinstance(value, str):
        return value.encode("latin-1", "replace")
    return bytes(value)


def _joined(previous: str | None, value: Any) -> str:
    """A header's values so far, with one more field's: as a list header reads."""
    text = _latin1(value).decode("latin-1")
    return text if previous is None else f"{previous}, {text}"


def _content_type(headers: Any) -> str | None:
    """The response's first ``Content-Type``, for a message (not on the way of a page)."""
    for name, value in headers:
        # As _page_cookie reads names: a memoryview one (no lower()) must not raise here.
        if _read(name) == _CONTENT_TYPE:
            return _latin1(value).decode("latin-1")
    return None


def _location(headers: Any) -> str | None:
    """The response's ``Location``, for a redirect (not on the way of a page)."""
    for name, value in headers:
        if _lower_name(name) == b"location":
            # An IRI's UTF-8 bytes read as text, as rules match paths.
            return _latin1(value).decode("utf-8", "replace")
    return None


def _app_cookie(headers: Any, prefix: bytes) -> AppCookie | _Page:
    """The id of the app's own ``Set-Cookie`` for our cookie: ``NOT_SET`` when it sets
    none, None when it sets an empty or invalid one (deletes it, say); ``_SHARED_PAGE``
    for an answer that shared caches may store."""
    _, own, shared = _read_start(headers, prefix)
    return _SHARED_PAGE if shared else own


class _Page(enum.Enum):
    NOT_A_PAGE = "not a page"
    SHARED = "a page for shared caches"


_NOT_PAGE: Final = _Page.NOT_A_PAGE
_SHARED_PAGE: Final = _Page.SHARED


def _page_cookie(status: int, headers: Any, prefix: bytes) -> AppCookie | _Page:
    """For the start of a response: ``_NOT_PAGE`` unless it starts a successful HTML
    page (or a 304 for one); ``_SHARED_PAGE`` for one that shared caches may store; else
    what the app's own ``Set-Cookie`` for our cookie says (as :func:`_app_cookie` reads it)."""
    if (not 200 <= status < 300 or status == 204) and status != 304:
        return _NOT_PAGE
    html, own, shared = _read_start(headers, prefix)
    # A 304 without a Content-Type: the cached page (see _core.is_html_success).
    if not (html or (html is None and status == 304)):
        return _NOT_PAGE
    return _SHARED_PAGE if shared else own


def _read_start(headers: Any, prefix: bytes) -> tuple[bool | None, AppCookie, bool]:
    """One pass over a response start's headers: whether its first ``Content-Type`` is
    HTML (None without one), the app's own cookie for ours (see :func:`_app_cookie`), and
    whether shared caches may store the response."""
    html: bool | None = None
    own: AppCookie = NOT_SET
    cache_control = for_cdns = None
    for name, value in headers:
        read = _READ.get(name) if type(name) is bytes else None
        if read is None:
            if len(name) not in _READ_LENGTHS:
                continue  # most of a response's headers: not one we read, by length alone
            read = _read(name)
        if read == _CONTENT_TYPE:
            if html is not None:
                continue  # the first one counts, as under WSGI
            value = _latin1(value)
            known = _HTML_TYPES.get(value)
            if known is None:
                known = is_html(value.decode("latin-1"))
                if len(_HTML_TYPES) >= 64:
                    _HTML_TYPES.clear()  # a site minting content types: stay bounded
                _HTML_TYPES[value] = known
            html = known
        elif read == _SET_COOKIE:
            value = _latin1(value).lstrip(b" \t")  # as Django's WSGI handler sends them
            if value.startswith(prefix):
                # The last one: it is the one the browser keeps (a delete, then a set).
                own = set_cookie_value(value.decode("latin-1"), prefix.decode("latin-1"))
        elif read == _CACHE_CONTROL:
            cache_control = _joined(cache_control, value)
        elif read == _FOR_CDNS:
            for_cdns = _joined(for_cdns, value)
    shared = (cache_control is not None or for_cdns is not None) and is_shared_cacheable(
        cache_control, for_cdns
    )
    return html, own, shared


_CONTENT_TYPE, _SET_COOKIE, _CACHE_CONTROL, _FOR_CDNS = range(4)
#: The response headers read at its start, by lower-case name: frameworks send lower
#: case, so one lookup settles most; the length test spares lower() on the others.
_READ = {
    b"content-type": _CONTENT_TYPE,
    b"set-cookie": _SET_COOKIE,
    b"cache-control": _CACHE_CONTROL,
    **{name.encode(): _FOR_CDNS for name in CDN_CACHE_HEADERS},
}
_READ_LENGTHS = frozenset(map(len, _READ))


def _read(name: Any) -> int | None:
    """What ``_READ`` says of a name not sent in lower case, or not as ``bytes`` (a
    ``bytearray`` or ``memoryview`` reads as its bytes; a ``str`` is no header name we
    read)."""
    lower = _lower_name(name)
    return None if lower is None else _READ.get(lower)


def _lower_name(name: Any) -> bytes | None:
    """A header name in lower case, from ``bytes``, a ``bytearray`` or a ``memoryview``;
    None for anything else (a ``str`` is no ASGI header name)."""
    if isinstance(name, (bytes, bytearray, memoryview)):
        return bytes(name).lower()
    return None


def _running_loop() -> asyncio.AbstractEventLoop | None:
    """The running asyncio loop, or None under trio (or with no loop)."""
    global _get_loop
    import asyncio  # loaded already: we run inside it

    # Never raises, unlike get_running_loop: trio apps would pay for an exception.
    _get_loop = asyncio._get_running_loop
    return _get_loop()


# Replaced by asyncio's own function on first use: importing asyncio here would
# load it into trio apps, and a function-level import costs every page view.
_get_loop: Callable[[], asyncio.AbstractEventLoop | None] = _running_loop


def _starlette_request(scope: Scope) -> Any:
    # Imported here: only apps that configure a request hook pay for it. No
    # ``receive``: a hook must not consume the body the app is about to read.
    from starlette.requests import Request

    return Request(scope)


class _Misconfigured(AgentSightMiddleware):
    """What a misconfigured middleware built by Starlette becomes: the error, told through
    the lifespan protocol (the server stops), or raised on each request (a 500) by a
    server that runs no lifespan."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        error = self._error
        if scope["type"] == "lifespan":
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send(
                    {
                        "type": "lifespan.startup.failed",
                        "message": f"agentsight-middleware is misconfigured: {error}",
                    }
                )
                # Raised too, as Starlette's own router does after startup.failed: a
                # runner that reads the app's outcome rather than that message (the
                # Starlette/FastAPI TestClient, asgi-lifespan's LifespanManager) would
                # otherwise start the app, and wait for ever (or time out) at shutdown.
                # uvicorn and hypercorn stop on the message and ignore the raise.
        # A new exception each time: raising the same one again would lengthen its
        # traceback with every request.
        raise type(error)(*error.args)

    def close(self, timeout: float | None = None) -> None:  # nothing was started
        pass

    def flush(self, timeout: float | None = None) -> bool:  # nothing was queued
        return True

    def stats(self) -> dict[str, int]:  # (was an AttributeError: no _core)
        raise type(self._error)(*self._error.args)

    def __repr__(self) -> str:
        return f"<AgentSightMiddleware misconfigured: {self._error}>"
