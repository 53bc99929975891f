"""The local store: with no API key, events are kept in a SQLite file on this machine.

``agentsight-middleware report`` shows the interaction rate from it, and
``agentsight-middleware send`` delivers it to AgentSight once there is a key.
"""

from __future__ import annotations

import asyncio
import math
import sqlite3
import time
from typing import Any

from .._log import LogOnce, logger
from .._retry import backoff
from .._store import LocalStore, is_locked

__all__ = ["StoreSink"]


#: Tries of a batch while another process holds the file's write lock (each waits up to
#: the file's busy timeout, 5 s here and 10 s for the durable outbox, plus a backoff): a
#: VACUUM, a backup, a database browser left in a transaction. Events meanwhile wait in the
#: worker's bounded intake.
_LOCKED_TRIES = 12


class StoreSink:
    durable = True

    def __init__(self, store: LocalStore) -> None:
        self._store = store
        # The store outlives a worker (a second lifespan starts another): the last
        # shutdown's deadline must not cut this one's writes short.
        store.deadline = math.inf
        self._log_once = LogOnce()
        self.storing = f"writing events to the events file {store.path}"
        self.stored = 0
        self.failed = 0

    @property
    def deadline(self) -> float:
        """Monotonic time past which a write waiting for the file's lock gives up (set at
        shutdown): the store's, so that a write already waiting then stops too."""
        return self._store.deadline

    @deadline.setter
    def deadline(self, value: float) -> None:
        self._store.deadline = value

    def __repr__(self) -> str:
        return f"StoreSink({self._store.path!r})"

    async def start(self) -> None:
        pass

    async def put(self, payloads: list[dict[str, Any]]) -> None:
        # SQLite blocks; this loop belongs to the worker thread and has nothing
        # else to do meanwhile, so a plain call is the cheapest correct choice.
        for attempt in range(1, _LOCKED_TRIES + 1):
            # No try waits past shutdown's deadline.
            left = self.deadline - time.monotonic()
            try:
                self.stored += self._store.write(
                    payloads, None if left == math.inf else max(left, 0.0)
                )
                return
            except sqlite3.OperationalError as exc:
                left = self.deadline - time.monotonic()
                if not is_locked(exc) or attempt == _LOCKED_TRIES or left <= 0:
                    self.failed += len(payloads)
                    raise
                if attempt == 1:
                    logger.warning(
                        "%s is locked by another process (%s); the events wait and are "
                        "written when it is free",
                        self._store.path,
                        exc,
                    )
                await asyncio.sleep(min(backoff(attempt, cap=5.0), left))
            except ValueError:
                # A payload the file cannot take must not cost the batch's others theirs.
                if len(payloads) == 1:
                    self.failed += 1
                    raise
                for payload in payloads:
                    try:
                        await self.put([payload])
                    except Exception as exc:  # counted by the inner put
                        self._log_once("storing an event", exc)
                return
            except Exception:
                self.failed += len(payloads)
                raise

    def backed_up(self) -> bool:
        return False

    async def drain(self, deadline: float, *, closing: bool = False) -> int:
        await asyncio.sleep(0)
        return 0

    async def aclose(self) -> None:
        self._store.close()

    def stats(self) -> dict[str, int]:
        return {"stored": self.stored, "failed": self.failed, "pending": 0}
