"""The interaction report over a local events file: figures, a terminal table, an HTML page.

A conversation is *initialized* when it has a page view (``is_used`` false) and *used* when
it also has a chat (``is_used`` true). A chat whose conversation never had a page view (an
API client, a page served before the middleware was installed, a lost cookie) is counted
apart, so the interaction rate is used / initialized and never above 100 %. A conversation is
an id within one environment: the same id in production and in development (one cookie
domain, an id taken from the customer) is two conversations, so that the report's rate by
environment is what ``environment=`` reports for each (grouped by id alone, a production view
and a development chat made production's rate 100 %, where production alone said 0 %).

A conversation's page, device, language, source, hour and day are those of its *first*
page view: where the widget was first offered is the placement that earned (or did not earn)
the chat. With ``since``, only events at or after it count (a conversation whose page view
came before it and whose chat comes within it is counted apart, in neither the rate nor the
chats without a page view); with ``environment``, only the events of that AgentSight
environment (``production``, ``development``, or ``none`` for events recorded without one).
"""

from __future__ import annotations

import html
import math
import os
import re
import sqlite3
import time
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from contextlib import closing, suppress
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Any

from ._store import check_unchanged, connect_readonly, wrap_database_error

__all__ = [
    "DEFAULT_BY",
    "DIMENSIONS",
    "NO_ENVIRONMENT",
    "DailyRow",
    "GroupRow",
    "Report",
    "build_report",
    "format_text",
    "headline",
    "mixed_environments",
    "parse_environment",
    "parse_since",
    "render_html",
    "unreadable_note",
]

#: Breakdown name -> the per-conversation column it groups on.
DIMENSIONS: Mapping[str, str] = {
    "page": "page_path",
    "device": "device",
    "language": "language",
    "hour": "hour",
    "source": "source",
}

DEFAULT_BY = ("page", "device", "language", "hour", "source")

_TITLES = {
    "page": "page (widget placement)",
    "device": "device",
    "language": "language",
    "hour": "hour of day (UTC)",
    "source": "source",
}

_DAY = 86400

#: ``build_report(environment=...)`` for the events recorded without an environment.
NO_ENVIRONMENT = "none"


def _rate(used: int, initialized: int) -> float | None:
    return used / initialized * 100 if initialized else None


@dataclass(frozen=True)
class GroupRow:
    """One line of a breakdown: conversations initialized with this key, and used."""

    #: The page path, device, language, source or environment (None when the events had
    #: none), or the UTC hour 0-23.
    key: str | int | None
    initialized: int
    used: int
    interaction_rate_percent: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "initialized": self.initialized,
            "used": self.used,
            "interaction_rate_percent": self.interaction_rate_percent,
        }


@dataclass(frozen=True)
class DailyRow:
    """Conversations whose first page view fell on ``date`` (UTC, ``YYYY-MM-DD``)."""

    date: str
    initialized: int
    used: int
    #: None on a day with no page view: the trend has a gap there, not a zero.
    interaction_rate_percent: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "date": self.date,
            "initialized": self.initialized,
            "used": self.used,
            "interaction_rate_percent": self.interaction_rate_percent,
        }


