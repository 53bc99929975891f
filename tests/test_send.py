"""``agentsight-middleware send`` replays a local events file to the API, once."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import pytest

from agentsight_middleware._credentials import Credentials
from agentsight_middleware._store import LocalStore
from agentsight_middleware.cli import main
from agentsight_middleware.testing import StandInAgentSightAPI

from .conftest import website_answering_200
from .test_store import BASE, make_payload


def _file(path: Path, count: int) -> Path:
    with LocalStore(path) as store:
        store.write([make_payload(f"conv_{i:012x}", used=i % 3 == 0) for i in range(count)])
    return path


def test_send_is_idempotent_and_survives_an_unreliable_api(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = _file(tmp_path / "events.sqlite3", 50)
    with StandInAgentSightAPI() as api:
        api.fail_next(3, status=502)
        api.throttle_next(1, retry_after="1")
        args = ["send", "--db", str(db), "--api-key", api.api_key, "--endpoint", api.url]
        assert main(args) == 0
        assert "sent 50, skipped 0 (sent before), failed 0" in capsys.readouterr().out
        assert sorted(b["conversation_id"] for b in api.conversations) == [
            f"conv_{i:012x}" for i in range(50)
        ]
        assert main(args) == 0
        assert "sent 0, skipped 50 (sent before), failed 0" in capsys.readouterr().out
        assert len(api.conversations) == 50


def test_send_reports_refused_events_and_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "events.sqlite3"
    bad = make_payload("conv_bad000000001")
    bad["environment"] = "staging"  # the API answers 400
    with LocalStore(db) as store:
        store.write([make_payload("conv_good00000001"), bad])
    with StandInAgentSightAPI() as api:
        code = main(["send", "--db", str(db), "--api-key", api.api_key, "--endpoint", api.url])
    captured = capsys.readouterr()
    assert code == 1
    assert "sent 1, skipped 0 (sent before), failed 1" in captured.out
    assert "HTTP 400" in captured.err
    assert "environment" in captured.err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param([], "no API key", id="no-key"),
        # Named by the flag: it said "api_key= '********' ..." and "endpoint= 'x' ...",
        # the middleware's argument names, which the command line has not.
        pytest.param(
            ["--api-key", "nope"], "--api-key '********' is not an AgentSight API key", id="key"
        ),
        pytest.param(
            ["--api-key", "ags_" + "1" * 32 + "_abcdef", "--endpoint", "api.agentsight.io"],
            "--endpoint 'api.agentsight.io' must be an http:// or https:// URL",
            id="endpoint",
        ),
    ],
)
def test_send_needs_a_valid_key_and_names_the_flag_it_refuses(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    monkeypatch.delenv("AGENTSIGHT_API_KEY", raising=False)
    monkeypatch.delenv("AGENTSIGHT_API_ENDPOINT", raising=False)
    db = _file(tmp_path / "events.sqlite3", 1)
    assert main(["send", "--db", str(db), *args]) == 1
    err = capsys.readouterr().err
    assert message in err
    assert "api_key=" not in err
    assert "endpoint=" not in err


def test_send_names_the_variable_it_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AGENTSIGHT_API_KEY", "nope")
    monkeypatch.setenv("AGENTSIGHT_API_ENDPOINT", "api.agentsight.io")
    db = _file(tmp_path / "events.sqlite3", 1)
    assert main(["send", "--db", str(db)]) == 1
    assert "AGENTSIGHT_API_ENDPOINT 'api.agentsight.io' must be" in capsys.readouterr().err
    monkeypatch.delenv("AGENTSIGHT_API_ENDPOINT")
    assert main(["send", "--db", str(db)]) == 1
    assert "AGENTSIGHT_API_KEY '********' is not an AgentSight API key" in (capsys.readouterr().err)


def test_send_refuses_the_events_url_as_its_endpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = _file(tmp_path / "events.sqlite3", 2)
    with StandInAgentSightAPI() as api:
        events_url = api.url + "/api/conversations/"
        args = ["send", "--db", str(db), "--api-key", api.api_key, "--endpoint", events_url]
        assert main(args) == 1
        assert api.summary()["requests"] == 0
    err = capsys.readouterr().err
    assert f"--endpoint {events_url!r} is the events URL itself" in err
    assert f"pass the API's base URL, {api.url!r}" in err


def test_send_does_not_read_agentsight_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Each stored body keeps its own environment; send refused to run when the variable
    # held a value the middleware would refuse, though it never uses it.
    monkeypatch.setenv("AGENTSIGHT_ENVIRONMENT", "staging")
    db = _file(tmp_path / "events.sqlite3", 3)
    with StandInAgentSightAPI() as api:
        code = main(["send", "--db", str(db), "--api-key", api.api_key, "--endpoint", api.url])
        environments = {body["environment"] for body in api.conversations}
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "sent 3, skipped 0 (sent before), failed 0" in captured.out
    assert environments == {make_payload("conv_x")["environment"]}


def test_send_without_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = "ags_" + "1" * 32 + "_abcdef"
    assert main(["send", "--db", str(tmp_path / "none.sqlite3"), "--api-key", key]) == 1
    assert "no events file at" in capsys.readouterr().err


def _visits(path: Path, count: int) -> Path:
    # Each visitor views the page, then chats: the two events of a conversation are adjacent.
    with LocalStore(path) as store:
        for i in range(count):
            cid = f"conv_{i:012x}"
            store.write([make_payload(cid, used=False), make_payload(cid, used=True)])
    return path


def test_send_keeps_each_conversations_order(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = _visits(tmp_path / "events.sqlite3", 300)
    with StandInAgentSightAPI() as api:
        api.set_latency(0.002)
        assert main(["send", "--db", str(db), "--api-key", api.api_key, "--endpoint", api.url]) == 0
        first_seen: dict[str, bool] = {}
        for body in api.conversations:
            first_seen.setdefault(body["conversation_id"], body["is_used"])
    assert len(first_seen) == 300
    # The chat (is_used true) never reaches the API before its page view.
    assert not any(first_seen.values())
    assert "sent 600" in capsys.readouterr().out


def test_a_failed_event_holds_back_the_rest_of_its_conversation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from agentsight_middleware import _replay

    monkeypatch.setattr(_replay, "backoff", lambda attempt: 0.0)
    db = _visits(tmp_path / "events.sqlite3", 1)
    with StandInAgentSightAPI() as api:
        args = ["send", "--db", str(db), "--api-key", api.api_key, "--endpoint", api.url]
        api.fail_next(4, status=503)  # every attempt at the page view
        assert main(args) == 1
        assert api.conversations == []  # the chat was not sent before its page view
        assert "failed 1 (tried again next run), left 1 for the next run" in capsys.readouterr().out
        assert main(args) == 0  # the next run sends both, in order
        sent = [(b["conversation_id"], b["is_used"]) for b in api.conversations]
    assert sent == [("conv_000000000000", False), ("conv_000000000000", True)]


def test_a_failure_in_one_environment_does_not_hold_back_another(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # One id in two environments is two conversations (as the report counts them): a
    # development page view that fails held back production's view and chat of that id.
    from agentsight_middleware import _replay

    monkeypatch.setattr(_replay, "backoff", lambda attempt: 0.0)
    db = tmp_path / "events.sqlite3"
    cid = "conv_000000000abc"
    with LocalStore(db) as store:
        store.write([make_payload(cid, environment="development", at=BASE)])
        store.write([make_payload(cid, at=BASE + 1), make_payload(cid, used=True, at=BASE + 2)])
    with StandInAgentSightAPI() as api:
        args = ["send", "--db", str(db), "--api-key", api.api_key, "--endpoint", api.url]
        api.fail_next(4, status=503)  # every attempt at the first event sent: development's
        credentials = Credentials.resolve(
            api_key=api.api_key, endpoint=api.url, environment=None, read_environment=False
        )
        assert credentials is not None
        summary = _replay.replay(db, credentials, concurrency=1)
        assert (summary.sent, summary.failed, summary.left) == (2, 1, 0)
        sent = [(b["environment"], b["is_used"]) for b in api.conversations]
        assert sent == [("production", False), ("production", True)]
        assert main(args) == 0  # development's, on the next run
        assert [b["environment"] for b in api.conversations][2:] == ["development"]


def test_an_event_the_api_refuses_does_not_hold_back_the_rest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A 400 is final (a bad payload): waiting would change nothing, and live delivery
    # goes on with the next event too.
    db = tmp_path / "events.sqlite3"
    bad_view = make_payload("conv_bad000000001", used=False)
    bad_view["environment"] = "staging"  # the API answers 400
    with LocalStore(db) as store:
        store.write([bad_view, make_payload("conv_ok0000000001", used=False)])
        store.write([make_payload("conv_bad000000001", used=True)])
    with StandInAgentSightAPI() as api:
        args = ["send", "--db", str(db), "--api-key", api.api_key, "--endpoint", api.url]
        assert main(args) == 1
        sent = sorted((b["conversation_id"], b["is_used"]) for b in api.conversations)
        first = capsys.readouterr()
        # The refused event stays in the file, unsent, and says so on every run.
        assert main(args) == 1
        again = capsys.readouterr()
        assert len(api.conversations) == 2
    assert sent == [("conv_bad000000001", True), ("conv_ok0000000001", False)]
    refused = "failed 1 (tried again next run; the API refused 1 for good)\n"
    assert "sent 2, skipped 0 (sent before), " + refused in first.out
    assert "HTTP 400" in first.err
    assert "sent 0, skipped 2 (sent before), " + refused in again.out


def test_send_stops_on_a_refused_key_and_on_an_endpoint_that_is_not_the_api(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = _file(tmp_path / "events.sqlite3", 40)
    with StandInAgentSightAPI() as api:
        wrong_key = "ags_" + "0" * 32 + "_000000"
        assert main(["send", "--db", str(db), "--api-key", wrong_key, "--endpoint", api.url]) == 1
        # Stopped at once: not one request per event with a key the API refuses.
        assert len(api.requests) <= 8
    captured = capsys.readouterr()
    assert "stopped: the API refused the key" in captured.err
    assert "left 40 for the next run" in captured.out

    with website_answering_200() as url:
        assert main(["send", "--db", str(db), "--api-key", wrong_key, "--endpoint", url]) == 1
    captured = capsys.readouterr()
    assert "check --endpoint" in captured.err
    # Nothing was marked sent: the right endpoint afterwards gets every event.
    with StandInAgentSightAPI() as api:
        args = ["send", "--db", str(db), "--api-key", api.api_key, "--endpoint", api.url]
        assert main(args) == 0
        assert len(api.conversations) == 40


def test_send_gives_up_on_an_unreachable_api(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    from agentsight_middleware import _replay

    monkeypatch.setattr(_replay, "_STALLED", 0.5)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed once the block ends: connections are refused
    db = _file(tmp_path / "events.sqlite3", 200)
    key = "ags_" + "1" * 32 + "_abcdef"
    assert (
        main(["send", "--db", str(db), "--api-key", key, "--endpoint", f"http://127.0.0.1:{port}"])
        == 1
    )
    captured = capsys.readouterr()
    assert "stopped: the API could not be reached" in captured.err
    assert "sent 0," in captured.out
    assert "left 200 for the next run" in captured.out


def test_an_interrupted_send_marks_what_was_accepted_and_the_next_run_sends_the_rest(
    tmp_path: Path,
) -> None:
    import signal
    import subprocess

    db = _visits(tmp_path / "events.sqlite3", 400)
    with StandInAgentSightAPI() as api:
        api.set_latency(0.02)
        command, env = _send_cli(tmp_path, db, api.api_key, api.url)
        first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        # A second run while the first holds the file is refused, not run alongside.
        _until_received(api, 100)
        second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
        assert second.returncode == 1
        assert "another `send` is replaying" in second.stderr
        first.send_signal(signal.SIGINT)
        out, err = first.communicate(timeout=60)
        assert first.returncode == 130, err
        received = len(api.conversations)
        assert 100 <= received < 800
        assert f"sent {received}," in out.decode()
        again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0, again.stderr
        assert f"skipped {received} (sent before)" in again.stdout
        bodies = [(b["conversation_id"], b["is_used"]) for b in api.conversations]
    # Every event once: nothing the first run had sent went again.
    assert len(bodies) == len(set(bodies)) == 800


def test_send_gives_up_on_an_api_that_keeps_failing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from agentsight_middleware import _replay

    monkeypatch.setattr(_replay, "_STALLED", 0.5)
    monkeypatch.setattr(_replay, "backoff", lambda attempt: 0.05)
    db = _file(tmp_path / "events.sqlite3", 300)
    with StandInAgentSightAPI() as api:
        api.fail_next(10**6, status=503)
        args = ["send", "--db", str(db), "--api-key", api.api_key, "--endpoint", api.url]
        assert main(args) == 1
    captured = capsys.readouterr()
    assert "stopped: the API kept failing (HTTP 503)" in captured.err
    assert "sent 0," in captured.out
    # Not one conversation after another until all 300 have failed.
    assert "left" in captured.out


def _silent_api() -> tuple[Any, str]:
    """A real socket that accepts connections and never answers."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(100)
    held: list[Any] = []

    def accept() -> None:
        try:
            while True:
                try:
                    connection, _ = server.accept()
                except OSError:
                    return
                held.append(connection)
        finally:
            # Never left to the garbage collector: a ResourceWarning in whichever test
            # runs when this thread ends (an error under filterwarnings = error).
            for connection in held:
                connection.close()

    threading.Thread(target=accept, daemon=True).start()
    return server, f"http://127.0.0.1:{server.getsockname()[1]}"


