"""The local store: with no API key, events are kept in a SQLite file on this machine.

``agentsight-middleware report`` shows the interaction rate from it, and
``agentsight-middleware send`` delivers it to AgentSight once there is a key.
"""

from __future__ import annotations

import asyncio
from typing import Any

from .._store import LocalStore

__all__ = ["StoreSink"]


class StoreSink:
    durable = True

    def __init__(self, store: LocalStore) -> None:
        self._store = store
        self.stored = 0
        self.failed = 0

    def __repr__(self) -> str:
        return f"StoreSink({self._store.path!r})"

    async def start(self) -> None:
        pass

    async def put(self, payloads: list[dict[str, Any]]) -> None:
        # SQLite blocks; this loop belongs to the worker thread and has nothing
        # else to do meanwhile, so a plain call is the cheapest correct choice.
        try:
            self.stored += self._store.write(payloads)
        except Exception:
            self.failed += len(payloads)
            raise

    def pending(self) -> int:
        return 0

    def backed_up(self) -> bool:
        return False

    async def drain(self, deadline: float) -> int:
        await asyncio.sleep(0)
        return 0

    async def aclose(self) -> None:
        self._store.close()

    def stats(self) -> dict[str, int]:
        return {"stored": self.stored, "failed": self.failed}
