"""Django under WSGI (gunicorn examples.django_site.wsgi)."""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "examples.django_site.settings")

from django.core.wsgi import get_wsgi_application

from agentsight_middleware import AgentSightWSGIMiddleware


def create_application(**options: Any) -> AgentSightWSGIMiddleware:
    return AgentSightWSGIMiddleware(
        get_wsgi_application(), widget_pages=["/"], chat_routes=["POST /api/chat/"], **options
    )


# No tracker: AGENTSIGHT_API_KEY if set, else the local store (agentsight-events.sqlite3).
application = create_application()
