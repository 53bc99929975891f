"""Django under WSGI (gunicorn examples.django_site.wsgi)."""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "examples.django_site.settings")

from django.core.wsgi import get_wsgi_application

from agentsight_middleware import AgentSightWSGIMiddleware

from ..common import make_tracker


def create_application(tracker: Any) -> AgentSightWSGIMiddleware:
    return AgentSightWSGIMiddleware(
        get_wsgi_application(), widget_pages=["/"], chat_routes=["POST /api/chat/"], tracker=tracker
    )


application = create_application(make_tracker())
