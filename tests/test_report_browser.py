"""The HTML report, opened in headless Chromium: charts drawn from the data, nothing fetched."""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.sync_api import Browser

from agentsight_middleware._report import build_report
from agentsight_middleware._store import LocalStore
from agentsight_middleware.cli import main

from .test_store import BASE, make_payload


def _events(db: Path) -> None:
    payloads = []
    for i in range(10):  # /pricing: 10 views, 6 chats -> 60 %
        payloads.append(make_payload(f"conv_p{i:011x}", page="/pricing", at=BASE + i))
        if i < 6:
            payloads.append(make_payload(f"conv_p{i:011x}", used=True, at=BASE + i + 1))
    for i in range(4):  # /docs: 4 mobile views, 1 chat -> 25 %
        conversation = f"conv_d{i:011x}"
        payloads.append(make_payload(conversation, page="/docs", device="mobile", at=BASE + 3600))
        if i == 0:
            payloads.append(make_payload(conversation, used=True, at=BASE + 3601))
    with LocalStore(db) as store:
        store.write(payloads)


def test_html_report_draws_the_data(browser: Browser, tmp_path: Path) -> None:
    db = tmp_path / "events.sqlite3"
    _events(db)
    out = tmp_path / "report.html"
    assert main(["report", "--db", str(db), "--html", str(out)]) == 0
    report = build_report(db)

    context = browser.new_context()
    page = context.new_page()
    fetched: list[str] = []
    page.on("request", lambda request: fetched.append(request.url))
    page.goto(out.as_uri())
    assert fetched == [out.as_uri()], "the page is self-contained"

    bars = page.eval_on_selector_all(
        "#chart-page rect.bar",
        """els => els.map(e => ({label: e.dataset.label, value: Number(e.dataset.value),
                                 width: e.getBoundingClientRect().width}))""",
    )
    expected = {row.key: row.interaction_rate_percent for row in report.breakdowns["page"]}
    assert (
        {bar["label"]: bar["value"] for bar in bars}
        == expected
        == {"/pricing": 60.0, "/docs": 25.0}
    )
    widths = {bar["label"]: bar["width"] for bar in bars}
    assert widths["/pricing"] > 0
    assert widths["/pricing"] / widths["/docs"] == pytest.approx(60 / 25, rel=0.05)

    devices = page.eval_on_selector_all(
        "#chart-device rect.bar", "els => els.map(e => [e.dataset.label, Number(e.dataset.value)])"
    )
    assert dict(devices) == {"desktop": 60.0, "mobile": 25.0}
    hours = page.eval_on_selector_all("#chart-hour [data-value]", "els => els.length")
    assert hours >= 2
    assert "14 conversations initialized, 7 used" in page.inner_text("body")
    page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    context.close()