def _send_cli(
    tmp_path: Path, db: Path, api_key: str, endpoint: str
) -> tuple[list[str], dict[str, str]]:
    """The `send` command line for ``db``, and its environment (its locks in ``tmp_path``)."""
    import sys

    env = {
        **os.environ,
        "TMPDIR": str(tmp_path),
        "AGENTSIGHT_API_KEY": api_key,
        "AGENTSIGHT_API_ENDPOINT": endpoint,
    }
    return [sys.executable, "-m", "agentsight_middleware.cli", "send", "--db", str(db)], env


def _until_received(api: StandInAgentSightAPI, count: int) -> None:
    """Wait (30 s at most) until ``api`` has ``count`` conversations."""
    deadline = time.monotonic() + 30
    while len(api.conversations) < count and time.monotonic() < deadline:
        time.sleep(0.01)


def test_a_second_ctrl_c_stops_at_once(tmp_path: Path) -> None:
    # The first asks the run to stop and waits for the requests under way (up to their
    # 15 s timeout against an API that never answers); the second does not wait.
    import signal
    import socket
    import subprocess
    import time

    db = _file(tmp_path / "events.sqlite3", 20)
    server, url = _silent_api()
    try:
        command, env = _send_cli(tmp_path, db, "ags_" + "a" * 32 + "_abcdef", url)
        run = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(1.5)
        run.send_signal(signal.SIGINT)
        time.sleep(0.5)
        assert run.poll() is None  # still waiting for the requests under way
        run.send_signal(signal.SIGINT)
        started = time.monotonic()
        _, err = run.communicate(timeout=10)
        waited = time.monotonic() - started
    finally:
        # shutdown() wakes the accept() blocked in the thread (close() alone does not, and
        # the port kept listening until a later connection to it).
        with contextlib.suppress(OSError):
            server.shutdown(socket.SHUT_RDWR)
        server.close()
    assert run.returncode == 130
    assert b"stopped at once" in err
    assert waited < 5  # not the requests' 15 s timeout


