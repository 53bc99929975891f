"""Worst cases: what a request built to be slow costs each parser, next to a usual one.

    .venv/bin/python benchmarks/hostile.py            # the table, ~20 s
    .venv/bin/python benchmarks/hostile.py --json     # the table, then one JSON document

The request path reads the id from the ``Cookie`` header, a JSON or form body and the query
string, matches the path against the rules and builds a dict of the headers; the worker
reads the client IP from the forwarding headers, the language from ``Accept-Language`` and
the device from the user agent. Each gets here a usual input and hostile ones as large as a
server lets through (headers of 8 KB, bodies of ``max_body_peek``'s 64 KB, a path of 8 KB):
many near-candidates, long runs a regex could give back one character at a time, repeated
fields, deep nesting. A row over its budget (1 ms on the request path, where it holds the
event loop or the worker thread's turn; 5 ms in the worker) is flagged: a client could make
every one of its requests cost that much. A JSON body the fast scan cannot settle is parsed
with ``json.loads``, as the app parses it: such a row's budget is 1.2x the app's parse of the
same body (up to ~2 ms for 64 KB of floats).

Each figure is the best of 5 timings (the machine is shared: the best is the least
disturbed). Prints figures, asserts nothing. A code review once found regexes of a faster
lookup that cost 80x the old code on such input, which no test times: run this after
changing a parser.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from agentsight_middleware._config import Settings
from agentsight_middleware._conversation import cookie_value, form_field, json_field, query_field
from agentsight_middleware._device import classify_user_agent
from agentsight_middleware._facts import TrustedProxies, best_language, client_ip
from agentsight_middleware._log import logger
from agentsight_middleware.asgi import _header_dict

COOKIE = "agentsight_conversation_id"
FIELD = "conversation_id"
ID = "conv_3f9a1c2b7d4e"
SITE = "cookie_consent=necessary%2Canalytics; csrftoken=q8JrW1mZ6xk0Lr3uT2vA9sYpN4bC7eHd"
HEADER_BYTES = 8 * 1024
BODY_BYTES = 64 * 1024

#: Budgets, us per call: where a row is flagged.
REQUEST_PATH_BUDGET = 1_000.0
WORKER_BUDGET = 5_000.0


@dataclass
class Case:
    part: str  # "request" or "worker"
    what: str
    label: str
    call: Callable[[], object]
    #: What the app itself pays for the same input, when it may well pay it (its own parse
    #: of a JSON body): the row's budget is then at least 1.2x that.
    app_pays: Callable[[], object] | None = None


def _fill(unit: str, size: int = HEADER_BYTES) -> str:
    return unit * (size // len(unit))


def _fill_bytes(unit: bytes, size: int = BODY_BYTES) -> bytes:
    return unit * (size // len(unit))


def cases() -> list[Case]:
    out: list[Case] = []

    def add(
        part: str,
        what: str,
        label: str,
        call: Callable[[], object],
        app_pays: Callable[[], object] | None = None,
    ) -> None:
        out.append(Case(part, what, label, call, app_pays))

    # -- Cookie header ---------------------------------------------------------------
    usual = f"{SITE}; {COOKIE}={ID}"
    for label, header in [
        ("usual (site cookies, ours last)", usual),
        ("8 KB of ours in the wrong place (x<name>=id)", _fill(f"x{COOKIE}={ID}; ")),
        ("8 KB of ours inside other values", _fill(f"m=v {COOKIE}={ID};")),
        ("8 KB of ours with 127 id chars then '!'", _fill(f"{COOKIE}={'a' * 127}!; ")),
        ("ours, then 8 KB of blanks, then 'x'", f"{COOKIE}=a" + " " * HEADER_BYTES + "x"),
        ("8 KB of '<name>=' repeated", _fill(f"{COOKIE}=")),
    ]:
        add("request", "Cookie: our id", label, partial(cookie_value, header, COOKIE))

    # -- JSON body -------------------------------------------------------------------
    usual_body = json.dumps({FIELD: ID, "message": "Do you ship to Germany?"}).encode()
    prompt = json.dumps({"message": "x" * (BODY_BYTES - 100), FIELD: ID}).encode()
    for label, body in [
        ("usual (id first, short message)", usual_body),
        ("64 KB prompt before the id", prompt),
        ("id, then 64 KB of trailing blanks", usual_body + b" " * BODY_BYTES),
        ("64 KB of the key with 29 digits and no end", b"{" + _fill_bytes(
            f'"{FIELD}":{"1" * 29}x,'.encode()) + b'"a":1}'),
        ("64 KB of '[' (nesting)", b'{"a":' + _fill_bytes(b"[")),
        ("64 KB of the key with an escaped quote", b"{" + _fill_bytes(
            f'"{FIELD}\\"":1,'.encode()) + b"}"),
        # A bracket before the key: only a parse can tell where it stands.
        ("64 KB list of floats before the key", b'{"a":[' + _fill_bytes(b"1.5e3,")
            + f'1],"{FIELD}":"{ID}"}}'.encode()),
    ]:  # fmt: skip
        add("request", "JSON body: the id", label, partial(json_field, body, FIELD),
            partial(_app_parse, body))  # fmt: skip

    # -- Form body and query string ---------------------------------------------------
    for label, form in [
        ("usual form", f"message=hi&{FIELD}={ID}".encode()),
        ("64 KB of fields", _fill_bytes(b"a=b&") + f"{FIELD}={ID}".encode()),
        ("64 KB of '%' escapes", f"{FIELD}=".encode() + _fill_bytes(b"%zz")),
        ("64 KB of escaped keys", _fill_bytes(b"a%5F=b&") + f"{FIELD}={ID}".encode()),
        ("one 64 KB key of '%'", _fill_bytes(b"%") + f"=b&{FIELD}={ID}".encode()),
        ("one 64 KB key of 'a'", _fill_bytes(b"a") + f"=b&{FIELD}={ID}".encode()),
        ("one 64 KB key of '%' then 'a'", b"%" + _fill_bytes(b"a") + f"=b&{FIELD}={ID}".encode()),
        ("64 keys of 1 KB of '%'", (b"%" * 1021 + b"=b&") * 64 + f"{FIELD}={ID}".encode()),
        ("1,000 keys of 45 'a'", _fill_bytes(b"a" * 45 + b"=b&") + f"{FIELD}={ID}".encode()),
    ]:
        add("request", "form body: the id", label, partial(form_field, form, FIELD))
    for label, query in [
        ("usual query", f"utm_source=news&{FIELD}={ID}"),
        ("8 KB of fields", _fill("a=b&") + f"{FIELD}={ID}"),
        ("8 KB of escaped keys", _fill("a%5F=b&") + f"{FIELD}={ID}"),
        ("one 8 KB key of '%'", _fill("%") + f"=b&{FIELD}={ID}"),
    ]:
        add("request", "query string: the id", label, partial(query_field, query, FIELD))

    # -- Rules ------------------------------------------------------------------------
    settings = Settings(
        widget_pages=["/", "/pricing", "/docs/**", "/docs/**/v/**/index.html"],
        chat_routes=["POST /api/chat", "POST /api/agents/{agent}/chat"],
    )
    match = settings.rules.match
    for label, method, path in [
        ("usual page", "GET", "/pricing"),
        ("8 KB path under /docs/ (two competing **)", "GET", "/docs/" + _fill("v/")),
        ("8 KB path under /api/agents/", "POST", "/api/agents/" + _fill("a") + "/chat"),
    ]:
        add("request", "rules: match", label, partial(match, method, path))

    # -- Header dict ------------------------------------------------------------------
    usual_headers = [(b"host", b"shop.example"), (b"cookie", usual.encode())] * 1 + [
        (f"x-h{i}".encode(), b"v") for i in range(18)
    ]
    for label, headers in [
        ("usual (20 fields)", usual_headers),
        ("1,000 Cookie fields", [(b"cookie", b"a=b")] * 1000),
        ("1,000 X-Forwarded-For fields", [(b"x-forwarded-for", b"203.0.113.7")] * 1000),
    ]:
        add("request", "headers by name", label, partial(_header_dict, {"headers": headers}))

    # -- Worker: client IP, language, device -----------------------------------------
    trusted = TrustedProxies(["10.0.0.0/8"])
    for label, xff in [
        ("usual (client, proxy)", "203.0.113.7, 10.0.0.3"),
        ("8 KB of hops, all trusted", _fill("10.0.0.3, ") + "10.0.0.4"),
        ("8 KB of junk hops", _fill("not-an-ip, ") + "10.0.0.4"),
    ]:
        add("worker", "client IP (X-Forwarded-For)", label,
            partial(client_ip, "10.0.0.2", forwarded=None, x_forwarded_for=xff,
                    x_real_ip="203.0.113.7", trusted=trusted))  # fmt: skip
    for label, header in [
        ("usual", "de-CH,de;q=0.9,en;q=0.8"),
        ("8 KB of languages", _fill("en-US;q=0.5,")),
        ("8 KB of ';' parameters", "en" + _fill(";q=0.5")),
    ]:
        add("worker", "Accept-Language", label, partial(best_language, header))
    chrome = (
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/126.0.0.0 Safari/537.36"
    )
    for label, agent in [
        ("usual Chrome, never seen", chrome),
        ("8 KB agent, never seen", _fill("Mozilla/5.0 (X; Y) ")),
        ("8 KB of '(' , never seen", "Mozilla/5.0 " + _fill("(")),
    ]:
        add("worker", "user agent (device, bot)", label, _new_agents(agent))
    return out


def _app_parse(body: bytes) -> object:
    """The app's ``json.loads`` of a body, which may refuse it: that costs it too."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


