"""The example Django site's widget behind Django's CSRF check, as a new project has it
(``tests/test_browser.py``): the page view sets the ``csrftoken`` cookie
(``ensure_csrf_cookie``), and the chat view is not ``csrf_exempt``."""

from __future__ import annotations

import json

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import path
from django.views.decorators.csrf import ensure_csrf_cookie

from examples.common import reply_to
from examples.django_site.urls import WIDGET_PAGE


@ensure_csrf_cookie  # type: ignore[untyped-decorator]  # Django has no type hints
def index(request: HttpRequest) -> HttpResponse:
    return HttpResponse(WIDGET_PAGE)


def chat(request: HttpRequest) -> JsonResponse:
    data = json.loads(request.body or b"{}")
    return JsonResponse({"reply": reply_to(str(data.get("message", "")))})


urlpatterns = [path("", index), path("api/chat/", chat)]
