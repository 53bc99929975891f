"""A receive whose awaitable's ``__await__`` is a plain iterator (granian:
``PyFutureAwaitable.__await__()`` returns itself, with ``__next__`` and no
``send``/``throw``) fails the peek with AttributeError('... has no attribute send'),
raised to the app: a 500 on every chat request whose id may be in the body, under
granian (which hands every body over as a part with more_body=True, then an empty last
one)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from agentsight_middleware._body import peek_asgi


class IterFuture:
    """A future-like awaitable as granian's: __await__ returns self; __next__ only."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._fut = loop.create_future()
        self._asyncio_future_blocking = False

    # the duck-typed future API Task uses
    def get_loop(self) -> Any:
        return self._fut.get_loop()

    def add_done_callback(self, cb: Any, *, context: Any = None) -> None:
        self._fut.add_done_callback(lambda _f: cb(self), context=context)

    def remove_done_callback(self, cb: Any) -> int:
        return 0

    def done(self) -> bool:
        return self._fut.done()

    def cancelled(self) -> bool:
        return self._fut.cancelled()

    def cancel(self, msg: Any = None) -> bool:
        return self._fut.cancel()

    def result(self) -> Any:
        return self._fut.result()

    def set_result(self, value: Any) -> None:
        self._fut.set_result(value)

    def __await__(self) -> Any:
        return self

    def __iter__(self) -> Any:
        return self

    def __next__(self) -> Any:
        if self._fut.done():
            raise StopIteration(self._fut.result())
        self._asyncio_future_blocking = True
        return self


@pytest.mark.parametrize("late", [False, True])
def test_a_receive_awaitable_whose_iterator_has_no_send(late: bool) -> None:
    parts = [
        {
            "type": "http.request",
            "body": b'{"conversation_id": "conv_0123456789ab"}',
            "more_body": True,
        },
        {"type": "http.request", "body": b"", "more_body": False},
    ]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        queue = list(parts)

        def receive() -> IterFuture:
            fut = IterFuture(loop)
            message = queue.pop(0)
            if late:
                loop.call_later(0.01, fut.set_result, message)
            else:
                fut.set_result(message)
            return fut

        body, replay = await peek_asgi(receive, None, 1024)
        assert body == b'{"conversation_id": "conv_0123456789ab"}'
        assert await replay() == parts[0]
        assert await replay() == parts[1]

    asyncio.run(main())
