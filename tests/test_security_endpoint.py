"""Security review (session 16), finding F4: an ``http://`` endpoint on another host sends
the API key (``Authorization: Api-Key ...``) and every visitor's IP address in clear text,
and nothing says so: the start-up line is INFO, which servers drop by default. A typo
(``AGENTSIGHT_API_ENDPOINT=http://api.agentsight.io``) goes unnoticed; the events are even
accepted when the host answers plain HTTP. Loopback (the stand-in API, a local relay) is fine.
"""

from __future__ import annotations

import logging

import pytest
from starlette.applications import Starlette

from agentsight_middleware import AgentSightMiddleware
from agentsight_middleware.cli import main

KEY = "ags_" + "0" * 32 + "_" + "0" * 6


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize(
    ("endpoint", "warned"),
    [
        ("http://api.agentsight.io", True),
        ("HTTP://api.example.com:8080/", True),
        ("http://203.0.113.5", True),
        # This machine (the stand-in API, a local relay) and https are fine.
        ("http://127.0.0.1:8080", False),
        ("http://localhost:9000", False),
        ("http://[::1]:1", False),
        ("https://x.io", False),
    ],
)
def test_plain_http_endpoint_elsewhere_is_warned(
    endpoint: str, warned: bool, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AGENTSIGHT_API_KEY", raising=False)
    with caplog.at_level(logging.INFO, logger="agentsight_middleware"):
        mw = AgentSightMiddleware(Starlette(), widget_pages=["/"], api_key=KEY, endpoint=endpoint)
    mw.close(0)
    said = [w for w in _warnings(caplog) if "http" in w and "clear" in w]
    assert bool(said) == warned, _warnings(caplog)
    assert all(KEY not in r.getMessage() for r in caplog.records)


def test_send_to_plain_http_elsewhere_says_so(
    tmp_path: object, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # An events file that does not exist: the command stops there, after its checks.
    monkeypatch.setenv("AGENTSIGHT_API_KEY", KEY)
    main(["send", "--db", f"{tmp_path}/none.sqlite3", "--endpoint", "http://api.agentsight.io"])
    err = capsys.readouterr().err
    assert "clear" in err, err
