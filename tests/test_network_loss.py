"""livediff on a lossy home uplink and downlink: freezes, frames back and glass-to-glass under packet loss.

The hosts are the network test bed's (tests/net/topology.py): `livediff serve` on the "internet",
an aiortc publisher on a laptop in a home LAN behind a NAT router. The router drops the laptop's
UDP packets with nftables (`numgen random`: 1% and 5% at random; `numgen inc`: a burst of 20
consecutive packets), on the uplink (laptop -> server: the camera's RTP, the output's RTCP) or on
the downlink (server -> laptop: the output's RTP, the camera's NACKs and PLIs). One session runs
through every case in turn; each case lasts `LIVEDIFF_LOSS_SECONDS` (15 s by default; 60 s for the
figures in docs/loss-recovery.md) and prints its figures:

* `longest_freeze_ms`: the longest gap between two output frames at the laptop, in the case;
* `frames_back`: output frames received / camera frames sent in the case (the server sends one
  output frame per input frame it processes; `vs_clean`: the same over the clean case's);
* `g2g_p50_ms`: glass-to-glass, the probe id painted in the camera frame read back in the output;
* the router's dropped packets, the server's loss-recovery counters (`/metrics`: its receiver of
  the camera) and the laptop's (its receiver of the output).

Assertions are generous (a loaded 2-core machine runs it): the output never stops for 5 s and
comes back at half the clean rate at least. The targets are benchmark figures, not asserted here.
The publisher and its receiver use livediff's loss recovery (`new_peer(marker_completion=True)`),
as the server does.

Needs root (namespaces, nftables); skipped elsewhere, a failure in CI (LIVEDIFF_REQUIRE_NETNS=1).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from aiortc import RTCSessionDescription

from livediff.server import tls
from livediff.transport import loss_recovery
from tests.net import netns, services, topology
from tests.net.clients import HostLoop, ProbeClock, https_session
from tests.pages_support import CHROMIUM, chromium_missing, skip_without, wait_until
from tests.server_fixtures import CameraTrack, Client, new_peer, prefer
from tests.test_network import BROWSER_ARGS, latency_run

SECONDS = float(os.environ.get("LIVEDIFF_LOSS_SECONDS", "15"))
STOCK = os.environ.get("LIVEDIFF_LOSS_STOCK") == "1"
"""The baseline for the figures: aiortc's own receivers, no loss recovery, on the server
(`--no-marker-completion`) and the laptop. The generous bounds are not asserted then."""
PORT = 8443
pytestmark = [
    pytest.mark.timeout(int(360 + 8 * (SECONDS + 4))),
    pytest.mark.slow,
]  # the server's start (first test), then seven loss cases of SECONDS each, per codec

RANDOM = "numgen random mod 100 < {}"
BURST = "numgen inc mod 1000000 < 20"
CASES: list[tuple[str, str | None, str | None]] = [
    ("clean", None, None),
    ("uplink 1%", RANDOM.format(1), None),
    ("uplink 5%", RANDOM.format(5), None),
    ("uplink burst of 20", BURST, None),
    ("downlink 1%", None, RANDOM.format(1)),
    ("downlink 5%", None, RANDOM.format(5)),
    ("downlink burst of 20", None, BURST),
]


@dataclass
class LossBed:
    hosts: topology.TestBed
    server: services.Program
    url: str
    certificate: tls.Certificate


@pytest.fixture(scope="module")
def loss_bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LossBed]:
    missing = netns.missing()
    if missing is not None:
        if os.environ.get("LIVEDIFF_REQUIRE_NETNS") == "1":
            pytest.fail(f"network tests need namespaces: {missing}")
        pytest.skip(missing)
    netns.sweep()
    hosts = topology.TestBed()
    hosts.build()
    program: services.Program | None = None
    try:
        state = tmp_path_factory.mktemp("loss") / "server"
        flags = ("--no-marker-completion",) if STOCK else ()
        program = services.start_livediff(hosts.server, topology.SERVER_IP, PORT, state, *flags)
        program.wait_for("livediff: ready", timeout=300)  # a bound for a loaded machine (load 20: over 150 s)
        certificate = tls.describe(state / "tls" / "cert.pem", state / "tls" / "key.pem")
        yield LossBed(hosts, program, f"https://{topology.SERVER_IP}:{PORT}", certificate)
    finally:
        if program is not None:
            program.stop()
        hosts.teardown()


async def _publish(url: str, cert: Any, camera: CameraTrack, codec: str) -> tuple[Client, Any]:
    """A WHIP publisher (sendrecv: it gets the output back) with loss recovery on its receiver."""
    http = https_session(cert)
    client = Client(pc=new_peer(marker_completion=not STOCK), camera=camera)
    prefer(client.pc.addTransceiver(camera, direction="sendrecv"), codec)
    client.receive_video()
    await client.pc.setLocalDescription(await client.pc.createOffer())
    async with http.post(
        url + "/whip?probe=1", data=client.pc.localDescription.sdp, headers={"Content-Type": "application/sdp"}
    ) as response:
        text = await response.text()
        assert response.status == 201, text
    await client.pc.setRemoteDescription(RTCSessionDescription(sdp=text, type="answer"))
    return client, http


async def _server_counters(http: Any, url: str) -> dict[str, float]:
    async with http.get(url + "/metrics") as response:
        text = await response.text()
    counters = {}
    for line in text.splitlines():
        if line.startswith(("livediff_rtp_", "livediff_rtcp_", "livediff_input_")) and "_total " in line:
            name, value = line.split()
            counters[name.removeprefix("livediff_").removesuffix("_total")] = float(value)
    return counters


def _case(
    bed: LossBed, home: HostLoop, http: Any, client: Client, camera: CameraTrack, clock: ProbeClock, case: tuple
) -> dict[str, Any]:
    name, uplink, downlink = case
    assert client.received is not None
    before = home.call(_server_counters(http, bed.url))
    client_before = loss_recovery.stats_of(client.pc).as_dict()
    bed.hosts.set_loss(uplink, downlink)
    start, frames_start, sent_start, g2g_start = (
        time.monotonic(),
        len(client.received.times),
        camera.index,
        len(clock.g2g_ms),
    )
    time.sleep(SECONDS)
    if uplink or downlink:
        # 1% of the 25-40 packets a second (docs/loss-recovery.md's 60 s cases: 22-33 dropped a minute;
        # fewer on a loaded machine, whose server sends back fewer frames: 4-6 in 15 s at load 11-13) leaves
        # a 15 s case with no drop once in a few hundred runs. Such a case tested nothing: it goes on
        # until the rule has dropped a packet (at most 3 x SECONDS more; `dropped > 0` below still fails).
        deadline = time.monotonic() + 3 * SECONDS
        while bed.hosts.dropped() == 0 and time.monotonic() < deadline:
            time.sleep(0.5)
    end, frames_end, sent_end = time.monotonic(), len(client.received.times), camera.index
    dropped = bed.hosts.dropped()
    bed.hosts.set_loss()
    after = home.call(_server_counters(http, bed.url))
    client_after = loss_recovery.stats_of(client.pc).as_dict()
    times = [start, *client.received.times[frames_start:frames_end], end]
    g2g = sorted(clock.g2g_ms[g2g_start:])
    return {
        "case": name,
        "seconds": end - start,
        "longest_freeze_ms": max(b - a for a, b in zip(times, times[1:])) * 1000.0,
        "frames_back": (frames_end - frames_start) / max(sent_end - sent_start, 1),
        "g2g_p50_ms": g2g[len(g2g) // 2] if g2g else float("nan"),
        "dropped": dropped,
        "server": {k: round(after[k] - before.get(k, 0.0), 3) for k in after if after[k] != before.get(k, 0.0)},
        "client": {k: round(v - client_before[k], 3) for k, v in client_after.items() if v != client_before[k]},
    }


@pytest.mark.parametrize("codec", ["VP8", "H264"])
def test_output_goes_on_through_random_and_burst_loss(loss_bed: LossBed, codec: str) -> None:
    home = HostLoop(loss_bed.hosts.home)
    camera = CameraTrack(width=320, height=240, fps=15, paint_probe=True)
    clock = ProbeClock(camera.sent_at)
    client, http = home.call(_publish(loss_bed.url, loss_bed.certificate.cert, camera, codec))
    try:
        wait_until(lambda: client.received is not None and len(client.received.times) >= 20, 60, "20 frames back")
        assert client.received is not None
        client.received.on_frame = clock.on_frame
        results = []
        for case in CASES:
            result = _case(loss_bed, home, http, client, camera, clock, case)
            results.append(result)
            clean = results[0]["frames_back"]
            print(
                f"\n[loss{' stock' if STOCK else ''}] {codec} {result['case']} over {result['seconds']:.0f} s: "
                f"longest freeze {result['longest_freeze_ms']:.0f} ms, frames back {result['frames_back']:.1%} "
                f"(vs clean {result['frames_back'] / max(clean, 1e-9):.1%}), g2g p50 {result['g2g_p50_ms']:.0f} ms, "
                f"router dropped {result['dropped']}, server {result['server']}, client {result['client']}",
                flush=True,
            )
            time.sleep(2)  # the next case starts on a clean stream
        clean = results[0]["frames_back"]
        assert all(r["dropped"] > 0 for r in results[1:]), results  # the rules did drop packets
        if STOCK:
            return
        for result in results:
            assert result["longest_freeze_ms"] < 5000, result
            assert result["frames_back"] >= 0.5 * clean, (result, clean)
    finally:
        loss_bed.hosts.set_loss()
        home.call(client.close())
        home.call(http.close())
        home.close()


@pytest.fixture(scope="module")
def chromium(loss_bed: LossBed) -> Iterator[Any]:
    """Chromium on the laptop in the home LAN, trusting the server's certificate."""
    skip_without(chromium_missing())
    from playwright.sync_api import sync_playwright

    with netns.entered(loss_bed.hosts.home):  # the driver and the browser it starts live in the home LAN
        playwright = sync_playwright().start()
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=[*BROWSER_ARGS, f"--ignore-certificate-errors-spki-list={loss_bed.certificate.spki_sha256}"],
        )
    yield browser
    browser.close()
    playwright.stop()


