"""The built-in AgentSight client: ``POST /api/conversations/`` over pooled keep-alive connections.

It runs on the background worker's event loop, several requests in flight,
one conversation's events strictly in order (the outbox sees to that), and
it never raises into anything: every outcome is counted, every kind of
failure logged once.

Direct connections go through ``_http11.Http11Pool`` (asyncio with llhttp's or
h11's parser, ~6x less CPU per event than httpx's transport; why in that module).
An endpoint behind a proxy (``HTTPS_PROXY``/``HTTP_PROXY``/``ALL_PROXY``, minus
``NO_PROXY``, as ``requests`` and so the official SDK honour them) goes through
httpx's transport, which speaks to proxies, from sender threads (as many as
requests in flight).
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
import math
import sqlite3
import sys
import time
import urllib.request
from collections import deque
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from ..__version__ import __version__
from .._credentials import Credentials, mask_key
from .._log import logger
from .._park import park, resolve
from .._payload import MAX_EVENT_CHARS, encode_event, own_json
from .._retry import (
    ACCEPTED,
    ELSEWHERE,
    REJECTED,
    RETRY,
    THROTTLED,
    backoff,
    classify,
    retry_after,
)
from .._store import is_locked
from .._threads import DaemonThreads
from .._timeout import bounded
from ._http11 import READ_IN_ONE_GO, ClosedUnannounced, Http11Pool, NotSent, Reply
from .outbox import SETTLE, Outbox, OutboxItem
from .store import _LOCKED_TRIES

__all__ = ["HttpSink"]

# How often the pump looks for work it was not told about: rows whose retry
# time came, or rows another process put into a shared outbox file.
_POLL = 0.1
#: Seconds past shutdown's deadline the last write to the outbox (what the API accepted,
#: claims handed back) may wait for another process's lock.
_FINAL_GRACE = 1.0
# Seconds shutdown lets the answers already in the sockets be read before it cancels the
# pipelines out (see _read_answers_waiting).
_READ_AT_CLOSE = 0.005
#: Seconds the other senders wait for the request sent alone after a pause before one
#: more goes alone: one that hangs must not hold all delivery for the request timeout.
_PROBE_WAIT = 2.0
# With nothing waiting in a memory outbox there is nothing to look for: the poll sleeps
# this long, or until put() brings work (an idle process's threads stay quiet).
_IDLE_POLL = 1.0
# Senders at start; doubled while every one is waiting for an answer and work they
# could take waits behind them: requests in flight are what bounds delivery over a
# long round trip (64 at 50 ms carry ~1,280 events/s), while a trickle of events
# never needs more than a few connections.
_FIRST_SENDERS = 8
# How long the outbox's depth, as counted for a pipeline's share (see _even_share), holds:
# counted at every claim, it cost the SQLite outbox ~35 us a claim (~2 us an event at full
# pipelines), and a burst is spread from its first claims all the same.
_RECOUNT = 0.01
# While a request adds little to a pipeline, the usual stream (up to two pipelines' worth put since
# the last claim) goes as whole pipelines: written at once, its events share one write and one
# wake-up (spread one request per connection, each event paid for its own: 108-133 us of the
# worker's CPU an event at 3,000 events/s to the stand-in on loopback, 66-84 us pipelined; 150-175
# us against 110-125 at 1,000 events/s to an API 50 ms away). A pipeline is no longer than this
# long over what a request adds to one: the spacing of its answers read as they come (a moving
# average of pipelines the API accepted in full), not its time over its length. A server answers a
# connection's requests one after the other: from an API slow per request they come one processing
# time apart (it gets the even spread, its connections being its parallelism), while the round trip
# to an API far away is paid once a pipeline, and one across the internet (20-100 ms) that answers
# at once returns 16 requests together, as fast as one. (Pipelines followed the whole pipeline's
# time, and none went past the budget: one request a connection to any API over 20 ms away.)
_PIPELINE_BUDGET = 0.02
# A pipeline's spacing is counted as this much at most (what already allows no pipeline): a stall
# (a server's collection pause) in one pipeline among quick ones must not stop pipelines, which
# alone measure it, for _PACE_KEPT.
_SPACING_MOST = _PIPELINE_BUDGET
# Requests in a pipeline while the time a request adds is not known (not measured lately):
# enough to measure it. Only this many while answers take longer than the budget (an API that is
# far away, or slow per request: a pipeline's second answer waits one processing time there).
_FIRST_PIPELINE = 4
_FIRST_PIPELINE_SLOW = 2
# A pipeline out this many times the average (and this long at least: a clock's and a busy
# loop's jitter) says the API has slowed or hangs, before any answer does.
_OVERDUE_TIMES = 4
_OVERDUE_LEAST = 0.01
# Of the pipelines whose answers could be read in one go (see _answer_time), one in this
# many reads them as they come: those alone are timed. A pipeline read late on purpose
# would be measured with its wait, and the wait is worked out from the measure: the
# average would climb to four times what the loop adds to a timer (0.6 to 3.5 ms a
# pipeline against an API that answers at once).
_TIMED_ONE_IN = 8
# ... and any that comes this long after the last one timed: a sparse stream's pace does not
# go stale (and get the even spread), and a changed API is measured within this long.
_TIMED_WITHIN = 0.05
# Puts this close to a pipeline read late are of the same burst as its events (see
# _in_requests); the worker hands a steady stream over once a look, 5 ms apart.
_BURST_SPAN = 0.002
_LATE_TIMES = 1.25
# Pipelines read late are those expected to take this long. A shorter one is over before
# the loop's timers (a millisecond's resolution) could read it late: waiting costs it a
# millisecond and saves nothing. A longer one is not timed (but one in _TIMED_ONE_IN): the
# check for a pipeline out too long (see _fast_depth) would rest on the others' times,
# single requests' among them; under _OVERDUE_LEAST, no pipeline read late can fail it.
_READ_LATE_LEAST = 0.0015
_READ_LATE_MOST = 0.008
# While a pipeline of two requests or more is out to be read as its answers come, a timer
# this often tells how late the worker's loop runs: held off (the app's threads holding the
# GIL, a slow outbox write), it reads answers the server spaced as close together as a
# distant API's, and the quickest first answer of late (see _timed) is read late too under a
# load that lasts (two busy threads in the app: first answers of 70-400 ms from an API taking
# 10 ms a request, and pipelines of 8-16 to it). Each pipeline's spacing counts the most the
# timer was late while that pipeline was out (past the timer's own resolution: a millisecond,
# a clock tick of 15.6 ms on Windows): a stall before it was written says nothing of how its
# answers were read (one GIL stall of 25 ms every 4 s cost a distant API most pipelines).
_LAG_PROBE = 0.005
_TIMER_SLACK = 0.016 if sys.platform == "win32" else 0.001
# Weight of the newest pipeline in those averages.
_PACE_WEIGHT = 0.25
# A figure not measured for this long is measured again (the even spread, or short
# pipelines, until then): what an hour-old figure says of the API now is a guess.
_PACE_KEPT = 5.0
# A wrong endpoint (see _retry.ELSEWHERE) is tried again this often, the events kept meanwhile.
_ELSEWHERE_PAUSE = 30.0
# ... once this many events in a row got such an answer.
_ELSEWHERE_RUN = 3
_KEPT = " in memory (up to queue_size; pass outbox='path.sqlite3' to keep every event on disk)"
# While no connection to the API can be made (refused, a name that does not resolve, a
# connect timeout, a TLS handshake refused), delivery pauses this long at first, doubling
# (jittered) up to the cap, and one connection is tried at a time.
_UNREACHABLE_FIRST = 0.5
_UNREACHABLE_CAP = 30.0
# ... unless the API answered another request this recently, with fewer than this many
# connections failed since: then the failure is that connection's (a refused or timed-out
# connect at a busy balancer, a DNS look-up that failed once, ephemeral ports running out
# under connection churn), and only its event waits, as long as a first pause.
_ANSWERED_WITHIN = 1.0
_UNREACHABLE_RUN = 3
# Ids of events sent again uncounted, kept at most (a bound, not a limit one meets).
_RESENT_KEPT = 10_000
# A failure is "over" (logged again next time, and its end said) after this long without one.
_QUIET = 60.0


# Strict JSON: the API refuses NaN/Infinity, and a value JSON cannot hold (a
# datetime in user metadata) is sent as its text. One encoder for all events:
# json.dumps builds a new one per call when given options (~1.2 us an event).
_encode = json.JSONEncoder(separators=(",", ":"), allow_nan=False, default=str).encode


def _event_json(payload: dict[str, Any]) -> tuple[str, str | None]:
    """``encode_event(payload, _encode)``: written from its parts where it can be (own_json
    writes what _encode would), by the encoder otherwise."""
    body = own_json(payload)
    if body is None or len(body) > MAX_EVENT_CHARS:
        return encode_event(payload, _encode)
    return body, None


def _request_time(payload: dict[str, Any]) -> float:
    """When an event's request came in (its ``timestamp``, as build_payload wrote it); inf
    for one that does not say, whose chat then waits SETTLE from its write."""
    try:
        return datetime.fromisoformat(payload["timestamp"]).timestamp()
    except (KeyError, TypeError, ValueError):
        return math.inf


def _api_error(reply: Reply) -> str:
    """The server's words, from a Django REST framework error body."""
    try:
        data = json.loads(reply.body)
    except ValueError:
        return reply.body[:200].decode("utf-8", "replace") or f"HTTP {reply.status}"
    if isinstance(data, dict):
        if "detail" in data:
            return str(data["detail"])
        return "; ".join(
            f"{field}: {', '.join(map(str, errors)) if isinstance(errors, list) else errors}"
            for field, errors in data.items()
        )
    return str(data)[:200]


