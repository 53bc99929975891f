"""Tests for the stand-in AgentSight API (a real HTTP server on 127.0.0.1)."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import agentsight_middleware
from agentsight_middleware import _standin_server
from agentsight_middleware._standin import (
    API_KEY_PATTERN,
    RecordedRequest,
    StandInAgentSightAPI,
    generate_api_key,
)

# Where the package under test was imported from, so the CLI subprocess runs
# the same code whether or not the package is installed.
PACKAGE_PARENT = Path(agentsight_middleware.__file__ or "").resolve().parent.parent
CONVERSATIONS = "/api/conversations/"


def conversation(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "timestamp": "2024-05-01T12:00:00.123456+00:00",
        "conversation_id": "conv-1",
        "customer_id": "cust-1",
        "customer_ip_address": "203.0.113.7",
        "device": "desktop",
        "source": "widget",
        "language": "en",
        "name": "Ada",
        "environment": "production",
        "metadata": {"plan": "pro"},
        "is_used": False,
    }
    body.update(overrides)
    return body


@pytest.fixture(autouse=True, params=["httptools", "h11"])
def parser(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The request parser of every stand-in the test starts (the CLI's subprocess aside)."""
    name: str = request.param
    assert getattr(_standin_server, "httptools", None) is not None, "httptools is missing"
    if name == "h11":
        monkeypatch.setattr(_standin_server, "httptools", None)
    return name


@pytest.fixture
def api() -> Iterator[StandInAgentSightAPI]:
    with StandInAgentSightAPI() as server:
        yield server


def http_client(api: StandInAgentSightAPI, *, auth: bool = True) -> httpx.Client:
    """A plain-HTTP client for ``api``.

    trust_env=False: a proxy configured in the environment must not intercept
    traffic to 127.0.0.1. verify=False: the server is plain HTTP, and loading
    the CA bundle would cost ~40 ms per client.
    """
    headers = {"Authorization": f"Api-Key {api.api_key}"} if auth else {}
    return httpx.Client(
        base_url=api.url, headers=headers, trust_env=False, verify=False, timeout=5.0
    )


@pytest.fixture
def client(api: StandInAgentSightAPI) -> Iterator[httpx.Client]:
    with http_client(api) as c:
        yield c


# -- construction and lifecycle ---------------------------------------------------


def test_generated_key_is_well_formed_and_unique() -> None:
    keys = {generate_api_key() for _ in range(20)}
    assert len(keys) == 20
    assert all(API_KEY_PATTERN.match(key) for key in keys)
    assert API_KEY_PATTERN.match(StandInAgentSightAPI().api_key)


def test_explicit_keys_are_all_accepted_first_is_api_key() -> None:
    first, second = generate_api_key(), generate_api_key().upper().replace("AGS_", "ags_")
    with (
        StandInAgentSightAPI(api_keys=[first, second]) as api,
        http_client(api, auth=False) as c,
    ):
        assert api.api_key == first
        for key in (first, second):
            response = c.post(
                CONVERSATIONS, json=conversation(), headers={"Authorization": f"Api-Key {key}"}
            )
            assert response.status_code == 201


@pytest.mark.parametrize(
    "keys",
    [
        pytest.param([], id="empty"),
        pytest.param(["not-a-key"], id="malformed"),
        pytest.param([generate_api_key(), "ags_123"], id="second-malformed"),
    ],
)
def test_bad_configured_keys_are_refused_without_echoing_them(keys: list[str]) -> None:
    with pytest.raises(ValueError, match="key") as excinfo:
        StandInAgentSightAPI(api_keys=keys)
    for key in keys:
        assert key not in str(excinfo.value)


def test_url_requires_start_and_stop_is_idempotent() -> None:
    api = StandInAgentSightAPI()
    with pytest.raises(RuntimeError, match="not started"):
        _ = api.url
    api.stop()  # never started: no-op
    assert api.start() is api
    assert api.start() is api  # already running: no-op
    assert api.url.startswith("http://127.0.0.1:")
    assert not api.url.endswith("/")
    assert api.api_key not in repr(api)
    api.stop()
    api.stop()
    with pytest.raises(RuntimeError, match="restarted"):
        api.start()


# -- the happy path ---------------------------------------------------------------------


def test_valid_conversation_is_created_with_increasing_ids(
    api: StandInAgentSightAPI, client: httpx.Client
) -> None:
    first = client.post(CONVERSATIONS, json=conversation(conversation_id="a"))
    second = client.post(CONVERSATIONS, json=conversation(conversation_id="b", is_used=True))

    assert first.status_code == 201
    assert first.headers["content-type"] == "application/json"
    assert first.json() == {"id": 1, "conversation_id": "a", "is_used": False}
    assert second.json() == {"id": 2, "conversation_id": "b", "is_used": True}
    assert [c["conversation_id"] for c in api.conversations] == ["a", "b"]
    assert api.conversations[0] == conversation(conversation_id="a")

    recorded = api.requests
    assert [r.status for r in recorded] == [201, 201]
    req = recorded[0]
    assert isinstance(req, RecordedRequest)
    assert (req.method, req.path) == ("POST", CONVERSATIONS)
    assert req.headers["authorization"] == f"Api-Key {api.api_key}"
    assert req.headers["content-type"] == "application/json"
    assert json.loads(req.body) == req.json == conversation(conversation_id="a")
    assert abs(req.received_at - time.time()) < 5


