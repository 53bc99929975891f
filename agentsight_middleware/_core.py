"""Decisions shared by the ASGI and WSGI glue: is this a page view, and what is
the conversation of this request. The glue only reads its protocol's headers
(bytes under ASGI, the environ under WSGI) and hands plain ``str`` values here.
"""

from __future__ import annotations

import contextvars
import enum
import re
from collections.abc import Callable, Mapping
from typing import Any, Final, Literal, Union
from urllib.parse import parse_qsl, unquote, urljoin, urlsplit

from ._config import Settings
from ._conversation import Conversation, with_app_id
from ._delivery import BackgroundDelivery
from ._facts import forwarded_scheme
from ._log import LogOnce, logger
from ._rules import WIDGET
from ._tracker import TrackerDelivery

__all__ = [
    "CDN_CACHE_HEADERS",
    "NOT_SET",
    "AppCookie",
    "Core",
    "Delivery",
    "current_conversation",
    "handling",
    "is_html",
    "is_html_success",
    "is_page_view",
    "is_shared_cacheable",
    "tracked_further_out",
    "viewed_conversation",
]

#: What takes the events: a user's tracker, or the built-in background worker.
Delivery = TrackerDelivery | BackgroundDelivery

_current: contextvars.ContextVar[Conversation | None] = contextvars.ContextVar(
    "agentsight_conversation", default=None
)


#: The conversations, by id(), whose requests one of ours is handling now (in its call into
#: the app, or a step of a WSGI body): an inner one of ours finding one of these current is
#: nested and steps aside. A conversation current but not in here was left behind in a
#: context copied during its request, which a later request can run in: asyncio's transport
#: resumed from inside a request (uvicorn, once a body passes 64 KiB, or pipelined requests)
#: runs the connection's later requests in a copy of that request's context.
handling: set[int] = set()


def tracked_further_out() -> bool:
    """Whether the conversation current here is one of ours handling this very request."""
    conversation = _current.get()
    return conversation is not None and id(conversation) in handling


def current_conversation() -> Conversation | None:
    """The conversation of the request being handled, or None outside a tracked request.

    Works in async handlers, in sync handlers that Starlette runs in its thread
    pool (the context is copied there), and under WSGI.
    """
    return _current.get()


def is_html_success(status: int, content_type: str | None) -> bool:
    """Whether a response with this status and ``Content-Type`` is a page someone sees.

    A 304 is one too: the browser shows the page from its cache, and it keeps a cookie
    set with the 304 (a visitor whose cookie expired must get a new id, as on a 200).
    It carries no ``Content-Type`` unless the app repeats the page's.
    """
    if status == 304:
        return content_type is None or is_html(content_type)
    return 200 <= status < 300 and status != 204 and is_html(content_type)


#: Headers that tell CDNs alone how to cache (RFC 9213's, Akamai/Fastly's, Cloudflare's),
#: in place of Cache-Control.
CDN_CACHE_HEADERS = ("cdn-cache-control", "surrogate-control", "cloudflare-cdn-cache-control")

#: (Cache-Control, CDN header) values seen, and whether a shared cache may store the page.
_SHARED: dict[tuple[str | None, str | None], bool] = {}


def is_shared_cacheable(cache_control: str | None, for_cdns: str | None = None) -> bool:
    """Whether a response may be stored by a shared cache (a CDN, a caching proxy) for
    other visitors: ``Cache-Control`` with ``public`` or ``s-maxage``, or a header meant
    for CDNs (:data:`CDN_CACHE_HEADERS`, joined) with ``max-age`` too; unless ``private``
    or ``no-store`` is there too."""
    key = (cache_control, for_cdns)
    known = _SHARED.get(key)
    if known is None:
        known = _allows(cache_control, {"public", "s-maxage"}) or _allows(
            for_cdns, {"public", "s-maxage", "max-age"}
        )
        if len(_SHARED) >= 64:
            _SHARED.clear()  # an app minting values: stay bounded
        _SHARED[key] = known
    return known


def _allows(value: str | None, storing: set[str]) -> bool:
    if not value:
        return False
    directives = {part.partition("=")[0].strip().lower() for part in value[:1024].split(",")}
    return bool(directives & storing) and not directives & {"private", "no-store"}


