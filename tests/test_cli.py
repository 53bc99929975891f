"""``agentsight-middleware report``: text, JSON and HTML output, options, exit codes."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from agentsight_middleware import cli
from agentsight_middleware._report import build_report
from agentsight_middleware._store import DEFAULT_PATH, LocalStore

from .test_report import DAY3, charts, dataset, mixed, with_unreadable_times, write
from .test_store import make_payload

HEADLINE = "4 conversations initialized, 2 used: interaction rate 50.0 %, 2 abandoned (50.0 %)"


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return write(tmp_path / "events.sqlite3", dataset())


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_text_report(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "report", "--db", str(db))
    assert code == 0
    assert HEADLINE in out
    assert "By page (widget placement), first page view" in out
    assert err == ""


def test_default_db_is_in_the_working_directory(
    db: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    db.rename(db.with_name(DEFAULT_PATH))
    monkeypatch.chdir(db.parent)
    code, out, _ = run(capsys, "report")
    assert code == 0
    assert HEADLINE in out


def test_json_matches_the_report(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "report", "--db", str(db), "--json")
    assert code == 0
    data = json.loads(out)
    expected = build_report(db).to_dict()
    assert data.pop("generated_at") == pytest.approx(expected.pop("generated_at"), abs=60)
    assert data == expected
    assert data["interaction_rate_percent"] == 50.0
    assert data["breakdowns"]["page"][0] == {
        "key": "/pricing",
        "initialized": 2,
        "used": 1,
        "interaction_rate_percent": 50.0,
    }


def test_by_repeatable_and_comma_separated(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys, "report", "--db", str(db), "--json", "--by", "page,device", "--by", "HOUR,page"
    )
    assert code == 0
    assert list(json.loads(out)["breakdowns"]) == ["page", "device", "hour"]


def test_by_unknown_is_a_usage_error(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["report", "--db", str(db), "--by", "page,browser"])
    assert exited.value.code == 2
    assert "unknown breakdown 'browser'" in capsys.readouterr().err


def test_since(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "report", "--db", str(db), "--json", "--since", "2026-11-22")
    assert code == 0
    data = json.loads(out)
    assert (data["events"], data["initialized"], data["used"]) == (4, 2, 1)
    assert data["since"] == DAY3
    code, out, _ = run(capsys, "report", "--db", str(db), "--since", "2030-01-01")
    assert code == 0
    # Not "yet", nor told to run the app: the file has events, older than that.
    assert "No events (since 2030-01-01 00:00 UTC)." in out
    assert "Run your app" not in out
    code, out, _ = run(capsys, "report", "--db", str(db), "--since", "7d")
    assert code == 0
    assert "(since " in out


def test_since_junk_is_a_usage_error(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["report", "--db", str(db), "--since", "last tuesday"])
    assert exited.value.code == 2
    assert "cannot read 'last tuesday' as a start time" in capsys.readouterr().err


def test_environment(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = mixed(tmp_path / "events.sqlite3")
    code, out, _ = run(capsys, "report", "--db", str(db))
    assert code == 0
    assert "These figures mix environments" in out
    code, out, _ = run(capsys, "report", "--db", str(db), "--environment", "dev", "--json")
    assert code == 0
    data = json.loads(out)
    assert (data["environment"], data["initialized"], data["used"]) == ("development", 2, 1)
    code, out, _ = run(capsys, "report", "--db", str(db), "--environment", "production")
    assert code == 0
    assert HEADLINE in out
    assert "mix environments" not in out


def test_environment_junk_is_a_usage_error(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["report", "--db", str(db), "--environment", "staging"])
    assert exited.value.code == 2
    assert "unknown environment 'staging': choose from production" in capsys.readouterr().err


def test_missing_db(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "nope.sqlite3"
    code, out, err = run(capsys, "report", "--db", str(path))
    assert code == 1
    assert out == ""
    # What makes one: a running app has no file until its first event, and a curl of the
    # page makes none ("run your app with the middleware first" said to do what was done).
    assert err.startswith(f"agentsight-middleware: no events file at {path} (yet): ")
    assert "Open a widget page in a browser" in err
    assert "curl, scripts, probes and bots do not" in err
    assert err.endswith("or pass --db with the file your app writes (local_store=)\n")
    assert not path.exists()


@pytest.mark.parametrize("where", ["folder", "empty"])
def test_a_db_path_no_file_can_ever_be_at_is_not_told_to_wait(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    # It said "(yet): the middleware creates it at the first event", which it never does
    # there (it refuses such a path at start-up).
    path = str(tmp_path / "no-such-folder" / "events.sqlite3") if where == "folder" else ""
    code, out, err = run(capsys, "report", "--db", path)
    assert (code, out) == (1, "")
    assert "(yet)" not in err
    told = f"there is no folder {tmp_path / 'no-such-folder'}" if where == "folder" else "empty"
    assert told in err, err
    assert "pass --db with the file your app writes" in err


def test_unreadable_times_are_no_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = with_unreadable_times(tmp_path / "e.sqlite3")
    code, out, err = run(capsys, "report", "--db", str(path))
    assert (code, err) == (0, "")
    assert HEADLINE in out
    assert "3 events left out: their time is not a Unix time" in out
    code, out, _ = run(capsys, "report", "--db", str(path), "--json")
    assert code == 0
    assert json.loads(out)["unreadable"] == 3


@pytest.fixture(autouse=True)
def _own_temporary_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `send` keeps a lock by file identity in the temporary folder: this test's, not /tmp.
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


@pytest.mark.parametrize("command", ["report", "send"])
def test_db_is_a_folder(tmp_path: Path, command: str, capsys: pytest.CaptureFixture[str]) -> None:
    # It said "no events file at <folder>", as if nothing were there.
    key = ["--api-key", "ags_" + "1" * 32 + "_abcdef"] if command == "send" else []
    code, out, err = run(capsys, command, "--db", str(tmp_path), *key)
    assert (code, out) == (1, "")
    assert err == (
        f"agentsight-middleware: {tmp_path} is a folder, not an events file; name the file in "
        f"it, e.g. {tmp_path / DEFAULT_PATH}\n"
    )


def test_not_an_events_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not sqlite\n" * 500)
    code, _, err = run(capsys, "report", "--db", str(path))
    assert code == 1
    assert "is not a usable events file" in err


def test_empty_db(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "e.sqlite3"
    path.touch()
    code, out, _ = run(capsys, "report", "--db", str(path))
    assert code == 0
    assert "No events yet" in out
    code, out, _ = run(capsys, "report", "--db", str(path), "--json")
    assert json.loads(out)["interaction_rate_percent"] is None


def test_html(db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "report.html"
    code, out, err = run(capsys, "report", "--db", str(db), "--html", str(target))
    assert code == 0
    assert HEADLINE in out
    assert err == f"HTML report written to {target}\n"
    page = target.read_text(encoding="utf-8")
    assert "<script" not in page
    assert "<link" not in page
    assert "http://" not in page
    assert "https://" not in page
    found = charts(page)
    assert page.count("<svg") == len(found.charts) == 6
    report = build_report(db)
    assert found.charts["chart-page"] == [
        (str(row.key), row.interaction_rate_percent) for row in report.breakdowns["page"]
    ]
    assert [value for _, value in found.charts["chart-daily"]] == [
        day.interaction_rate_percent for day in report.daily if day.initialized
    ]
    assert list(tmp_path.glob("report.html.tmp*")) == []


def test_html_with_json(db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "report.html"
    code, out, _ = run(capsys, "report", "--db", str(db), "--json", "--html", str(target))
    assert code == 0
    assert json.loads(out)["used"] == 2
    assert target.exists()


def test_html_empty(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "e.sqlite3"
    path.touch()
    target = tmp_path / "report.html"
    assert run(capsys, "report", "--db", str(path), "--html", str(target))[0] == 0
    page = target.read_text(encoding="utf-8")
    assert "No events yet" in page
    assert "<svg" not in page


def test_html_unwritable(db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "missing-dir" / "report.html"
    code, out, err = run(capsys, "report", "--db", str(db), "--html", str(target))
    assert code == 1
    assert out == ""
    assert f"cannot write {target}" in err


@pytest.mark.parametrize(
    ("argv", "usage"),
    [
        (["report", "--jsn"], "usage: agentsight-middleware report [-h] [--db PATH]"),
        (["send", "--jsn"], "usage: agentsight-middleware send [-h] [--db PATH]"),
        (["--jsn"], "usage: agentsight-middleware [-h] [--version] COMMAND ..."),
    ],
    ids=["report", "send", "no-command"],
)
def test_an_unknown_option_shows_the_subcommand_s_usage(
    argv: list[str], usage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # `report --jsn` printed the top-level usage, which does not show report's options.
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(usage)
    assert err.rstrip().endswith("error: unrecognized arguments: --jsn")


def test_no_subcommand_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys)
    assert code == 2
    assert "report" in err


def test_help_lists_report(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["--help"])
    assert exited.value.code == 0
    assert "show the interaction rate" in capsys.readouterr().out


def test_demo_help_says_what_each_option_is(capsys: pytest.CaptureFixture[str]) -> None:
    # The README sends a user whose port 8000 is taken to --port: its help named the flags alone.
    with pytest.raises(SystemExit) as exited:
        cli.main(["demo", "--help"])
    assert exited.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "interface (default: 127.0.0.1)" in out
    assert "port (default: 8000)" in out
    assert f"without an API key (default: {DEFAULT_PATH})" in out


def test_subcommands_are_pluggable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def configure(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--name", default="world")

    def hello(args: argparse.Namespace) -> int:
        print(f"hello {args.name}")
        return 3

    monkeypatch.setitem(cli.SUBCOMMANDS, "hello", cli.Subcommand("say hello", configure, hello))
    assert run(capsys, "hello", "--name", "you") == (3, "hello you\n", "")


def test_console_script_is_declared() -> None:
    (script,) = [ep for ep in entry_points(group="console_scripts") if ep.name == cli.PROG]
    assert script.value == "agentsight_middleware.cli:main"
    assert script.load() is cli.main


@pytest.mark.parametrize("module", ["agentsight_middleware", "agentsight_middleware.cli"])
def test_runs_as_a_module(tmp_path: Path, module: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", module, "report", "--db", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert "no events file at" in done.stderr


def test_report_since_far_back_reports_everything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "events.sqlite3"
    with LocalStore(db) as store:
        store.write([make_payload("conv_far000000001")])
    assert cli.main(["report", "--db", str(db), "--since", "1000000d", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["initialized"] == 1


def test_demo_names_a_missing_package() -> None:
    # In a checkout without FastAPI: the message must name it, not send the user to a checkout.
    code = (
        "import sys; sys.modules['fastapi'] = None\n"
        "from agentsight_middleware.cli import main\n"
        "sys.exit(main(['demo']))\n"
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert "the demo needs fastapi" in result.stderr


def test_html_never_overwrites_the_events_file(
    db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `report --html agentsight-events.sqlite3` (--html read as a flag) once replaced the
    # events file with the page.
    before = db.read_bytes()
    code, out, err = run(capsys, "report", "--db", str(db), "--html", str(db))
    assert code == 1
    assert out == ""
    assert "will not write" in err
    assert "SQLite database" in err
    assert db.read_bytes() == before
    assert build_report(db).initialized > 0


def test_html_through_a_symlink_writes_its_target(
    db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "site" / "report.html"
    target.parent.mkdir()
    target.write_text("old")
    link = tmp_path / "report.html"
    link.symlink_to(target)
    code, _, _ = run(capsys, "report", "--db", str(db), "--html", str(link))
    assert code == 0
    assert link.is_symlink()  # not replaced by a file of its own
    assert target.read_text().startswith("<!DOCTYPE html>")


@pytest.mark.parametrize("since", ["1" + "0" * 400 + "d", "9999-12-31T23:30-01:00"])
def test_since_too_far_is_no_crash(
    db: Path, capsys: pytest.CaptureFixture[str], since: str
) -> None:
    # A look back of 400 digits overflowed the float; a start past year 9999 in UTC
    # cannot be shown as a date. Both crashed with a traceback.
    try:
        code = cli.main(["report", "--db", str(db), "--since", since])
    except SystemExit as exited:  # a usage error is a clean answer too
        code = int(exited.code or 0)
        assert "cannot read" in capsys.readouterr().err
        assert code == 2
    else:
        assert code == 0


def test_report_since_counts_a_chat_after_an_earlier_view_apart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A visitor viewed the page just before the window and chatted inside it: `report
    # --since` said the conversation "chatted without a page view", beside one that never
    # had one. Recorded by the middleware under a real server.
    from datetime import datetime, timezone

    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse
    from starlette.routing import Route

    from agentsight_middleware import AgentSightMiddleware

    from .conftest import BROWSER, uvicorn_server

    async def page(request: Request) -> HTMLResponse:
        return HTMLResponse("<p>shop</p>", headers={"Cache-Control": "no-cache"})

    async def chat(request: Request) -> JSONResponse:
        return JSONResponse({"reply": "hi"})

    app = Starlette(routes=[Route("/", page), Route("/api/chat", chat, methods=["POST"])])
    db = tmp_path / "events.sqlite3"
    mw = AgentSightMiddleware(
        app, widget_pages=["/"], chat_routes=["POST /api/chat"], local_store=db
    )
    with uvicorn_server(mw) as url:
        with httpx.Client(base_url=url, headers=BROWSER) as visitor:
            assert visitor.get("/").status_code == 200
            assert visitor.cookies.get("agentsight_conversation_id")
            assert mw.flush(10)
            since = datetime.fromtimestamp(time.time(), timezone.utc).isoformat()
            assert visitor.post("/api/chat", json={}).status_code == 200  # its cookie's id
        with httpx.Client(base_url=url) as script:  # a chat with no page view at all
            assert script.post("/api/chat", json={}).status_code == 200
        assert mw.flush(10)
    mw.close()
    assert cli.main(["report", "--db", str(db), "--since", since, "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert (figures["events"], figures["initialized"], figures["used"]) == (2, 0, 0)
    assert figures["used_without_page_view"] == 1
    assert figures["used_after_earlier_page_view"] == 1
    assert cli.main(["report", "--db", str(db), "--since", since]) == 0
    out = capsys.readouterr().out
    assert "1 conversation chatted without a page view" in out
    assert "1 conversation chatted after a page view before this period" in out
    assert cli.main(["report", "--db", str(db), "--json"]) == 0  # the whole file
    whole = json.loads(capsys.readouterr().out)
    assert (whole["initialized"], whole["used"], whole["used_without_page_view"]) == (1, 1, 1)
