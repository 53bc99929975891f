"""The report's figures on hand-computed data, its SQL against a Python reference, and its
renderings (terminal text, HTML with SVG charts)."""

from __future__ import annotations

import itertools
import math
import sqlite3
from collections import Counter
from contextlib import closing
from datetime import datetime, timezone
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentsight_middleware import _report, _store
from agentsight_middleware._report import (
    DEFAULT_BY,
    Report,
    build_report,
    format_text,
    parse_since,
    render_html,
)
from agentsight_middleware._store import LocalStore, StoreError, StoreNotFoundError

from .test_store import make_payload

DAY1 = datetime(2026, 11, 20, tzinfo=timezone.utc).timestamp()
DAY3 = DAY1 + 2 * 86400
HOUR = 3600.0


def dataset() -> list[dict[str, Any]]:
    """4 conversations initialized, 2 used, 1 chat without a page view.

    ======  ===========================================  ==================
    conv    events                                       counts as
    ======  ===========================================  ==================
    c1      /pricing view day 1 10:00, chat 10:05        used (/pricing)
    c2      / view day 1 11:00, /pricing view 11:02      abandoned (/)
    c3      /docs view day 3 12:00, chat 12:01           used (/docs)
    c4      /pricing view day 3 23:30                    abandoned
    c5      chat day 3 09:00, no view                    without page view
    ======  ===========================================  ==================

    Rows are written out of time order (c2's second view and c3's chat first) so that
    "first page view" must come from the timestamps, not from the row order.
    """
    return [
        make_payload("conv_c1", at=DAY1 + 10 * HOUR, page="/pricing"),
        make_payload("conv_c1", used=True, at=DAY1 + 10 * HOUR + 300, page="/api/chat"),
        make_payload("conv_c2", at=DAY1 + 11 * HOUR + 120, page="/pricing", device="mobile"),
        make_payload("conv_c2", at=DAY1 + 11 * HOUR, page="/", device="mobile", language="fr-FR"),
        make_payload(
            "conv_c3", used=True, at=DAY3 + 12 * HOUR + 60, page="/api/chat", device="desktop"
        ),
        make_payload(
            "conv_c3", at=DAY3 + 12 * HOUR, page="/docs", device="tablet", language="de-DE"
        ),
        make_payload("conv_c4", at=DAY3 + 23.5 * HOUR, page="/pricing"),
        make_payload("conv_c5", used=True, at=DAY3 + 9 * HOUR, page="/api/chat"),
    ]


def write(path: Path, payloads: list[dict[str, Any]]) -> Path:
    with LocalStore(path) as store:
        store.write(payloads)
    return path


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return write(tmp_path / "events.sqlite3", dataset())


def table(report: Report, name: str) -> list[tuple[Any, int, int, float | None]]:
    return [
        (row.key, row.initialized, row.used, row.interaction_rate_percent)
        for row in report.breakdowns[name]
    ]


def test_totals(db: Path) -> None:
    report = build_report(db, now=DAY3 + 86400)
    assert (report.events, report.initialized, report.used) == (8, 4, 2)
    assert report.used_without_page_view == 1
    assert report.interaction_rate_percent == 50.0
    assert (report.abandoned, report.abandoned_percent) == (2, 50.0)
    assert report.first_event_at == pytest.approx(DAY1 + 10 * HOUR)
    assert report.last_event_at == pytest.approx(DAY3 + 23.5 * HOUR)
    assert report.generated_at == DAY3 + 86400
    assert report.since is None
    assert report.path == str(db)
    assert not report.is_empty


def test_breakdowns_use_the_first_page_view(db: Path) -> None:
    report = build_report(db)
    assert list(report.breakdowns) == list(DEFAULT_BY)
    assert table(report, "page") == [
        ("/pricing", 2, 1, 50.0),
        ("/docs", 1, 1, 100.0),
        ("/", 1, 0, 0.0),
    ]
    assert table(report, "device") == [
        ("desktop", 2, 1, 50.0),
        ("tablet", 1, 1, 100.0),
        ("mobile", 1, 0, 0.0),
    ]
    assert table(report, "language") == [
        ("en-US", 2, 1, 50.0),
        ("de-DE", 1, 1, 100.0),
        ("fr-FR", 1, 0, 0.0),
    ]
    assert table(report, "hour") == [
        (10, 1, 1, 100.0),
        (12, 1, 1, 100.0),
        (11, 1, 0, 0.0),
        (23, 1, 0, 0.0),
    ]
    assert table(report, "source") == [("web", 4, 2, 50.0)]


def test_daily_trend_fills_gaps(db: Path) -> None:
    daily = [
        (day.date, day.initialized, day.used, day.interaction_rate_percent)
        for day in build_report(db).daily
    ]
    assert daily == [
        ("2026-11-20", 2, 1, 50.0),
        ("2026-11-21", 0, 0, None),
        ("2026-11-22", 2, 1, 50.0),
    ]


