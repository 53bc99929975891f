"""A Django URL conf whose chat view is not ``csrf_exempt`` (``tests/test_refused_chats.py``):
behind ``CsrfViewMiddleware`` a JSON POST without a token is refused with a 403 before the
view runs."""

from __future__ import annotations

from django.http import HttpRequest, JsonResponse
from django.urls import path


def chat(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"reply": "hi"})


urlpatterns = [path("api/chat/", chat)]
