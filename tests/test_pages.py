"""The pages under web/ in a real headless Chromium against a real livediff server.

Chromium's fake camera stands in for a webcam; the server runs the built-in tiny model at 128x128
on its own thread. Each test leaves a screenshot in test-artifacts/ (look at them: a page that
passes but looks broken is not done).
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.pages_support import LiveServer, Publisher, chromium, start_server, wait_until

pytestmark = [pytest.mark.timeout(180)]

VIEWPORT = {"width": 1360, "height": 820}


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_parts: Any, browser: Any) -> Iterator[LiveServer]:  # the browser first: skip before starting
    live = start_server(tiny_parts)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as launched:
        yield launched


class Page:
    """A fresh browser context and page that records console errors and uncaught exceptions."""

    def __init__(self, browser: Any) -> None:
        self.context = browser.new_context(viewport=VIEWPORT, accept_downloads=True)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))

    def _console(self, message: Any) -> None:
        if message.type == "error":
            self.errors.append(f"console.error: {message.text}")

    def frames(self, expression: str) -> int:
        return int(self.page.evaluate(expression))

    def screenshot(self, path: Path, full_page: bool = False) -> None:
        self.page.evaluate("window.scrollTo(0, 0)")
        self.page.screenshot(path=str(path), full_page=full_page)


@pytest.fixture()
def page(browser: Any) -> Iterator[Page]:
    opened = Page(browser)
    yield opened
    opened.context.close()


def session_ids(server: LiveServer) -> set[str]:
    return {s["id"] for s in server.sessions() if s["state"] != "closed"}


def wait_for_growth(page: Page, expression: str, more: int, timeout: float, what: str) -> int:
    start = page.frames(expression)
    return wait_until(lambda: page.frames(expression) >= start + more, timeout, f"{what} to grow by {more}")


# -- demo page -----------------------------------------------------------------------------------


def test_demo_page_live_controls_and_stop(server: LiveServer, page: Page, artifacts_dir: Path) -> None:
    p = page.page
    p.goto(server.url + "/")
    p.click("#start")
    wait_until(lambda: page.frames("window.livediff.outputFrames") >= 3, 45, "the output video's first frames")
    wait_for_growth(page, "window.livediff.outputFrames", 5, 30, "requestVideoFrameCallback calls")
    assert p.text_content("#status") == "live"
    (session_id,) = session_ids(server)
    assert p.evaluate("window.livediff.state.sessionId") == session_id

    # Enter applies the prompt at once.
    p.fill("#prompt", "a pencil sketch of a lighthouse")
    p.press("#prompt", "Enter")
    wait_until(
        lambda: (
            server.api("GET", f"/api/sessions/{session_id}")["params"]["prompt"] == "a pencil sketch of a lighthouse"
        ),
        10,
        "the prompt to reach the server",
    )
    # Typing alone applies after a short pause (debounce), with no Enter and no blur.
    p.click("#blend-box summary")
    p.locator("#blend-prompt").press_sequentially("neon city", delay=20)
    p.evaluate("""() => { const s = document.getElementById('blend-weight');
                          s.value = '0.35'; s.dispatchEvent(new Event('input', {bubbles: true})); }""")
    p.click("#steps button[data-value='2']")
    p.click("#similarity")

    def params() -> dict[str, Any]:
        return server.api("GET", f"/api/sessions/{session_id}")["params"]

    wanted = {"blend": {"prompt": "neon city", "weight": 0.35}, "steps": 2, "similarity_filter": True}
    wait_until(lambda: {k: v for k, v in params().items() if k in wanted} == wanted, 10, "the changes to apply")
    wait_until(lambda: "Applied" in (p.text_content("#feedback") or ""), 5, "the ack to show")

    # The HUD shows numbers from getStats and the server.
    wait_until(lambda: "fps" in (p.text_content("#hud") or ""), 10, "the HUD")
    hud = p.text_content("#hud") or ""
    assert "round trip" in hud and "jitter buffer" in hud and "dropped" in hud
    wait_for_growth(page, "window.livediff.outputFrames", 3, 30, "output frames after the changes")
    page.screenshot(artifacts_dir / "page-demo.png")

    p.click("#stop")
    wait_until(lambda: session_id not in session_ids(server), 10, "the session to close on the server")
    wait_until(lambda: p.text_content("#status") == "stopped", 5, "the page to say it stopped")
    assert p.evaluate("window.livediff.state.pc") is None
    assert page.errors == []


def test_demo_page_stop_while_connecting_leaves_nothing_behind(
    server: LiveServer, page: Page, artifacts_dir: Path
) -> None:
    """Stop pressed while the offer is in flight: the session the server set up is ended, no error shows."""
    p = page.page
    p.goto(server.url + "/")
    p.click("#start-pattern")
    p.click("#stop")
    # the start goes on after the stop (ICE gathering, then POST /offer), then ends what it set up
    p.evaluate("() => window.livediff.state.starting")
    wait_until(lambda: not session_ids(server), 10, "no session left on the server")
    assert p.text_content("#status") == "stopped"
    assert p.is_hidden("#notice")
    assert p.evaluate("window.livediff.state.pc") is None
    page.screenshot(artifacts_dir / "page-demo-stopped-while-connecting.png")
    assert page.errors == []


def test_demo_page_camera_denied_offers_test_pattern(server: LiveServer, page: Page, artifacts_dir: Path) -> None:
    p = page.page
    p.add_init_script("""navigator.mediaDevices.getUserMedia = async () => {
        throw new DOMException('Permission denied', 'NotAllowedError'); };""")
    p.goto(server.url + "/")
    p.click("#start")
    notice = p.locator("#notice[data-notice='camera']")
    notice.wait_for(timeout=10_000)
    assert "denied" in (notice.text_content() or "")
    page.screenshot(artifacts_dir / "page-demo-camera-denied.png")
    notice.get_by_role("button", name="Use test pattern").click()
    wait_until(lambda: page.frames("window.livediff.outputFrames") >= 5, 45, "output frames from the test pattern")
    assert p.is_hidden("#notice")
    (session_id,) = session_ids(server)
    page.screenshot(artifacts_dir / "page-demo-test-pattern.png")
    p.click("#stop")
    wait_until(lambda: session_id not in session_ids(server), 10, "the session to close")
    assert page.errors == []


def test_demo_page_connection_lost_and_reconnect(server: LiveServer, page: Page, artifacts_dir: Path) -> None:
    p = page.page
    p.goto(server.url + "/")
    p.click("#start-pattern")
    wait_until(lambda: page.frames("window.livediff.outputFrames") >= 3, 45, "the first output frames")
    (first,) = session_ids(server)
    # The server goes away under the page (restart, crash, reaped peer): its session ends.
    server.call(server.service.close_session(server.service.scheduler.sessions[first]))
    notice = p.locator("#notice[data-notice='lost']")
    notice.wait_for(timeout=15_000)
    assert "Connection lost" in (notice.text_content() or "")
    page.screenshot(artifacts_dir / "page-demo-connection-lost.png")
    notice.get_by_role("button", name="Reconnect").click()
    wait_until(lambda: p.text_content("#status") == "live", 30, "the reconnection")
    (second,) = session_ids(server)
    assert second != first
    wait_for_growth(page, "window.livediff.outputFrames", 3, 30, "output frames after reconnecting")
    p.click("#stop")
    wait_until(lambda: not session_ids(server), 10, "the session to close")
    assert page.errors == []


# -- latency page --------------------------------------------------------------------------------


def test_latency_page_run_summary_and_downloads(server: LiveServer, page: Page, artifacts_dir: Path) -> None:
    p = page.page
    # A rate the tiny model keeps up with on 2 CPU cores, so ids are not dropped at the server's inbox.
    p.goto(server.url + "/latency?duration=10&fps=5&resolution=320x240")
    assert p.input_value("#duration") == "10"
    p.click("#run")
    p.locator("#summary").wait_for(state="visible", timeout=60_000)
    assert p.text_content("#status") == "done"
    assert p.text_content("#playout") in ("jitterBufferTarget=0", "playoutDelayHint=0")

    with p.expect_download() as download:
        p.click("#download-json")
    download.value.save_as(artifacts_dir / "latency-report.json")
    report = json.loads((artifacts_dir / "latency-report.json").read_text())
    (run,) = report["runs"]
    summary, frames = run["summary"], run["frames"]
    assert math.isfinite(summary["p50_ms"]) and math.isfinite(summary["p95_ms"])
    assert 0 < summary["p50_ms"] <= summary["p95_ms"] <= summary["max_ms"] < 10_000
    assert summary["sent"] >= 40  # 10 s at 5 fps
    assert summary["received"] >= 0.8 * summary["sent"], summary
    assert len(frames) == summary["sent"]  # every frame sent, with what became of it
    assert len({f["id"] for f in frames}) == len(frames)
    frames = [f for f in frames if f["outcome"] == "displayed"]
    assert len(frames) == summary["received"]
    for frame in frames:
        assert frame["g2g_ms"] == pytest.approx(frame["displayed_ms"] - frame["sent_ms"])
        assert 0 < frame["g2g_ms"] < 10_000
        if frame["received_ms"] is not None:  # never shown before its last packet came
            assert frame["displayed_ms"] >= frame["received_ms"], frame
    with_breakdown = [f for f in frames if "unet_ms" in f]
    assert len(with_breakdown) >= 0.8 * len(frames)
    # The network legs use the server's clock, matched by pings: on loopback to within half a
    # round trip; the display time may be early by up to a refresh (60 Hz) where the page had to
    # replace a stale vsync prediction. A wrong clock offset would be off by far more.
    error_ms = summary["clock_round_trip_ms"] / 2 + 1000 / 60
    assert 0 < summary["clock_round_trip_ms"] < 100
    for frame in with_breakdown:
        assert frame["uplink_decode_ms"] > -error_ms and frame["encode_downlink_render_ms"] > -error_ms, frame
    for frame in with_breakdown:  # the stacked spans add up to glass-to-glass
        spans = sum(
            v
            for k, v in frame.items()
            if k.endswith("_ms") and k not in ("sent_ms", "displayed_ms", "received_ms", "g2g_ms")
        )
        assert spans == pytest.approx(frame["g2g_ms"], abs=0.5)

    with p.expect_download() as download:
        p.click("#download-csv")
    rows = list(csv.DictReader(io.StringIO(Path(download.value.path()).read_text())))
    assert len(rows) == summary["sent"] and rows[0]["run"] == "model"
    assert sum(row["outcome"] == "displayed" for row in rows) == summary["received"]

    p.evaluate("document.getElementById('summary').scrollIntoView()")
    page.screenshot(artifacts_dir / "page-latency.png", full_page=True)
    assert page.errors == []


def test_latency_page_runs_the_duration_the_url_asks_for(server: LiveServer, page: Page) -> None:
    """`?duration=5` ran 30 s when only 10/30/60/120 were offered: any duration from 3 to 300 s is taken."""
    p = page.page
    p.goto(server.url + "/latency?duration=5&fps=5&resolution=320x240")
    assert p.input_value("#duration") == "5" and p.is_hidden("#notice")
    started = time.monotonic()
    p.click("#run")
    p.locator("#summary").wait_for(state="visible", timeout=60_000)
    took = time.monotonic() - started
    summary = p.evaluate("window.livediffLatency.results[0].summary()")
    assert summary["duration_s"] == pytest.approx(5, abs=1), summary
    assert took < 30, took  # 5 s measured, plus connecting, warm-up and 2 s for the last frames
    assert page.errors == []


def test_latency_page_names_the_url_parameters_it_cannot_take(
    server: LiveServer, page: Page, artifacts_dir: Path
) -> None:
    p = page.page
    p.goto(server.url + "/latency?duration=1000&fps=7&resolution=640x480")
    notice = p.locator("#notice[data-notice='params']")
    notice.wait_for(timeout=10_000)
    text = notice.text_content() or ""
    assert "duration=1000 (takes 3 to 300 seconds)" in text, text
    assert "fps=7 (takes 5, 10, 15, 24, 30, 60)" in text, text
    assert "resolution" not in text  # taken
    assert p.input_value("#duration") == "30" and p.input_value("#resolution") == "640x480"
    page.screenshot(artifacts_dir / "page-latency-params.png")
    # A duration typed out of range is named too, and no run starts.
    p.fill("#duration", "2")
    p.click("#run")
    p.locator("#notice[data-notice='duration']").wait_for(timeout=5_000)
    assert "3 to 300 seconds" in (p.text_content("#notice") or "")
    assert p.text_content("#status") == "idle" and not p.is_disabled("#run")
    assert page.errors == []


def _dropped_in(server: LiveServer) -> float:
    """The server's count of frames its sessions' inboxes replaced unread (/metrics)."""
    import urllib.request

    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    (line,) = [line for line in text.splitlines() if line.startswith('livediff_frames_total{outcome="dropped_in"}')]
    return float(line.split()[-1])


def test_latency_page_tells_frames_the_server_dropped_from_frames_lost(
    tiny_parts: Any, browser: Any, artifacts_dir: Path
) -> None:
    """The model slower than the camera: the inbox's drops are labelled as such, not as lost."""
    slow = start_server(tiny_parts, size=256)  # the tiny model at 256x256 on one core: slower than 30 fps
    page = Page(browser)
    try:
        p = page.page
        before = _dropped_in(slow)
        p.goto(slow.url + "/latency?duration=5&fps=30&resolution=320x240")
        p.click("#run")
        p.locator("#summary").wait_for(state="visible", timeout=90_000)
        dropped_on_server = _dropped_in(slow) - before
        with p.expect_download() as download:
            p.click("#download-json")
        (run,) = json.loads(Path(download.value.path()).read_text())["runs"]
        summary, frames = run["summary"], run["frames"]
        assert summary["dropped_by_server_inbox"] > 0, summary
        assert summary["dropped_by_server"] == summary["dropped_by_server_inbox"] + summary["dropped_by_server_outbox"]
        assert summary["sent"] == summary["received"] + summary["dropped_by_server"] + summary["lost_on_the_way"]
        assert summary["lost_on_the_way"] == summary["lost_before_server"] + summary["lost_after_server"]
        # The page counts only what the server named, inside the measured window.
        assert summary["dropped_by_server_inbox"] <= dropped_on_server, (summary, dropped_on_server)
        outcomes = {
            key: sum(f["outcome"] == key for f in frames)
            for key in ("displayed", "dropped_inbox", "dropped_outbox", "lost_before_server", "lost_after_server")
        }
        assert len(frames) == summary["sent"] == sum(outcomes.values()), outcomes
        assert outcomes["dropped_inbox"] == summary["dropped_by_server_inbox"]
        assert outcomes["displayed"] == summary["received"]
        # Said in the tiles and the table, in words.
        assert p.text_content("#dropped") == str(summary["dropped_by_server"])
        assert p.text_content("#lost") == str(summary["lost_on_the_way"])
        table = p.text_content("#summary-table") or ""
        assert "dropped by the server on purpose" in table and "model busy (latest-only inbox)" in table
        assert "lost on the way" in table
        assert "latest-only" in (p.text_content("#drops-note") or "")
        with p.expect_download() as download:
            p.click("#download-csv")
        rows = list(csv.DictReader(io.StringIO(Path(download.value.path()).read_text())))
        assert sum(row["outcome"] == "dropped_inbox" for row in rows) == summary["dropped_by_server_inbox"]
        p.evaluate("document.getElementById('summary').scrollIntoView()")
        page.screenshot(artifacts_dir / "page-latency-drops.png", full_page=True)
        assert page.errors == []
    finally:
        page.context.close()
        slow.stop()


