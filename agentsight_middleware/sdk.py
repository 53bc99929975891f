"""Adapters that make the official ``agentsight`` SDK safe to use behind the middleware.

Classic SDK (0.0.12 - 0.0.44, ``ConversationTracker``)::

    from agentsight import ConversationTracker
    from agentsight_middleware.sdk import ClassicTracker

    tracker = ConversationTracker()
    app.add_middleware(AgentSightMiddleware, widget_pages=["/"],
                       chat_routes=["POST /api/chat"], tracker=ClassicTracker(tracker))

    @app.post("/api/chat")
    def chat(body: Chat) -> dict[str, str]:
        tracker.track_human_message(body.message)     # 0.0.12-0.0.18: track_question
        reply = answer(body.message)
        tracker.track_agent_message(reply)            # 0.0.12-0.0.18: track_answer
        tracker.send_tracked_data()
        return {"reply": reply}

The classic tracker keeps "the current conversation" in ``tracker.config.conversation_id``,
one attribute shared by every thread and task of the process (0.0.4x even makes the
tracker a process-wide singleton). ``get_or_create_conversation`` writes it, and every
``track_*`` call and ``send_tracked_data`` read it back later, so two visitors chatting at
the same time file their messages under each other's conversation. :class:`ClassicTracker`
turns that attribute into a per-request value: inside a chat request it reads and writes a
cell held in a :class:`contextvars.ContextVar` that the middleware sets around the handler
(async handlers, sync handlers in Starlette's thread pool and WSGI handlers all see it);
outside a request it behaves exactly as before.

OpenTelemetry-based SDK (0.1.x)::

    import agentsight
    from agentsight_middleware.sdk import AgentSightSDK

    agentsight.init()
    app.add_middleware(AgentSightMiddleware, widget_pages=["/"],
                       chat_routes=["POST /api/chat"], tracker=AgentSightSDK())

    @app.post("/api/chat")
    async def chat(body: Chat) -> dict[str, str]:
        with agentsight.turn():
            agentsight.user_message(body.message)
            reply = await answer(body.message)
            agentsight.agent_message(reply)
        return {"reply": reply}

Neither import needs the SDK installed until an adapter is built.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import itertools
import re
import sys
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping, Sized
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from typing import Any

from ._fork import reset_in_child
from ._log import LogOnce, logger
from ._retry import MIN_RETRY_AFTER, RETRY, THROTTLED, backoff, classify

__all__ = ["AgentSightSDK", "ClassicTracker", "adapt_tracker", "is_classic_tracker"]

#: The conversation fields the middleware hands a tracker, besides the id.
_FIELDS = (
    "customer_id",
    "customer_ip_address",
    "device",
    "source",
    "language",
    "name",
    "environment",
    "metadata",
)

# -- classic SDK: a per-request ``config.conversation_id`` ------------------------------

# A mutable cell, not the value itself: what the SDK writes inside a request (its
# ``get_or_create_conversation`` does, so may ``tracker.configure(conversation_id=...)``)
# is then seen by the rest of that request even across a context copy (the thread a
# sync handler runs in gets a copy of the request's context).
_cell: ContextVar[list[Any] | None] = ContextVar(
    "agentsight_middleware_classic_conversation_id", default=None
)
_MARK = "_agentsight_middleware_per_request"
_classes: dict[type, type] = {}
_classes_lock = threading.Lock()


#: [chat requests have been scoped in this process, told]: see _PerRequestConversationId.
_lost: list[bool] = [False, False]


class _PerRequestConversationId:
    """A data descriptor replacing the SDK config's plain ``conversation_id`` attribute."""

    def __get__(self, obj: object, owner: type | None = None) -> Any:
        if obj is None:
            return self
        cell = _cell.get()
        if cell is not None:
            return cell[0]
        value = obj.__dict__.get("conversation_id")
        if value is None and _lost[0] and not _lost[1]:
            # Chat requests ran, yet the SDK is asked for the current conversation where
            # none was ever set: a call from a thread that did not get the request's
            # context. Unwrapped, it read the last request's id; now it reads none, and
            # its messages (send_tracked_data: all of them) go nowhere.
            _lost[1] = True
            logger.warning(
                "the classic agentsight SDK was called outside a chat request's context, "
                "where it has no current conversation: its messages are not filed under the "
                "visitor's conversation (send_tracked_data() raises NoDataToSendException). "
                "A thread started by the request must get its context: "
                "asyncio.to_thread() or starlette.concurrency.run_in_threadpool(), not "
                "loop.run_in_executor(), an executor's submit() or a threading.Thread"
            )
        return value

    def __set__(self, obj: object, value: Any) -> None:
        cell = _cell.get()
        if cell is not None:
            cell[0] = value
        elif (
            _lost[0]
            and not obj.__dict__.get("conversation_id")
            and sys._getframe(1).f_code.co_name == "_get_or_generate_conversation_id"
        ):
            # send_tracked_data() outside a chat request's context (a bare thread,
            # run_in_executor()), where there is no conversation: the SDK makes one up and
            # keeps it as the process's current one. Kept, every later call from outside a
            # request filed every visitor's messages under that one invented conversation
            # (113 of 120 in a review's run). Not kept: such a call sends nothing, each
            # time, as the warning above says.
            return
        else:
            obj.__dict__["conversation_id"] = value


