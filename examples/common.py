"""What the examples share: the chat widget page and the echo reply."""

from __future__ import annotations

from pathlib import Path

# Plain HTML and JavaScript, no build step: the page a newcomer sees in the demo.
WIDGET_PAGE = (Path(__file__).parent / "widget.html").read_text(encoding="utf-8")


def reply_to(message: str) -> str:
    return f"You said: {message}" if message else "Say something!"
