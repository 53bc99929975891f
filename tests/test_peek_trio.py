"""Under trio (anyio backend trio, or hypercorn's trio worker): no bound, nothing hangs
beyond the receive itself, a cancel scope around the peek still ends it."""

from __future__ import annotations

from typing import Any

import pytest

trio = pytest.importorskip("trio")

from agentsight_middleware._body import peek_asgi  # noqa: E402

MESSAGE = {"type": "http.request", "body": b"{}", "more_body": False}


def test_trio_a_late_body_is_waited_for() -> None:
    async def main() -> None:
        async def receive() -> dict[str, Any]:
            await trio.sleep(0.4)
            return MESSAGE

        body, replay = await peek_asgi(receive, "2", 1024)
        assert body == b"{}"
        assert await replay() is MESSAGE

    trio.run(main)


def test_trio_a_cancel_scope_around_the_peek_ends_it() -> None:
    async def main() -> None:
        async def receive() -> dict[str, Any]:
            await trio.sleep(10)
            raise AssertionError

        with trio.move_on_after(0.1) as scope:
            await peek_asgi(receive, "2", 1024)
        assert scope.cancelled_caught

    trio.run(main)


def test_trio_second_part_late() -> None:
    parts = [
        {"type": "http.request", "body": b"{", "more_body": True},
        {"type": "http.request", "body": b"}", "more_body": False},
    ]

    async def main() -> None:
        it = iter(parts)

        async def receive() -> dict[str, Any]:
            message = next(it)
            if message is parts[1]:
                await trio.sleep(0.4)
            return message

        body, replay = await peek_asgi(receive, "2", 1024)
        assert body == b"{}"
        assert [await replay(), await replay()] == parts

    trio.run(main)
