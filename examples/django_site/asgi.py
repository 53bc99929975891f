"""Django under ASGI (uvicorn examples.django_site.asgi:application)."""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "examples.django_site.settings")

from django.core.asgi import get_asgi_application

from agentsight_middleware import AgentSightMiddleware


def create_application(**options: Any) -> AgentSightMiddleware:
    return AgentSightMiddleware(
        get_asgi_application(), widget_pages=["/"], chat_routes=["POST /api/chat/"], **options
    )


# No tracker: AGENTSIGHT_API_KEY if set, else the local store (agentsight-events.sqlite3).
application = create_application()
