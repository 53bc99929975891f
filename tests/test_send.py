"""``agentsight-middleware send`` replays a local events file to the API, once."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentsight_middleware._store import LocalStore
from agentsight_middleware.cli import main
from agentsight_middleware.testing import StandInAgentSightAPI

from .test_store import make_payload


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
        pytest.param(["--api-key", "nope"], "is not an AgentSight API key", id="bad-key"),
    ],
)
def test_send_needs_a_valid_key(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    monkeypatch.delenv("AGENTSIGHT_API_KEY", raising=False)
    db = _file(tmp_path / "events.sqlite3", 1)
    assert main(["send", "--db", str(db), *args]) == 1
    assert message in capsys.readouterr().err


def test_send_without_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = "ags_" + "1" * 32 + "_abcdef"
    assert main(["send", "--db", str(tmp_path / "none.sqlite3"), "--api-key", key]) == 1
    assert "no events file at" in capsys.readouterr().err
