"""Private files and planted links, the cases a review found the first fixes missed: a
store or outbox path that is a symlink to a file not made yet (SQLite made it 0644), and
``report --html`` into a folder reached through a planted link."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentsight_middleware import cli
from agentsight_middleware._store import LocalStore
from agentsight_middleware.sinks.outbox import SQLiteOutbox

from .test_report import dataset, write
from .test_security_cli import ATTACKER


@pytest.fixture
def usual_umask() -> Iterator[None]:
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def _mode(path: Path) -> str:
    return oct(stat.S_IMODE(path.stat().st_mode))


@pytest.mark.parametrize("kind", ["store", "outbox"])
def test_a_file_behind_a_link_to_a_file_yet_to_be_made_is_private(
    tmp_path: Path, usual_umask: None, kind: str
) -> None:
    # The events file kept on a data volume: app/agentsight-events.sqlite3 -> /data/events,
    # made before the first event. create_private meets the link (O_EXCL: EEXIST) and
    # returned; SQLite followed it and created the target with the umask's mode.
    data = tmp_path / "data"
    data.mkdir()
    link = tmp_path / f"{kind}.sqlite3"
    link.symlink_to(data / "events.sqlite3")
    if kind == "store":
        store = LocalStore(link)
        try:
            store.write([dict(dataset()[0])])
        finally:
            store.close()
    else:
        SQLiteOutbox(link).close()
    assert _mode(data / "events.sqlite3") == "0o600"


def test_report_does_not_follow_a_planted_link_to_a_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The planted link is the folder, not the file: /tmp/reports -> the victim's folder.
    # The kernel's fs.protected_symlinks refuses any link of the path, not only the last;
    # _refuse_planted_link looks at the last alone, and realpath() follows the rest.
    if os.geteuid() != 0:
        pytest.skip("needs root, to plant a link owned by another user")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    mine = home / "report.html"
    mine.write_text("<p>my own page</p>")
    planted = shared / "reports"
    planted.symlink_to(home)
    os.lchown(planted, ATTACKER, ATTACKER)
    db = write(tmp_path / "events.sqlite3", dataset())
    code = cli.main(["report", "--db", str(db), "--html", str(planted / "report.html")])
    capsys.readouterr()
    assert mine.read_text() == "<p>my own page</p>"
    assert code == 1
