"""The demo page's ControlNet section in a real headless Chromium against a real server with ControlNets:
on/off, which ControlNet and control image, scale, the server's word on loading, the control image view
and the HUD's preprocessor and ControlNet times."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.pages_support import LiveServer, start_server, wait_until
from tests.test_pages import Page, browser, page  # noqa: F401 - fixtures, used by name

pytestmark = [pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def server(tiny_parts: Any, browser: Any) -> Iterator[LiveServer]:  # noqa: F811 - the browser first: skip before starting
    live = start_server(tiny_parts, controlnets=(("edges", "tiny"), ("depth", "tiny")), depth_model="tiny")
    yield live
    live.stop()


def test_the_controlnet_section_turns_it_on_switches_and_shows_the_control_image(
    server: LiveServer,
    page: Page,  # noqa: F811 - the fixture imported above
    artifacts_dir: Path,
) -> None:
    p = page.page
    p.goto(server.url + "/")
    wait_until(lambda: p.is_visible("#controlnet-box"), 20, "the ControlNet section (the server has ControlNets)")
    assert p.eval_on_selector_all("#controlnet-name option", "os => os.map(o => o.value)") == ["edges", "depth"]
    assert p.eval_on_selector_all("#controlnet-image option", "os => os.map(o => o.value)") == [
        "canny", "depth", "previous"]  # fmt: skip
    p.click("#start-pattern")
    wait_until(lambda: p.evaluate("window.livediff.outputFrames") >= 3, 45, "the first output frames")
    (session_id,) = {s["id"] for s in server.sessions() if s["state"] != "closed"}
    url = f"/api/sessions/{session_id}"
    assert server.api("GET", url)["params"]["controlnet"] == []
    assert not p.is_visible("#controlnet-preview")

    # On: the first ControlNet with its own kind of image (edges has none: Canny, the first)
    p.check("#controlnet-on")
    wait_until(
        lambda: (
            server.api("GET", url)["params"]["controlnet"]
            == [{"name": "edges", "preprocessor": "canny", "scale": 1.0, "start": 0.0, "end": 1.0}]
        ),
        10,
        "ControlNet on",
    )
    wait_until(
        lambda: (
            "ready" in (p.text_content("#controlnet-state") or "")
            or (p.text_content("#controlnet-state") or "") == "Applied"
        ),
        60,
        "the page to say it is ready",
    )
    wait_until(lambda: p.evaluate("document.querySelector('#controlnet-preview').naturalWidth") > 0, 20,
               "the control image view")  # fmt: skip
    assert p.is_visible("#controlnet-preview")
    chip = p.locator(".hud .stat.controlnet")
    wait_until(lambda: chip.count() == 1 and "controlnet" in (chip.text_content() or ""), 20, "the HUD's chip")
    assert re.search(r"canny \d+\.\d ms · controlnet \d+\.\d ms", chip.text_content() or ""), chip.text_content()

    # The scale applies when the slider is let go
    p.fill("#controlnet-scale", "0.5")
    p.dispatch_event("#controlnet-scale", "change")
    wait_until(lambda: server.api("GET", url)["params"]["controlnet"][0]["scale"] == 0.5, 10, "the scale")
    assert p.text_content("#controlnet-scale-value") == "0.50"

    # Another ControlNet: named after the depth image, it takes that image; the depth model loads and says so
    p.select_option("#controlnet-name", "depth")
    wait_until(
        lambda: (
            server.api("GET", url)["params"]["controlnet"]
            == [{"name": "depth", "preprocessor": "depth", "scale": 0.5, "start": 0.0, "end": 1.0}]
        ),
        10,
        "the switch",
    )
    wait_until(lambda: server.api("GET", url)["controlnet_state"] == {"depth": "ready", "depth model": "ready"}, 60,
               "the depth ControlNet and model to load")  # fmt: skip
    wait_until(lambda: "depth" in (chip.text_content() or ""), 20, "the depth stage in the HUD")
    assert re.fullmatch(r"(depth|depth model) ready|Applied", p.text_content("#controlnet-state") or ""), \
        p.text_content("#controlnet-state")  # fmt: skip
    page.screenshot(artifacts_dir / "page-demo-controlnet.png", full_page=True)

    # Off: no ControlNet, no control image view
    p.uncheck("#controlnet-on")
    wait_until(lambda: server.api("GET", url)["params"]["controlnet"] == [], 10, "ControlNet off")
    assert not p.is_visible("#controlnet-preview")
    p.click("#stop")
    wait_until(lambda: p.text_content("#status") == "stopped", 10, "the page to stop")
    assert page.errors == []


def test_the_section_stays_hidden_on_a_server_without_controlnets(tiny_parts: Any, page: Page) -> None:  # noqa: F811
    plain = start_server(tiny_parts)
    try:
        p = page.page
        p.goto(plain.url + "/")
        wait_until(lambda: p.evaluate("window.livediff.state.server") is not None, 20, "the server's description")
        assert p.evaluate("window.livediff.state.server.controlnets") == []
        assert not p.is_visible("#controlnet-box")
        assert page.errors == []
    finally:
        plain.stop()