@dataclass(frozen=True)
class Report:
    path: str
    #: Unix seconds the report was made at.
    generated_at: float
    #: Unix seconds: only events at or after it were counted (None: all).
    since: float | None
    #: Events (page views and chats) counted.
    events: int
    first_event_at: float | None
    last_event_at: float | None
    initialized: int
    used: int
    #: Conversations that chatted with no page view (in the window, nor before it).
    used_without_page_view: int
    interaction_rate_percent: float | None
    abandoned: int
    abandoned_percent: float | None
    #: Breakdown name (``page``, ``device``, ...) -> rows, most initialized first.
    breakdowns: Mapping[str, tuple[GroupRow, ...]]
    #: Every UTC day from the first page view to the last, in order.
    daily: tuple[DailyRow, ...]
    #: The environment counted: ``production``, ``development``, :data:`NO_ENVIRONMENT`, or
    #: None for every event whatever its environment.
    environment: str | None = None
    #: Conversations by environment, most initialized first: more than one row means the
    #: figures above mix them (a developer's visits with the visitors').
    environments: tuple[GroupRow, ...] = ()
    #: Events left out because their time cannot be read: not a number of Unix seconds
    #: from 1970 to the year 9999 (a row another program wrote, or a clock far off).
    unreadable: int = 0
    #: With ``since``: conversations that chatted in the window after a page view before
    #: it. Offered before the window, they are not in its rate (used / initialized would
    #: count a chat whose offer it does not count), nor chats without a page view.
    used_after_earlier_page_view: int = 0

    @property
    def is_empty(self) -> bool:
        return self.events == 0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only (``json.dumps`` takes it as is)."""
        return {
            "path": self.path,
            "generated_at": self.generated_at,
            "since": self.since,
            "events": self.events,
            "first_event_at": self.first_event_at,
            "last_event_at": self.last_event_at,
            "initialized": self.initialized,
            "used": self.used,
            "used_without_page_view": self.used_without_page_view,
            "used_after_earlier_page_view": self.used_after_earlier_page_view,
            "interaction_rate_percent": self.interaction_rate_percent,
            "abandoned": self.abandoned,
            "abandoned_percent": self.abandoned_percent,
            "breakdowns": {
                name: [row.to_dict() for row in rows] for name, rows in self.breakdowns.items()
            },
            "daily": [row.to_dict() for row in self.daily],
            "environment": self.environment,
            "environments": [row.to_dict() for row in self.environments],
            "unreadable": self.unreadable,
        }


# --------------------------------------------------------------------------- since

_DURATION = re.compile(r"\s*(\d+)\s*([smhdw])\s*", re.IGNORECASE)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": _DAY, "w": 7 * _DAY}


def parse_since(text: str, *, now: float | None = None) -> float:
    """Unix seconds for ``7d``, ``24h``, ``30m``, ``90s``, ``2w`` ago, or a UTC date or time.

    ``2026-11-01`` is that day's midnight UTC; ``2026-11-01T08:00`` (no offset) is UTC too.
    """
    match = _DURATION.fullmatch(text)
    if match:
        amount = int(match.group(1))
        if amount == 0:
            raise ValueError(f"cannot use {text!r} as a start time: a duration must not be 0")
        current = time.time() if now is None else now
        # No event is older than 1970: a longer look back means all of them (and a
        # start before year 1 could not even be shown as a date). A look back of hundreds
        # of digits is as long: it must not overflow the float.
        if amount > 10**12:
            return 0.0
        return max(current - amount * _UNITS[match.group(2).lower()], 0.0)
    stripped = text.strip()
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}([T ].+)?", stripped):
        try:
            moment = datetime.fromisoformat(stripped.replace("Z", "+00:00"))
        except ValueError:
            pass
        else:
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=timezone.utc)
            # Past year 9999 in UTC (9999-12-31T23:30-01:00) no date can show it.
            try:
                return max(moment.astimezone(timezone.utc).timestamp(), 0.0)
            except OverflowError:
                pass
    raise ValueError(
        f"cannot read {text!r} as a start time: use a duration such as 7d, 24h or 30m, "
        "or a date such as 2026-11-01"
    )


# --------------------------------------------------------------------------- build


def _dimensions(by: Sequence[str]) -> list[str]:
    if isinstance(by, str):
        by = [by]
    chosen: list[str] = []
    for name in by:
        if name not in DIMENSIONS:
            raise ValueError(f"unknown breakdown {name!r}: choose from {', '.join(DIMENSIONS)}")
        if name not in chosen:
            chosen.append(name)
    return chosen


# One row per conversation, grouped by id. SQLite gives the bare columns (page_path, ...)
# the values of the row that holds the min(): with the CASE, that is the first page view,
# whichever events come before it. SUM, not MAX, for "used": a second min/max aggregate
# would make that row ambiguous. Grouped by environment too (see the module's docstring),
# in the order of the covering index (_store._INDEXES), which then needs no sort.
_CONVERSATIONS = """
CREATE TEMP TABLE conv AS
SELECT MIN(CASE WHEN is_used = 0 THEN ts END) AS first_ts, {conversation_id}
       page_path, device, language, source, environment,
       SUM(is_used) > 0 AS used
