"""Peeking at a chat body must hand the app exactly the same bytes, however they arrive."""

from __future__ import annotations

import asyncio
import io
import sys
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentsight_middleware import AgentSightMiddleware, AgentSightWSGIMiddleware, _body
from agentsight_middleware._body import ReplayInput, _declared_length, peek_asgi, peek_wsgi
from agentsight_middleware.testing import RecordingTracker

chunkings = st.lists(st.binary(max_size=300), max_size=8)


def _messages(chunks: list[bytes], disconnect: bool) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [
        {"type": "http.request", "body": chunk, "more_body": True} for chunk in chunks
    ]
    if disconnect:
        messages.append({"type": "http.disconnect"})
    else:
        messages.append({"type": "http.request", "body": b"", "more_body": False})
    return messages


def _run_asgi(
    messages: list[dict[str, Any]], content_type: bytes, limit: int
) -> tuple[list[dict[str, Any]], RecordingTracker]:
    tracker = RecordingTracker()
    seen: list[dict[str, Any]] = []
    total = len(messages)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        for _ in range(total):
            seen.append(await receive())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    mw = AgentSightMiddleware(app, chat_routes=["POST /chat"], tracker=tracker, max_body_peek=limit)
    pending = list(messages)

    async def receive() -> dict[str, Any]:
        return pending.pop(0)

    async def send(message: Any) -> None:
        pass

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/chat",
        "headers": [(b"content-type", content_type)],
        "client": ("127.0.0.1", 1),
    }
    anyio.run(mw, scope, receive, send)
    return seen, tracker


@settings(max_examples=150, deadline=None)
@given(
    chunks=chunkings,
    disconnect=st.booleans(),
    content_type=st.sampled_from([b"application/json", b"application/x-www-form-urlencoded"]),
    limit=st.integers(min_value=0, max_value=700),
)
def test_asgi_replay_is_message_exact(
    chunks: list[bytes], disconnect: bool, content_type: bytes, limit: int
) -> None:
    messages = _messages(chunks, disconnect)
    seen, tracker = _run_asgi([dict(m) for m in messages], content_type, limit)
    assert seen == messages
    assert len(tracker.used) == 1


@settings(max_examples=100, deadline=None)
@given(prefix=st.binary(max_size=200), split=st.integers(min_value=0, max_value=60))
def test_asgi_finds_the_id_in_a_chunked_json_body(prefix: bytes, split: int) -> None:
    body = b'{"conversation_id": "conv_abcdefabcdef", "pad": "' + prefix.hex().encode() + b'"}'
    chunks = [body[:split], body[split:]]
    seen, tracker = _run_asgi(_messages(chunks, False), b"application/json", 64 * 1024)
    assert b"".join(m.get("body", b"") for m in seen) == body
    assert tracker.used[0]["conversation_id"] == "conv_abcdefabcdef"


def test_asgi_body_over_the_limit_is_not_parsed_but_replayed() -> None:
    body = b'{"conversation_id": "conv_abcdefabcdef", "pad": "' + b"x" * 5000 + b'"}'
    messages = _messages([body[:3000], body[3000:]], False)
    seen, tracker = _run_asgi([dict(m) for m in messages], b"application/json", 4096)
    assert seen == messages
    assert tracker.used[0]["metadata"]["conversation_id_source"] == "minted"


def test_a_body_in_many_tiny_parts_is_not_held_part_by_part() -> None:
    # hypercorn (and granian) hand a chunked body over one chunk a message: 64 KiB in 1-byte
    # chunks was 65,536 messages, all held by the peek (~10 MB of dicts for one request,
    # where the bare server holds 10 and pushes back on the socket) until the app read them.
    parts = [{"type": "http.request", "body": b"x", "more_body": True} for _ in range(5000)]
    parts.append({"type": "http.request", "body": b"", "more_body": False})
    pending = list(parts)
    taken = 0

    async def receive() -> dict[str, Any]:
        nonlocal taken
        taken += 1
        return pending.pop(0)

    async def peek_then_read() -> tuple[bytes, int, list[Any]]:
        body, replay = await peek_asgi(receive, None, 64 * 1024)
        held = taken
        seen = [await replay() for _ in range(len(parts))]
        return body, held, seen

    body, held, seen = anyio.run(peek_then_read)
    assert held <= 1024  # _body._MAX_PARTS
    assert body == b""  # left to the app, as a body over the limit is
    assert seen == parts  # the app still gets every part, in order


def test_asgi_declared_length_over_the_limit_is_not_read() -> None:
    calls = 0

    async def receive() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        return {"type": "http.request", "body": b"{}"}

    body, replay = anyio.run(peek_asgi, receive, "999999", 1024)
    assert body == b""
    assert replay is receive
    assert calls == 0


