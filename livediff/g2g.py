"""`livediff bench --g2g`: glass-to-glass latency through a real server and a real aiortc client.

The server is `livediff serve` in a process of its own, as deployed, on 127.0.0.1 and an
ephemeral port with loopback ICE candidates only (`--ice-loopback`); the client, in this
process, is the demo page's (`livediff.transport.client`). The client sends moving frames at
`fps` with the probe id painted in (probe mode) and reads the ids back from the output frames.
Glass-to-glass for frame N is the time from the client's camera track handing frame N to its
sender (`recv()` returns) to the client's receiving track returning the decoded output frame
that carries id N. It includes encode, loopback, the server (decode, inbox, engine or
passthrough, outbox, encode) and decode again.

Each case is a fresh session: passthrough (`StreamParams.passthrough`: the engine returns the
input, the transport alone) or the model, with marker-bit frame completion on both peers, on the
server only, or on neither (stock aiortc, which completes a frame only when the next one starts).
One server process runs per server-side setting.

Counts, never guesses: `sent` frames left the camera inside the measurement window; `returned`
of them came back with their id; `missing` never did (dropped by the server's latest-only slots,
or unreadable); `received` output frames arrived in the window; `unread` of them had no valid id.
`drift_ms` (p50 of the window's last quarter minus its first) shows latency creeping up;
`outside_model_ms` is glass-to-glass less the engine's own time, frame by frame (what the service
adds to the model; the p50s of the two differ from it when the model's speed wanders), and
`drift_outside_model_ms` is its drift, so a model whose speed wanders (a busy CPU) is not mistaken
for frames piling up.
With `viewers` (e.g. 0,16; or 0,16,0,16 to take turns), each case runs once per count, with that
many WHEP viewers of the session's output (aiortc clients that receive and decode, in a process
of their own at the lowest CPU priority, so that on this one machine their decoding does not pass
for the server's cost):
`output_fps` is the rate of output frames the publisher got back in the window, `viewer_fps` the
viewers' mean, so the cost of viewers to the publisher shows as the drop of `output_fps`; every
case also reports `server_cpu`, the server process's CPU seconds per second in the window.
The server's stats messages split the round trip into `uplink_ms` (camera to the server's decoded
frame), `server_ms` (decoded frame to the server's encoder: inbox, engine, outbox) and
`downlink_ms` (to the client's decoded frame): both processes read the machine's one monotonic
clock (`time.monotonic()`), so their times subtract.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
import av
import numpy as np
from aiortc import RTCSessionDescription

from livediff.bench import percentiles
from livediff.config import VIDEO_CODECS, EngineSettings, ServerSettings, StreamParams
from livediff.engine.device import resolve_device
from livediff.errors import ConfigError, LivediffError
from livediff.models import resolve_auto
from livediff.synthetic import SyntheticCamera
from livediff.transport import probe
from livediff.transport.client import CameraTrack, Client, Received, new_peer, offer_client, prefer
from livediff.transport.frames import luma
from livediff.transport.loopback import free_port, loopback_candidates

log = logging.getLogger(__name__)

SCENE_SECONDS = 2.0
"""The camera plays this much pre-rendered video in a loop (rendering live would stall the loop)."""
FIRST_FRAME_S = 30.0
"""A case fails when no output frame with an id came back this long after connecting."""
CATCH_UP_S = 5.0
"""After the window, wait at most this long for its last frames to come back."""
SERVER_READY_S = 600.0
"""A server process gets this long to load its model (an ONNX export or TensorRT build included)."""


@dataclass(frozen=True)
class G2GCase:
    key: str
    model: bool
    """False: passthrough (no network runs); True: the engine's model."""
    client_marker: bool
    """Marker-bit frame completion on the client's receiver."""
    server_marker: bool
    """Marker-bit frame completion on the server's receiver (`ServerSettings.marker_completion`)."""

    @property
    def label(self) -> str:
        ends = {(True, True): "marker both ends", (False, True): "marker server only",
                (True, False): "marker client only", (False, False): "stock aiortc"}  # fmt: skip
        return f"{'model' if self.model else 'passthrough'}, {ends[self.client_marker, self.server_marker]}"


