"""A stand-in AgentSight API: a real local HTTP server for tests, demos and benchmarks.

It validates requests the way the AgentSight backend does (route, ``Api-Key``
authentication, JSON parsing, per-field conversation validation with errors in
Django REST framework shape), records everything it receives, and can inject
faults (errors, throttling, dropped connections, latency, hangs, an outage of some
seconds) so clients can be tested against the failure modes of the real service
without network access.

It serves on one asyncio event loop of its own (``_standin_server.py``), from a
test, or from the CLI (``agentsight-middleware standin --port 8765``), where the
faults are injected over HTTP, under ``/_standin/`` (see :meth:`StandInAgentSightAPI._control`).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import re
import secrets
import signal
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import FrameType, TracebackType
from typing import Any
from urllib.parse import parse_qsl

from ._standin_server import Answer, Request, Server

__all__ = [
    "API_KEY_PATTERN",
    "RecordedRequest",
    "StandInAgentSightAPI",
    "generate_api_key",
    "main",
]

#: The shape the AgentSight backend requires of an API key.
API_KEY_PATTERN = re.compile(r"^ags_[a-f0-9]{32}_[a-f0-9]{6}$", re.IGNORECASE)

CONVERSATIONS_PATH = "/api/conversations/"
TRACK_PATH = "/api/track/"
INGEST_PATH = "/api/ingest/"
_ROUTES = frozenset({CONVERSATIONS_PATH, TRACK_PATH, INGEST_PATH})
#: Where the stand-in takes its orders over HTTP (faults, summary): not API traffic.
CONTROL_PREFIX = "/_standin/"
#: Each order and the query parameters it takes.
_ORDERS: dict[str, frozenset[str]] = {
    "down": frozenset({"seconds", "status"}),
    "fail": frozenset({"n", "status"}),
    "throttle": frozenset({"n", "retry_after"}),
    "drop": frozenset({"n"}),
    "hang": frozenset({"n"}),
    "latency": frozenset({"seconds"}),
    "reset": frozenset(),
}

_STRING_FIELDS = (
    "conversation_id",
    "customer_id",
    "customer_ip_address",
    "device",
    "source",
    "language",
    "name",
    "environment",
)
_MAX_STRING_LENGTH = 255
_ENVIRONMENTS = frozenset({"production", "development", "prod", "dev"})

# How long stop() waits for the server's thread to close its connections; it
# normally takes microseconds.
_STOP_JOIN_SECONDS = 5.0

_REDACTED = "<redacted>"


def generate_api_key() -> str:
    """Return a fresh, well-formed (but fake) AgentSight API key."""
    return f"ags_{secrets.token_hex(16)}_{secrets.token_hex(3)}"


def _redact_headers(headers: dict[str, str]) -> dict[str, str]:
    return {k: (_REDACTED if k == "authorization" else v) for k, v in headers.items()}


@dataclass(frozen=True, repr=False)
class RecordedRequest:
    """One request as the stand-in received it.

    ``status`` is the status code answered, or ``0`` when the connection was
    dropped or hung by fault injection. ``json`` is the parsed body, or ``None``
    when the body is empty or not JSON.
    """

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    json: Any | None
    status: int
    received_at: float

    def __repr__(self) -> str:
        # The Authorization header carries the API key, and reprs end up in
        # assertion messages and logs.
        return (
            f"RecordedRequest(method={self.method!r}, path={self.path!r}, "
            f"status={self.status!r}, headers={_redact_headers(self.headers)!r}, "
            f"body={self.body[:200]!r}{'...' if len(self.body) > 200 else ''}, "
            f"received_at={self.received_at!r})"
        )


@dataclass(frozen=True)
class _Fault:
    kind: str  # "fail" | "throttle" | "drop" | "hang"
    status: int = 0
    retry_after: str = ""


# Sentinels: "body is not JSON" and "caller did not parse the body yet" (JSON
# ``null`` parses to None, so None cannot mean either).
_NOT_JSON = object()
_UNSET = object()


def _recorded(request: Request, status: int, parsed: object = _UNSET) -> RecordedRequest:
    if parsed is _UNSET:
        parsed = _parse_json(request.body) if request.body else _NOT_JSON
    return RecordedRequest(
        method=request.method,
        path=request.path,
        # Each record gets its own copy: callers may mutate what they read.
        headers=dict(request.headers),
        body=request.body,
        json=None if parsed is _NOT_JSON or isinstance(parsed, _JSONError) else parsed,
        status=status,
        received_at=request.received_at,
    )


@dataclass(frozen=True)
class _JSONError:
    message: str


def _parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        return _JSONError(str(exc))
    except RecursionError:
        return _JSONError("nested too deeply")


def _validate_track(data: Any) -> dict[str, list[str]]:
    if not isinstance(data, dict):
        return _not_a_dict(data)
    value = data.get("conversation_id")
    if "conversation_id" not in data:
        return {"conversation_id": ["This field is required."]}
    if value is None:
        return {"conversation_id": ["This field may not be null."]}
    if isinstance(value, str) and not value.strip():
        return {"conversation_id": ["This field may not be blank."]}
    return {}


def _not_a_dict(data: Any) -> dict[str, list[str]]:
    kind = type(data).__name__
    return {"non_field_errors": [f"Invalid data. Expected a dictionary, but got {kind}."]}


def _validate_conversation(data: Any) -> dict[str, list[str]]:
    """Return DRF-shaped field errors (empty when the conversation is valid)."""
    if not isinstance(data, dict):
        return _not_a_dict(data)
    errors: dict[str, list[str]] = {}

    for field in _STRING_FIELDS:
        value = data.get(field)
        if value is None:
            continue
        if not isinstance(value, str):
            errors[field] = ["Not a valid string."]
        elif len(value) > _MAX_STRING_LENGTH:
            errors[field] = [f"Ensure this field has no more than {_MAX_STRING_LENGTH} characters."]
        elif "\x00" in value:
            # Django REST framework's CharField runs ProhibitNullCharactersValidator.
            errors[field] = ["Null characters are not allowed."]

    if "conversation_id" not in errors:
        cid = data.get("conversation_id")
        if "conversation_id" not in data:
            errors["conversation_id"] = ["This field is required."]
        elif cid is None:
            errors["conversation_id"] = ["This field may not be null."]
        elif not cid.strip():
            errors["conversation_id"] = ["This field may not be blank."]

    if "environment" not in errors:
        env = data.get("environment")
        if "environment" not in data:
            errors["environment"] = ["This field is required."]
        elif env is None:
            errors["environment"] = ["This field may not be null."]
        elif env not in _ENVIRONMENTS:
            errors["environment"] = [f'"{env}" is not a valid choice.']

    ip = data.get("customer_ip_address")
    if "customer_ip_address" not in errors and ip is not None:
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            errors["customer_ip_address"] = ["Enter a valid IPv4 or IPv6 address."]

    metadata = data.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        kind = type(metadata).__name__
        errors["metadata"] = [f'Expected a dictionary of items but got type "{kind}".']

    if "is_used" not in data:
        errors["is_used"] = ["This field is required."]
    elif data["is_used"] is None:
        errors["is_used"] = ["This field may not be null."]
    elif not isinstance(data["is_used"], bool):
        errors["is_used"] = ["Must be a valid boolean."]

    timestamp = data.get("timestamp")
    if "timestamp" not in data:
        errors["timestamp"] = ["This field is required."]
    elif timestamp is None:
        errors["timestamp"] = ["This field may not be null."]
    elif not _is_iso_datetime(timestamp):
        errors["timestamp"] = [
            "Datetime has wrong format. Use one of these formats instead: "
            "YYYY-MM-DDThh:mm[:ss[.uuuuuu]][+HH:MM|-HH:MM|Z]."
        ]
    return errors


def _is_iso_datetime(value: object) -> bool:
    if not isinstance(value, str):
        return False
    # Python 3.10's fromisoformat() rejects the "Z" suffix that DRF accepts.
    if value[-1:] in ("Z", "z"):
        value = value[:-1] + "+00:00"
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return False
    return True


class StandInAgentSightAPI:
    """A local, real-HTTP stand-in for the AgentSight API.

    Use as a context manager (``with StandInAgentSightAPI() as api: ...``) or
    call :meth:`start` / :meth:`stop`. Point clients at :attr:`url` with
    :attr:`api_key`.
    """

    def __init__(
        self,
        *,
        api_keys: Iterable[str] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        keep: int | None = None,
    ) -> None:
        keys = [generate_api_key()] if api_keys is None else list(api_keys)
        if not keys:
            raise ValueError("api_keys must contain at least one key")
        for index, key in enumerate(keys):
            if not isinstance(key, str) or not API_KEY_PATTERN.match(key):
                # The key itself is deliberately not echoed.
                raise ValueError(
                    f"api_keys[{index}] is not a well-formed AgentSight API key "
                    "(expected ags_<32 hex>_<6 hex>)"
                )
        if keep is not None and keep < 1:
            raise ValueError(f"keep must be at least 1 (or None: keep all), got {keep}")
        self.api_key: str = keys[0]
        self._api_keys = frozenset(keys)
        # Recorded requests and bodies held at most (a long CLI run under load would
        # grow without end); summary()'s counts cover every request all the same.
        self._keep = keep
        self._host = host
        self._port = port
        # Reentrant so wait_for() predicates can read the snapshot properties
        # while the condition's lock is held.
        self._cond = threading.Condition(threading.RLock())
        self._requests: list[RecordedRequest] = []
        self._conversations: list[dict[str, Any]] = []
        self._messages: list[dict[str, Any]] = []
        self._ingested: list[RecordedRequest] = []
        # Runs of faults to come, [fault, how many]: "fail?n=1000000000" is one entry.
        self._faults: deque[list[Any]] = deque()
        self._faults_pending = 0
        self._latency = 0.0
        self._down_until = 0.0  # time.monotonic() until which every request fails
        self._down_fault = _Fault("fail", status=503)
        self._counts: Counter[int] = Counter()  # answers by status, 0 = none
        self._used: Counter[bool] = Counter()  # accepted conversations by is_used
        self._counts_messages = 0
        self._counts_ingested = 0
        self._next_conversation_id = 1
        self._next_message_id = 1
        self._server: Server | None = None
        self._url: str | None = None
        self._stopped = False

    def __repr__(self) -> str:
        state = "running" if self._server is not None else "stopped"
        where = f" url={self._url!r}" if self._url else ""
        return f"<StandInAgentSightAPI {state}{where}>"

    # -- lifecycle ------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL without trailing slash, e.g. ``http://127.0.0.1:54321``."""
        if self._url is None:
            raise RuntimeError("StandInAgentSightAPI is not started; call start() first")
        return self._url

    def start(self) -> StandInAgentSightAPI:
        if self._server is not None:
            return self
        if self._stopped:
            raise RuntimeError("a stopped StandInAgentSightAPI cannot be restarted")
        server = Server(self, self._host, self._port)
        server.start()
        host, port = server.address
        display_host = f"[{host}]" if ":" in host else host
        self._url = f"http://{display_host}:{port}"
        self._server = server
        return self

    def stop(self) -> None:
        """Stop serving, release hung requests and close every connection."""
        server = self._server
        if server is None:
            return
        self._server = None
        self._stopped = True
        server.stop(_STOP_JOIN_SECONDS)

    def __enter__(self) -> StandInAgentSightAPI:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- recorded state ---------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received (including rejected and faulted), oldest first."""
        with self._cond:
            return list(self._requests)

    @property
    def conversations(self) -> list[dict[str, Any]]:
        """Bodies of accepted ``/api/conversations/`` requests, in arrival order."""
        with self._cond:
            return list(self._conversations)

    @property
    def messages(self) -> list[dict[str, Any]]:
        """Bodies of accepted ``/api/track/`` requests, in arrival order."""
        with self._cond:
            return list(self._messages)

    @property
    def ingested(self) -> list[RecordedRequest]:
        """Accepted ``/api/ingest/`` requests (raw body and content-type kept)."""
        with self._cond:
            return list(self._ingested)

    def wait_for(
        self,
        predicate: Callable[[StandInAgentSightAPI], bool] | None = None,
        *,
        conversations: int | None = None,
        timeout: float = 5.0,
    ) -> None:
        """Block until ``predicate(self)`` holds and/or ``conversations`` were accepted.

        Raises AssertionError with a summary of what was received on timeout.
        """
        if predicate is None and conversations is None:
            raise ValueError("wait_for() needs a predicate and/or conversations=N")

        def satisfied() -> bool:
            # Counted, not the recorded list's length: keep= lets old ones go.
            if conversations is not None and self._accepted() < conversations:
                return False
            return predicate is None or bool(predicate(self))

        with self._cond:
            if self._cond.wait_for(satisfied, timeout):
                return
            raise AssertionError(self._timeout_summary(predicate, conversations, timeout))

    def _timeout_summary(
        self,
        predicate: Callable[[StandInAgentSightAPI], bool] | None,
        conversations: int | None,
        timeout: float,
    ) -> str:
        wanted: list[str] = []
        if conversations is not None:
            wanted.append(f"at least {conversations} accepted conversation(s)")
        if predicate is not None:
            name = getattr(predicate, "__qualname__", None) or repr(predicate)
            wanted.append(f"predicate {name} to be true")
        lines = [
            f"StandInAgentSightAPI.wait_for() timed out after {timeout:g}s waiting for "
            + " and ".join(wanted),
            f"got {self._accepted()} accepted conversation(s), "
            f"{self._counts_messages} message(s), {len(self._ingested)} ingest request(s) "
            f"kept, {sum(self._counts.values())} request(s) in total",
        ]
        shown = self._requests[-10:]
        if len(self._requests) > len(shown):
            lines.append(f"last {len(shown)} requests:")
        for req in shown:
            answer = str(req.status) if req.status else "no answer (fault)"
            lines.append(f"  {req.method} {req.path} -> {answer}: {req.body[:120]!r}")
        return "\n".join(lines)

    def _accepted(self) -> int:
        """Conversations accepted since the start or the last reset, kept or not."""
        return self._used[False] + self._used[True]

    def summary(self) -> dict[str, Any]:
        """Counts of everything received since the start (or the last :meth:`reset`),
        also when ``keep=`` lets older requests go: ``requests``, ``by_status`` (0: no
        answer, a dropped or hung request), ``initialized`` and ``used`` (accepted
        conversations by ``is_used``), ``messages``, ``ingested`` (``/api/ingest/``
        requests: all that the 0.1.x SDK, ``tracker=AgentSightSDK()``, sends); and the
        faults still to come."""
        with self._cond:
            down = max(0.0, self._down_until - time.monotonic())
            return {
                "requests": sum(self._counts.values()),
                "by_status": {str(status): n for status, n in sorted(self._counts.items())},
                "initialized": self._used[False],
                "used": self._used[True],
                "messages": self._counts_messages,
                "ingested": self._counts_ingested,
                "faults_pending": self._faults_pending,
                "down_for": round(down, 3),
                "latency": self._latency,
            }

    def reset(self) -> None:
        """Forget recorded traffic, pending faults and latency; release hung requests.

        Conversation and message ids keep increasing across resets, like a
        database sequence would.
        """
        with self._cond:
            self._requests.clear()
            self._conversations.clear()
            self._messages.clear()
            self._ingested.clear()
            self._faults.clear()
            self._faults_pending = 0
            self._latency = 0.0
            self._down_until = 0.0
            self._counts.clear()
            self._used.clear()
            self._counts_messages = 0
            self._counts_ingested = 0
            self._cond.notify_all()
        if self._server is not None:
            self._server.release()

    # -- fault injection ----------------------------------------------------

    def fail_next(self, n: int = 1, *, status: int = 503) -> None:
        """Answer the next ``n`` requests with ``status`` and a DRF-style detail."""
        if not 100 <= status <= 599:
            raise ValueError(f"status must be an HTTP status code, got {status}")
        self._add_faults(n, _Fault("fail", status=status))

    def throttle_next(self, n: int = 1, *, retry_after: str = "1") -> None:
        """Answer the next ``n`` requests with 429 and ``Retry-After: retry_after``."""
        if not retry_after or "\r" in retry_after or "\n" in retry_after:
            raise ValueError("retry_after must be a non-empty single-line header value")
        self._add_faults(n, _Fault("throttle", status=429, retry_after=retry_after))

    def drop_next(self, n: int = 1) -> None:
        """Read the next ``n`` requests, then close the connection without answering."""
        self._add_faults(n, _Fault("drop"))

    def hang_next(self, n: int = 1) -> None:
        """Never answer the next ``n`` requests (until stop() or reset())."""
        self._add_faults(n, _Fault("hang"))

    def set_latency(self, seconds: float) -> None:
        """Delay every answer by ``seconds`` (0 disables)."""
        if not (seconds >= 0 and math.isfinite(seconds)):
            raise ValueError(f"latency must be a number of seconds >= 0, got {seconds}")
        with self._cond:
            self._latency = float(seconds)

    def fail_for(self, seconds: float, *, status: int = 503) -> None:
        """An outage: answer every request with ``status`` for the next ``seconds``
        (a 429 with ``Retry-After: 1``); faults queued with the ``*_next`` methods go first.
        ``fail_for(0)`` ends one early."""
        if not (seconds >= 0 and math.isfinite(seconds)):
            raise ValueError(f"seconds must be a number >= 0, got {seconds}")
        if not 100 <= status <= 599:
            raise ValueError(f"status must be an HTTP status code, got {status}")
        fault = (
            _Fault("throttle", status=429, retry_after="1")
            if status == 429
            else _Fault("fail", status=status)
        )
        with self._cond:
            self._down_fault = fault
            self._down_until = time.monotonic() + seconds if seconds else 0.0

    def _add_faults(self, n: int, fault: _Fault) -> None:
        if n < 0:
            raise ValueError("n must be >= 0")
        with self._cond:
            if n:
                self._faults.append([fault, n])
                self._faults_pending += n

    # -- called by the server, on its thread ---------------------------------------

    def _decide(self, request: Request) -> Answer:
        """What the server does with ``request``; recorded here, as answered."""
        if request.path.startswith(CONTROL_PREFIX):
            return self._control(request)
        with self._cond:
            fault = None
            if self._faults:
                run = self._faults[0]
                fault = run[0]
                run[1] -= 1
                self._faults_pending -= 1
                if not run[1]:
                    self._faults.popleft()
            if fault is None and self._down_until:
                if time.monotonic() < self._down_until:
                    fault = self._down_fault
                else:
                    self._down_until = 0.0
            latency = self._latency
        if fault is not None and fault.kind == "hang":
            self._record(_recorded(request, 0))
            return Answer(0, hang=True)
        if latency > 0:
            # Decided when the delay is over, as a slow backend would: a request
            # is recorded once its answer is about to go.
            return Answer(0, delay=latency, then=lambda: self._answer(request, fault))
        return self._answer(request, fault)

    def _answer(self, request: Request, fault: _Fault | None) -> Answer:
        if fault is None:
            return self._validate_and_answer(request)
        if fault.kind == "drop":
            self._record(_recorded(request, 0))
            return Answer(0)
        if fault.kind == "throttle":
            self._record(_recorded(request, 429))
            detail = "Request was throttled."
            if fault.retry_after.isdigit():
                seconds = int(fault.retry_after)
                unit = "second" if seconds == 1 else "seconds"
                detail = f"Request was throttled. Expected available in {seconds} {unit}."
            return Answer(429, {"detail": detail}, [("Retry-After", fault.retry_after)])
        self._record(_recorded(request, fault.status))
        return Answer(fault.status, {"detail": "Injected failure (stand-in fault injection)."})

    def _reject(
        self,
        request: Request,
        status: int,
        payload: object,
        extra_headers: Sequence[tuple[str, str]] = (),
        parsed: object = _UNSET,
    ) -> Answer:
        self._record(_recorded(request, status, parsed))
        return Answer(status, payload, extra_headers)

    def _validate_and_answer(self, request: Request) -> Answer:
        route = request.path.split("?", 1)[0]
        if route not in _ROUTES:
            return self._reject(request, 404, {"detail": "Not found."})
        if request.method != "POST":
            return self._reject(
                request,
                405,
                {"detail": f'Method "{request.method}" not allowed.'},
                [("Allow", "POST")],
            )
        headers = request.headers
        auth_error = self._check_auth(headers.get("authorization"))
        if auth_error is not None:
            status, detail = auth_error
            extra = [("WWW-Authenticate", "Api-Key")] if status == 401 else []
            return self._reject(request, status, {"detail": detail}, extra)

        body = request.body
        if route == INGEST_PATH:
            # OTLP payloads are usually protobuf: accept anything, keep raw bytes.
            self._accept_ingest(_recorded(request, 200))
            return Answer(200, {})

        content_type = headers.get("content-type", "")
        media_type = content_type.split(";", 1)[0].strip().lower()
        if body and media_type != "application/json" and not media_type.endswith("+json"):
            return self._reject(
                request, 415, {"detail": f'Unsupported media type "{content_type}" in request.'}
            )
        # DRF treats an empty body as empty data, so field errors follow.
        data = _parse_json(body) if body else {}
        if isinstance(data, _JSONError):
            return self._reject(
                request, 400, {"detail": f"JSON parse error - {data.message}"}, parsed=_NOT_JSON
            )

        if route == TRACK_PATH:
            validate, accept = _validate_track, self._accept_message
        else:
            validate, accept = _validate_conversation, self._accept_conversation
        errors = validate(data)
        if errors:
            return self._reject(request, 400, errors, parsed=data)
        assert isinstance(data, dict)
        return Answer(201, accept(_recorded(request, 201, data), data))

    def _control(self, request: Request) -> Answer:
        """Orders over HTTP, for a stand-in run from the command line (the methods of
        the same names, for a process that cannot call them). With the API key, as
        the API's own routes::

            POST /_standin/down?seconds=20&status=503   every request fails for 20 s
            POST /_standin/fail?n=5&status=500          the next 5 requests fail
            POST /_standin/throttle?n=5&retry_after=2   the next 5 get a 429
            POST /_standin/drop?n=5 | /_standin/hang?n=5
            POST /_standin/latency?seconds=0.05         every answer 50 ms late
            POST /_standin/reset                        forget faults, latency, counts
            GET  /_standin/summary                      the counts (summary())
            GET  /_standin/conversations                the bodies kept (conversations)

        Each answers the summary as JSON (``conversations``: the bodies, under that key).
        Not recorded as traffic.
        """
        auth_error = self._check_auth(request.headers.get("authorization"))
        if auth_error is not None:
            status, detail = auth_error
            return Answer(status, {"detail": detail})
        route, _, query = request.path[len(CONTROL_PREFIX) :].partition("?")
        order = route.strip("/")
        params = dict(parse_qsl(query, keep_blank_values=True))
        if order == "summary":
            if request.method not in ("GET", "HEAD", "POST"):
                return Answer(405, {"detail": f'Method "{request.method}" not allowed.'})
            return Answer(200, self.summary())
        if order == "conversations":
            # Which conversation each page view and chat was on: the counts cannot tell a
            # chat on its page view's conversation from one on a new conversation.
            if request.method not in ("GET", "HEAD"):
                return Answer(
                    405,
                    {"detail": f'Method "{request.method}" not allowed.'},
                    [("Allow", "GET, HEAD")],
                )
            return Answer(200, {"conversations": self.conversations})
        if order not in _ORDERS:
            names = ", ".join(sorted([*_ORDERS, "summary"]))
            return Answer(
                404, {"detail": f"No order {order!r}: one of {names}, or GET conversations."}
            )
        if request.method != "POST":
            return Answer(
                405, {"detail": f'Method "{request.method}" not allowed.'}, [("Allow", "POST")]
            )
        unknown = set(params) - _ORDERS[order]
        if unknown:
            takes = ", ".join(sorted(_ORDERS[order])) or "nothing"
            return Answer(
                400, {"detail": f"{order} takes {takes}; not {', '.join(sorted(unknown))}."}
            )
        try:
            n = int(params.get("n", "1"))
            if order == "down":
                self.fail_for(float(params["seconds"]), status=int(params.get("status", "503")))
            elif order == "fail":
                self.fail_next(n, status=int(params.get("status", "503")))
            elif order == "throttle":
                self.throttle_next(n, retry_after=params.get("retry_after", "1"))
            elif order == "drop":
                self.drop_next(n)
            elif order == "hang":
                self.hang_next(n)
            elif order == "latency":
                self.set_latency(float(params["seconds"]))
            else:
                self.reset()
        except KeyError as missing:
            return Answer(400, {"detail": f"{order} needs {missing.args[0]}=."})
        except ValueError as exc:
            return Answer(400, {"detail": str(exc)})
        return Answer(200, self.summary())

    def _check_auth(self, header: str | None) -> tuple[int, str] | None:
        if not header:
            return 401, "Authentication credentials were not provided."
        parts = header.split()
        if len(parts) != 2 or parts[0].lower() != "api-key":
            return 401, "Invalid API key header. Expected 'Api-Key <key>'."
        if not API_KEY_PATTERN.match(parts[1]):
            return 401, "Invalid API key format."
        if parts[1] not in self._api_keys:
            return 403, "Invalid API key."
        return None

    def _record(self, request: RecordedRequest) -> None:
        """``request`` recorded and counted, the waiters told; also under the (reentrant)
        lock an accepting method holds while it records the body."""
        with self._cond:
            self._requests.append(request)
            self._counts[request.status] += 1
            self._trim()
            self._cond.notify_all()

    def _trim(self) -> None:
        """Past twice ``keep``, the oldest recorded requests and bodies go (in one go,
        not one by one: a list drops its head in linear time). Called with the lock held."""
        keep = self._keep
        if keep is None or len(self._requests) <= 2 * keep:
            return
        for kept in (self._requests, self._conversations, self._messages, self._ingested):
            del kept[:-keep]

    def _accept_conversation(
        self, request: RecordedRequest, data: dict[str, Any]
    ) -> dict[str, Any]:
        with self._cond:
            conversation_id = self._next_conversation_id
            self._next_conversation_id += 1
            self._conversations.append(data)
            self._used[bool(data["is_used"])] += 1
            self._record(request)
        return {
            "id": conversation_id,
            "conversation_id": data["conversation_id"],
            "is_used": data["is_used"],
        }

    def _accept_message(self, request: RecordedRequest, data: dict[str, Any]) -> dict[str, Any]:
        with self._cond:
            message_id = self._next_message_id
            self._next_message_id += 1
            self._messages.append(data)
            self._counts_messages += 1
            self._record(request)
        return {"id": message_id, "conversation_id": data["conversation_id"]}

    def _accept_ingest(self, request: RecordedRequest) -> None:
        with self._cond:
            self._ingested.append(request)
            self._counts_ingested += 1
            self._record(request)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command line's options (``agentsight-middleware standin``)."""
    parser.add_argument("--host", default="127.0.0.1", help="interface (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8765, help="port, 0 = any (default: 8765)")
    parser.add_argument(
        "--api-key",
        action="append",
        dest="api_keys",
        metavar="KEY",
        help="accepted API key (repeatable; default: generate one)",
    )
    parser.add_argument(
        "--latency", type=float, default=0.0, metavar="SECONDS", help="delay every answer"
    )
    parser.add_argument(
        "--keep",
        type=int,
        default=10_000,
        metavar="N",
        help="recorded requests held in memory (default: 10,000); the counts cover all",
    )


def serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run the stand-in in the foreground until SIGINT or SIGTERM."""
    try:
        api = StandInAgentSightAPI(
            api_keys=args.api_keys, host=args.host, port=args.port, keep=args.keep
        )
        api.set_latency(args.latency)
    except ValueError as exc:
        parser.error(str(exc))
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        api.start()
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}",
              file=sys.stderr)  # fmt: skip
        return 1
    with api:
        url = api.url
        print(f"AgentSight stand-in API listening on {url}", flush=True)
        print(f"API key: {api.api_key}", flush=True)
        print(
            f"Faults on demand: curl -X POST -H 'Authorization: Api-Key {api.api_key}' "
            f"'{url}{CONTROL_PREFIX}down?seconds=20' (also fail, throttle, drop, hang, "
            f"latency, reset; GET {CONTROL_PREFIX}summary for the counts, "
            f"{CONTROL_PREFIX}conversations for the page views and chats)",
            flush=True,
        )
        print("Press Ctrl+C to stop.", flush=True)
        # A timed wait keeps the main thread responsive to signals on all platforms.
        while not stop.wait(0.5):
            pass
        summary = api.summary()
    answers = ", ".join(
        f"{'no answer' if status == '0' else status} x {n:,}"
        for status, n in summary["by_status"].items()
    )
    count = summary["requests"]
    print(f"Stopped after {count} request(s){': ' + answers if answers else ''}.", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m agentsight_middleware._standin``, as ``agentsight-middleware standin``."""
    parser = argparse.ArgumentParser(
        prog="python -m agentsight_middleware._standin",
        description="Run a local stand-in for the AgentSight API.",
    )
    add_arguments(parser)
    return serve(parser.parse_args(argv), parser)


if __name__ == "__main__":
    sys.exit(main())
