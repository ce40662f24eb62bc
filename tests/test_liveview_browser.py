"""The live view in a real headless Chromium, against a real lapse server.

The server is ``python -m lapse.web.liveview --demo`` (the reactor, uvicorn)
on a free loopback port, in a subprocess; it prints ``CALLBACK <uid>`` when a
session's ``notifyOnExpire`` callback runs and ``HOOK <uid> <cause>`` when the
durable hook does. Chromium is Debian's (installed with apt-get if missing);
Playwright drives it (``executable_path``, no ``playwright install``).

With ``LAPSE_LIVEVIEW_SCREENSHOT=docs/liveview.png`` the test also saves a
screenshot of the page (that is how the README's picture is made).
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from _browser import chromium_binary
from _principal_views import INJECTION
from _servers import REPO_ROOT, ServerProcess, free_port, wait_for_port, write_script

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Dialog

pytestmark = pytest.mark.slow  # real processes and real timeouts, each over a second

TOKEN = "browser-test-token-0123456789"
SESSIONS = 12


@contextlib.contextmanager
def demo_in_chromium(
    tmp_path: Path, sessions: int, principals: Sequence[str] = ()
) -> Iterator[tuple[ServerProcess, Browser, int]]:
    """The live view's demo server (``sessions`` sessions, the token ``TOKEN``,
    bound to ``principals`` in turn) on a free port, and a headless
    Chromium; both stopped after."""
    executable = chromium_binary()
    from playwright.sync_api import sync_playwright

    port = free_port()
    script = write_script(
        tmp_path, "liveview_demo.py", "from lapse.web.liveview import main\nmain()\n"
    )
    args = ["--demo", "--port", str(port), "--sessions", str(sessions), "--token", TOKEN]
    for name in principals:
        args += ["--principal", name]
    server = ServerProcess(script, args=args).start()
    try:
        wait_for_port(port, timeout=20, proc=server.proc)
        server.wait_for_match(r"LIVEVIEW .*", timeout=20)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=executable, headless=True, args=["--no-sandbox"]
            )
            try:
                yield server, browser, port
            finally:
                browser.close()
    finally:
        server.stop()


def test_live_view_in_chromium(tmp_path: Path) -> None:
    """The page lists the sessions (uid's start, user, times), draws the
    charts, ends one session with its button; shows each principal as text
    (a markup principal runs nothing); filters by a user's name and ends
    all of that user's sessions with one button (after a confirmation),
    each one's callback running in the server."""
    with demo_in_chromium(tmp_path, SESSIONS, ["ann", INJECTION]) as (server, browser, port):
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        dialogs: list[str] = []

        def on_dialog(dialog: Dialog) -> None:
            dialogs.append(f"{dialog.type}: {dialog.message}")
            dialog.accept()

        page.on("dialog", on_dialog)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on(
            "console",
            lambda msg: errors.append(msg.text) if msg.type == "error" else None,
        )
        page.goto(f"http://127.0.0.1:{port}/_lapse/?token={TOKEN}")
        assert page.url == f"http://127.0.0.1:{port}/_lapse/"  # token dropped
        page.wait_for_selector("body[data-loaded='1']", timeout=10_000)
        assert page.text_content("#live") == str(SESSIONS)
        rows = page.locator("#rows tr")
        assert rows.count() == SESSIONS
        for i in range(SESSIONS):
            cells = rows.nth(i).locator("td")
            assert re.fullmatch(r"[A-Za-z0-9_-]{8}\u2026", cells.nth(0).inner_text())
            assert cells.nth(1).inner_text() in ("ann", INJECTION)
            for column in (2, 3, 4):
                assert re.match(r"\d+ (s|min|h)", cells.nth(column).inner_text())
        users = rows.locator("td.user").all_inner_texts()
        assert sorted(users) == sorted(["ann", INJECTION] * (SESSIONS // 2))
        assert page.locator("td.user img, td.user script").count() == 0
        # The charts were drawn from the JSON: bars with real values.
        minute_bars = page.locator("#minutes rect")
        assert minute_bars.count() == 120
        values = [
            int(v)
            for v in minute_bars.evaluate_all("els => els.map(e => e.getAttribute('data-value'))")
        ]
        assert sum(values) > 0
        expiry_values = page.locator("#expiries rect").evaluate_all(
            "els => els.map(e => Number(e.getAttribute('data-value')))"
        )
        assert len(expiry_values) == 12 and sum(expiry_values) == SESSIONS
        if os.environ.get("LAPSE_LIVEVIEW_SCREENSHOT"):
            target = REPO_ROOT / os.environ["LAPSE_LIVEVIEW_SCREENSHOT"]
            target.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(target), full_page=True)

        first = rows.nth(0)
        short = first.locator("td").nth(0).inner_text()
        first.locator("button.end").click()
        callback = server.wait_for_match(r"CALLBACK (\S+)")
        hook = server.wait_for_match(r"HOOK (\S+) (\w+)")
        assert callback.group(1) == short
        assert hook.groups() == (short, "expired")
        # (Polled from here: the page's CSP forbids evaluating strings.)
        deadline = time.monotonic() + 10
        while page.text_content("#live") != str(SESSIONS - 1):
            assert time.monotonic() < deadline, page.text_content("#live")
            page.wait_for_timeout(100)
        page.wait_for_timeout(200)  # the table is filled after the count
        assert page.locator("#rows tr").count() == SESSIONS - 1
        assert short not in page.locator("#rows").inner_text()
        assert page.text_content("#ended-expired") != "0"

        # One user's sessions: a click on a name filters, one button ends them.
        page.locator("td.user button", has_text="ann").first.click()
        deadline = time.monotonic() + 5
        while "of user" not in (page.text_content("#page-info") or ""):
            assert time.monotonic() < deadline, page.text_content("#error")
            page.wait_for_timeout(50)
        assert set(page.locator("#rows td.user").all_inner_texts()) == {"ann"}
        ann = page.locator("#rows tr").count()
        assert ann in (SESSIONS // 2, SESSIONS // 2 - 1)
        shorts = page.locator("#rows td.uid").all_inner_texts()
        page.click("#end-user")
        ended = [server.wait_for_match(r"CALLBACK (\S+)").group(1) for _ in range(ann)]
        assert sorted(ended) == sorted(shorts)
        deadline = time.monotonic() + 10
        while page.locator("#rows tr").count() != 0:
            assert time.monotonic() < deadline, page.text_content("#error")
            page.wait_for_timeout(100)
        assert page.text_content("#live") == str(SESSIONS - 1 - ann)
        assert dialogs == ["confirm: End every session of \u201cann\u201d?"]
        assert errors == []


def test_a_refused_cursor_takes_the_page_back_to_page_one(tmp_path: Path) -> None:
    """On the memory store a scan ends with its last page, so the page's
    refresh of that page sends a cursor the view now refuses (400): the page
    goes back to page one instead of showing an error."""
    with demo_in_chromium(tmp_path, 60) as (_, browser, port):
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{port}/_lapse/?token={TOKEN}")
        page.wait_for_selector("body[data-loaded='1']", timeout=10_000)
        assert page.locator("#rows tr").count() == 50
        page.click("#next")
        deadline = time.monotonic() + 5
        while page.locator("#rows tr").count() != 10:
            assert time.monotonic() < deadline
            page.wait_for_timeout(50)
        # The next refresh (3 s) re-sends the spent cursor.
        deadline = time.monotonic() + 8
        while page.locator("#rows tr").count() != 50:
            assert time.monotonic() < deadline, page.text_content("#error")
            page.wait_for_timeout(100)
        assert page.text_content("#error") == ""


LABEL_BOXES = """svg => Array.from(svg.querySelectorAll('text')).map(t => {
  const r = t.getBoundingClientRect(), m = t.getScreenCTM();
  return {text: t.textContent, left: r.left, right: r.right, top: r.top, bottom: r.bottom,
          sx: m.a, sy: m.d};
})"""


def test_chart_labels_do_not_overlap_on_a_phone(tmp_path: Path) -> None:
    """At 390 px wide (a phone), in Chromium, the charts' labels are drawn
    unscaled (as wide as tall: the SVG is not stretched), readable (10 px),
    inside their chart and none overlapping another; the sessions table fits
    the screen. Also at 1280 px. A screenshot at 390 px is saved (look at it:
    LAPSE_LIVEVIEW_PHONE_SCREENSHOT=path keeps it)."""
    with demo_in_chromium(tmp_path, 40) as (_, browser, port):
        for width in (390, 1280):
            page = browser.new_page(viewport={"width": width, "height": 844})
            page.goto(f"http://127.0.0.1:{port}/_lapse/?token={TOKEN}")
            page.wait_for_selector("body[data-loaded='1']", timeout=10_000)
            for chart in ("#expiries", "#minutes"):
                svg = page.locator(chart)
                frame = svg.bounding_box()
                assert frame is not None
                assert frame["x"] >= 0 and frame["x"] + frame["width"] <= width
                labels = svg.evaluate(LABEL_BOXES)
                assert len(labels) >= 4, (width, chart, labels)
                for label in labels:
                    assert abs(label["sx"] - label["sy"]) < 0.01, (width, chart, label)
                    assert label["bottom"] - label["top"] >= 10, (width, chart, label)
                    assert frame["x"] <= label["left"] + 0.5, (width, chart, label)
                    assert label["right"] <= frame["x"] + frame["width"] + 0.5
                for i, a in enumerate(labels):
                    for b in labels[i + 1 :]:
                        apart = (
                            a["right"] <= b["left"]
                            or b["right"] <= a["left"]
                            or a["bottom"] <= b["top"]
                            or b["bottom"] <= a["top"]
                        )
                        assert apart, (width, chart, a, b)
            table = page.locator("#rows").bounding_box()
            assert table is not None and table["x"] + table["width"] <= width
            if width == 390:
                target = os.environ.get("LAPSE_LIVEVIEW_PHONE_SCREENSHOT")
                shot = Path(target) if target else tmp_path / "phone.png"
                page.screenshot(path=str(shot), full_page=True)
                assert shot.stat().st_size > 0
            page.close()
