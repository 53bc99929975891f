"""A Django URLconf of Django REST framework views (``tests/test_routes.py``): an
``APIView``, an ``@api_view`` function and a ``ViewSet`` routed by a router find their
handlers as Django's ``View.dispatch`` does, so a rule under other methods can be told."""

from __future__ import annotations

from typing import Any, ClassVar

from django.http import HttpRequest, JsonResponse
from django.urls import include, path
from rest_framework import viewsets
from rest_framework.decorators import api_view, authentication_classes, permission_classes
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.routers import SimpleRouter
from rest_framework.views import APIView


class Chat(APIView):  # type: ignore[misc]  # DRF has no type hints
    authentication_classes: ClassVar[list[Any]] = []
    permission_classes: ClassVar[list[Any]] = []

    def post(self, request: Request) -> Response:
        return Response({"reply": "hi"})


def _chat(request: Request) -> Response:
    return Response({"reply": "hi"})


# @api_view(["POST"]) and the rest, applied as calls: DRF is untyped.
chat_function = api_view(["POST"])(authentication_classes([])(permission_classes([])(_chat)))


class Messages(viewsets.ViewSet):  # type: ignore[misc]
    authentication_classes: ClassVar[list[Any]] = []
    permission_classes: ClassVar[list[Any]] = []

    def list(self, request: Request) -> Response:
        return Response([])

    def create(self, request: Request) -> Response:
        return Response({"reply": "hi"})


class OwnDispatch(APIView):  # type: ignore[misc]
    # Routes methods its own way: POST works without a post() (not guessed).
    def dispatch(self, request: HttpRequest, *args: Any, **kwargs: Any) -> JsonResponse:
        return JsonResponse({"method": request.method})


router = SimpleRouter()
router.register("messages", Messages, basename="message")

urlpatterns = [
    path("api/chat/", Chat.as_view()),
    path("api/function-chat/", chat_function),
    path("api/own/", OwnDispatch.as_view()),
    path("api/", include(router.urls)),
]