CASES = (
    G2GCase("pass-both", model=False, client_marker=True, server_marker=True),
    G2GCase("pass-server", model=False, client_marker=False, server_marker=True),
    G2GCase("pass-stock", model=False, client_marker=False, server_marker=False),
    G2GCase("model-both", model=True, client_marker=True, server_marker=True),
    G2GCase("model-stock", model=True, client_marker=False, server_marker=False),
)


@dataclass
class G2GPlan:
    duration_s: float = 10.0
    """Measurement window per case."""
    warmup_s: float = 1.5
    """From the first frame back to the window's start (connection setup, first keyframes)."""
    fps: float = 30.0
    codec: str = "VP8"
    params: StreamParams = field(default_factory=StreamParams)
    """The model cases' prompt, steps and strength."""
    cases: Sequence[G2GCase] = CASES
    viewers: Sequence[int] = (0,)
    """Each case runs once per count, with that many WHEP viewers of its session."""

    def __post_init__(self) -> None:
        if not 0 < self.duration_s <= 24 * 3600:
            raise ConfigError(f"duration must be in (0, 86400] s, got {self.duration_s}")
        if not 1 <= self.fps <= 120:
            raise ConfigError(f"fps must be in 1..120, got {self.fps}")
        if self.codec not in VIDEO_CODECS:
            raise ConfigError(f"codec must be one of {', '.join(VIDEO_CODECS)}, got {self.codec!r}")
        if not self.cases:
            raise ConfigError("no cases to run")
        if not self.viewers or any(not 0 <= n <= 64 for n in self.viewers):
            raise ConfigError(f"viewers must be counts in 0..64, got {list(self.viewers)}")