def test_latency_run_never_shows_a_frame_before_it_could_be(server: LiveServer, page: Page) -> None:
    """A vsync prediction earlier than the frame's arrival (seen on a loaded CI host) is not trusted."""
    p = page.page
    p.goto(server.url + "/latency")
    result = p.evaluate(
        """async () => {
      const { LatencyRun } = await import('/web/js/measure.js');
      const run = new LatencyRun();
      run.sent(1, 900); run.sent(2, 1000); run.sent(3, 1100);
      const meta = (expected, presented, received) =>
        ({ expectedDisplayTime: expected, presentationTime: presented, receiveTime: received, width: 64, height: 64 });
      return {
        honest: run.displayed(1, meta(1020.0, 1020.3, 1001)),  // headless: handed over just after
        stale: run.displayed(2, meta(991, 1158, 1153)),        // predicted before its last packet arrived
        late: run.displayed(3, meta(1180, 1170, 1160)),
        summary: run.summary(),
      };
    }"""
    )
    assert result["honest"]["g2g_ms"] == 120 and result["honest"]["displayed_ms"] == 1020
    assert result["stale"]["displayed_ms"] == 1158 and result["stale"]["g2g_ms"] == 158
    assert result["late"]["g2g_ms"] == 80
    assert result["summary"]["stale_display_predictions"] == 1
    assert result["summary"]["received"] == 3 and result["summary"]["max_ms"] == 158
    assert page.errors == []