def test_send_leaves_an_ignored_ctrl_c_ignored(tmp_path: Path) -> None:
    # "agentsight-middleware send &" from a shell: SIGINT is ignored, and a Ctrl-C meant
    # for the shell's foreground job must not stop it.
    import signal
    import subprocess
    import sys
    import time

    db = _file(tmp_path / "events.sqlite3", 200)  # 2-3 s at 0.1 s an answer
    with StandInAgentSightAPI() as api:
        api.set_latency(0.1)
        code = (
            "import signal, sys\n"
            "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
            "from agentsight_middleware.cli import main\n"
            f"code = main(['send', '--db', {str(db)!r}, '--api-key', {api.api_key!r},"
            f" '--endpoint', {api.url!r}])\n"
            "assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN\n"
            "sys.exit(code)\n"
        )
        run = subprocess.Popen(
            [sys.executable, "-c", code],
            env={**os.environ, "TMPDIR": str(tmp_path)},
            stderr=subprocess.PIPE,
        )
        time.sleep(1.0)
        run.send_signal(signal.SIGINT)
        _, err = run.communicate(timeout=60)
        assert run.returncode == 0, err
        assert len(api.conversations) == 200


# -- found by a review of send ---------------------------------------------------------------


def test_a_damaged_conversation_id_goes_alone_and_the_rest_is_sent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # An id stored as a JSON list (a file edited by hand) made every run crash at once:
    # "unhashable type: 'list'", 0 events sent.
    import sqlite3

    db = _file(tmp_path / "events.sqlite3", 10)
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:  # committed, then closed
        conn.execute(
            "UPDATE events SET payload = json_set(payload, '$.conversation_id', json('[1]'))"
            " WHERE id = 3"
        )
    with StandInAgentSightAPI() as api:
        code = main(["send", "--db", str(db), "--api-key", api.api_key, "--endpoint", api.url])
        received = len(api.conversations)
    out = capsys.readouterr().out
    assert code == 1
    assert received == 9
    assert "sent 9, skipped 0 (sent before), failed 1" in out


