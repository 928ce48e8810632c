"""The demo page's image-prompt section in a real headless Chromium against a real server with an
IP-Adapter: "use this frame", the scale slider, an upload, a refused upload named by its field, off."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.pages_support import LiveServer, start_server, wait_until
from tests.test_pages import Page, browser, page  # noqa: F401 - fixtures, used by name

pytestmark = [pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def server(tiny_parts: Any, browser: Any) -> Iterator[LiveServer]:  # noqa: F811 - the browser first: skip before starting
    import copy

    live = start_server(copy.deepcopy(tiny_parts), ip_adapter="tiny")
    yield live
    live.stop()


def test_the_image_prompt_section_uses_a_frame_an_upload_and_a_scale(
    server: LiveServer,
    page: Page,  # noqa: F811 - the fixture imported above
    artifacts_dir: Path,
) -> None:
    p = page.page
    p.goto(server.url + "/")
    wait_until(lambda: p.is_visible("#image-prompt-box"), 20, "the image-prompt section (the server has an IP-Adapter)")
    assert p.is_disabled("#image-prompt-frame")  # no session yet
    p.click("#start-pattern")
    wait_until(lambda: p.evaluate("window.livediff.outputFrames") >= 3, 45, "the first output frames")
    (session_id,) = {s["id"] for s in server.sessions() if s["state"] != "closed"}
    url = f"/api/sessions/{session_id}"
    assert server.api("GET", url)["params"]["image_prompt"] is None

    p.click("#image-prompt-frame")
    wait_until(lambda: server.api("GET", url)["params"]["image_prompt"] == {"image": "frame", "scale": 1.0}, 20,
               "the frame as the image prompt")  # fmt: skip
    wait_until(lambda: (p.text_content("#image-prompt-state") or "").startswith("This frame"), 20, "the ack shown")
    assert p.is_checked("#image-prompt-on")

    p.fill("#image-prompt-scale", "0.5")
    wait_until(lambda: server.api("GET", url)["params"]["image_prompt"] == {"image": "frame", "scale": 0.5}, 20,
               "the new scale")  # fmt: skip

    picture = io.BytesIO()
    Image.new("RGB", (48, 32), (30, 160, 220)).save(picture, format="PNG")
    p.set_input_files("#image-prompt-file", files=[{"name": "ref.png", "mimeType": "image/png",
                                                    "buffer": picture.getvalue()}])  # fmt: skip
    wait_until(lambda: server.api("GET", url)["params"]["image_prompt"] == {"image": "upload", "scale": 0.5}, 20,
               "the upload as the image prompt")  # fmt: skip
    wait_until(lambda: p.is_visible("#image-prompt-preview"), 10, "the uploaded picture shown")
    p.screenshot(path=str(artifacts_dir / "image-prompt-section.png"))

    p.set_input_files("#image-prompt-file", files=[{"name": "notes.png", "mimeType": "image/png",
                                                    "buffer": b"not a picture"}])  # fmt: skip
    wait_until(lambda: (p.text_content("#image-prompt-state") or "").startswith("image_prompt.image:"), 20,
               "the refusal named by its field")  # fmt: skip
    assert server.api("GET", url)["params"]["image_prompt"] == {"image": "upload", "scale": 0.5}  # kept
    frames = p.evaluate("window.livediff.outputFrames")
    wait_until(lambda: p.evaluate("window.livediff.outputFrames") >= frames + 3, 30, "frames after the refusal")

    p.uncheck("#image-prompt-on")
    wait_until(lambda: server.api("GET", url)["params"]["image_prompt"] is None, 20, "the image prompt off")