def _per_request_class(base: type) -> type:
    with _classes_lock:
        cls = _classes.get(base)
        if cls is None:
            cls = type(
                base.__name__,
                (base,),
                {
                    "conversation_id": _PerRequestConversationId(),
                    "__module__": base.__module__,
                    "__qualname__": base.__qualname__,
                    "__doc__": base.__doc__,
                    _MARK: True,
                },
            )
            _classes[base] = cls
        return cls


def _make_per_request(config: object) -> None:
    """Give ``config`` (the SDK's ``Config`` dataclass) a per-request ``conversation_id``.

    The object keeps its identity (the SDK's HTTP client holds it too); only its class
    becomes a subclass whose ``conversation_id`` is the descriptor above.
    """
    if getattr(type(config), _MARK, False):
        return  # already done (the 0.0.4x tracker is a singleton: wrapped twice is common)
    if not hasattr(config, "__dict__") or not hasattr(config, "conversation_id"):
        raise TypeError(
            f"tracker.config ({type(config).__name__}) has no conversation_id attribute "
            "this adapter can make per-request; is this the classic agentsight SDK "
            "(0.0.12 - 0.0.44)?"
        )
    try:
        config.__class__ = _per_request_class(type(config))
    except TypeError as exc:  # pragma: no cover - only for exotic config classes
        raise TypeError(
            f"cannot make {type(config).__name__}.conversation_id per-request: {exc}"
        ) from exc


@contextmanager
def _bound(conversation_id: str) -> Iterator[None]:
    token = _cell.set([conversation_id])
    try:
        yield
    finally:
        try:
            _cell.reset(token)
        except ValueError:  # exited in another context than entered: clear it there
            _cell.set(None)


def _accepted_keywords(method: Callable[..., Any]) -> frozenset[str] | None:
    """The keyword names ``method`` takes, or None when it takes ``**kwargs``."""
    try:
        parameters = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return frozenset(
        p.name
        for p in parameters
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    )


def _only(fields: Mapping[str, Any], accepted: frozenset[str] | None) -> dict[str, Any]:
    if accepted is None:
        return dict(fields)
    return {key: value for key, value in fields.items() if key in accepted}


