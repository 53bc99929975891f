"""Automatic AgentSight interaction tracking for ASGI and WSGI apps.

::

    from agentsight_middleware import AgentSightMiddleware

    app.add_middleware(AgentSightMiddleware, widget_pages=["/"],
                       chat_routes=["POST /api/chat"], tracker=tracker)
"""

from __future__ import annotations

from .__version__ import __version__
from ._conversation import Conversation
from ._core import current_conversation
from ._facts import DEFAULT_NON_BROWSER_AGENTS
from .asgi import AgentSightMiddleware
from .wsgi import AgentSightWSGIMiddleware

__all__ = [
    "DEFAULT_NON_BROWSER_AGENTS",
    "AgentSightMiddleware",
    "AgentSightWSGIMiddleware",
    "Conversation",
    "__version__",
    "current_conversation",
]
