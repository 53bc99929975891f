"""A Django URLconf of class-based views (``tests/test_routes.py``): their methods are
known to Django's ``View.dispatch``, so a rule under other methods can be told."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import path
from django.views import View
from django.views.decorators.csrf import csrf_exempt


class Chat(View):  # type: ignore[misc]  # Django has no type hints here
    def post(self, request: HttpRequest) -> JsonResponse:
        return JsonResponse({"reply": "hi"})


class Page(View):  # type: ignore[misc]
    def get(self, request: HttpRequest) -> HttpResponse:
        return HttpResponse("<!doctype html><title>Shop</title><p>prices</p>")


class OwnDispatch(View):  # type: ignore[misc]
    # Routes methods its own way: POST works without a post() (not guessed).
    def dispatch(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        return JsonResponse({"method": request.method})


def anything(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"method": request.method})


urlpatterns = [
    path("api/chat/", csrf_exempt(Chat.as_view())),  # the wrapper keeps view_class
    path("pricing/", Page.as_view()),
    path("own/", csrf_exempt(OwnDispatch.as_view())),
    path("function/", csrf_exempt(anything)),
]