def test_chromium_latency_page_through_loss(loss_bed: LossBed, chromium: Any) -> None:
    """Chromium's camera (its own NACK/PLI handling as a sender and receiver) through the lossy router:
    the latency page's frames back and glass-to-glass per case, and the server's counters."""
    cases = [c for c in CASES if c[0] in ("clean", "uplink 1%", "uplink 5%", "uplink burst of 20", "downlink 5%")]
    seconds = min(int(SECONDS), 30)  # the latency page's run must end within latency_run's 60 s
    page = f"/latency?duration={seconds}&fps=15&resolution=320x240&mode=model"
    http_loop = HostLoop(loss_bed.hosts.home)
    http = http_loop.call(_make_session(loss_bed.certificate.cert))
    summaries = []
    try:
        for name, uplink, downlink in cases:
            before = http_loop.call(_server_counters(http, loss_bed.url))
            loss_bed.hosts.set_loss(uplink, downlink)
            summary = latency_run(chromium, loss_bed.url + page)
            dropped = loss_bed.hosts.dropped()
            loss_bed.hosts.set_loss()
            after = http_loop.call(_server_counters(http, loss_bed.url))
            server = {k: round(v - before.get(k, 0.0), 3) for k, v in after.items() if v != before.get(k, 0.0)}
            summaries.append((name, summary, dropped))
            print(
                f"\n[loss{' stock' if STOCK else ''}] chromium {name} over {seconds} s: frames back "
                f"{summary['received']}/{summary['sent']}, g2g p50 {summary['p50_ms']:.0f} ms, "
                f"router dropped {dropped}, server {server}",
                flush=True,
            )
        assert all(dropped > 0 for name, _, dropped in summaries[1:]), summaries
        if not STOCK:
            clean = summaries[0][1]["received"]
            assert all(s["received"] >= 0.5 * clean for _, s, _ in summaries), summaries
    finally:
        loss_bed.hosts.set_loss()
        http_loop.call(http.close())
        http_loop.close()


async def _make_session(cert: Any) -> Any:
    return https_session(cert)
