"""The public surface is small and deliberate: every exported name exists, nothing else
public leaks from the package's top level."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import agentsight_middleware
import agentsight_middleware.sdk
import agentsight_middleware.testing


def test_top_level_exports() -> None:
    assert sorted(agentsight_middleware.__all__) == [
        "AgentSightMiddleware",
        "AgentSightWSGIMiddleware",
        "Conversation",
        "DEFAULT_NON_BROWSER_AGENTS",
        "__version__",
        "current_conversation",
    ]
    for name in agentsight_middleware.__all__:
        assert getattr(agentsight_middleware, name) is not None
    public = {
        name
        for name in vars(agentsight_middleware)
        if not name.startswith("_")
        and name != "annotations"  # from __future__
        and not isinstance(getattr(agentsight_middleware, name), type(agentsight_middleware))
    }
    assert public <= set(agentsight_middleware.__all__)


def test_the_default_non_browser_agents_can_be_extended() -> None:
    # non_browser_agents= replaces the defaults: adding one monitor made curl and
    # kube-probe page loads views again, and the list was only in a private module.
    from agentsight_middleware import DEFAULT_NON_BROWSER_AGENTS
    from agentsight_middleware._config import Settings

    assert isinstance(DEFAULT_NON_BROWSER_AGENTS, tuple)
    extended = Settings(
        widget_pages=["/"], non_browser_agents=[*DEFAULT_NON_BROWSER_AGENTS, "my-monitor"]
    )
    replaced = Settings(widget_pages=["/"], non_browser_agents=["my-monitor"])
    for agent in ("my-monitor/1", "curl/8.0", "kube-probe/1.29"):
        assert extended.is_non_browser(agent), agent
    assert replaced.is_non_browser("my-monitor/1")
    assert not replaced.is_non_browser("curl/8.0")


def test_submodule_exports_exist() -> None:
    for module in (agentsight_middleware.testing, agentsight_middleware.sdk):
        for name in module.__all__:
            assert hasattr(module, name), f"{module.__name__}.{name}"


def test_version_is_semver() -> None:
    import re

    assert re.fullmatch(
        r"\d+\.\d+\.\d+(\.dev\d+|[ab]\d+|rc\d+)?", agentsight_middleware.__version__
    )


def test_the_readme_one_liners_type_check_under_mypy_strict(tmp_path: Path) -> None:
    # What a user's type checker sees: Starlette's add_middleware() wants a factory whose
    # app argument is positional-only (with **options, a keyword "app" could go either way).
    usage = tmp_path / "usage.py"
    usage.write_text(
        "from fastapi import FastAPI\n"
        "from flask import Flask\n"
        "from starlette.applications import Starlette\n"
        "from agentsight_middleware import AgentSightMiddleware, AgentSightWSGIMiddleware\n"
        "\n"
        "api = FastAPI()\n"
        'api.add_middleware(AgentSightMiddleware, widget_pages=["/"], chat_routes=["POST /chat"])\n'
        "star = Starlette()\n"
        'star.add_middleware(AgentSightMiddleware, widget_pages=["/"])\n'
        "raw = AgentSightMiddleware(star, widget_pages=['/'])\n"
        "from litestar import Litestar\n"
        "from litestar.middleware import DefineMiddleware\n"
        "lite = Litestar(middleware=[DefineMiddleware(AgentSightMiddleware, widget_pages=['/'])])\n"
        "flask = Flask(__name__)\n"
        # (Flask types wsgi_app as a method: replacing it needs this with or without us.)
        'flask.wsgi_app = AgentSightWSGIMiddleware(flask.wsgi_app, widget_pages=["/"])'
        "  # type: ignore[method-assign]\n"
    )
    result = _mypy_strict(usage)
    assert result.returncode == 0, result.stdout + result.stderr


def _mypy_strict(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(path)],
        capture_output=True,
        text=True,
        cwd=path.parent,
    )


def test_a_recording_tracker_s_time_out_message_stays_short() -> None:
    # It listed every call: 655 KB after 16,000 calls.
    from agentsight_middleware.testing import RecordingTracker

    tracker = RecordingTracker()
    for n in range(16_000):
        tracker.initialize_conversation(f"conv_{n:012x}")
    with pytest.raises(AssertionError) as failed:
        tracker.wait_for(used=1, timeout=0.01)
    message = str(failed.value)
    assert len(message) < 2_000
    assert "16000 initialized and 0 used" in message
    assert "conv_000000003e7f" in message  # the last call


def test_a_misspelt_option_is_a_type_error_for_mypy(tmp_path: Path) -> None:
    # The options were typed **Any: mypy --strict took widget_page= and cookie_maxage=.
    usage = tmp_path / "typo.py"
    usage.write_text(
        "from fastapi import FastAPI\n"
        "from agentsight_middleware import AgentSightMiddleware, AgentSightWSGIMiddleware\n"
        "\n"
        "api = FastAPI()\n"
        'api.add_middleware(AgentSightMiddleware, widget_page=["/"])\n'
        "raw = AgentSightMiddleware(api, cookie_maxage=60)\n"
        "wsgi = AgentSightWSGIMiddleware(object(), queue_size='big')\n"
    )
    result = _mypy_strict(usage)
    errors = {line.split(":")[1]: line for line in result.stdout.splitlines() if ": error:" in line}
    # Starlette types add_middleware()'s options after the middleware's own from 0.41.3
    # (its factory protocol); before, the options given there are not checked.
    starlette = importlib.metadata.version("starlette")
    typed = tuple(int(part) for part in starlette.split(".")[:3]) >= (0, 41, 3)
    assert list(errors) == (["5", "6", "7"] if typed else ["6", "7"]), result.stdout
    if typed:
        assert '"widget_page"' in errors["5"]
    assert '"cookie_maxage"' in errors["6"]
    assert '"queue_size"' in errors["7"]


@pytest.mark.parametrize(
    ("option", "hint"),
    [
        ("widget_page", "did you mean 'widget_pages'?"),
        ("cookie_maxage", "did you mean 'cookie_max_age'?"),
        ("zzz", "the options are widget_pages, chat_routes, tracker,"),
    ],
)
def test_a_misspelt_option_says_which_was_meant(
    option: str, hint: str, caplog: pytest.LogCaptureFixture
) -> None:
    # It said "MiddlewareBase.__init__() got an unexpected keyword argument", naming an
    # internal class, and under uvicorn's --lifespan auto it was logged at INFO only.
    from agentsight_middleware import AgentSightMiddleware, AgentSightWSGIMiddleware

    for middleware in (AgentSightMiddleware, AgentSightWSGIMiddleware):
        caplog.clear()
        options: dict[str, Any] = {option: ["/"]}
        with pytest.raises(TypeError) as info:
            middleware(object(), **options)
        assert str(info.value).startswith(
            f"{middleware.__name__}() got an unknown option {option!r}: {hint}"
        )
        assert [r.levelname for r in caplog.records] == ["ERROR"]


def test_the_typed_options_are_the_constructor_s() -> None:
    from agentsight_middleware._base import MiddlewareBase, Options, _option_names

    assert list(Options.__annotations__) == ["app", *_option_names()]
    code = MiddlewareBase.__init__.__code__
    assert code.co_kwonlyargcount == len(_option_names()) > 20


def test_the_build_backend_floor_reads_the_license_files_list() -> None:
    # hatchling 1.18-1.25 refuses license-files = [...] ("must be a table"): a build that
    # picked one of them (pip --no-build-isolation) failed.
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pytest's own TOML reader before 3.11 (pytest requires tomli there)
        import tomli as tomllib
    from packaging.requirements import Requirement
    from packaging.version import Version

    root = Path(__file__).resolve().parent.parent
    config = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    assert isinstance(config["project"]["license-files"], list)
    (backend,) = [
        Requirement(text)
        for text in config["build-system"]["requires"]
        if Requirement(text).name == "hatchling"
    ]
    assert not backend.specifier.contains(Version("1.25.0"))
    assert backend.specifier.contains(Version("1.26.1"))


def test_the_constructors_type_hints_resolve_at_run_time() -> None:
    # Unpack was imported for type checkers only: get_type_hints() (dependency injection
    # containers, documentation tools) raised NameError: name 'Unpack' is not defined.
    import inspect
    import typing

    from agentsight_middleware import AgentSightMiddleware, AgentSightWSGIMiddleware
    from agentsight_middleware._base import Options

    for middleware in (AgentSightMiddleware, AgentSightWSGIMiddleware):
        hints = typing.get_type_hints(middleware.__init__)
        assert typing.get_args(hints["options"]) == (Options,)
        assert "options" in inspect.signature(middleware.__init__, eval_str=True).parameters
