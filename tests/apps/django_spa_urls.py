"""A Django URLconf of a single-page app (``tests/test_routes.py``): a POST chat view, a
POST view with a path parameter, and the SPA's GET view at every other path, written as
``re_path(r"^.*$", ...)`` (no group: no path parameter either)."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import path, re_path
from django.utils.decorators import method_decorator
from django.views import View
from django.views.decorators.csrf import csrf_exempt


@method_decorator(csrf_exempt, name="dispatch")
class Chat(View):  # type: ignore[misc]  # Django has no type hints here
    def post(self, request: HttpRequest, **kwargs: Any) -> JsonResponse:
        return JsonResponse({"reply": "hi"})


class Spa(View):  # type: ignore[misc]
    def get(self, request: HttpRequest) -> HttpResponse:
        return HttpResponse("<!doctype html><title>App</title>")


urlpatterns = [
    path("api/chat/", Chat.as_view()),
    path("api/agents/<str:agent>/chat", Chat.as_view()),
    re_path(r"^robots\.txt$", Spa.as_view()),
    re_path(r"^.*$", Spa.as_view()),
]
