"""The conversation a request belongs to: its id, where the id came from, and the
request facts gathered for it.

Everything here is pure: parsing of cookies, query strings and bodies works on
``str``/``bytes`` handed over by the ASGI or WSGI glue, so both share it.
"""

from __future__ import annotations

import functools
import json
import os
import re
import threading
from collections.abc import Mapping
from typing import Any, NamedTuple
from urllib.parse import parse_qsl

from ._facts import (
    MAX_URL_LENGTH,
    TrustedProxies,
    best_language,
    classify_user_agent,
    client_ip,
    page_url,
    peer_address,
    redact_url,
)

__all__ = [
    "ID_SOURCES",
    "MINTED",
    "Conversation",
    "clean_id",
    "cookie_value",
    "form_field",
    "is_valid_id",
    "json_field",
    "mint_id",
    "query_field",
]

#: Where a chat request's conversation id may be found, in the default order of lookup.
ID_SOURCES = ("path", "header", "query", "json", "form", "cookie")
#: ``Conversation.id_source`` when no id was found and the middleware made one.
MINTED = "minted"

# Ids travel in cookies, headers and URLs and end up in the API's 255-character
# string fields: only accept a conservative alphabet and length so that a hostile
# value can neither break a Set-Cookie header nor be rejected by the backend.
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:~-]{0,127}")


def is_valid_id(value: str) -> bool:
    return _ID_RE.fullmatch(value) is not None


class _Minter:
    """Ids from the OS's random source, read 6 KiB at a time.

    One ``os.urandom`` call per id is a system call on every page view; a
    buffer amortises it to nothing while ids stay unguessable (a guessable id
    would let a stranger's chat land in someone else's conversation).
    """

    _SIZE = 6 * 1024

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hex = ""
        self._pos = 0

    def __call__(self) -> str:
        with self._lock:
            pos = self._pos
            if pos >= len(self._hex):
                self._hex = os.urandom(self._SIZE).hex()
                pos = 0
            self._pos = pos + 12
            return "conv_" + self._hex[pos : pos + 12]

    def _after_fork(self) -> None:
        # A child must not hand out the ids its parent (or siblings) will too.
        self._lock = threading.Lock()
        self._hex = ""
        self._pos = 0


#: A fresh id shaped like the official SDK's: ``conv_`` + 12 lowercase hex digits.
mint_id = _Minter()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=mint_id._after_fork)


def clean_id(value: object) -> str | None:
    """``value`` as an id if it is one we accept (integers are taken as their digits), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        value = str(value)
    if isinstance(value, str) and is_valid_id(value):
        return value
    return None


def cookie_value(header: str, name: str) -> str | None:
    """The value of cookie ``name`` in a ``Cookie`` header, or None.

    A hand-rolled scan rather than ``http.cookies``: that parser is slow, and it
    gives up on the whole header when any other cookie of the site is malformed.
    ``find`` jumps to the candidates instead of splitting every cookie of the site.
    """
    target = name + "="
    start = header.find(target)
    while start >= 0:
        # A real match starts the header or follows "; " (not "xname=").
        if start == 0 or header[start - 1] in "; \t":
            end = header.find(";", start)
            value = header[start + len(target) : end if end >= 0 else len(header)].strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            # clean_id of a str, without its two calls: this runs on most requests.
            return value if _ID_RE.fullmatch(value) is not None else None
        start = header.find(target, start + 1)
    return None


def query_field(query: str, name: str) -> str | None:
    if name not in query:
        return None
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key == name:
            return clean_id(value)
    return None


def form_field(body: bytes, name: str) -> str | None:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return query_field(text, name)


@functools.lru_cache(maxsize=8)
def _json_key(name: str) -> re.Pattern[bytes]:
    # The key with a string or integer value. A match can only be a real key: an
    # escaped quote inside a string value (\") cannot end the pattern's '"'.
    return re.compile(
        rb'"'
        + re.escape(name.encode())
        + rb'"\s*:\s*(?:"([A-Za-z0-9_.:~-]{1,128})"|(-?\d{1,30})\b)'
    )


def json_field(body: bytes, name: str) -> str | None:
    """The top-level string (or integer) field ``name`` of a JSON object body.

    ``json.loads`` costs ~15 us on 1 KB and ~400 us on 64 KB here, so the body is
    scanned for the key instead; the match is taken when it sits at the top level
    (one more "{" than "}" before it), and a full parse settles anything unclear.
    """
    # Most chat bodies carry no id: skip everything when the key cannot be there.
    if name.encode() not in body:
        return None
    match = _json_key(name).search(body)
    if match is not None:
        before = body[: match.start()]
        if before.count(b"{") - before.count(b"}") == 1 and b"[" not in before:
            value = match.group(1) or match.group(2)
            return clean_id(value.decode("ascii"))
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if isinstance(data, dict):
        return clean_id(data.get(name))
    return None


class Conversation(NamedTuple):
    """What the middleware knows about the conversation of one request.

    Handlers find it as ``request.state.agentsight`` (ASGI),
    ``environ["agentsight.conversation"]`` (WSGI) or ``current_conversation()``.
    The raw header values are kept and the derived facts (language, device, URL)
    are computed on first use, so that building one costs the request almost
    nothing and the slow parts run in the background worker. (A named tuple: one
    is built per tracked request, and a frozen dataclass of 15 fields costs
    several microseconds more to build.)
    """

    id: str
    #: ``path``, ``header``, ``query``, ``json``, ``form``, ``cookie`` or ``minted``.
    id_source: str
    #: ``widget`` or ``chat``.
    kind: str
    #: The rule that matched, as configured.
    rule: str
    #: The socket peer as the server reported it (see :attr:`client_ip` for the visitor).
    peer: str | None
    user_agent: str
    accept_language: str | None
    scheme: str
    host: str | None
    path: str
    query: str
    referrer: str | None = None
    customer_id: str | None = None
    extra_metadata: Mapping[str, Any] | None = None
    #: ``(Forwarded, X-Forwarded-For, X-Real-IP)`` when the peer may be a trusted proxy.
    forwarding: tuple[str | None, str | None, str | None] | None = None
    trusted_proxies: TrustedProxies | None = None

    @property
    def client_ip(self) -> str | None:
        """The visitor's IP: the peer, or what trusted proxies say (computed when asked,
        which is in the background worker, not on the request path)."""
        if self.forwarding is None or self.trusted_proxies is None:
            return peer_address(self.peer)
        forwarded, x_forwarded_for, x_real_ip = self.forwarding
        return client_ip(
            self.peer,
            forwarded=forwarded,
            x_forwarded_for=x_forwarded_for,
            x_real_ip=x_real_ip,
            trusted=self.trusted_proxies,
        )

    @property
    def language(self) -> str | None:
        return best_language(self.accept_language)

    @property
    def device(self) -> str | None:
        return classify_user_agent(self.user_agent)[0]

    @property
    def is_bot(self) -> bool:
        return classify_user_agent(self.user_agent)[1]

    @property
    def url(self) -> str:
        """The page URL as the client asked for it, secret-looking query parameters removed."""
        return page_url(self.scheme, self.host, self.path, self.query)

    def metadata(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "page_path": self.path[:MAX_URL_LENGTH],
            "page_url": self.url,
            "referrer": redact_url(self.referrer) if self.referrer else None,
            "user_agent": self.user_agent[:255] or None,
            "rule": self.rule,
            "conversation_id_source": self.id_source,
        }
        if self.extra_metadata:
            data.update(self.extra_metadata)
        return data