def test_missing_keys_group_as_none(tmp_path: Path) -> None:
    path = write(
        tmp_path / "e.sqlite3",
        [
            make_payload("conv_a", device=None, language=None, page=None, source=None),
            make_payload("conv_b", device=None, language=None),
            make_payload("conv_b", used=True),
            make_payload("conv_c"),
        ],
    )
    report = build_report(path, by=["device", "page"])
    assert table(report, "device") == [(None, 2, 1, 50.0), ("desktop", 1, 0, 0.0)]
    assert table(report, "page") == [("/pricing", 2, 1, 50.0), (None, 1, 0, 0.0)]


def test_by_chooses_and_orders_breakdowns(db: Path) -> None:
    report = build_report(db, by=("hour", "page", "hour"))
    assert list(report.breakdowns) == ["hour", "page"]
    assert build_report(db, by=()).breakdowns == {}
    assert build_report(db, by="device").breakdowns.keys() == {"device"}
    with pytest.raises(ValueError, match="unknown breakdown 'browser': choose from page"):
        build_report(db, by=["browser"])


def test_since_counts_events_from_then_on(db: Path) -> None:
    report = build_report(db, since=DAY3)
    assert (report.events, report.initialized, report.used) == (4, 2, 1)
    assert report.used_without_page_view == 1
    assert table(report, "page") == [("/docs", 1, 1, 100.0), ("/pricing", 1, 0, 0.0)]
    assert [day.date for day in report.daily] == ["2026-11-22"]
    assert report.since == DAY3


def test_since_between_view_and_chat(db: Path) -> None:
    # c1's view is before the window and its chat inside: it was counted as a chat without
    # a page view, beside c5, which never had one. Offered before the window, it is not in
    # the window's rate either: counted apart, and said so.
    report = build_report(db, since=DAY1 + 10 * HOUR + 60)
    assert (report.initialized, report.used, report.used_without_page_view) == (3, 1, 1)
    assert report.used_after_earlier_page_view == 1
    assert report.to_dict()["used_after_earlier_page_view"] == 1
    text = format_text(report)
    assert "1 conversation chatted without a page view" in text
    assert "1 conversation chatted after a page view before this period" in text
    assert 'id="earlier-page-view"' in render_html(report)
    # Without the window, and with one that holds its view, c1 is an ordinary chat.
    for whole in (build_report(db), build_report(db, since=DAY1 + 10 * HOUR)):
        assert (whole.used, whole.used_without_page_view) == (2, 1)
        assert whole.used_after_earlier_page_view == 0
        assert "before this period" not in format_text(whole)


def test_since_looks_for_the_earlier_view_in_the_chat_s_own_environment(
    tmp_path: Path,
) -> None:
    # An id viewed in development before the window and chatting in production within it:
    # production never offered it, a chat without a page view there.
    path = write(
        tmp_path / "events.sqlite3",
        [
            make_payload("conv_a", at=DAY1, environment="development"),
            make_payload("conv_a", used=True, at=DAY3, environment="production"),
            make_payload("conv_b", at=DAY1, environment="production"),
            make_payload("conv_b", used=True, at=DAY3, environment="production"),
        ],
    )
    report = build_report(path, since=DAY3 - HOUR)
    assert (report.used_without_page_view, report.used_after_earlier_page_view) == (1, 1)
    alone = build_report(path, since=DAY3 - HOUR, environment="production")
    assert (alone.used_without_page_view, alone.used_after_earlier_page_view) == (1, 1)


def test_since_after_everything_is_empty(db: Path) -> None:
    report = build_report(db, since=DAY3 + 2 * 86400)
    assert report.is_empty
    assert (report.initialized, report.used, report.interaction_rate_percent) == (0, 0, None)
    assert report.breakdowns == dict.fromkeys(DEFAULT_BY, ())


def test_selective_since_reads_the_time_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 100 days of traffic and a one-day window: the report reads through the ts index, and
    # must count exactly what the scan of the conversation index counts.
    payloads = []
    for day, n in itertools.product(range(100), range(8)):
        cid = f"conv_{day:02d}_{n:02d}"
        payloads.append(make_payload(cid, at=DAY1 + day * 86400 + n * 60, page=f"/p{n % 3}"))
        if n % 4 == 0:
            payloads.append(make_payload(cid, used=True, at=DAY1 + day * 86400 + n * 60 + 5))
    path = write(tmp_path / "e.sqlite3", payloads)
    since = DAY1 + 99 * 86400
    hints: list[str] = []
    real_hint = _report._scan_hint

    def spy(conn: sqlite3.Connection, events: int, since: float | None) -> str:
        hints.append(real_hint(conn, events, since))
        return hints[-1]

    monkeypatch.setattr(_report, "_scan_hint", spy)
    through_time_index = build_report(path, since=since, now=0)
    monkeypatch.setattr(_report, "_scan_hint", lambda *_: "")
    through_conversations = build_report(path, since=since, now=0)
    assert hints == ["INDEXED BY events_ts"]
    assert through_time_index == through_conversations
    assert (through_time_index.events, through_time_index.initialized) == (10, 8)
    assert through_time_index.used == 2
    assert table(through_time_index, "page")[0][:3] == ("/p0", 3, 1)
    with closing(_store.connect_readonly(path)) as conn:
        assert _report._scan_hint(conn, 800, since) == ""
        assert _report._scan_hint(conn, 10, None) == ""