def is_classic_tracker(tracker: object) -> bool:
    """True for the classic SDK's ``ConversationTracker`` (and look-alikes): an object
    with ``send_tracked_data()`` whose ``config`` carries the current conversation id."""
    config = getattr(tracker, "config", None)
    return (
        not isinstance(tracker, ClassicTracker)
        and callable(getattr(tracker, "send_tracked_data", None))
        and callable(getattr(tracker, "get_or_create_conversation", None))
        # Made per-request already (wrapped before: the 0.0.4x tracker is a singleton):
        # not read, a read outside a request is what tells of an SDK call that lost it.
        and (getattr(type(config), _MARK, False) or hasattr(config, "conversation_id"))
    )


class _Marker(dict[str, Any]):
    """The middleware's metadata for a stored item: a dict the SDK keeps by reference (and
    sends as any dict), that can be referred to weakly."""

    __slots__ = ("__weakref__",)

    def __deepcopy__(self, memo: dict[int, Any]) -> dict[str, Any]:
        # The SDK deep-copies what it sends: a plain dict, by the fast path (a subclass
        # takes copy's generic one, ~4 us a chat), as before there was a marker.
        copied: dict[str, Any] = copy.deepcopy(dict(self), memo)
        return copied


class _Entry:
    """The bookkeeping of one item a chat request stored."""

    __slots__ = ("closed_at", "conversation_id", "marker")

    def __init__(self, conversation_id: str, marker: weakref.ref[_Marker]) -> None:
        self.conversation_id = conversation_id
        self.marker = marker
        #: When its request ended (the grace runs from then); None while it runs: an item
        #: whose handler may still track is never dropped.
        self.closed_at: float | None = None


def _holds(item: object, marker: dict[str, Any] | None) -> bool:
    """Whether ``item`` is a conversation item of the classic SDK's store (any, when
    ``marker`` is None; else the one stored with that very metadata dict)."""
    if not isinstance(item, dict) or item.get("type") != "conversation":
        return False
    data = item.get("data")
    return marker is None or (isinstance(data, dict) and data.get("metadata") is marker)


_log_once = LogOnce()


