"""Distinct user agents classified per second: user-agents' parser against the fast path.

    .venv/bin/python benchmarks/useragents.py              # 20,000 distinct agents, ~30 s
    .venv/bin/python benchmarks/useragents.py --json       # the table, then one JSON document
    .venv/bin/python benchmarks/useragents.py --count 50000 --old-count 2000 --repeat 5

Issue #7: the worker must keep up with at least 5,000 distinct user agents a second on one
core. Every agent the worker has not seen yet is a cache miss, so what counts is the cost
of classifying a *new* agent. This script measures, on one thread pinned to one core:

* ``user_agents.parse``: the classification as _facts did it before #7 (``--old-count``
  agents, by default 5,000 of the list: at ~1 ms each the whole list would take a while);
* ``classify_user_agent``, distinct: agentsight_middleware._device on every agent of the
  list once, its lru cache cleared before each pass, so every call parses;
* ``classify_user_agent``, cached: ``--cached-distinct`` agents (default 1,000, well within
  the 4,096-entry cache) asked for again and again, as for a site's regular visitors.

The agents are ``--count`` distinct, realistic strings (Chrome, Edge, Firefox, Safari and
Samsung Internet on Windows, macOS, Linux, ChromeOS, Android phones and tablets, iPhone and
iPad, plus crawlers), made from real templates by varying versions and device models and
shuffled so the families mix. Each figure is the best of ``--repeat`` passes (the machine is
shared; the best pass is the one least disturbed), with the median beside it. The first call
of the fast path, which imports ua_parser and builds its resolver, is timed apart, with the
resident memory the resolver adds.

Prints figures, asserts nothing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from machine import describe

from agentsight_middleware import _device

TARGET: int = 5_000  # distinct agents a second on one core (issue #7)

# ---------------------------------------------------------------------------
# The agents
# ---------------------------------------------------------------------------

_DESKTOPS = (
    "Windows NT 10.0; Win64; x64",
    "Macintosh; Intel Mac OS X 10_15_7",
    "X11; Linux x86_64",
    "Windows NT 10.0; WOW64",
    "X11; CrOS x86_64 15917.71.0",
    "Windows NT 6.1; Win64; x64",
)
_PHONES = (
    "SM-S918B",
    "SM-S911U",
    "SM-A546B",
    "SM-A155F",
    "SM-G991B",
    "Pixel 8",
    "Pixel 7a",
    "Pixel 6",
    "M2101K6G",
    "23021RAAEG",
    "CPH2451",
    "RMX3630",
    "moto g(60)",
    "motorola edge 40",
    "K",
    "ONEPLUS A6013",
    "V2111",
    "TECNO KI5k",
    "Infinix X6816",
    "2201117TY",
)
_TABLETS = (
    "SM-X200",
    "SM-X710",
    "SM-T870",
    "SM-P610",
    "Lenovo TB-X606F",
    "Pixel Tablet",
    "KFTRWI",
    "KFMAWI",
    "Nexus 10",
    "MediaPad M5",
)
_FIREFOX_OS = (
    "Windows NT 10.0; Win64; x64",
    "Macintosh; Intel Mac OS X 10.15",
    "X11; Linux x86_64",
    "X11; Ubuntu; Linux x86_64",
    "Windows NT 6.1; Win64; x64",
    "Macintosh; Intel Mac OS X 14.5",
)
_SAFARI = "AppleWebKit/605.1.15 (KHTML, like Gecko)"


def _chrome(j: int) -> str:
    """A distinct Chrome version for each j."""
    return f"{100 + j % 32}.0.{4896 + (j // 32) % 2000}.{j // 64000}"


def _agent(kind: int, j: int) -> str:
    if kind == 0:
        return (
            f"Mozilla/5.0 ({_DESKTOPS[j % len(_DESKTOPS)]}) AppleWebKit/537.36 "
            f"(KHTML, like Gecko) Chrome/{_chrome(j)} Safari/537.36"
        )
    if kind == 1:
        return (
            f"Mozilla/5.0 (Linux; Android {10 + (j // len(_PHONES)) % 5}; "
            f"{_PHONES[j % len(_PHONES)]}) AppleWebKit/537.36 (KHTML, like Gecko) "
            f"Chrome/{_chrome(j)} Mobile Safari/537.36"
        )
    if kind == 2:
        ios, minor = 15 + j % 4, (j // 4) % 7
        device = ("iPhone; CPU iPhone OS", "iPad; CPU OS")[(j // 28) % 2]
        return (
            f"Mozilla/5.0 ({device} {ios}_{minor} like Mac OS X) {_SAFARI} "
            f"Version/{ios}.{minor} Mobile/{15 + j % 7}E{100 + j // 56} Safari/604.1"
        )
    if kind == 3:
        major = 100 + j % 32
        return (
            f"Mozilla/5.0 ({_DESKTOPS[j % 2]}) AppleWebKit/537.36 (KHTML, like Gecko) "
            f"Chrome/{major}.0.0.0 Safari/537.36 Edg/{major}.0.{1000 + j // 2}.{j % 100}"
        )
    if kind == 4:
        version = 100 + j % 36
        os_ = _FIREFOX_OS[(j // 36) % len(_FIREFOX_OS)]
        return f"Mozilla/5.0 ({os_}; rv:{version}.0) Gecko/20100101 Firefox/{version}.{j // 216}"
    if kind == 5:
        return (
            f"Mozilla/5.0 (Linux; Android {11 + j % 4}; {_PHONES[j % 6]}) AppleWebKit/537.36 "
            f"(KHTML, like Gecko) SamsungBrowser/{20 + (j // 4) % 6}.{j // 24 % 10} "
            f"Chrome/{_chrome(j)} Mobile Safari/537.36"
        )
    if kind == 6:
        return (
            f"Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) {_SAFARI} "
            f"Version/{16 + j % 3}.{j % 7}.{j // 21} Safari/605.1.15"
        )
    if kind == 7:
        return (
            f"Mozilla/5.0 (Linux; Android {11 + (j // len(_TABLETS)) % 4}; "
            f"{_TABLETS[j % len(_TABLETS)]}) AppleWebKit/537.36 (KHTML, like Gecko) "
            f"Chrome/{_chrome(j)} Safari/537.36"
        )
    bot = j % 3
    if bot == 0:
        return (
            "Mozilla/5.0 (Linux; Android 6.0.1; Nexus 5X Build/MMB29P) AppleWebKit/537.36 "
            f"(KHTML, like Gecko) Chrome/{_chrome(j)} Mobile Safari/537.36 "
            "(compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
        )
    if bot == 1:
        return (
            "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; bingbot/2.0; "
            f"+http://www.bing.com/bingbot.htm) Chrome/{_chrome(j)} Safari/537.36"
        )
    return (
        "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; "
        f"GPTBot/1.{j % 10}; +https://openai.com/gptbot) Chrome/{_chrome(j)}"
    )


# Rough shares of the web: Chrome desktop, Chrome Android, iOS Safari, Edge, Firefox,
# Samsung Internet, macOS Safari, Android tablets, crawlers.
_WEIGHTS = (30, 22, 18, 7, 5, 5, 5, 4, 4)


def make_agents(count: int, seed: int = 7) -> list[str]:
    """``count`` distinct agents, the families in their shares, in a shuffled order."""
    order = [kind for kind, weight in enumerate(_WEIGHTS) for _ in range(weight)]
    seen: set[str] = set()
    counters = [0] * len(_WEIGHTS)
    stale = 0
    for kind in itertools.cycle(order):
        if len(seen) >= count or stale > 10 * count:
            break
        agent = _agent(kind, counters[kind])
        counters[kind] += 1
        if agent in seen:  # small families run out of variety and repeat
            stale += 1
        else:
            seen.add(agent)
    agents = sorted(seen)
    random.Random(seed).shuffle(agents)
    return agents


# ---------------------------------------------------------------------------
# The measurements
# ---------------------------------------------------------------------------


def before_7(ua: str) -> tuple[str | None, bool]:
    """_facts.classify_user_agent before issue #7, without its cache (every agent is new):
    the same code as _device's last-resort engine."""
    return _device._with_user_agents(ua[: _device._MAX_USER_AGENT])


