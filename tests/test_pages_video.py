"""The demo, latency and viewer pages in a real headless Chromium against a `--model tiny-video` server.

The video engine returns frames a chunk at a time (5, then 4), paced out at the camera's rhythm;
the pages must show its output, its stages (VAE encode, transformer, VAE decode) and how long a
chunk waited. Screenshots go to test-artifacts/.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.pages_support import LiveServer, Publisher, chromium, start_server, wait_until
from tests.test_pages import MEAN_LUMA, Page, session_ids, wait_for_growth

pytestmark = [pytest.mark.timeout(240)]

SIZE = 64
"""The engine's side: tiny-video keeps a 2-core machine's camera pace here."""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as launched:
        yield launched


@pytest.fixture(scope="module")
def server(browser: Any) -> Iterator[LiveServer]:  # the browser first: skip before loading the model
    from livediff.models.video import load_video_model

    threads = torch.get_num_threads()
    live = start_server(load_video_model("tiny-video"), size=SIZE, model="tiny-video")
    yield live
    live.stop()
    torch.set_num_threads(threads)  # the server sets its own (cores - 1)


@pytest.fixture()
def page(browser: Any) -> Iterator[Page]:
    opened = Page(browser)
    yield opened
    opened.context.close()


def close_all(server: LiveServer) -> None:
    for session_id in session_ids(server):
        server.call(server.service.close_session(server.service.scheduler.sessions[session_id]))


def test_demo_page_shows_a_video_models_frames_and_stages(server: LiveServer, page: Page, artifacts_dir: Path) -> None:
    p = page.page
    p.goto(server.url + "/")
    p.click("#start-pattern")
    try:
        wait_until(lambda: page.frames("window.livediff.outputFrames") >= 9, 90, "two chunks of output frames")
        assert p.text_content("#status") == "live"
        (session_id,) = session_ids(server)
        p.fill("#prompt", "a watercolour harbour")
        p.press("#prompt", "Enter")
        wait_until(
            lambda: server.api("GET", f"/api/sessions/{session_id}")["params"]["prompt"] == "a watercolour harbour",
            15,
            "the prompt to reach the server",
        )
        # The HUD's server bar: the video stages and the chunk's legs, not the image model's "wait".
        wait_until(lambda: "transformer" in (p.text_content("#hud .legend") or ""), 30, "the video stages in the HUD")
        legend = p.text_content("#hud .legend") or ""
        for leg in ("chunk fill", "chunk wait", "vae enc", "transformer", "vae dec", "paced out"):
            assert leg in legend, legend
        assert "wait " not in legend.replace("chunk wait ", ""), legend
        assert "tiny-video" in (p.text_content("#hud") or "")
        wait_for_growth(page, "window.livediff.outputFrames", 8, 60, "output frames after the prompt change")
        page.screenshot(artifacts_dir / "page-demo-video.png")
        p.click("#stop")
        wait_until(lambda: session_id not in session_ids(server), 15, "the session to close on the server")
        assert page.errors == []
    finally:
        close_all(server)


def test_latency_page_shows_chunk_latency(server: LiveServer, page: Page, artifacts_dir: Path) -> None:
    p = page.page
    p.goto(server.url + "/latency?duration=5&fps=10&resolution=320x240")
    p.click("#run")
    try:
        p.locator("#summary").wait_for(state="visible", timeout=120_000)
        assert p.text_content("#status") == "done"
        with p.expect_download() as download:
            p.click("#download-json")
        (run,) = json.loads(Path(download.value.path()).read_text())["runs"]
        summary, frames = run["summary"], run["frames"]
        assert summary["sent"] >= 40, summary  # 5 s at 10 fps
        # the frames of a chunk still collecting when the run ends (up to 4) are not shown
        assert summary["received"] >= summary["sent"] // 2, summary
        assert 0 < summary["p50_ms"] <= summary["p95_ms"] <= summary["max_ms"] < 10_000, summary
        shown = [f for f in frames if f["outcome"] == "displayed"]
        with_breakdown = [f for f in shown if "transformer_ms" in f]
        assert len(with_breakdown) >= 0.8 * len(shown), (len(with_breakdown), len(shown))
        for frame in with_breakdown:
            assert "wait_ms" not in frame and "unet_ms" not in frame, frame
            assert frame["chunk_wait_ms"] >= 0 and frame["chunk_fill_ms"] > -0.01, frame  # ms rounded to 3 places
            assert frame["encode_ms"] > 0 and frame["decode_ms"] > 0 and frame["paced_out_ms"] >= 0, frame
            spans = sum(
                v
                for k, v in frame.items()
                if k.endswith("_ms") and k not in ("sent_ms", "displayed_ms", "received_ms", "g2g_ms")
            )
            assert spans == pytest.approx(frame["g2g_ms"], abs=0.5), frame  # the legs add up to glass-to-glass
        # A chunk's first frame waits for the rest of its chunk (the camera's 100 ms per frame), its last does not.
        assert max(f["chunk_fill_ms"] for f in with_breakdown) >= 150, [f["chunk_fill_ms"] for f in with_breakdown]
        assert min(f["chunk_fill_ms"] for f in with_breakdown) < 50, [f["chunk_fill_ms"] for f in with_breakdown]
        table = p.text_content("#summary-table") or ""
        assert "chunk wait (mean)" in table and "chunk fill (mean)" in table, table
        p.evaluate("document.getElementById('summary').scrollIntoView()")
        page.screenshot(artifacts_dir / "page-latency-video.png", full_page=True)
        assert page.errors == []
    finally:
        close_all(server)


def test_viewer_page_plays_a_video_models_session(server: LiveServer, page: Page, artifacts_dir: Path) -> None:
    publisher = Publisher(server)
    try:
        session_id = publisher.start("?prompt=an%20oil%20painting&steps=2")
        p = page.page
        p.goto(server.url + "/view/latest")
        wait_until(lambda: page.frames("window.livediffViewer.frames") >= 9, 90, "the viewer's first two chunks")
        wait_for_growth(page, "window.livediffViewer.frames", 8, 60, "viewer frames")
        assert server.api("GET", f"/api/sessions/{session_id}")["viewers"] == 1
        assert p.evaluate("document.getElementById('video').videoWidth") == SIZE  # the engine's output size
        assert p.evaluate(MEAN_LUMA) > 5  # a picture, not a black frame
        page.screenshot(artifacts_dir / "page-viewer-video.png")
        publisher.delete()
        wait_until(
            lambda: (p.text_content("#status") or "").startswith("waiting for a livediff session"),
            15,
            "the viewer to see the session end",
        )
        assert page.errors == []
    finally:
        publisher.close()
        close_all(server)
