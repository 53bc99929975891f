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
from operator import attrgetter
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from ._facts import (
    MAX_URL_LENGTH,
    TrustedProxies,
    best_language,
    classify_user_agent,
    cut_text,
    forwarded_client_ip,
    page_url,
    peer_address,
    redact_path,
    redact_url,
)

__all__ = [
    "APP",
    "ID_SOURCES",
    "MAX_FIELD",
    "MINTED",
    "Conversation",
    "clamp",
    "clean_id",
    "cookie_value",
    "form_field",
    "is_valid_id",
    "json_field",
    "mint_id",
    "pending_conversation",
    "query_field",
    "set_cookie_value",
    "with_app_id",
]

#: Where a chat request's conversation id may be found, in the default order of lookup.
ID_SOURCES = ("path", "header", "query", "json", "form", "cookie")
#: ``Conversation.id_source`` when no id was found and the middleware made one.
MINTED = "minted"
#: ``Conversation.id_source`` of a page view whose response set the id cookie itself.
APP = "app"

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
    One regex finds the candidates whose value is an id (the name first, so the
    search jumps from one to the next as ``find`` would); what comes before each
    is checked by hand.
    """
    pattern = _COOKIE_PATTERNS.get(name)
    if pattern is None:
        pattern = _cookie_pattern(name)
    match = pattern.search(header)
    while match is not None:
        # A real match starts the header or follows ";" and any blanks: not "xname=",
        # and not "msg=hello name=x", another cookie's value that a page can write.
        before = match.start() - 1
        while before >= 0 and header[before] in " \t":
            before -= 1
        if before < 0 or header[before] == ";":
            return match.group(3)
        # Browsers send a cookie set for a longer path first: an empty or broken one
        # has no match at all, and one in the wrong place must not hide the good one.
        match = pattern.search(header, match.end())
    return None


def _cookie_pattern(name: str) -> re.Pattern[str]:
    """``name=`` and a value that is an id once stripped (as ``str.strip`` does: ``\\s``
    is the same whitespace) and unquoted, up to the next ";" or the end. An id holds no
    ";", "=", quote or blank, so a match cannot hide another candidate inside it."""
    # Each part atomic (``(?=(x))\N``, as Python < 3.11 has no possessive quantifiers):
    # none can give back what it took for the next to match, so a failing candidate
    # costs one pass over it, not one per blank or id character it could give back.
    pattern = re.compile(
        re.escape(name) + r'=(?=(\s*))\1("?)(?=(' + _ID_RE.pattern + r"))\3\2(?=(\s*))\4(?=;|\Z)"
    )
    if len(_COOKIE_PATTERNS) >= 8:
        _COOKIE_PATTERNS.clear()  # names come from configuration: a handful at most
    _COOKIE_PATTERNS[name] = pattern
    return pattern


_COOKIE_PATTERNS: dict[str, re.Pattern[str]] = {}


@functools.lru_cache(maxsize=8)
def _sent_as_is(name: str) -> bool:
    """Whether clients send ``name`` unescaped in a query or form (else "chat[id]" is
    "chat%5Bid%5D" there, and only parsing finds it)."""
    return _PLAIN_NAME.fullmatch(name) is not None


_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.~-]+")


def query_field(query: str, name: str) -> str | None:
    """The id in the first field ``name`` of a query string (or form body), as
    ``parse_qsl(query, keep_blank_values=True)`` reads the fields.

    Not by parsing every field: a chat request's 16 KB query or 64 KB form of fields cost
    1.6 to 13 ms of the event loop that way. One regex finds the fields that may be the one
    (the name as it is, or a key with an escape: "%", or "+" for a space), and only those
    are decoded. Bounded as a client could make it slow: the first 1,000 fields are read, as
    Django (``DATA_UPLOAD_MAX_NUMBER_FIELDS``) and Starlette (``max_fields``) read no more of
    a form; up to 64 keys with an escape are looked at (no client sends more before the id),
    only one that may decode to the name decoded (no longer than 3 characters a byte of
    it); a value too long to decode to an id is not decoded.
    """
    if name not in query and _sent_as_is(name):
        return None
    if query.count("&") >= _MAX_FIELDS:
        rest = query.split("&", _MAX_FIELDS)[_MAX_FIELDS]
        query = query[: len(query) - len(rest) - 1]
    found = _FIELD_PATTERNS.get(name)
    if found is None:
        found = _field_pattern(name)
    pattern, name_bytes, no_percent = found
    escaped = 0
    # "&" first: the regex then jumps from one field to the next as find() would.
    for match in pattern.finditer("&" + query):
        plain, key, value = match.group(1, 2, 5)
        if plain is None:
            if escaped == _ESCAPED_KEYS:
                return None
            escaped += 1
            # unquote costs ~0.3 us a "%" (~0.5 us one of no "XX"): not called for a key that
            # cannot decode to the name. Each byte of the name comes from one character or
            # one "%XX" of the key; a "%" of no "XX" stays as it is.
            if (
                len(key) > 3 * name_bytes
                or key.count("%") > name_bytes
                or (no_percent and _LONE_PERCENT.search(key) is not None)
                or unquote(key.replace("+", " ")) != name
            ):
                continue
        # The first field of that name decides, whatever its value (as parse_qsl is read).
        if not value or len(value) > _RAW_ID:
            return None
        return clean_id(unquote(value.replace("+", " ")))
    return None


def _field_pattern(name: str) -> tuple[re.Pattern[str], int, bool]:
    """The fields of a query whose key may be ``name``: as it is (unless the name holds a
    character a client must escape there), or with an escape; and the value after "=".
    With the name's length in UTF-8 and whether it holds no "%" (see query_field)."""
    sent_as_is = not any(char in name for char in "%+=&")
    exact = re.escape(name) if sent_as_is else "(?!)"  # (?!) never matches
    # A key decodes to the name only if it has at most 3 characters per byte of it ("%XX"):
    # a longer one is given up after that many, not scanned to its end (~5-20 ns a
    # character). Both runs are atomic (``(?=(x))\3``, Python 3.10 has no possessive
    # quantifiers): a key that fails is not given back one character at a time.
    name_bytes = len(name.encode("utf-8", "surrogatepass"))
    longest = 3 * name_bytes
    escaped = rf"(?=([^&=%+]{{0,{longest}}}))\3[%+](?=([^&=]{{0,{longest}}}))\4"
    pattern = re.compile(rf"&(?:({exact})|({escaped}))(?:=([^&]*))?(?=&|\Z)")
    if len(_FIELD_PATTERNS) >= 8:
        _FIELD_PATTERNS.clear()  # names come from configuration: a handful at most
    found = _FIELD_PATTERNS[name] = (pattern, name_bytes, "%" not in name)
    return found