FROM events {index} {where}
GROUP BY conversation_id, environment
"""

# With ``since``: the conversations of the window that chatted in it without a page view
# in it, but had one before it (the visitor saw the page at 9:59, a report from 10:00 sees
# the chat at 10:01). One look-up in the covering index each, for those conversations only.
_VIEWED_BEFORE = """
SELECT COUNT(*) FROM conv WHERE first_ts IS NULL AND EXISTS (
    SELECT 1 FROM events
    WHERE events.conversation_id = conv.conversation_id
      AND events.environment IS conv.environment
      AND events.is_used = 0 AND events.ts < :since AND events.ts >= :first_ts
)
"""

# Unix time has no leap seconds, so the UTC hour and day are plain arithmetic (events
# before 1970 would be misplaced; the middleware writes none).
_HOUR = "CAST(first_ts AS INTEGER) % 86400 / 3600"
_DAY_NUMBER = "CAST(first_ts AS INTEGER) / 86400"

# The times a report can show: 1970-01-01 to 9999-12-31 23:59:59 UTC. A row whose ts is
# text, or a number outside them (another program's row, a clock far off), once made the
# report end in a traceback; such rows are left out and counted. ts has REAL affinity, so a
# value that is not a number is stored as text (or a blob), which SQLite orders after every
# number: the range test leaves it out. The + keeps the test off the time index, so that
# the planner's choice of index stays the one it makes without it.
_FIRST_TS = 0.0
_LAST_TS = 253402300799.0
_READABLE = "+ts BETWEEN :first_ts AND :last_ts"
_UNREADABLE = "(ts < :first_ts OR ts > :last_ts)"


def build_report(
    path: str | os.PathLike[str],
    *,
    since: float | None = None,
    by: Sequence[str] = DEFAULT_BY,
    environment: str | None = None,
    now: float | None = None,
) -> Report:
    """Read the events file at ``path`` and aggregate it (never writes to it).

    Raises :class:`~agentsight_middleware._store.StoreNotFoundError` (a ``FileNotFoundError``)
    when there is no file, :class:`~agentsight_middleware._store.StoreError` when it is not
    an events file, and ``ValueError`` for an unknown breakdown or environment name.
    """
    dimensions = _dimensions(by)
    environment = parse_environment(environment)
    generated_at = time.time() if now is None else now
    text_path = os.fspath(path)
    with closing(connect_readonly(text_path)) as conn:
        conn.execute("PRAGMA cache_size = -65536")
        # One read transaction: every query sees the same events while writers append.
        conn.execute("BEGIN")
        try:
            report = _build(conn, text_path, since, environment, dimensions, generated_at)
        except sqlite3.DatabaseError as exc:
            # A damaged file (or a lock held past the busy timeout) found mid-report: said
            # as such, not as a traceback.
            raise check_unchanged(conn) or wrap_database_error(text_path, exc) from exc
        finally:
            with suppress(sqlite3.Error):  # SQLite may have rolled back already
                conn.execute("ROLLBACK")
        changed = check_unchanged(conn)
        if changed is not None:
            raise changed
        return report


def parse_environment(name: str | None) -> str | None:
    """The environment ``build_report`` counts, from what a user wrote (``prod``, say)."""
    if name is None:
        return None
    if isinstance(name, str) and name.strip().lower() == NO_ENVIRONMENT:
        return NO_ENVIRONMENT
    from ._config import normalise_environment  # only when asked: it loads the request path

    try:
        return normalise_environment(name)
    except ValueError:
        raise ValueError(
            f"unknown environment {name!r}: choose from production, development (or prod, "
            f"dev) and {NO_ENVIRONMENT} (events recorded without one)"
        ) from None


def _build(
    conn: sqlite3.Connection,
    path: str,
    since: float | None,
    environment: str | None,
    dimensions: list[str],
    generated_at: float,
) -> Report:
    tests = [_READABLE]
    params: dict[str, Any] = {"first_ts": _FIRST_TS, "last_ts": _LAST_TS}
    if since is not None:
        tests.append("ts >= :since")
        params["since"] = since
    of_environment = ""
    if environment is not None:
        # IS: NULL for the events recorded without an environment.
        of_environment = " AND environment IS :environment"
        tests.append("environment IS :environment")
        params["environment"] = None if environment == NO_ENVIRONMENT else environment
    where = f"WHERE {' AND '.join(tests)}"
    # Whatever since says: a time that cannot be read cannot be placed before or after it.
    (unreadable,) = conn.execute(
        f"SELECT COUNT(*) FROM events WHERE {_UNREADABLE}{of_environment}", params
    ).fetchone()
    events, first_at, last_at = conn.execute(
        f"SELECT COUNT(*), MIN(ts), MAX(ts) FROM events {where}", params
    ).fetchone()
    if not events:
        return Report(
            path=path,
            generated_at=generated_at,
            since=since,
            events=0,
            first_event_at=None,
            last_event_at=None,
            initialized=0,
            used=0,
            used_without_page_view=0,
            interaction_rate_percent=None,
            abandoned=0,
            abandoned_percent=None,
            breakdowns=dict.fromkeys(dimensions, ()),
            daily=(),
            environment=environment,
            unreadable=unreadable,
        )
    window = events
    if since is not None and environment is not None:
        # The time index reads every event of the window, whatever its environment.
        (window,) = conn.execute("SELECT COUNT(*) FROM events WHERE ts >= ?", (since,)).fetchone()
    conn.execute(
        _CONVERSATIONS.format(
            index=_scan_hint(conn, window, since),
            where=where,
            # Only where the window may have cut a conversation (for _VIEWED_BEFORE).
            conversation_id="" if since is None else "conversation_id,",
        ),
        params,
    )
    initialized, used, orphans = conn.execute(
        "SELECT COUNT(first_ts), TOTAL(first_ts IS NOT NULL AND used), TOTAL(first_ts IS NULL)"
        " FROM conv"
    ).fetchone()
    initialized, used, orphans = int(initialized), int(used), int(orphans)
    earlier = 0
    if since is not None and orphans:
        (earlier,) = conn.execute(_VIEWED_BEFORE, params).fetchone()
        orphans -= earlier
    abandoned = initialized - used
    return Report(
        path=path,
        generated_at=generated_at,
        since=since,
        events=events,
        first_event_at=first_at,
        last_event_at=last_at,
        initialized=initialized,
        used=used,
        used_without_page_view=orphans,
        used_after_earlier_page_view=earlier,
        interaction_rate_percent=_rate(used, initialized),
        abandoned=abandoned,
        abandoned_percent=_rate(abandoned, initialized),
        breakdowns=_breakdowns(conn, dimensions),
        daily=_daily(conn),
        environment=environment,
        environments=_by_environment(conn),
        unreadable=unreadable,
    )


def _scan_hint(conn: sqlite3.Connection, events: int, since: float | None) -> str:
    """``INDEXED BY events_ts`` when the window is a sliver of the file, else nothing.

    The planner has no statistics and always scans the covering conversation index (one
    pass over every event, fast). Reading through the time index instead costs a row
    lookup and a sort per event in the window: measured on a million events, that only
    wins below a few percent of the file (an hour or a day out of months).
    """
    if since is None:
        return ""
    (highest,) = conn.execute("SELECT MAX(id) FROM events").fetchone()
    return "INDEXED BY events_ts" if events * 50 < (highest or 0) else ""


def _breakdowns(conn: sqlite3.Connection, dimensions: list[str]) -> dict[str, tuple[GroupRow, ...]]:
    if not dimensions:
        return {}
    # SQLite groups by sorting. Sorting the conversations once into a small cube of
    # (page, device, ...) combinations, then each breakdown from the cube, takes about half
    # the time of one sort of every conversation per breakdown (measured, five breakdowns).
    columns = ", ".join(
        f"{_HOUR} AS hour" if name == "hour" else f"{DIMENSIONS[name]}" for name in dimensions
    )
    keys = ", ".join(DIMENSIONS[name] for name in dimensions)
    conn.execute(
        f"CREATE TEMP TABLE cube AS SELECT {columns}, COUNT(*) AS initialized, SUM(used) AS used"
        f" FROM conv WHERE first_ts IS NOT NULL GROUP BY {keys}"
    )
    return {
        name: _grouped(conn, DIMENSIONS[name], "SUM(initialized)", "cube", "")
        for name in dimensions
    }


def _by_environment(conn: sqlite3.Connection) -> tuple[GroupRow, ...]:
    return _grouped(conn, "environment", "COUNT(*)", "conv", "WHERE first_ts IS NOT NULL")


def _grouped(
    conn: sqlite3.Connection, column: str, initialized: str, table: str, where: str
) -> tuple[GroupRow, ...]:
    """One breakdown of ``table`` (conversations, or the cube of them) by ``column``, most
    initialized first (then most used, then the key, None last)."""
    rows = conn.execute(
        f"SELECT {column}, {initialized} AS n, SUM(used) AS u FROM {table} {where}"
        f" GROUP BY {column} ORDER BY n DESC, u DESC, {column} IS NULL, {column}"
    )
    return tuple(GroupRow(key, int(n), int(u), _rate(int(u), int(n))) for key, n, u in rows)


#: The longest span of days whose empty days the daily trend lists.
_MAX_FILLED_DAYS = 3660


def _daily(conn: sqlite3.Connection) -> tuple[DailyRow, ...]:
    counts = {
        day: (int(n), int(u))
        for day, n, u in conn.execute(
            f"SELECT {_DAY_NUMBER} AS day, COUNT(*), SUM(used) FROM conv"
            " WHERE first_ts IS NOT NULL GROUP BY day"
        )
    }
    if not counts:
        return ()
    epoch = date(1970, 1, 1)
    rows = []
    first, last = min(counts), max(counts)
    # Days without a page view are listed (as gaps) between the first and the last, but
    # not across decades: one event from a clock set to 1970 or to the year 9000 made
    # the list (and the JSON, and the chart) millions of days long.
    days = range(first, last + 1) if last - first < _MAX_FILLED_DAYS else sorted(counts)
    for day in days:
        n, u = counts.get(day, (0, 0))
        rows.append(DailyRow((epoch + timedelta(days=day)).isoformat(), n, u, _rate(u, n)))
    return tuple(rows)


# --------------------------------------------------------------------------- text


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} %"


def _utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%d %H:%M")


def _of_environment(report: Report) -> str:
    if report.environment == NO_ENVIRONMENT:
        return " recorded without an environment"
    if report.environment is not None:
        return f" of the {report.environment} environment"
    return ""


def _period(report: Report) -> str:
    text = _plural(report.events, "event") + _of_environment(report)
    if report.first_event_at is not None and report.last_event_at is not None:
        text += f" from {_utc(report.first_event_at)} to {_utc(report.last_event_at)} UTC"
    return text


def mixed_environments(report: Report) -> str | None:
    """The warning for figures that mix environments, or None when they do not."""
    if len(report.environments) < 2:
        return None
    counts = ", ".join(
        f"{_key_text('environment', row.key)} {row.initialized:,} "
        f"({_percent(row.interaction_rate_percent)})"
        for row in report.environments
    )
    return (
        f"These figures mix environments: conversations initialized by environment (rate) are "
        f"{counts}. --environment NAME counts one ({', '.join(_environment_names(report))})."
    )


def unreadable_note(report: Report) -> str | None:
    """What the report says of the events it left out (their time cannot be read), or None."""
    if not report.unreadable:
        return None
    whose = "its" if report.unreadable == 1 else "their"
    return (
        f"{_plural(report.unreadable, 'event')} left out: {whose} time is not a Unix time from "
        "1970 to 9999 (a row another program wrote, or a clock far off)."
    )


def _environment_names(report: Report) -> list[str]:
    return [NO_ENVIRONMENT if row.key is None else str(row.key) for row in report.environments]


def _plural(count: int, word: str) -> str:
    return f"{count:,} {word}" if count == 1 else f"{count:,} {word}s"


def _printable(text: str) -> str:
    # Page paths and languages come from visitors: an escape sequence in one must not
    # reach the terminal.
    return "".join(
        ch if ch.isprintable() and unicodedata.category(ch) != "Cf" else f"\\x{ord(ch):02x}"
        for ch in text
    )


def _key_text(name: str, key: str | int | None) -> str:
    if key is None:
        return "(none)"
    if name == "hour":
        return f"{int(key):02d}:00"
    return _printable(str(key))


def headline(report: Report) -> str:
    """E.g. ``124 conversations initialized, 31 used: interaction rate 25.0 %, 93 abandoned
    (75.0 %)``."""
    text = (
        f"{_plural(report.initialized, 'conversation')} initialized, {report.used:,} used: "
        f"interaction rate {_percent(report.interaction_rate_percent)}, "
        f"{report.abandoned:,} abandoned"
    )
    if report.abandoned_percent is not None:
        text += f" ({_percent(report.abandoned_percent)})"
    return text


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> Iterator[str]:
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]
    for line in [headers, *rows]:
        cells = [line[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(line[1:], widths[1:], strict=True)]
        yield "  " + "  ".join(cells).rstrip()


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def format_text(report: Report, *, max_rows: int = 20, max_days: int = 14) -> str:
    """The terminal report: headline, then one aligned table per breakdown and the trend."""
    lines = [f"AgentSight interaction report: {_printable(report.path)}"]
    since = f" (since {_utc(report.since)} UTC)" if report.since is not None else ""
    unreadable = unreadable_note(report)
    if report.is_empty and (report.environment is not None or report.since is not None):
        # A file with events outside the window or of other environments: not "yet" (the
        # advice to run the app would mislead); an earlier --since shows what is older.
        lines += ["", f"No events{_of_environment(report)}{since}."]
        lines += [unreadable] if unreadable else []
        return "\n".join(lines) + "\n"
    if report.is_empty:
        lines += [
            "",
            f"No events yet{since}. Run your app with the middleware, open a page with the "
            "chat widget, then run this again.",
        ]
        lines += [unreadable] if unreadable else []
        return "\n".join(lines) + "\n"
    lines.append(f"{_period(report)}{since}")
    lines += ["", headline(report)]
    mixed = mixed_environments(report)
    if mixed is not None:
        lines.append(_printable(mixed))
    if unreadable:
        lines.append(unreadable)
    if report.used_without_page_view:
        lines.append(
            f"{_plural(report.used_without_page_view, 'conversation')} chatted without a "
            "page view (not counted in the rate)"
        )
    if report.used_after_earlier_page_view:
        lines.append(
            f"{_plural(report.used_after_earlier_page_view, 'conversation')} chatted after a "
            "page view before this period (not counted in the rate)"
        )
    for name, rows in report.breakdowns.items():
        if not rows:
            continue
        lines += ["", f"By {_TITLES[name]}, first page view"]
        shown = rows if name == "hour" else rows[:max_rows]
        cells = [
            [
                _clip(_key_text(name, row.key), 48),
                f"{row.initialized:,}",
                f"{row.used:,}",
                _percent(row.interaction_rate_percent),
            ]
            for row in shown
        ]
        lines += _table([name, "initialized", "used", "rate"], cells)
        if len(rows) > len(shown):
            lines.append(f"  ... and {len(rows) - len(shown):,} more (--json lists all)")
    if report.daily:
        days = report.daily[-max_days:]
        title = "Daily (UTC, by first page view)"
        if len(days) < len(report.daily):
            title += f", last {len(days)} of {len(report.daily)} days"
        lines += ["", title]
        cells = [
            [
                day.date,
                f"{day.initialized:,}",
                f"{day.used:,}",
                _percent(day.interaction_rate_percent),
            ]
            for day in days
        ]
        lines += _table(["date", "initialized", "used", "rate"], cells)
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- html

_CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1f2933;
background:#f5f7fa;margin:0}
main{max-width:780px;margin:0 auto;padding:24px 16px 48px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:17px;margin:0 0 8px}
.meta,.note{color:#52606d;font-size:13px;margin:0 0 16px}
.headline{font-size:17px;margin:16px 0}
.figures{display:flex;flex-wrap:wrap;gap:12px;margin:0 0 24px;padding:0;list-style:none}
.figures li{background:#fff;border:1px solid #d9e2ec;border-radius:8px;padding:10px 14px;
min-width:120px}
.figures b{display:block;font-size:24px}
.figures span{color:#52606d;font-size:13px}
section{background:#fff;border:1px solid #d9e2ec;border-radius:8px;padding:16px;margin:0 0 20px}
svg{display:block;max-width:100%;height:auto}
svg text{font:12px system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;fill:#1f2933}
svg .axis{fill:#52606d}svg .grid{stroke:#e4e7eb}svg .bar{fill:#3e7bfa}
svg .line{fill:none;stroke:#3e7bfa;stroke-width:2}svg .point{fill:#1d4ed8}
"""

