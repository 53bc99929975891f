"""A Django URLconf of class-based views (``tests/test_routes.py``): their methods are
known to Django's ``View.dispatch``, so a rule under other methods can be told."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import path
from django.utils.decorators import method_decorator
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


# Review of the class-based view check (cbvreview): views whose methods Django finds
# other than by the class's own handlers and http_method_names.
class GetOnly(View):  # type: ignore[misc]
    http_method_names = ("get", "options")  # POST off by default...

    def get(self, request: HttpRequest) -> HttpResponse:
        return HttpResponse("form")

    def post(self, request: HttpRequest) -> JsonResponse:
        return JsonResponse({"reply": "hi"})


class HandlerInSetup(View):  # type: ignore[misc]
    def setup(self, request: HttpRequest, *args: Any, **kwargs: Any) -> None:
        super().setup(request, *args, **kwargs)
        self.post = self.reply  # a handler of the instance's

    def reply(self, request: HttpRequest) -> JsonResponse:
        return JsonResponse({"reply": "hi"})


class HandlerInInit(View):  # type: ignore[misc]
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.post = self.reply

    def reply(self, request: HttpRequest) -> JsonResponse:
        return JsonResponse({"reply": "hi"})


class AnyMethod(View):  # type: ignore[misc]
    def get(self, request: HttpRequest) -> HttpResponse:
        return HttpResponse("page")

    def http_method_not_allowed(
        self, request: HttpRequest, *args: Any, **kwargs: Any
    ) -> JsonResponse:
        return JsonResponse({"method": request.method})  # serves every other method


@method_decorator(csrf_exempt, name="dispatch")
class ExemptChat(View):  # type: ignore[misc]
    def post(self, request: HttpRequest) -> JsonResponse:
        return JsonResponse({"reply": "hi"})


urlpatterns += [
    path("widened/", csrf_exempt(GetOnly.as_view(http_method_names=["get", "post", "options"]))),
    path("narrowed/", GetOnly.as_view(http_method_names=["post", "options"])),
    path("in-setup/", csrf_exempt(HandlerInSetup.as_view())),
    path("in-init/", csrf_exempt(HandlerInInit.as_view())),
    path("any-method/", csrf_exempt(AnyMethod.as_view())),
    path("exempt/", ExemptChat.as_view()),
]
