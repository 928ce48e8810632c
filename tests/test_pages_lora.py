"""The demo page's LoRA section in a real headless Chromium against a real server with the built-in
random LoRAs: a slider per LoRA, the session's `loras` param following them live, the server's refusal
shown under the sliders, Reset, and no section on a server without LoRAs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.pages_support import LiveServer, start_server, wait_until
from tests.test_pages import Page, browser, page  # noqa: F401 - fixtures, used by name

pytestmark = [pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def server(tiny_parts: Any, browser: Any) -> Iterator[LiveServer]:  # noqa: F811 - the browser first: skip before starting
    live = start_server(tiny_parts, loras=(("ink", "tiny"), ("film", "random:8")))
    yield live
    live.stop()


def slide(p: Any, name: str, scale: float) -> None:
    """Moves LoRA `name`'s slider to `scale` as a drag does (the value, then an input event)."""
    selector = f'#lora-list .lora[data-name="{name}"] input'
    p.fill(selector, str(scale))
    p.dispatch_event(selector, "input")


def test_the_lora_section_applies_each_slider_live_and_shows_refusals(
    server: LiveServer,
    page: Page,  # noqa: F811 - the fixture imported above
    artifacts_dir: Path,
) -> None:
    p = page.page
    p.goto(server.url + "/")
    wait_until(lambda: p.is_visible("#lora-box"), 20, "the LoRA section (the server has LoRAs)")
    assert p.eval_on_selector_all("#lora-list .lora", "rows => rows.map(r => r.dataset.name)") == ["ink", "film"]
    assert p.eval_on_selector_all("#lora-list .lora output", "os => os.map(o => o.textContent)") == ["off", "off"]
    p.click("#start-pattern")
    wait_until(lambda: p.evaluate("window.livediff.outputFrames") >= 3, 45, "the first output frames")
    (session_id,) = {s["id"] for s in server.sessions() if s["state"] != "closed"}
    url = f"/api/sessions/{session_id}"
    assert server.api("GET", url)["params"]["loras"] == []

    slide(p, "ink", 1.5)
    wait_until(lambda: server.api("GET", url)["params"]["loras"] == [{"name": "ink", "scale": 1.5}], 10, "ink on")
    wait_until(lambda: p.text_content("#lora-state") == "Applied: ink 1.50", 10, "the page to say it applied")
    assert p.text_content('#lora-list .lora[data-name="ink"] output') == "1.50"
    slide(p, "film", -0.5)
    both = [{"name": "ink", "scale": 1.5}, {"name": "film", "scale": -0.5}]
    wait_until(lambda: server.api("GET", url)["params"]["loras"] == both, 10, "film on beside ink")
    frames = p.evaluate("window.livediff.outputFrames")
    wait_until(lambda: p.evaluate("window.livediff.outputFrames") >= frames + 3, 30, "frames with both LoRAs")
    page.screenshot(artifacts_dir / "page-demo-lora.png", full_page=True)

    # A LoRA the server does not have (as after a restart with other --lora): refused by field, the session
    # keeps its LoRAs, the page says why under the sliders
    p.evaluate("document.querySelector('#lora-list .lora[data-name=\"ink\"]').dataset.name = 'gone'")
    slide(p, "gone", 1.0)
    wait_until(lambda: "loras[0].name" in (p.text_content("#lora-state") or ""), 10, "the refusal under the sliders")
    assert p.get_attribute("#lora-state", "data-state") == "error"
    assert "ink, film" in (p.text_content("#lora-state") or "")  # the message lists the server's LoRAs
    assert server.api("GET", url)["params"]["loras"] == both

    # Reset: every slider back to 0, no LoRA
    p.click("#lora-reset")
    wait_until(lambda: server.api("GET", url)["params"]["loras"] == [], 10, "every LoRA off")
    wait_until(lambda: p.text_content("#lora-state") == "Off", 10, "the page to say off")
    assert p.eval_on_selector_all("#lora-list .lora output", "os => os.map(o => o.textContent)") == ["off", "off"]
    p.click("#stop")
    wait_until(lambda: p.text_content("#status") == "stopped", 10, "the page to stop")
    assert page.errors == []


def test_the_section_stays_hidden_on_a_server_without_loras(tiny_parts: Any, page: Page) -> None:  # noqa: F811
    plain = start_server(tiny_parts)
    try:
        p = page.page
        p.goto(plain.url + "/")
        wait_until(lambda: p.evaluate("window.livediff.state.server") is not None, 20, "the server's description")
        assert p.evaluate("window.livediff.state.server.loras") == []
        assert not p.is_visible("#lora-box")
        assert page.errors == []
    finally:
        plain.stop()