def test_report_does_not_wait_for_a_writer(db: Path) -> None:
    with LocalStore(db) as store, store._transaction() as conn:
        conn.execute("SELECT 1")  # the write lock is held for the whole block
        report = build_report(db)
    assert report.initialized == 4


def test_report_never_writes(db: Path) -> None:
    before = db.read_bytes()
    build_report(db)
    assert db.read_bytes() == before


def test_empty_events_file(tmp_path: Path) -> None:
    path = write(tmp_path / "e.sqlite3", [make_payload("conv_a")])
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("DELETE FROM events")
        conn.commit()
    report = build_report(path)
    assert report.is_empty
    assert report.to_dict() == {
        "path": str(path),
        "generated_at": report.generated_at,
        "since": None,
        "events": 0,
        "first_event_at": None,
        "last_event_at": None,
        "initialized": 0,
        "used": 0,
        "used_without_page_view": 0,
        "used_after_earlier_page_view": 0,
        "interaction_rate_percent": None,
        "abandoned": 0,
        "abandoned_percent": None,
        "breakdowns": {name: [] for name in DEFAULT_BY},
        "daily": [],
        "environment": None,
        "environments": [],
        "unreadable": 0,
    }


def test_zero_byte_file_reads_as_empty(tmp_path: Path) -> None:
    path = tmp_path / "e.sqlite3"
    path.touch()
    assert build_report(path).is_empty
    assert path.stat().st_size == 0


def test_only_chats(tmp_path: Path) -> None:
    path = write(tmp_path / "e.sqlite3", [make_payload("conv_a", used=True)])
    report = build_report(path)
    assert (report.events, report.initialized, report.used_without_page_view) == (1, 0, 1)
    assert report.interaction_rate_percent is None
    assert report.breakdowns["page"] == ()
    assert report.daily == ()
    # Conversations, not chat requests: c4 may have sent several.
    assert "1 conversation chatted without a page view" in format_text(report)
    assert "No page views in this period" in render_html(report)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.sqlite3"
    with pytest.raises(StoreNotFoundError, match=r"no events file at .*absent.sqlite3 \(yet\)"):
        build_report(path)
    assert not path.exists()


def test_not_an_events_file(tmp_path: Path) -> None:
    path = tmp_path / "e.sqlite3"
    path.write_bytes(b"\x00" * 4096)
    with pytest.raises(StoreError):
        build_report(path)


def test_another_app_s_table_named_events_is_not_an_events_file(tmp_path: Path) -> None:
    # It once passed the check (a table named "events"), then failed in a query with a
    # raw sqlite3 traceback ("no such column: ts").
    import sqlite3

    path = tmp_path / "theirs.sqlite3"
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, name TEXT)")
        conn.commit()
    with pytest.raises(StoreError, match="not an agentsight events file"):
        build_report(path)


def test_a_damaged_events_file_is_a_store_error(db: Path) -> None:
    # Damage past the header, found by a query mid-report: a StoreError (the CLI says it
    # in one line), not a raw sqlite3.DatabaseError.
    size = db.stat().st_size
    assert size > 8192
    with db.open("r+b") as file:
        file.seek(4096)
        file.write(b"\xff" * (size - 4096))
    with pytest.raises(StoreError, match="not a usable events file"):
        build_report(db)


def test_one_event_from_a_wrong_clock_does_not_list_every_day_between(tmp_path: Path) -> None:
    # A machine without a hardware clock (1970 until NTP) or a clock set to the year 9000:
    # the daily trend once listed every day in between (2.5 M rows, 3.2 GB, 31 s).
    year_9000 = datetime(9000, 1, 1, tzinfo=timezone.utc).timestamp()
    path = write(
        tmp_path / "clock.sqlite3",
        [
            make_payload("conv_1970", at=3600.0),
            make_payload("conv_now", at=DAY1),
            make_payload("conv_now2", at=DAY1 + 2 * 86400),
            make_payload("conv_9000", at=year_9000),
        ],
    )
    report = build_report(path)
    assert [day.date for day in report.daily] == [
        "1970-01-01",
        datetime.fromtimestamp(DAY1, timezone.utc).date().isoformat(),
        datetime.fromtimestamp(DAY1 + 2 * 86400, timezone.utc).date().isoformat(),
        "9000-01-01",
    ]
    # Within ten years, the days between are listed (as gaps), as before.
    near = build_report(write(tmp_path / "near.sqlite3", dataset()))
    assert len(near.daily) == 3