def is_html(content_type: str | None) -> bool:
    if not content_type:
        return False
    media = content_type.partition(";")[0].strip().lower()
    return media in ("text/html", "application/xhtml+xml")


class _Unset(enum.Enum):
    NOT_SET = "not set"


#: What the glue's look at a response's ``Set-Cookie`` fields says when the app set
#: none for our cookie (as opposed to None: it set an empty or invalid one).
NOT_SET: Final = _Unset.NOT_SET
#: The id of the app's own ``Set-Cookie`` for our cookie, None, or :data:`NOT_SET`.
AppCookie = Union[str, None, Literal[_Unset.NOT_SET]]  # noqa: UP007 (a runtime alias on 3.10)


def viewed_conversation(
    conversation: Conversation, minted: bool, app_id: AppCookie
) -> Conversation | None:
    """The conversation a successful page view reports, or None.

    ``app_id`` is the id of the app's own ``Set-Cookie`` for our cookie (:data:`NOT_SET`
    when it set none). Only an id new to the browser is a new chance to chat: the one
    we minted, or one the app set that differs from the id the request carried.
    """
    if app_id is NOT_SET:
        return conversation if minted else None
    if app_id is None:
        return None  # the app deleted the cookie (or set a broken one)
    if app_id != conversation.id:
        # The app set the cookie itself (restoring a signed-in visitor's conversation,
        # say): its id is the one the browser keeps.
        return with_app_id(conversation, app_id)
    return conversation if minted else None


# Where a browser shows a page: a tab, or a frame (a chat widget served as an iframe's page,
# embedded by the site's own pages). Not fetch(), an <embed>, a worker.
_PAGE_DESTINATIONS: Final = frozenset({"document", "iframe", "frame"})
_FRAMES: Final = frozenset({"iframe", "frame"})


def is_page_view(
    accept: str | None,
    fetch_dest: str | None,
    purpose: str | None,
    user_agent: str | None,
    fetch_site: str | None = None,
    storage_access: str | None = None,
) -> bool:
    """Cheap request-side tests of a real page view (the response is checked later).

    ``purpose`` is the ``Sec-Purpose``, ``Purpose``, ``X-Purpose`` and ``X-Moz`` headers
    that are present, joined: prefetches and previews announce themselves in one of these.
    ``fetch_site`` is ``Sec-Fetch-Site``: a frame in another site's page is no view, as
    its SameSite=Lax cookie is neither stored nor sent there (each load a new id, no chat
    ever on it). ``storage_access`` is ``Sec-Fetch-Storage-Access``, which Chromium sends
    only from such a cross-site context: it also tells the loads whose ``Sec-Fetch-Site`` is
    not ``cross-site`` there (a link or reload inside that frame, a frame of the site's own
    page that another site frames), the cookie as lost.
    """
    if not accept:
        return False
    # Browsers send these in lower case: lowering is only needed to say "no".
    if "text/html" not in accept and "application/xhtml+xml" not in accept:
        accept = accept.lower()
        if "text/html" not in accept and "application/xhtml+xml" not in accept:
            return False
    if fetch_dest is not None and fetch_dest != "document":
        destination = fetch_dest.strip().lower()
        if destination not in _PAGE_DESTINATIONS:
            return False
        if destination in _FRAMES and (
            storage_access is not None
            or (fetch_site is not None and fetch_site.strip().lower() == "cross-site")
        ):
            return False
    if purpose is not None:
        purpose = purpose.lower()
        if "prefetch" in purpose or "prerender" in purpose or "preview" in purpose:
            return False
    # Probes and monitors (``non_browser_agents``) are told apart by the worker:
    # matching an unseen user agent costs microseconds, so a bot rotating its user
    # agent would make every request pay. Every browser sends one, though.
    return user_agent is not None and user_agent != "" and not user_agent.isspace()


def _looks_like_a_page_route(content_type: str | None) -> bool:
    """Whether a widget page's non-HTML answer looks like a page route's mistake (JSON, plain
    text, no type at all), not a file a widget pattern also takes in (a PDF, an image)."""
    if content_type is None:
        return True
    media = content_type.partition(";")[0].strip().lower()
    return media in ("", "text/plain", "application/json") or media.endswith("+json")


