"""The middleware's asyncio loops kept out of the other greenlets' sight under gevent (see
:func:`unseen_loop`)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["unseen_loop"]


class _Slot:
    """The running loop of one of our greenlets, and the thread's, each kept while the
    other side runs."""

    __slots__ = ("inside", "ours", "theirs")

    def __init__(self, theirs: Any) -> None:
        self.ours: Any = None
        self.theirs = theirs
        self.inside = True


# Our greenlets (each running a loop of ours): their slot.
_OURS: dict[Any, _Slot] = {}
# The OS threads (their real ident) whose greenlet tracer is ours: greenlet's is per thread.
_TRACED: set[int] = set()
# asyncio's, once a loop of ours runs: the package's import loads no asyncio.
_get_running_loop: Callable[[], Any]
_set_running_loop: Callable[[Any], None]


def _swap(event: str, args: Any) -> None:
    if event == "switch" or event == "throw":
        origin, target = args
        left = _OURS.get(origin)
        # ``inside``: each swap once, should our tracer come to be called twice a switch
        # (installed again under one set over ours that calls the one it replaced).
        if left is not None and left.inside:
            left.ours = _get_running_loop()
            _set_running_loop(left.theirs)
            left.inside = False
        entered = _OURS.get(target)
        if entered is not None and not entered.inside:
            entered.theirs = _get_running_loop()
            _set_running_loop(entered.ours)
            entered.inside = True


def _tracer(previous: Callable[[str, Any], Any] | None) -> Callable[[str, Any], None]:
    if previous is None:
        return _swap

    def trace(event: str, args: Any) -> None:
        _swap(event, args)
        previous(event, args)

    return trace


@contextlib.contextmanager
def unseen_loop() -> Iterator[None]:
    """Meanwhile, under gevent's monkey-patching, the asyncio loop this "thread" runs is the
    running loop of this greenlet only: as the others run, the OS thread's running loop is
    what it would be without ours.

    Python keeps the running loop per OS thread, and a gevent thread is a greenlet of the
    one OS thread: ours, parked in select(), was every other greenlet's running loop, and a
    host view's ``asyncio.run()`` (or Flask's ``async def`` view, through asgiref) raised
    "cannot be called from a running event loop". The swap is at each greenlet switch
    (greenlet's tracer, chained to any set before), not only at our selector's: our loop's
    greenlet also switches out in a contended lock, a thread's start, gevent's time.sleep
    (a locked SQLite file) and whatever a coroutine tracker calls. Nothing without gevent."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is None or not monkey.is_module_patched("threading"):
        yield
        return
    global _get_running_loop, _set_running_loop
    from asyncio import events

    _get_running_loop, _set_running_loop = events._get_running_loop, events._set_running_loop
    greenlet = sys.modules["greenlet"]  # gevent's, loaded with it (and untyped)
    thread = monkey.get_original("_thread", "get_ident")()
    if thread not in _TRACED:
        _TRACED.add(thread)
        greenlet.settrace(_tracer(greenlet.gettrace()))
    me = greenlet.getcurrent()
    _OURS[me] = _Slot(_get_running_loop())
    _set_running_loop(None)  # a new thread's
    try:
        yield
    finally:
        _set_running_loop(_OURS.pop(me).theirs)
