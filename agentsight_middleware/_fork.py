"""Forget background threads inherited across ``fork()``.

A thread does not survive ``fork()``: in a gunicorn ``--preload`` or uWSGI
worker, the parent's worker thread is gone while its objects still say
"started". A hook run in the child resets them, so the first event in the
child starts a fresh worker, and the request path checks one boolean instead
of calling ``os.getpid()`` on every event.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable

__all__ = ["reset_in_child"]


def reset_in_child(method: Callable[[], None]) -> None:
    """Call bound ``method`` in every child forked from now on, while its object lives."""
    if not hasattr(os, "register_at_fork"):  # Windows: no fork, nothing to reset
        return
    ref = weakref.WeakMethod(method)

    def hook() -> None:
        bound = ref()
        if bound is not None:
            bound()

    os.register_at_fork(after_in_child=hook)
