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

__all__ = ["reset_in_child"]

# One hook for all objects, registered once: os.register_at_fork has no way to unregister,
# and a hook per object (each middleware, its delivery, each LogOnce, each worker start's
# sink) stayed for the life of the process, dead or alive (a test suite building 20,000
# middlewares: 60,000 hooks, ~2.4 KB each, a fork 80 -> 232 ms). An object's entry goes
# when it does.
_methods: dict[int, weakref.WeakMethod[Callable[[], None]]] = {}
_keys = itertools.count()


def _run_in_child() -> None:
    for ref in list(_methods.values()):
        bound = ref()
        if bound is not None:
            bound()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_run_in_child)


def reset_in_child(method: Callable[[], None]) -> None:
    """Call bound ``method`` in every child forked from now on, while its object lives."""
    if not hasattr(os, "register_at_fork"):  # Windows: no fork, nothing to reset
        return
    key = next(_keys)

    def forget(_: object) -> None:
        _methods.pop(key, None)

    _methods[key] = weakref.WeakMethod(method, forget)