_WIDTH = 740


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _number(value: float) -> str:
    # repr-exact, so a test or a browser reading data-value gets the report's very number.
    return repr(float(value))


def _scale(highest: float) -> tuple[float, float]:
    """A round top for an axis (at most 100) and its tick step."""
    highest = max(highest, 1.0)
    for step in (1.0, 2.0, 5.0, 10.0, 20.0, 25.0):
        top = math.ceil(highest / step) * step
        if top / step <= 5:
            return min(top, 100.0), step
    return 100.0, 25.0


def _tick(value: float) -> str:
    return f"{value:g}"


def _svg_open(chart_id: str, title: str, description: str, height: int) -> str:
    return (
        f'<svg id="{chart_id}" class="chart" role="img" viewBox="0 0 {_WIDTH} {height}" '
        f'width="{_WIDTH}" height="{height}" aria-labelledby="{chart_id}-title {chart_id}-desc">'
        # No xmlns: inline SVG in HTML needs none, and the page then holds no URL at all.
        f'<title id="{chart_id}-title">{_e(title)}</title>'
        f'<desc id="{chart_id}-desc">{_e(description)}</desc>'
    )


def _bar_title(label: str, row: GroupRow | DailyRow) -> str:
    return (
        f"{label}: {_percent(row.interaction_rate_percent)} "
        f"({row.used:,} used of {row.initialized:,} initialized)"
    )