_FIELD_PATTERNS: dict[str, tuple[re.Pattern[str], int, bool]] = {}
_LONE_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
#: Fields of a query or form read for the id (see query_field).
_MAX_FIELDS = 1000
#: Keys with an escape decoded in one query or form before giving up (see query_field).
_ESCAPED_KEYS = 64
#: A longer value cannot decode to an id: 128 characters, each at most "%XX".
_RAW_ID = 3 * 128


def form_field(body: bytes, name: str) -> str | None:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return query_field(text, name)


def _json_key(name: str) -> tuple[bytes, re.Pattern[bytes], bytes]:
    """``name`` encoded; the key with a string or integer value (an integer ends the
    value: "12.5" is a float, which is no id); and the key alone, quoted."""
    encoded = name.encode()
    pattern = re.compile(
        rb'"'
        + re.escape(encoded)
        + rb'"[ \t\r\n]*:[ \t\r\n]*'
        # The integer atomic (``(?=(x))\2``): a key followed by 30 digits and no end of
        # value, repeated over a body, would be tried once per digit given back.
        + rb'(?:"([A-Za-z0-9_.:~-]{1,128})"|(?=(-?(?:0|[1-9][0-9]{0,29})))\2(?=[ \t\r\n]*[,}]))'
    )
    if len(_JSON_KEYS) >= 8:
        _JSON_KEYS.clear()  # names come from configuration: a handful at most
    key = _JSON_KEYS[name] = (encoded, pattern, b'"' + encoded + b'"')
    return key


_JSON_KEYS: dict[str, tuple[bytes, re.Pattern[bytes], bytes]] = {}

#: What JSON counts as blank space (not \v or \f, which ``\s`` would take).
_JSON_BLANKS = b" \t\r\n"
_OPENS_OBJECT = re.compile(rb"[ \t\r\n]*\{")
#: What cannot come before a key of the top level (see json_field).
_NESTED_OR_ESCAPED = re.compile(rb"[{}\[\\]")


def _clean_before(body: bytes, start: int, end: int) -> bool:
    """No brace, bracket or backslash in ``body[start:end]``: one regex pass where that
    is short, else ``find`` (memchr) for each, ~80x faster per byte than the regex."""
    if end - start <= 256:
        return _NESTED_OR_ESCAPED.search(body, start, end) is None
    return (
        body.find(b"{", start, end) < 0
        and body.find(b"}", start, end) < 0
        and body.find(b"[", start, end) < 0
        and body.find(b"\\", start, end) < 0
    )