class ClassicTracker:
    """Makes a classic ``agentsight.ConversationTracker`` (0.0.12 - 0.0.44) safe under
    concurrent requests; pass it as the middleware's ``tracker``.

    The wrapped tracker's ``config.conversation_id`` becomes per-request: inside a chat
    request every SDK call (``track_human_message`` / ``track_question``,
    ``track_agent_message`` / ``track_answer``, ``track_action``, ``send_tracked_data``...)
    uses that request's conversation, whichever tracker reference the handler calls and
    whatever other requests run at the same time. Outside requests nothing changes.

    Keep calling the SDK as before, from the request's own context: directly in the
    handler (async or sync), or in a thread that got a copy of it
    (``starlette.concurrency.run_in_threadpool``, ``anyio.to_thread.run_sync``,
    ``contextvars.copy_context().run``). A bare ``threading.Thread`` does not get it.

    Other attributes are the wrapped tracker's, so ``ClassicTracker(t).send_tracked_data()``
    works too.
    """

    def __init__(self, tracker: Any) -> None:
        if isinstance(tracker, ClassicTracker):
            tracker = tracker.__dict__["tracker"]
        if not is_classic_tracker(tracker):
            raise TypeError(
                f"ClassicTracker() needs the classic agentsight SDK's ConversationTracker "
                f"(0.0.12 - 0.0.44), got {type(tracker).__name__}; for agentsight 0.1 and "
                "later use AgentSightSDK()"
            )
        _make_per_request(tracker.config)
        self.tracker = tracker
        self._initialize_keywords = _accepted_keywords(tracker.initialize_conversation)
        self._engage_keywords = _accepted_keywords(tracker.get_or_create_conversation)
        # The items chat requests stored, by key: requests still running in the order they
        # came, ended ones in the order they ended (the grace runs from then). A sent item's
        # marker dies with it (the SDK deletes what it sent) and its key joins _sent, to be
        # forgotten: only unsent items count towards max_unsent, and their metadata is not
        # kept alive by us. An OrderedDict: taken from the front, a dict slows down.
        self._unsent: OrderedDict[int, _Entry] = OrderedDict()
        self._keys_of: dict[str, set[int]] = {}  # conversation id -> its keys in _unsent
        self._sent: deque[int] = deque()  # appended by weakref callbacks, from any thread
        self._next_key = itertools.count()
        self._unsent_lock = threading.Lock()
        reset_in_child(self._after_fork)

    def _after_fork(self) -> None:
        # Held at the fork by a request thread the child does not have, the child's copy
        # stayed held: its first chat request hung for good.
        self._unsent_lock = threading.Lock()

    def initialize_conversation(self, conversation_id: str, **fields: Any) -> None:
        """A page view: sent at once by the SDK (``is_used: false``). Run by the middleware's
        background worker, bound to the conversation in case the SDK reads the config."""
        with _bound(conversation_id):
            self.tracker.initialize_conversation(
                conversation_id, **_only(fields, self._initialize_keywords)
            )

    def get_or_create_conversation(self, conversation_id: str, **fields: Any) -> None:
        """A chat request: the SDK stores an ``is_used: true`` conversation item under
        ``conversation_id``; the handler's ``send_tracked_data()`` sends it with the messages.

        Behind the middleware this is done by :meth:`conversation_scope` instead.
        """
        with _bound(conversation_id):
            self.tracker.get_or_create_conversation(
                conversation_id, **_only(fields, self._engage_keywords)
            )

    #: The middleware skips its own call of get_or_create_conversation: the scope makes it,
    #: and so knows which stored item is this request's.
    agentsight_skip_engage = True
    #: Page views the middleware may hand over at once, from as many threads: the SDK posts
    #: each with blocking HTTP (retries included), and is safe to call from several threads.
    agentsight_initialize_threads = 8

    #: Attempts at a page view the API answered with a 5xx, 408 or 429, at most.
    page_view_attempts = 4

    def agentsight_retry_in(self, exc: BaseException, attempt: int) -> float | None:
        """Seconds before the middleware makes failed page view ``attempt`` again, or None.

        The SDK posts a page view once whatever the API answers (a 503 or 429 raises its
        ``ConversationApiException`` with the ``status_code``), and retries only network
        errors itself (3 attempts, 1 s and 2 s apart): those are not made again here, nor
        4xx refusals, which never succeed. Backoff as the built-in client's; while the API
        accepts no page view, the middleware has every page view wait it out, not this one only."""
        status = getattr(exc, "status_code", None)
        if (
            attempt >= self.page_view_attempts
            or type(exc).__name__ != "ConversationApiException"
            or not isinstance(status, int)
        ):
            return None
        verdict = classify(status)
        if verdict == RETRY:
            return backoff(attempt)
        if verdict == THROTTLED:
            # The SDK keeps no Retry-After: the least the built-in client would wait.
            return max(backoff(attempt), MIN_RETRY_AFTER)
        return None

    #: Seconds an item a chat request stored may wait unsent, with nothing tracked after it,
    #: before it is dropped: a handler may track and send a while after it returned (a
    #: background task), but a request it never tracked (a body it refused, a GET poll on
    #: a chat route) must not leave its item in the SDK's memory for good.
    unsent_grace = 300.0
    #: Such items kept at most, the oldest dropped first past it.
    max_unsent = 10_000

    def conversation_scope(
        self, conversation_id: str, **fields: Any
    ) -> AbstractContextManager[None]:
        """Entered by the middleware around the chat handler: stores the conversation
        item (the SDK keeps it in memory, no HTTP) for the handler to send."""
        return self._scope(conversation_id, fields)

    @contextmanager
    def _scope(self, conversation_id: str, fields: dict[str, Any]) -> Iterator[None]:
        _lost[0] = True
        with _bound(conversation_id):
            key = None
            try:
                key = self._store_item(conversation_id, fields)
            except Exception as exc:
                # The handler still runs bound to its conversation (else the SDK's
                # process-wide id, another visitor's, would be used).
                _log_once("ClassicTracker: the SDK's get_or_create_conversation()", exc)
            try:
                yield
            finally:
                if key is not None:
                    self._close(key)

    def _store_item(self, conversation_id: str, fields: dict[str, Any]) -> int | None:
        """Store this request's conversation item; its bookkeeping key, if it has one."""
        store = self._store()
        if store is None:  # a look-alike without the SDK's store: nothing to look after
            self.tracker.get_or_create_conversation(
                conversation_id, **_only(fields, self._engage_keywords)
            )
            return None
        # A metadata dict of our own: the SDK keeps it by reference in the item it stores,
        # which tells this request's item from any other, whatever runs at the same time.
        marker = _Marker(fields.get("metadata") or {})
        self.tracker.get_or_create_conversation(
            conversation_id, **_only({**fields, "metadata": marker}, self._engage_keywords)
        )
        tracked, lock = store
        if None in tracked:
            # Tracked outside any request's conversation (see _PerRequestConversationId):
            # the SDK files such items under None, which its send_tracked_data() never
            # sends. Nothing else takes them: left there, every such call added to them.
            with lock:
                tracked.pop(None, None)
        key = next(self._next_key)
        sent = self._sent

        def gone(_: object, key: int = key) -> None:
            sent.append(key)  # no lock: it may run anywhere, under any lock

        entry = _Entry(conversation_id, weakref.ref(marker, gone))
        with self._unsent_lock:
            self._unsent[key] = entry
            self._keys_of.setdefault(conversation_id, set()).add(key)
        # Stored first, then the earlier ones dropped: a message an earlier request tracks
        # meanwhile lands behind a conversation item either way.
        self._drop_stale(store, conversation_id, marker)
        return key

    def _close(self, key: int) -> None:
        with self._unsent_lock:
            entry = self._unsent.get(key)
            if entry is not None:
                entry.closed_at = time.monotonic()
                self._unsent.move_to_end(key)

    def _store(self) -> tuple[dict[Any, Any], Any] | None:
        """The classic SDK's private store of unsent items and its lock (the same from
        0.0.12 to 0.0.44), or None for a look-alike without them."""
        tracked = getattr(self.tracker, "_tracked_data", None)
        lock = getattr(self.tracker, "_lock", None)
        if not isinstance(tracked, dict) or not hasattr(lock, "__enter__"):
            return None
        return tracked, lock

    def _drop_stale(
        self, store: tuple[dict[Any, Any], Any], conversation_id: str, mine: _Marker
    ) -> None:
        """Drop the items of requests that ended with nothing tracked after them: those of
        this conversation stored before ``mine`` (one waiting item is enough: polls piled
        up, and the next send posted them all), and any whose request ended more than
        ``unsent_grace`` ago, or beyond ``max_unsent``. Items of requests still running
        are left alone: their handler may track yet."""
        now = time.monotonic()
        # (key, conversation id, marker, of this conversation)
        candidates: list[tuple[int, str, _Marker, bool]] = []
        with self._unsent_lock:
            while self._sent:  # sent meanwhile: nothing left to look after
                self._forget(self._sent.popleft())
            for key in self._keys_of.get(conversation_id, ()):
                entry = self._unsent[key]
                marker = entry.marker()
                if entry.closed_at is not None and marker is not None and marker is not mine:
                    candidates.append((key, conversation_id, marker, True))
            excess = len(self._unsent) - self.max_unsent
            for key, entry in self._unsent.items():  # running ones, then the ended by age
                closed_at = entry.closed_at
                if closed_at is None or entry.conversation_id == conversation_id:
                    continue
                if excess <= 0 and now - closed_at < self.unsent_grace:
                    break
                excess -= 1
                marker = entry.marker()
                if marker is not None:
                    candidates.append((key, entry.conversation_id, marker, False))
        if not candidates:
            return
        settled: list[int] = []  # dropped now, or the SDK's to send: no longer ours
        tracked, lock = store
        with lock:
            for key, cid, marker, same in candidates:
                stored = tracked.get(cid)
                items = stored.get("items") if isinstance(stored, dict) else None
                if not isinstance(items, list):
                    settled.append(key)  # sent (and so deleted) meanwhile
                    continue
                index = next((i for i, item in enumerate(items) if _holds(item, marker)), None)
                if index is None:
                    settled.append(key)
                    continue
                if same and not any(_holds(item, mine) for item in items[index + 1 :]):
                    continue  # stored after this request's own: not an earlier one
                after = items[index + 1] if index + 1 < len(items) else None
                if after is None or _holds(after, None):
                    del items[index]
                    if not items:
                        del tracked[cid]
                settled.append(key)  # dropped, or followed by messages: the SDK's now
        with self._unsent_lock:
            for key in settled:
                self._forget(key)

    def _forget(self, key: int) -> None:
        """Under the lock: ``key`` out of the bookkeeping."""
        entry = self._unsent.pop(key, None)
        if entry is not None:
            keys = self._keys_of.get(entry.conversation_id)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._keys_of[entry.conversation_id]

    def __getattr__(self, name: str) -> Any:
        if name == "tracker":  # not set yet: __init__ failed
            raise AttributeError(name)
        return getattr(self.tracker, name)

    def __repr__(self) -> str:
        return f"ClassicTracker({self.tracker!r})"