def _hbar_chart(chart_id: str, name: str, rows: Sequence[GroupRow]) -> str:
    """Horizontal bars of the interaction rate, one per key, most initialized first."""
    label_width, bar_left, bar_width, row_height, top = 190, 200, 400, 26, 34
    height = top + row_height * len(rows) + 46
    scale, step = _scale(max(row.interaction_rate_percent or 0.0 for row in rows))
    title = f"Interaction rate by {_TITLES[name]}"
    parts = [
        _svg_open(
            chart_id,
            title,
            f"Horizontal bars, one per {name}: the percentage of "
            "conversations initialized there that were used.",
            height,
        ),
        f'<text x="0" y="16" font-weight="600">{_e(title)}</text>',
    ]
    axis_y = top + row_height * len(rows) + 4
    tick = 0.0
    while tick <= scale + 1e-9:
        x = bar_left + bar_width * tick / scale
        parts.append(
            f'<line class="grid" x1="{x:.1f}" y1="{top - 4}" x2="{x:.1f}" y2="{axis_y}"/>'
            f'<text class="axis" x="{x:.1f}" y="{axis_y + 14}" text-anchor="middle">'
            f"{_tick(tick)}</text>"
        )
        tick += step
    parts.append(
        f'<text class="axis" x="{bar_left + bar_width / 2}" y="{axis_y + 34}" '
        f'text-anchor="middle">interaction rate (%)</text>'
    )
    for i, row in enumerate(rows):
        label = _key_text(name, row.key)
        rate = row.interaction_rate_percent or 0.0
        y = top + i * row_height
        width = bar_width * rate / scale
        short = _clip(label, 28)
        parts.append(
            f'<text x="{label_width}" y="{y + 16}" text-anchor="end">{_e(short)}</text>'
            f'<rect class="bar" x="{bar_left}" y="{y + 3}" width="{width:.1f}" '
            f'height="{row_height - 8}" data-label="{_e(label)}" data-value="{_number(rate)}" '
            f'data-initialized="{row.initialized}" data-used="{row.used}">'
            f"<title>{_e(_bar_title(label, row))}</title></rect>"
            f'<text x="{bar_left + width + 6:.1f}" y="{y + 16}">{_percent(rate)} '
            f"({row.used:,}/{row.initialized:,})</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _axes(
    parts: list[str],
    left: int,
    top: int,
    plot_width: int,
    plot_height: int,
    scale: float,
    step: float,
) -> None:
    tick = 0.0
    while tick <= scale + 1e-9:
        y = top + plot_height - plot_height * tick / scale
        parts.append(
            f'<line class="grid" x1="{left}" y1="{y:.1f}" x2="{left + plot_width}" y2="{y:.1f}"/>'
            f'<text class="axis" x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">'
            f"{_tick(tick)}</text>"
        )
        tick += step
    parts.append(
        f'<text class="axis" transform="translate(14 {top + plot_height / 2}) rotate(-90)" '
        f'text-anchor="middle">interaction rate (%)</text>'
    )