def rss_mb() -> float:
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def passes(
    run: Callable[[], int], repeat: int, before_each: Callable[[], None] = lambda: None
) -> dict[str, Any]:
    """Times ``run`` (which returns how many agents it classified) ``repeat`` times."""
    seconds: list[float] = []
    calls = 0
    for _ in range(repeat):
        before_each()
        start = time.perf_counter()
        calls = run()
        seconds.append(time.perf_counter() - start)
    best, median = min(seconds), statistics.median(seconds)
    return {
        "calls": calls,
        "seconds_best": best,
        "seconds_median": median,
        "per_second_best": calls / best,
        "per_second_median": calls / median,
        "us_per_call_best": best / calls * 1e6,
    }


def classify_all(classify: Callable[[str], object], agents: Sequence[str]) -> Callable[[], int]:
    def run() -> int:
        for agent in agents:
            classify(agent)
        return len(agents)

    return run


def pin_to_one_core() -> int | None:
    """Runs the rest on one CPU, as the worker thread gets at most one; None where unsupported."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    return cpu


def machine() -> dict[str, Any]:
    return describe(
        ("user-agents", "ua-parser", "ua-parser-builtins", "ua-parser-rs", "google-re2")
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=20_000, help="distinct agents")
    parser.add_argument(
        "--old-count", type=int, default=5_000, help="of them, how many user_agents.parse gets"
    )
    parser.add_argument("--cached-distinct", type=int, default=1_000, help="agents asked again")
    parser.add_argument("--cached-calls", type=int, default=200_000, help="calls in a cached pass")
    parser.add_argument("--repeat", type=int, default=3, help="passes per figure (best shown)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = parser.parse_args(argv)
    if min(args.count, args.old_count, args.cached_distinct, args.cached_calls, args.repeat) < 1:
        parser.error("every count must be >= 1")

    cpu = pin_to_one_core()
    info = machine()
    agents = make_agents(args.count)
    old_agents = agents[: args.old_count]
    cached = agents[: min(args.cached_distinct, len(agents))]
    cached_calls = [cached[i % len(cached)] for i in range(args.cached_calls)]

    print(f"CPU      {info['cpu']}, {info['cores']} cores; 1-min load {info['load_1min']}")
    print(f"Python   {info['python']} on {info['platform']}")
    print("Packages " + ", ".join(f"{k} {v}" for k, v in info["packages"].items()))
    print(
        f"Agents   {len(agents):,} distinct (shares {'/'.join(map(str, _WEIGHTS))} % of Chrome, "
        "Chrome Android, iOS, Edge, Firefox, Samsung, Safari, Android tablets, crawlers); "
        f"one thread, {'pinned to CPU ' + str(cpu) if cpu is not None else 'not pinned'}; "
        f"best of {args.repeat} passes"
    )

    # The fast path's first call: import ua_parser, build the resolver.
    _device._classify.cache_clear()
    rss = rss_mb()
    start = time.perf_counter()
    _device.classify_user_agent("Mozilla/5.0 (warm-up)")
    first_call = time.perf_counter() - start
    build_mb = rss_mb() - rss
    backend = _device.backend()
    print(
        f"Fast path: {backend}; first call (import + build) {first_call * 1e3:,.0f} ms, "
        f"+{build_mb:.1f} MB RSS"
    )

    rss = rss_mb()
    start = time.perf_counter()
    before_7("Mozilla/5.0 (warm-up)")
    old_first = time.perf_counter() - start
    print(
        f"user_agents: first call (import) {old_first * 1e3:,.0f} ms, +{rss_mb() - rss:.1f} MB RSS"
    )
    print(flush=True)

    def fill_cache() -> None:
        _device._classify.cache_clear()
        for agent in cached:
            _device.classify_user_agent(agent)

    results = {
        "user_agents.parse (before #7), distinct": passes(
            classify_all(before_7, old_agents), args.repeat
        ),
        f"classify_user_agent ({backend}), distinct": passes(
            classify_all(_device.classify_user_agent, agents),
            args.repeat,
            before_each=_device._classify.cache_clear,
        ),
        f"classify_user_agent, cached ({len(cached):,} agents)": passes(
            classify_all(_device.classify_user_agent, cached_calls),
            args.repeat,
            before_each=fill_cache,
        ),
    }

    head = f"{'path':<50}{'calls':>10}{'per second':>14}{'(median)':>12}{'us/call':>10}"
    print(head)
    print("-" * len(head))
    for name, figures in results.items():
        print(
            f"{name:<50}{figures['calls']:>10,}{figures['per_second_best']:>14,.0f}"
            f"{figures['per_second_median']:>12,.0f}{figures['us_per_call_best']:>10.1f}"
        )
    print()

    old, new, _ = results.values()
    verdicts = {}
    for label, figures in (("new path", new), ("user_agents.parse", old)):
        rate = figures["per_second_best"]
        if rate >= TARGET:
            verdict = f"met, {rate / TARGET:.1f}x the target"
        else:
            verdict = (
                f"NOT met: {rate:,.0f}/s is {rate / TARGET:.0%} of the target, "
                f"{TARGET - rate:,.0f} agents/s behind"
            )
        verdicts[label] = verdict
        print(f"Target {TARGET:,} distinct agents/s on one core, {label}: {verdict}")
    print(
        f"Speed-up of the new path over user_agents.parse on new agents: "
        f"{new['per_second_best'] / old['per_second_best']:.0f}x"
    )

    if args.json:
        print(
            json.dumps(
                {
                    "machine": info,
                    "pinned_cpu": cpu,
                    "distinct_agents": len(agents),
                    "target_per_second": TARGET,
                    "backend": backend,
                    "first_call_seconds": first_call,
                    "resolver_rss_mb": build_mb,
                    "user_agents_first_call_seconds": old_first,
                    "results": results,
                    "target_met": {
                        "new path": new["per_second_best"] >= TARGET,
                        "user_agents.parse": old["per_second_best"] >= TARGET,
                    },
                    "verdicts": verdicts,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