def test_the_send_lock_holds_through_a_symlink(tmp_path: Path) -> None:
    # Locked by the name given: `send --db current.sqlite3` (a symlink) ran beside a
    # `send --db events.sqlite3`, and 349 of 400 events went twice.
    from agentsight_middleware._replay import ReplayBusyError, _only_sender

    db = _file(tmp_path / "events.sqlite3", 1)
    link = tmp_path / "current.sqlite3"
    link.symlink_to(db.name)
    with _only_sender(db), pytest.raises(ReplayBusyError), _only_sender(link):
        pass


def test_send_stays_with_the_file_it_opened_when_the_path_is_rotated(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The file moved and a new one started at the path while `send` ran: it marked rows of
    # the new file (by the old file's row ids) as sent; 68 events were never delivered.
    import sqlite3

    db = _visits(tmp_path / "events.sqlite3", 200)
    moved = tmp_path / "events.old.sqlite3"
    with StandInAgentSightAPI() as api:
        api.set_latency(0.05)  # ~2.5 s in all: the store looks at its path once a second
        rotated = threading.Event()

        def rotate() -> None:
            deadline = time.monotonic() + 30
            while len(api.conversations) < 50 and time.monotonic() < deadline:
                time.sleep(0.005)
            os.replace(db, moved)
            for suffix in ("-wal", "-shm"):
                if Path(f"{db}{suffix}").exists():
                    os.replace(f"{db}{suffix}", f"{moved}{suffix}")
            _visits(db, 30)  # the app starts a new file at the path
            rotated.set()

        thread = threading.Thread(target=rotate)
        thread.start()
        code = main(["send", "--db", str(db), "--api-key", api.api_key, "--endpoint", api.url])
        thread.join(30)
        assert rotated.is_set()
        received = len(api.conversations)
    assert code == 0, capsys.readouterr()
    assert received == 400  # the whole file it opened
    # The new file: untouched, for the next run.
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("SELECT count(*) FROM events WHERE sent_at IS NULL").fetchone() == (60,)


def test_each_accepted_event_is_marked_at_once(tmp_path: Path) -> None:
    # Marked when the whole conversation was done: a page view accepted while its chat was
    # still on its way (or being retried) stayed unmarked, and a run killed meanwhile sent
    # it again next time. Each answer here takes 3 s: the page view's comes at 3 s, the
    # chat's at 6 s; at 4.5 s the page view must be marked.
    import sqlite3

    db = _visits(tmp_path / "events.sqlite3", 1)
    with StandInAgentSightAPI() as api:
        api.set_latency(3.0)
        args = ["send", "--db", str(db), "--api-key", api.api_key, "--endpoint", api.url]
        result: list[int] = []
        thread = threading.Thread(target=lambda: result.append(main(args)))
        started = time.monotonic()
        thread.start()
        time.sleep(max(0.0, started + 4.5 - time.monotonic()))
        with contextlib.closing(sqlite3.connect(db)) as conn:
            marked = conn.execute(
                "SELECT json_extract(payload, '$.is_used') FROM events WHERE sent_at IS NOT NULL"
            ).fetchall()
        thread.join(30)
    assert result == [0]
    assert marked == [(0,)]  # the page view, while its chat was on its way


def test_a_conversation_goes_in_the_order_its_events_happened(tmp_path: Path) -> None:
    # Two processes writing one file: the page view's may store it after the chat's.
    from tests.test_store import BASE

    db = tmp_path / "events.sqlite3"
    with LocalStore(db) as store:
        store.write([make_payload("conv_000000000001", used=True, at=BASE + 5)])
        store.write([make_payload("conv_000000000001", used=False, at=BASE)])
    with StandInAgentSightAPI() as api:
        assert main(["send", "--db", str(db), "--api-key", api.api_key, "--endpoint", api.url]) == 0
        order = [body["is_used"] for body in api.conversations]
    assert order == [False, True]


def test_a_locked_file_delays_the_marks_and_sends_nothing_twice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Another process held the file locked past the 5 s busy timeout (a backup, a VACUUM):
    # a traceback, 28 of 200 accepted events marked, 172 sent again by the next run.
    import sqlite3

    db = _visits(tmp_path / "events.sqlite3", 20)
    holder = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    with StandInAgentSightAPI() as api:
        api.set_latency(0.01)
        holder.execute("BEGIN IMMEDIATE")
        timer = threading.Timer(7.0, lambda: holder.execute("COMMIT"))
        timer.start()
        args = ["send", "--db", str(db), "--api-key", api.api_key, "--endpoint", api.url]
        try:
            assert main(args) == 0
        finally:
            timer.join()
            holder.close()
        assert "sent 40" in capsys.readouterr().out
        assert main(args) == 0
        assert "sent 0, skipped 40" in capsys.readouterr().out
        assert len(api.conversations) == 40


def test_send_beside_a_file_in_a_folder_it_cannot_write(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The lock file could not be created: a PermissionError traceback. The folder is made
    # immutable (chattr +i), which even root cannot write in: the lock goes to the temporary
    # folder, and the file itself cannot be opened for marks (SQLite's -wal), said in a line.
    import shutil
    import subprocess

    folder = tmp_path / "volume"
    folder.mkdir()
    db = _file(folder / "events.sqlite3", 1)
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(folder)]).returncode != 0:
        pytest.skip("needs chattr +i (root, on ext4): nothing else stops root writing here")
    try:
        with StandInAgentSightAPI() as api:
            code = main(["send", "--db", str(db), "--api-key", api.api_key, "--endpoint", api.url])
    finally:
        subprocess.run([chattr, "-i", str(folder)], check=True)
    err = capsys.readouterr().err
    assert code == 1
    assert "stopped: the events file could not be used" in err
    assert "Traceback" not in err


