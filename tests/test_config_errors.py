"""Options that cannot work fail when the app starts, with a message that says what to write;
options that can work are taken as they are, with their meaning kept."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.responses import HTMLResponse
from starlette.routing import Route

from agentsight_middleware import AgentSightMiddleware, AgentSightWSGIMiddleware
from agentsight_middleware._credentials import Credentials
from agentsight_middleware._store import LocalStore
from agentsight_middleware.testing import RecordingTracker, StandInAgentSightAPI

from .test_store import make_payload

KEY = "ags_" + "1" * 32 + "_abcdef"


def make_app() -> Starlette:
    return Starlette(routes=[Route("/", lambda request: HTMLResponse("<p>hi</p>"))])


def build(**options: Any) -> AgentSightMiddleware:
    options.setdefault("widget_pages", ["/"])
    return AgentSightMiddleware(make_app(), **options)


@pytest.mark.parametrize("interface", ["asgi", "wsgi"])
@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        # A wait of NaN, infinity or 1e12 s crashed close() at exit (the clocks overflow).
        ({"shutdown_timeout": float("nan")}, "shutdown_timeout must be a number of seconds"),
        ({"shutdown_timeout": float("inf")}, "shutdown_timeout must be seconds >= 0 and at most"),
        ({"shutdown_timeout": 1e12}, "shutdown_timeout must be seconds >= 0 and at most 86400"),
        ({"shutdown_timeout": -1}, "shutdown_timeout must be seconds >= 0"),
        ({"shutdown_timeout": "5"}, "shutdown_timeout must be a number of seconds, got '5'"),
        ({"tracker_timeout": 1e12, "tracker": RecordingTracker()}, "tracker_timeout must be"),
        ({"conversation_id_sources": None}, "conversation_id_sources must be a list"),
        ({"conversation_id_sources": []}, "would start a new conversation on every chat"),
        ({"api_key": 12345}, "api_key must be a string (ags_...), got int"),
        ({"api_key": KEY, "endpoint": b"https://x"}, "endpoint= must be a URL string"),
        (
            {"api_key": KEY, "endpoint": "https://api.example/?region=eu"},
            "takes no ?query or #fragment",
        ),
        ({"api_key": KEY, "endpoint": "https://api.example/#x"}, "takes no ?query"),
        ({"api_key": KEY, "endpoint": "https://api example.com"}, "no host or an invalid one"),
        # Checked without a key too: the typo must not wait for the day the key is set.
        ({"endpoint": "not a url"}, "endpoint= 'not a url' must be an http:// or https:// URL"),
        ({"endpoint": "ftp://api.example"}, "must be an http:// or https:// URL"),
        ({"tracker": RecordingTracker(), "endpoint": "https://x.example"}, "or endpoint="),
        ({"tracker": RecordingTracker(), "local_store": "events.sqlite3"}, "or local_store="),
        ({"local_store": 5}, "local_store must be a file path (str or pathlib.Path), got 5"),
    ],
)
def test_refused_at_start_up(
    interface: str, options: dict[str, Any], fragment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AGENTSIGHT_API_KEY", raising=False)
    monkeypatch.delenv("AGENTSIGHT_API_ENDPOINT", raising=False)
    cls = AgentSightMiddleware if interface == "asgi" else AgentSightWSGIMiddleware
    with pytest.raises(ValueError) as info:  # noqa: PT011 - the message is checked below
        cls(make_app(), widget_pages=["/"], chat_routes=["POST /c"], **options)
    assert fragment in str(info.value)


def test_an_endpoint_from_the_environment_is_named_as_such(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AGENTSIGHT_API_ENDPOINT", "https://api.example/?x=1")
    with pytest.raises(ValueError, match=r"AGENTSIGHT_API_ENDPOINT 'https://api.example/\?x=1'"):
        build(api_key=KEY)


@pytest.mark.parametrize("interface", ["asgi", "wsgi"])
@pytest.mark.parametrize("given", ["argument", "variable"])
def test_the_events_url_given_as_the_endpoint_is_refused_at_start_up(
    interface: str, given: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The README names <endpoint>/api/conversations/: pasted whole, every event went to
    # .../api/conversations/api/conversations/, a 404 said only once the first event was out.
    cls = AgentSightMiddleware if interface == "asgi" else AgentSightWSGIMiddleware
    with StandInAgentSightAPI() as api:
        events_url = api.url + "/api/conversations/"
        options: dict[str, Any] = {"api_key": api.api_key}
        if given == "argument":
            options["endpoint"] = events_url
            name = "endpoint="
        else:
            monkeypatch.setenv("AGENTSIGHT_API_ENDPOINT", events_url)
            name = "AGENTSIGHT_API_ENDPOINT"
        with pytest.raises(ValueError, match="is the events URL itself") as info:
            cls(make_app(), widget_pages=["/"], **options)
        assert f"{name} {events_url!r}" in str(info.value)
        assert f"pass the API's base URL, {api.url!r}" in str(info.value)
        assert api.summary()["requests"] == 0


def test_an_upper_case_scheme_is_a_url_like_any_other() -> None:
    credentials = Credentials.resolve(
        api_key=KEY, endpoint="HTTPS://api.example/base", environment=None, env={}
    )
    assert credentials is not None
    assert credentials.conversations_url == "https://api.example/base/api/conversations/"


def test_a_local_store_that_is_a_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AGENTSIGHT_API_KEY", raising=False)
    with pytest.raises(ValueError, match=r"is a folder; name a file in it, e\.g\. ") as info:
        build(local_store=tmp_path)
    assert os.path.join(str(tmp_path), "agentsight-events.sqlite3") in str(info.value)


def test_a_local_store_in_a_folder_it_cannot_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The events were lost one batch after another, each with a logged error. The folder is
    # made immutable (chattr +i), which even root cannot write in (tests run as root here);
    # as another user, taking the write permission away is enough.
    monkeypatch.delenv("AGENTSIGHT_API_KEY", raising=False)
    folder = tmp_path / "volume"
    folder.mkdir()
    chattr = shutil.which("chattr")
    if os.geteuid() != 0:
        folder.chmod(0o555)
    elif chattr is None or subprocess.run([chattr, "+i", str(folder)]).returncode != 0:
        pytest.skip("needs chattr +i (root, on ext4): nothing else stops root writing here")
    try:
        with pytest.raises(ValueError, match="this process cannot write in"):
            build(local_store=folder / "events.sqlite3")
    finally:
        if os.geteuid() != 0:
            folder.chmod(0o755)
        else:
            subprocess.run([str(chattr), "-i", str(folder)], check=True)


def _other_programs_database(path: Path) -> None:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE django_session (session_key TEXT)")
        conn.commit()


def _newer_events_file(path: Path) -> None:
    with LocalStore(path) as store:
        store.write([make_payload("conv_000000000001")])
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA user_version = 2")
        conn.commit()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda path: path.write_bytes(b"not a database, " * 256), "file is not a database"),
        (_other_programs_database, "is a SQLite database but not an agentsight events file"),
        (_newer_events_file, "has events schema 2, newer than this agentsight-middleware"),
    ],
    ids=["not-sqlite", "another-programs-database", "newer-schema"],
)
def test_a_local_store_that_is_no_events_file_fails_at_start_up(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    make: Callable[[Path], object],
    message: str,
) -> None:
    # local_store="db.sqlite3" (the app's own database) or a file a newer release wrote:
    # the app started, then lost every event, an error logged at the first.
    monkeypatch.delenv("AGENTSIGHT_API_KEY", raising=False)
    path = tmp_path / "events.sqlite3"
    make(path)
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        build(local_store=path)
    assert f"local_store={str(path)!r}" in str(info.value)


def test_a_local_store_that_is_empty_or_an_events_file_is_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AGENTSIGHT_API_KEY", raising=False)
    empty = tmp_path / "empty.sqlite3"
    empty.touch()
    events = tmp_path / "events.sqlite3"
    with LocalStore(events) as store:
        store.write([make_payload("conv_000000000001")])
    for path in (empty, events):
        build(local_store=path).close()


def test_a_local_store_another_process_keeps_locked_is_left_to_the_first_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Start-up must neither wait for the lock nor take it for a bad file.
    monkeypatch.delenv("AGENTSIGHT_API_KEY", raising=False)
    path = tmp_path / "events.sqlite3"
    with LocalStore(path) as store:
        store.write([make_payload("conv_000000000001")])
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("PRAGMA locking_mode = EXCLUSIVE")
        holder.execute("BEGIN EXCLUSIVE")
        holder.execute("UPDATE events SET sent_at = sent_at")
        started = time.monotonic()
        middleware = build(local_store=path)
        assert time.monotonic() - started < 1.0
        middleware.close()
    finally:
        holder.execute("ROLLBACK")
        holder.close()


@pytest.mark.parametrize("name", ["__Host-conversation", "__Secure-conversation"])
def test_prefixed_cookie_names_are_always_secure(name: str) -> None:
    # Browsers drop a __Host- or __Secure- cookie set without Secure: on plain http (TLS
    # ended at a proxy not named in trusted_proxies) the id never came back.
    mw = build(tracker=RecordingTracker(), cookie_name=name)
    settings = mw._settings
    assert settings.set_cookie("conv_0123456789ab", secure=False).endswith(b"; Secure")
    assert settings.set_cookie_text("conv_0123456789ab", False).endswith("; Secure")
    plain = build(tracker=RecordingTracker())._settings
    assert not plain.set_cookie("conv_0123456789ab", secure=False).endswith(b"; Secure")


def test_an_id_header_with_an_underscore_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="agentsight_middleware"):
        build(tracker=RecordingTracker(), conversation_id_header="X_Conversation_Id")
    [record] = [r for r in caplog.records if "conversation_id_header" in r.getMessage()]
    assert "gunicorn and nginx drop such headers" in record.getMessage()
    assert "'X-Conversation-Id'" in record.getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="agentsight_middleware"):
        build(tracker=RecordingTracker(), conversation_id_header="X-Conversation-Id")
    assert not [r for r in caplog.records if "conversation_id_header" in r.getMessage()]


def test_a_configuration_error_is_logged_too(caplog: pytest.LogCaptureFixture) -> None:
    # Starlette builds the middleware at the lifespan's start, where a server need not
    # print what stopped it.
    with (
        caplog.at_level(logging.ERROR, logger="agentsight_middleware"),
        pytest.raises(ValueError, match="not an AgentSight API key"),
    ):
        build(api_key="sk-live-1234567890abcdef")
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.getMessage().startswith("agentsight-middleware is misconfigured: api_key=")
    assert "1234567890abcdef" not in record.getMessage()  # the key stays masked


def test_a_tracker_without_the_calls_names_both_sdk_generations() -> None:
    # The message named only agentsight.ConversationTracker(), which the SDK that
    # `pip install agentsight` gives today (0.1.x) does not have.
    with pytest.raises(ValueError, match="lacks initialize_conversation") as refused:
        build(tracker=object())
    message = str(refused.value)
    assert "agentsight_middleware.sdk.AgentSightSDK() (agentsight 0.1.x)" in message
    assert "agentsight.ConversationTracker() (agentsight 0.0.x)" in message


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"widget_pages": ["pricing"]}, "widget_pages[0]: 'pricing' must start with '/'"),
        ({"widget_page": ["/"]}, "did you mean 'widget_pages'?"),
    ],
)
def test_add_middleware_reports_an_error_through_the_lifespan(
    options: dict[str, Any], fragment: str
) -> None:
    # Starlette builds the middleware inside the lifespan call; raised there, the error
    # was taken by uvicorn's default --lifespan auto (and `fastapi run`, which cannot
    # change it) for "lifespan unsupported", and every request got a 500. Told as
    # lifespan.startup.failed, it stops any server.
    import anyio

    app = make_app()
    app.add_middleware(AgentSightMiddleware, **options)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "lifespan.startup"}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(dict(message))

    async def lifespan() -> None:
        await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(logging.getLogger("agentsight_middleware"), "disabled", True)
        # Raised too, after the message (as Starlette's router does): TestClient and
        # asgi-lifespan read the outcome of the call, not the message.
        with pytest.raises((TypeError, ValueError)):
            anyio.run(lifespan)
    [failed] = sent
    assert failed["type"] == "lifespan.startup.failed"
    assert fragment in failed["message"]
    # A server without lifespan: each request raises it (a 500), a new exception each
    # time (the same one raised again would grow its traceback with every request).
    raised = []
    for _ in range(2):
        request = {"type": "http", "method": "GET", "path": "/", "headers": []}
        with pytest.raises((TypeError, ValueError)) as error:
            anyio.run(app, request, receive, send)
        raised.append(error.value)
    assert fragment in str(raised[0])
    assert str(raised[0]) == str(raised[1])
    assert raised[0] is not raised[1]
    # Built by the app's own code, the error is still raised right there.
    with pytest.raises((TypeError, ValueError), match=r"must start with|did you mean"):
        AgentSightMiddleware(make_app(), **options)


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"widget_pages": ["pricing"]}, "widget_pages[0]: 'pricing' must start with '/'"),
        ({"widget_pages": ["/"], "api_key": "sk-123"}, "not an AgentSight API key"),
    ],
)
def test_uvicorn_with_its_default_lifespan_stops_on_a_configuration_error(
    options: dict[str, Any], fragment: str, tmp_path: Path
) -> None:
    # The README's add_middleware() line under a plain `uvicorn main:app`: the server
    # started, and answered every request, health checks too, with a 500.
    import sys

    env = {
        **os.environ,
        "AGENTSIGHT_TEST_OPTIONS": json.dumps(options),
        "AGENTSIGHT_API_KEY": "",
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
    }
    done = subprocess.run(
        [sys.executable, "-m", "uvicorn", "tests.apps.misconfigured_app:app", "--port", "0"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode != 0, done.stderr
    assert "Application startup failed. Exiting." in done.stderr
    # Said by uvicorn itself, from lifespan.startup.failed, as well as by the logger.
    [said] = [line for line in done.stderr.splitlines() if line.startswith("ERROR:    agentsight")]
    assert said.startswith("ERROR:    agentsight-middleware is misconfigured: ")
    assert fragment in said
    assert "lifespan' protocol appears unsupported" not in done.stderr


def test_put_in_django_s_middleware_setting_it_says_where_it_goes() -> None:
    # Django builds each settings.MIDDLEWARE entry as entry(get_response): the message
    # said only "no rules", and the rules cannot be passed there.
    from agentsight_middleware import AgentSightWSGIMiddleware

    def get_response(request: object) -> object:
        return request

    with pytest.raises(ValueError, match="no rules") as refused:
        AgentSightWSGIMiddleware(get_response)
    assert "Django: in wsgi.py or asgi.py; it is not a settings.MIDDLEWARE entry" in str(
        refused.value
    )


@pytest.mark.parametrize("quote", ['"', "'"])
def test_a_key_in_quotes_is_told_to_lose_them(quote: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # docker run --env-file keeps AGENTSIGHT_API_KEY="ags_..." with its quotes: the message
    # said to copy the key again, which was right all along.
    key = "ags_" + "0123456789abcdef" * 2 + "_abcdef"
    monkeypatch.setenv("AGENTSIGHT_API_KEY", f"{quote}{key}{quote}")
    with pytest.raises(ValueError, match="not an AgentSight API key") as refused:
        build()
    assert str(refused.value).endswith(
        "; remove the quotes around it (the tool that set it kept them)"
    )
    assert key[8:] not in str(refused.value)
    monkeypatch.setenv("AGENTSIGHT_API_KEY", "ags_nothex")
    with pytest.raises(ValueError, match="copy it again from the AgentSight dashboard"):
        build()


# Starlette 1.x's TestClient wants httpx2 and warns when it gets httpx, which this
# suite has: the warning is not what this test is about.
@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient` is deprecated")
def test_testclient_stops_on_a_misconfigured_middleware_and_does_not_hang() -> None:
    # The lifespan said startup.failed and returned: Starlette's TestClient (and
    # asgi-lifespan) read how the call ended, so the app "started", every request
    # raised, and the TestClient's shutdown waited for ever. Raised after the message
    # now, as Starlette's own router does (review).
    import threading

    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    app = FastAPI()

    @app.get("/health")
    def health() -> dict[str, bool]:
        return {"ok": True}

    app.add_middleware(AgentSightMiddleware, widget_pages=["pricing"])
    outcome: list[BaseException | str] = []

    def run() -> None:
        try:
            with TestClient(app):
                outcome.append("started")
        except BaseException as exc:
            outcome.append(exc)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(logging.getLogger("agentsight_middleware"), "disabled", True)
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(10)
    assert not thread.is_alive(), f"TestClient hung at shutdown after {outcome}"
    [raised] = outcome
    assert isinstance(raised, ValueError)
    assert "widget_pages[0]: 'pricing' must start with '/'" in str(raised)


def test_delivery_to_the_api_is_said_at_start_up(
    caplog: pytest.LogCaptureFixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An operator could not tell from the log that events were being sent (an operator's
    # run): one INFO line says where, with which key (masked) and how they are kept.
    monkeypatch.delenv("AGENTSIGHT_ENVIRONMENT", raising=False)
    key = "ags_" + "0123456789abcdef" * 2 + "_abcdef"
    with caplog.at_level(logging.INFO, logger="agentsight_middleware"):
        build(api_key=key, endpoint="http://127.0.0.1:9").close()
        build(api_key=key, outbox=tmp_path / "outbox.sqlite3", environment="development").close()
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("sending")]
    assert said == [
        "sending AgentSight events to http://127.0.0.1:9/api/conversations/ (key ags_0123"
        "********, environment production), queued in memory (up to 10000)",
        "sending AgentSight events to https://api.agentsight.io/api/conversations/ (key "
        f"ags_0123********, environment development), kept in the outbox "
        f"{str(tmp_path / 'outbox.sqlite3')!r} until accepted",
    ]
    assert key[8:] not in caplog.text


def test_close_before_any_event_closes_the_outbox(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The outbox is opened at start-up (a bad path fails there), the sink that closes it
    # only at the first event: close() before any event left its SQLite connection open
    # (Python 3.13's ResourceWarning, an error under filterwarnings = error).
    from agentsight_middleware import _base

    opened: list[Any] = []
    real_open = _base._open_outbox

    def recording_open(path: Any) -> Any:
        opened.append(real_open(path))
        return opened[-1]

    monkeypatch.setattr(_base, "_open_outbox", recording_open)
    build(api_key=KEY, outbox=tmp_path / "outbox.sqlite3").close()
    [outbox] = opened
    assert outbox._conn is None
