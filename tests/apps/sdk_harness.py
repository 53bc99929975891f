"""Test-side helpers for the SDK end-to-end tests (``tests/test_sdk_*.py``).

The apps (``tests/apps/sdk_classic_app.py``, ``tests/apps/sdk_otel_app.py``) run in a
subprocess under the interpreter of an isolated SDK venv (``tests/sdk_env.py``); this
module gives that venv what the apps need besides the SDK, serves an app on a socket
bound here (no port race), and drives concurrent visitors against it.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import importlib.metadata
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx

from tests.sdk_env import REPO, SDK_VENVS, SDKEnvironmentError, sdk_env, sdk_python

__all__ = ["Visitor", "app_python", "drive_visitors", "serve"]

#: What the apps import besides the SDK: our package's dependencies (our package
#: itself comes from the work tree, through PYTHONPATH) and the frameworks.
#: A venv made before a dependency was added lacks it: name every one here.
_APP_IMPORTS = (
    "import django, fastapi, flask, h11, httpx, starlette, uvicorn, user_agents, werkzeug\n"
    "import ua_parser.regex, ua_parser_rs"
)
_FRAMEWORKS = ("fastapi", "uvicorn", "flask", "django")
_INSTALL_TIMEOUT = 300.0
_START_TIMEOUT = 30.0
_STOP_TIMEOUT = 10.0
#: Visitors' requests: generous, but a hung app fails the test instead of hanging it.
REQUEST_TIMEOUT = 30.0

CHROME_DESKTOP = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36"
)
IPHONE = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1"
)
COOKIE = "agentsight_conversation_id"


def _requirements() -> list[str]:
    # Our package's runtime dependencies, as installed in this (the main) environment.
    declared = importlib.metadata.requires("agentsight-middleware") or []
    return [*(r for r in declared if "extra ==" not in r), *_FRAMEWORKS]


def _has_app_packages(python: Path) -> bool:
    try:
        done = subprocess.run(
            [str(python), "-I", "-c", _APP_IMPORTS],
            capture_output=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@functools.cache
def app_python(version: str) -> Path:
    """The interpreter of the ``agentsight==version`` venv, with the apps' packages added."""
    python = sdk_python(version)
    if _has_app_packages(python):
        return python
    with (SDK_VENVS / f".agentsight-{version}-apps.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _has_app_packages(python):
            return python
        # The venv has no pip of its own: install with ours, into it. The SDK's own
        # pins are kept (pip keeps what satisfies them).
        command = [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--disable-pip-version-check",
            "--no-input",
            "--quiet",
            *_requirements(),
        ]
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=_INSTALL_TIMEOUT, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise SDKEnvironmentError(f"installing the apps' packages timed out: {exc}") from exc
        if done.returncode != 0 or not _has_app_packages(python):
            raise SDKEnvironmentError(
                f"installing the apps' packages into {python} failed:\n"
                f"{(done.stdout + done.stderr)[-3000:]}"
            )
    return python


@contextlib.contextmanager
def serve(python: Path, module: str, args: Sequence[str], env: dict[str, str]) -> Iterator[str]:
    """Run ``python -m module *args FD`` serving on a socket bound here; yields its URL.

    The app's output (stdout and stderr) is shown if it fails to start.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(256)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    with tempfile.TemporaryFile() as log:
        try:
            process = subprocess.Popen(
                [str(python), "-m", module, *args, str(listener.fileno())],
                pass_fds=[listener.fileno()],
                env=sdk_env({**env, "PYTHONPATH": str(REPO)}),
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        finally:
            listener.close()  # the child has its own copy
        try:
            _wait_until_up(process, url, log)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(_STOP_TIMEOUT)


def _output(log: IO[bytes]) -> str:
    log.seek(0)
    return log.read().decode(errors="replace")[-5000:]


def _wait_until_up(process: subprocess.Popen[bytes], url: str, log: IO[bytes]) -> None:
    deadline = time.monotonic() + _START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the app exited with {process.returncode}:\n{_output(log)}")
        try:
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"the app did not start in {_START_TIMEOUT:g} s:\n{_output(log)}")


@dataclass
class Visitor:
    """One browser: loads the widget page, then chats; its cookie is its conversation."""

    index: int
    user_agent: str
    accept_language: str
    messages: list[str] = field(default_factory=list)
    conversation_id: str | None = None
    replies: list[dict[str, object]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def headers(self) -> dict[str, str]:
        return {
            "user-agent": self.user_agent,
            "accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
            "accept-language": self.accept_language,
            "sec-fetch-dest": "document",
            "sec-fetch-mode": "navigate",
        }


def make_visitors(count: int, messages: int) -> list[Visitor]:
    """Even visitors browse on a desktop in English, odd ones on an iPhone in French."""
    return [
        Visitor(
            index=i,
            user_agent=CHROME_DESKTOP if i % 2 == 0 else IPHONE,
            accept_language="en-US,en;q=0.9" if i % 2 == 0 else "fr-FR,fr;q=0.9,en;q=0.5",
            messages=[f"visitor-{i:02d} message-{k}" for k in range(messages)],
        )
        for i in range(count)
    ]


def drive_visitors(url: str, visitors: list[Visitor]) -> None:
    """Every visitor loads ``/`` (its own cookie jar), then all chat at once, each
    sending its messages one after the other, as a person in a chat widget does."""
    start = threading.Barrier(len(visitors))

    def visit(visitor: Visitor) -> None:
        try:
            with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT) as client:
                page = client.get("/", headers=visitor.headers)
                page.raise_for_status()
                visitor.conversation_id = client.cookies.get(COOKIE)
                start.wait(REQUEST_TIMEOUT)
                chat_headers = {
                    "user-agent": visitor.user_agent,
                    "accept-language": visitor.accept_language,
                    "accept": "application/json",
                }
                for message in visitor.messages:
                    response = client.post(
                        "/api/chat", json={"message": message}, headers=chat_headers
                    )
                    response.raise_for_status()
                    visitor.replies.append(response.json())
        except Exception as exc:  # reported by the test, with the visitor
            visitor.errors.append(repr(exc))
            start.abort()

    threads = [threading.Thread(target=visit, args=(v,), daemon=True) for v in visitors]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(REQUEST_TIMEOUT * (len(visitors[0].messages) + 2))
    stuck = [t for t in threads if t.is_alive()]
    assert not stuck, f"{len(stuck)} visitor(s) still waiting after the time limit"
    failed = [(v.index, v.errors) for v in visitors if v.errors]
    assert not failed, f"visitors failed: {failed}"