def with_unreadable_times(path: Path) -> Path:
    """``dataset()`` and three more events whose ts another program wrote as text or far out
    of range: the report once ended in a traceback on each (TypeError, OverflowError)."""
    extra = [make_payload(f"conv_bad{n}", at=DAY1 + n, used=n == 2) for n in range(3)]
    write(path, [*dataset(), *extra])
    with closing(sqlite3.connect(path)) as conn:
        for n, ts in enumerate(["2026-11-26 14:22:03", 1e20, -1e20]):
            conn.execute("UPDATE events SET ts = ? WHERE conversation_id = ?", (ts, f"conv_bad{n}"))
        conn.commit()
    return path


def test_events_whose_time_cannot_be_read_are_left_out_and_counted(tmp_path: Path) -> None:
    path = with_unreadable_times(tmp_path / "e.sqlite3")
    report = build_report(path, now=DAY3 + 86400)
    clean = build_report(write(tmp_path / "clean.sqlite3", dataset()), now=DAY3 + 86400)
    assert report.unreadable == 3
    assert report.to_dict()["unreadable"] == 3
    assert {**report.to_dict(), "path": "", "unreadable": 0} == {**clean.to_dict(), "path": ""}
    note = "3 events left out: their time is not a Unix time from 1970 to 9999"
    assert note in format_text(report)
    assert note in render_html(report)
    assert "left out" not in format_text(clean) + render_html(clean)
    # since cannot place them: counted whatever it says; environment still chooses.
    assert build_report(path, since=DAY3).unreadable == 3
    assert build_report(path, environment="development").unreadable == 0


def test_a_file_whose_every_time_cannot_be_read_is_empty_and_says_why(tmp_path: Path) -> None:
    path = write(tmp_path / "e.sqlite3", [make_payload("conv_a")])
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("UPDATE events SET ts = 'yesterday'")
        conn.commit()
    report = build_report(path)
    assert report.is_empty
    assert report.unreadable == 1
    note = "1 event left out: its time is not a Unix time from 1970 to 9999"
    assert note in format_text(report)
    assert note in render_html(report)


# --------------------------------------------------------------------------- property

CONVERSATIONS = [f"conv_{n}" for n in range(6)]
event = st.tuples(
    st.sampled_from(CONVERSATIONS),
    st.booleans(),
    st.integers(0, 3),  # day
    st.integers(0, 23),  # hour
    st.sampled_from(["/", "/pricing", None]),
    st.sampled_from(["desktop", "mobile", None]),
    st.sampled_from(["production", "development", None]),
)
_files = itertools.count()


def reference(payloads: list[dict[str, Any]]) -> tuple[int, int, int, Counter[Any]]:
    # A conversation is an id within an environment, as each environment is its own
    # conversations at the API.
    first: dict[tuple[str, Any], dict[str, Any]] = {}
    chats = set()
    for payload in sorted(payloads, key=lambda p: p["timestamp"]):
        cid = (payload["conversation_id"], payload["environment"])
        if payload["is_used"]:
            chats.add(cid)
        else:
            first.setdefault(cid, payload)
    used = first.keys() & chats
    pages = Counter((p["metadata"]["page_path"], cid in used) for cid, p in first.items())
    return len(first), len(used), len(chats - first.keys()), pages