def test_asgi_receive_error_reaches_the_app_after_the_bytes_read() -> None:
    messages = [{"type": "http.request", "body": b'{"a":', "more_body": True}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        raise OSError("connection reset")

    async def scenario() -> None:
        body, replay = await peek_asgi(receive, None, 1024)
        assert body == b""
        assert (await replay())["body"] == b'{"a":'
        with pytest.raises(OSError, match="connection reset"):
            await replay()

    anyio.run(scenario)


# -- WSGI -----------------------------------------------------------------------------------


def _wsgi_environ(body: bytes, declared: bool) -> dict[str, Any]:
    environ: dict[str, Any] = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/chat",
        "CONTENT_TYPE": "application/json",
        "wsgi.input": io.BytesIO(body),
        "wsgi.url_scheme": "http",
        "REMOTE_ADDR": "127.0.0.1",
    }
    if declared:
        environ["CONTENT_LENGTH"] = str(len(body))
    else:
        environ["wsgi.input_terminated"] = True
    return environ


@settings(max_examples=150, deadline=None)
@given(
    body=st.binary(max_size=2000),
    declared=st.booleans(),
    limit=st.integers(min_value=0, max_value=2100),
    reads=st.lists(st.integers(min_value=-1, max_value=700), max_size=6),
    mode=st.sampled_from(["read", "readline", "readinto", "iter"]),
)
def test_wsgi_replay_is_byte_exact(
    body: bytes, declared: bool, limit: int, reads: list[int], mode: str
) -> None:
    got = bytearray()

    def app(environ: Any, start_response: Any) -> list[bytes]:
        stream = environ["wsgi.input"]
        if mode == "iter":
            for line in stream:
                got.extend(line)
        else:
            for size in [*reads, -1]:
                if mode == "read":
                    got.extend(stream.read(size))
                elif mode == "readline":
                    while chunk := stream.readline(size):
                        got.extend(chunk)
                        if size >= 0:
                            break
                elif size > 0:
                    buffer = bytearray(size)
                    n = stream.readinto(buffer)
                    got.extend(buffer[:n])
            got.extend(stream.read())
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    tracker = RecordingTracker()
    mw = AgentSightWSGIMiddleware(
        app, chat_routes=["POST /chat"], tracker=tracker, max_body_peek=limit
    )
    result = mw(_wsgi_environ(body, declared), lambda status, headers, exc_info=None: None)
    assert list(result) == [b"ok"]
    assert bytes(got) == body
    assert len(tracker.used) == 1


def test_wsgi_short_body_from_a_disconnected_client() -> None:
    environ = _wsgi_environ(b'{"conversation_id": "c1"', declared=False)
    environ["CONTENT_LENGTH"] = "100"  # the client promised more than it sent
    del environ["wsgi.input_terminated"]
    assert peek_wsgi(environ, 1024) == b""
    assert environ["wsgi.input"].read() == b'{"conversation_id": "c1"'


def test_wsgi_read_error_is_raised_after_the_bytes_read() -> None:
    class Broken(io.RawIOBase):
        def __init__(self) -> None:
            self.sent = False

        def readable(self) -> bool:
            return True

        def read(self, size: int = -1) -> bytes:
            if not self.sent:
                self.sent = True
                return b'{"a"'
            raise OSError("client went away")

    environ: dict[str, Any] = {"wsgi.input": Broken(), "CONTENT_LENGTH": "50"}
    assert peek_wsgi(environ, 1024) == b""
    stream = environ["wsgi.input"]
    assert isinstance(stream, ReplayInput)
    assert stream.read(4) == b'{"a"'
    with pytest.raises(OSError, match="client went away"):
        stream.read(1)


@settings(max_examples=60, deadline=None)
@given(body=st.binary(max_size=500), limit=st.integers(min_value=1, max_value=600))
def test_asgi_single_message_body(body: bytes, limit: int) -> None:
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    seen, tracker = _run_asgi([dict(m) for m in messages], b"application/json", limit)
    assert seen == messages
    assert len(tracker.used) == 1


def test_asgi_first_receive_error_reaches_the_app() -> None:
    async def receive() -> dict[str, Any]:
        raise OSError("reset before any byte")

    async def scenario() -> None:
        body, replay = await peek_asgi(receive, None, 1024)
        assert body == b""
        with pytest.raises(OSError, match="reset before any byte"):
            await replay()

    anyio.run(scenario)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("12", 12),
        (" 12 ", 12),
        ("0", 0),
        ("", -1),
        ("-1", -1),
        ("+5", -1),
        ("1_000", -1),
        ("\xb2", -1),  # str.isdigit() says yes, int() says no
        ("\u0663", -1),  # an Arabic-Indic three: a digit, not ASCII
        ("9" * 18, 10**18 - 1),
        ("9" * 19, -1),
        ("1" * 4301, -1),  # past int()'s limit for strings
    ],
)
def test_declared_length(value: str | None, expected: int | None) -> None:
    assert _declared_length(value) == expected