# -- viewer page ---------------------------------------------------------------------------------

MEAN_LUMA = """() => {
  const v = document.getElementById('video');
  if (!v.videoWidth) return -1;
  const c = document.createElement('canvas');
  c.width = v.videoWidth; c.height = v.videoHeight;
  const ctx = c.getContext('2d');
  ctx.drawImage(v, 0, 0);
  const d = ctx.getImageData(0, 0, c.width, c.height).data;
  let sum = 0;
  for (let i = 0; i < d.length; i += 4) sum += (d[i] + d[i + 1] + d[i + 2]) / 3;
  return sum / (d.length / 4);
}"""


def test_viewer_page_plays_whip_session_and_follows_restarts(
    server: LiveServer, page: Page, artifacts_dir: Path
) -> None:
    publisher = Publisher(server)
    try:
        first = publisher.start("?prompt=an%20oil%20painting")
        p = page.page
        p.goto(server.url + "/view/latest")
        wait_until(lambda: page.frames("window.livediffViewer.frames") >= 5, 45, "the viewer's first frames")
        wait_for_growth(page, "window.livediffViewer.frames", 5, 30, "viewer frames")
        assert server.api("GET", f"/api/sessions/{first}")["viewers"] == 1
        assert p.evaluate("document.getElementById('video').videoWidth") == 128  # the engine's output size
        assert p.evaluate(MEAN_LUMA) > 5  # a picture, not a black frame
        assert p.evaluate("window.livediffViewer.playout") in ("jitterBufferTarget=0", "playoutDelayHint=0")
        assert p.locator("#status").evaluate("e => getComputedStyle(e).opacity") == "0"
        page.screenshot(artifacts_dir / "page-viewer.png")

        # OBS stops: within a poll or two the viewer says it is waiting, clears the last frame and
        # does not claim to play while there is no session.
        publisher.delete()
        publisher.close()
        status = lambda: p.text_content("#status") or ""  # noqa: E731
        wait_until(lambda: status().startswith("waiting for a livediff session"), 6, "the viewer to see the end")
        for _ in range(10):
            assert status().startswith("waiting for a livediff session"), status()
            time.sleep(0.3)
        assert p.evaluate("document.getElementById('video').srcObject") is None

        # ... and starts streaming again: a new session; the viewer finds it by itself.
        second = publisher.start()
        assert second != first
        wait_until(lambda: page.frames("window.livediffViewer.connects") >= 2, 30, "the viewer to reconnect")
        wait_for_growth(page, "window.livediffViewer.frames", 5, 30, "frames of the new session")
        assert server.api("GET", f"/api/sessions/{second}")["viewers"] == 1
        assert page.errors == []
    finally:
        publisher.close()
        for session_id in session_ids(server):
            server.call(server.service.close_session(server.service.scheduler.sessions[session_id]))