@settings(max_examples=40, deadline=None)
@given(events=st.lists(event, max_size=25))
def test_property_matches_a_python_reference(
    tmp_path_factory: pytest.TempPathFactory, events: list[tuple[Any, ...]]
) -> None:
    payloads = [
        # A distinct second per event: the first page view is never a tie.
        make_payload(
            cid,
            used=used,
            at=DAY1 + day * 86400 + hour * HOUR + i,
            page=page,
            device=device,
            environment=environment,
        )
        for i, (cid, used, day, hour, page, device, environment) in enumerate(events)
    ]
    path = tmp_path_factory.mktemp("prop") / f"e{next(_files)}.sqlite3"
    write(path, payloads) if payloads else path.touch()
    report = build_report(path)

    assert 0 <= report.used <= report.initialized
    assert report.abandoned == report.initialized - report.used
    if report.initialized:
        assert report.interaction_rate_percent is not None
        assert 0 <= report.interaction_rate_percent <= 100
        assert report.abandoned_percent is not None
        assert math.isclose(report.interaction_rate_percent + report.abandoned_percent, 100)
    else:
        assert report.interaction_rate_percent is None
    for name, rows in report.breakdowns.items():
        assert sum(row.initialized for row in rows) == report.initialized, name
        assert sum(row.used for row in rows) == report.used, name
        assert [row.initialized for row in rows] == sorted(
            (row.initialized for row in rows), reverse=True
        )
    assert sum(day.initialized for day in report.daily) == report.initialized

    initialized, used, orphans, pages = reference(payloads)
    assert (report.initialized, report.used, report.used_without_page_view) == (
        initialized,
        used,
        orphans,
    )
    assert report.events == len(payloads)
    got: Counter[tuple[Any, bool]] = Counter()
    for row in report.breakdowns["page"]:
        got[(row.key, True)] += row.used
        got[(row.key, False)] += row.initialized - row.used
    assert +got == pages
    # The environments are a breakdown of the same total, and each row says what a report
    # of that environment alone says.
    assert sum(row.initialized for row in report.environments) == report.initialized
    assert sum(row.used for row in report.environments) == report.used
    for row in report.environments:
        alone = build_report(path, environment=str(row.key or "none"))
        assert (row.initialized, row.used) == (alone.initialized, alone.used)

    for environment in ("production", "development", None):
        alone = build_report(path, environment=environment or "none")
        mine = [p for p in payloads if p["environment"] == environment]
        initialized, used, orphans, _ = reference(mine)
        assert (alone.initialized, alone.used, alone.used_without_page_view) == (
            initialized,
            used,
            orphans,
        )
        assert alone.events == len(mine)
        assert [row.key for row in alone.environments] == ([environment] if initialized else [])


# --------------------------------------------------------------------------- environments


def mixed(path: Path) -> Path:
    """The dataset (production) with a developer's visits and an event without environment.

    development: d1 viewed and chatted, d2 viewed only; none: n1 viewed only.
    """
    return write(
        path,
        [
            *dataset(),
            make_payload("conv_d1", at=DAY1 + 9 * HOUR, page="/", environment="development"),
            make_payload("conv_d1", used=True, at=DAY1 + 9 * HOUR + 5, environment="development"),
            make_payload("conv_d2", at=DAY3 + 9 * HOUR, page="/", environment="development"),
            make_payload("conv_n1", at=DAY3 + 10 * HOUR, page="/", environment=None),
        ],
    )


def test_environments_are_counted_and_said_to_mix(tmp_path: Path) -> None:
    path = mixed(tmp_path / "events.sqlite3")
    report = build_report(path)
    assert (report.initialized, report.used, report.environment) == (7, 3, None)
    assert [(r.key, r.initialized, r.used) for r in report.environments] == [
        ("production", 4, 2),
        ("development", 2, 1),
        (None, 1, 0),
    ]
    text = format_text(report)
    assert (
        "These figures mix environments: conversations initialized by environment (rate) are "
        "production 4 (50.0 %), development 2 (50.0 %), (none) 1 (0.0 %). --environment NAME "
        "counts one (production, development, none)."
    ) in text
    page = render_html(report)
    assert 'id="mixed-environments"' in page
    assert "These figures mix environments" in page
    assert report.to_dict()["environments"][1] == {
        "key": "development",
        "initialized": 2,
        "used": 1,
        "interaction_rate_percent": 50.0,
    }


def test_an_id_reused_in_another_environment_is_another_conversation(tmp_path: Path) -> None:
    # A production page view and a developer's chat under the same id (one cookie domain,
    # or a conversation id hook that uses the customer's id): counted as one conversation,
    # the production one "used" at 100 %, the developer's visit gone, and no word that the
    # figures mixed environments, where `--environment production` says 0 %.
    path = write(
        tmp_path / "events.sqlite3",
        [
            make_payload("conv_same", at=DAY1, environment="production"),
            make_payload("conv_same", at=DAY1 + 60, environment="development"),
            make_payload("conv_same", used=True, at=DAY1 + 65, environment="development"),
        ],
    )
    report = build_report(path)
    assert (report.initialized, report.used) == (2, 1)
    assert [(r.key, r.initialized, r.used) for r in report.environments] == [
        ("development", 1, 1),
        ("production", 1, 0),
    ]
    assert "These figures mix environments" in format_text(report)
    production = build_report(path, environment="production")
    assert (production.initialized, production.used) == (1, 0)