def test_minimal_conversation_with_nulls_and_z_timestamp(
    api: StandInAgentSightAPI, client: httpx.Client
) -> None:
    body = {
        "timestamp": "2024-05-01T12:00:00Z",
        "conversation_id": "c",
        "customer_id": None,
        "customer_ip_address": None,
        "environment": "development",
        "metadata": None,
        "is_used": False,
    }
    assert client.post(CONVERSATIONS, json=body).status_code == 201
    assert client.post(CONVERSATIONS, json=conversation(customer_ip_address="::1")).is_success
    assert len(api.conversations) == 2


def test_snapshots_are_copies(api: StandInAgentSightAPI, client: httpx.Client) -> None:
    client.post(CONVERSATIONS, json=conversation())
    api.requests.clear()
    api.conversations.clear()
    assert len(api.requests) == 1
    assert len(api.conversations) == 1


def test_keep_alive_connection_is_reused(api: StandInAgentSightAPI) -> None:
    host, port = api.url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        headers = {"Authorization": f"Api-Key {api.api_key}", "Content-Type": "application/json"}
        sockets = []
        for i in range(3):
            conn.request(
                "POST",
                CONVERSATIONS,
                body=json.dumps(conversation(conversation_id=f"k{i}")),
                headers=headers,
            )
            response = conn.getresponse()
            payload = json.loads(response.read())
            assert response.status == 201
            assert int(response.headers["Content-Length"]) > 0
            assert payload["id"] == i + 1
            sockets.append(conn.sock)
        assert sockets[0] is not None
        assert all(s is sockets[0] for s in sockets)
    finally:
        conn.close()


def test_concurrent_clients_get_unique_ids_in_recorded_order(
    api: StandInAgentSightAPI,
) -> None:
    ids: list[int] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        with http_client(api) as c:
            for i in range(20):
                r = c.post(CONVERSATIONS, json=conversation(conversation_id=f"w{n}-{i}"))
                assert r.status_code == 201
                with lock:
                    ids.append(r.json()["id"])

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(ids) == list(range(1, 121))
    assert len(api.conversations) == 120
    assert len({c["conversation_id"] for c in api.conversations}) == 120


# -- validation ------------------------------------------------------------------------

UNKNOWN_KEY = generate_api_key()
WITHOUT_AUTH: dict[str, str | None] = {"Authorization": None}


def case(
    case_id: str,
    status: int,
    content: Any = None,
    expected: dict[str, Any] | None = None,
    *,
    method: str = "POST",
    path: str = CONVERSATIONS,
    headers: dict[str, str | None] | None = None,
) -> Any:
    """One row of the validation table; ``{key}`` in headers is the valid key."""
    return pytest.param(method, path, headers or {}, content, status, expected, id=case_id)


def without(field: str) -> dict[str, Any]:
    return {k: v for k, v in conversation().items() if k != field}