def test_send_refuses_a_file_it_can_read_but_not_write_before_sending(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Another user's file, or an immutable one: each run sent events it could then not
    # mark, and stopped; the next run sent the same ones again (8 a run, 20 requests for
    # 8 events in three runs) and never the others. The file is made immutable (chattr
    # +i), which stops root writing it too.
    import shutil
    import subprocess

    db = _file(tmp_path / "events.sqlite3", 30)
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(db)]).returncode != 0:
        pytest.skip("needs chattr +i (root, on ext4): nothing else stops root writing here")
    try:
        with StandInAgentSightAPI() as api:
            code = main(["send", "--db", str(db), "--api-key", api.api_key, "--endpoint", api.url])
            sent = len(api.requests)
    finally:
        subprocess.run([chattr, "-i", str(db)], check=True)
    err = capsys.readouterr().err
    assert code == 1
    assert sent == 0  # before: 8, accepted and never marked
    assert "cannot be written" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("view_at", "chat_at"),
    [
        ("2026-11-26T20:26:40Z", "2026-11-26T20:26:40.300000+00:00"),
        ("2026-11-26T22:26:40+02:00", "2026-11-26T20:26:45+00:00"),
    ],
    ids=["zulu-then-offset", "another-offset"],
)
def test_timestamps_are_compared_as_times_not_text(
    tmp_path: Path, view_at: str, chat_at: str
) -> None:
    # Sorted as text, "20:26:40Z" came after "20:26:40.3+00:00": the chat went first.
    db = tmp_path / "events.sqlite3"
    view = make_payload("conv_000000000001", used=False)
    chat = make_payload("conv_000000000001", used=True)
    view["timestamp"], chat["timestamp"] = view_at, chat_at
    with LocalStore(db) as store:
        store.write([view, chat])
    with StandInAgentSightAPI() as api:
        assert main(["send", "--db", str(db), "--api-key", api.api_key, "--endpoint", api.url]) == 0
        order = [body["is_used"] for body in api.conversations]
    assert order == [False, True]


