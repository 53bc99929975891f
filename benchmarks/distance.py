"""A TCP proxy that puts an API at a distance: every chunk waits ``delay`` seconds each way.

The stand-in on loopback answers within a millisecond; the real API is a round trip of tens
of milliseconds away, and answers a connection's requests as fast as they come. A server
that itself takes 50 ms an answer (``StandInProcess.set_latency``) is another thing: it
answers a connection's pipelined requests one after the other, so they add up. Here they
do not: a pipeline of 16 comes back a round trip after it went, like one request.

Run as a child process (so that its CPU is not counted as the measured process's):
``python benchmarks/distance.py HOST PORT DELAY`` prints the port it listens on.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from pathlib import Path
from types import TracebackType

__all__ = ["DistantAPI"]


async def _forward(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float
) -> None:
    """Everything ``reader`` gets, written to ``writer`` ``delay`` seconds later, in order."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)

    task = asyncio.create_task(deliver())
    try:
        while data := await reader.read(65536):
            queue.put_nowait((loop.time() + delay, data))
    except OSError:
        pass
    queue.put_nowait((loop.time() + delay, b""))
    with contextlib.suppress(OSError):
        await task


async def _serve(host: str, port: int, delay: float) -> None:
    async def connection(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            api_r, api_w = await asyncio.open_connection(host, port)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(_forward(client_r, api_w, delay), _forward(api_r, client_w, delay))
        client_w.close()
        api_w.close()

    server = await asyncio.start_server(connection, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


class DistantAPI:
    """The API at ``url`` (``http://host:port``) as seen from ``delay`` seconds away each
    way, through the proxy in a child process; ``.url`` is the proxy's."""

    def __init__(self, url: str, delay: float) -> None:
        host, port = url.split("//", 1)[1].rstrip("/").rsplit(":", 1)
        self._proc = subprocess.Popen(
            [sys.executable, str(Path(__file__)), host, port, str(delay)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._proc.stdout is not None
        self.url = f"http://127.0.0.1:{self._proc.stdout.readline().strip()}"

    def close(self) -> None:
        self._proc.kill()
        self._proc.wait()

    def __enter__(self) -> DistantAPI:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


if __name__ == "__main__":
    asyncio.run(_serve(sys.argv[1], int(sys.argv[2]), float(sys.argv[3])))
