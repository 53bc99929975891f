from __future__ import annotations

from collections.abc import Iterator

import pytest

from agentsight_middleware.testing import RecordingTracker

CHROME_DESKTOP = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36"
)
IPHONE = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1"
)
GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"

#: What Chrome sends when the user navigates to a page.
BROWSER = {
    "user-agent": CHROME_DESKTOP,
    "accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
    "accept-language": "en-us,en;q=0.9,fr;q=0.5",
    "sec-fetch-dest": "document",
    "sec-fetch-mode": "navigate",
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def tracker() -> Iterator[RecordingTracker]:
    return RecordingTracker()