# -- OpenTelemetry-based SDK (0.1.x) -------------------------------------------------------


def _installed_release() -> tuple[str, tuple[int, ...]] | None:
    """The installed ``agentsight`` distribution's version and its leading numbers, or None
    when there is no such distribution (a vendored or stand-in module)."""
    import importlib.metadata  # only when an adapter is built

    try:
        version = importlib.metadata.version("agentsight")
    except importlib.metadata.PackageNotFoundError:
        return None
    return version, _release(version)


def _release(version: str) -> tuple[int, ...]:
    """The leading numbers of a version: ``"0.0.44"`` -> (0, 0, 44), ``"0.1.0rc1"`` -> (0, 1, 0)."""
    match = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(number) for number in match.group().split(".")) if match else ()


def _import_agentsight() -> Any:
    installed = _installed_release()
    if installed is not None and () < installed[1] < (0, 1):
        # Said before the import: 0.0.44 builds a tracker as it loads, and without an API
        # key raised NoApiKeyException ("API Key is missing"), which sent the user after a
        # key when the SDK release was what was wrong.
        raise ImportError(
            f"agentsight {installed[0]} is installed: AgentSightSDK() needs the agentsight "
            "SDK 0.1 or later (pip install 'agentsight>=0.1'); with 0.0.x pass its "
            "tracker=ConversationTracker() (wrapped in ClassicTracker for you)"
        )
    try:
        agentsight = importlib.import_module("agentsight")
    except ImportError as exc:
        raise ImportError(
            "AgentSightSDK() needs the agentsight SDK 0.1 or later: pip install 'agentsight>=0.1'"
        ) from exc
    missing = [
        name
        for name in ("open_conversation", "conversation", "is_enabled", "init")
        if not callable(getattr(agentsight, name, None))
    ]
    if missing:
        raise ImportError(
            f"the installed agentsight SDK lacks {', '.join(missing)}(): AgentSightSDK() needs "
            "0.1 or later (for 0.0.x's ConversationTracker use ClassicTracker)"
        )
    return agentsight


