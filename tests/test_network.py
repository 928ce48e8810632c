"""livediff off localhost: real browsers and WHIP/WHEP clients on other hosts, behind NAT, through TURN.

The hosts are Linux network namespaces (tests/net/topology.py): `livediff serve` runs on a server
on the "internet" with https (its self-signed certificate), the browsers and an OBS-like publisher
on a laptop in a home LAN behind a masquerading NAT router, coturn on a TURN host, a WHEP viewer
on a third host, and a second server on a cloud VM whose interface is private behind a 1:1 NAT.
Every test prints its time to the first transformed frame (and glass-to-glass where a probe id
travels), so a CI log shows the figures.

Needs root (namespaces, nftables); skipped elsewhere with the reason, never skipped in CI
(LIVEDIFF_REQUIRE_NETNS=1 makes a missing capability a failure).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from livediff.server import tls
from tests.firefox_support import USER_ICE_PREFS, Firefox, firefox_missing
from tests.net import netns, services, topology
from tests.net.clients import HostLoop, ProbeClock, https_session
from tests.pages_support import CHROMIUM, CHROMIUM_ARGS, chromium_missing, skip_without, wait_until
from tests.server_fixtures import CameraTrack, Client, new_peer, prefer, replay_gathered, whep_view, whip_publish

pytestmark = [pytest.mark.timeout(420)]  # the first test also waits for the bed's three servers

PORT = 8443
TURN_SECRET = "test-bed-turn-secret"
TURN_URL = f"turn:{topology.TURN_IP}:3478?transport=udp"
# The browsers' own ICE behaviour, as users have it: no flag hiding or showing host addresses.
BROWSER_ARGS = [a for a in CHROMIUM_ARGS if not a.startswith("--disable-features=WebRtcHideLocalIpsWithMdns")]


def report(test: str, **figures: Any) -> None:
    """One line per figure set, in the test output (`-s`) and the CI log (pytest prints it on failure too)."""
    text = ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items())
    print(f"\n[network] {test}: {text}", flush=True)


@dataclass
class Server:
    program: services.Program
    url: str
    certificate: tls.Certificate


@dataclass
class Bed:
    topology: topology.TestBed
    server: Server
    misconfigured: Server
    """Same, but its TURN secret is not coturn's."""
    vm: Server
    """On the cloud VM behind 1:1 NAT, with --nat-1to1."""
    coturn: services.Program


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    missing = netns.missing()
    if missing is None and shutil.which("turnserver") is None:
        missing = "coturn is not installed (apt-get install coturn)"
    if missing is not None:
        if os.environ.get("LIVEDIFF_REQUIRE_NETNS") == "1":
            pytest.fail(f"network tests need namespaces: {missing}")
        pytest.skip(missing)
    netns.sweep()
    hosts = topology.TestBed()
    hosts.build()
    programs: list[services.Program] = []
    try:
        work = tmp_path_factory.mktemp("net")
        coturn = services.coturn(hosts.turn, topology.TURN_IP, TURN_SECRET, work / "turn")
        programs.append(coturn)
        turn_flags = ("--ice-servers", TURN_URL, "--turn-ttl", "600")
        starting = [  # started together, waited for together: each loads the model on its own
            (hosts.server, topology.SERVER_IP, work / "server", (*turn_flags, "--turn-secret", TURN_SECRET)),
            (hosts.server, topology.SERVER_IP, work / "wrong", (*turn_flags, "--turn-secret", "not-the-secret")),
            (hosts.vm, "0.0.0.0", work / "vm", ("--nat-1to1", topology.CLOUD_PUBLIC_IP)),
        ]
        servers = []
        for index, (ns, host, state, flags) in enumerate(starting):
            program = services.start_livediff(ns, host, PORT + index, state, *flags)
            programs.append(program)
        for index, (ns, host, state, _) in enumerate(starting):
            # three model loads at once: 10-20 s on a quiet machine, over 150 s at load 20
            programs[1 + index].wait_for("livediff: ready", timeout=300)
            public = topology.CLOUD_PUBLIC_IP if ns == hosts.vm else host
            certificate = tls.describe(state / "tls" / "cert.pem", state / "tls" / "key.pem")
            servers.append(Server(programs[1 + index], f"https://{public}:{PORT + index}", certificate))
        yield Bed(hosts, servers[0], servers[1], servers[2], coturn)
    finally:
        for program in programs:
            program.stop()
        hosts.teardown()


