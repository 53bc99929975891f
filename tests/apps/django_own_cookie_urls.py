"""A Django URLconf whose page sets the conversation cookie itself (``tests/test_examples.py``):
Django's WSGI handler sends every ``Set-Cookie`` value with a leading blank."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.urls import path


def restored(request: HttpRequest) -> HttpResponse:
    # A signed-in visitor whose conversation the app restores.
    response = HttpResponse("<!doctype html><title>Shop</title><p>welcome back</p>")
    response.set_cookie("agentsight_conversation_id", "conv_restored0001", path="/")
    return response


urlpatterns = [path("", restored)]
