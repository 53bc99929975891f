"""Isolated virtualenvs holding a pinned release of the official ``agentsight`` SDK.

The contract tests run the SDK in a subprocess of its own interpreter: the SDK is
not a dependency of the main test environment, and its generations cannot share
one environment. Each venv lives in ``<repo>/.sdk-venvs/agentsight-<version>/``
(git-ignored) and is built once, then reused by every later run while its
interpreter still has that version installed; a venv that no longer works (the
base Python moved, a half-finished install) is rebuilt.

Building one needs PyPI. When that fails the caller gets :class:`SDKEnvironmentError`
with pip's own words, and the contract tests fail on it rather than skip: a
contract that silently stops being checked is worse than a red run.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

__all__ = ["REPO", "SDK_VENVS", "SDKEnvironmentError", "sdk_env", "sdk_python"]

REPO = Path(__file__).resolve().parent.parent
#: Where the SDK venvs are kept across runs (git-ignored).
SDK_VENVS = REPO / ".sdk-venvs"

# A pip that cannot reach the index should fail in seconds, not minutes of retries.
_PIP_FLAGS = ("--disable-pip-version-check", "--no-input", "--retries", "2", "--timeout", "30")
_INSTALL_TIMEOUT = 300.0
_PROBE_TIMEOUT = 30.0

# Prints what the venv's interpreter has: the SDK's version (without importing it:
# 0.0.4x builds a tracker at import and raises without an API key) and its Python.
_PROBE = (
    "import importlib.metadata as m, json, sys\n"
    "try:\n"
    "    v = m.version('agentsight')\n"
    "except m.PackageNotFoundError:\n"
    "    v = None\n"
    "print(json.dumps([v, list(sys.version_info[:2])]))\n"
)


class SDKEnvironmentError(RuntimeError):
    """The SDK venv could not be built (no network, no such release, broken Python)."""


def _bin(venv: Path, name: str) -> Path:
    return venv / ("Scripts" if os.name == "nt" else "bin") / name


def sdk_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """An environment for running the SDK: this one without ``AGENTSIGHT_*``, Python
    path tweaks or proxies (the SDK's ``requests`` honours them, and the stand-in is
    on 127.0.0.1), plus ``extra``."""
    dropped = {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE"}
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.upper().startswith("AGENTSIGHT_")
        and key.upper() not in dropped
        and not key.lower().endswith("_proxy")
    }
    env["NO_PROXY"] = env["no_proxy"] = "*"
    env.update(extra or {})
    return env


def _probe(python: Path) -> tuple[str | None, tuple[int, int]] | None:
    if not python.exists():
        return None
    try:
        done = subprocess.run(
            [str(python), "-I", "-c", _PROBE],
            capture_output=True,
            text=True,
            timeout=_PROBE_TIMEOUT,
            check=False,
        )
        version, (major, minor) = json.loads(done.stdout)
    except (OSError, subprocess.TimeoutExpired, ValueError, TypeError):
        return None
    if done.returncode != 0:
        return None
    return version, (major, minor)


def _is_ready(python: Path, version: str) -> bool:
    # The venv must run the Python under test: the contract is checked on it.
    return _probe(python) == (version, sys.version_info[:2])


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One builder at a time: engineers and CI may run the suite concurrently."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(command: list[str], what: str, timeout: float) -> None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise SDKEnvironmentError(
            f"{what} took more than {timeout:g} s: {' '.join(command)}"
        ) from exc
    if done.returncode != 0:
        output = "\n".join(
            line
            for line in (done.stdout + done.stderr).splitlines()
            if "is ignored: it is neither a file nor a directory" not in line
        )
        raise SDKEnvironmentError(
            f"{what} failed (exit {done.returncode}): {' '.join(command)}\n{output[-3000:]}"
        )


def _our_pip_can_target() -> bool:
    """True when this environment's pip can install into another interpreter
    (``pip --python``, pip >= 22.3): the new venv then needs no pip of its own,
    which saves the ~10 s ``ensurepip`` costs."""
    try:
        major, minor = (int(part) for part in importlib.metadata.version("pip").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False
    return (major, minor) >= (22, 3)


def _build(venv: Path, version: str) -> None:
    shutil.rmtree(venv, ignore_errors=True)
    requirement = f"agentsight=={version}"
    python = _bin(venv, "python")
    if _our_pip_can_target():
        _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], "python -m venv", 120)
        install = [sys.executable, "-m", "pip", "--python", str(python), "install"]
    else:
        _run([sys.executable, "-m", "venv", str(venv)], "python -m venv", 300)
        install = [str(python), "-m", "pip", "install"]
    _run(
        [*install, *_PIP_FLAGS, "--quiet", requirement],
        f"pip install {requirement} (is PyPI reachable?)",
        _INSTALL_TIMEOUT,
    )


# A failed build is not tried again in the same run: without network every test
# using the venv would otherwise wait for its own pip time-out.
_failures: dict[str, SDKEnvironmentError] = {}


def sdk_python(version: str) -> Path:
    """The interpreter of a venv with exactly ``agentsight==version``; built on first use.

    Raises :class:`SDKEnvironmentError` when it cannot be built.
    """
    if version in _failures:
        raise _failures[version]
    try:
        return _sdk_python(version)
    except SDKEnvironmentError as exc:
        _failures[version] = exc
        raise


@functools.cache
def _sdk_python(version: str) -> Path:
    venv = SDK_VENVS / f"agentsight-{version}"
    python = _bin(venv, "python")
    SDK_VENVS.mkdir(exist_ok=True)
    with _locked(SDK_VENVS / f".agentsight-{version}.lock"):
        if _is_ready(python, version):
            return python
        _build(venv, version)
        found = _probe(python)
        if found != (version, sys.version_info[:2]):
            raise SDKEnvironmentError(
                f"{venv} was built but its interpreter reports (agentsight version, Python) = "
                f"{found!r}, expected {(version, sys.version_info[:2])!r}"
            )
    return python
