"""The demo page's HUD shows the session's live temporal quality, sampled by the server off the frame path.

Real headless Chromium (its fake camera or the page's test pattern) against a real server with the
tiny model; the fixtures are the page tests' own.
"""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import pytest

from tests.pages_support import LiveServer, wait_until
from tests.test_pages import Page, browser, page, server  # noqa: F401 - fixtures, used by name

pytestmark = [pytest.mark.timeout(180)]


def test_the_hud_shows_live_warp_error_flicker_and_ssim(server: LiveServer, page: Page,  # noqa: F811
                                                       artifacts_dir: Path) -> None:  # fmt: skip
    p = page.page
    p.goto(server.url + "/")
    p.click("#start-pattern")
    wait_until(lambda: p.evaluate("window.livediff.outputFrames") >= 3, 45, "the first output frames")
    (session_id,) = {s["id"] for s in server.sessions() if s["state"] != "closed"}
    chip = p.locator(".hud .stat.quality")
    # sampled about once a second on the server, sent with every stats message after that
    wait_until(lambda: chip.count() == 1 and "warp" in (chip.text_content() or ""), 20, "the temporal chip")
    text = chip.text_content() or ""
    assert re.search(r"warp \d+\.\d", text) and re.search(r"SSIM -?\d\.\d\d", text), text
    assert "levels of 255" in (chip.get_attribute("title") or "")
    figures = server.api("GET", f"/api/sessions/{session_id}")["quality"]
    assert figures["samples"] >= 1 and figures["warp_error"] is not None and -1 <= figures["ssim"] <= 1
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as response:
        metrics = response.read().decode()
    count = re.search(r"^livediff_quality_warp_error_count (\S+)$", metrics, re.M)
    assert count is not None and float(count.group(1)) >= 1
    page.screenshot(artifacts_dir / "page-demo-quality.png")
    p.click("#stop")
    wait_until(lambda: p.text_content("#status") == "stopped", 10, "the page to stop")
    assert page.errors == []