@pytest.mark.parametrize(
    ("asked", "environment", "events", "initialized", "used"),
    [
        ("production", "production", 8, 4, 2),
        (" PROD ", "production", 8, 4, 2),
        ("dev", "development", 3, 2, 1),
        ("none", "none", 1, 1, 0),
    ],
)
def test_one_environment(
    tmp_path: Path, asked: str, environment: str, events: int, initialized: int, used: int
) -> None:
    report = build_report(mixed(tmp_path / "events.sqlite3"), environment=asked)
    assert (report.environment, report.events) == (environment, events)
    assert (report.initialized, report.used) == (initialized, used)
    assert sum(row.initialized for row in report.breakdowns["page"]) == initialized
    assert len(report.environments) == 1
    text = format_text(report)
    assert "mix environments" not in text
    assert report.to_dict()["environment"] == environment


def test_one_environment_is_named_in_the_text(tmp_path: Path) -> None:
    path = mixed(tmp_path / "events.sqlite3")
    assert "3 events of the development environment from 2026-11-20 09:00" in format_text(
        build_report(path, environment="development")
    )
    assert "1 event recorded without an environment from" in format_text(
        build_report(path, environment="none")
    )


def test_an_environment_without_events(tmp_path: Path) -> None:
    path = write(tmp_path / "events.sqlite3", dataset())
    report = build_report(path, environment="development")
    assert report.is_empty
    assert "No events of the development environment." in format_text(report)
    assert "No events yet" not in format_text(report)
    page = render_html(report)
    assert "There are no events of the development environment in this file." in page


def test_environment_with_since_counts_both(tmp_path: Path) -> None:
    path = mixed(tmp_path / "events.sqlite3")
    report = build_report(path, since=DAY3, environment="development")
    assert (report.events, report.initialized, report.used) == (1, 1, 0)


def test_an_unknown_environment_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "events.sqlite3", dataset())
    with pytest.raises(ValueError, match="unknown environment 'staging': choose from production"):
        build_report(path, environment="staging")


def query_plan(conn: sqlite3.Connection, query: str) -> str:
    """SQLite's plan for ``query``, its steps joined."""
    return " ".join(str(row[-1]) for row in conn.execute(f"EXPLAIN QUERY PLAN {query}"))


@pytest.mark.parametrize(
    "old_columns",
    [
        # Without the environment (the table and the schema version are the same, so
        # builds that wrote it still read and write the file).
        "conversation_id, is_used, ts, page_path, device, language, source",
        # With it last: grouping by id and environment then needed a sort.
        "conversation_id, is_used, ts, page_path, device, language, source, environment",
    ],
)
def test_a_file_with_the_old_index_is_read_then_reindexed(tmp_path: Path, old_columns: str) -> None:
    path = mixed(tmp_path / "events.sqlite3")
    expected = build_report(path, environment="development", now=0).to_dict()
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("DROP INDEX events_conversation")
        conn.execute(f"CREATE INDEX events_conversation ON events ({old_columns})")
        conn.commit()
    assert build_report(path, environment="development", now=0).to_dict() == expected
    # The next app's first write rebuilds the index.
    with LocalStore(path) as store:
        store.write([make_payload("conv_e1", at=DAY3 + 11 * HOUR, environment="development")])
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (_store.SCHEMA_VERSION,)
        (index,) = conn.execute(
            "SELECT sql FROM sqlite_master WHERE name = 'events_conversation'"
        ).fetchone()
        plan = query_plan(
            conn,
            "SELECT conversation_id, environment FROM events WHERE environment IS 'development'",
        )
        assert _store._covering_index_is_current(conn), index
    assert "COVERING INDEX events_conversation" in plan
    assert build_report(path, environment="development").initialized == 3


def test_the_per_conversation_grouping_reads_the_index_in_order(tmp_path: Path) -> None:
    # Grouped by id and environment, in the covering index's order: no sort of every event
    # (with the environment last in the index, a million events took 1.83 s, 1.23 s now).
    from agentsight_middleware._report import _CONVERSATIONS, _VIEWED_BEFORE

    path = mixed(tmp_path / "events.sqlite3")
    with closing(sqlite3.connect(path)) as conn:
        for conversation_id in ("", "conversation_id,"):  # without and with --since
            query = _CONVERSATIONS.format(index="", where="", conversation_id=conversation_id)
            plan = query_plan(conn, query.split(" AS", 1)[1])
            assert "COVERING INDEX events_conversation" in plan
            assert "TEMP B-TREE" not in plan
        # An earlier view is looked up by id in that index: no scan of the file per chat.
        conn.execute(_CONVERSATIONS.format(index="", where="", conversation_id="conversation_id,"))
        looked_up = _VIEWED_BEFORE.replace(":since", str(DAY3)).replace(":first_ts", "0")
        plan = query_plan(conn, looked_up)
    assert "SEARCH events USING COVERING INDEX events_conversation" in plan, plan


# --------------------------------------------------------------------------- since


