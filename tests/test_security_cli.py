"""Security review (session 16), finding F5: ``report --html FILE`` resolves a symlink at
FILE itself (``os.path.realpath``) and then writes beside its target and renames over it.
A link another user planted in a shared folder (``/tmp/report.html`` pointing at the
victim's ``~/.bashrc``) is thereby followed even where the kernel refuses to follow it
(``fs.protected_symlinks=1``, the default on most distributions), and the victim's file is
replaced by the report page. The page is first written to the predictable
``FILE.tmp<pid>`` with a plain ``open(..., "w")``, which follows a link planted there too.

Run as root (as this workplace is), to give the planted links another owner.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agentsight_middleware import cli

from .test_report import dataset, write

ATTACKER = 65534  # nobody


@pytest.fixture
def shared(tmp_path: Path) -> Path:
    """A folder like /tmp: world-writable, sticky."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to plant a link owned by another user")
    folder = tmp_path / "shared"
    folder.mkdir()
    folder.chmod(0o1777)
    return folder


@pytest.fixture
def victim_file(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    target = home / ".bashrc"
    target.write_text("# my shell settings\n")
    return target


def _plant(link: Path, target: Path) -> None:
    link.symlink_to(target)
    os.lchown(link, ATTACKER, ATTACKER)


def test_report_does_not_follow_a_planted_link(
    tmp_path: Path, shared: Path, victim_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = write(tmp_path / "events.sqlite3", dataset())
    page = shared / "report.html"
    _plant(page, victim_file)
    code = cli.main(["report", "--db", str(db), "--html", str(page)])
    capsys.readouterr()
    assert victim_file.read_text() == "# my shell settings\n"
    assert code == 1


def test_report_does_not_write_through_a_planted_temporary_file(
    tmp_path: Path, shared: Path, victim_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = write(tmp_path / "events.sqlite3", dataset())
    page = shared / "report.html"
    _plant(Path(f"{page}.tmp{os.getpid()}"), victim_file)
    cli.main(["report", "--db", str(db), "--html", str(page)])
    capsys.readouterr()
    assert victim_file.read_text() == "# my shell settings\n"
