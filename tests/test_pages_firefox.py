"""The pages in Firefox (Debian's Firefox ESR over Marionette) against a real livediff server.

The same journeys as the Chromium tests, shorter: the demo page with Firefox's fake camera, a
latency run, the OBS viewer of a WHIP publisher. Each fails on any uncaught exception or
console.error of the page, and leaves a screenshot in test-artifacts/.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.firefox_support import Firefox, firefox_missing
from tests.pages_support import LiveServer, Publisher, skip_without, start_server, wait_until

pytestmark = [pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def firefox() -> Iterator[Firefox]:
    skip_without(firefox_missing())
    browser = Firefox()
    yield browser
    browser.close()


@pytest.fixture(scope="module")
def server(tiny_parts: Any, firefox: Firefox) -> Iterator[LiveServer]:  # the browser first: skip before starting
    live = start_server(tiny_parts)
    yield live
    live.stop()


def live_sessions(server: LiveServer) -> set[str]:
    return {s["id"] for s in server.sessions() if s["state"] != "closed"}


def test_demo_page_in_firefox(server: LiveServer, firefox: Firefox, artifacts_dir: Path) -> None:
    firefox.goto(server.url + "/")
    firefox.click("#start")
    wait_until(lambda: firefox.js("return page.livediff.outputFrames") >= 5, 45, "the output video's first frames")
    start = firefox.js("return page.livediff.outputFrames")
    wait_until(lambda: firefox.js("return page.livediff.outputFrames") >= start + 5, 30, "more output frames")
    assert firefox.text("#status") == "live"
    (session_id,) = live_sessions(server)

    firefox.fill("#prompt", "a linocut print of a harbour\n")  # Enter applies it
    wait_until(
        lambda: server.api("GET", f"/api/sessions/{session_id}")["params"]["prompt"] == "a linocut print of a harbour",
        10,
        "the prompt to reach the server",
    )
    wait_until(lambda: "fps" in firefox.text("#hud"), 10, "the HUD")
    firefox.screenshot(artifacts_dir / "firefox-demo.png")

    firefox.click("#stop")
    wait_until(lambda: session_id not in live_sessions(server), 10, "the session to close on the server")
    wait_until(lambda: firefox.text("#status") == "stopped", 5, "the page to say it stopped")
    assert firefox.page_errors() == []


def test_latency_page_in_firefox(server: LiveServer, firefox: Firefox, artifacts_dir: Path) -> None:
    firefox.goto(server.url + "/latency?duration=10&fps=5&resolution=320x240")
    firefox.click("#run")
    wait_until(lambda: firefox.js("return !document.getElementById('summary').hidden"), 60, "the summary")
    assert firefox.text("#status") == "done"
    summary = firefox.js("return JSON.parse(JSON.stringify(page.livediffLatency.results[0].summary()))")
    assert summary["sent"] >= 40  # 10 s at 5 fps
    # Headless Firefox sends about two thirds of the frames painted on the capture canvas (the
    # server's frames_in shows the rest never arrive: counted as lost). Of the frames the server answered, every
    # id must be read back from the displayed output.
    assert summary["sent_by_server"] >= 0.5 * summary["sent"], summary
    assert summary["received"] >= 0.95 * summary["sent_by_server"], summary
    assert math.isfinite(summary["p50_ms"]) and 0 < summary["p50_ms"] <= summary["p95_ms"] < 10_000
    assert summary["clock_round_trip_ms"] is not None and "unet" in summary["breakdown_mean_ms"]
    firefox.screenshot(artifacts_dir / "firefox-latency.png")
    assert firefox.page_errors() == []


def test_viewer_page_in_firefox(server: LiveServer, firefox: Firefox, artifacts_dir: Path) -> None:
    publisher = Publisher(server)
    try:
        session_id = publisher.start()
        firefox.goto(server.url + "/view/latest")
        wait_until(lambda: firefox.js("return page.livediffViewer.frames") >= 5, 45, "the viewer's first frames")
        assert server.api("GET", f"/api/sessions/{session_id}")["viewers"] == 1
        assert firefox.js("return document.getElementById('video').videoWidth") == 128  # the engine's size
        firefox.screenshot(artifacts_dir / "firefox-viewer.png")
        assert firefox.page_errors() == []
    finally:
        publisher.close()
        for live in live_sessions(server):
            server.call(server.service.close_session(server.service.scheduler.sessions[live]))
