"""What the examples share: the chat widget page and the echo reply."""

from __future__ import annotations

from pathlib import Path

# Plain HTML and JavaScript, no build step: the page a newcomer sees in the demo.
WIDGET_PAGE = (Path(__file__).parent / "widget.html").read_text(encoding="utf-8")


def widget_page(chat_url: str = "/api/chat") -> str:
    """The widget page posting its messages to ``chat_url``: each app's own chat route
    (Django's ends in a slash, and a POST to the path without it is a 404)."""
    return WIDGET_PAGE.replace('data-chat-url="/api/chat"', f'data-chat-url="{chat_url}"')


def reply_to(message: str) -> str:
    return f"You said: {message}" if message else "Say something!"