def _closes_object(body: bytes) -> bool:
    """Whether ``body``'s last byte but blanks is "}" (a copy, but no loop in Python over
    64 KB of trailing blanks: 4.7 ms)."""
    return body.rstrip(_JSON_BLANKS)[-1:] == b"}"


#: Bodies up to this size are checked for a repeated id key (see json_field).
_REPEAT_SCAN = 8 * 1024


def json_field(body: bytes, name: str) -> str | None:
    """The top-level string (or integer) field ``name`` of a JSON object body, as
    ``json.loads(body)[name]`` reads it.

    ``json.loads`` costs ~15 us on 1 KB and ~400 us on 64 KB here, so the body is
    scanned for the key instead. A match is taken only where nothing can make it
    mean something else: before it, the object's opening brace and no other, no
    bracket, no backslash (so no string holds a brace or a quote, and the match is
    a key of the top level), and after it the key nowhere again (the last one wins
    in ``json.loads``), and the body framed as an object ("{" first, "}" last).
    Anything else is settled by a full parse. What lies between the braces is not
    checked: a body broken elsewhere (a missing comma, say), which the app cannot read,
    still gives its id. An ASCII key written with escapes (``conversation\u005fid``)
    is not looked for: no client writes one. Nor is a repeated key in a body over
    8 KiB: looking costs ~18 us on 64 KB, on every such request, for a body no
    well-behaved client sends (there, the first key wins).
    """
    key = _JSON_KEYS.get(name)
    encoded, pattern, quoted = _json_key(name) if key is None else key
    # Most chat bodies carry no id: skip everything when the key cannot be there.
    if encoded not in body:
        if (len(body) > 1 and (body[0] in _UTF16_32_FIRST or body[1] == 0)) or not name.isascii():
            # UTF-16 or -32 (json.loads reads those too: a NUL in the first two
            # bytes, or a byte-order mark); or a key clients write with escapes
            # (json.dumps writes "\u00f3"): only a parse finds it.
            return _parsed_field(body, name)
        return None
    match = pattern.search(body)
    if match is not None and (body[-1] == 0x7D or _closes_object(body)):
        opened = _OPENS_OBJECT.match(body)
        if (
            opened is not None
            # Between the opening brace and the key: no brace, bracket or backslash.
            and _clean_before(body, opened.end(), match.start())
            and (len(body) > _REPEAT_SCAN or body.find(quoted, match.end()) < 0)
        ):
            text, integer = match.groups()
            if integer is None:
                value = text.decode("ascii")
                return value if _ID_RE.fullmatch(value) is not None else None
            return clean_id(int(integer))  # as json.loads reads it: "-0" is 0
    return _parsed_field(body, name)


_UTF16_32_FIRST = frozenset({0x00, 0xFE, 0xFF})


def _parsed_field(body: bytes, name: str) -> str | None:
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

#: Reads the lazy facts, in ``_LAZY_FIELDS`` order, from what the glue kept of a request.
Facts = Callable[[Any], tuple[Any, ...]]


def _lazy(index: int, doc: str) -> Any:
    def get(self: Conversation) -> Any:
        return self._facts()[index]

    get.__name__ = _LAZY_FIELDS[index]
    return property(get, doc=doc)