NOW = datetime(2026, 11, 24, 12, 0, tzinfo=timezone.utc).timestamp()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("7d", NOW - 7 * 86400),
        ("24h", NOW - 86400),
        ("30m", NOW - 1800),
        ("90s", NOW - 90),
        ("2w", NOW - 14 * 86400),
        (" 7D ", NOW - 7 * 86400),
        ("2026-11-01", datetime(2026, 11, 1, tzinfo=timezone.utc).timestamp()),
        ("2026-11-01T08:30", datetime(2026, 11, 1, 8, 30, tzinfo=timezone.utc).timestamp()),
        ("2026-11-01T08:30+02:00", datetime(2026, 11, 1, 6, 30, tzinfo=timezone.utc).timestamp()),
        ("2026-11-01T08:30Z", datetime(2026, 11, 1, 8, 30, tzinfo=timezone.utc).timestamp()),
        # Further back than 1970 means every event (before year 1 no date could show it).
        ("1000000d", 0.0),
        ("0001-01-01", 0.0),
    ],
)
def test_parse_since(text: str, expected: float) -> None:
    assert parse_since(text, now=NOW) == expected


@pytest.mark.parametrize("text", ["", "abc", "7", "7y", "-7d", "7 days", "2026-13-01", "0d", "d"])
def test_parse_since_rejects_junk(text: str) -> None:
    with pytest.raises(ValueError, match=r"cannot .*start time"):
        parse_since(text, now=NOW)


def test_parse_since_defaults_to_now() -> None:
    import time

    assert abs(parse_since("1h") - (time.time() - 3600)) < 5


# --------------------------------------------------------------------------- text


def test_text_report(db: Path) -> None:
    text = format_text(build_report(db))
    assert (
        "4 conversations initialized, 2 used: interaction rate 50.0 %, 2 abandoned (50.0 %)" in text
    )
    assert "1 conversation chatted without a page view (not counted in the rate)" in text
    assert "8 events from 2026-11-20 10:00 to 2026-11-22 23:30 UTC" in text
    lines = text.splitlines()
    start = lines.index("By page (widget placement), first page view")
    page_table = lines[start + 1 : start + 5]
    assert page_table[0].split() == ["page", "initialized", "used", "rate"]
    assert page_table[1].split() == ["/pricing", "2", "1", "50.0", "%"]
    # Right-aligned numbers: every line of the table ends at the same column.
    assert len({len(line) for line in page_table}) == 1
    assert "  10:00" in text
    assert ["2026-11-21", "0", "0", "n/a"] in [line.split() for line in lines]


def test_text_report_singular_and_since(db: Path) -> None:
    text = format_text(build_report(db, since=DAY3 + 23 * HOUR))
    assert "1 conversation initialized, 0 used: interaction rate 0.0 %, 1 abandoned (100.0 %)" in (
        text
    )
    assert "(since 2026-11-22 23:00 UTC)" in text


def test_text_report_empty(tmp_path: Path) -> None:
    path = tmp_path / "e.sqlite3"
    path.touch()
    text = format_text(build_report(path))
    assert "No events yet" in text


def test_text_report_keeps_escape_sequences_off_the_terminal(tmp_path: Path) -> None:
    path = write(tmp_path / "e.sqlite3", [make_payload("conv_a", page="/\x1b[2J\x1b[31mhi")])
    text = format_text(build_report(path))
    assert "\x1b" not in text
    assert "/\\x1b[2J\\x1b[31mhi" in text


def test_text_report_long_lists_are_cut(tmp_path: Path) -> None:
    path = write(
        tmp_path / "e.sqlite3", [make_payload(f"conv_{n}", page=f"/p/{n}") for n in range(25)]
    )
    text = format_text(build_report(path, by=["page"]), max_rows=20)
    assert "... and 5 more (--json lists all)" in text


# --------------------------------------------------------------------------- html


class Charts(HTMLParser):
    """Collects each <svg>'s id and title, and its elements' data-label/data-value."""

    def __init__(self) -> None:
        super().__init__()
        self.charts: dict[str, list[tuple[str, float]]] = {}
        self.titles: dict[str, str] = {}
        self.tags: Counter[str] = Counter()
        self.links: list[tuple[str, str]] = []
        self._svg: str | None = None
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        self.tags[tag] += 1
        for name in ("src", "href"):
            if found.get(name):
                self.links.append((tag, str(found[name])))
        if tag == "svg":
            self._svg = str(found["id"])
            self.charts[self._svg] = []
        elif tag == "title" and self._svg is not None and self._svg not in self.titles:
            self._in_title = True
        elif "data-value" in found and self._svg is not None:
            self.charts[self._svg].append(
                (str(found["data-label"]), float(str(found["data-value"])))
            )

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg":
            self._svg = None
        self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._in_title and self._svg is not None:
            self.titles[self._svg] = data


def charts(page: str) -> Charts:
    parser = Charts()
    parser.feed(page)
    parser.close()
    return parser