# -- error paths ---------------------------------------------------------------------------------


def test_demo_page_server_busy(tiny_parts: Any, page: Page, artifacts_dir: Path) -> None:
    busy = start_server(tiny_parts, max_sessions=1)
    publisher = Publisher(busy)
    try:
        publisher.start()
        p = page.page
        p.goto(busy.url + "/")
        p.click("#start")
        notice = p.locator("#notice[data-notice='busy']")
        notice.wait_for(timeout=15_000)
        text = notice.text_content() or ""
        assert "busy" in text and "retry after 5 s" in text, text
        page.screenshot(artifacts_dir / "page-demo-busy.png")
        # The slot frees up: the page retries by itself when Retry-After has passed.
        publisher.delete()
        wait_until(lambda: p.text_content("#status") == "live", 20, "the automatic retry to connect")
        assert len(session_ids(busy)) == 1
        p.click("#stop")
    finally:
        publisher.close()
        busy.stop()


def test_demo_page_rejected_setting_names_the_field(server: LiveServer, page: Page, artifacts_dir: Path) -> None:
    """A 422 from POST /offer (a prompt over the server's 2000 characters) names the setting."""
    p = page.page
    p.goto(server.url + "/")
    p.fill("#prompt", "a" * 2100)
    p.click("#start-pattern")
    notice = p.locator("#notice[data-notice='invalid']")
    notice.wait_for(timeout=15_000)
    text = notice.text_content() or ""
    assert "rejected a setting (prompt)" in text and "longer than 2000" in text, text
    assert p.text_content("#status") == "error"
    assert not session_ids(server)
    page.screenshot(artifacts_dir / "page-demo-rejected-setting.png")