#: The statuses that send a browser on to the ``Location``, and those it keeps.
_REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})
_PERMANENT: Final = frozenset({301, 308})
#: Temporary redirects of a rule that answered no page, before they are told.
_REDIRECTS_TOLD_AT: Final = 3


def _redirect_target(path: str, location: str) -> str | None:
    """The decoded path a redirect from ``path`` to ``location`` leads to (as rules match
    it), or None for a location that is no URL."""
    try:
        target = urlsplit(urljoin(path, location.strip()))
    except ValueError:  # e.g. an invalid IPv6 host
        return None
    if target.scheme and target.scheme not in ("http", "https"):
        return None
    return unquote(target.path) or "/"


#: A path segment that reads as a language tag (``en``, ``pt-br``, ``zh-hans``, ``es-419``,
#: ``en_US``): a language, then a region or a script, as ``app`` or ``my-account`` are not.
_LANGUAGE_SEGMENT: Final = re.compile(
    r"([a-z]{2,3})(?:[-_](?:[a-z]{2}|[a-z]{4}|[0-9]{3})){0,2}", re.IGNORECASE
)

#: ISO 639-1's languages, and the three-letter ones Django's LANGUAGES names: any two
#: letters read as one, and a signed-in visitor's ``/me`` or ``/hq`` was "``/`` elsewhere".
_LANGUAGE_CODES: Final = """
    aa ab ae af ak am an ar as av ay az ba be bg bh bi bm bn bo br bs ca ce ch co cr cs cu
    cv cy da de dv dz ee el en eo es et eu fa ff fi fj fo fr fy ga gd gl gn gu gv ha he hi
    ho hr ht hu hy hz ia id ie ig ii ik io is it iu ja jv ka kg ki kj kk kl km kn ko kr ks
    ku kv kw ky la lb lg li ln lo lt lu lv mg mh mi mk ml mn mr ms mt my na nb nd ne ng nl
    nn no nr nv ny oc oj om or os pa pi pl ps pt qu rm rn ro ru rw sa sc sd se sg si sk sl
    sm sn so sq sr ss st su sv sw ta te tg th ti tk tl tn to tr ts tt tw ty ug uk ur uz ve
    vi vo wa wo xh yi yo za zh zu ast ckb dsb hsb kab udm
"""
_LANGUAGES: Final = frozenset(_LANGUAGE_CODES.split())


def _is_language(segment: str) -> bool:
    match = _LANGUAGE_SEGMENT.fullmatch(segment)
    return match is not None and match[1].lower() in _LANGUAGES


def _same_page_elsewhere(path: str, target: str) -> bool:
    """Whether ``target`` is ``path`` itself at another address: its trailing slash changed,
    or a language segment put in, taken out or changed (``/pricing`` -> ``/fr/pricing/``,
    ``/en/`` -> ``/fr/``). Only such temporary redirects say the rule misses its page:
    others send some visitors on (a signed-in one from ``/`` to ``/app``, a sign-in wall to
    ``/login``) while the rule's page is served to the rest, whom the first visitors after
    a start need not include."""
    return not _page_forms(path).isdisjoint(_page_forms(target))


def _page_forms(path: str) -> set[str]:
    """``path`` without its trailing slash, and so with each language segment left out."""
    segments = path.split("/")
    forms = {path.rstrip("/")}
    for index, segment in enumerate(segments):
        if _is_language(segment):
            forms.add("/".join(segments[:index] + segments[index + 1 :]).rstrip("/"))
    return forms


def _comes_back(path: str, location: str) -> bool:
    """Whether ``location``'s query names ``path`` as the page to come back to (a sign-in
    page's ``?next=/account``)."""
    query = urlsplit(location).query if "?" in location else ""
    if not query:
        return False
    try:
        values = [value for _, value in parse_qsl(query)]
    except ValueError:
        return False
    return any(unquote(urlsplit(value).path) == path for value in values if value)