def _hour_chart(chart_id: str, rows: Sequence[GroupRow]) -> str:
    """24 columns, one per UTC hour; an hour with no page view has no column."""
    left, top, plot_width, plot_height = 56, 40, 670, 200
    height = top + plot_height + 50
    by_hour = {int(row.key): row for row in rows if row.key is not None}
    scale, step = _scale(max(row.interaction_rate_percent or 0.0 for row in rows))
    title = "Interaction rate by hour of day (UTC, first page view)"
    parts = [
        _svg_open(
            chart_id,
            title,
            "24 columns, one per hour of the day in UTC: the "
            "percentage of conversations first shown the widget then that were used.",
            height,
        ),
        f'<text x="0" y="16" font-weight="600">{_e(title)}</text>',
    ]
    _axes(parts, left, top, plot_width, plot_height, scale, step)
    slot = plot_width / 24
    base = top + plot_height
    for hour in range(24):
        x = left + slot * hour
        parts.append(
            f'<text class="axis" x="{x + slot / 2:.1f}" y="{base + 16}" '
            f'text-anchor="middle">{hour:02d}</text>'
        )
        row = by_hour.get(hour)
        if row is None:
            continue
        rate = row.interaction_rate_percent or 0.0
        h = plot_height * rate / scale
        label = f"{hour:02d}:00"
        parts.append(
            f'<rect class="bar" x="{x + 3:.1f}" y="{base - h:.1f}" width="{slot - 6:.1f}" '
            f'height="{h:.1f}" data-label="{label}" data-value="{_number(rate)}" '
            f'data-initialized="{row.initialized}" data-used="{row.used}">'
            f"<title>{_e(_bar_title(label, row))}</title></rect>"
            f'<text x="{x + slot / 2:.1f}" y="{base - h - 4:.1f}" text-anchor="middle" '
            f'font-size="9">{rate:.1f}</text>'
        )
    parts.append(
        f'<text class="axis" x="{left + plot_width / 2}" y="{base + 38}" '
        f'text-anchor="middle">hour of day (UTC)</text></svg>'
    )
    return "".join(parts)


