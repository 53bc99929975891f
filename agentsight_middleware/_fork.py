"""Forget background threads inherited across ``fork()``.

A thread does not survive ``fork()``: in a gunicorn ``--preload`` or uWSGI
worker, the parent's worker thread is gone while its objects still say
"started". A hook run in the child resets them, so the first event in the
child starts a fresh worker, and the request path checks one boolean instead
of calling ``os.getpid()`` on every event.
"""

from __future__ import annotations

import itertools
import os
import weakref
from collections.abc import Callable
from typing import Any

__all__ = ["reset_in_child"]

# One hook for all objects, registered once: os.register_at_fork has no way to unregister,
# and a hook per object (each middleware, its delivery, each LogOnce, each worker start's
# sink) stayed for the life of the process, dead or alive (a test suite building 20,000
# middlewares: 60,000 hooks, ~2.4 KB each, a fork 80 -> 232 ms). An object's entry goes
# when it does.
# Each entry: a weak reference to the object and the plain function to call on it. Not a
# weakref.WeakMethod: its callback reads the WeakMethod back through a weak reference, which
# is gone when both die in the same collection (at interpreter exit, a middleware held by a
# module global with a test client or a Flask app), and Python printed "Exception ignored
# in: <function WeakMethod.__new__.<locals>._cb> ... AttributeError: 'NoneType' object has
# no attribute '_alive'" at the exit of every such WSGI app.
_methods: dict[int, tuple[weakref.ref[Any], Callable[[Any], None]]] = {}
_keys = itertools.count()


def _run_in_child() -> None:
    for ref, function in list(_methods.values()):
        owner = ref()
        if owner is not None:
            function(owner)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_run_in_child)


def reset_in_child(method: Callable[[], None]) -> None:
    """Call bound ``method`` in every child forked from now on, while its object lives."""
    if not hasattr(os, "register_at_fork"):  # Windows: no fork, nothing to reset
        return
    key = next(_keys)
    methods = _methods  # held here: at exit the module's globals may be gone first

    def forget(_: object) -> None:
        methods.pop(key, None)

    bound: Any = method
    _methods[key] = (weakref.ref(bound.__self__, forget), bound.__func__)