@pytest.fixture(autouse=True)
def programs_on_failure(request: pytest.FixtureRequest, bed: Bed) -> Iterator[None]:
    """When a test fails, print (into its report) whether each server and coturn still run, and
    their last lines: a failure here is as often the network's or a server's as the client's."""
    failed_before = request.session.testsfailed
    started = len(bed.server.program.lines), len(bed.vm.program.lines), len(bed.coturn.lines)
    yield
    if request.session.testsfailed == failed_before:
        return
    for program, since in zip((bed.server.program, bed.vm.program, bed.coturn), started):
        state = "running" if program.process.poll() is None else f"exited {program.process.returncode}"
        lines = program.lines[since:]
        print(f"--- {program.name} ({state}), its last lines of {len(lines)} during the test:")
        print("\n".join(lines[-150:]))  # a stalled loop's thread stacks run long
        if program.process.poll() is None and program is not bed.coturn:
            print(f"--- {program.name}: its threads\n{program.threads()}")


# -- browsers ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium(bed: Bed) -> Iterator[Any]:
    """Chromium on the laptop in the home LAN, trusting exactly the two servers' certificates."""
    skip_without(chromium_missing())
    from playwright.sync_api import sync_playwright

    pins = ",".join(s.certificate.spki_sha256 for s in (bed.server, bed.misconfigured))
    with netns.entered(bed.topology.home):  # the driver and the browser it starts live in the home LAN
        playwright = sync_playwright().start()
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=[*BROWSER_ARGS, f"--ignore-certificate-errors-spki-list={pins}"]
        )
    yield browser
    browser.close()
    playwright.stop()


def demo_page(browser: Any, url: str, source: str = "#start") -> tuple[Any, float]:
    """Open the demo page at `url`, press `source`; returns the page and seconds to its first output frame."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    assert page.evaluate("window.isSecureContext") is True
    page.wait_for_function("document.getElementById('start').disabled === false")
    started = time.monotonic()
    page.click(source)
    page.wait_for_function("window.livediff.outputFrames >= 1", timeout=45_000)
    first = time.monotonic() - started
    page.wait_for_function("window.livediff.outputFrames >= 10", timeout=30_000)
    assert errors == []
    return page, first


def latency_run(browser: Any, url: str) -> dict[str, Any]:
    """A 10 s run of the latency page at `url` (`/latency?...`); returns its summary (p50_ms ...)."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.goto(url)
    page.wait_for_function("document.getElementById('run').disabled === false")
    page.click("#run")
    page.locator("#summary").wait_for(state="visible", timeout=60_000)
    summary: dict[str, Any] = page.evaluate("window.livediffLatency.results[0].summary()")
    context.close()
    return summary


LATENCY = "/latency?duration=10&fps=10&resolution=320x240&mode=model"
SELECTED_PAIR = """async () => {
  const stats = await window.livediff.state.pc.getStats();
  let pair = null;
  stats.forEach((r) => {
    if (r.type === "transport" && r.selectedCandidatePairId) pair = stats.get(r.selectedCandidatePairId);
  });
  return pair && { local: stats.get(pair.localCandidateId).candidateType,
                   remote: stats.get(pair.remoteCandidateId).candidateType, rtt: pair.currentRoundTripTime };
}"""


def test_chromium_in_a_home_lan_uses_its_camera_over_https(bed: Bed, chromium: Any, artifacts_dir: Path) -> None:
    page, first = demo_page(chromium, bed.server.url + "/")
    pair = page.evaluate(SELECTED_PAIR)
    page.screenshot(path=str(artifacts_dir / "network-chromium-home.png"))
    page.context.close()
    assert pair["local"] != "relay"  # direct: the server's host candidate through the home NAT
    latency = latency_run(chromium, bed.server.url + LATENCY)
    report(
        "chromium, home LAN behind NAT, camera, https",
        first_frame_s=first,
        path=f"{pair['local']}->{pair['remote']}",
        g2g_p50_ms=latency["p50_ms"],
        received=f"{latency['received']}/{latency['sent']}",
    )