def summary(values: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99 and max in ms (NaN when there are no values)."""
    stats = percentiles(list(values))
    stats["max"] = round(max(values), 3) if values else float("nan")
    return stats


def drift(values: Sequence[float]) -> float:
    """The p50 of the last quarter of `values` minus the p50 of the first (NaN when empty)."""
    if not values:
        return float("nan")
    quarter = max(1, len(values) // 4)
    return round(float(np.median(values[-quarter:]) - np.median(values[:quarter])), 3)


@dataclass
class _Probe:
    """What the client read back from the output frames."""

    arrivals: dict[int, float] = field(default_factory=dict)
    """Frame id -> when its output first came back."""
    received: list[float] = field(default_factory=list)
    unread: list[float] = field(default_factory=list)

    def on_frame(self, frame: av.VideoFrame, now: float) -> None:
        self.received.append(now)
        frame_id = probe.read(luma(frame))
        if frame_id is None:
            self.unread.append(now)
        else:
            self.arrivals.setdefault(frame_id, now)


@asynccontextmanager
async def _server(
    http: aiohttp.ClientSession,
    engine: EngineSettings,
    settings: ServerSettings,
    ready_timeout_s: float = SERVER_READY_S,
) -> AsyncIterator[tuple[str, dict[str, Any], int]]:
    """`livediff serve` in its own process on 127.0.0.1; yields its URL, what /readyz says it runs, and its pid."""
    port = free_port()
    backend = "torch.compile" if engine.compile else engine.backend
    argv = [
        sys.executable, "-m", "livediff.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
        "--model", engine.model, "--vae", engine.vae, "--device", engine.device, "--dtype", engine.dtype,
        "--size", f"{engine.width}x{engine.height}", "--backend", backend, "--max-batch", str(engine.max_batch),
        "--engines-dir", str(engine.engines_dir), "--video-codecs", ",".join(settings.video_codecs),
        "--marker-completion" if settings.marker_completion else "--no-marker-completion", "--ice-loopback",
        "--fresh-frames" if settings.fresh_frames else "--no-fresh-frames",
    ]  # fmt: skip
    if engine.stream_batch:
        argv.append("--stream-batch")
    if engine.video_autoencoder != "auto":
        argv += ["--video-autoencoder", engine.video_autoencoder]
    if engine.video_weights:
        argv += ["--video-weights", engine.video_weights]
    if engine.video_autoencoder_weights != "auto":
        argv += ["--video-autoencoder-weights", engine.video_autoencoder_weights]
    video = engine.video
    argv += ["--video-sink", str(video.sink), "--video-window", str(video.window), "--video-shift", str(video.shift)]
    with tempfile.TemporaryFile() as output:
        process = await asyncio.create_subprocess_exec(*argv, stdout=output, stderr=asyncio.subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            yield url, await _wait_ready(http, url, process, output, ready_timeout_s), process.pid
        finally:
            if process.returncode is None:
                process.terminate()  # SIGTERM: the server closes its peers and exits
                try:
                    await asyncio.wait_for(process.wait(), 15)
                except asyncio.TimeoutError:
                    process.kill()
                    await process.wait()


async def _wait_ready(
    http: aiohttp.ClientSession, url: str, process: asyncio.subprocess.Process, output: Any, timeout_s: float
) -> dict[str, Any]:
    """The server's engine description once /readyz answers 200; a clear error if it dies or hangs."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process.returncode is not None:
            output.seek(0)
            tail = output.read().decode(errors="replace").strip().splitlines()[-8:]
            raise LivediffError(f"the server exited with {process.returncode} before it was ready:\n" + "\n".join(tail))
        try:
            async with http.get(url + "/readyz") as response:
                if response.status == 200:
                    return dict((await response.json())["engine"])
        except aiohttp.ClientConnectionError:
            pass  # not listening yet
        if time.monotonic() > deadline:
            raise LivediffError(f"the server was not ready in {timeout_s:g} s; try `livediff serve` with these flags")
        await asyncio.sleep(0.2)


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system) process `pid` has used so far, from /proc; None where there is no /proc."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)


def _session_params(case: G2GCase, params: StreamParams) -> dict[str, Any]:
    if not case.model:
        return {"probe": True, "passthrough": True}
    return {"probe": True, "passthrough": False, "prompt": params.prompt, "steps": params.steps,
            "strength": params.strength}  # fmt: skip


@dataclass
class _Run:
    """One case's raw observations."""

    camera: CameraTrack
    seen: _Probe
    messages: list[dict[str, Any]]
    server_stats: dict[str, Any]
    start: float
    end: float
    viewer_frames: list[int] = field(default_factory=list)
    """Frames each viewer got in the window."""
    server_cpu: float | None = None
    """The server process's CPU seconds per second in the window (1.0: one core busy)."""

    def window(self) -> list[int]:
        """Ids of the frames the camera sent inside the window, in order."""
        return sorted(i for i, t in self.camera.sent_at.items() if self.start <= t < self.end)


async def _view(http: aiohttp.ClientSession, url: str, session_id: str, codec: str) -> tuple[Client, Received]:
    """A WHEP viewer of the session's output (what an OBS browser source does), connected and receiving."""
    client = Client(pc=new_peer())
    prefer(client.pc.addTransceiver("video", direction="recvonly"), codec)
    received = Received(keep=0)
    client.receive_video(received)
    await client.pc.setLocalDescription(await client.pc.createOffer())
    async with http.post(
        f"{url}/whep/{session_id}", data=client.pc.localDescription.sdp, headers={"Content-Type": "application/sdp"}
    ) as response:
        answer = await response.text()
        if response.status != 201:
            await client.close()
            raise LivediffError(f"POST /whep/{session_id} answered {response.status}: {answer}")
    await client.pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
    await client.wait_connected()
    return client, received