def _sdk_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    # The middleware's names are the SDK's keyword names; anything else (and None,
    # which the SDK treats as absent anyway) is left out.
    return {key: value for key, value in fields.items() if key in _FIELDS and value is not None}


class AgentSightSDK:
    """The middleware's tracker for the OpenTelemetry-based ``agentsight`` SDK (0.1.x).

    - a page view calls ``agentsight.open_conversation(id, **fields)``: a ``conversation``
      span (the visit, ``is_used: false``), exported with the SDK's next batch;
    - a chat request runs the handler inside ``agentsight.conversation(id, **fields)``, so
      the handler's ``agentsight.turn()`` / ``user_message()`` / ``agent_message()`` (and
      the SDK's LLM instrumentation) are filed under the visitor's conversation with the
      IP, device, language, source and metadata the middleware found. The first turn is
      what marks the conversation engaged.

    ``init_options``, if given, are passed to ``agentsight.init()`` (which ignores a second
    call); otherwise call ``agentsight.init()`` yourself at start-up.

    Page views are paced into the SDK: its export queue (``max_queue_size``, 2,048 spans by
    default) drops its oldest span for each one past full, so a page view is handed over
    only while that queue is less than half full, and otherwise waits in the middleware's
    own queue (``queue_size``, counted in ``stats()``) for up to :attr:`queue_wait` seconds.
    """

    #: Seconds a page view waits for room in the SDK's export queue at most; past that it is
    #: not handed over (counted in ``stats()['errors']`` and said): the API is taking no
    #: batches, and the SDK would have dropped an older span for it.
    queue_wait = 4.0

    def __init__(self, **init_options: Any) -> None:
        self._sdk = _import_agentsight()
        if init_options:
            self._sdk.init(**init_options)
        self._warned = False
        # The SDK's provider last looked at, and in it (its export queue, the length a
        # page view waits below), or None where not found. Per provider: a shutdown() and
        # a second init() build a new pipeline, and the old queue (full, its exporter
        # stopped, when the API hung at shutdown) held every page view queue_wait for ever.
        self._queue_of: tuple[object, tuple[Sized, int] | None] | None = None

    def _check_enabled(self) -> None:
        if self._warned or self._sdk.is_enabled():
            return
        self._warned = True
        logger.warning(
            "agentsight.init() has not been called (or found no valid AGENTSIGHT_API_KEY): "
            "the SDK records nothing. Call it at start-up or pass AgentSightSDK(**init_options)."
        )

    def initialize_conversation(self, conversation_id: str, **fields: Any) -> None:
        self._check_enabled()
        self._wait_for_room()
        self._sdk.open_conversation(conversation_id, **_sdk_fields(fields))

    def _wait_for_room(self) -> None:
        """Wait, up to :attr:`queue_wait`, while the SDK's export queue is half full.

        OpenTelemetry's BatchSpanProcessor drops the oldest span for each one emitted past
        a full queue, said once per 20 s on its own logger and nowhere else: a burst of
        page views faster than the exporter, or an API that is slow, throttling or down
        while the exporter retries, lost thousands of conversations with ``stats()``
        showing every one processed. Waiting here keeps the page views in the middleware's
        queue, bounded and counted. Half, not full: the other half is for the turns chat
        handlers record (they cannot wait), and the SDK waits out a 429 only below half
        full (above it, it drops the throttled batch).
        """
        found = self._export_queue()
        if found is None:
            return
        spans, limit = found
        if len(spans) < limit:
            return
        deadline = time.monotonic() + self.queue_wait
        while len(spans) >= limit:
            if time.monotonic() >= deadline:
                raise _ExportQueueFull(
                    f"the agentsight SDK's export queue stayed at {len(spans)} spans "
                    f"(its page views' share) for {self.queue_wait:g} s: its exporter is not "
                    "getting batches through (the API is down, hanging or throttling); "
                    "the page view was not handed to the SDK, which would have dropped an "
                    "older span for it"
                )
            time.sleep(_ROOM_POLL)

    def _export_queue(self) -> tuple[Sized, int] | None:
        """The SDK's span export queue and the length page views wait below, or None when
        the SDK is not initialised, disabled or shut down, or its pipeline is not the one
        0.1.x builds.

        Read from OpenTelemetry's internals, as the SDK's own exporter reads it for its
        throttling (``AgentSightSpanExporter._queue_pressure``); whatever is not found
        leaves page views unpaced, as before."""
        core = sys.modules.get("agentsight.sdk.core")
        provider = getattr(getattr(core, "_state", None), "provider", None)
        if provider is None or not self._sdk.is_enabled():
            # Not initialised yet (looked for again at the next page view), disabled or
            # shut down: the SDK records nothing, and a queue its shutdown left behind
            # never drains.
            return None
        cached = self._queue_of
        if cached is not None and cached[0] is provider:
            return cached[1]
        found = _find_export_queue(provider)
        if found is None:
            logger.debug("agentsight SDK's export queue not found: page views are not paced")
        self._queue_of = (provider, found)
        return found

    #: Tells the middleware to skip the call (and its thread hop).
    agentsight_skip_engage = True

    def agentsight_flush(self, timeout: float) -> bool:
        """Export what the SDK holds now (it batches, and exports every few seconds):
        called by the middleware's ``flush()`` and ``close()``, so a lifespan shutdown
        sends the last page views and turns. The SDK's own atexit flush does not run
        when uvicorn stops on SIGTERM."""
        if not self._sdk.is_enabled():
            return True  # it records nothing: nothing to send
        return bool(self._sdk.flush(max(int(timeout * 1000), 1)))

    def get_or_create_conversation(self, conversation_id: str, **fields: Any) -> None:
        """Nothing to do before the handler: in 0.1.x the handler's first turn marks the
        conversation engaged, and the scope carries the fields."""

    def conversation_scope(
        self, conversation_id: str, **fields: Any
    ) -> AbstractContextManager[Any]:
        self._check_enabled()
        manager: AbstractContextManager[Any] = self._sdk.conversation(
            conversation_id, **_sdk_fields(fields)
        )
        return manager


