"""Prometheus metrics on a per-app registry (never the global one: tests run many apps in one process)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from livediff.session import FrameOut, Session
from livediff.transport.loss_recovery import LossStats

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
LEVEL_BUCKETS = (0.5, 1, 2, 3, 5, 8, 12, 20, 30, 50, 85)
"""Temporal figures in levels of 255 (85: frames unrelated to each other)."""
SSIM_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0)


class _EngineCollector(Collector):
    """Values read at scrape time: conditioning cache counters and GPU state."""

    def __init__(self, engine: Callable[[], Any]) -> None:
        self._engine = engine

    def collect(self) -> Iterator[Any]:
        engine = self._engine()
        cache = CounterMetricFamily("livediff_conditioning_cache", "Prompt-embedding cache look-ups", labels=["result"])
        if engine is not None:
            cache.add_metric(["hit"], engine.conditioning.hits)
            cache.add_metric(["miss"], engine.conditioning.misses)
        yield cache
        yield from _gpu_metrics(engine)


def _gpu_metrics(engine: Any) -> Iterator[Any]:
    import torch

    if engine is None or engine.device.type != "cuda":
        return
    memory = GaugeMetricFamily("livediff_gpu_memory_bytes", "torch.cuda memory", labels=["kind"])
    memory.add_metric(["allocated"], torch.cuda.memory_allocated(engine.device))
    memory.add_metric(["reserved"], torch.cuda.memory_reserved(engine.device))
    yield memory
    try:
        utilisation = torch.cuda.utilization(engine.device)  # needs pynvml / nvidia-ml-py
    except (ModuleNotFoundError, RuntimeError):
        return
    yield GaugeMetricFamily("livediff_gpu_utilization_ratio", "GPU busy fraction (NVML)", value=utilisation / 100)


class _LossCollector(Collector):
    """Loss recovery on the publishers' video receivers, summed over every session since the start."""

    def __init__(self, totals: LossStats) -> None:
        self._totals = totals

    def collect(self) -> Iterator[Any]:
        t = self._totals
        for name, value, text in (
            ("livediff_rtp_packets_missed", t.packets_missed, "RTP packets seen missing (a sequence gap)"),
            ("livediff_rtp_packets_recovered", t.packets_recovered, "Missing RTP packets that came later"),
            ("livediff_rtp_packets_lost", t.packets_lost, "Missing RTP packets given up"),
            ("livediff_rtcp_nacks_sent", t.nacks_sent, "RTCP NACK messages sent"),
            ("livediff_rtcp_plis_sent", t.plis_sent, "RTCP PLIs sent"),
            ("livediff_rtcp_firs_sent", t.firs_sent, "RTCP FIRs sent"),
            ("livediff_input_frames_dropped_incomplete", t.frames_dropped_incomplete,
             "Input frames with a packet given up"),
            ("livediff_input_frames_dropped_undecodable", t.frames_dropped_undecodable,
             "Complete input frames dropped while waiting for a keyframe"),
            ("livediff_input_freezes", t.freeze_count, "Input freezes (W3C webrtc-stats freezeCount)"),
            ("livediff_input_freeze_seconds", t.freeze_s, "Input freeze time (W3C totalFreezesDuration)"),
        ):  # fmt: skip
            yield CounterMetricFamily(name, text, value=value)


class _StepTableCollector(Collector):
    """The step time per batch size measured at warm-up and the streams it holds at 30 fps (`livediff.deadline`)."""

    def __init__(self, steps: Callable[[], Any]) -> None:
        self._steps = steps

    def collect(self) -> Iterator[Any]:
        from livediff.deadline import REFERENCE_FPS

        table = self._steps()
        if table is None:
            return
        step = GaugeMetricFamily("livediff_step_seconds_by_batch", "Engine step time measured at warm-up",
                                 labels=["batch"])  # fmt: skip
        for batch, ms in sorted(table.step_ms.items()):
            step.add_metric([str(batch)], ms / 1000.0)
        yield step
        capacity = GaugeMetricFamily("livediff_capacity_streams", "Streams the engine holds at a camera rate, "
                                     "from the measured step times", labels=["fps"])  # fmt: skip
        capacity.add_metric([f"{REFERENCE_FPS:g}"], table.capacity(REFERENCE_FPS))
        yield capacity