async def _viewers_main(url: str, session_id: str, count: int, codec: str) -> None:
    """The viewers' process: connect `count` viewers, say "ready", read "START END" (monotonic seconds)
    from stdin, then print how many frames each viewer got between them (a JSON list) and end."""
    os.nice(19)  # viewers take what the server and the publisher leave of this machine
    with loopback_candidates():
        async with aiohttp.ClientSession() as http:
            viewers = [await _view(http, url, session_id, codec) for _ in range(count)]
            print("ready", flush=True)
            line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            start, end = (float(x) for x in line.split())
            await asyncio.sleep(max(0.0, end - time.monotonic()) + 0.5)
            print(json.dumps([sum(start <= t < end for t in got.times) for _, got in viewers]), flush=True)
            for client, _ in viewers:
                await client.close()


class _Viewers:
    """`count` WHEP viewers in a process of their own (`_viewers_main`), at the lowest CPU priority.

    On the bench's machine they would otherwise take CPU from the server: the publisher's frame
    rate would show the viewers' decoding, not what the server pays for them. They still receive
    and decode every frame they can, like an OBS browser source on another machine.
    """

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start(cls, url: str, session_id: str, count: int, codec: str) -> _Viewers:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "livediff.g2g",
            url,
            session_id,
            str(count),
            codec,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), FIRST_FRAME_S + count * 5)
        if line.strip() != b"ready":
            process.kill()
            raise LivediffError(f"the viewers' process did not start: {line.decode(errors='replace')!r}")
        return cls(process)

    async def frames(self, start: float, end: float) -> list[int]:
        """Frames each viewer got between `start` and `end` (monotonic seconds; returns after `end`)."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(f"{start} {end}\n".encode())
        await self.process.stdin.drain()
        line = await asyncio.wait_for(self.process.stdout.readline(), end - time.monotonic() + 30)
        return [int(n) for n in json.loads(line)]

    async def close(self) -> None:
        if self.process.returncode is None:
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except asyncio.TimeoutError:
                self.process.kill()
                await self.process.wait()


async def _run_case(
    http: aiohttp.ClientSession,
    url: str,
    case: G2GCase,
    plan: G2GPlan,
    width: int,
    height: int,
    scene: Sequence[np.ndarray],
    viewers: int = 0,
    server_pid: int | None = None,
) -> _Run:
    """One session: connect, warm up from the first frame back, measure `plan.duration_s`, catch up."""
    camera = CameraTrack(width, height, plan.fps, paint_probe=True, scene=scene)
    seen = _Probe()
    client = await offer_client(http, url, camera, params=_session_params(case, plan.params), codec=plan.codec,
                                received=Received(keep=0, on_frame=seen.on_frame),
                                marker_completion=case.client_marker)  # fmt: skip
    watchers: _Viewers | None = None
    try:
        await client.wait_connected()
        deadline = time.monotonic() + FIRST_FRAME_S
        while not seen.arrivals:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{case.key}: no frame id came back in {FIRST_FRAME_S:g} s")
            await asyncio.sleep(0.05)
        if viewers:
            watchers = await _Viewers.start(url, client.session_id, viewers, plan.codec)
        start = time.monotonic() + plan.warmup_s
        run = _Run(camera, seen, client.messages, {}, start, start + plan.duration_s)
        counted = asyncio.ensure_future(watchers.frames(run.start, run.end)) if watchers else None
        await asyncio.sleep(run.start - time.monotonic())
        cpu_start = cpu_seconds(server_pid) if server_pid is not None else None
        await asyncio.sleep(run.end - time.monotonic())
        cpu_end = cpu_seconds(server_pid) if server_pid is not None else None
        if counted is not None:
            run.viewer_frames = await counted
        if cpu_start is not None and cpu_end is not None:
            run.server_cpu = round((cpu_end - cpu_start) / plan.duration_s, 3)
        last = max(run.window(), default=-1)
        caught_up = time.monotonic() + CATCH_UP_S
        while max(seen.arrivals) <= last and time.monotonic() < caught_up:  # ids come back in order
            await asyncio.sleep(0.05)
        async with http.get(f"{url}/api/sessions/{client.session_id}") as response:
            run.server_stats = (await response.json())["stats"]
    finally:
        if watchers is not None:
            await watchers.close()
        await client.close()
    return run


def _case_report(case: G2GCase, run: _Run) -> dict[str, Any]:
    window = run.window()
    sent_at, arrivals = run.camera.sent_at, run.seen.arrivals
    g2g = [(arrivals[i] - sent_at[i]) * 1000.0 for i in window if i in arrivals]
    ids = set(window)
    stats = [m for m in run.messages if m.get("type") == "stats" and m["frame_id"] in ids]
    # glass-to-glass less the engine's own time, per frame the server reported: what could pile up
    outside_model = [(arrivals[m["frame_id"]] - sent_at[m["frame_id"]]) * 1000.0 - sum(m["stages_ms"].values())
                     for m in stats if m["frame_id"] in arrivals]  # fmt: skip
    in_window = lambda times: sum(run.start <= t < run.end for t in times)  # noqa: E731
    seconds = run.end - run.start
    return {
        "case": case.key,
        "label": case.label,
        **{k: v for k, v in asdict(case).items() if k != "key"},
        "viewers": len(run.viewer_frames),
        "output_fps": round(in_window(run.seen.received) / seconds, 2),
        "server_cpu": run.server_cpu,
        "viewer_fps": round(float(np.mean(run.viewer_frames)) / seconds, 2) if run.viewer_frames else None,
        "g2g_ms": summary(g2g),
        "drift_ms": drift(g2g),
        "drift_outside_model_ms": drift(outside_model),
        "frames": {
            "sent": len(window),
            "returned": len(g2g),
            "missing": len(window) - len(g2g),
            "received": in_window(run.seen.received),
            "unread": in_window(run.seen.unread),
        },
        # server and client read the machine's monotonic clock: the round trip splits into three legs
        "uplink_ms": summary([m["received_ms"] - sent_at[m["frame_id"]] * 1000.0 for m in stats]),
        "server_ms": summary([m["sent_ms"] - m["received_ms"] for m in stats]),
        "downlink_ms": summary(
            [(arrivals[m["frame_id"]] * 1000.0 - m["sent_ms"]) for m in stats if m["frame_id"] in arrivals]
        ),
        "model_ms": summary([sum(m["stages_ms"].values()) for m in stats if m["stages_ms"]]) if case.model else None,
        "outside_model_ms": summary(outside_model) if case.model else None,
        "server": run.server_stats,
    }


async def run_g2g(engine: EngineSettings, plan: G2GPlan, server: ServerSettings | None = None) -> dict[str, Any]:
    """Every case of `plan`, each on a fresh session; one server process per marker setting."""
    server = server or ServerSettings()
    engine = engine.replace(model=resolve_auto(engine.model, resolve_device(engine.device)))
    scene_frames = max(1, round(SCENE_SECONDS * plan.fps))
    scene = await asyncio.to_thread(SyntheticCamera(engine.height, engine.width).frames, scene_frames)
    settings = server.replace(video_codecs=(plan.codec,))
    load_before = os.getloadavg()
    results: dict[tuple[str, int, int], dict[str, Any]] = {}
    described: dict[str, Any] = {}
    with loopback_candidates():  # the client's peers; the server gathers loopback by --ice-loopback
        async with aiohttp.ClientSession() as http:
            for marker in dict.fromkeys(case.server_marker for case in plan.cases):
                async with _server(http, engine, settings.replace(marker_completion=marker)) as (url, described, pid):
                    for case in (c for c in plan.cases if c.server_marker == marker):
                        for turn, viewers in enumerate(plan.viewers):
                            log.info(
                                "g2g: %s, %d viewers (%.0f s)", case.label, viewers, plan.warmup_s + plan.duration_s
                            )
                            run = await _run_case(
                                http, url, case, plan, engine.width, engine.height, scene, viewers, pid
                            )
                            results[case.key, turn, viewers] = _case_report(case, run)
    return {
        "size": f"{engine.width}x{engine.height}",
        "fps": plan.fps,
        "codec": plan.codec,
        "duration_s": plan.duration_s,
        "model": f"{described['model']} ({described['revision']})",
        "backend": described["backend"],
        "device": described["device"],
        "server_threads": described["threads"],
        "load_average": {
            "before": [round(x, 2) for x in load_before],
            "after": [round(x, 2) for x in os.getloadavg()],
        },  # fmt: skip
        "cases": [results[case.key, turn, viewers] for case in plan.cases for turn, viewers in enumerate(plan.viewers)],
    }


def format_g2g(report: dict[str, Any]) -> str:
    """A human-readable table of `report` (milliseconds)."""
    load = report["load_average"]
    lines = [
        f"glass-to-glass: {report['size']} at {report['fps']:g} fps, {report['codec']}, "
        f"{report['duration_s']:g} s per case, model {report['model']}, {report['backend']} on {report['device']} "
        f"({report['server_threads']} threads), load average {load['before'][0]:.2f} -> {load['after'][0]:.2f}",
        "",
        f"{'case':<34}{'p50':>8}{'p95':>8}{'p99':>8}{'max':>8}{'drift':>7}"
        f"{'sent':>6}{'back':>6}{'miss':>6}{'recv':>6}{'unread':>7}{'srv drop':>9}"
        f"{'up p50':>8}{'server p50':>11}{'down p50':>9}{'model p50':>10}"
        f"{'viewers':>8}{'out fps':>8}{'view fps':>9}{'srv cpu':>8}",
    ]
    for case in report["cases"]:
        g, n, server = case["g2g_ms"], case["frames"], case["server"]
        model = f"{case['model_ms']['p50']:>10.1f}" if case["model_ms"] else f"{'-':>10}"
        view_fps = f"{case['viewer_fps']:>9.1f}" if case["viewer_fps"] is not None else f"{'-':>9}"
        lines.append(
            f"{case['label']:<34}{g['p50']:>8.1f}{g['p95']:>8.1f}{g['p99']:>8.1f}{g['max']:>8.1f}"
            f"{case['drift_ms']:>7.1f}{n['sent']:>6}{n['returned']:>6}{n['missing']:>6}{n['received']:>6}"
            f"{n['unread']:>7}{server['dropped_in'] + server['dropped_out']:>9}{case['uplink_ms']['p50']:>8.1f}"
            f"{case['server_ms']['p50']:>11.1f}{case['downlink_ms']['p50']:>9.1f}{model}"
            f"{case['viewers']:>8}{case['output_fps']:>8.1f}{view_fps}"
            f"{case['server_cpu'] if case['server_cpu'] is not None else '-':>8}"
        )
    lines.append(
        "(ms; drift: p50 of the last quarter minus the first; srv drop: the server's latest-only slots, "
        "whole session; srv cpu: the server process's CPU seconds per second)"
    )
    for case in report["cases"]:
        if case["model_ms"]:
            over = case["g2g_ms"]["p50"] - case["model_ms"]["p50"]
            lines.append(
                f"{case['label']}: glass-to-glass p50 is the model's p50 + {over:.1f} ms; per frame, "
                f"glass-to-glass less that frame's model time p50 {case['outside_model_ms']['p50']:.1f} ms; "
                f"drift outside the model {case['drift_outside_model_ms']:.1f} ms"
            )
    return "\n".join(lines)


if __name__ == "__main__":  # the viewers' process of `_Viewers`
    asyncio.run(_viewers_main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]))