def _status_text(status: int) -> str:
    """``HTTP 503 Service Unavailable``: the status and its standard phrase, for the log."""
    try:
        return f"HTTP {status} {http.HTTPStatus(status).phrase}"
    except ValueError:  # not a standard status (599)
        return f"HTTP {status}"


def _is_api_answer(body: bytes) -> bool:
    """Whether a 2xx body is the API's: a JSON object with the conversation's ``id``.

    A look, not a parse (this runs for every event): enough to tell the API from
    a web page or an empty answer.
    """
    return body.lstrip()[:1] == b"{" and b'"id"' in body


def _maybe_processed(error: httpx.HTTPError) -> bool:
    """Whether a request that failed so may still be processed by the server (it was sent,
    and no answer came in time)."""
    return isinstance(error, (httpx.ReadTimeout, httpx.WriteTimeout))


def _described(error: BaseException) -> str:
    """``error`` for the log: its type, and its message when it has one."""
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _failure_kind(error: httpx.HTTPError) -> str:
    """What kind of failure ``error`` is, for the log: one warning per kind and outage."""
    if "CERTIFICATE_VERIFY_FAILED" in str(error):
        return "certificate"
    return type(error).__name__


def _without_password(url: str) -> str:
    """``url`` for the log: a password in it as httpx shows one (``user:[secure]@``)."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.netloc.rsplit("@", 1)[1]
        return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:[secure]@{host}"))
    except ValueError:
        return "<the proxy URL>"


def environment_proxy(url: str) -> str | None:
    """The proxy the environment names for ``url``, or None for a direct connection."""
    parts = urlsplit(url)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass(parts.netloc):
        return None
    # "proxy.corp:3128" means an HTTP proxy to requests (and httpx's own env handling).
    return proxy if "://" in proxy else f"http://{proxy}"


class _Bell:
    """Wakes waiting senders, as many as there is work for."""

    def __init__(self) -> None:
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def wait(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        await waiter

    def ring(self, n: int) -> None:
        waiters = self._waiters
        while n > 0 and waiters:
            waiter = waiters.popleft()
            if not waiter.done():  # not cancelled
                waiter.set_result(None)
                n -= 1


class _Flight:
    """A sender's pipeline out to the API: its events, their results (filled by the pool
    when an exchange ends, and by a cancellation), and when it was written
    (``time.perf_counter()``)."""

    __slots__ = ("began", "expected", "items", "lag", "read_late", "results")

    def __init__(self, items: list[OutboxItem], began: float) -> None:
        self.items = items
        self.results: list[Reply | Exception] = []
        self.began = began
        #: How long it is expected to take when its answers are read in one go, late on
        #: purpose (see HttpSink._answer_time); 0.0 when they are read as they come.
        self.read_late = 0.0
        #: How long it is expected to take when read as its answers come, from the pace
        #: measured (see HttpSink._expected); 0.0 when not known.
        self.expected = 0.0
        #: The most the worker's loop ran late while it was out (see HttpSink._lag_probe).
        self.lag = 0.0


def _accepted(result: Reply | Exception) -> bool:
    return isinstance(result, Reply) and classify(result.status) == ACCEPTED


def _moving_average(last: float, value: float, measured_at: float, now: float) -> float:
    """``value`` folded into the average ``last`` (measured at ``measured_at``), or
    ``value`` alone when there is none or it is older than :data:`_PACE_KEPT`."""
    if last == math.inf or now - measured_at > _PACE_KEPT:
        return value
    return last + (value - last) * _PACE_WEIGHT


class HttpSink:
    def __init__(
        self,
        credentials: Credentials,
        *,
        outbox: Outbox,
        concurrency: int = 64,
        timeout: float = 15.0,
        max_attempts: int = 6,
        max_pending: int = 10_000,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._credentials = credentials
        self._url = credentials.conversations_url
        self._outbox = outbox
        path = getattr(outbox, "path", None)
        self.storing = (
            f"writing events to the outbox {path}" if path is not None else "queueing events"
        )
        self._concurrency = concurrency
        self._timeout = timeout
        # Only bounds the in-memory queue: a durable outbox keeps an event until
        # the API accepts it, however long the outage.
        self._max_attempts = max_attempts
        self._max_pending = max_pending
        self._transport = transport
        self._proxy = None if transport is not None else environment_proxy(self._url)
        self._direct: Http11Pool | None = None
        self._http: httpx.BaseTransport | None = None
        self._pool: DaemonThreads | None = None
        # Host and Content-Length are added by whichever client sends.
        self._headers = [
            (b"Authorization", f"Api-Key {credentials.api_key}".encode("latin-1")),
            (b"Content-Type", b"application/json"),
            (b"Accept", b"application/json"),
            (b"User-Agent", f"agentsight-middleware/{__version__}".encode("latin-1")),
        ]
        self._timeouts = {"connect": timeout, "read": timeout, "write": timeout, "pool": timeout}
        self._tasks: list[asyncio.Task[None]] = []
        self._senders = 0
        self._claims_full = False
        self._sent_at_last_look = 0
        self._bell = _Bell()
        # Claimed from the outbox, waiting for a free sender: claims come in batches
        # (one query for a SQLite outbox), sends one at a time per sender.
        self._ready: deque[OutboxItem] = deque()
        self._busy = 0  # senders waiting for answers
        # The claimed events being sent, by sender: their leases are renewed while they are.
        self._flying: dict[int, _Flight] = {}
        self._acks: list[OutboxItem] = []
        self._ack_flush_due = False  # a _flush_acks is scheduled (see _ack)
        # Written to the API and unanswered when shutdown cancelled their requests.
        self._unanswered: list[OutboxItem] = []
        self._paused_until = 0.0
        # The same end on the monotonic clock: a pause set before the wall clock was stepped
        # back (NTP, a VM's clock set right) must not last as long as the step (an hour's
        # step: an hour without delivery, the in-memory queue full and dropping).
        self._pause_ends = 0.0
        # After a pause, one request goes first (see _sender): the circuit is half-open until
        # it gets an answer other than the one that paused delivery.
        self._half_open = False
        self._probe: asyncio.Future[None] | None = None  # resolved when that request is over
        # Pauses in a row for an API no connection could reach (see _unreachable).
        self._unreachable_run = 0
        # Connections that failed since the last answer, and when that was (monotonic).
        self._connect_failures = 0
        self._answered_at = -math.inf
        # Requests one sender writes at once, at most, since the last claim: see _even_share.
        self._share = 1
        # Seconds a pipeline took to be answered (moving average of those the API accepted
        # in full; infinite until measured: see _fast_depth), and when it was last measured
        # (perf_counter).
        self._pipeline_time = math.inf
        self._paced_at = -math.inf
        # Seconds a request adds to a pipeline: the time over the length of those of two
        # requests or more (moving average), and when it was last measured: what a pipeline
        # read late waits for (see _answer_time).
        self._per_request = math.inf
        self._per_request_at = -math.inf
        # Seconds to a pipeline's first answer (moving average; a round trip and one
        # processing time), and the spacing of its answers (what a request adds to one: see
        # _PIPELINE_BUDGET), each with when it was last measured (perf_counter).
        self._first_answer = math.inf
        self._first_answer_at = -math.inf
        self._spacing = math.inf
        self._spacing_at = -math.inf
        # The quickest first answer (see _timed) in the window of _PACE_KEPT begun at
        # _first_least_at, and in the one before it.
        self._first_least = math.inf
        self._first_least_before = math.inf
        self._first_least_at = -math.inf
        self._read_late_count = 0  # pipelines that could have theirs read late (see _TIMED_ONE_IN)
        # How late the loop runs (see _LAG_PROBE): the probe's due time (perf_counter, inf
        # when none is set) and its handle; the pipelines out that it watches.
        self._lag_due = math.inf
        self._lag_timer: asyncio.TimerHandle | None = None
        self._spaced = 0
        # Requests one connection may carry with answers that fast, as found at the last
        # claim (0: spread; see _sender).
        self._pipeline = 0
        # Events put since the last claim: more than two pipelines' worth is a burst.
        self._fresh = 0
        self._waiting = 0  # the outbox's depth as last counted for it
        self._waiting_at = -math.inf  # when (monotonic)
        self._idle_tick: asyncio.Future[None] | None = None
        self._closing = False
        self._answers_read = False  # shutdown's last read of the sockets is done
        self._senders_cancelled = False
        #: Monotonic time past which a write waiting for the outbox's lock gives up (set
        #: at shutdown).
        self.deadline = math.inf
        # Events sent again uncounted once already (see _outcome: NotSent).
        self._resent: set[int] = set()
        self._logged: set[Any] = set()
        # A failure was logged, and when the last one was (see _recovered); when the
        # outage began, the counts then, and whether it was said at WARNING.
        self._outage = False
        self._last_failure = 0.0
        self._outage_began = 0.0
        self._outage_counts = (0, 0)  # (retried, throttled) when it began
        self._warned = False
        # Answers from elsewhere in a row, none accepted between (see _elsewhere).
        self._elsewhere_run = 0
        # The last attempt failed (no event accepted since): see drain.
        self._failing = False
        self.sent = 0
        self.retried = 0
        self.throttled = 0
        self.rejected = 0
        self.failed = 0
        self.dropped = 0

    @property
    def durable(self) -> bool:
        return self._outbox.durable

    @property
    def deadline(self) -> float:
        return self._outbox.deadline

    @deadline.setter
    def deadline(self, value: float) -> None:
        # The outbox's: a write already waiting for another process's lock when shutdown
        # sets it gives up then, not at the end of the busy timeout.
        self._outbox.deadline = value

    def __repr__(self) -> str:
        return f"HttpSink(url={self._url!r}, api_key={mask_key(self._credentials.api_key)!r})"

    async def start(self) -> None:
        if self._transport is None and self._proxy is not None:
            try:
                self._transport = httpx.HTTPTransport(
                    limits=httpx.Limits(
                        max_connections=self._concurrency,
                        max_keepalive_connections=self._concurrency,
                    ),
                    proxy=self._proxy,
                )
            except (ValueError, ImportError) as exc:
                # A proxy httpx cannot use (an unknown scheme; SOCKS without socksio)
                # must not stop delivery: the worker would die with it.
                self._log_once(
                    "proxy",
                    "the proxy %r from the environment cannot be used (%s); connecting to the "
                    "AgentSight API directly",
                    _without_password(self._proxy),
                    exc,
                    level="warning",
                )
        if self._transport is None:
            self._direct = Http11Pool(
                self._url,
                headers=self._headers,
                max_connections=self._concurrency,
                timeout=self._timeout,
            )
        else:
            self._http = self._transport
            self._pool = DaemonThreads(self._concurrency, "agentsight-http")
        # Long-lived senders rather than a task per event: a task costs more to
        # create and finish than llhttp takes to parse the answer.
        self._tasks.append(asyncio.get_running_loop().create_task(self._tick()))
        self._add_senders(min(self._concurrency, _FIRST_SENDERS))

    def _add_senders(self, n: int) -> None:
        loop = asyncio.get_running_loop()
        self._tasks.extend(loop.create_task(self._sender()) for _ in range(n))
        self._senders += n

    def _grow(self) -> None:
        """Double the senders (up to ``concurrency``) when, since the last look, the API
        accepted events, the last claim found as much work as it could take, and all
        senders are now waiting for answers: a slow API, not a sick one.

        Evidence from claims rather than the outbox's depth: rows waiting for their
        retry time, or behind their conversation's event in flight, are no work for
        another sender. An API that accepts nothing (hanging, failing) gets no more
        connections than it has. A 429 pause needs no test: paused senders are not busy.
        """
        claims_full = self._claims_full
        # The pool's count moves as answers arrive, the sink's once a pipeline is over.
        progress = self._direct.accepted if self._direct is not None else self.sent
        accepted, self._sent_at_last_look = progress - self._sent_at_last_look, progress
        senders = self._senders
        if senders < self._concurrency and self._busy >= senders and claims_full and accepted:
            self._add_senders(min(senders, self._concurrency - senders))

    @property
    def _in_flight(self) -> int:
        """Events in requests now."""
        # A copy first, in one C call: stats() reads it from the app's threads while the
        # worker's loop changes the dict.
        return sum(len(flight.items) for flight in list(self._flying.values()))

    def _in_requests(self) -> int:
        """Events in requests now, but those of requests written more than :data:`_BURST_SPAN`
        ago and not yet out :data:`_LATE_TIMES` their expected time (one out longer says the
        API has slowed: it counts again). Expected: read late, or from a measured pace (see
        _expected). A distant API has its stream's requests out for a round trip (50 events
        at 1,000 events/s 50 ms away): counted, every claim was a burst, and spread."""
        now = time.perf_counter()
        return sum(
            len(flight.items)
            for flight in list(self._flying.values())
            if not (expected := flight.read_late or flight.expected)
            or not _BURST_SPAN <= now - flight.began <= _LATE_TIMES * expected
        )

    def _expected(self, n: int) -> float:
        """How long a pipeline of ``n`` requests is expected to take: to its first answer, and
        the spacing of the others (see _timed); 0.0 when not measured lately."""
        now = time.perf_counter()
        if now - self._first_answer_at > _PACE_KEPT:
            return 0.0
        if n == 1:
            return self._first_answer
        if now - self._spacing_at > _PACE_KEPT:
            return 0.0
        return self._first_answer + (n - 1) * self._spacing

    def _depth(self) -> int:
        """Events one sender takes at a time: one request each, written at once (pipelined)
        when the direct pool can."""
        return self._direct.depth if self._direct is not None else 1

    def _fast_depth(self, depth: int) -> int:
        """Requests one connection may carry at once with answers as closely spaced as they
        come now (see :data:`_PIPELINE_BUDGET`; ``depth`` at most), or 0 (the even spread):
        not measured lately, spaced wider than that, or a pipeline still out well past the
        average (an API that has just slowed down or hung). While the spacing is not known,
        one short pipeline at a time measures it."""
        now = time.perf_counter()
        took = self._pipeline_time
        if now - self._paced_at > _PACE_KEPT:
            return 0
        measuring = now - self._spacing_at > _PACE_KEPT
        if measuring:
            fast = _FIRST_PIPELINE if took <= _PIPELINE_BUDGET else _FIRST_PIPELINE_SLOW
        else:
            # A request adds no more than a whole pipeline takes: a figure from one slow
            # pipeline must not keep pipelines at one request (and unmeasured) for _PACE_KEPT.
            fast = int(_PIPELINE_BUDGET / max(min(self._spacing, took), 1e-6))
        fast = min(depth, fast)
        if fast < 2:
            # No pipeline: no need to walk the requests out (64 of them, at each claim, to
            # an API that is slow per request).
            return 0
        overdue = now - max(_OVERDUE_TIMES * took, _OVERDUE_LEAST)
        for flight in self._flying.values():
            if flight.began < overdue:
                return 0
            if measuring and len(flight.items) > 1:
                return 0  # the pipeline that measures it is out
        return fast

    def _even_share(self, depth: int) -> int:
        """Requests one sender may write at once now: ``depth`` at most, and no more than
        the events in the outbox (in flight included) spread over ``concurrency`` connections.

        A server answers one connection's requests one after the other: 16 pipelined on
        each of the first senders take 16 round trips, while the senders that growth
        adds later (see _grow) would find nothing left. Spread over every connection
        allowed, a burst waits in the outbox for them instead; a backlog deep enough for
        full pipelines on all of them (a fast API that the sender's CPU cannot keep up
        with) still gets them."""
        if depth <= 1:
            return 1
        now = time.monotonic()
        if now - self._waiting_at >= _RECOUNT:
            self._waiting = self._outbox.depth_upto(depth * self._concurrency)
            self._waiting_at = now
        return max(1, min(depth, -(-self._waiting // self._concurrency)))

    def _timed(self, flight: _Flight, now: float) -> None:
        """Fold a pipeline's time into the average (see _fast_depth), when the API accepted
        all of it: errors can come fast from an API that is down (instant 503s), or slow
        from a timeout, and say nothing of how fast it stores events."""
        if flight.read_late or not all(map(_accepted, flight.results)):
            return
        took = now - flight.began
        self._pipeline_time = _moving_average(self._pipeline_time, took, self._paced_at, now)
        self._paced_at = now
        n = len(flight.items)
        first, last = flight.results[0], flight.results[-1]
        if isinstance(first, Reply) and isinstance(last, Reply) and first.at >= flight.began:
            # Read by the direct pool, as they came (answers read late come in one read).
            wait = first.at - flight.began
            # Answers read late come together: the worker's loop held off (the app's threads
            # holding the GIL, a slow outbox write) reads in one go answers the server spaced,
            # as close as a distant API's (an API taking 10-25 ms a request got pipelines of
            # 16). The last came no sooner than the quickest first answer of late plus the
            # spacing, whenever it was read: the first's wait over that counts as spacing.
            late = max(
                wait - min(self._first_least, self._first_least_before),
                self._held(flight, now),
                0.0,
            )
            if n == 1 or first.at != last.at:  # answers read together say nothing of it
                if now - self._first_least_at > _PACE_KEPT:  # a new window
                    stale = now - self._first_least_at > 2 * _PACE_KEPT
                    self._first_least_before = math.inf if stale else self._first_least
                    self._first_least, self._first_least_at = math.inf, now
                self._first_least = min(self._first_least, wait)
            if wait > max(_OVERDUE_TIMES * self._first_answer, _OVERDUE_LEAST):
                # Slower than it was: an API that has just slowed down may be slow per request
                # now. What a request adds is measured again before pipelines deepen.
                self._spacing_at = -math.inf
            self._first_answer = _moving_average(
                self._first_answer, wait, self._first_answer_at, now
            )
            self._first_answer_at = now
            if n > 1:
                spacing = min((last.at - first.at + late) / (n - 1), _SPACING_MOST)
                self._spacing = _moving_average(self._spacing, spacing, self._spacing_at, now)
                self._spacing_at = now
        if n > 1:
            self._per_request = _moving_average(
                self._per_request, took / n, self._per_request_at, now
            )
            self._per_request_at = now

    def _held(self, flight: _Flight, now: float) -> float:
        """The most the loop ran late while ``flight`` was out (see :data:`_LAG_PROBE`),
        its probe's resolution taken off; the probe overdue now counts."""
        return max(flight.lag - _TIMER_SLACK, now - self._lag_due - _TIMER_SLACK, 0.0)

    def _watch_lag(self) -> None:
        """Time the loop while a pipeline of two or more is out (see :data:`_LAG_PROBE`)."""
        if self._lag_timer is None:
            self._lag_due = time.perf_counter() + _LAG_PROBE
            self._lag_timer = asyncio.get_running_loop().call_later(_LAG_PROBE, self._lag_probe)

    def _lag_probe(self) -> None:
        now = time.perf_counter()
        lag = now - self._lag_due
        for flight in self._flying.values():
            if lag > flight.lag:
                flight.lag = lag
        self._lag_timer = None
        self._lag_due = math.inf
        if self._spaced:
            self._watch_lag()

    def _answer_time(self, n: int) -> float:
        """What each request of a pipeline of ``n`` is expected to add, for the pool to read
        its answers in one go (see ``Http11Pool.post_many``), or 0 (read as they come): for
        pipelines of :data:`READ_IN_ONE_GO` or more expected to take
        :data:`_READ_LATE_LEAST` to :data:`_READ_LATE_MOST`, while the API is fast (measured
        lately, see _fast_depth), but for one in :data:`_TIMED_ONE_IN`."""
        now = time.perf_counter()
        per_request = self._per_request
        if (
            n < READ_IN_ONE_GO
            # Marked read late, a pipeline read as it comes would go untimed, and count
            # otherwise towards a burst (see _in_requests): through a proxy (httpx), over
            # TLS, at shutdown (read_now), or for a while after a connection was lost while
            # answers were held back.
            or self._http is not None
            or (self._direct is not None and not self._direct.reads_late())
            or not _READ_LATE_LEAST <= n * per_request <= _READ_LATE_MOST
            or self._pipeline_time > _PIPELINE_BUDGET
            or now - self._paced_at > _PACE_KEPT
            or now - self._per_request_at > _PACE_KEPT
        ):
            return 0.0
        self._read_late_count += 1
        if self._read_late_count % _TIMED_ONE_IN == 0 or now - self._paced_at > _TIMED_WITHIN:
            return 0.0
        return per_request

    async def _post_many(
        self, bodies: list[bytes], results: list[Reply | Exception], answer_time: float = 0.0
    ) -> list[Reply | Exception]:
        """One result per body, appended to ``results`` as they come."""
        if self._direct is not None:
            return await self._direct.post_many(bodies, results, answer_time)
        for body in bodies:
            try:
                results.append(await self._post(body))
            except httpx.HTTPError as exc:
                results.append(exc)
        return results

    async def _post(self, body: bytes) -> Reply:
        if self._direct is not None:
            return await self._direct.post(body)
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, self._post_blocking, body
        )

    def _post_blocking(self, body: bytes) -> Reply:
        """One POST through httpx's transport, run in a sender thread."""
        assert self._http is not None
        request = httpx.Request(
            "POST", self._url, headers=self._headers, content=body,
            extensions={"timeout": self._timeouts},
        )  # fmt: skip
        response = self._http.handle_request(request)
        try:
            content = response.read()
        finally:
            response.close()
        headers = [(key.lower(), value) for key, value in response.headers.raw]
        return Reply(response.status_code, headers, content)

    async def put(self, payloads: list[dict[str, Any]]) -> None:
        items = []
        views: list[bool] = []
        # Each event's request time, for a durable outbox's chats (see outbox.put).
        times: list[float] = []
        durable = self._outbox.durable
        for payload in payloads:
            try:
                body, note = _event_json(payload)
            except Exception as exc:
                self.failed += 1
                self._log_once("json", "an event could not be sent as JSON (%s); dropped", exc)
                continue
            if note is not None:
                self._log_once("json note", "%s", note, level="warning")
            items.append((payload["conversation_id"], body.encode()))
            view = payload.get("is_used") is False
            views.append(view)
            if durable:
                times.append(math.inf if view else _request_time(payload))
        try:
            accepted = await self._put_when_free(items, views, times)
        except Exception:
            # Kept nowhere (a full disk, an outbox another process holds past every try):
            # lost, as an event given up on is.
            self.failed += len(items)
            raise
        self._fresh += accepted
        if accepted < len(items):
            self.dropped += len(items) - accepted
            self._log_once(
                "full",
                "queue full: %d event(s) dropped (in-memory queue holds %d while the API is "
                "slow or unreachable; pass outbox='path.sqlite3' to keep every event on disk)",
                len(items) - accepted,
                self._outbox.depth(),
                level="warning",
            )
        # A sender for each event, or, with pipelines as fast as now, for each pipeline's
        # worth: the others would only wake to find the work taken (the woken sender rings
        # for what it leaves).
        fast = self._pipeline
        self._bell.ring(-(-len(items) // fast) if fast > 1 else len(items))
        settling = len(views) - sum(views)
        if settling and self._outbox.durable:
            # Chats wait SETTLE in a durable outbox for their page view (see outbox._CLAIM):
            # a sender is woken when they may go, not left to the next poll.
            asyncio.get_running_loop().call_later(SETTLE, self._bell.ring, settling)
        idle_tick, self._idle_tick = self._idle_tick, None
        if idle_tick is not None:
            resolve(idle_tick)

    async def _put_when_free(
        self, items: list[tuple[str, bytes]], views: list[bool], times: list[float]
    ) -> int:
        """``outbox.put(items)``, tried again while another process holds a durable outbox's
        write lock past SQLite's busy timeout (a backup, a VACUUM, a sqlite3 shell left in a
        transaction): the batch waits, as the local store's does, instead of being lost.
        Events meanwhile wait in the worker's bounded intake. No try waits past
        ``deadline`` (shutdown's)."""
        for attempt in range(1, _LOCKED_TRIES + 1):
            left = self.deadline - time.monotonic()
            try:
                return self._outbox.put(
                    items, None if left == math.inf else max(left, 0.0), views, times
                )
            except sqlite3.OperationalError as exc:
                if not is_locked(exc) or attempt == _LOCKED_TRIES:
                    raise
                left = self.deadline - time.monotonic()
                if left <= 0:
                    raise
                if attempt == 1:
                    logger.warning(
                        "the outbox is locked by another process (%s); the events wait and "
                        "are written when it is free",
                        exc,
                    )
                await asyncio.sleep(min(backoff(attempt, cap=5.0), left))
        raise AssertionError("unreachable")  # the last try returns or raises

    def backed_up(self) -> bool:
        """True while enough events are built and waiting to keep every sender busy.

        Sending then comes first: the worker builds no more until the senders
        have caught up, and events wait unbuilt (and bounded) in the intake. A
        durable outbox takes everything at once: on disk is the point of it.
        """
        if self._outbox.durable:
            return False
        rounds = (
            4 * max(self._senders, 1) * (self._direct.max_depth if self._direct is not None else 1)
        )
        return self._outbox.depth() >= min(self._max_pending, rounds)

    async def _tick(self) -> None:
        """Now and then, one sender looks for work nobody announced: rows whose retry
        time came, or rows another process put into a shared outbox file."""
        loop = asyncio.get_running_loop()
        while True:
            outbox = self._outbox
            if outbox.durable or outbox.depth() or self._busy or self._ready:
                await asyncio.sleep(_POLL)
            else:
                self._idle_tick = idle_tick = loop.create_future()
                try:
                    await park(idle_tick, _IDLE_POLL)
                finally:
                    self._idle_tick = None
                continue
            try:
                self._grow()
            except Exception as exc:  # this task must outlive anything: it is the poll
                self._log_once("grow", "could not add delivery senders: %r", exc)
            if self._acks and not self._ack_flush_due:
                self._flush_acks()  # acknowledgements held since a failed write: again
            try:
                self._renew_leases()
            except Exception as exc:
                # Not renewed, a lease runs out as it would have: another claim may then
                # send its event a second time, which the API absorbs (same id).
                self._log_once("renew", "could not renew the leases of events in flight: %r", exc)
            self._bell.ring(1)

    def _renew_leases(self) -> None:
        """Past half their lease, the claims of events still in flight or waiting for a
        sender are renewed (one transaction), so no other claim can take them meanwhile."""
        lease = self._outbox.lease
        if lease is None:
            return
        now = time.time()
        old = now - lease / 2
        stale = [
            item
            for flight in self._flying.values()
            for item in flight.items
            if item.leased_at < old
        ]
        stale += [item for item in self._ready if item.leased_at < old]
        # Accepted, their acknowledgement held since a failed write: not to be sent again.
        stale += [item for item in self._acks if item.leased_at < old]
        if stale:
            self._outbox.renew(stale, now)

    async def _sender(self) -> None:
        ready, bell, outbox = self._ready, self._bell, self._outbox
        # A flag as well as cancel(): a cancellation must not be taken for an outcome.
        while not self._closing:
            now = time.time()
            if now < self._paused_until:
                left = self._pause_ends - time.monotonic()
                if left <= 0:
                    self._paused_until = now  # over, whatever the wall clock says
                    continue
                await asyncio.sleep(min(self._paused_until - now, left))
                continue
            # Half-open after a pause: every sender firing its pipeline the moment a 429's
            # Retry-After ran out met an API still throttling with as many 429s (128 at
            # once). One request goes first; the others wait for its answer.
            probing = self._half_open
            if probing and self._probe is not None:
                # Shielded: a waiter cancelled at shutdown must not cancel it for the others.
                # Bounded: a probe that hangs (up to the request timeout, 15 s) must not
                # hold all delivery; past the wait, one more request goes alone.
                probe = self._probe
                try:
                    await bounded(asyncio.shield(probe), _PROBE_WAIT)
                except asyncio.TimeoutError:
                    if self._probe is probe:
                        self._probe = None
                        resolve(probe)  # the others wait for the next one
                continue
            items: list[OutboxItem] = []
            if time.monotonic() >= self.deadline:
                # Shutdown's deadline passed: each claim would wait for a locked file
                # again (0.1 s a try) and keep drain() from ending on time.
                await bell.wait()
                continue
            try:
                depth = 1 if probing else self._depth()
                if not ready:
                    fast = 0
                    if probing:
                        limit = 1
                    else:
                        fast = self._fast_depth(depth)
                        share = self._even_share(depth)
                        # Fast answers pipeline the usual stream, not a burst (more than two
                        # pipelines' worth put since the last claim or in requests): a burst
                        # is spread all the same, in case the API has slowed since it was
                        # last timed, however many puts it came in. Not what waits: rows
                        # waiting for a retry, or another process's in a shared outbox, are
                        # no burst of this one's. Nor pipelines read late (see _answer_time)
                        # but those just written: a few ms out by design, they made the next
                        # look's put a burst, and a quarter of the steady stream went one
                        # request a connection; puts in quick succession are one burst all
                        # the same (in small puts, into an API that has just slowed).
                        # (Counted only when it matters: with 64 senders waiting on a slow
                        # API, a walk over every request for each claim.)
                        if fast and self._fresh + self._in_requests() > 2 * depth:
                            fast = 0
                        self._fresh = 0
                        # Only as many as the free senders take: a claimed row waiting here
                        # would be holding its lease (a shared outbox's guard against double
                        # sends) while time runs.
                        limit = (self._senders - self._busy) * max(share, fast)
                    claimed = outbox.claim(limit, now)
                    if not claimed:
                        await bell.wait()
                        continue
                    if not probing:
                        # Until a claim finds less than it could take: a sender busy with a
                        # long pipeline claims rarely, and the backlog it left is still there.
                        self._claims_full = len(claimed) >= limit
                        self._pipeline = fast
                        self._share = max(share, fast)
                    ready.extend(claimed)
                # Spread over the free senders first, one connection each, and pipeline
                # only the rest, up to the even share: a server answers a connection's
                # requests one after the other, so its connections, not a pipeline's depth,
                # are its parallelism. Unless a request adds so little to a pipeline that
                # one connection's is over within the budget of its first answer.
                free = max(self._senders - self._busy, 1)
                waiting = len(ready)
                spread = min(waiting, max(-(-waiting // free), self._pipeline))
                take = min(depth, self._share, spread)
                items = [ready.popleft() for _ in range(take)]
                if ready and not probing:
                    bell.ring(min(free - 1, len(ready)))  # the others are for senders that wait
                sent_alone: asyncio.Future[None] | None = None
                if probing:
                    sent_alone = self._probe = asyncio.get_running_loop().create_future()
                self._busy += 1
                # perf_counter: monotonic() ticks every 15.6 ms on Windows.
                flight = self._flying[id(items)] = _Flight(items, time.perf_counter())
                try:
                    await self._send_many(flight)
                    self._timed(flight, time.perf_counter())
                finally:
                    self._busy -= 1
                    del self._flying[id(items)]
                    if sent_alone is not None:
                        self._end_probe(sent_alone, flight.results)
            except Exception as exc:
                # A sender that died here would take a share of the delivery capacity
                # with it, silently, and leave its events claimed (and their conversations
                # stuck) for good: the outbox failing, a handler's bug.
                self._log_sender_error(exc)
                for item in items:
                    self._release(item, backoff(item.attempts + 1))
                await asyncio.sleep(_POLL)

    def _log_sender_error(self, exc: Exception) -> None:
        if isinstance(exc, sqlite3.OperationalError) and is_locked(exc):
            # Another process holding the outbox file (a backup, a VACUUM, a sqlite3 shell)
            # past the busy timeout: expected, and what it stopped is tried again.
            self._log_once(
                "sender locked",
                "the outbox is locked by another process (%s); delivery goes on when it is free",
                exc,
                level="warning",
            )
        else:
            self._log_once(
                "sender", "unexpected error in the delivery sender: %r", exc, level="error"
            )

    def _end_probe(self, probe: asyncio.Future[None], results: list[Reply | Exception]) -> None:
        """The request sent first after a pause is over: the others go on waiting for the
        next one, or, once it got an answer that set no new pause, they all resume."""
        if self._probe is probe:
            self._probe = None
        # No answer at all (a refused connection, a timeout) says nothing of the pause's
        # cause: the next request goes alone again.
        if any(isinstance(r, Reply) for r in results) and time.time() >= self._paused_until:
            self._half_open = False
        resolve(probe)

    def _held_until(self) -> float:
        """When an event a pause held back is due again. In memory, at any time: the pause
        holds this process's senders, on both clocks, and a wall-clock time kept with the
        event outlasted the pause by any step back of that clock. In a durable outbox, at
        the pause's end: the row is read by the other processes sharing the file, and by
        the next start, which no pause of this process holds (due at once, they sent it
        into the 429's Retry-After)."""
        return self._paused_until if self._outbox.durable else 0.0

    def _pause(self, until: float) -> None:
        """No request before ``until`` (time.time()), then one alone (see _sender)."""
        self._paused_until = max(self._paused_until, until)
        self._pause_ends = max(self._pause_ends, time.monotonic() + until - time.time())
        self._half_open = True

    def _release_unsent(self, item: OutboxItem) -> None:
        try:
            self._outbox.release(item)
        except Exception as exc:
            self._log_once("release", "could not give an event back to the outbox: %r", exc)
            return
        self._bell.ring(1)

    def _release(self, item: OutboxItem, delay: float) -> None:
        """Give a claimed item back for a later attempt, whatever state the outbox is in."""
        try:
            self._outbox.retry(item, time.time() + delay)
        except Exception as exc:
            # The item stays claimed here; a durable outbox's lease runs out and it is
            # sent again later, the memory outbox keeps it blocked until restart.
            self._log_once("release", "could not give an event back to the outbox: %r", exc)

    async def _send_many(self, flight: _Flight) -> None:
        """Send a pipeline's events and see to each one's outcome; their results, in order,
        fill ``flight.results``."""
        items, results = flight.items, flight.results
        answer_time = self._answer_time(len(items))
        flight.read_late = answer_time * len(items)
        spaced = not answer_time and len(items) > 1
        if not answer_time:
            flight.expected = self._expected(len(items))
        if spaced:
            self._spaced += 1
            self._watch_lag()
        try:
            await self._post_many([item.body for item in items], results, answer_time)
        except asyncio.CancelledError:
            # Shutting down mid-pipeline: what the API has already accepted is marked
            # so (a durable outbox would send it again at the next start otherwise).
            for item, result in zip(items, results, strict=False):
                if _accepted(result):
                    self._outcome(item, result)
            # The rest are written, or may be (a pipeline goes out at once), and unanswered:
            # the API may still store them, so they must not be handed to another process.
            self._unanswered += items[len(results) :]
            raise
        except Exception as exc:
            del results[len(items) :]
            results += [exc] * (len(items) - len(results))
        finally:
            if spaced:
                self._spaced -= 1
        for item, result in zip(items, results, strict=True):
            try:
                self._outcome(item, result)
            except Exception as exc:
                # One event's bookkeeping failing (the outbox) must not leave the others
                # of its pipeline claimed for ever.
                self._log_sender_error(exc)
                self._release(item, backoff(item.attempts + 1))

    def _outcome(self, item: OutboxItem, result: Reply | Exception) -> None:
        if isinstance(result, NotSent):
            if isinstance(result, ClosedUnannounced) and item.id in self._resent:
                # Once, not again: an event on which the server closes the connection (a
                # worker crashing on it, a firewall) would otherwise go out on every
                # kept-alive connection in turn, uncounted, without a pause.
                self._resent.discard(item.id)
                self._retry(item, str(result), "NotSent")
                return
            if isinstance(result, ClosedUnannounced):
                if len(self._resent) >= _RESENT_KEPT:
                    self._resent.clear()
                self._resent.add(item.id)
            # Unanswered for what came before it on its connection: back to the outbox
            # as it was (its lease given back, no attempt counted), claimable at once.
            self._release_unsent(item)
        elif (
            # ProxyError: the proxy could not connect to the API for us (a CONNECT answered
            # 502/503), the same outage seen through HTTPS_PROXY.
            isinstance(result, (httpx.ConnectError, httpx.ConnectTimeout, httpx.ProxyError))
            and not self._closing
        ):
            self._unreachable(item, result)
        elif isinstance(result, httpx.HTTPError):
            self._retry(
                item,
                _described(result),
                _failure_kind(result),
                # No answer in time: the server may still be working through it (and
                # through what was written behind it). Sent again at once, a conversation's
                # next event could overtake the stale copy: not before as long again.
                at_least=self._timeout if _maybe_processed(result) else 0.0,
            )
        elif isinstance(result, Exception):
            if self._closing:
                return  # shutting down (the executor is gone): a durable outbox keeps it
            # Anything else must not leave the event claimed for ever (its
            # conversation's later events wait behind it): retried like an outage.
            self._log_once(
                "unexpected", "unexpected error sending an event: %r", result, level="warning"
            )
            self._retry(item, f"{type(result).__name__}: {result}", "unexpected")
        else:
            reply = result
            self._unreachable_run = self._connect_failures = 0
            self._answered_at = time.monotonic()
            outcome = classify(reply.status, reply.body)
            if outcome == ACCEPTED:
                if _is_api_answer(reply.body):
                    self._ack(item)
                    self.sent += 1
                    self._elsewhere_run = 0
                    self._failing = False
                    if self._outage and time.monotonic() - self._last_failure >= _QUIET:
                        self._recovered()
                else:
                    # A wrong endpoint (a site's catch-all page, a captive portal) that
                    # answers 200: the events were not recorded, so they are kept.
                    self._elsewhere(
                        item,
                        reply,
                        " with something other than the AgentSight API's answer (a JSON "
                        "object with an id)",
                    )
            elif outcome == ELSEWHERE:
                location = reply.header(b"location")
                redirect = f" (redirecting to {location[:200]})" if location else ""
                self._elsewhere(
                    item,
                    reply,
                    f"{redirect}: that is not the AgentSight API's conversations endpoint",
                )
            elif outcome == THROTTLED:
                self._failure()
                self.throttled += 1
                wait = retry_after(reply.header(b"retry-after"), now=time.time())
                self._pause(time.time() + wait)
                # Pacing, not a failure: no attempt counted (the memory outbox gives up
                # after a few), and no backoff grown by it.
                self._outbox.defer(item, self._held_until())
                self._log_once(
                    "429",
                    "the AgentSight API is throttling (429); pausing delivery for %.1f s",
                    wait,
                    level="warning",
                )
            elif outcome == RETRY:
                self._retry(item, _status_text(reply.status), f"HTTP {reply.status // 100}xx")
            else:
                assert outcome == REJECTED
                self._reject(item, reply)

    def _unreachable(self, item: OutboxItem, error: httpx.HTTPError) -> None:
        """No connection to the API could be made: nothing of ``item`` was written, and the
        next event would meet the same. Each event trying on its own (as it did) cost the
        app's process a connection attempt per event and retry, ~0.5 ms of CPU each (16 %
        of a core at 1,000 events/s while the API was down, twice what delivering costs),
        and gave up on each after a few: delivery pauses instead, growing, one connection
        tries after each pause (see _sender), and the event waits with no attempt counted
        (in memory up to queue_size, as for a wrong endpoint)."""
        self._failure()
        self._failing = True
        self.retried += 1
        self._resent.discard(item.id)
        now = time.time()
        self._connect_failures += 1
        if (
            now >= self._paused_until
            and self._connect_failures < _UNREACHABLE_RUN
            and time.monotonic() - self._answered_at < _ANSWERED_WITHIN
        ):
            # The API answers the other connections: this one's failure, not the API's.
            # One refused connect in 20 paused all delivery 0.25-0.5 s each time: with a
            # new connection a request, 300 events/s fell to ~45.
            self._outbox.defer(item, now + backoff(1, base=_UNREACHABLE_FIRST))
        else:
            # The senders that were connecting when the first one failed fail alike: only
            # a failure once the pause is over (the request that went alone) makes it
            # longer.
            if now >= self._paused_until:
                self._unreachable_run += 1
                self._pause(
                    now
                    + backoff(self._unreachable_run, base=_UNREACHABLE_FIRST, cap=_UNREACHABLE_CAP)
                )
            self._outbox.defer(item, self._held_until())
        kind = _failure_kind(error)
        reason = _described(error)
        kept = " in the outbox" if self._outbox.durable else _KEPT
        if kind == "certificate":
            # Not an outage: this machine's trust or the endpoint is to fix (said at ERROR).
            self._log_once(
                ("retry", kind),
                "the AgentSight API's TLS certificate is not trusted here (%s): check the "
                "endpoint, or the CA certificates of this machine; delivery pauses (up to %g s "
                "at a time) and the events are kept%s",
                reason,
                _UNREACHABLE_CAP,
                kept,
            )
            return
        self._log_once(
            ("retry", kind),
            "the AgentSight API is unreachable (%s); delivery pauses (up to %g s at a time) "
            "and the events are kept%s",
            reason,
            _UNREACHABLE_CAP,
            kept,
            level="warning",
        )

    def _elsewhere(self, item: OutboxItem, reply: Reply, what: str) -> None:
        """Something other than the API answered. Once several events in a row got such an
        answer with none accepted between (a wrong endpoint), delivery pauses, and no attempt
        is counted: the events are not at fault, and the in-memory outbox would give up on
        them. Before that (a proxy or firewall refusing one event), it is this event's
        failure: counted and backed off like any, so that it neither holds up the rest nor
        stays for ever. ``what`` says what the answer was, for the log."""
        self._log_once(
            "not the API",
            "%s answered %d%s; check the endpoint (while every event gets such an answer, "
            "delivery pauses %g s at a time and the events are kept%s)",
            self._url,
            reply.status,
            what,
            _ELSEWHERE_PAUSE,
            " in the outbox" if self._outbox.durable else _KEPT,
        )
        self._elsewhere_run += 1
        if self._elsewhere_run < _ELSEWHERE_RUN:
            self._retry(item, f"HTTP {reply.status}, not the AgentSight API", None)
            return
        self._keep_and_pause(item)

    def _keep_and_pause(self, item: OutboxItem) -> None:
        """Give ``item`` back with no attempt counted, and pause delivery _ELSEWHERE_PAUSE:
        the setup (endpoint, key) is at fault, not the event."""
        now = time.time()
        self._pause(now + _ELSEWHERE_PAUSE)
        # The pause is this process's: the row itself is due again at once, so that a
        # process started with the setup fixed (sharing a durable outbox) sends it.
        self._outbox.defer(item, now)
        self._resent.discard(item.id)
        self._failure()
        self.retried += 1

    def _failure(self) -> None:
        """An attempt failed or was throttled: an outage, or more of the one going on."""
        now = time.monotonic()
        if not self._outage:
            self._outage = True
            self._outage_began = now
            self._outage_counts = (self.retried, self.throttled)
        self._last_failure = now

    def _recovered(self) -> None:
        """An event accepted after a minute without failures: the outage is over. Said,
        and the next one is logged again (a 2 % failure rate is one outage, not many).
        At the level its failures were said at: a log kept at WARNING that showed the
        outage begin must show it end."""
        self._outage = False
        self._logged -= {
            key for key in self._logged if isinstance(key, tuple) and key[0] == "retry"
        }
        # A refused key (401/403) is an outage's failure too: refused again after the
        # key was fixed, it is said again (it was silent for the process's lifetime).
        self._logged -= {"429", "failed", "not the API", 401, 403}
        retried, throttled = self._outage_counts
        level = logging.WARNING if self._warned else logging.INFO
        self._warned = False
        logger.log(
            level,
            "the AgentSight API accepts events again (no failure in the last %.0f s; the "
            "failures lasted %.0f s: %d attempts retried, %d throttled)",
            time.monotonic() - self._last_failure,
            self._last_failure - self._outage_began,
            self.retried - retried,
            self.throttled - throttled,
        )

    def _ack(self, item: OutboxItem) -> None:
        self._resent.discard(item.id)
        if not self._outbox.durable:
            self._outbox.ack([item])
            return
        # On disk, each acknowledgement alone is a transaction (a quarter of the
        # worker's CPU per event); the ones of one loop iteration share one. A flag, not
        # "none held": acks held after a failed write must not stop later ones.
        if not self._ack_flush_due:
            self._ack_flush_due = True
            asyncio.get_running_loop().call_soon(self._flush_acks)
        self._acks.append(item)

    def _flush_acks(self) -> None:
        self._ack_flush_due = False
        if self._acks and time.monotonic() >= self.deadline:
            # Past shutdown's deadline each try waits for a locked file once more (0.1 s,
            # one per answered pipeline: close() ran 0.4-0.7 s past its ~1.3 s); they are
            # written once, with their grace, by _cancel_senders, which raises the deadline.
            return
        acks, self._acks = self._acks, []
        if acks:
            try:
                self._outbox.ack(acks)
            except Exception as exc:
                # Kept for the next try; if none succeeds, the rows stay on disk, leased,
                # and are sent again when the lease runs out.
                self._acks = acks + self._acks
                self._log_once("ack", "could not mark %d sent event(s) in the outbox: %r",
                               len(acks), exc)  # fmt: skip
                return
            # Each acknowledged row may have a next event of its conversation behind it,
            # which no claim could take before the row was gone.
            self._bell.ring(len(acks))

    def _retry(
        self, item: OutboxItem, reason: str, kind: str | None, *, at_least: float = 0.0
    ) -> None:
        """A failed attempt: ``item`` again after a backoff (or given up, in memory).
        ``kind`` names the failure for the log (one warning per kind and outage), None
        when the caller has logged it."""
        self._failure()
        self._failing = True
        self._resent.discard(item.id)
        if not self._outbox.durable and item.attempts + 1 >= self._max_attempts:
            self._outbox.discard(item)
            self.failed += 1
            self._log_once(
                "failed",
                "gave up on an event after %d attempts (%s); pass outbox='path.sqlite3' to keep "
                "events on disk until the API is back",
                self._max_attempts,
                reason,
            )
            return
        self.retried += 1
        self._outbox.retry(item, time.time() + max(backoff(item.attempts + 1), at_least))
        if kind == "certificate":
            self._log_once(
                ("retry", kind),
                "the AgentSight API's TLS certificate is not trusted here (%s): check the "
                "endpoint, or the CA certificates of this machine; the events are kept and "
                "sent again",
                reason,
            )
        elif kind is not None and kind.startswith("HTTP "):
            # It answered: reachable, but failing or unavailable (a 503 during a deploy).
            self._log_once(
                ("retry", kind),
                "the AgentSight API answered %s; retrying with backoff",
                reason,
                level="warning",
            )
        elif kind is not None:
            # Connected, then no (whole) answer: a timeout, a cut-off or dropped answer. Not
            # "unreachable", which names a connection that cannot be made (see _unreachable),
            # and sends an operator to check the network, DNS and firewall for an API that hangs.
            self._log_once(
                ("retry", kind),
                "a request to the AgentSight API got no answer (%s); retrying with backoff",
                reason,
                level="warning",
            )

    def _reject(self, item: OutboxItem, reply: Reply) -> None:
        status = reply.status
        if status in (401, 403) and self._outbox.durable:
            # The key is at fault, not the event: on disk the event waits for a fixed key
            # (the next start, or a sibling process with another key) instead of being
            # deleted.
            self._log_once(
                status,
                "the AgentSight API refused the API key %s (%d: %s); the events are kept in "
                "the outbox until the key is fixed (delivery pauses %g s at a time)",
                mask_key(self._credentials.api_key),
                status,
                _api_error(reply),
                _ELSEWHERE_PAUSE,
            )
            self._keep_and_pause(item)
            return
        self._outbox.discard(item)
        self.rejected += 1
        if status in (401, 403):
            # An outage's failure (README, Failures): its end is said once the fixed key's
            # events are accepted, and a later refusal is said again.
            self._failure()
            self._log_once(
                status,
                "the AgentSight API refused the API key %s (%d: %s); events are dropped until "
                "the key is fixed",
                mask_key(self._credentials.api_key),
                status,
                _api_error(reply),
            )
        else:
            self._log_once(
                status,
                "the AgentSight API rejected an event (%d: %s); it will not be retried",
                status,
                _api_error(reply),
            )

    def _log_once(self, key: Any, message: str, *args: Any, level: str = "error") -> None:
        if key in self._logged:
            logger.debug(message, *args)
            return
        self._logged.add(key)
        if level in ("warning", "error"):
            # Said where a WARNING-level log shows it: so is the outage's end (_recovered).
            self._warned = True
        getattr(logger, level)(message, *args)

    async def drain(self, deadline: float, *, closing: bool = False) -> int:
        """Wait until this process's events are delivered, or until none of them can be
        before ``deadline`` (monotonic); how many of them are left.

        Events of other processes sharing a durable outbox are theirs to wait for, and an
        event waiting for its retry (or for a pause) past the deadline will not go sooner.
        At shutdown (``closing``) with a durable outbox, only requests in flight are waited
        for while delivery is failing (its last attempt failed): the rest is safe on disk,
        and a recycled worker, a reloader's old process, must not stall for nothing. While
        the API accepts events, they go on being sent until the deadline: a process may
        have no next start (a scaled-down pod, a one-off job). Without one, events in
        memory are waited for, failing or not: they have nowhere else to go.
        """
        if closing and self._direct is not None:
            # A pipeline's answers are read in one go once most should be in: one cut off
            # by the deadline would leave some unread, its events unanswered (sent again at
            # the next start from a durable outbox, reported lost from memory).
            self._direct.read_now()
        while True:
            now = time.monotonic()
            until = time.time() + deadline - now  # the deadline on the outbox's clock
            # Acknowledgements are written a loop turn after the answers: rows already
            # accepted must not count as left.
            self._flush_acks()
            left, due = self._outbox.mine(until)
            if left == 0 and not self._flying:
                return 0
            if now >= deadline:
                if closing and self._flying and not self._answers_read:
                    # Counted now, events already answered would be reported lost: those
                    # whose answers wait in the sockets, and those a pipeline still out
                    # has had answered. Both are acknowledged by reading, then cancelling,
                    # as aclose() would next; the count is taken again after it.
                    self._closing = True  # no sender claims more meanwhile
                    await self._read_answers_waiting()
                    await self._cancel_senders()
                    continue
                return left
            if not self._flying:
                if closing and self._outbox.durable and self._failing:
                    return left
                if not self._ready and (due == 0 or self._paused_until >= until):
                    return left
            await asyncio.sleep(0.01)

    async def _read_answers_waiting(self) -> None:
        """Read the answers already in the sockets, once: left unread when the pipelines are
        cancelled, their events would count as unanswered (and go again from a durable
        outbox at the next start). A few loop turns, a few ms at most."""
        self._answers_read = True
        if self._direct is not None and self._flying:
            self._direct.read_now()
            until = time.monotonic() + _READ_AT_CLOSE
            while self._flying and time.monotonic() < until:
                await asyncio.sleep(0)

    async def _cancel_senders(self) -> None:
        """Stop the senders (once); what pipelines still out have had accepted is
        acknowledged (see _send_many), the rest of them is unanswered."""
        if self._senders_cancelled:
            return
        self._senders_cancelled = self._closing = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # What the API accepted is recorded even when the deadline has passed, or the next
        # start sends it again: a short grace for that write alone.
        if self._acks:
            deadline = self.deadline
            self.deadline = max(deadline, time.monotonic() + _FINAL_GRACE)
            try:
                self._flush_acks()
            finally:
                self.deadline = deadline

    async def aclose(self) -> None:
        self._closing = True
        if not self._answers_read:
            await self._read_answers_waiting()
        await self._cancel_senders()
        if self._lag_timer is not None:
            self._lag_timer.cancel()
            self._lag_timer = None
        if self._pool is not None:
            # Sender threads finish their request (bounded by the timeout) on their own,
            # or are dropped at exit (daemon threads).
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self._http is not None:
            self._http.close()
        if self._direct is not None:
            self._direct.close()
        # Rows never written are handed back; unanswered ones wait as a timed-out request's
        # do (see _outcome) before anyone sends them again.
        self._outbox.close(self._unanswered, time.time() + self._timeout)

    def stats(self) -> dict[str, int]:
        try:
            pending, outbox_pending = self._outbox.counts()
        except Exception:
            pending = outbox_pending = -1  # stats() never fails
        return {
            "sent": self.sent,
            "retried": self.retried,
            "throttled": self.throttled,
            "rejected": self.rejected,
            "failed": self.failed,
            "dropped": self.dropped,
            "in_flight": self._in_flight,
            # How far delivery has grown towards ``concurrency`` (see _grow).
            "senders": self._senders,
            # This process's events not yet accepted by the API, and every event in a
            # shared outbox file (other processes' and earlier runs' too): one look.
            "pending": pending,
            "outbox_pending": outbox_pending,
        }