@pytest.mark.parametrize("length", ["\xb2", "1" * 4301])
def test_asgi_nonsense_length_leaves_the_stream_alone(length: str) -> None:
    async def receive() -> dict[str, Any]:
        raise AssertionError("read")

    body, replay = anyio.run(peek_asgi, receive, length, 1024)
    assert (body, replay) == (b"", receive)


def test_a_peek_woken_late_gives_the_rest_of_the_body_a_few_more_turns() -> None:
    # The rest came in time, but something held the event loop past the wait: the timeout
    # and the data were ready in the same turn, and a server that takes a few turns to
    # hand a message over (hypercorn) lost the body's id to the timeout (10 of 10).
    import asyncio
    import time as time_module

    head, tail = b'{"conversation_id": ', b'"conv_late0000001"}'
    first: dict[str, Any] = {"type": "http.request", "body": head, "more_body": True}
    rest: dict[str, Any] = {"type": "http.request", "body": tail, "more_body": False}

    async def main() -> bytes:
        loop = asyncio.get_running_loop()
        arrived = asyncio.Event()
        given: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            if not given:
                given.append(first)
                return first
            await arrived.wait()
            for _ in range(3):  # the server's own turns to hand it over
                await asyncio.sleep(0)
            return rest

        async def hold_the_loop() -> None:
            await asyncio.sleep(0.01)
            loop.call_soon(arrived.set)
            time_module.sleep(_body.PEEK_WAIT + 0.1)

        holder = asyncio.create_task(hold_the_loop())
        body, _ = await peek_asgi(receive, None, 1024)
        await holder
        return body

    assert asyncio.run(main()) == head + tail


def test_a_receive_that_fails_after_waiting_fails_for_the_app_at_the_same_point() -> None:
    # A part the server had to wait for is taken over by a task that carries the receive
    # on (see _now_or_later): its failure must reach the app after the parts before it.
    import asyncio

    async def main() -> None:
        arrived = asyncio.Event()
        given: list[int] = []

        async def receive() -> dict[str, Any]:
            if not given:
                given.append(1)
                return {"type": "http.request", "body": b"{", "more_body": True}
            await arrived.wait()
            raise OSError("the client went away")

        asyncio.get_running_loop().call_later(0.01, arrived.set)
        body, replay = await peek_asgi(receive, None, 1024)
        assert body == b""
        assert (await replay())["body"] == b"{"
        with pytest.raises(OSError, match="the client went away"):
            await replay()

    asyncio.run(main())


def test_a_receive_wrapper_keeping_state_in_its_task_is_stepped_on_in_that_task() -> None:
    # A receive wrapper that sets a context variable around its await (OpenTelemetry's
    # span), or enters an anyio cancel scope (Starlette's BaseHTTPMiddleware): a part
    # that had to wait was carried on in a task of its own, and the wrapper's exit ran in
    # another Context ("was created in a different Context"; 500s under BaseHTTPMiddleware).
    import asyncio
    import contextvars

    span = contextvars.ContextVar("span", default="root")

    async def main() -> tuple[bytes, str, str]:
        parts: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

        async def wrapped_receive() -> dict[str, Any]:
            token = span.set("receive")
            try:
                return await parts.get()
            finally:
                span.reset(token)

        await parts.put({"type": "http.request", "body": b'{"a":', "more_body": True})
        asyncio.get_running_loop().call_later(
            0.05, parts.put_nowait, {"type": "http.request", "body": b"1}", "more_body": False}
        )
        body, _ = await peek_asgi(wrapped_receive, None, 1024)
        after = span.get()
        # Out of time: the rest is the app's next receive, in the app's own task.
        await parts.put({"type": "http.request", "body": b'{"b":', "more_body": True})
        body_late, _ = await _late_peek(wrapped_receive, parts)
        return body + body_late, after, span.get()

    async def _late_peek(receive: Any, parts: Any) -> tuple[bytes, Any]:
        import asyncio

        loop = asyncio.get_running_loop()
        loop.call_later(
            _body.PEEK_WAIT + 0.1,
            parts.put_nowait,
            {"type": "http.request", "body": b"2}", "more_body": False},
        )
        body, replay = await peek_asgi(receive, None, 1024)
        assert body == b""  # gave up waiting
        assert (await replay())["body"] == b'{"b":'
        assert (await replay())["body"] == b"2}"  # the rest, awaited by the app itself
        return body, replay

    body, after_peek, at_end = asyncio.run(main())
    assert body == b'{"a":1}'
    assert after_peek == at_end == "root"


