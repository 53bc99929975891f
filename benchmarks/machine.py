"""What machine a benchmark ran on: the CPU model and package versions, for every script."""

from __future__ import annotations

import os
import platform
from collections.abc import Iterable
from importlib import metadata
from typing import Any

__all__ = ["cpu_model", "describe", "package_versions", "verdict_lines"]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        return platform.processor() or "?"
    return "?"


def package_versions(names: Iterable[str], missing: str | None = None) -> dict[str, str | None]:
    """Each distribution's installed version, or ``missing`` when it is not installed."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = missing
    return versions


def describe(packages: Iterable[str]) -> dict[str, Any]:
    """CPU, cores, Python, platform, 1-minute load and ``packages``' versions ("-": absent)."""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "load_1min": round(os.getloadavg()[0], 2),
        "packages": package_versions(packages, missing="-"),
    }


def verdict_lines(verdicts: Iterable[dict[str, Any]]) -> list[str]:
    """One line per target a benchmark judged: met or MISSED, and the figure reached."""
    return [
        f"  {'met   ' if v['met'] else 'MISSED'} {v['target']}: {v['reached']}" for v in verdicts
    ]
