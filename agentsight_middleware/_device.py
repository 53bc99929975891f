"""A visitor's device class and bot flag from its User-Agent, fast enough for the worker.

``user_agents.parse`` runs uap-core's ~1,270 regexes one by one in Python's ``re``:
0.4-1 ms for each agent it has not seen, far short of the 5,000 distinct agents a second
the worker must keep up with (issue #7). ua-parser 1.0 runs the same rules through
ua-parser-rs's compiled automata at ~25-35 us an agent. This module takes that resolver's
browser, OS and device families and applies user-agents' own rules to them
(``_is_tablet`` and friends mirror ``user_agents.parsers.UserAgent`` line for line), so
the classification is user-agents' without its parser.

Two engines were measured and not taken:

* google-re2 (~50 us an agent) releases the GIL inside every match. While the app's own
  thread is busy, each release costs the worker a whole switch interval (5 ms) to get it
  back: 188 agents/s with the request thread spinning, against 24,895/s for ua-parser-rs,
  which keeps the GIL and so gets its fair share.
* ua-parser-rs alone widens the catch-all bot rule ``^.{0,100}(bot|...)`` to ``^.*`` to
  keep its automata small, which would also flag real browsers with "Abbott", "Daum" or
  "WordPress" past the 100th character as bots (their page views are not tracked). So a
  "Spider" verdict, and only that one, is checked again with Python's ``re`` (see
  :class:`_SpiderCheck`): the leading Spider rules and, when the catch-all is the rule
  that matched, only it and the few rules after it (~0.05-0.3 ms). Any other Spider
  verdict runs all the device rules (0.4-7 ms, a crafted agent the most), within a time
  budget: a bot flooding the worker with such agents gets ua-parser-rs's verdict once it
  is spent, instead of costing every other visitor's event its place.

Two inputs still differ, both junk: ua-parser-rs's ``\\d``/``\\w`` are ASCII (so
"LG-T\u00b2500" is no longer a phone), and a lone surrogate cannot cross into Rust (no
verdict; headers decoded as latin-1, as ASGI and WSGI do, never hold one).
tests/test_device.py pins both.

Nothing heavy is imported before the first call: ua_parser costs ~80 ms to import and
the Rust resolver ~0.2-0.3 s and ~30 MB to build (its lazy automata then grow with the
variety of agents seen), which processes that never classify an agent (CLIs, tests, apps
without a chat page) should not pay.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from ._log import logger

if TYPE_CHECKING:
    from ua_parser import Domain, Matchers, Resolver

__all__ = ["backend", "build_before_fork", "build_soon", "classify_user_agent"]

Classification = tuple[str | None, bool]
Version = tuple[str | None, str | None, str | None]

# The same cap as _facts._MAX_USER_AGENT (a test keeps them equal). Browsers identify
# themselves within the first few hundred chars; the cap bounds the regex work and keeps
# padded, forged agents from pinning big keys in the cache.
_MAX_USER_AGENT: Final = 512

# user_agents.parsers' family lists, copied so the fast path need not import user_agents
# (~150 ms, and ~6 MB of compiled regexes it would never use). Only the lists that decide
# tablet, mobile, PC and bot are here.
_MOBILE_DEVICE_FAMILIES: Final = frozenset(
    {
        "iPhone",
        "iPod",
        "Generic Smartphone",
        "Generic Feature Phone",
        "PlayStation Vita",
        "iOS-Device",
    }
)
_PC_OS_FAMILIES: Final = frozenset({"Windows 95", "Windows 98", "Solaris"})
_MOBILE_OS_FAMILIES: Final = frozenset(
    {
        "Windows Phone",
        "Windows Phone OS",
        "Symbian OS",
        "Bada",
        "Windows CE",
        "Windows Mobile",
        "Maemo",
    }
)
_MOBILE_BROWSER_FAMILIES: Final = frozenset(
    {
        "IE Mobile",
        "Opera Mobile",
        "Opera Mini",
        "Chrome Mobile",
        "Chrome Mobile WebView",
        "Chrome Mobile iOS",
    }
)
_TABLET_DEVICE_FAMILIES: Final = frozenset(
    {
        "iPad",
        "BlackBerry Playbook",
        "Blackberry Playbook",
        "Kindle",
        "Kindle Fire",
        "Kindle Fire HD",
        "Galaxy Tab",
        "Xoom",
        "Dell Streak",
    }
)


# ---------------------------------------------------------------------------
# user-agents' rules, as pure functions of the parsed families
# ---------------------------------------------------------------------------


def _version_string(version: Version) -> str:
    # user_agents.parsers.parse_version: numeric parts go through int() ("07" -> "7"),
    # patch_minor is dropped, missing parts are skipped.
    return ".".join(
        str(int(part)) if part.isdigit() else part for part in version if part is not None
    )


def _is_tablet(ua: str, browser: str, os: str, os_version: Version, device: str) -> bool:
    if device in _TABLET_DEVICE_FAMILIES:
        return True
    # Newer Android tablets drop "Mobile" from their agent; Firefox says "Mobile" on both.
    if os == "Android" and "Mobile Safari" not in ua and browser != "Firefox Mobile":
        return True
    if os == "Windows" and _version_string(os_version).startswith("RT"):
        return True
    return os == "Firefox OS" and "Mobile" not in browser


def _is_mobile(ua: str, browser: str, os: str, device: str) -> bool:
    # Only asked once _is_tablet said no, so user-agents' "and not is_tablet" is implied.
    return (
        device in _MOBILE_DEVICE_FAMILIES
        or browser in _MOBILE_BROWSER_FAMILIES
        or os in ("Android", "Firefox OS")
        or (os == "BlackBerry OS" and device != "Blackberry Playbook")
        or os in _MOBILE_OS_FAMILIES
        or "J2ME" in ua
        or "MIDP" in ua
        or "iPhone;" in ua
        or "Googlebot-Mobile" in ua
        or (device == "Spider" and "Mobile" in browser)
        or ("NokiaBrowser" in ua and "Mobile" in ua)
    )


def _is_pc(ua: str, os: str, os_version: Version) -> bool:
    if "Windows NT" in ua or os in _PC_OS_FAMILIES:
        return True
    if os == "Windows" and _version_string(os_version) == "ME":
        return True
    if os == "Mac OS X" and "Silk" not in ua:
        return True
    # Maemo says "Linux" and "X11" but is a phone OS.
    if "Maemo" in ua:
        return False
    return "Chrome OS" in os or ("Linux" in ua and "X11" in ua)


def _from_families(
    ua: str, browser: str, os: str, os_version: Version, device: str
) -> Classification:
    """``(device, is_bot)`` from the parsed families, by user-agents' rules.

    ``os_version`` is (major, minor, patch) as parsed; only Windows' is ever read.
    """
    if _is_tablet(ua, browser, os, os_version, device):
        kind: str | None = "tablet"
    elif _is_mobile(ua, browser, os, device):
        kind = "mobile"
    elif _is_pc(ua, os, os_version):
        kind = "desktop"
    else:
        kind = None
    return kind, device == "Spider"


# ---------------------------------------------------------------------------
# Parsers
# ---------------------------------------------------------------------------

_NO_VERSION: Final[Version] = (None, None, None)


#: Seconds of each second that full re-checks of Spider verdicts may take (see _SpiderCheck).
SPIDER_CHECK_BUDGET: Final = 0.05


class _SpiderCheck:
    """user-agents' device family for an agent ua-parser-rs called a Spider.

    uap-core's device rules start with a few Spider rules and end with the catch-all
    bot rule (which ua-parser-rs widens) and a few generic ones. ua-parser-rs answers with
    the first rule that matched; its rules are Python's except for the widening. So when
    the catch-all answered, every rule before it failed there and fails in Python too:
    only the leading Spider rules, the catch-all and what follows need Python's re (~0.05-
    0.3 ms). A Spider verdict from a leading rule that Python refuses (ua-parser-rs widens
    those as well) needs all the rules (up to ~7 ms for a crafted agent): those run within
    :data:`SPIDER_CHECK_BUDGET`, and past it ua-parser-rs's verdict stands.
    """

    def __init__(
        self,
        matchers: Matchers,
        compiled: Callable[[Matchers], Resolver],
        budget: float = SPIDER_CHECK_BUDGET,
    ) -> None:
        python = _python_resolver()
        devices = list(matchers[2])
        # Lazy and eager matchers carry these; a matcher that does not (a future ua-parser)
        # leaves only the full check.
        families = [getattr(rule, "family", None) for rule in devices]
        spiders = [i for i, family in enumerate(families) if family == "Spider"]
        leading = 0
        while leading < len(devices) and families[leading] == "Spider":
            leading += 1
        self._full = python(([], [], devices))
        # The leading Spider rules in Python; the same in ua-parser-rs (widened), which says
        # whether one of them rather than the catch-all answered there (their models do not
        # tell: rule 5 and the catch-all are both "Desktop"); the rules from the catch-all on
        # in Python. None: rules not laid out so, only the full check.
        self._split: tuple[Resolver, Resolver, Resolver] | None = None
        if spiders and spiders[-1] >= leading:
            self._split = (
                python(([], [], devices[:leading])),
                compiled(([], [], devices[:leading])),
                python(([], [], devices[spiders[-1] :])),
            )
        self._rate = budget
        self._tokens = budget
        self._last = time.monotonic()

    def __call__(self, ua: str) -> str:
        from ua_parser import Domain

        if self._split is not None:
            head, compiled_head, tail = self._split
            found = head(ua, Domain.DEVICE).device
            if found is not None:
                return found.family
            if compiled_head(ua, Domain.DEVICE).device is None:
                # No leading rule answered in ua-parser-rs: the catch-all did.
                found = tail(ua, Domain.DEVICE).device
                return found.family if found is not None else "Other"
        now = time.monotonic()
        self._tokens = min(self._rate, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens <= 0:
            return "Spider"  # spent: ua-parser-rs's verdict stands
        started = time.perf_counter()
        found = self._full(ua, Domain.DEVICE).device
        self._tokens -= time.perf_counter() - started
        return found.family if found is not None else "Other"


def _with_resolver(
    resolver: Resolver, domains: Domain, ua: str, spiders: _SpiderCheck | None = None
) -> Classification:
    result = resolver(ua, domains)
    # A domain no rule matched is None in ua-parser 1.0; the pre-1.0 parser that
    # user-agents reads called it "Other".
    browser = result.user_agent.family if result.user_agent is not None else "Other"
    device = result.device.family if result.device is not None else "Other"
    if device == "Spider" and spiders is not None:
        # See the module's docstring: the bot verdict is re-read with Python's re.
        device = spiders(ua)
    parsed_os = result.os
    if parsed_os is None:
        return _from_families(ua, browser, "Other", _NO_VERSION, device)
    version = (parsed_os.major, parsed_os.minor, parsed_os.patch)
    return _from_families(ua, browser, parsed_os.family, version, device)


def _with_user_agents(ua: str) -> Classification:
    import user_agents  # type: ignore[import-untyped]

    parsed = user_agents.parse(ua)
    if parsed.is_tablet:
        kind: str | None = "tablet"
    elif parsed.is_mobile:
        kind = "mobile"
    elif parsed.is_pc:
        kind = "desktop"
    else:
        kind = None
    return kind, bool(parsed.is_bot)


def _rust_resolver() -> Callable[[Matchers], Resolver]:
    from ua_parser.regex import Resolver as RustResolver

    return RustResolver


def _python_resolver() -> Callable[[Matchers], Resolver]:
    from ua_parser import BasicResolver

    # uap-core's rules in Python's re, as user-agents runs them: no faster than
    # user-agents, but without the second compiled copy of the rules it would load.
    return BasicResolver


# ua-parser 1.0's resolvers, fastest first: ~25-35 us and ~1 ms an agent here.
_RESOLVERS: Final = (
    ("ua-parser-rs", _rust_resolver),
    ("ua-parser", _python_resolver),
)


def _build() -> tuple[str, Callable[[str], Classification]]:
    try:
        from ua_parser import Domain, load_lazy_builtins

        # Lazy matchers hold the rules as strings: the compiled resolvers build their
        # own automata from them, the pure-Python one compiles a rule when it needs it.
        matchers = load_lazy_builtins()
    except Exception:
        # ua-parser < 1.0 (user-agents accepts 0.10): its parser is all there is.
        return "user-agents", _with_user_agents
    for name, load in _RESOLVERS:
        try:
            resolver = load()(matchers)
        except Exception:
            # Not installed, or cannot take some rule of a newer uap-core: the next
            # engine will do.
            continue
        spiders = _SpiderCheck(matchers, load()) if name == "ua-parser-rs" else None
        return name, functools.partial(_with_resolver, resolver, Domain.ALL, spiders=spiders)
    return "user-agents", _with_user_agents


_lock = threading.Lock()
_engine: tuple[str, Callable[[str], Classification]] | None = None
# The thread running _build, while one does (see _finish_build_before_fork).
_builder: int | None = None
# How long a fork waits for another thread's build: ~0.2-0.3 s, more on a busy machine.
_FORK_WAIT: Final = 5.0


def _unlock_in_child() -> None:
    # A fork while another thread builds the engine (the worker, at its first events: 0.3 s)
    # left the child's copy of the lock held for ever, by a thread the child does not have:
    # its worker waited on it at its first user agent, and every event after it queued.
    global _lock, _builder
    _lock = threading.Lock()
    _builder = None


def _finish_build_before_fork() -> None:
    # A fork while another thread builds the engine (build_soon's, after a process's first
    # request; the worker's, at its first events) copied a build half done: ua_parser half
    # imported, its import lock held by a thread the child does not have. The child's own
    # build then hung on that import, or took ua_parser for missing and classified with
    # user-agents' parser for good (0.4-1 ms an agent, see above). The fork waits for the
    # build instead, and the child inherits the engine.
    lock = _lock
    builder = _builder
    if builder is None or builder == threading.get_ident():
        # No build under way (a lock taken but no _build started yet leaves the child
        # nothing half done: it builds its own), or this thread's own (its _build forks).
        return
    if lock.acquire(timeout=_FORK_WAIT):
        lock.release()
    else:
        logger.warning(
            "forking while the user-agent parser is still being built after %.0f s: "
            "the child may classify with the slower user-agents parser",
            _FORK_WAIT,
        )


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_finish_build_before_fork, after_in_child=_unlock_in_child)


def _build_here() -> tuple[str, Callable[[str], Classification]]:
    """:func:`_build`, in this thread, which holds ``_lock``."""
    global _builder
    _builder = threading.get_ident()
    try:
        return _build()
    finally:
        _builder = None


def _get_engine() -> tuple[str, Callable[[str], Classification]]:
    global _engine
    engine = _engine
    if engine is None:
        # Building takes ~0.3 s and ~30 MB: two threads racing must not both pay it.
        with _lock:
            if _engine is None:
                _engine = _build_here()
            engine = _engine
    return engine


def build_soon() -> None:
    """Build the engine in a thread of its own, unless it is built or being built.

    For a process that serves with no start-up hook to build it in (a WSGI app, an ASGI
    app whose server runs no lifespan), once its first request of any kind is answered:
    the worker built it at the first page view instead, and that build, ~0.2 s, ~130 ms of
    it in one call into ua-parser-rs that holds the GIL, froze the requests in flight then.
    A probe or any other request first (a load balancer's, Kubernetes' readiness check),
    and it is done before the first page view.
    """
    if _engine is not None or _lock.locked():
        return  # built, or a thread builds it now
    # The lock is taken by the new thread, not here and handed over: under gevent a
    # thread's start switches greenlets, and the lock, made before the worker patched
    # threading (the package imported in gunicorn's master by a config file's hook), is
    # the OS's. Held across the start, the worker's greenlet reaching the parser meanwhile
    # blocked the process on it for good. A thread needing the engine before the new one
    # takes the lock builds it itself (the build never yields to another greenlet), and the
    # new one then finds it built or being built: never two builds.
    # No new thread at interpreter exit: built when first needed.
    with contextlib.suppress(RuntimeError):
        threading.Thread(
            target=_build_unless_begun, name="agentsight-ua-parser", daemon=True
        ).start()


def _build_unless_begun() -> None:
    lock = _lock
    if _engine is None and lock.acquire(blocking=False):
        _build_holding(lock)


def build_before_fork() -> None:
    """Build the engine now, in this thread, unless it is built or being built.

    For a process about to fork the ones that serve (gunicorn ``--preload``): each child
    inherits the engine built once, instead of building its own at its first request.
    A build in progress in another thread is waited for (see _finish_build_before_fork).
    """
    lock = _lock
    if _engine is None and lock.acquire(blocking=False):
        _build_holding(lock)


def _build_holding(lock: threading.Lock) -> None:
    global _engine
    try:
        if _engine is None:
            _engine = _build_here()
    except Exception as exc:
        # Tried again when first needed, which then classifies nothing (see _classify).
        logger.warning("could not build the user-agent parser: %r", exc)
    finally:
        lock.release()


def backend() -> str:
    """Which parser classifies: "ua-parser-rs", "ua-parser" or "user-agents"."""
    return _get_engine()[0]


@functools.lru_cache(maxsize=4096)
def _classify(user_agent: str) -> Classification:
    try:
        return _get_engine()[1](user_agent)
    except Exception:
        # A third-party parser must not be able to break request handling.
        return None, False


def classify_user_agent(ua: str) -> Classification:
    """``(device, is_bot)``: device is "mobile", "tablet", "desktop" or None."""
    if not ua or ua.isspace():
        return None, False
    return _classify(ua[:_MAX_USER_AGENT])