def test_a_file_deleted_while_send_runs_stops_it_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Only the main file deleted (its -wal and -shm left) and a new one started: "file is
    # not a database" or "disk I/O error" came out as a traceback, with no summary. The
    # app's store no longer starts a file there while send has the old one open (it would
    # share send's -wal and -shm); send goes on with the file it opened.
    db = _visits(tmp_path / "events.sqlite3", 200)
    outcome: list[str] = []
    with StandInAgentSightAPI() as api:
        api.set_latency(0.02)

        def delete() -> None:
            deadline = time.monotonic() + 30
            while len(api.conversations) < 50 and time.monotonic() < deadline:
                time.sleep(0.005)
            os.remove(db)
            try:
                _visits(db, 30)  # the app tries to start a new file at the path
            except sqlite3.OperationalError as exc:
                outcome.append(str(exc))
            else:
                outcome.append("a new file was started")

        thread = threading.Thread(target=delete)
        thread.start()
        code = main(["send", "--db", str(db), "--api-key", api.api_key, "--endpoint", api.url])
        thread.join(30)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert "sent " in captured.out  # the summary
    if code:  # (a run that read everything before the delete may end cleanly)
        assert "stopped: the events file could not be" in captured.err
    if len(api.conversations) < 400:  # send still had the file open when it was deleted
        assert len(outcome) == 1
        assert "is locked" in outcome[0]


