"""A web app on another origin publishes with WHIP and plays with WHEP from Chromium (CORS, --cors-origins).

The app is a plain page served by a second HTTP server (`http://localhost:PORT`, another origin than
the livediff server's `http://127.0.0.1:PORT`): it sends its fake camera to `POST /whip` with a
bearer token, reads `Location`, `ETag`, `Link` and `Accept-Patch`, trickles with `PATCH` and
`If-Match`, plays the session's output through `POST /whep/{id}`, and ends both with `DELETE`.
"""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.pages_support import chromium, start_server

pytestmark = [pytest.mark.timeout(180)]

TOKEN = "cors-test-token"
APP = """<!doctype html><meta charset="utf-8"><title>embedded filter</title>
<video id="out" autoplay muted playsinline></video>
<script type="module">
const server = new URLSearchParams(location.search).get("server");
const auth = { Authorization: "Bearer %(token)s" };
window.result = { frames: 0 };
async function gathered(pc) {
  await pc.setLocalDescription(await pc.createOffer());
  if (pc.iceGatheringState !== "complete") {  // at most 2 s, as the livediff pages wait
    await new Promise((r) => { pc.addEventListener("icegatheringstatechange",
      () => pc.iceGatheringState === "complete" && r()); setTimeout(r, 2000); });
  }
  return pc.localDescription.sdp;
}
async function run() {
  const ice = await (await fetch(server + "/api/ice-servers", { headers: auth })).json();
  const camera = await navigator.mediaDevices.getUserMedia({ video: true });
  const pub = new RTCPeerConnection(ice);
  pub.addTransceiver(camera.getVideoTracks()[0], { direction: "sendonly" });
  const offer = await gathered(pub);
  const posted = await fetch(server + "/whip?prompt=embedded", { method: "POST", body: offer,
    headers: { ...auth, "Content-Type": "application/sdp" } });
  window.result.whip = { status: posted.status, location: posted.headers.get("Location"),
    etag: posted.headers.get("ETag"), link: posted.headers.get("Link") };
  await pub.setRemoteDescription({ type: "answer", sdp: await posted.text() });
  const resource = new URL(window.result.whip.location, server).href;
  const options = await fetch(resource, { method: "OPTIONS" });
  window.result.acceptPatch = options.headers.get("Accept-Patch");
  const patched = await fetch(resource, { method: "PATCH", body: "a=end-of-candidates\\r\\n",
    headers: { ...auth, "Content-Type": "application/trickle-ice-sdpfrag", "If-Match": window.result.whip.etag } });
  window.result.patch = patched.status;
  const sessionId = window.result.whip.location.split("/").pop();
  const view = new RTCPeerConnection(ice);
  view.addTransceiver("video", { direction: "recvonly" });
  view.addEventListener("track", (e) => {
    const video = document.getElementById("out");
    video.srcObject = new MediaStream([e.track]);
    const count = () => { window.result.frames += 1; video.requestVideoFrameCallback(count); };
    video.requestVideoFrameCallback(count);
  });
  const played = await fetch(server + "/whep/" + sessionId, { method: "POST", body: await gathered(view),
    headers: { ...auth, "Content-Type": "application/sdp" } });
  window.result.whep = { status: played.status, location: played.headers.get("Location") };
  await view.setRemoteDescription({ type: "answer", sdp: await played.text() });
  window.end = async () => {
    const viewer = await fetch(new URL(window.result.whep.location, server), { method: "DELETE", headers: auth });
    const session = await fetch(resource, { method: "DELETE", headers: auth });
    pub.close(); view.close();
    return [viewer.status, session.status];
  };
}
run().catch((e) => { window.result.error = String(e); });
</script>
"""


@pytest.fixture(scope="module")
def app_origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The web app, served from http://localhost:PORT (a second origin)."""
    folder = tmp_path_factory.mktemp("app")
    (folder / "index.html").write_text(APP % {"token": TOKEN})
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://localhost:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as launched:
        yield launched


def test_an_app_on_another_origin_publishes_and_plays(
    tiny_parts: Any, browser: Any, app_origin: str, artifacts_dir: Path
) -> None:
    server = start_server(tiny_parts, token=TOKEN, cors_origins=(app_origin,), ice_servers=("stun:127.0.0.1:9",))
    try:
        page = browser.new_page()
        page.goto(f"{app_origin}/index.html?server={server.url}")
        try:
            page.wait_for_function("window.result.frames >= 10 || window.result.error", timeout=60_000)
        finally:
            result = page.evaluate("window.result")
            print(result)
        assert "error" not in result, result
        assert result["whip"]["status"] == 201 and result["whip"]["location"].startswith("/whip/")
        assert result["whip"]["etag"] and 'rel="ice-server"' in result["whip"]["link"]
        assert result["acceptPatch"] == "application/trickle-ice-sdpfrag"
        assert result["patch"] == 204
        assert result["whep"]["status"] == 201
        page.screenshot(path=str(artifacts_dir / "cors-app.png"))
        assert page.evaluate("window.end()") == [200, 200]
        assert [s for s in server.sessions() if s["state"] != "closed"] == []
        page.close()
    finally:
        server.stop()


def test_an_origin_not_listed_is_refused(tiny_parts: Any, browser: Any, app_origin: str) -> None:
    server = start_server(tiny_parts, token=TOKEN, cors_origins=("https://someone-else.example",))
    try:
        page = browser.new_page()
        page.goto(f"{app_origin}/index.html?server={server.url}")
        page.wait_for_function("window.result.error", timeout=30_000)
        assert "Failed to fetch" in page.evaluate("window.result.error")  # the browser kept the answer from it
        assert server.sessions() == []
        page.close()
    finally:
        server.stop()
