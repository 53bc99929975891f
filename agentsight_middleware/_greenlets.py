"""The middleware's asyncio loops kept out of the other greenlets' sight under gevent (see
:func:`unseen_loop`)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["unseen_loop"]

# A new thread's asyncgen hooks.
_NO_HOOKS = (None, None)


class _Slot:
    """The running loop and asyncgen hooks of one of our greenlets, and the thread's, each
    kept while the other side runs."""

    __slots__ = ("inside", "ours", "ours_hooks", "theirs", "theirs_hooks")

    def __init__(self, theirs: Any, theirs_hooks: Any) -> None:
        self.ours: Any = None
        self.ours_hooks: Any = _NO_HOOKS
        self.theirs = theirs
        self.theirs_hooks = theirs_hooks
        self.inside = True


# Our greenlets (each running a loop of ours): their slot.
_OURS: dict[Any, _Slot] = {}
# Per OS thread (an unpatched threading.local, made once gevent is seen): ``ours`` once its
# greenlet tracer is ours (greenlet's is per thread). Not a set of thread idents: a thread's
# ident goes to the next thread started once it ends, and that thread's loops were seen by
# all its greenlets.
_traced: Any = None
# asyncio's, once a loop of ours runs: the package's import loads no asyncio. Or none, where
# asyncio keeps the running loop per greenlet already (see _per_thread).
_get_running_loop: Callable[[], Any]
_set_running_loop: Callable[[Any], None]
_loop_per_thread: bool | None = None


def _none() -> None:
    return None


def _keep(loop: Any) -> None:
    pass


def _per_thread(greenlet: Any, get: Callable[[], Any], set_: Callable[[Any], None]) -> bool:
    """Whether the running loop is the OS thread's, which all its greenlets see (asyncio's C
    accelerator keeps it so), not a gevent-patched threading.local's, a greenlet's own
    already (asyncio's without the accelerator, as on PyPy, imported after the patching).
    The tracer runs in the greenlet switched to, and would set that one's: ours ran with no
    running loop ("no running event loop")."""
    before = get()
    marker = object()
    set_(marker)
    try:
        return greenlet.greenlet(get).switch() is marker
    finally:
        set_(before)


def _swap(event: str, args: Any) -> None:
    if event == "switch" or event == "throw":
        origin, target = args
        left = _OURS.get(origin)
        # ``inside``: each swap once, should our tracer come to be called twice a switch
        # (installed again under one set over ours that calls the one it replaced).
        if left is not None and left.inside:
            left.ours = _get_running_loop()
            left.ours_hooks = sys.get_asyncgen_hooks()
            _set_running_loop(left.theirs)
            sys.set_asyncgen_hooks(*left.theirs_hooks)
            left.inside = False
        entered = _OURS.get(target)
        if entered is not None and not entered.inside:
            entered.theirs = _get_running_loop()
            entered.theirs_hooks = sys.get_asyncgen_hooks()
            _set_running_loop(entered.ours)
            sys.set_asyncgen_hooks(*entered.ours_hooks)
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
    global _get_running_loop, _set_running_loop, _loop_per_thread, _traced
    from asyncio import events

    greenlet = sys.modules["greenlet"]  # gevent's, loaded with it (and untyped)
    if _loop_per_thread is None:
        _loop_per_thread = _per_thread(greenlet, events._get_running_loop, events._set_running_loop)
    if _loop_per_thread:
        _get_running_loop, _set_running_loop = events._get_running_loop, events._set_running_loop
    else:  # the asyncgen hooks are the OS thread's still
        _get_running_loop, _set_running_loop = _none, _keep
    if _traced is None:
        _traced = monkey.get_original("_thread", "_local")()
    if not getattr(_traced, "ours", False):
        _traced.ours = True
        greenlet.settrace(_tracer(greenlet.gettrace()))
    me = greenlet.getcurrent()
    _OURS[me] = _Slot(_get_running_loop(), sys.get_asyncgen_hooks())
    # A new thread's. The asyncgen hooks are the OS thread's too, and a loop sets its own as
    # it runs: a view's loop closing at the end of its asyncio.run() closed the async
    # generators ours had first iterated meanwhile (a coroutine tracker's ``async for`` over
    # a response's chunks ended after the first).
    _set_running_loop(None)
    sys.set_asyncgen_hooks(*_NO_HOOKS)
    try:
        yield
    finally:
        slot = _OURS.pop(me)
        _set_running_loop(slot.theirs)
        sys.set_asyncgen_hooks(*slot.theirs_hooks)