def test_demo_page_wrong_token_asks_for_token(tiny_parts: Any, page: Page, artifacts_dir: Path) -> None:
    secured = start_server(tiny_parts, token="s3cret-token")
    try:
        p = page.page
        p.goto(secured.url + "/?token=wrong")
        p.click("#start")
        notice = p.locator("#notice[data-notice='auth']")
        notice.wait_for(timeout=15_000)
        assert "refused" in (notice.text_content() or "")
        page.screenshot(artifacts_dir / "page-demo-auth.png")
        notice.locator("input[type=password]").fill("s3cret-token")
        notice.get_by_role("button", name="Save and connect").click()
        wait_until(lambda: p.text_content("#status") == "live", 30, "the connection with the right token")
        assert p.evaluate("localStorage.getItem('livediff.token')") == "s3cret-token"
        assert len(session_ids(secured)) == 1
        p.click("#stop")
        wait_until(lambda: not session_ids(secured), 10, "the session to close")
    finally:
        secured.stop()


PROBE_CASES = [(0, 320, 240), (1, 128, 128), (0xABCDEF, 256, 192), (0xFFFFFF, 97, 61), (123456, 400, 224)]


def test_probe_js_matches_python(server: LiveServer, page: Page) -> None:
    """web/js/probe.js paints what livediff.transport.probe reads, and reads what it paints."""
    import numpy as np

    from livediff.transport import probe

    p = page.page
    p.goto(server.url + "/latency")
    painted = p.evaluate(
        """async (cases) => {
      const m = await import('/web/js/probe.js');
      return cases.map(([id, w, h]) => {
        const ctx = Object.assign(document.createElement('canvas'), {width: w, height: h}).getContext('2d');
        ctx.fillStyle = '#808080'; ctx.fillRect(0, 0, w, h);
        m.paint(ctx, w, h, id);
        const rows = m.stripHeight(h);
        return {crc: m.crc8([id >> 16 & 255, id >> 8 & 255, id & 255]), rows,
                pixels: Array.from(ctx.getImageData(0, 0, w, rows).data)};
      });
    }""",
        PROBE_CASES,
    )
    rng = np.random.default_rng(0)
    for (frame_id, width, height), result in zip(PROBE_CASES, painted):
        assert result["crc"] == probe.crc8(frame_id.to_bytes(3, "big"))
        image = np.full((height, width, 3), 128, np.uint8)
        strip = np.array(result["pixels"], np.uint8).reshape(result["rows"], width, 4)[..., :3]
        image[: result["rows"]] = strip
        assert probe.read(image) == frame_id, (frame_id, width, height)

    # Python paints, compression-like noise is added, JS reads; a flipped bit or a flat strip reads as nothing.
    frames = []
    for frame_id, width, height in PROBE_CASES:
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        probe.paint(image, frame_id)
        noisy = np.clip(image.astype(np.int16) + rng.integers(-40, 41, image.shape), 0, 255).astype(np.uint8)
        frames.append((noisy, width, height))
    flipped = frames[0][0].copy()
    y0, y1, x0, x1 = probe._block(240, 320, 31)  # the CRC's last bit
    flipped[y0:y1, x0:x1] = 255 - flipped[y0:y1, x0:x1]
    frames.append((flipped, 320, 240))
    frames.append((np.zeros((240, 320, 3), np.uint8), 320, 240))

    def rgba(image: Any) -> list[int]:
        alpha = np.full(image.shape[:2] + (1,), 255, np.uint8)
        return np.concatenate([image, alpha], axis=2).ravel().tolist()

    read_back = p.evaluate(
        """async (frames) => {
      const m = await import('/web/js/probe.js');
      return frames.map(([pixels, w, h]) => m.read(Uint8ClampedArray.from(pixels), w, h));
    }""",
        [(rgba(image[: probe.ROWS * height // 16]), width, height) for image, width, height in frames],
    )
    expected = [probe.read(image) for image, _, _ in frames]
    assert expected == [frame_id for frame_id, _, _ in PROBE_CASES] + [None, None]
    assert read_back == expected


def test_pages_are_served(server: LiveServer, page: Page, artifacts_dir: Path) -> None:
    """Every page and asset loads with no failed request (a typo in an import path fails here)."""
    failed: list[str] = []
    page.page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    for path in ("/", "/latency", "/view/no-such-session"):
        page.page.goto(server.url + path)
        page.page.wait_for_load_state("networkidle")
    wait_until(
        lambda: "waiting for session no-such-session" in (page.page.text_content("#status") or ""),
        10,
        "the viewer to say what it waits for",
    )
    page.screenshot(artifacts_dir / "page-viewer-waiting.png")
    time.sleep(2.5)  # one more poll: waiting makes no failed requests
    assert failed == [] and page.errors == []