def test_chromium_relay_only_through_turn(bed: Bed, chromium: Any, artifacts_dir: Path) -> None:
    allocations = sum("ALLOCATE" in line for line in bed.coturn.lines)
    page, first = demo_page(chromium, bed.server.url + "/?ice=relay", source="#start-pattern")
    pair = page.evaluate(SELECTED_PAIR)
    page.context.close()
    assert pair["local"] == "relay"
    latency = latency_run(chromium, bed.server.url + LATENCY + "&ice=relay")
    report(
        "chromium, home LAN, relay only (coturn, short-lived credential)",
        first_frame_s=first,
        path=f"{pair['local']}->{pair['remote']}",
        g2g_p50_ms=latency["p50_ms"],
        received=f"{latency['received']}/{latency['sent']}",
    )
    assert sum("ALLOCATE" in line for line in bed.coturn.lines) > allocations, "coturn saw no allocation"


def test_relay_with_a_wrong_turn_secret_says_so(bed: Bed, chromium: Any, artifacts_dir: Path) -> None:
    context = chromium.new_context()
    page = context.new_page()
    page.goto(bed.misconfigured.url + "/?ice=relay")
    page.wait_for_function("document.getElementById('start').disabled === false")
    page.click("#start-pattern")
    notice = page.locator("#notice")
    notice.get_by_text("refused").wait_for(timeout=30_000)
    text = notice.inner_text()
    page.screenshot(path=str(artifacts_dir / "network-turn-refused.png"))
    context.close()
    assert topology.TURN_IP in text and "401" in text, text
    sessions = bed.misconfigured.program.lines
    assert not any("session " in line and "(offer)" in line for line in sessions), "no session for an unreachable peer"


def test_firefox_with_its_default_mdns_candidates(bed: Bed, artifacts_dir: Path) -> None:
    """Firefox as users have it, against a server with no STUN/TURN (the cloud VM): its offer's only
    candidates are `.local` names, ended by a=end-of-candidates."""
    skip_without(firefox_missing())
    with netns.entered(bed.topology.home):
        firefox = Firefox(prefs=USER_ICE_PREFS, accept_insecure_certs=True)
    try:
        firefox.goto(bed.vm.url + "/")
        assert firefox.js("return window.isSecureContext") is True
        started = time.monotonic()
        firefox.click("#start-pattern")  # no camera permission: Firefox hides its addresses behind mDNS names
        wait_until(lambda: firefox.js("return page.livediff.outputFrames") >= 1, 60, "Firefox's first output frame")
        first = time.monotonic() - started
        wait_until(lambda: firefox.js("return page.livediff.outputFrames") >= 10, 30, "ten output frames")
        offer = firefox.js("return page.livediff.state.pc.localDescription.sdp")
        firefox.screenshot(artifacts_dir / "network-firefox-home.png")
        candidates = [line for line in offer.splitlines() if line.startswith("a=candidate:")]
        assert candidates and all(".local " in line for line in candidates), candidates
        assert "a=end-of-candidates" in offer
        assert firefox.page_errors() == []
        firefox.goto(bed.vm.url + LATENCY)  # the latency page's canvas source: no camera, mDNS names again
        wait_until(lambda: firefox.js("return !document.getElementById('run').disabled"), 30, "the latency page")
        firefox.click("#run")
        summary = wait_until(
            lambda: firefox.js("return page.livediffLatency.results[0]?.summary() ?? null"),
            60,
            "the latency run's summary",
        )
        report(
            f"firefox {firefox.version}, home LAN, mDNS host candidates only, server on the 1:1 NAT VM",
            first_frame_s=first,
            g2g_p50_ms=summary["p50_ms"],
            received=f"{summary['received']}/{summary['sent']}",
        )
    finally:
        firefox.close()


# -- WHIP / WHEP and replayed offers ------------------------------------------------------------


