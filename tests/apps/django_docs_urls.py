"""A Django URLconf of documentation pages whose paths end with a slash
(``tests/test_redirects.py``): with ``CommonMiddleware`` (APPEND_SLASH), ``/docs/intro`` is
answered with a permanent redirect to ``/docs/intro/``."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.urls import path


def page(request: HttpRequest, name: str) -> HttpResponse:
    return HttpResponse(f"<!doctype html><title>{name}</title>")


urlpatterns = [path("docs/<slug:name>/", page)]
