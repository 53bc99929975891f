from __future__ import annotations

import json

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import path
from django.views.decorators.csrf import csrf_exempt

from ..common import reply_to, widget_page

# The widget posts to this site's chat route, trailing slash included.
WIDGET_PAGE = widget_page("/api/chat/")


def index(request: HttpRequest) -> HttpResponse:
    return HttpResponse(WIDGET_PAGE)


@csrf_exempt
def chat(request: HttpRequest) -> JsonResponse:
    data = json.loads(request.body or b"{}")
    # Under WSGI the middleware puts the conversation in the environ (request.META);
    # under ASGI use agentsight_middleware.current_conversation(), which works in both.
    from agentsight_middleware import current_conversation

    conversation = current_conversation()
    return JsonResponse(
        {
            "reply": reply_to(str(data.get("message", ""))),
            "conversation_id": conversation.id if conversation else None,
        }
    )


urlpatterns = [path("", index), path("api/chat/", chat)]