def test_obs_like_whip_publisher_and_a_whep_viewer_elsewhere(bed: Bed) -> None:
    home, elsewhere = HostLoop(bed.topology.home), HostLoop(bed.topology.viewer)
    cert = bed.server.certificate.cert
    camera = CameraTrack(width=160, height=120, fps=15, paint_probe=True)
    clock = ProbeClock(camera.sent_at)

    async def publish() -> tuple[Client, Any]:
        http = https_session(cert)
        started = time.monotonic()
        client = await whip_publish(http, bed.server.url, camera=camera, query="?probe=1")  # H.264, no candidates
        return client, (http, started)

    async def view(session_id: str) -> tuple[Client, Any]:
        http = https_session(cert)
        return await whep_view(http, bed.server.url, session_id), http

    publisher, (publisher_http, started) = home.call(publish())
    viewer, viewer_http = elsewhere.call(view(publisher.session_id))
    try:
        wait_until(lambda: viewer.received is not None, 30, "the viewer's track")
        viewer.received.on_frame = clock.on_frame
        wait_until(lambda: len(clock.g2g_ms) >= 30, 60, "30 probe ids back at the viewer")
        assert publisher.pc.connectionState == "connected" and viewer.pc.connectionState == "connected"
        report(
            "OBS-like WHIP publisher (home LAN, H.264, no candidates) -> WHEP viewer (third host)",
            first_frame_s=(clock.first_at or 0) - started,
            g2g_p50_ms=clock.p50(),
            frames=len(clock.g2g_ms),
        )
    finally:
        home.call(publisher.close())
        elsewhere.call(viewer.close())
        home.call(publisher_http.close())
        elsewhere.call(viewer_http.close())
        home.close()
        elsewhere.close()


@pytest.mark.parametrize("mode", ["none", "mdns"])
def test_replayed_offers_cut_short_by_end_of_candidates_connect(bed: Bed, mode: str) -> None:
    """The offers of issue 11: no candidate + a=end-of-candidates; `.local` only + a=end-of-candidates."""
    home = HostLoop(bed.topology.home)
    camera = CameraTrack(width=160, height=120, fps=15, paint_probe=True)
    clock = ProbeClock(camera.sent_at)

    async def connect() -> tuple[Client, Any, float]:
        from aiortc import RTCSessionDescription

        http = https_session(bed.server.certificate.cert)
        client = Client(pc=new_peer(), camera=camera)
        prefer(client.pc.addTransceiver(camera, direction="sendrecv"), "VP8")
        client.receive_video()
        await client.pc.setLocalDescription(await client.pc.createOffer())
        offer = replay_gathered(client.pc.localDescription.sdp, mode)
        started = time.monotonic()
        body = {"sdp": offer, "type": "offer", "params": {"probe": True}}
        async with http.post(bed.server.url + "/offer", json=body) as response:
            assert response.status == 200, await response.text()
            answer = await response.json()
        assert "a=candidate:" in answer["sdp"]
        await client.pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))
        return client, http, started

    client, http, started = home.call(connect())
    try:
        wait_until(lambda: client.received is not None, 30, "the output track")
        client.received.on_frame = clock.on_frame
        wait_until(lambda: len(clock.g2g_ms) >= 20, 60, "20 probe ids back")
        report(
            f"replayed offer ({mode} + end-of-candidates), home LAN",
            first_frame_s=(clock.first_at or 0) - started,
            g2g_p50_ms=clock.p50(),
        )
    finally:
        home.call(client.close())
        home.call(http.close())
        home.close()


def test_server_behind_1to1_nat_advertises_its_public_address(bed: Bed) -> None:
    home = HostLoop(bed.topology.home)
    camera = CameraTrack(width=160, height=120, fps=15, paint_probe=True)
    clock = ProbeClock(camera.sent_at)

    async def publish() -> tuple[Client, Any, float]:
        http = https_session(bed.vm.certificate.cert)
        started = time.monotonic()
        client = await whip_publish(http, bed.vm.url, camera=camera, sendrecv=True, query="?probe=1", audio=False)
        return client, http, started

    client, http, started = home.call(publish())
    try:
        answer = client.pc.remoteDescription.sdp
        hosts = [line.split()[4] for line in answer.splitlines() if line.startswith("a=candidate:")]
        assert topology.CLOUD_PUBLIC_IP in hosts and topology.VM_IP not in hosts, hosts
        wait_until(lambda: client.received is not None, 30, "the output track")
        client.received.on_frame = clock.on_frame
        wait_until(lambda: len(clock.g2g_ms) >= 20, 60, "20 probe ids back")
        report(
            "cloud VM behind 1:1 NAT (--nat-1to1), publisher in home LAN",
            first_frame_s=(clock.first_at or 0) - started,
            g2g_p50_ms=clock.p50(),
        )
    finally:
        home.call(client.close())
        home.call(http.close())
        home.close()