def test_html_report(db: Path) -> None:
    report = build_report(db)
    page = render_html(report)
    assert page.startswith("<!DOCTYPE html>")
    found = charts(page)
    assert list(found.charts) == [
        "chart-page",
        "chart-device",
        "chart-language",
        "chart-hour",
        "chart-source",
        "chart-daily",
    ]
    assert found.titles["chart-page"] == "Interaction rate by page (widget placement)"
    assert all(found.titles.get(chart) for chart in found.charts)
    assert found.charts["chart-page"] == [("/pricing", 50.0), ("/docs", 100.0), ("/", 0.0)]
    assert found.charts["chart-device"] == [("desktop", 50.0), ("tablet", 100.0), ("mobile", 0.0)]
    assert found.charts["chart-hour"] == [
        ("10:00", 100.0),
        ("11:00", 0.0),
        ("12:00", 100.0),
        ("23:00", 0.0),
    ]
    # Days without page views are gaps, not zeros.
    assert found.charts["chart-daily"] == [("2026-11-20", 50.0), ("2026-11-22", 50.0)]
    assert "4 conversations initialized, 2 used: interaction rate 50.0 %" in page
    for name, rows in report.breakdowns.items():
        if name == "hour":
            continue
        assert found.charts[f"chart-{name}"] == [
            ("(none)" if row.key is None else str(row.key), row.interaction_rate_percent)
            for row in rows
        ]


def test_html_is_self_contained(db: Path) -> None:
    page = render_html(build_report(db))
    found = charts(page)
    assert found.links == []
    assert found.tags["script"] == 0
    assert found.tags["link"] == 0
    assert found.tags["img"] == 0
    assert "http://" not in page
    assert "https://" not in page
    assert "url(" not in page
    assert "@import" not in page


def test_html_escapes_visitor_text(tmp_path: Path) -> None:
    path = write(
        tmp_path / "e.sqlite3",
        [make_payload("conv_a", page='/"><script>alert(1)</script>', language="<b>x</b>")],
    )
    page = render_html(build_report(path))
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert charts(page).charts["chart-page"] == [('/"><script>alert(1)</script>', 0.0)]


def test_html_exact_values(tmp_path: Path) -> None:
    path = write(
        tmp_path / "e.sqlite3",
        [make_payload(f"conv_{n}") for n in range(3)] + [make_payload("conv_0", used=True)],
    )
    report = build_report(path, by=["page"])
    (value,) = charts(render_html(report)).charts["chart-page"]
    assert value == ("/pricing", report.interaction_rate_percent)
    assert value[1] == 1 / 3 * 100


def test_html_empty_report(tmp_path: Path) -> None:
    path = tmp_path / "e.sqlite3"
    path.touch()
    page = render_html(build_report(path))
    assert "No events yet" in page
    assert "<svg" not in page


def test_html_many_days_and_one_day(tmp_path: Path) -> None:
    many = write(
        tmp_path / "many.sqlite3",
        [make_payload(f"conv_{d}", at=DAY1 + d * 86400) for d in range(60)],
    )
    assert len(charts(render_html(build_report(many))).charts["chart-daily"]) == 60
    one = write(tmp_path / "one.sqlite3", [make_payload("conv_a")])
    assert charts(render_html(build_report(one))).charts["chart-daily"] == [("2026-11-24", 0.0)]


def test_a_reader_that_cannot_write_beside_the_file_still_reports(tmp_path: Path) -> None:
    # An admin reporting on the www-data app's file, or a read-only volume: SQLite's -shm
    # file for a WAL database cannot be created beside it, and the report said "not a
    # usable events file: unable to open database file". With no writer at work (no -wal
    # file), the file is read as it is. The folder is made immutable (chattr +i), which
    # even root cannot write in.
    import shutil
    import subprocess

    folder = tmp_path / "volume"
    folder.mkdir()
    db = write(folder / "events.sqlite3", dataset())
    assert not Path(f"{db}-wal").exists()  # the writer closed: nothing in flight
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(folder)]).returncode != 0:
        pytest.skip("needs chattr +i (root, on ext4): nothing else stops root writing here")
    try:
        assert subprocess.run(["touch", str(folder / "probe")]).returncode != 0
        report = build_report(db)
        conn = _store.connect_readonly(db)  # read as it is, without locks
    finally:
        subprocess.run([chattr, "-i", str(folder)], check=True)
    assert (report.initialized, report.used) == (4, 2)
    # Such a read takes no locks: a writer starting meanwhile (here, once the folder can be
    # written again) may mix old and new pages into it. It is then refused, not trusted.
    try:
        assert _store.check_unchanged(conn) is None
        write(db, [make_payload("conv_late")])
        changed = _store.check_unchanged(conn)
    finally:
        conn.close()
    assert changed is not None
    assert "was written to while the report read it" in str(changed)
