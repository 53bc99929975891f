"""WSGI glue: Flask, Django, plain Werkzeug, any PEP 3333 app.

::

    flask_app.wsgi_app = AgentSightWSGIMiddleware(flask_app.wsgi_app, widget_pages=["/"],
                                                  chat_routes=["POST /api/chat"], tracker=tracker)

Requests whose path matches no rule go straight to the app.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, MutableMapping
from typing import Any

from ._base import MiddlewareBase
from ._body import peek_wsgi
from ._config import NEED_BODY
from ._conversation import MINTED, Conversation, mint_id
from ._core import HEADER_KEYS, is_html_success
from ._events import ENGAGE, INITIALIZE, new_event
from ._fork import reset_in_child
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

    def __init__(self, app: Any, **options: Any) -> None:
        super().__init__(app, **options)
        names = (*HEADER_KEYS, self._settings.id_header)
        self._environ_keys = tuple((name, _environ_key(name)) for name in names)
        rules = self._settings.rules
        self._exact_matches = rules.exact_matches
        self._prefixes = rules.prefixes
        self._idle = True
        reset_in_child(self._after_fork)

    def _after_fork(self) -> None:
        self._idle = True

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        if self._idle:
            # WSGI has no start-up hook: the first request of the serving process
            # starts the worker, so a durable outbox left by the last run is sent.
            self._idle = False
            self._core.delivery.ensure_started()
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
        if match.rule.kind == WIDGET:
            return self._widget(environ, start_response, match, path)
        return self._chat(environ, start_response, match, path)

    def _headers(self, environ: Environ) -> dict[str, str]:
        get = environ.get
        headers: dict[str, str] = {}
        for name, key in self._environ_keys:
            value = get(key)
            if value is not None:
                headers[name] = value
        return headers

    def _conversation(
        self,
        environ: Environ,
        headers: dict[str, str],
        match: Match,
        path: str,
        conversation_id: str,
        id_source: str,
    ) -> Conversation:
        get = environ.get
        host = headers.get("host")
        if host is None and get("SERVER_NAME"):
            host = f"{environ['SERVER_NAME']}:{get('SERVER_PORT', '')}".rstrip(":")
        conversation = self._core.conversation(
            match,
            conversation_id,
            id_source,
            headers,
            get("REMOTE_ADDR"),
            get("wsgi.url_scheme", "http"),
            host,
            path,
            get("QUERY_STRING", ""),
            _werkzeug_request,
            environ,
        )
        environ[ENVIRON_KEY] = conversation
        return conversation

    def _widget(
        self, environ: Environ, start_response: StartResponse, match: Match, path: str
    ) -> Iterable[bytes]:
        started = time.time()
        core = self._core
        headers = self._headers(environ)
        conversation_id, id_source = core.widget_id(headers)
        conversation = self._conversation(environ, headers, match, path, conversation_id, id_source)
        current = core.current
        token = current.set(conversation)
        try:
            if not core.is_page_view_request(headers):
                return self.app(environ, start_response)  # type: ignore[no-any-return]
            set_cookie = (
                "Set-Cookie",
                self._settings.set_cookie_text(conversation_id, conversation.scheme == "https"),
            )
            # Only a new id is a new chance to chat: a reload or the next page of
            # the same visit keeps the conversation (and its cookie).
            initialize = core.delivery.initialize if id_source == MINTED else None

            def wrapped_start_response(
                status: str, response_headers: list[tuple[str, str]], exc_info: Any = None
            ) -> Any:
                # A second call with exc_info is the error path: never a view.
                if exc_info is None and is_html_success(
                    _status_code(status), _content_type(response_headers)
                ):
                    response_headers = [*response_headers, set_cookie]
                    if initialize is not None:
                        initialize(new_event((INITIALIZE, conversation, started)))
                return start_response(status, response_headers, exc_info)

            return self.app(environ, wrapped_start_response)  # type: ignore[no-any-return]
        finally:
            current.reset(token)

    def _chat(
        self, environ: Environ, start_response: StartResponse, match: Match, path: str
    ) -> Iterable[bytes]:
        started = time.time()
        core = self._core
        settings = self._settings
        headers = self._headers(environ)
        query = environ.get("QUERY_STRING", "")
        found = settings.find_id(match.params, headers, query, None)
        if found is NEED_BODY:
            found = settings.find_id(
                match.params, headers, query, peek_wsgi(environ, settings.max_body_peek)
            )
        if found is None:
            conversation_id, id_source = mint_id(), MINTED
        else:
            conversation_id, id_source = found
        conversation = self._conversation(environ, headers, match, path, conversation_id, id_source)
        current = core.current
        token = current.set(conversation)
        try:
            # In the request's own thread, before the app: a handler using the SDK
            # finds the conversation already in place.
            delivery = core.delivery
            event = new_event((ENGAGE, conversation, started))
            delivery.engage_sync(event)
            handler_scope = delivery.scope(event)
            app_start_response = start_response
            if id_source == MINTED or id_source == "cookie":
                # Keep later chat requests of this browser on the same conversation.
                set_cookie = (
                    "Set-Cookie",
                    settings.set_cookie_text(conversation_id, conversation.scheme == "https"),
                )

                def wrapped_start_response(
                    status: str, response_headers: list[tuple[str, str]], exc_info: Any = None
                ) -> Any:
                    return start_response(status, [*response_headers, set_cookie], exc_info)

                app_start_response = wrapped_start_response
            if handler_scope is None:
                return self.app(environ, app_start_response)  # type: ignore[no-any-return]
            with handler_scope:
                return self.app(environ, app_start_response)  # type: ignore[no-any-return]
        finally:
            current.reset(token)


def _status_code(status: str) -> int:
    code = status[:3]
    return int(code) if code.isdigit() else 0


def _content_type(headers: Iterable[tuple[str, str]]) -> str | None:
    for name, value in headers:
        if name.lower() == "content-type":
            return value
    return None


def _werkzeug_request(environ: Environ) -> Any:
    # Imported here: only apps that configure a request hook pay for it. Shallow:
    # a hook must not consume the body the app is about to read.
    from werkzeug.wrappers import Request

    return Request(environ, shallow=True)  # type: ignore[arg-type]