VALIDATION_CASES = [
    case(
        "missing-auth",
        401,
        conversation(),
        {"detail": "Authentication credentials were not provided."},
        headers=WITHOUT_AUTH,
    ),
    case(
        "bearer-instead-of-api-key",
        401,
        conversation(),
        {"detail": "Invalid API key header. Expected 'Api-Key <key>'."},
        headers={"Authorization": "Bearer {key}"},
    ),
    case("api-key-word-only", 401, conversation(), headers={"Authorization": "Api-Key"}),
    case(
        "malformed-key",
        401,
        conversation(),
        {"detail": "Invalid API key format."},
        headers={"Authorization": "Api-Key ags_1234_abc"},
    ),
    case(
        "unknown-well-formed-key",
        403,
        conversation(),
        {"detail": "Invalid API key."},
        headers={"Authorization": f"Api-Key {UNKNOWN_KEY}"},
    ),
    case(
        "no-trailing-slash",
        404,
        conversation(),
        {"detail": "Not found."},
        path="/api/conversations",
    ),
    case("unknown-path-before-auth", 404, conversation(), path="/api/nope/", headers=WITHOUT_AUTH),
    case("get-not-allowed", 405, None, {"detail": 'Method "GET" not allowed.'}, method="GET"),
    case("put-before-auth", 405, {}, method="PUT", path="/api/track/", headers=WITHOUT_AUTH),
    case("bad-json", 400, b"{not json"),
    case("not-json-content-type", 415, b"{}", headers={"Content-Type": "text/plain"}),
    case(
        "body-not-object",
        400,
        [conversation()],
        {"non_field_errors": ["Invalid data. Expected a dictionary, but got list."]},
    ),
    case(
        "blank-conversation-id",
        400,
        conversation(conversation_id="   "),
        {"conversation_id": ["This field may not be blank."]},
    ),
    case(
        "null-conversation-id",
        400,
        conversation(conversation_id=None),
        {"conversation_id": ["This field may not be null."]},
    ),
    case(
        "256-char-field",
        400,
        conversation(name="x" * 256),
        {"name": ["Ensure this field has no more than 255 characters."]},
    ),
    case("255-char-field-ok", 201, conversation(name="x" * 255)),
    case(
        "nul-in-a-string",
        400,
        conversation(customer_id="cust\x00-1"),
        {"customer_id": ["Null characters are not allowed."]},
    ),
    case(
        "non-string-field",
        400,
        conversation(customer_id=42),
        {"customer_id": ["Not a valid string."]},
    ),
    case(
        "unknown-ip",
        400,
        conversation(customer_ip_address="unknown"),
        {"customer_ip_address": ["Enter a valid IPv4 or IPv6 address."]},
    ),
    case(
        "comma-joined-ips",
        400,
        conversation(customer_ip_address="1.2.3.4, 5.6.7.8"),
        {"customer_ip_address": ["Enter a valid IPv4 or IPv6 address."]},
    ),
    case(
        "unknown-environment",
        400,
        conversation(environment="staging"),
        {"environment": ['"staging" is not a valid choice.']},
    ),
    case(
        "environment-missing",
        400,
        without("environment"),
        {"environment": ["This field is required."]},
    ),
    case("prod-alias-accepted", 201, conversation(environment="prod")),
    case("dev-alias-accepted", 201, conversation(environment="dev")),
    case(
        "metadata-list",
        400,
        conversation(metadata=["a"]),
        {"metadata": ['Expected a dictionary of items but got type "list".']},
    ),
    case("is-used-missing", 400, without("is_used"), {"is_used": ["This field is required."]}),
    case(
        "is-used-not-bool",
        400,
        conversation(is_used="yes"),
        {"is_used": ["Must be a valid boolean."]},
    ),
    case(
        "timestamp-missing", 400, without("timestamp"), {"timestamp": ["This field is required."]}
    ),
    case("bad-timestamp", 400, conversation(timestamp="yesterday")),
    case(
        "track-without-conversation-id",
        400,
        {"text": "hi"},
        {"conversation_id": ["This field is required."]},
        path="/api/track/",
    ),
]


@pytest.mark.parametrize(
    ("method", "path", "headers", "content", "status", "expected"), VALIDATION_CASES
)
def test_validation(
    api: StandInAgentSightAPI,
    method: str,
    path: str,
    headers: dict[str, str | None],
    content: Any,
    status: int,
    expected: dict[str, Any] | None,
) -> None:
    sent = {"Authorization": f"Api-Key {api.api_key}", "Content-Type": "application/json"}
    for name, value in headers.items():
        if value is None:
            del sent[name]
        else:
            sent[name] = value.format(key=api.api_key)
    raw = content if isinstance(content, bytes) or content is None else json.dumps(content)
    with http_client(api, auth=False) as c:
        response = c.request(method, path, content=raw, headers=sent)

    assert response.status_code == status, response.text
    body = response.json()
    if expected is not None:
        assert body == expected
    if status == 201:
        assert len(api.conversations) == 1
        return
    assert isinstance(body, dict)
    assert api.api_key not in response.text
    assert api.conversations == []
    [recorded] = api.requests
    assert (recorded.method, recorded.path, recorded.status) == (method, path, status)
    if status == 401:
        assert response.headers["www-authenticate"] == "Api-Key"
    if status == 405:
        assert response.headers["allow"] == "POST"