class Metrics:
    def __init__(self, engine: Callable[[], Any] = lambda: None, steps: Callable[[], Any] = lambda: None) -> None:
        """`steps`: the scheduler's `StepTable` (None until measured)."""
        self.registry = CollectorRegistry()
        r = self.registry
        self.stage = Histogram(
            "livediff_stage_seconds",
            "Per-stage latency (queue: received to scheduled; "
            "engine stages per batch; worker: scheduled to output ready)",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.frame_age = Histogram(
            "livediff_frame_age_seconds",
            "Input frame received -> output handed to the encoder",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.frames = Counter("livediff_frames", "Frames by outcome", ["outcome"], registry=r)
        self.batch_size = Histogram("livediff_batch_size", "Frames per engine step", buckets=BATCH_BUCKETS, registry=r)
        self.sessions = Gauge("livediff_sessions", "Active publishing sessions", registry=r)
        self.viewers = Gauge("livediff_viewers", "Active WHEP viewers", registry=r)
        self.errors = Counter("livediff_http_errors", "Error answers by status", ["status"], registry=r)
        self.quality = {  # one observation per sampled frame pair of any session (livediff.server.quality)
            "warp_error": Histogram("livediff_quality_warp_error", "Warp error of sampled output frame pairs, "
                                    "levels of 255, at 128 px", buckets=LEVEL_BUCKETS, registry=r),
            "flicker": Histogram("livediff_quality_flicker", "Output change where the input stood still, "
                                 "sampled pairs, levels of 255, at 128 px", buckets=LEVEL_BUCKETS, registry=r),
            "ssim": Histogram("livediff_quality_ssim", "SSIM of sampled output frames against their input, at 128 px",
                              buckets=SSIM_BUCKETS, registry=r),
        }  # fmt: skip
        self.receiver_feedback = Counter(
            "livediff_output_receiver_feedback",
            "RTCP feedback on the output from its receivers (publishers and viewers): "
            "keyframe_request (PLI or FIR), nack (packets asked for again)",
            ["kind"],
            registry=r,
        )
        for kind in ("keyframe_request", "nack"):
            self.receiver_feedback.labels(kind)
        for outcome in ("received", "processed", "skipped", "dropped_in", "dropped_out", "sent"):
            self.frames.labels(outcome)
        r.register(_EngineCollector(engine))
        r.register(_StepTableCollector(steps))

    def on_receiver_feedback(self, kind: str) -> None:
        """One PLI/FIR ("keyframe_request") or NACKed packet ("nack") from a receiver of an output."""
        self.receiver_feedback.labels(kind).inc()

    def watch_loss(self, totals: LossStats) -> None:
        """Export `totals` (the publishers' loss-recovery counters) at every scrape."""
        self.registry.register(_LossCollector(totals))

    def on_step(self, outputs: list[tuple[Session, FrameOut]], dropped_out: int = 0) -> None:
        if not outputs:
            return
        first = outputs[0][1]
        if first.batch_size:  # an engine step (not passthrough frames sent as they came)
            self.batch_size.observe(first.batch_size)
            for stage, ms in first.stages_ms.items():
                self.stage.labels(stage).observe(ms / 1000.0)
            self.stage.labels("worker").observe(first.finished - first.scheduled)
        for _, out in outputs:
            self.stage.labels("queue").observe(out.scheduled - out.source.received)
            self.frames.labels("skipped" if out.skipped else "processed").inc()
        if dropped_out:
            self.frames.labels("dropped_out").inc(dropped_out)

    def on_quality(self, figures: dict[str, float]) -> None:
        """One sampled pair's figures (any thread); NaN figures (nothing to measure) are not observed."""
        for name, value in figures.items():
            if name in self.quality and value == value:
                self.quality[name].observe(value)

    def on_sent(self, out: FrameOut) -> float:
        age = time.monotonic() - out.source.received
        self.frame_age.observe(age)
        self.frames.labels("sent").inc()
        return age

    def render(self) -> bytes:
        return generate_latest(self.registry)