def _new_agents(agent: str) -> Callable[[], object]:
    """Classifies ``agent`` with a new suffix each call: the cache would answer a repeat."""
    counter = itertools.count()

    def call() -> object:
        return classify_user_agent(f"{agent} {next(counter)}")

    return call


def best_us(call: Callable[[], object], repeat: int) -> float:
    """Best of ``repeat`` timings, in us per call (each timing long enough to be read)."""
    call()  # first-call costs (a compiled regex, an import) are not the case's
    number = 1
    while True:
        started = time.perf_counter()
        for _ in range(number):
            call()
        if time.perf_counter() - started >= 0.02 or number >= 10_000:
            break
        number *= 4
    timings = []
    for _ in range(repeat):
        started = time.perf_counter()
        for _ in range(number):
            call()
        timings.append((time.perf_counter() - started) / number)
    return min(timings) * 1e6


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON document too")
    parser.add_argument("--repeat", type=int, default=5, help="timings per case (best shown)")
    args = parser.parse_args(argv)
    logger.disabled = True  # the hostile forwarding headers' warning is not the figure
    rows: list[dict[str, Any]] = []
    usual: dict[str, float] = {}
    print(f"{'part':8} {'what':28} {'input':46} {'us/call':>9} {'x usual':>8}")
    for case in cases():
        us = best_us(case.call, args.repeat)
        base = usual.setdefault(case.what, us)  # each group's first case is its usual one
        budget = REQUEST_PATH_BUDGET if case.part == "request" else WORKER_BUDGET
        note = ""
        if case.app_pays is not None:
            app_us = best_us(case.app_pays, args.repeat)
            budget = max(budget, 1.2 * app_us)
            note = f"  (the app's own parse: {app_us:.0f} us)" if us > 100 else ""
        flag = "  OVER BUDGET" if us > budget else note
        print(f"{case.part:8} {case.what:28} {case.label:46} {us:9.1f} {us / base:8.1f}{flag}")
        rows.append(
            {"part": case.part, "what": case.what, "input": case.label,
             "us_per_call": round(us, 2), "times_usual": round(us / base, 1),
             "over_budget": flag.startswith("  OVER")}
        )  # fmt: skip
    over = [row for row in rows if row["over_budget"]]
    print(
        f"budgets: {REQUEST_PATH_BUDGET:.0f} us a call on the request path, "
        f"{WORKER_BUDGET:.0f} us in the worker; over budget: {len(over)}"
    )
    if args.json:
        print(json.dumps({"rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