def test_a_body_that_has_not_started_is_left_to_the_app_after_the_wait() -> None:
    # A client that sends the headers and waits for the answer (or never sends the body):
    # the first part was awaited with no limit, so an app that answers unread (a 401)
    # never answered, where bare it answered at once (found by a differential run under
    # uvicorn). The first part is bounded like the rest; when it comes, the app gets it.
    # Python 3.10 awaits it without a bound, as documented (see _wait_handing_over).
    import asyncio
    import time as time_module

    message: dict[str, Any] = {"type": "http.request", "body": b"{}", "more_body": False}

    async def main() -> None:
        arrived = asyncio.Event()

        async def receive() -> dict[str, Any]:
            await arrived.wait()
            return message

        if not _body._BOUND_CANCELS:
            peek = asyncio.ensure_future(peek_asgi(receive, "2", 1024))
            await asyncio.sleep(_body.PEEK_WAIT + 0.1)
            assert not peek.done()  # past the bound, still waiting for the first part
            arrived.set()
            body, replay = await peek
            assert body == b"{}"
            assert await replay() is message
            return
        started = time_module.monotonic()
        # (Bounded here too: before the fix, this waited for ever.)
        body, replay = await asyncio.wait_for(peek_asgi(receive, "2", 1024), _body.PEEK_WAIT + 2)
        waited = time_module.monotonic() - started
        assert body == b""
        assert _body.PEEK_WAIT <= waited < _body.PEEK_WAIT + 0.5
        asyncio.get_running_loop().call_later(0.01, arrived.set)
        assert await replay() is message

    asyncio.run(main())


def test_a_first_part_already_there_is_taken_at_once() -> None:
    import asyncio

    message: dict[str, Any] = {"type": "http.request", "body": b'{"a": 1}', "more_body": False}

    async def receive() -> dict[str, Any]:
        return message

    async def main() -> None:
        body, replay = await peek_asgi(receive, None, 1024)
        assert body == b'{"a": 1}'
        assert await replay() is message

    asyncio.run(main())


def test_a_cancel_of_the_task_during_the_bounded_wait_is_not_swallowed() -> None:
    async def main() -> None:
        arrived = asyncio.Event()

        async def receive() -> dict[str, Any]:
            await arrived.wait()
            return {"type": "http.request", "body": b"{}", "more_body": False}

        peek = asyncio.ensure_future(peek_asgi(receive, "2", 1024))
        await asyncio.sleep(0.05)
        peek.cancel()
        with pytest.raises(asyncio.CancelledError):
            await peek

    asyncio.run(main())


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.timeout is 3.11+")
def test_a_time_limit_around_the_peek_still_ends_it() -> None:
    async def main() -> None:
        async def receive() -> dict[str, Any]:
            await asyncio.sleep(10)
            raise AssertionError("not cancelled")

        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await peek_asgi(receive, "2", 1024)

    asyncio.run(main())


def test_an_anyio_time_limit_around_the_peek_still_ends_it() -> None:
    # The same with anyio's (Starlette's, and the one a 3.10 app has in its own task).
    async def main() -> None:
        async def receive() -> dict[str, Any]:
            await asyncio.sleep(10)
            raise AssertionError("not cancelled")

        with pytest.raises(TimeoutError), anyio.fail_after(0.05):
            await peek_asgi(receive, "2", 1024)

    asyncio.run(main())


@pytest.mark.skipif(sys.version_info < (3, 11), reason="the bound cancels on 3.11+")
@pytest.mark.parametrize("reaction", ["answers", "fails"])
def test_a_receive_that_takes_the_bound_s_cancel_its_own_way_leaves_no_cancel_behind(
    reaction: str,
) -> None:
    message = {"type": "http.request", "body": b"{}", "more_body": False}

    async def main() -> None:
        async def receive() -> dict[str, Any]:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if reaction == "fails":
                    raise OSError("gone") from None
                return message  # swallowed, as some wrappers do
            raise AssertionError("not cancelled")

        body, replay = await peek_asgi(receive, "2", 1024)
        task = asyncio.current_task()
        assert task is not None
        assert task.cancelling() == 0
        if reaction == "fails":
            assert body == b""
            with pytest.raises(OSError, match="gone"):
                await replay()
        else:
            assert body == b"{}"
            assert await replay() is message
        await asyncio.sleep(0.01)  # no cancel left pending for the app

    asyncio.run(main())