def _daily_chart(chart_id: str, days: Sequence[DailyRow]) -> str:
    """The daily rate as a line with a point per day; a day with no page view is a gap."""
    left, top, plot_width, plot_height = 56, 40, 660, 200
    height = top + plot_height + 56
    scale, step = _scale(max(day.interaction_rate_percent or 0.0 for day in days))
    title = "Daily interaction rate (UTC, by first page view)"
    parts = [
        _svg_open(
            chart_id,
            title,
            "A line with one point per day: the percentage of "
            "conversations first shown the widget that day that were used.",
            height,
        ),
        f'<text x="0" y="16" font-weight="600">{_e(title)}</text>',
    ]
    _axes(parts, left, top, plot_width, plot_height, scale, step)
    base = top + plot_height

    def x_of(i: int) -> float:
        return left + (plot_width / 2 if len(days) == 1 else plot_width * i / (len(days) - 1))

    every = max(1, math.ceil(len(days) / 8))
    for i, day in enumerate(days):
        if i % every == 0 or i == len(days) - 1:
            parts.append(
                f'<text class="axis" x="{x_of(i):.1f}" y="{base + 16}" '
                f'text-anchor="middle">{day.date[5:]}</text>'
            )
    segment: list[str] = []
    points: list[str] = []
    for i, day in enumerate(days):
        rate = day.interaction_rate_percent
        if rate is None:
            if len(segment) > 1:
                parts.append(f'<polyline class="line" points="{" ".join(segment)}"/>')
            segment = []
            continue
        x, y = x_of(i), base - plot_height * rate / scale
        segment.append(f"{x:.1f},{y:.1f}")
        if len(days) <= 31:
            points.append(
                f'<text x="{x:.1f}" y="{y - 7:.1f}" text-anchor="middle" font-size="9">'
                f"{rate:.1f}</text>"
            )
        points.append(
            f'<circle class="point" cx="{x:.1f}" cy="{y:.1f}" r="3.5" data-label="{day.date}" '
            f'data-value="{_number(rate)}" data-initialized="{day.initialized}" '
            f'data-used="{day.used}"><title>{_e(_bar_title(day.date, day))}</title></circle>'
        )
    if len(segment) > 1:
        parts.append(f'<polyline class="line" points="{" ".join(segment)}"/>')
    parts += points
    parts.append(
        f'<text class="axis" x="{left + plot_width / 2}" y="{base + 40}" '
        f'text-anchor="middle">date (UTC, month-day)</text></svg>'
    )
    return "".join(parts)


