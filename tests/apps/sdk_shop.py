"""The shop both SDK apps serve: a widget page, a health check and one chat route.

``sdk_classic_app`` and ``sdk_otel_app`` differ only in what their chat handler does
with the SDK and which tracker the middleware gets; this module builds the rest (the
FastAPI and Flask apps with the middleware in place) and serves one on a listening
socket. It runs under an SDK venv's interpreter, like the apps.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, Literal

from pydantic import BaseModel

from agentsight_middleware import AgentSightMiddleware, AgentSightWSGIMiddleware

__all__ = [
    "THINK_SECONDS",
    "Chat",
    "django_shop",
    "fastapi_shop",
    "flask_shop",
    "reply_to",
    "serve",
]

#: How long the "LLM" takes: long enough for concurrent requests to overlap.
THINK_SECONDS = 0.05
PAGE = "<html><body>chat widget</body></html>"

ChatSync = Callable[[str], dict[str, Any]]
ChatAsync = Callable[[str], Awaitable[dict[str, Any]]]


class Chat(BaseModel):
    message: str


def reply_to(message: str) -> str:
    return f"echo: {message}"


def fastapi_shop(
    framework: str, options: dict[str, Any], chat_sync: ChatSync, chat_async: ChatAsync
) -> Any:
    """``fastapi-sync`` serves the chat from a ``def`` endpoint (Starlette's thread
    pool), ``fastapi-async`` from an ``async def`` one."""
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse, PlainTextResponse

    app = FastAPI()

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE

    @app.get("/health", response_class=PlainTextResponse)
    def health() -> str:
        return "ok"

    if framework == "fastapi-sync":

        @app.post("/api/chat")
        def chat(body: Chat) -> dict[str, Any]:
            return chat_sync(body.message)

    else:

        @app.post("/api/chat")
        async def chat_in_loop(body: Chat) -> dict[str, Any]:
            return await chat_async(body.message)

    app.add_middleware(AgentSightMiddleware, **options)
    return app


def flask_shop(options: dict[str, Any], chat_sync: ChatSync) -> Any:
    from flask import Flask, jsonify, request

    app = Flask(__name__)

    @app.get("/")
    def page() -> str:
        return PAGE

    @app.get("/health")
    def health() -> str:
        return "ok"

    @app.post("/api/chat")
    def chat() -> Any:
        return jsonify(chat_sync(request.get_json()["message"]))

    app.wsgi_app = AgentSightWSGIMiddleware(app.wsgi_app, **options)  # type: ignore[method-assign]
    return app


def django_shop(options: dict[str, Any], chat_sync: ChatSync) -> Any:
    """Django's own ASGI handler, which supports no ASGI lifespan (it raises at one), with
    sync views (run in its thread, the request's context copied)."""
    import json

    import django
    from django.conf import settings
    from django.core.asgi import get_asgi_application
    from django.http import HttpRequest, HttpResponse, JsonResponse
    from django.urls import path
    from django.views.decorators.csrf import csrf_exempt

    def page(request: HttpRequest) -> HttpResponse:
        return HttpResponse(PAGE)

    def health(request: HttpRequest) -> HttpResponse:
        return HttpResponse("ok", content_type="text/plain")

    def chat(request: HttpRequest) -> HttpResponse:
        return JsonResponse(chat_sync(json.loads(request.body)["message"]))

    class URLs:  # a URL conf need not be a module: an object with urlpatterns
        urlpatterns: ClassVar[list[Any]] = [
            path("", page),
            path("health", health),
            path("api/chat", csrf_exempt(chat)),
        ]

    settings.configure(
        DEBUG=False,
        ROOT_URLCONF=URLs,
        ALLOWED_HOSTS=["*"],
        SECRET_KEY="sdk-shop-" + "x" * 50,
        MIDDLEWARE=[],
        INSTALLED_APPS=[],
    )
    django.setup()
    return AgentSightMiddleware(get_asgi_application(), **options)


def serve(framework: str, fd: int, app: Callable[[], Any]) -> None:
    """Serve ``app()`` on the listening socket ``fd``: werkzeug's threaded server for
    ``flask``, uvicorn otherwise (with lifespan; for Django's handler, uvicorn's default
    ``auto``, which runs none for an app that raises at it)."""
    if framework == "flask":
        from werkzeug.serving import make_server

        make_server("127.0.0.1", 0, app(), threaded=True, fd=fd).serve_forever()
    else:
        import uvicorn

        lifespan: Literal["auto", "on"] = "auto" if framework == "django-asgi" else "on"
        config = uvicorn.Config(app(), fd=fd, log_level="warning", lifespan=lifespan)
        uvicorn.Server(config).run()