def test_bad_json_detail(api: StandInAgentSightAPI, client: httpx.Client) -> None:
    response = client.post(
        CONVERSATIONS, content=b"{oops", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["detail"].startswith("JSON parse error - ")
    assert api.requests[0].json is None
    assert api.requests[0].body == b"{oops"


def test_all_field_errors_are_collected(client: httpx.Client) -> None:
    response = client.post(
        CONVERSATIONS,
        json={
            "conversation_id": "",
            "customer_ip_address": "unknown",
            "device": "d" * 300,
            "environment": "qa",
            "metadata": "x",
        },
    )
    assert response.status_code == 400
    assert set(response.json()) == {
        "conversation_id",
        "customer_ip_address",
        "device",
        "environment",
        "metadata",
        "is_used",
        "timestamp",
    }
    assert all(isinstance(v, list) and v for v in response.json().values())


def test_empty_body_reports_required_fields(client: httpx.Client) -> None:
    response = client.post(CONVERSATIONS)
    assert response.status_code == 400
    assert response.json()["conversation_id"] == ["This field is required."]


# -- other routes ------------------------------------------------------------------------


def test_track_messages_are_recorded(api: StandInAgentSightAPI, client: httpx.Client) -> None:
    message = {"conversation_id": "conv-1", "message": "hello", "sender": "user"}
    response = client.post("/api/track/", json=message)
    assert response.status_code == 201
    assert response.json() == {"id": 1, "conversation_id": "conv-1"}
    assert client.post("/api/track/", json=message).json()["id"] == 2
    assert api.messages == [message, message]
    assert api.conversations == []


def test_ingest_records_raw_bytes_and_content_type(
    api: StandInAgentSightAPI, client: httpx.Client
) -> None:
    payload = b"\x0a\x03\xffprotobuf\x00"
    response = client.post(
        "/api/ingest/", content=payload, headers={"Content-Type": "application/x-protobuf"}
    )
    assert response.status_code == 200
    assert response.json() == {}
    [ingested] = api.ingested
    assert ingested.body == payload
    assert ingested.json is None
    assert ingested.headers["content-type"] == "application/x-protobuf"
    assert api.requests == [ingested]


def test_ingest_accepts_chunked_body(api: StandInAgentSightAPI, client: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"resourceSpans":'
        yield b"[]}"

    response = client.post(
        "/api/ingest/", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 200
    [ingested] = api.ingested
    assert ingested.headers["transfer-encoding"] == "chunked"
    assert ingested.body == b'{"resourceSpans":[]}'
    assert ingested.json == {"resourceSpans": []}


def test_summary_counts_ingest_requests(api: StandInAgentSightAPI, client: httpx.Client) -> None:
    # The 0.1.x SDK (tracker=AgentSightSDK()) sends only to /api/ingest/: a summary without
    # this count showed 0 initialized and 0 used for a run that tracked every visit.
    for _ in range(2):
        client.post("/api/ingest/", content=b"{}", headers={"Content-Type": "application/json"})
    assert api.summary()["ingested"] == 2
    assert client.get("/_standin/summary").json()["ingested"] == 2
    api.reset()
    assert api.summary()["ingested"] == 0


def test_ingest_requires_auth(api: StandInAgentSightAPI) -> None:
    with http_client(api, auth=False) as c:
        assert c.post("/api/ingest/", content=b"x").status_code == 401
    assert api.ingested == []


# -- fault injection ---------------------------------------------------------------------


def test_fail_next_then_success(api: StandInAgentSightAPI, client: httpx.Client) -> None:
    api.fail_next()
    first = client.post(CONVERSATIONS, json=conversation())
    second = client.post(CONVERSATIONS, json=conversation())
    assert first.status_code == 503
    assert "detail" in first.json()
    assert second.status_code == 201
    assert second.json()["id"] == 1
    assert [r.status for r in api.requests] == [503, 201]
    assert len(api.conversations) == 1


def test_fail_next_custom_status_applies_to_any_route_even_unauthenticated(
    api: StandInAgentSightAPI,
) -> None:
    api.fail_next(2, status=500)
    with http_client(api, auth=False) as c:
        assert c.get("/nowhere").status_code == 500
        assert c.post("/api/track/", json={}).status_code == 500
        assert c.get("/nowhere").status_code == 404


def test_faults_are_consumed_in_order(api: StandInAgentSightAPI, client: httpx.Client) -> None:
    api.fail_next(1)
    api.throttle_next(2, retry_after="7")
    statuses = [client.post(CONVERSATIONS, json=conversation()).status_code for _ in range(4)]
    assert statuses == [503, 429, 429, 201]


@pytest.mark.parametrize(
    ("retry_after", "detail"),
    [
        pytest.param("1", "Request was throttled. Expected available in 1 second.", id="seconds"),
        pytest.param("Wed, 21 Oct 2015 07:28:00 GMT", "Request was throttled.", id="http-date"),
    ],
)
def test_throttle_next(
    api: StandInAgentSightAPI, client: httpx.Client, retry_after: str, detail: str
) -> None:
    api.throttle_next(retry_after=retry_after)
    response = client.post(CONVERSATIONS, json=conversation())
    assert response.status_code == 429
    assert response.headers["retry-after"] == retry_after
    assert response.json() == {"detail": detail}
    assert api.requests[0].status == 429
    assert client.post(CONVERSATIONS, json=conversation()).status_code == 201


def test_drop_next_closes_without_response(api: StandInAgentSightAPI, client: httpx.Client) -> None:
    api.drop_next()
    with pytest.raises(httpx.RemoteProtocolError):
        client.post(CONVERSATIONS, json=conversation())
    assert client.post(CONVERSATIONS, json=conversation()).status_code == 201
    dropped, ok = api.requests
    assert dropped.status == 0
    assert dropped.json == conversation()
    assert ok.status == 201


def test_set_latency_delays_answers(api: StandInAgentSightAPI, client: httpx.Client) -> None:
    client.post(CONVERSATIONS, json=conversation())  # warm the connection
    api.set_latency(0.2)
    started = time.perf_counter()
    assert client.post(CONVERSATIONS, json=conversation()).status_code == 201
    assert time.perf_counter() - started >= 0.2
    api.set_latency(0)
    started = time.perf_counter()
    client.post(CONVERSATIONS, json=conversation())
    assert time.perf_counter() - started < 0.15


def test_hang_next_times_out_and_does_not_block_stop() -> None:
    api = StandInAgentSightAPI().start()
    try:
        api.hang_next()
        with http_client(api) as c, pytest.raises(httpx.ReadTimeout):
            c.post(CONVERSATIONS, json=conversation(), timeout=0.2)
        [hung] = api.requests
        assert hung.status == 0
        assert api.conversations == []
    finally:
        started = time.perf_counter()
        api.stop()
        assert time.perf_counter() - started < 1.0


def test_stop_with_hung_request_while_client_still_waiting() -> None:
    api = StandInAgentSightAPI().start()
    errors: list[BaseException] = []

    def call() -> None:
        with http_client(api) as c:
            try:
                c.post(CONVERSATIONS, json=conversation(), timeout=10)
            except httpx.HTTPError as exc:
                errors.append(exc)

    api.hang_next()
    caller = threading.Thread(target=call)
    caller.start()
    api.wait_for(lambda a: len(a.requests) == 1, timeout=2)
    started = time.perf_counter()
    api.stop()
    caller.join(5)
    assert time.perf_counter() - started < 1.0
    assert not caller.is_alive()
    assert len(errors) == 1
    assert isinstance(errors[0], httpx.RemoteProtocolError)


def test_reset_clears_state_but_ids_keep_increasing(
    api: StandInAgentSightAPI, client: httpx.Client
) -> None:
    client.post(CONVERSATIONS, json=conversation())
    client.post("/api/track/", json={"conversation_id": "c"})
    api.fail_next(3)
    api.set_latency(5)
    api.reset()
    assert (api.requests, api.conversations, api.messages, api.ingested) == ([], [], [], [])
    started = time.perf_counter()
    response = client.post(CONVERSATIONS, json=conversation())
    assert response.status_code == 201
    assert response.json()["id"] == 2
    assert time.perf_counter() - started < 1


@pytest.mark.parametrize(
    ("method", "kwargs"),
    [
        pytest.param("fail_next", {"n": -1}, id="negative-n"),
        pytest.param("fail_next", {"status": 42}, id="bad-status"),
        pytest.param("throttle_next", {"retry_after": "1\r\nX-Evil: 1"}, id="header-injection"),
        pytest.param("set_latency", {"seconds": -1}, id="negative-latency"),
    ],
)
def test_fault_arguments_are_validated(method: str, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the message is not the point
        getattr(StandInAgentSightAPI(), method)(**kwargs)


# -- wait_for ----------------------------------------------------------------------------


def test_wait_for_conversations_from_another_thread(
    api: StandInAgentSightAPI, client: httpx.Client
) -> None:
    def later() -> None:
        time.sleep(0.05)
        for i in range(2):
            client.post(CONVERSATIONS, json=conversation(conversation_id=f"t{i}"))

    sender = threading.Thread(target=later)
    sender.start()
    try:
        api.wait_for(conversations=2, timeout=5)
        assert len(api.conversations) == 2
    finally:
        sender.join()


def test_wait_for_predicate(api: StandInAgentSightAPI, client: httpx.Client) -> None:
    timer = threading.Timer(0.05, lambda: client.post("/api/track/", json={"conversation_id": "m"}))
    timer.start()
    try:
        api.wait_for(lambda a: any(m["conversation_id"] == "m" for m in a.messages), timeout=5)
    finally:
        timer.join()
    api.wait_for(lambda a: len(a.messages) == 1, conversations=0, timeout=0)


def test_wait_for_timeout_message(api: StandInAgentSightAPI, client: httpx.Client) -> None:
    client.post(CONVERSATIONS, json=conversation(environment="staging"))
    started = time.perf_counter()
    with pytest.raises(AssertionError) as excinfo:
        api.wait_for(conversations=1, timeout=0.1)
    elapsed = time.perf_counter() - started
    assert 0.1 <= elapsed < 1
    message = str(excinfo.value)
    assert "timed out after 0.1s" in message
    assert "at least 1 accepted conversation(s)" in message
    assert "got 0 accepted conversation(s)" in message
    assert "POST /api/conversations/ -> 400" in message
    assert api.api_key not in message


def test_wait_for_needs_a_condition(api: StandInAgentSightAPI) -> None:
    with pytest.raises(ValueError, match="predicate"):
        api.wait_for()


def test_recorded_request_repr_redacts_api_key(
    api: StandInAgentSightAPI, client: httpx.Client
) -> None:
    client.post(CONVERSATIONS, json=conversation())
    text = repr(api.requests[0])
    assert api.api_key not in text
    assert "<redacted>" in text


# -- an outage, counts, orders over HTTP ----------------------------------------------


def test_fail_for_answers_every_request_with_the_status_until_the_outage_ends(
    api: StandInAgentSightAPI, client: httpx.Client
) -> None:
    api.fail_for(0.5)
    during = [client.post(CONVERSATIONS, json=conversation()).status_code for _ in range(3)]
    time.sleep(0.6)
    after = client.post(CONVERSATIONS, json=conversation())
    assert during == [503, 503, 503]
    assert after.status_code == 201
    assert len(api.conversations) == 1
    api.fail_for(30, status=429)
    throttled = client.post(CONVERSATIONS, json=conversation())
    assert throttled.status_code == 429
    assert throttled.headers["retry-after"] == "1"
    api.fail_for(0)  # ended early
    assert client.post(CONVERSATIONS, json=conversation()).status_code == 201


@pytest.mark.parametrize("seconds", [-1.0, float("nan"), float("inf")])
def test_fail_for_and_latency_refuse_nonsense_seconds(
    api: StandInAgentSightAPI, seconds: float
) -> None:
    with pytest.raises(ValueError, match="seconds"):
        api.fail_for(seconds)
    with pytest.raises(ValueError, match="latency"):
        api.set_latency(seconds)


def test_summary_counts_every_request_when_keep_lets_old_ones_go() -> None:
    with StandInAgentSightAPI(keep=3) as api, http_client(api) as c:
        for i in range(10):
            c.post(CONVERSATIONS, json=conversation(conversation_id=f"c{i}", is_used=i % 2 == 1))
        api.fail_next(2)
        c.post(CONVERSATIONS, json=conversation())
        c.post(CONVERSATIONS, json=conversation())
        c.post("/api/track/", json={"conversation_id": "c1", "message": "hi"})
        summary = api.summary()
        assert summary["requests"] == 13
        assert summary["by_status"] == {"201": 11, "503": 2}
        assert (summary["initialized"], summary["used"]) == (5, 5)
        assert summary["messages"] == 1
        assert 3 <= len(api.requests) <= 6  # the newest, not all 13
        assert api.conversations[-1]["conversation_id"] == "c9"
        api.reset()
        assert api.summary()["requests"] == 0
    with pytest.raises(ValueError, match="keep"):
        StandInAgentSightAPI(keep=0)


def test_orders_over_http_need_the_key_and_are_not_recorded(
    api: StandInAgentSightAPI, client: httpx.Client
) -> None:
    with http_client(api, auth=False) as anonymous:
        refused = anonymous.post("/_standin/down?seconds=20")
    assert refused.status_code == 401
    down = client.post("/_standin/down?seconds=20&status=502")
    assert down.status_code == 200
    assert 19 < down.json()["down_for"] <= 20
    assert client.post(CONVERSATIONS, json=conversation()).status_code == 502
    assert client.post("/_standin/down?seconds=0").status_code == 200
    assert client.post("/_standin/fail?n=2&status=500").json()["faults_pending"] == 2
    assert client.post("/_standin/throttle?retry_after=7").json()["faults_pending"] == 3
    statuses = [client.post(CONVERSATIONS, json=conversation()).status_code for _ in range(4)]
    assert statuses == [500, 500, 429, 201]
    assert client.post("/_standin/latency?seconds=0.2").json()["latency"] == 0.2
    started = time.monotonic()
    assert client.post(CONVERSATIONS, json=conversation()).status_code == 201
    assert time.monotonic() - started >= 0.2
    summary = client.get("/_standin/summary").json()
    assert summary["requests"] == 6  # the API's traffic only, not the orders
    assert summary["by_status"] == {"201": 2, "429": 1, "500": 2, "502": 1}
    assert [r.path for r in api.requests] == [CONVERSATIONS] * 6
    assert client.post("/_standin/reset").json()["requests"] == 0


@pytest.mark.parametrize(
    ("method", "path", "status", "detail"),
    [
        ("POST", "/_standin/explode", 404, "one of down, drop, fail"),
        ("GET", "/_standin/down?seconds=1", 405, "not allowed"),
        ("POST", "/_standin/down", 400, "down needs seconds="),
        ("POST", "/_standin/down?seconds=soon", 400, "could not convert"),
        ("POST", "/_standin/down?seconds=1&n=3", 400, "down takes seconds, status; not n"),
        ("POST", "/_standin/fail?status=99", 400, "HTTP status code"),
        ("POST", "/_standin/latency?seconds=-1", 400, "latency must be"),
    ],
)
def test_a_wrong_order_says_what_is_wrong(
    client: httpx.Client, method: str, path: str, status: int, detail: str
) -> None:
    answer = client.request(method, path)
    assert answer.status_code == status
    assert detail in answer.json()["detail"]


# -- CLI ---------------------------------------------------------------------------------


def test_cli_serves_until_terminated() -> None:
    key = generate_api_key()
    with subprocess.Popen(
        [sys.executable, "-m", "agentsight_middleware._standin", "--port", "0", "--api-key", key],
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(PACKAGE_PARENT), os.environ.get("PYTHONPATH", "")]),
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            banner = proc.stdout.readline()
            assert "listening on http://127.0.0.1:" in banner
            url = banner.rsplit(" ", 1)[1].strip()
            assert key in proc.stdout.readline()
            with httpx.Client(base_url=url, trust_env=False, verify=False) as c:
                response = c.post(
                    CONVERSATIONS,
                    json=conversation(),
                    headers={"Authorization": f"Api-Key {key}"},
                )
            assert response.status_code == 201
        finally:
            proc.terminate()
            out, err = proc.communicate(timeout=5)
    assert proc.returncode == 0, err
    assert "Stopped after 1 request(s): 201 x 1." in out


def test_the_standin_command_takes_orders_over_http_and_counts_them_at_the_end() -> None:
    # agentsight-middleware standin: what an operator runs beside a load test.
    key = generate_api_key()
    with subprocess.Popen(
        [sys.executable, "-m", "agentsight_middleware.cli", "standin", "--port", "0",
         "--api-key", key, "--keep", "5"],
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(PACKAGE_PARENT), os.environ.get("PYTHONPATH", "")]),
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:  # fmt: skip
        try:
            assert proc.stdout is not None
            url = proc.stdout.readline().rsplit(" ", 1)[1].strip()
            assert key in proc.stdout.readline()
            hint = proc.stdout.readline()
            assert f"{url}/_standin/down?seconds=20" in hint
            headers = {"Authorization": f"Api-Key {key}"}
            with httpx.Client(base_url=url, trust_env=False, headers=headers) as c:
                assert c.post("/_standin/down?seconds=30&status=503").status_code == 200
                down = [c.post(CONVERSATIONS, json=conversation()).status_code for _ in range(3)]
                assert c.post("/_standin/down?seconds=0").status_code == 200
                for _ in range(12):
                    assert c.post(CONVERSATIONS, json=conversation()).status_code == 201
        finally:
            proc.terminate()
            out, err = proc.communicate(timeout=5)
    assert down == [503, 503, 503]
    assert proc.returncode == 0, err
    assert "Stopped after 15 request(s): 201 x 12, 503 x 3." in out


def test_the_standin_command_on_a_taken_port_says_so() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "agentsight_middleware.cli", "standin", "--port", str(port)],
            env={
                **os.environ,
                "PYTHONPATH": os.pathsep.join(
                    [str(PACKAGE_PARENT), os.environ.get("PYTHONPATH", "")]
                ),
            },
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr


# -- HTTP on the wire: raw sockets --------------------------------------------------


def raw_exchange(api: StandInAgentSightAPI, data: bytes, answers: int) -> list[bytes]:
    """Send ``data`` as it is; the first ``answers`` answers, each head and body whole."""
    import socket

    host, port = api.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(data)
        buffer = b""
        out: list[bytes] = []
        while len(out) < answers:
            while b"\r\n\r\n" not in buffer:
                chunk = sock.recv(65536)
                if not chunk:
                    return out
                buffer += chunk
            head, _, rest = buffer.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(rest) < length:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                rest += chunk
            out.append(head + b"\r\n\r\n" + rest[:length])
            buffer = rest[length:]
        return out


def post_bytes(api: StandInAgentSightAPI, body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"POST /api/conversations/ HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Api-Key %s\r\n%sContent-Length: %d\r\n\r\n%s"
        % (api.api_key.encode(), extra, len(body), body)
    )


def test_pipelined_requests_are_answered_in_order(api: StandInAgentSightAPI) -> None:
    bodies = [json.dumps(conversation(conversation_id=f"p{i}")).encode() for i in range(5)]
    answers = raw_exchange(api, b"".join(post_bytes(api, body) for body in bodies), 5)
    assert [json.loads(a.split(b"\r\n\r\n", 1)[1])["conversation_id"] for a in answers] == [
        f"p{i}" for i in range(5)
    ]
    assert all(a.startswith(b"HTTP/1.1 201 Created\r\n") for a in answers)


def test_a_held_answer_holds_the_pipeline_behind_it(api: StandInAgentSightAPI) -> None:
    # One connection, answered in order: the second waits for the first's latency.
    api.set_latency(0.2)
    started = time.perf_counter()
    data = post_bytes(api, json.dumps(conversation(conversation_id="a")).encode())
    data += post_bytes(api, json.dumps(conversation(conversation_id="b")).encode())
    answers = raw_exchange(api, data, 2)
    assert time.perf_counter() - started >= 0.4
    assert [json.loads(a.split(b"\r\n\r\n", 1)[1])["conversation_id"] for a in answers] == [
        "a",
        "b",
    ]


def test_reset_releases_a_delayed_answer_at_once(api: StandInAgentSightAPI) -> None:
    api.set_latency(30)
    answers: list[bytes] = []
    body = json.dumps(conversation()).encode()
    caller = threading.Thread(
        target=lambda: answers.extend(raw_exchange(api, post_bytes(api, body), 1))
    )
    started = time.perf_counter()
    caller.start()
    time.sleep(0.1)
    api.reset()
    caller.join(5)
    assert time.perf_counter() - started < 2
    assert answers
    assert answers[0].startswith(b"HTTP/1.1 201")


def test_a_malformed_request_gets_400_and_the_connection_closed(
    api: StandInAgentSightAPI,
) -> None:
    answers = raw_exchange(api, b"NOT HTTP AT ALL\r\n\r\n", 2)
    assert len(answers) == 1
    assert answers[0].startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"Connection: close" in answers[0]
    assert api.requests == []


def test_an_invalid_content_length_gets_400(api: StandInAgentSightAPI) -> None:
    data = b"POST /api/conversations/ HTTP/1.1\r\nHost: x\r\nContent-Length: ten\r\n\r\n{}"
    [answer] = raw_exchange(api, data, 1)
    assert answer.startswith(b"HTTP/1.1 400 ")


def test_a_body_over_the_limit_gets_413(
    api: StandInAgentSightAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_standin_server, "MAX_BODY_BYTES", 1000)
    [answer] = raw_exchange(api, post_bytes(api, b"x" * 5000), 1)
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b"Connection: close" in answer
    assert api.requests == []


def test_expect_100_continue_is_answered_before_the_body(api: StandInAgentSightAPI) -> None:
    import socket

    body = json.dumps(conversation()).encode()
    head = post_bytes(api, body, b"Expect: 100-continue\r\n")[: -len(body)]
    host, port = api.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(head)
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        assert sock.recv(65536).startswith(b"HTTP/1.1 201")


def test_http10_without_keep_alive_is_closed_after_its_answer(api: StandInAgentSightAPI) -> None:
    body = json.dumps(conversation()).encode()
    data = post_bytes(api, body).replace(b"HTTP/1.1", b"HTTP/1.0", 1)
    answers = raw_exchange(api, data + data, 2)
    assert len(answers) == 1
    assert b"Connection: close" in answers[0]


# -- found in review of the asyncio server ------------------------------------------


def test_thousands_of_pipelined_requests_behind_a_held_one_are_all_answered(
    api: StandInAgentSightAPI,
) -> None:
    # Answering them once released must not recurse once per request.
    api.set_latency(0.3)
    data = b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n" * 3000
    started = time.perf_counter()
    threading.Timer(0.1, api.reset).start()  # releases the held one early
    answers = raw_exchange(api, data, 3000)
    assert len(answers) == 3000
    assert all(a.startswith(b"HTTP/1.1 404 ") for a in answers)
    assert time.perf_counter() - started < 5


def test_100_continue_waits_for_the_answers_before_it(api: StandInAgentSightAPI) -> None:
    import socket

    api.set_latency(0.3)
    first = post_bytes(api, json.dumps(conversation(conversation_id="a")).encode())
    body = json.dumps(conversation(conversation_id="b")).encode()
    second_head = post_bytes(api, body, b"Expect: 100-continue\r\n")[: -len(body)]
    host, port = api.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(first + second_head)
        received = b""
        while b"100 Continue" not in received:
            received += sock.recv(65536)
        # The first request's answer came first, then the interim one for the second.
        assert received.index(b"HTTP/1.1 201") < received.index(b"HTTP/1.1 100 Continue")
        sock.sendall(body)
        rest = sock.recv(65536)
        while b'"conversation_id":"b"' not in rest:
            rest += sock.recv(65536)
    assert [c["conversation_id"] for c in api.conversations] == ["a", "b"]


def test_stop_ends_a_connection_whose_client_does_not_read() -> None:
    import socket

    api = StandInAgentSightAPI().start()
    host, port = api.url.removeprefix("http://").rsplit(":", 1)
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((host, int(port)))
        request = b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            for _ in range(40):  # answers never read, until the server stops reading too
                sock.send(request * 1000)
                time.sleep(0.01)
        sock.settimeout(5)
        started = time.perf_counter()
        api.stop()
        assert time.perf_counter() - started < 2
        # What was buffered for it is dropped: the client sees its connection end (EOF or
        # reset) instead of waiting for ever on a socket nobody serves.
        try:
            while sock.recv(1 << 16):
                pass
            ended = "eof"
        except ConnectionResetError:
            ended = "reset"
        except TimeoutError:
            ended = "still open"
    assert ended in ("eof", "reset")


def test_a_protocol_upgrade_is_refused_once_by_either_parser(api: StandInAgentSightAPI) -> None:
    body = json.dumps(conversation()).encode()
    data = post_bytes(
        api, body, b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AA\r\n"
    )
    answers = raw_exchange(api, data, 2)
    assert len(answers) == 1
    assert answers[0].startswith(b"HTTP/1.1 400 ")
    assert b"Protocol upgrade is not supported." in answers[0]
    assert api.requests == []


def test_both_parsers_skip_a_crlf_between_requests_and_want_a_host(
    api: StandInAgentSightAPI,
) -> None:
    answers = raw_exchange(
        api, b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n\r\nGET /nope HTTP/1.1\r\nHost: x\r\n\r\n", 2
    )
    assert [a[:12] for a in answers] == [b"HTTP/1.1 404"] * 2
    [answer] = raw_exchange(api, b"GET /nope HTTP/1.1\r\n\r\n", 1)
    assert answer.startswith(b"HTTP/1.1 400 ")


def test_json_nested_past_the_recursion_limit_is_a_parse_error(
    api: StandInAgentSightAPI, client: httpx.Client
) -> None:
    response = client.post(
        CONVERSATIONS, content=b"[" * 100_000, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert "JSON parse error" in response.json()["detail"]


def test_a_crlf_before_a_request_is_skipped_however_the_segments_cut_it(
    api: StandInAgentSightAPI,
) -> None:
    import socket

    request = b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"
    host, port = api.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        for chunks in (
            [request],
            [b"\r\n" + request],
            [b"\r\n", request],
            [b"\r", b"\n" + request],
        ):
            for chunk in chunks:
                sock.sendall(chunk)
                time.sleep(0.02)  # each its own segment
            answer = sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 404 "), (chunks, answer[:40])
