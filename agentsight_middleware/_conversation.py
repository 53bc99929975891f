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
from collections.abc import Callable, Mapping
from operator import itemgetter
from typing import TYPE_CHECKING, Any
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
    "pending_conversation",
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


#: Conversation's facts read from the request only when first asked for: in the
#: background worker, or by a handler that looks at them.
_LAZY_FIELDS = (
    "peer",
    "user_agent",
    "accept_language",
    "scheme",
    "host",
    "query",
    "referrer",
    "forwarding",
    "trusted_proxies",
)
_FIELDS = (
    "id",
    "id_source",
    "kind",
    "rule",
    "peer",
    "user_agent",
    "accept_language",
    "scheme",
    "host",
    "path",
    "query",
    "referrer",
    "customer_id",
    "extra_metadata",
    "forwarding",
    "trusted_proxies",
)

#: Reads the lazy facts, in ``_LAZY_FIELDS`` order, from what the glue kept of a request.
Facts = Callable[[Any], tuple[Any, ...]]


# Where each field sits: ``self[i]`` for the first seven, ``self._facts()[i]`` for
# the lazy ones (``_LAZY_FIELDS`` order). The methods below index them directly.
def _lazy(index: int) -> Any:
    def get(self: Conversation) -> Any:
        return self._facts()[index]

    get.__name__ = _LAZY_FIELDS[index]
    return property(get)


class Conversation(tuple[Any, ...]):
    """What the middleware knows about the conversation of one request.

    Handlers find it as ``request.state.agentsight`` (ASGI),
    ``environ["agentsight.conversation"]`` (WSGI) or ``current_conversation()``.
    Read-only. The request path keeps the raw header values it was given and
    decodes them on first use of any of the request facts (``user_agent``,
    ``host``, ``client_ip``...); the derived facts (language, device, URL) are
    computed when asked. So building one costs the request almost nothing, and
    the slow parts run in the background worker. (A tuple: it is built in C,
    several times faster than an object that guards its attributes.)
    """

    __slots__ = ()

    if TYPE_CHECKING:
        id: str
        #: ``path``, ``header``, ``query``, ``json``, ``form``, ``cookie`` or ``minted``.
        id_source: str
        #: ``widget`` or ``chat``.
        kind: str
        #: The rule that matched, as configured.
        rule: str
        path: str
        customer_id: str | None
        extra_metadata: Mapping[str, Any] | None
        #: The socket peer as the server reported it (see :attr:`client_ip` for the visitor).
        peer: str | None
        user_agent: str
        accept_language: str | None
        scheme: str
        host: str | None
        query: str
        referrer: str | None
        #: ``(Forwarded, X-Forwarded-For, X-Real-IP)`` when the peer may be a trusted proxy.
        forwarding: tuple[str | None, str | None, str | None] | None
        trusted_proxies: TrustedProxies | None
    else:
        id = property(itemgetter(0))
        id_source = property(itemgetter(1))
        kind = property(itemgetter(2))
        rule = property(itemgetter(3))
        path = property(itemgetter(4))
        customer_id = property(itemgetter(5))
        extra_metadata = property(itemgetter(6))
        peer = _lazy(0)
        user_agent = _lazy(1)
        accept_language = _lazy(2)
        scheme = _lazy(3)
        host = _lazy(4)
        query = _lazy(5)
        referrer = _lazy(6)
        forwarding = _lazy(7)
        trusted_proxies = _lazy(8)

    def __new__(
        cls,
        id: str,
        id_source: str,
        kind: str,
        rule: str,
        peer: str | None,
        user_agent: str,
        accept_language: str | None,
        scheme: str,
        host: str | None,
        path: str,
        query: str,
        referrer: str | None = None,
        customer_id: str | None = None,
        extra_metadata: Mapping[str, Any] | None = None,
        forwarding: tuple[str | None, str | None, str | None] | None = None,
        trusted_proxies: TrustedProxies | None = None,
    ) -> Conversation:
        facts = (
            peer,
            user_agent,
            accept_language,
            scheme,
            host,
            query,
            referrer,
            forwarding,
            trusted_proxies,
        )
        return tuple.__new__(
            cls, (id, id_source, kind, rule, path, customer_id, extra_metadata, [facts])
        )

    def _facts(self) -> tuple[Any, ...]:
        # Element 7 is a one-item list: the facts (one per lazy field), or the pair
        # ``(facts, raw)`` to read them from. Two threads filling it at once compute
        # the same facts; the raw values are dropped once read.
        box: list[Any] = self[7]
        facts = box[0]
        if len(facts) == 2:
            read, raw = facts
            facts = box[0] = read(raw)
        return facts  # type: ignore[no-any-return]

    def _astuple(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in _FIELDS)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Conversation):
            return NotImplemented
        return self._astuple() == other._astuple()

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    def __hash__(self) -> int:
        return hash(self._astuple())

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in _FIELDS)
        return f"Conversation({fields})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Conversation, self._astuple())

    @property
    def client_ip(self) -> str | None:
        """The visitor's IP: the peer, or what trusted proxies say (computed when asked,
        which is in the background worker, not on the request path)."""
        peer, *_, forwarding, trusted = self._facts()
        if forwarding is None or trusted is None:
            return peer_address(peer)
        forwarded, x_forwarded_for, x_real_ip = forwarding
        return client_ip(
            peer,
            forwarded=forwarded,
            x_forwarded_for=x_forwarded_for,
            x_real_ip=x_real_ip,
            trusted=trusted,
        )

    @property
    def language(self) -> str | None:
        return best_language(self._facts()[2])

    @property
    def device(self) -> str | None:
        return classify_user_agent(self._facts()[1])[0]

    @property
    def is_bot(self) -> bool:
        return classify_user_agent(self._facts()[1])[1]

    @property
    def url(self) -> str:
        """The page URL as the client asked for it, secret-looking query parameters removed."""
        facts = self._facts()
        return page_url(facts[3], facts[4], self[4], facts[5])

    def metadata(self) -> dict[str, Any]:
        facts = self._facts()
        referrer = facts[6]
        data: dict[str, Any] = {
            "page_path": self[4][:MAX_URL_LENGTH],
            "page_url": page_url(facts[3], facts[4], self[4], facts[5]),
            "referrer": redact_url(referrer) if referrer else None,
            "user_agent": facts[1][:255] or None,
            "rule": self[3],
            "conversation_id_source": self[1],
        }
        extra = self[6]
        if extra:
            data.update(extra)
        return data


_new_conversation = functools.partial(tuple.__new__, Conversation)


def pending_conversation(
    conversation_id: str,
    id_source: str,
    kind: str,
    rule: str,
    path: str,
    customer_id: str | None,
    extra_metadata: Mapping[str, Any] | None,
    facts: Facts,
    raw: Any,
    /,
) -> Conversation:
    """A :class:`Conversation` whose request facts are ``facts(raw)``, read on first use.

    The request path's constructor: ``raw`` is what the glue kept of the request
    (header values as it received them, no decoding), so the request pays for
    none of the facts it does not look at itself.
    """
    return _new_conversation(
        (
            conversation_id,
            id_source,
            kind,
            rule,
            path,
            customer_id,
            extra_metadata,
            [(facts, raw)],
        )
    )
