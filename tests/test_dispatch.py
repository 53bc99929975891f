"""The tracker path's background worker: a bounded deque the request path appends to."""

from __future__ import annotations

import logging
import threading

import pytest

from agentsight_middleware._dispatch import Dispatcher


def test_items_are_handled_in_order_and_flush_waits_for_them() -> None:
    seen: list[int] = []
    dispatcher: Dispatcher[int] = Dispatcher(seen.append, maxsize=10_000)
    for i in range(5_000):
        assert dispatcher.submit(i)
    assert dispatcher.flush(10)
    assert seen == list(range(5_000))
    stats = dispatcher.stats()
    assert (stats["submitted"], stats["processed"], stats["queued"]) == (5_000, 5_000, 0)
    dispatcher.close()


def test_a_full_queue_drops_the_newest_and_counts_them(caplog: pytest.LogCaptureFixture) -> None:
    release = threading.Event()
    started = threading.Event()
    seen: list[int] = []

    def handler(item: int) -> None:
        started.set()
        release.wait(10)
        seen.append(item)

    dispatcher: Dispatcher[int] = Dispatcher(handler, maxsize=5)
    dispatcher.submit(0)
    assert started.wait(5)  # the worker holds item 0: five more fit
    accepted = [i for i in range(1, 20) if dispatcher.submit(i)]
    assert accepted == [1, 2, 3, 4, 5]
    assert dispatcher.stats()["dropped"] == 14
    assert not dispatcher.flush(0.05)  # item 0 is still being handled
    release.set()
    assert dispatcher.flush(10)
    assert seen == [0, 1, 2, 3, 4, 5]
    assert "queue full (5 items)" in caplog.text
    dispatcher.close()


def test_a_full_queue_is_said_once_a_minute_not_every_thousand_drops(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A hung tracker and 1,000 page views a second: one WARNING line a second, for as
    # long as it hung (the built-in client says its full queue once a minute).
    release = threading.Event()
    started = threading.Event()

    def handler(item: int) -> None:
        started.set()
        release.wait(10)

    dispatcher: Dispatcher[int] = Dispatcher(handler, maxsize=5)
    dispatcher.submit(0)
    assert started.wait(5)
    with caplog.at_level(logging.WARNING, logger="agentsight_middleware"):
        for i in range(5_005):
            dispatcher.submit(i)
    assert dispatcher.stats()["dropped"] == 5_000
    said = [r.getMessage() for r in caplog.records if "queue full" in r.getMessage()]
    assert said == ["queue full (5 items), 1 event(s) dropped so far"]
    release.set()
    assert dispatcher.flush(10)
    dispatcher.close()


def test_a_failing_item_is_counted_and_the_worker_goes_on() -> None:
    seen: list[int] = []

    def handler(item: int) -> None:
        if item == 2:
            raise RuntimeError("tracker bug")
        seen.append(item)

    dispatcher: Dispatcher[int] = Dispatcher(handler)
    for i in range(5):
        dispatcher.submit(i)
    assert dispatcher.flush(10)
    assert seen == [0, 1, 3, 4]
    assert dispatcher.stats()["failed"] == 1
    dispatcher.close()


def test_close_stops_the_worker_and_a_later_submit_starts_a_new_one() -> None:
    seen: list[str] = []
    dispatcher: Dispatcher[str] = Dispatcher(
        lambda item: seen.append(threading.current_thread().name)
    )
    dispatcher.submit("a")
    first = dispatcher._thread
    assert first is not None
    dispatcher.close(5)
    assert not first.is_alive()
    dispatcher.submit("b")
    assert dispatcher.flush(5)
    assert seen == ["agentsight-worker", "agentsight-worker"]
    dispatcher.close(5)