def _find_export_queue(provider: Any) -> tuple[Sized, int] | None:
    """The export queue of the pipeline 0.1.x builds under ``provider``, and the length
    page views wait below; None if it is not that pipeline."""
    try:
        for processor in provider._active_span_processor._span_processors:
            while hasattr(processor, "_downstream"):  # the SDK's TurnBufferingProcessor
                processor = processor._downstream
            batch = getattr(processor, "_batch_processor", processor)
            # OpenTelemetry 1.34 moved them into a BatchProcessor, with a leading
            # underscore; the SDK takes opentelemetry-sdk 1.20 and later, where they sat
            # on the BatchSpanProcessor without one (and drop the oldest span alike).
            spans = _first(batch, "_queue", "queue")
            capacity = _first(batch, "_max_queue_size", "max_queue_size")
            batch_size = _first(batch, "_max_export_batch_size", "max_export_batch_size")
            if isinstance(spans, Sized) and isinstance(capacity, int) and capacity > 1:
                # Under half once a page view is in (the SDK reads exactly half as full
                # enough to drop a throttled batch), but not below one export batch: the
                # exporter wakes at a full batch, else only after export_interval_ms (5 s
                # by default).
                least = batch_size if isinstance(batch_size, int) else 0
                limit = max((capacity - 1) // 2, least)
                return spans, min(limit, capacity - 1)
    except Exception as exc:  # an OpenTelemetry that moved its internals
        logger.debug("agentsight SDK's export queue not found: %r", exc)
    return None


def _first(holder: object, *names: str) -> Any:
    """The first of ``names`` that ``holder`` has (None-valued counts as absent)."""
    for name in names:
        value = getattr(holder, name, None)
        if value is not None:
            return value
    return None


#: Seconds between looks at the SDK's export queue while a page view waits for room.
_ROOM_POLL = 0.005


class _ExportQueueFull(RuntimeError):
    """A page view not handed to the 0.1.x SDK: its export queue stayed half full."""


def adapt_tracker(tracker: Any) -> Any:
    """``tracker`` made safe for the middleware: a classic ``ConversationTracker`` is
    wrapped in :class:`ClassicTracker`; anything else is returned unchanged."""
    return ClassicTracker(tracker) if is_classic_tracker(tracker) else tracker
