"""A Django URLconf with language-prefixed pages (``i18n_patterns``), as a site served in
several languages writes it (``tests/test_redirects.py``): with ``LocaleMiddleware``, ``/``
is answered with a redirect to ``/en/`` (or the visitor's language), ``/pricing/`` to
``/en/pricing/``; the chat API is outside the prefix (its POST is not sent here)."""

from __future__ import annotations

from django.conf.urls.i18n import i18n_patterns
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import path


def home(request: HttpRequest) -> HttpResponse:
    return HttpResponse(f"<!doctype html><title>Shop ({request.LANGUAGE_CODE})</title>")


def pricing(request: HttpRequest) -> HttpResponse:
    return HttpResponse("<!doctype html><title>Pricing</title>")


def chat(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"reply": "hi"})


urlpatterns = [
    path("api/chat/", chat),
    *i18n_patterns(path("", home), path("pricing/", pricing)),
]
