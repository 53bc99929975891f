"""The stand-in AgentSight API as its own process, for the benchmarks that run servers.

``python -m agentsight_middleware._standin`` on 127.0.0.1: in another process so that its
HTTP handling never competes with the measured process for the GIL (the real API runs on
another machine). ``overhead.StandInProcess`` is the in-process-controlled variant the
in-process benchmarks use (it can count and wait); this one only starts and stops.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys

from agentsight_middleware._standin import generate_api_key

__all__ = ["StandInCLI", "free_port", "generate_api_key"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class StandInCLI:
    """Started at construction; ``stop()`` says how many requests it received."""

    def __init__(self, latency: float = 0.0) -> None:
        self.latency = latency
        self.api_key = generate_api_key()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [
            sys.executable, "-m", "agentsight_middleware._standin",
            "--port", str(self.port), "--api-key", self.api_key,
        ]  # fmt: skip
        if latency:
            command += ["--latency", str(latency)]
        self.proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if "listening" not in line:
            self.proc.kill()
            raise RuntimeError(f"the stand-in did not start: {line}{self.proc.stdout.read()}")
        self.received: int | None = None

    def stop(self) -> int | None:
        """Stop it; the number of requests it says it received (None if it did not say)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        for line in out.splitlines():
            if line.startswith("Stopped after"):
                self.received = int(line.split()[2].replace(",", ""))
        return self.received