def test_a_conversation_is_sent_whole_across_batches(tmp_path: Path) -> None:
    # The page view stored 250 rows after its chat (another process held it back): in a later
    # batch of 200, it went after the chat.
    from tests.test_store import BASE

    db = tmp_path / "events.sqlite3"
    with LocalStore(db) as store:
        store.write([make_payload("conv_late00000001", used=True, at=BASE + 5)])
        store.write([make_payload(f"conv_{n:012x}", at=BASE + 6) for n in range(250)])
        store.write([make_payload("conv_late00000001", used=False, at=BASE)])
    with StandInAgentSightAPI() as api:
        assert main(["send", "--db", str(db), "--api-key", api.api_key, "--endpoint", api.url]) == 0
        late = [
            b["is_used"] for b in api.conversations if b["conversation_id"] == "conv_late00000001"
        ]
        total = len(api.conversations)
    assert late == [False, True]
    assert total == 252  # each event once


@pytest.fixture(autouse=True)
def _own_temporary_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # send's lock by file identity goes in the temporary folder: this test's, not /tmp.
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


def test_the_send_lock_holds_for_the_file_moved_meanwhile(tmp_path: Path) -> None:
    # Locked by the path only: a `send` on the file moved elsewhere while the first ran
    # took another lock, and 180 of 400 events went twice.
    import os

    from agentsight_middleware._replay import ReplayBusyError, _only_sender

    db = _file(tmp_path / "events.sqlite3", 1)
    moved = tmp_path / "events-old.sqlite3"
    with _only_sender(db):
        os.rename(db, moved)
        with pytest.raises(ReplayBusyError), _only_sender(moved):
            pass
    with _only_sender(moved):  # free again once the first is over
        pass


def test_sigterm_stops_send_as_ctrl_c_does(tmp_path: Path) -> None:
    # `timeout`, systemd, `docker stop` and Kubernetes send SIGTERM: it killed the run
    # outright, and the requests under way were sent again by the next run.
    import signal
    import subprocess

    db = _visits(tmp_path / "events.sqlite3", 300)
    with StandInAgentSightAPI() as api:
        api.set_latency(0.05)
        command, env = _send_cli(tmp_path, db, api.api_key, api.url)
        first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _until_received(api, 50)
        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=60)
        assert first.returncode == 143, err  # 128 + SIGTERM; before: killed (-15), no summary
        assert b"stopped: interrupted" in err
        received = len(api.conversations)
        assert f"sent {received},".encode() in out
        again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0, again.stderr
        bodies = [(b["conversation_id"], b["is_used"]) for b in api.conversations]
    assert len(bodies) == len(set(bodies)) == 600  # every event once