def _page(title: str, body: str) -> str:
    # The CSP makes the promise checkable: this page loads nothing and runs nothing.
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta http-equiv="Content-Security-Policy" '
        "content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\">"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n"
        f"<body><main>\n{body}\n</main></body></html>\n"
    )


def _figure(value: str, label: str) -> str:
    return f"<li><b>{_e(value)}</b><span>{_e(label)}</span></li>"


def render_html(report: Report, *, max_rows: int = 20) -> str:
    """One self-contained HTML page: inline CSS and SVG, no script, nothing fetched."""
    title = "AgentSight interaction report"
    since = f", since {_utc(report.since)} UTC" if report.since is not None else ""
    generated = f"generated {_utc(report.generated_at)} UTC"
    meta = f'<p class="meta">{_e(report.path)}{_e(since)}, {_e(generated)}</p>'
    unreadable = unreadable_note(report)
    if unreadable:
        meta += f'<p class="note" id="unreadable">{_e(unreadable)}</p>'
    if report.is_empty and (report.environment is not None or report.since is not None):
        body = (
            f"<h1>{title}</h1>{meta}"
            '<section class="empty"><h2>No events</h2>'
            f"<p>There are no events{_e(_of_environment(report))} in this file"
            f"{_e(since.replace(',', '', 1))}.</p></section>"
        )
        return _page(title, body)
    if report.is_empty:
        body = (
            f"<h1>{title}</h1>{meta}"
            '<section class="empty"><h2>No events yet</h2>'
            f"<p>There are no events in this file{_e(since.replace(',', '', 1))}. Run your "
            "app with the "
            "middleware, open a page with the chat widget, send a chat message, then make "
            "this report again.</p></section>"
        )
        return _page(title, body)
    parts = [
        f"<h1>{title}</h1>",
        f'<p class="meta">{_e(report.path)}: {_e(_period(report))}{_e(since)}, {_e(generated)}</p>',
        f'<p class="headline">{_e(headline(report))}</p>',
        '<ul class="figures">',
        _figure(f"{report.initialized:,}", "conversations initialized"),
        _figure(f"{report.used:,}", "used"),
        _figure(_percent(report.interaction_rate_percent), "interaction rate"),
        _figure(
            f"{report.abandoned:,}",
            f"abandoned ({_percent(report.abandoned_percent)})",
        ),
        _figure(f"{report.used_without_page_view:,}", "conversations chatted without a page view"),
        "</ul>",
    ]
    mixed = mixed_environments(report)
    if mixed is not None:
        parts.append(f'<p class="note" id="mixed-environments">{_e(mixed)}</p>')
    if unreadable:
        parts.append(f'<p class="note" id="unreadable">{_e(unreadable)}</p>')
    if report.used_without_page_view:
        parts.append(
            '<p class="note">Conversations that chatted without a page view are not in the '
            "rate: they never showed the widget through the middleware.</p>"
        )
    if report.used_after_earlier_page_view:
        parts.append(
            f'<p class="note" id="earlier-page-view">'
            f"{_e(_plural(report.used_after_earlier_page_view, 'conversation'))} chatted in "
            "this period after a page view before it: not in the rate, which counts the "
            "conversations offered in the period.</p>"
        )
    for name, rows in report.breakdowns.items():
        chart_id = f"chart-{name}"
        parts.append(f'<section id="{chart_id}-section"><h2>By {_e(_TITLES[name])}</h2>')
        if not rows:
            parts.append('<p class="note">No page views in this period.</p>')
        elif name == "hour":
            parts.append(_hour_chart(chart_id, rows))
        else:
            parts.append(_hbar_chart(chart_id, name, rows[:max_rows]))
            if len(rows) > max_rows:
                parts.append(
                    f'<p class="note">The {max_rows} {name}s with the most conversations '
                    f"of {len(rows):,}.</p>"
                )
        parts.append("</section>")
    parts.append('<section id="chart-daily-section"><h2>Daily trend</h2>')
    if report.daily:
        parts.append(_daily_chart("chart-daily", report.daily))
    else:
        parts.append('<p class="note">No page views in this period.</p>')
    parts.append("</section>")
    return _page(title, "\n".join(parts))