class Conversation:
    """What the middleware knows about the conversation of one request.

    Handlers find it as ``request.state.agentsight`` (ASGI),
    ``environ["agentsight.conversation"]`` (WSGI) or ``current_conversation()``.
    Read-only, and not a sequence: read its attributes. ``as_dict()`` gives the fields it
    was built with (``id``, ``id_source``, ..., the raw request facts such as ``peer`` and
    ``user_agent``), not what is worked out from them: ``client_ip``, ``language``,
    ``device``, ``url`` and ``is_bot`` are properties, read by name.
    The request path keeps the raw header values it was given and decodes them on
    first use of any of the request facts (``user_agent``, ``host``, ``client_ip``...);
    the derived facts (language, device, URL) are computed when asked. So building
    one costs the request almost nothing, and the slow parts run in the background
    worker.
    """

    # Private slots behind read-only properties: filling slots directly is what
    # makes one cheap to build (an object guarding ``__setattr__`` costs ~1 us more).
    __slots__ = ("_customer_id", "_extra", "_id", "_id_source", "_kind", "_path", "_rule", "_state")
    # The constructor's arguments, in order (``_FIELDS``).
    __match_args__ = (
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

    if TYPE_CHECKING:

        @property
        def id(self) -> str: ...
        @property
        def id_source(self) -> str: ...
        @property
        def kind(self) -> str: ...
        @property
        def rule(self) -> str: ...
        @property
        def path(self) -> str: ...
        @property
        def customer_id(self) -> str | None: ...
        @property
        def extra_metadata(self) -> Mapping[str, Any] | None: ...
        @property
        def peer(self) -> str | None: ...
        @property
        def user_agent(self) -> str: ...
        @property
        def accept_language(self) -> str | None: ...
        @property
        def scheme(self) -> str: ...
        @property
        def host(self) -> str | None: ...
        @property
        def query(self) -> str: ...
        @property
        def referrer(self) -> str | None: ...
        @property
        def forwarding(self) -> tuple[str | None, str | None, str | None] | None: ...
        @property
        def trusted_proxies(self) -> TrustedProxies | None: ...
    else:
        id = property(attrgetter("_id"), doc="The conversation id.")
        id_source = property(
            attrgetter("_id_source"),
            doc="``path``, ``header``, ``query``, ``json``, ``form``, ``cookie``, ``minted``, "
            "or ``app`` (the page's response set the cookie itself).",
        )
        kind = property(attrgetter("_kind"), doc="``widget`` or ``chat``.")
        rule = property(attrgetter("_rule"), doc="The rule that matched, as configured.")
        path = property(attrgetter("_path"), doc="The path the client asked for.")
        customer_id = property(attrgetter("_customer_id"), doc="From the ``customer_id`` hook.")
        extra_metadata = property(attrgetter("_extra"), doc="From the ``metadata`` hook.")
        peer = _lazy(0, "The socket peer as the server reported it (see ``client_ip``).")
        user_agent = _lazy(1, "The ``User-Agent`` header, or ``''``.")
        accept_language = _lazy(2, "The ``Accept-Language`` header.")
        scheme = _lazy(3, "``http`` or ``https``, as the visitor used it (trusted proxies told).")
        host = _lazy(4, "The ``Host`` header, or the server's address.")
        query = _lazy(5, "The query string, decoded as latin-1.")
        referrer = _lazy(6, "The ``Referer`` header.")
        forwarding = _lazy(
            7, "``(Forwarded, X-Forwarded-For, X-Real-IP)`` when the peer may be a trusted proxy."
        )
        trusted_proxies = _lazy(8, "The trusted proxies, when any are configured.")

    def __init__(
        self,
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
    ) -> None:
        self._id = id
        self._id_source = id_source
        self._kind = kind
        self._rule = rule
        self._path = path
        self._customer_id = customer_id
        self._extra = extra_metadata
        self._state: tuple[Any, ...] = (
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

    def _facts(self) -> tuple[Any, ...]:
        # ``_state`` holds the facts (one per lazy field), or the pair ``(read, raw)``
        # to read them from. Two threads filling it at once compute the same facts;
        # the raw values are dropped once read.
        facts = self._state
        if len(facts) == 2:
            read, raw = facts
            facts = self._state = read(raw)
        return facts

    def _compact(self) -> None:
        """Cut the request facts to what the event's payload can use.

        For an event joining a backed-up queue (the API down or slow, thousands waiting):
        a visitor's headers can be hundreds of KiB, and a queue bounded by its count of
        events must also be bounded in bytes. Each fact keeps more than the payload reads
        of it (user agent 512 chars, URLs 2 x 2,048 before their own cuts), so the payload
        is the same; forwarding headers keep their end, where the trusted proxies wrote.
        """
        peer, agent, language, scheme, host, query, referrer, forwarding, trusted = self._facts()
        if forwarding is not None:
            forwarded, forwarded_for, real_ip = forwarding
            forwarding = (
                _keep_refused(forwarded, '"'),  # refused whole when over 2,048 chars
                _keep_end(forwarded_for),
                _keep_refused(real_ip, "-"),  # one address, never a list
            )
        keep = _KEEP
        self._state = (
            peer,
            agent[:keep],
            None if language is None else language[:keep],
            scheme,
            None if host is None else host[:keep],
            query[:keep],
            None if referrer is None else referrer[:keep],
            forwarding,
            trusted,
        )

    def as_dict(self) -> dict[str, Any]:
        """Every field by name, in the order of the constructor's arguments."""
        return {name: getattr(self, name) for name in _FIELDS}

    def _astuple(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in _FIELDS)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Conversation):
            return NotImplemented
        return self._astuple() == other._astuple()

    def __hash__(self) -> int:
        # Over the fields that are always hashable: the metadata is a dict (the hook's).
        return hash((self.id, self.id_source, self.kind, self.rule, self.path))

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in _FIELDS)
        return f"{type(self).__name__}({fields})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), self._astuple())

    @property
    def client_ip(self) -> str | None:
        """The visitor's IP: the peer, or what trusted proxies say (computed when asked,
        which is in the background worker, not on the request path)."""
        peer, *_, forwarding, trusted = self._facts()
        if forwarding is None or trusted is None:
            return peer_address(peer)
        return forwarded_client_ip(peer, forwarding, trusted)

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
        return page_url(facts[3], facts[4], self._path, facts[5])

    def metadata(self) -> dict[str, Any]:
        facts = self._facts()
        referrer = redact_url(facts[6]) if facts[6] else None
        data: dict[str, Any] = {
            "page_path": _without_nul(redact_path(self._path)[:MAX_URL_LENGTH]),
            # The query is kept as received: Werkzeug passes a NUL in it through.
            "page_url": _without_nul(page_url(facts[3], facts[4], self._path, facts[5])),
            "referrer": _without_nul(referrer) if referrer else None,
            # A NUL dropped as in the API's fields: uWSGI and Werkzeug pass one through.
            "user_agent": clamp(facts[1]) or None,
            "rule": self._rule,
            "conversation_id_source": self._id_source,
        }
        extra = self._extra
        if extra:
            data.update(extra)
        return data


