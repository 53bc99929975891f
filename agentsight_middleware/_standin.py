"""A stand-in AgentSight API: a real local HTTP server for tests, demos and benchmarks.

It validates requests the way the AgentSight backend does (route, ``Api-Key``
authentication, JSON parsing, per-field conversation validation with errors in
Django REST framework shape), records everything it receives, and can inject
faults (errors, throttling, dropped connections, latency, hangs) so clients can
be tested against the failure modes of the real service without network access.

Standard library only, so it can be used from any environment (including the
CLI: ``python -m agentsight_middleware._standin --port 8765``).
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import re
import secrets
import selectors
import signal
import socket
import socketserver
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType, TracebackType
from typing import Any

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

# Large enough for any OTLP batch the SDK sends; small enough that a runaway
# client cannot exhaust memory of the test process.
_MAX_BODY_BYTES = 10 * 1024 * 1024
# "Forever" for a hung request, but bounded so an abandoned server's threads end.
_HANG_SECONDS = 600.0
# How long stop() waits for connection threads to finish after shutting their
# sockets down; they normally take microseconds.
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


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "agentsight-standin"
    sys_version = ""
    # Responses are written with a single send, but the client's next request on
    # a keep-alive connection must not wait for a delayed ACK either.
    disable_nagle_algorithm = True
    server: _Server
    _headers: dict[str, str]

    def log_message(self, format: str, *args: Any) -> None:
        # Silence http.server's per-request stderr logging: it would flood test
        # output and benchmarks.
        pass

    def do_POST(self) -> None:
        self._handle()

    do_GET = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_HEAD = do_POST

    # -- request plumbing --------------------------------------------------

    def _read_body(self) -> bytes | None:
        """Read the request body; answer and return None if it is unreadable."""
        if "chunked" in self._headers.get("transfer-encoding", "").lower():
            return self._read_chunked()
        raw_length = self._headers.get("content-length")
        if raw_length is None:
            return b""
        try:
            length = int(raw_length)
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            self._send(400, {"detail": "Invalid Content-Length header."})
            return None
        if length > _MAX_BODY_BYTES:
            self.close_connection = True
            self._send(413, {"detail": "Request body too large."})
            return None
        body = self.rfile.read(length)
        if len(body) != length:
            self.close_connection = True
            return None
        return body

    def _read_chunked(self) -> bytes | None:
        chunks: list[bytes] = []
        total = 0
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                self.close_connection = True
                self._send(400, {"detail": "Malformed chunked body."})
                return None
            if size == 0:
                # Trailers (if any) end with an empty line.
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(chunks)
            total += size
            if total > _MAX_BODY_BYTES:
                self.close_connection = True
                self._send(413, {"detail": "Request body too large."})
                return None
            chunk = self.rfile.read(size)
            self.rfile.readline(1024)
            if len(chunk) != size:
                self.close_connection = True
                return None
            chunks.append(chunk)

    def _send(
        self,
        status: int,
        payload: object,
        extra_headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        body = json.dumps(payload, separators=(",", ":")).encode()
        reason = self.responses.get(status, ("",))[0]
        lines = [
            f"{self.protocol_version} {status} {reason}",
            f"Server: {self.server_version}",
            f"Date: {formatdate(usegmt=True)}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
        ]
        lines.extend(f"{name}: {value}" for name, value in extra_headers)
        if self.close_connection:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        # One write: header and body in a single segment keeps keep-alive
        # round trips fast under benchmark load.
        self.wfile.write(head if self.command == "HEAD" else head + body)

    # -- the request pipeline ----------------------------------------------

    def _handle(self) -> None:
        received_at = time.time()
        # email.message.Message lookups are linear scans that lower-case every
        # name; one pass into a dict is cheaper than repeated get() calls.
        headers: dict[str, str] = {}
        for name, value in self.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        self._headers = headers
        body = self._read_body()
        if body is None:
            return
        api = self.server.api
        fault, latency, release = api._next_fault()
        if fault is not None and fault.kind == "hang":
            api._record(self._recorded(body, 0, received_at))
            # Waiting on an event (not sleeping) lets stop()/reset() release us.
            release.wait(_HANG_SECONDS)
            self.close_connection = True
            return
        if latency > 0:
            release.wait(latency)
        if fault is None:
            self._validate_and_answer(api, body, received_at)
        elif fault.kind == "drop":
            api._record(self._recorded(body, 0, received_at))
            self.close_connection = True
        elif fault.kind == "throttle":
            api._record(self._recorded(body, 429, received_at))
            detail = "Request was throttled."
            if fault.retry_after.isdigit():
                seconds = int(fault.retry_after)
                unit = "second" if seconds == 1 else "seconds"
                detail = f"Request was throttled. Expected available in {seconds} {unit}."
            self._send(429, {"detail": detail}, [("Retry-After", fault.retry_after)])
        else:
            api._record(self._recorded(body, fault.status, received_at))
            self._send(fault.status, {"detail": "Injected failure (stand-in fault injection)."})

    def _recorded(
        self, body: bytes, status: int, received_at: float, parsed: object = _UNSET
    ) -> RecordedRequest:
        if parsed is _UNSET:
            parsed = _parse_json(body) if body else _NOT_JSON
        return RecordedRequest(
            method=self.command,
            path=self.path,
            # Each record gets its own copy: callers may mutate what they read.
            headers=dict(self._headers),
            body=body,
            json=None if parsed is _NOT_JSON or isinstance(parsed, _JSONError) else parsed,
            status=status,
            received_at=received_at,
        )

    def _reject(
        self,
        api: StandInAgentSightAPI,
        body: bytes,
        received_at: float,
        status: int,
        payload: object,
        extra_headers: Sequence[tuple[str, str]] = (),
        parsed: object = _UNSET,
    ) -> None:
        api._record(self._recorded(body, status, received_at, parsed))
        self._send(status, payload, extra_headers)

    def _validate_and_answer(
        self, api: StandInAgentSightAPI, body: bytes, received_at: float
    ) -> None:
        route = self.path.split("?", 1)[0]
        if route not in _ROUTES:
            self._reject(api, body, received_at, 404, {"detail": "Not found."})
            return
        if self.command != "POST":
            self._reject(
                api,
                body,
                received_at,
                405,
                {"detail": f'Method "{self.command}" not allowed.'},
                [("Allow", "POST")],
            )
            return

        auth_error = api._check_auth(self._headers.get("authorization"))
        if auth_error is not None:
            status, detail = auth_error
            extra = [("WWW-Authenticate", "Api-Key")] if status == 401 else []
            self._reject(api, body, received_at, status, {"detail": detail}, extra)
            return

        if route == INGEST_PATH:
            # OTLP payloads are usually protobuf: accept anything, keep raw bytes.
            record = self._recorded(body, 200, received_at)
            api._accept_ingest(record)
            self._send(200, {})
            return

        content_type = self._headers.get("content-type", "")
        media_type = content_type.split(";", 1)[0].strip().lower()
        if body and media_type != "application/json" and not media_type.endswith("+json"):
            self._reject(
                api,
                body,
                received_at,
                415,
                {"detail": f'Unsupported media type "{content_type}" in request.'},
            )
            return
        # DRF treats an empty body as empty data, so field errors follow.
        data = _parse_json(body) if body else {}
        if isinstance(data, _JSONError):
            self._reject(
                api,
                body,
                received_at,
                400,
                {"detail": f"JSON parse error - {data.message}"},
                parsed=_NOT_JSON,
            )
            return

        if route == TRACK_PATH:
            validate, accept = _validate_track, api._accept_message
        else:
            validate, accept = _validate_conversation, api._accept_conversation
        errors = validate(data)
        if errors:
            self._reject(api, body, received_at, 400, errors, parsed=data)
            return
        assert isinstance(data, dict)
        record = self._recorded(body, 201, received_at, data)
        self._send(201, accept(record, data))


@dataclass(frozen=True)
class _JSONError:
    message: str


def _parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        return _JSONError(str(exc))


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


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # stop() shuts connections down itself and waits with a deadline; the
    # default close-time join could block forever on idle keep-alive clients.
    block_on_close = False
    # Benchmarks open many connections at once; the default backlog of 5 would
    # make the kernel refuse or delay them.
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], api: StandInAgentSightAPI) -> None:
        self.api = api
        self._connections: set[socket.socket] = set()
        self._connections_done = threading.Condition()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self._wake_r, self._wake_w = socket.socketpair()
        try:
            super().__init__(address, _Handler)
        except BaseException:
            self._wake_r.close()
            self._wake_w.close()
            raise
        # Readiness can be stale (client reset before accept); never block in accept().
        self.socket.setblocking(False)

    def serve_until_woken(self) -> None:
        """Accept connections until :meth:`wake` is called.

        Unlike serve_forever(), which polls for shutdown() every half second,
        this sleeps on a socketpair: stop() is immediate (every test fixture
        pays for it) and an idle server uses no CPU.
        """
        with selectors.DefaultSelector() as selector:
            selector.register(self.socket, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while True:
                for key, _ in selector.select():
                    if key.fileobj is self._wake_r:
                        return
                    self._accept_one()

    def _accept_one(self) -> None:
        try:
            request, client_address = self.get_request()
        except OSError:
            return
        try:
            self.process_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
            with self._connections_done:
                self._connections.discard(request)
            self.shutdown_request(request)

    def wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def server_close(self) -> None:
        super().server_close()
        self._wake_r.close()
        self._wake_w.close()

    def server_bind(self) -> None:
        # HTTPServer.server_bind() calls socket.getfqdn(), a reverse DNS lookup
        # that can take seconds in sandboxes; nothing here needs the FQDN.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_done:
            self._connections.add(request)
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._connections_done:
                self._connections.discard(request)
                self._connections_done.notify_all()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients vanishing mid-request (timeouts, dropped connections, stop())
        # are normal here; anything else is a bug worth a traceback.
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)

    def close_connections(self, timeout: float) -> None:
        with self._connections_done:
            for conn in self._connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
            self._connections_done.wait_for(lambda: not self._connections, timeout)


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
        self.api_key: str = keys[0]
        self._api_keys = frozenset(keys)
        self._host = host
        self._port = port
        # Reentrant so wait_for() predicates can read the snapshot properties
        # while the condition's lock is held.
        self._cond = threading.Condition(threading.RLock())
        self._requests: list[RecordedRequest] = []
        self._conversations: list[dict[str, Any]] = []
        self._messages: list[dict[str, Any]] = []
        self._ingested: list[RecordedRequest] = []
        self._faults: deque[_Fault] = deque()
        self._latency = 0.0
        self._release = threading.Event()
        self._next_conversation_id = 1
        self._next_message_id = 1
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
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
        with self._cond:
            self._release = threading.Event()
        server = _Server((self._host, self._port), self)
        host, port = server.socket.getsockname()[:2]
        display_host = f"[{host}]" if ":" in str(host) else str(host)
        self._url = f"http://{display_host}:{port}"
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_until_woken,
            name=f"agentsight-standin:{port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, release hung requests and close every connection."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._server = self._thread = None
        self._stopped = True
        with self._cond:
            self._release.set()
        server.wake()
        # Joining first guarantees no connection is accepted after the sweep.
        thread.join(_STOP_JOIN_SECONDS)
        server.close_connections(_STOP_JOIN_SECONDS)
        server.server_close()

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
            if conversations is not None and len(self._conversations) < conversations:
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
            f"got {len(self._conversations)} accepted conversation(s), "
            f"{len(self._messages)} message(s), {len(self._ingested)} ingest request(s), "
            f"{len(self._requests)} request(s) in total",
        ]
        shown = self._requests[-10:]
        if len(self._requests) > len(shown):
            lines.append(f"last {len(shown)} requests:")
        for req in shown:
            answer = str(req.status) if req.status else "no answer (fault)"
            lines.append(f"  {req.method} {req.path} -> {answer}: {req.body[:120]!r}")
        return "\n".join(lines)

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
            self._latency = 0.0
            self._release.set()
            self._release = threading.Event()
            self._cond.notify_all()

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
        if seconds < 0:
            raise ValueError("latency must be >= 0")
        with self._cond:
            self._latency = float(seconds)

    def _add_faults(self, n: int, fault: _Fault) -> None:
        if n < 0:
            raise ValueError("n must be >= 0")
        with self._cond:
            self._faults.extend([fault] * n)

    # -- called by the handler ------------------------------------------------

    def _next_fault(self) -> tuple[_Fault | None, float, threading.Event]:
        with self._cond:
            fault = self._faults.popleft() if self._faults else None
            return fault, self._latency, self._release

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
        with self._cond:
            self._requests.append(request)
            self._cond.notify_all()

    def _accept_conversation(
        self, request: RecordedRequest, data: dict[str, Any]
    ) -> dict[str, Any]:
        with self._cond:
            conversation_id = self._next_conversation_id
            self._next_conversation_id += 1
            self._requests.append(request)
            self._conversations.append(data)
            self._cond.notify_all()
        return {
            "id": conversation_id,
            "conversation_id": data["conversation_id"],
            "is_used": data["is_used"],
        }

    def _accept_message(self, request: RecordedRequest, data: dict[str, Any]) -> dict[str, Any]:
        with self._cond:
            message_id = self._next_message_id
            self._next_message_id += 1
            self._requests.append(request)
            self._messages.append(data)
            self._cond.notify_all()
        return {"id": message_id, "conversation_id": data["conversation_id"]}

    def _accept_ingest(self, request: RecordedRequest) -> None:
        with self._cond:
            self._requests.append(request)
            self._ingested.append(request)
            self._cond.notify_all()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the stand-in in the foreground until interrupted."""
    parser = argparse.ArgumentParser(
        prog="python -m agentsight_middleware._standin",
        description="Run a local stand-in for the AgentSight API.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8765, help="port, 0 = any (default: 8765)")
    parser.add_argument(
        "--api-key",
        action="append",
        dest="api_keys",
        metavar="KEY",
        help="accepted API key (repeatable; default: generate one)",
    )
    parser.add_argument("--latency", type=float, default=0.0, help="delay every answer by SECONDS")
    args = parser.parse_args(argv)

    try:
        api = StandInAgentSightAPI(api_keys=args.api_keys, host=args.host, port=args.port)
    except ValueError as exc:
        parser.error(str(exc))
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with api:
        api.set_latency(args.latency)
        print(f"AgentSight stand-in API listening on {api.url}", flush=True)
        print(f"API key: {api.api_key}", flush=True)
        print("Press Ctrl+C to stop.", flush=True)
        # A timed wait keeps the main thread responsive to signals on all platforms.
        while not stop.wait(0.5):
            pass
        count = len(api.requests)
    print(f"Stopped after {count} request(s).", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