def test_left_counts_a_held_conversations_rows_once_after_a_stop(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A failing conversation with a row taken ahead from a later batch, then the run
    # stopped (the key refused): "left" was short by that row (998 + 1 of 1,000).
    import json

    from agentsight_middleware._standin_server import Answer

    bad = "conv_badbadbadbad"
    payloads = [make_payload(f"conv_{i:012x}") for i in range(1000)]
    payloads[10] = make_payload(bad)
    payloads[300] = make_payload(bad)  # taken ahead with row 11, in a later batch
    db = tmp_path / "events.sqlite3"
    with LocalStore(db) as store:
        store.write(payloads)

    class API(StandInAgentSightAPI):
        def _decide(self, request: Any) -> Any:
            if json.loads(request.body).get("conversation_id") == bad:
                return Answer(503, {"detail": "down"})
            if len(self.conversations) >= 700:
                return Answer(401, {"detail": "key revoked"})
            return super()._decide(request)

    with API() as api:
        code = main(["send", "--db", str(db), "--api-key", api.api_key, "--endpoint", api.url])
    out = capsys.readouterr().out
    assert code == 1
    sent, failed, left = (
        int(out.split("sent ")[1].split(",")[0]),
        int(out.split("failed ")[1].split(" ")[0].rstrip(",")),
        int(out.split("left ")[1].split(" ")[0]),
    )
    assert sent + failed + left == 1000  # before: 999


def test_a_fifo_where_the_identity_lock_goes_does_not_hang_send(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The lock by file identity has a predictable name: in a shared /tmp another user could
    # put a FIFO there, and opening it blocked for ever. Now: this user's own 0700 folder,
    # opened without blocking or following links; where it cannot be had, a warning, and
    # the lock beside the file still refuses a second run by any path to it.
    import os
    import tempfile

    from agentsight_middleware._replay import ReplayBusyError, _only_sender

    db = _file(tmp_path / "events.sqlite3", 1)
    info = os.stat(db)
    folder = os.path.join(tempfile.gettempdir(), f"agentsight-send-{os.getuid()}")
    os.mkdir(folder, 0o700)
    os.mkfifo(os.path.join(folder, f"{info.st_dev}-{info.st_ino}.lock"))
    with _only_sender(db), pytest.raises(ReplayBusyError), _only_sender(db):
        pass
    assert "no lock by file identity" in caplog.text


def test_send_leaves_no_lock_file_behind(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Every run left `<file>.send-lock` beside the events file (and its lock by file
    # identity in the temporary folder), for good.
    db = _file(tmp_path / "events.sqlite3", 5)
    before = set(tmp_path.rglob("*"))
    with StandInAgentSightAPI() as api:
        args = ["send", "--db", str(db), "--api-key", api.api_key, "--endpoint", api.url]
        assert main(args) == 0
    assert "sent 5, skipped 0 (sent before), failed 0" in capsys.readouterr().out
    left = {p for p in set(tmp_path.rglob("*")) - before if not p.is_dir()}
    assert left == set(), left
    assert not Path(f"{db}.send-lock").exists()


def test_the_send_lock_still_keeps_runs_apart_while_each_removes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A run removes its lock files at its end: another run that opened a file just before
    # then locks one no longer at its name, and must take the new one, or two runs (it and
    # a third that made the new one) would send at once. The runs are threads with real
    # files and real flock, held between opening a lock file and locking it, in the order
    # that lets two of them in when a lock on a removed file counts: B opens the file
    # beside the events file (A's) and locks it once A has removed it; C makes a new one,
    # takes both locks while B waits to lock the inode lock it opened meanwhile, and
    # removes them; D makes new ones while B holds the old. (Hoped for from 4 threads
    # looping, that order came in 1 run of 3 with the re-check removed.)
    from agentsight_middleware import _replay

    db = _file(tmp_path / "events.sqlite3", 1)
    take_lock = _replay._take_lock
    held_before_lock: dict[tuple[str, int], threading.Event] = {}
    opened: dict[tuple[str, int], threading.Event] = {}
    locks_taken: dict[str, int] = {}

    def point(run: str, lock: int) -> tuple[threading.Event, threading.Event]:
        key = (run, lock)
        return opened.setdefault(key, threading.Event()), held_before_lock.setdefault(
            key, threading.Event()
        )

    def hooked_take_lock(
        held: contextlib.ExitStack,
        opener: Callable[[], tuple[str, TextIO] | None],
        busy: str,
    ) -> bool:
        run = threading.current_thread().name
        lock = locks_taken[run] = locks_taken.get(run, 0) + 1  # 1: beside, 2: by inode
        tries = [0]

        def hooked_opener() -> tuple[str, TextIO] | None:
            result = opener()
            tries[0] += 1
            if run == "B" and tries[0] == 1:  # only its first open of each is held
                was_opened, go = point(run, lock)
                was_opened.set()
                assert go.wait(10)
            return result

        return take_lock(held, hooked_opener, busy)

    monkeypatch.setattr(_replay, "_take_lock", hooked_take_lock)
    inside: set[str] = set()
    together: list[set[str]] = []
    refused: list[str] = []
    entered = {name: threading.Event() for name in "ABCD"}  # in, or refused
    leave = {name: threading.Event() for name in "ABCD"}
    guard = threading.Lock()

    def run() -> None:
        name = threading.current_thread().name
        try:
            with _replay._only_sender(db):
                with guard:
                    inside.add(name)
                    if len(inside) > 1:
                        together.append(set(inside))
                entered[name].set()
                assert leave[name].wait(10)
                with guard:
                    inside.discard(name)
        except _replay.ReplayBusyError:
            refused.append(name)
            entered[name].set()

    threads = {name: threading.Thread(target=run, name=name, daemon=True) for name in "ABCD"}

    def start(name: str) -> None:
        threads[name].start()

    def finish(name: str) -> None:
        leave[name].set()
        threads[name].join(10)
        assert not threads[name].is_alive()

    start("A")
    assert entered["A"].wait(10)
    start("B")
    b_beside_opened, b_beside_go = point("B", 1)
    assert b_beside_opened.wait(10)  # B opened A's file beside the events file
    finish("A")  # A removes its files
    b_inode_opened, b_inode_go = point("B", 2)
    b_beside_go.set()  # B locks the file it opened, removed by now
    assert b_inode_opened.wait(10)  # and opened the inode lock, not locked yet
    start("C")
    assert entered["C"].wait(10)  # refused, unless B's lock on a removed file counted
    finish("C")  # C, if in, removes the lock files B opened
    b_inode_go.set()
    assert entered["B"].wait(10)
    start("D")
    assert entered["D"].wait(10)
    finish("D")
    finish("B")
    assert together == []  # was [{"B", "D"}] with the re-check removed
    assert sorted(refused) == ["C", "D"]
    assert not Path(f"{db}.send-lock").exists()