_FIELDS: tuple[str, ...] = Conversation.__match_args__


# The AgentSight API rejects string fields longer than this (the 0.1.x SDK clamps too).
MAX_FIELD = 255


def clamp(value: str | None) -> str | None:
    """A string field as the API takes it: at most MAX_FIELD chars, and no NUL, which
    Django REST framework's CharField refuses (the whole event answered 400)."""
    if not value:
        return value
    if "\x00" in value:
        value = value.replace("\x00", "")
    return value[:MAX_FIELD]


def _without_nul(text: str) -> str:
    """``text`` (a path or URL) with NUL as its escape, ``%00``, still within
    :data:`MAX_URL_LENGTH`: a decoded path may hold one (``/x/%00`` under a catch-all
    rule), which the API's store refuses in a string (PostgreSQL's text and jsonb; Django
    REST framework's CharField answers 400), so the event was lost."""
    if "\x00" not in text:
        return text
    return cut_text(text.replace("\x00", "%00"), MAX_URL_LENGTH)


#: The longest value of a request fact that Conversation._compact keeps.
_KEEP = 2 * MAX_URL_LENGTH


def _keep_end(value: str | None) -> str | None:
    """The end of a forwarding header (the hops the nearest proxies added), whole hops only."""
    if value is None or len(value) <= _KEEP:
        return value
    tail = value[-_KEEP:]
    comma = tail.find(",")
    if comma < 0:
        # The last hop alone is longer than what is kept: a piece of it could read as
        # an address. Kept whole where short once stripped (blank padding), else as
        # a token the parser refuses, as it refuses the whole hop.
        hop = value[value.rfind(",") + 1 :].strip()
        return hop if len(hop) <= _KEEP else "-"
    return tail[comma + 1 :].lstrip()


def _keep_refused(value: str | None, refused: str) -> str | None:
    """A header the client IP's parser reads whole or not at all: past the length it
    refuses, a short value it refuses too (its tail could be read, and the IP would
    depend on how far behind the worker is)."""
    if value is None or len(value) <= _KEEP:
        return value
    return refused


_new = object.__new__


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
    conversation: Conversation = _new(Conversation)
    conversation._id = conversation_id
    conversation._id_source = id_source
    conversation._kind = kind
    conversation._rule = rule
    conversation._path = path
    conversation._customer_id = customer_id
    conversation._extra = extra_metadata
    conversation._state = (facts, raw)
    return conversation


def with_app_id(conversation: Conversation, conversation_id: str) -> Conversation:
    """``conversation`` under the id the app's own ``Set-Cookie`` gave the browser."""
    copy: Conversation = _new(Conversation)
    copy._id = conversation_id
    copy._id_source = APP
    copy._kind = conversation._kind
    copy._rule = conversation._rule
    copy._path = conversation._path
    copy._customer_id = conversation._customer_id
    copy._extra = conversation._extra
    copy._state = conversation._state
    return copy


def set_cookie_value(header: str, prefix: str) -> str | None:
    """The id in a ``Set-Cookie`` value that starts with ``prefix`` (``name=``), if valid.

    An empty or invalid value (the app deleting the cookie, say) gives None.
    """
    value = header[len(prefix) :].partition(";")[0].strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    return value if _ID_RE.fullmatch(value) is not None else None