class Core:
    def __init__(self, settings: Settings, delivery: Delivery) -> None:
        self.settings = settings
        self.delivery = delivery
        self.log_once = LogOnce()
        self.current = _current
        # ``TrustedProxies.__bool__`` is a Python call; asked once here, not per request.
        #: The trusted proxies, or None when none are: the glue reads the forwarding
        #: headers only then.
        self.trusted = settings.trusted_proxies if settings.trusted_proxies else None
        #: Whether each (scheme, peer, X-Forwarded-Proto) seen is HTTPS (see is_secure):
        #: the ASGI glue looks an answer up here before it calls is_secure.
        self.secure_answers: dict[tuple[str, str | None, str | bytes | None], bool] = {}
        # The built-in worker takes events with one append: no coroutine to await, no
        # handler scope to ask for, no event loop for a coroutine tracker.
        #: ``delivery.submit`` for the built-in worker, else None.
        self.submit = delivery.submit if isinstance(delivery, BackgroundDelivery) else None
        #: ``delivery.hold`` for the built-in worker (a chat's event waits for the
        #: answer: a 4xx is no chat), else None.
        self.hold = delivery.hold if isinstance(delivery, BackgroundDelivery) else None
        self._told_shared = False
        self._told_not_html: set[str] = set()
        #: Redirected page views counted by widget rule, for the rules that have answered
        #: no page yet: empty unless a widget page's view was redirected, so the page path
        #: tests it and goes on (see page_served).
        self.redirects: dict[str, int] = {}
        # Rules that have answered a page, or whose redirects were told: not counted.
        self._settled: set[str] = set()

    def shared_page(self, path: str) -> None:
        """A widget page sent for shared caches: left as it is (see the glue); said once."""
        if self._told_shared:
            return
        self._told_shared = True
        logger.warning(
            "the widget page %r is sent with a Cache-Control that lets shared caches (a CDN,"
            " a caching proxy) store it: the middleware adds no cookie to such a page and"
            " counts no view there, as a stored copy would hand one visitor's conversation to"
            " every other (and nginx or Varnish would stop caching it). Send widget pages"
            " with Cache-Control: no-cache (or private, no-cache) to have them tracked.",
            path,
        )

    def not_a_page(self, rule: str, path: str, status: int, content_type: str | None) -> None:
        """A browser's view of a widget page answered 2xx with something other than HTML:
        no cookie and no view, as for any non-page; said once for each rule, as it is
        mostly a widget page's route answering JSON (FastAPI returns a str as JSON unless
        told ``response_class=HTMLResponse``), which tracked nothing and said nothing."""
        told = self._told_not_html
        if rule in told or len(told) >= 64 or not _looks_like_a_page_route(content_type):
            return
        told.add(rule)
        logger.warning(
            "the widget page %r (rule %r) answered a browser's page view with %d and "
            "Content-Type %r, not an HTML page: no cookie and no view are recorded for such "
            "an answer. Send the page as text/html (FastAPI: response_class=HTMLResponse); "
            "said once for each rule.",
            path,
            rule,
            status,
            content_type,
        )

    def redirected(self, rule: str, path: str, status: int, location: str | None) -> None:
        """A browser's view of a widget page answered with a redirect: no cookie and no
        view, as for any non-page. Said once for each rule whose views are redirected, to a
        page no widget rule matches, with no page between: the app serves the page
        elsewhere (Django's i18n_patterns at ``/en/``, a view choosing the language, a
        trailing slash), which recorded nothing and said nothing. One temporary redirect
        is no sign: told at the third to the same page elsewhere (see _same_page_elsewhere;
        one to another page, a signed-in visitor's to ``/app``, is none), or at the first
        permanent one (301, 308), which the browser keeps and follows without asking the
        app again. Only the pages after a rule's first redirect are seen (the page
        path pays nothing until then): one before it does not keep it from being told."""
        if rule in self._settled or location is None or status not in _REDIRECTS:
            return
        target = _redirect_target(path, location)
        if target is None or _comes_back(path, location):
            return  # a sign-in's ``?next=/account``: the page is asked again after it
        if self.is_widget_page(target):
            return  # the view is recorded there
        permanent = status in _PERMANENT
        if not permanent and not _same_page_elsewhere(path, target):
            return  # some visitors sent on (signed in, or to sign in): no sign of a miss
        count = self.redirects.get(rule, 0) + 1
        if count < (1 if permanent else _REDIRECTS_TOLD_AT):
            self.redirects[rule] = count
            return
        self.redirects.pop(rule, None)
        self._settled.add(rule)
        answered = (
            f"a browser's page view ({path!r}) answered with a permanent redirect ({status} to "
            f"{location!r}), which the browser keeps"
            if count == 1
            else f"{count} browser page views ({path!r}, the last) answered with a redirect "
            f"({status} to {location!r}) and none with a page since the first"
        )
        logger.warning(
            "the widget page rule %r: %s. A redirect is no page view, and no widget rule "
            "matches %r, where it leads, so nothing was recorded (no cookie, no view): add "
            "that page to widget_pages (%r, or a pattern of every address it has); said once "
            "for each rule.",
            rule,
            answered,
            target,
            target,
        )

    def is_widget_page(self, path: str) -> bool:
        """Whether a browser's view of ``path`` matches a widget rule."""
        found = self.settings.rules.match("GET", path)
        return found is not None and found.rule.kind == WIDGET

    def settle(self, rule: str) -> None:
        """Redirects of widget rule ``rule`` are not told: it answered a page, so they are
        normal ones (a sign-in, say), or the route check at start-up told what
        the rule misses. The glue calls it for a page only while ``redirects`` is not
        empty."""
        self._settled.add(rule)  # bounded: one entry a rule at most
        self.redirects.pop(rule, None)

    def is_secure(
        self,
        scheme: str,
        peer: str | None,
        forwarded: str | bytes | bytearray | None,
        proto: str | bytes | bytearray | None,
        addressed: bool = False,
    ) -> bool:
        """Whether the visitor used HTTPS, for the cookie's Secure flag: ``scheme`` as the
        server saw it, or what a trusted proxy says in ``Forwarded`` / ``X-Forwarded-Proto``.
        The header values as the glue has them: ``str`` (WSGI), or ``bytes`` (ASGI), which are
        decoded only when the answer is not known yet. ``addressed``: whether
        ``X-Forwarded-For`` or ``X-Real-IP`` names a client (``_facts.names_address``),
        which the glue works out only when there is a ``Forwarded``."""
        trusted = self.trusted
        if trusted is None or (not forwarded and not proto):
            return scheme == "https"
        # Not ASGI's bytes, but what a middleware in front may hand over: hashed and
        # decoded as the bytes they hold.
        if isinstance(proto, bytearray):
            proto = bytes(proto)
        if isinstance(forwarded, bytearray):
            forwarded = bytes(forwarded)
        # Behind a proxy, the same few (peer, proto) pairs come back on every request:
        # the answer is looked up, not worked out again. Only short values are kept:
        # a client sending its own must not make the cache hold its headers.
        key = (scheme, peer, proto) if not forwarded and len(proto or "") <= 16 else None
        if key is not None:
            secure = self.secure_answers.get(key)
            if secure is not None:
                return secure
        if isinstance(forwarded, bytes):
            forwarded = forwarded.decode("latin-1")
        if isinstance(proto, bytes):
            proto = proto.decode("latin-1")
        secure = forwarded_scheme(scheme, forwarded, proto, peer, trusted, addressed) == "https"
        if key is not None:
            if len(self.secure_answers) >= 1024:
                self.secure_answers.clear()  # clients sending their own values: stay bounded
            self.secure_answers[key] = secure
        return secure

    def hooks(
        self, make_request: Callable[[Any], Any], raw: Any
    ) -> tuple[str | None, Mapping[str, Any] | None]:
        """``(customer_id, metadata)`` from the user's hooks; ``make_request(raw)`` builds
        the object handed to them. Only called when ``settings.has_hooks``."""
        request = make_request(raw)
        return self._customer_id(request), self._metadata(request)

    def _customer_id(self, request: Any) -> str | None:
        hook = self.settings.customer_id_hook
        if hook is None:
            return None
        try:
            value = hook(request)
            if value is None or isinstance(value, bool):
                return None
            # In the try: a lazy user object whose __str__ raises must not fail the request.
            text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
        except Exception as exc:
            self.log_once("customer_id hook", exc)
            return None
        return text if text.strip() else None

    def _metadata(self, request: Any) -> Mapping[str, Any] | None:
        hook = self.settings.metadata_hook
        if hook is None or isinstance(hook, Mapping):
            return hook
        try:
            value = hook(request)
        except Exception as exc:
            self.log_once("metadata hook", exc)
            return None
        if value is not None and not isinstance(value, Mapping):
            self.log_once(
                "metadata hook", TypeError(f"returned {type(value).__name__}, not a dict")
            )
            return None
        return value
