"""The public surface is small and deliberate: every exported name exists, nothing else
public leaks from the package's top level."""

from __future__ import annotations

import agentsight_middleware
import agentsight_middleware.sdk
import agentsight_middleware.testing


def test_top_level_exports() -> None:
    assert sorted(agentsight_middleware.__all__) == [
        "AgentSightMiddleware",
        "AgentSightWSGIMiddleware",
        "Conversation",
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


def test_submodule_exports_exist() -> None:
    for module in (agentsight_middleware.testing, agentsight_middleware.sdk):
        for name in module.__all__:
            assert hasattr(module, name), f"{module.__name__}.{name}"


def test_version_is_semver() -> None:
    import re

    assert re.fullmatch(
        r"\d+\.\d+\.\d+(\.dev\d+|[ab]\d+|rc\d+)?", agentsight_middleware.__version__
    )
