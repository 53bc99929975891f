"""The end of an outage is logged at the level its failures were, or above: failures said
at ERROR (a wrong endpoint answering 200 with a page, an untrusted TLS certificate, a
refused key with a durable outbox) ended with an INFO, which gunicorn's and uvicorn's bare
logger drop: the log showed the outage begin, never end."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from agentsight_middleware.sinks.outbox import MemoryOutbox

from .test_http11 import Scripted, created, direct_sink, read_request

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_an_outage_said_at_error_ends_at_warning_or_above(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("agentsight_middleware.sinks.http._QUIET", 0.0)
    monkeypatch.setattr("agentsight_middleware.sinks.http.backoff", lambda attempt: 0.0)
    caplog.set_level(logging.INFO, logger="agentsight_middleware")
    page = b"<html>captive portal</html>"
    answers = [
        b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: %d\r\n\r\n%s"
        % (len(page), page),
        created(),
    ]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while answers:
            await read_request(reader)
            writer.write(answers.pop(0))
            await writer.drain()

    async with Scripted(handler).running() as url:
        sink = direct_sink(url, MemoryOutbox(100), concurrency=1)
        await sink.start()
        await sink.put([{
            "conversation_id": "conv_00000000000a", "is_used": False,
            "timestamp": "2026-11-25T10:00:00+00:00", "environment": "production",
        }])  # fmt: skip
        assert await sink.drain(time.monotonic() + 10) == 0
        await sink.aclose()
    began = [r for r in caplog.records if "check the endpoint" in r.getMessage()]
    ended = [r for r in caplog.records if "accepts events again" in r.getMessage()]
    assert [r.levelno for r in began] == [logging.ERROR]
    assert len(ended) == 1
    assert ended[0].levelno >= logging.WARNING, "the outage's end is an INFO nobody sees"
