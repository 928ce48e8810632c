"""The streaming video-to-video engine: chunks of camera frames in, the transformed chunks out.

A causal video model (`livediff.models.video`) turns each stream's video chunk by chunk, carrying
the stream's past in its KV cache. One step, for one chunk of each of any number of streams:

1. preprocess: the chunk's uint8 frames to (B, T, 3, H, W) in [0, 1] on the device
2. encode: the streaming autoencoder turns each chunk (4 frames; a stream's first chunk 5) into
   latent frames (1; the first chunk 2), with each stream's own memories (`TaeState`)
3. noise: each stream's latents go to its first timestep, x = (1 - sigma) x0 + sigma * noise, with
   the stream's own noise generator (seeded by `seed`); with motion-aware noise
   (`motion_strength`) the chunk's strength, hence its first timestep, follows the camera's smoothed
   motion: less noise the more the input moves (StreamDiffusionV2's motion-aware noise controller,
   with the image engine's estimate, `livediff.engine.temporal.MotionEstimate`)
4. transformer: denoising steps of a flow-matching schedule (Wan's shifted sigmas,
   sigma' = shift * s / (1 + (shift - 1) s), s = t / 1000, the transformer conditioned on timestep
   1000 sigma', as Wan's scheduler and the causal checkpoints' samplers condition it; the few-step
   rule of CausVid and Self-Forcing: predict the clean latents x0 = x - sigma * flow, then noise them afresh to the
   next step's sigma). Step k runs every stream that has a step k in ONE transformer call, each row
   with its own timestep, prompt keys and values, positions and cache (padded and masked to the
   longest). After the last step a context pass at timestep 0 over the clean latents writes the
   chunk's keys and values into each stream's cache (what CausVid and Self-Forcing train with)
5. decode: latents back to frames with each stream's decoder memories
6. postprocess: (T, H, W, 3) uint8 on the host, one list per stream

With Stream Batch (`VideoSettings.stream_batch`, on by default; `livediff.engine.stream_batch`)
steps 4 and 5 change shape: each step adds every stream's new chunk at its first denoising step and
moves its chunks in flight one step on, all in one transformer call together with the context passes
of the chunks finished before; a chunk is decoded when it leaves, S - 1 steps later at S steps.

Streams whose first chunk this is (two latent frames) run their transformer calls apart from the
others (one latent frame): a call's rows share their token count. Everything that depends only on
a stream's params (the prompt's cross-attention keys and values) is computed when they change.
All per-stream state lives in `VideoStream`; the engine's modules hold weights only.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from livediff.config import MAX_STEPS, EngineSettings, StreamParams
from livediff.engine.clock import StageClock
from livediff.engine.device import resolve_device, resolve_video_dtype
from livediff.engine.kv_cache import KVCache
from livediff.engine.stream_batch import ChunkInFlight, StreamPipeline
from livediff.engine.temporal import MotionEstimate
from livediff.engine.video_fast import VideoBackend
from livediff.errors import ConfigError
from livediff.models.tae import SPACE_SCALE, TaeState
from livediff.models.video import VideoParts, load_video_model
from livediff.models.wan import CrossKV, Row

log = logging.getLogger(__name__)

VIDEO_CONTROLS = ("prompt", "blend_prompt", "strength", "steps", "seed", "motion_strength", "reset")
"""The live controls a video model takes (over REST and the data channel)."""
STAGES = ("preprocess", "encode", "transformer", "decode", "postprocess")
CHUNK_FRAMES = 4
"""Camera frames per chunk (one latent frame: the autoencoder's 4x temporal compression)."""
FIRST_CHUNK_FRAMES = 5
"""Camera frames of a stream's first chunk (two latent frames: the first stands for one frame)."""


VIDEO_BACKENDS = ("auto", "torch", "cuda-graph", "cuda-graph-compiled")
"""What runs a video model (`resolve_video_backend`); `--backend torch.compile` compiles on any device."""


def resolve_video_backend(name: str, device: torch.device | str | None = None) -> str:
    """The backend a video model runs on: `torch` (eager, or compiled with `EngineSettings.compile`)
    or `cuda-graph` (the transformer step recorded and replayed from CUDA graphs per batch layout)
    or `cuda-graph-compiled` (compiled by inductor, with its CUDA graphs): `livediff.engine.video_fast`.
    `auto` is `cuda-graph` on CUDA, `torch` elsewhere. A `ConfigError` naming the flag
    for the exported backends (ONNX Runtime, OpenVINO and TensorRT do not take this kind) and for
    `cuda-graph` without CUDA."""
    cuda = device is not None and torch.device(device).type == "cuda"
    if name not in VIDEO_BACKENDS:
        raise ConfigError(f"backend {name} does not run video models: use --backend torch (or auto)")
    if name == "auto":
        return "cuda-graph" if cuda else "torch"
    if name in ("cuda-graph", "cuda-graph-compiled"):
        if not cuda:
            raise ConfigError(f"backend {name} needs CUDA: use --backend torch (or auto) on a CPU")
        return name
    return "torch"


class PromptStates:
    """Text encoder states by prompt, least recently used dropped past `size`, with hit counts."""

    def __init__(self, encode: Callable[[str], torch.Tensor], size: int, device: torch.device,
                 dtype: torch.dtype) -> None:  # fmt: skip
        self._encode, self.size, self.device, self.dtype = encode, size, device, dtype
        self._states: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, prompt: str) -> torch.Tensor:
        """(1, text tokens, text_dim) states of `prompt`."""
        states = self._states.get(prompt)
        if states is None:
            self.misses += 1
            with torch.inference_mode():
                states = self._encode(prompt).to(self.device, self.dtype)
            self._states[prompt] = states
            while len(self._states) > self.size:
                self._states.popitem(last=False)
        else:
            self.hits += 1
        self._states.move_to_end(prompt)
        return states


@dataclass
class VideoStream:
    """Everything one stream carries between chunks. Created by `VideoEngine.open_stream`."""

    params: StreamParams
    cross: CrossKV
    """The prompt's cross-attention keys and values (computed once per prompt)."""
    cache: KVCache
    tae: TaeState
    """The autoencoder's memories (`TaeState`, or `WanVaeState` for the Wan VAE)."""
    generator: torch.Generator
    """The stream's noise (host generator, seeded by `params.seed`: the same run gives the same video)."""
    motion: MotionEstimate | None = None
    """Motion-aware noise: the smoothed motion of the input, when `params.motion_strength` is set."""
    strength: float | None = None
    """Motion-aware noise: the latest chunk's strength (None: `params.strength` applies)."""
    pipeline: StreamPipeline = field(default_factory=StreamPipeline)
    """Stream Batch: the stream's chunks in flight between engine steps."""
    chunks: int = 0
    frames: int = 0

    @property
    def timesteps(self) -> tuple[int, ...]:
        """The next chunk's denoising timesteps: the params', or those of the motion-aware strength."""
        if self.strength is None:
            return self.params.timesteps
        return self.params.timesteps_at(self.strength)

    @property
    def frames_needed(self) -> int:
        """Camera frames the next chunk takes: 5 for a stream's first chunk (or after a reset), else 4."""
        return FIRST_CHUNK_FRAMES if self.tae.encoded == 0 else CHUNK_FRAMES


@dataclass
class VideoStepResult:
    outputs: list[list[torch.Tensor]]
    """Per stream of the batch, in batch order, one (H, W, 3) uint8 host tensor per input frame."""
    skipped: list[bool]
    """Always False (no similarity filter for video)."""
    timings_ms: dict[str, float] = field(default_factory=dict)


class VideoEngine:
    """Causal video-to-video over chunks of any number of streams. Not thread-safe: one thread calls it."""

    chunked = True
    """The scheduler feeds this engine whole chunks (`VideoStream.frames_needed` frames)."""
    chunk_frames = (FIRST_CHUNK_FRAMES, CHUNK_FRAMES)
    """Camera frames of a stream's first chunk (and the first after a reset), and of every other."""

    def __init__(self, settings: EngineSettings, parts: VideoParts | None = None) -> None:
        self.device = resolve_device(settings.device)
        backend = resolve_video_backend(settings.backend, self.device)
        unit = SPACE_SCALE * 2  # the autoencoder's 8x, then the transformer's 2x2 patches
        for name in ("height", "width"):
            value = getattr(settings, name)
            if value % unit:
                raise ConfigError(f"{name} must be a multiple of {unit} for a video model (--size), got {value}")
        if settings.feature_bank or settings.controlnets:
            raise ConfigError("feature_bank and controlnets are image-model features; a video model has neither")
        if settings.lcm_lora:
            raise ConfigError("lcm_lora fuses into an SD-family UNet; a video model has none")
        settings = settings.replace(backend=backend)
        self.settings = settings
        self.video = settings.video
        if parts is None:
            dtype = resolve_video_dtype(settings.dtype, self.device)
            parts = load_video_model(settings.model, self.device, dtype, settings.video_autoencoder,
                                     settings.video_weights, settings.video_autoencoder_weights)  # fmt: skip
        self.parts = parts
        self.dtype = parts.dtype
        self.model = parts.transformer
        self.latent_size = (settings.height // SPACE_SCALE, settings.width // SPACE_SCALE)
        self.tokens_per_frame = self.model.tokens_per_frame(*self.latent_size)
        self.conditioning = PromptStates(parts.encode_prompt, settings.cache_size, self.device, self.dtype)
        self.backend = VideoBackend.build(self.model, backend, settings.compile, self.device)
        self.fast = self.backend.forward
        self.frame_shape = (settings.height, settings.width, 3)
        weights = f" ({parts.autoencoder_weights} weights)" if parts.autoencoder_weights else ""
        log.info("video engine: model %s (%s), %s %s, %dx%d, autoencoder %s%s, cache %d sink + %d window latent frames",
                 parts.ref, parts.revision, self.device, self.dtype, settings.width, settings.height,
                 parts.autoencoder_name, weights, self.video.sink, self.video.window)  # fmt: skip

    # -- streams ---------------------------------------------------------------------------------

    def check_params(self, params: StreamParams, current: StreamParams | None = None) -> None:
        """`ConfigError` naming the field for what a video model cannot do: ControlNets, the feature
        bank, classifier-free guidance, the similarity filter, image prompts."""
        if params.controlnet:
            raise ConfigError("controlnet is not available: a video model has no ControlNet")
        if params.temporal_bank:
            raise ConfigError("temporal_bank is not available: a video model keeps its past in its KV cache")
        if params.guidance > 1.0:
            raise ConfigError("guidance must be <= 1: video models run without classifier-free guidance")
        if params.similarity_filter:
            raise ConfigError("similarity_filter is not available for video models")
        if params.image_prompt is not None:
            raise ConfigError("image_prompt is not available: video models take no IP-Adapter")

    def open_stream(self, params: StreamParams | None = None) -> VideoStream:
        """A new stream with `params` (`ConfigError` naming the field when this engine cannot serve them)."""
        params = params or StreamParams()
        self.check_params(params)
        model = self.model
        cache = KVCache(model.layers, self.tokens_per_frame, model.heads, model.head_dim, self.video.sink,
                        self.video.window, self.video.position_limit, self.device, self.dtype)  # fmt: skip
        generator = torch.Generator().manual_seed(params.seed)
        motion = MotionEstimate() if params.motion_strength else None
        return VideoStream(params, self._cross(params), cache, self.parts.autoencoder.new_state(), generator, motion)

    def update(self, stream: VideoStream, params: StreamParams) -> None:
        """New params from the next chunk on: a new prompt's keys and values, a new seed's noise."""
        self.check_params(params, stream.params)
        old, stream.params = stream.params, params

        def prompt(p: StreamParams) -> tuple[str, str, float]:
            return p.prompt, p.blend_prompt, p.blend_weight

        if prompt(params) != prompt(old):
            stream.cross = self._cross(params)
        if params.seed != old.seed:
            stream.generator = torch.Generator().manual_seed(params.seed)
        if params.motion_strength is None:
            stream.motion, stream.strength = None, None
        elif stream.motion is None:
            stream.motion = MotionEstimate()

    def reset(self, stream: VideoStream) -> None:
        """Forget the stream's past (a scene cut): empty cache and autoencoder memories; the next
        chunk is a first chunk again (5 frames) and the noise starts over from the seed: the stream
        goes on as a new one would."""
        stream.cache.reset()
        stream.tae.reset()
        stream.pipeline.clear()
        stream.generator = torch.Generator().manual_seed(stream.params.seed)

    def control_loads(self, params: StreamParams) -> dict[str, Any]:
        """No ControlNet loads ever wait (a video model has none; `check_params` refuses them)."""
        return {}

    def close(self) -> None:
        """Nothing queued to drop (the protocol's `close`)."""

    def _cross(self, params: StreamParams) -> CrossKV:
        states = self.conditioning.get(params.prompt)
        if params.blend_prompt and params.blend_weight > 0:
            states = torch.lerp(states, self.conditioning.get(params.blend_prompt), params.blend_weight)
        with torch.inference_mode():
            return self.model.cross_kv(states)

    # -- the step --------------------------------------------------------------------------------

    def sigma(self, timestep: float) -> float:
        """Wan's shifted flow-matching sigma of a timestep in [0, 1000]."""
        s, shift = timestep / 1000.0, self.video.shift
        return shift * s / (1 + (shift - 1) * s)

    @staticmethod
    def model_timestep(sigma: float) -> float:
        """The timestep the transformer is conditioned on at noise level `sigma`: 1000 sigma, the
        shifted value. Wan 2.1's flow-matching scheduler hands its model `sigmas * 1000`, and
        Self-Forcing's and StreamDiffusionV2's samplers look the noise level of a timestep up in such
        a table (timestep t is noise level t / 1000, after their optional warp by the shift): causal
        weights are trained at these timesteps."""
        return 1000.0 * sigma

    @torch.inference_mode()
    def step(self, batch: list[tuple[VideoStream, list[torch.Tensor]]]) -> VideoStepResult:
        """One chunk per stream: `frames_needed` (H, W, 3) uint8 frames each -> as many output frames.

        `ValueError` when a chunk has the wrong number of frames or frame size."""
        for stream, frames in batch:
            if len(frames) != stream.frames_needed:
                raise ValueError(f"a chunk of this stream takes {stream.frames_needed} frames, got {len(frames)}")
            if any(tuple(f.shape) != self.frame_shape for f in frames):
                raise ValueError(f"frames must be {self.frame_shape} uint8")
        for stream, frames in batch:  # motion-aware noise: this chunk's strength from the input's motion
            if stream.motion is not None and stream.params.motion_strength is not None:
                for frame in frames:
                    stream.motion.observe(frame)
                stream.strength = stream.motion.strength(*stream.params.motion_strength)
        clock = StageClock(self.device)
        if self.video.stream_batch:
            outputs = self._stream_batch(batch, clock)
            for stream, frames in zip((s for s, _ in batch), outputs):
                stream.chunks += 1
                stream.frames += len(frames)
            return VideoStepResult(outputs, [False] * len(batch), clock.durations_ms())
        outputs = [[] for _ in batch]
        groups: dict[int, list[int]] = {}
        for i, (stream, _) in enumerate(batch):
            groups.setdefault(stream.frames_needed, []).append(i)
        for members in groups.values():
            for i, frames in zip(members, self._run([batch[i][0] for i in members], [batch[i][1] for i in members],
                                                    clock)):  # fmt: skip
                outputs[i] = frames
        for stream, frames in batch:
            stream.chunks += 1
            stream.frames += len(frames)
        return VideoStepResult(outputs, [False] * len(batch), clock.durations_ms())

    def _run(self, streams: list[VideoStream], chunks: list[list[torch.Tensor]],
             clock: StageClock) -> list[list[torch.Tensor]]:  # fmt: skip
        """Steps 1-6 for streams whose chunks have the same length."""
        pixels = torch.stack([torch.stack(frames) for frames in chunks]).to(self.device, non_blocking=True)
        pixels = pixels.permute(0, 1, 4, 2, 3).to(self.dtype).div_(255.0)  # (B, T, 3, H, W)
        clock.mark("preprocess")
        autoencoder = self.parts.autoencoder
        x0 = autoencoder.encode(pixels, [s.tae for s in streams]).transpose(1, 2)  # (B, C, F, h, w)
        clock.mark("encode")
        latent_frames = x0.shape[2]
        positions = [s.cache.reserve(latent_frames, self.model.rope) for s in streams]
        timesteps = [s.timesteps for s in streams]
        noise = [self._noise(s, x0.shape[1:]) for s in streams]
        sigmas = [[self.sigma(t) for t in ts] for ts in timesteps]
        x = torch.stack([(1 - sig[0]) * x0[b] + sig[0] * noise[b] for b, sig in enumerate(sigmas)])
        denoised = x0.clone()
        for k in range(max(len(ts) for ts in timesteps)):
            active = [b for b, ts in enumerate(timesteps) if len(ts) > k]
            rows = [self._row(streams[b], positions[b]) for b in active]
            t = torch.tensor([self.model_timestep(sigmas[b][k]) for b in active], device=self.device)
            flow, _ = self.model.forward_chunk(x[active], t, rows, dense=self.fast)
            for j, b in enumerate(active):
                denoised[b] = x[b] - sigmas[b][k] * flow[j].to(x.dtype)
                if k + 1 < len(timesteps[b]):
                    fresh = self._noise(streams[b], x0.shape[1:])
                    x[b] = (1 - sigmas[b][k + 1]) * denoised[b] + sigmas[b][k + 1] * fresh
        # the context pass: the clean chunk's keys and values at timestep 0 go into each cache
        rows = [self._row(s, p) for s, p in zip(streams, positions)]
        zeros = torch.zeros(len(streams), device=self.device)
        _, kept = self.model.forward_chunk(denoised, zeros, rows, keep=True, dense=self.fast)
        for b, stream in enumerate(streams):
            stream.cache.append([(k[b], v[b]) for k, v in kept], positions[b])
        clock.mark("transformer")
        decoded = autoencoder.decode(denoised.transpose(1, 2), [s.tae for s in streams])  # (B, T, 3, H, W)
        clock.mark("decode")
        frames = decoded.mul(255.0).round_().to(torch.uint8).permute(0, 1, 3, 4, 2).to("cpu")
        clock.mark("postprocess")
        return [list(row.unbind(0)) for row in frames]

    def _stream_batch(self, batch: list[tuple[VideoStream, list[torch.Tensor]]],
                      clock: StageClock) -> list[list[torch.Tensor]]:  # fmt: skip
        """Stream Batch (`livediff.engine.stream_batch`): each stream's new chunk enters at its first
        step and every chunk in flight moves one step on, all streams' rows in one transformer call
        per latent-frame count (a first chunk has 2, the others 1); rows of chunks finished before
        run their context pass in the same call. Returns per stream the frames of the chunks that
        left (none while its queue fills)."""
        streams = [s for s, _ in batch]
        autoencoder = self.parts.autoencoder
        groups: dict[int, list[int]] = {}
        for i, stream in enumerate(streams):
            groups.setdefault(stream.frames_needed, []).append(i)
        entered: dict[int, torch.Tensor] = {}
        pixels_by_group = []
        for members in groups.values():
            pixels = torch.stack([torch.stack(batch[i][1]) for i in members]).to(self.device, non_blocking=True)
            pixels_by_group.append((members, pixels.permute(0, 1, 4, 2, 3).to(self.dtype).div_(255.0)))
        clock.mark("preprocess")
        for members, pixels in pixels_by_group:
            x0 = autoencoder.encode(pixels, [streams[i].tae for i in members]).transpose(1, 2)  # (B, C, F, h, w)
            for j, i in enumerate(members):
                entered[i] = x0[j]
        clock.mark("encode")
        for i, stream in enumerate(streams):  # the new chunk at its first timestep
            x0 = entered[i]
            positions, offset = stream.cache.reserve_ahead(x0.shape[1], self.model.rope)
            stream.pipeline.shift(offset)
            timesteps = stream.timesteps
            sigmas = tuple(self.sigma(t) for t in timesteps)
            x = (1 - sigmas[0]) * x0 + sigmas[0] * self._noise(stream, x0.shape)
            fresh = [self._noise(stream, x0.shape) for _ in timesteps[1:]]
            stream.pipeline.in_flight.append(ChunkInFlight(x, timesteps, sigmas, positions, fresh))
        # rows: each stream's finished chunks (context pass, t = 0), then its chunks in flight, oldest first
        rows_by_frames: dict[int, list[tuple[VideoStream, ChunkInFlight, bool]]] = {}
        for stream in streams:
            for chunk in stream.pipeline.finished:
                rows_by_frames.setdefault(chunk.latent_frames, []).append((stream, chunk, True))
            for chunk in (c for c in stream.pipeline.in_flight if not c.done):  # (a done one waits for older ones)
                rows_by_frames.setdefault(chunk.latent_frames, []).append((stream, chunk, False))
        for frames in sorted(rows_by_frames, reverse=True):  # a first chunk's context pass before the others'
            self._stream_batch_call(rows_by_frames[frames])
        clock.mark("transformer")
        leaving = [stream.pipeline.leave() for stream in streams]
        outputs: list[list[torch.Tensor]] = [[] for _ in streams]
        decode_groups: dict[tuple[int, bool], list[int]] = {}  # rows of one decode give as many frames
        for i, chunks in enumerate(leaving):
            if chunks:
                key = (sum(c.latent_frames for c in chunks), streams[i].tae.decoded == 0)
                decode_groups.setdefault(key, []).append(i)
        decoded_by_group = []
        for members in decode_groups.values():
            latents = torch.stack([torch.cat([c.x for c in leaving[i]], dim=1) for i in members])
            decoded = autoencoder.decode(latents.transpose(1, 2), [streams[i].tae for i in members])
            decoded_by_group.append((members, decoded))
        clock.mark("decode")
        for members, decoded in decoded_by_group:
            frames_out = decoded.mul(255.0).round_().to(torch.uint8).permute(0, 1, 3, 4, 2).to("cpu")
            for j, i in enumerate(members):
                outputs[i] = list(frames_out[j].unbind(0))
        clock.mark("postprocess")
        return outputs

    def _stream_batch_call(self, entries: list[tuple[VideoStream, ChunkInFlight, bool]]) -> None:
        """One transformer call over rows of the same latent-frame count: context rows (True) cache
        their chunk's keys and values after the call; the others take one denoising step."""
        index: dict[int, list[int]] = {}  # a stream's context rows in this call, by id(stream)
        rows = []
        for r, (stream, chunk, context) in enumerate(entries):
            before = index.setdefault(id(stream), [])
            extra_frames = len(before) * chunk.latent_frames
            layers = [stream.cache.seen(i, extra_frames) for i in range(self.model.layers)]
            rows.append(Row(stream.cross, tuple(k for k, _ in layers), tuple(v for _, v in layers), chunk.positions,
                            tuple(before)))  # fmt: skip
            if context:
                before.append(r)
        x = torch.stack([chunk.x for _, chunk, _ in entries])
        t = torch.tensor([0.0 if context else self.model_timestep(chunk.sigmas[chunk.step])
                          for _, chunk, context in entries], device=self.device)  # fmt: skip
        keep = any(context for _, _, context in entries)
        flow, kept = self.model.forward_chunk(x, t, rows, keep=keep, dense=self.fast)
        for r, (stream, chunk, context) in enumerate(entries):
            if context:
                stream.cache.append([(k[r], v[r]) for k, v in kept], chunk.positions)
                stream.pipeline.finished.remove(chunk)
                continue
            sigma = chunk.sigmas[chunk.step]
            chunk.x = chunk.x - sigma * flow[r].to(chunk.x.dtype)  # the clean prediction
            chunk.step += 1
            if not chunk.done:
                nxt = chunk.sigmas[chunk.step]
                chunk.x = (1 - nxt) * chunk.x + nxt * chunk.noise[chunk.step - 1]

    def _row(self, stream: VideoStream, positions: torch.Tensor) -> Row:
        layers = [stream.cache.layer(i) for i in range(self.model.layers)]
        return Row(stream.cross, tuple(k for k, _ in layers), tuple(v for _, v in layers), positions)

    def _noise(self, stream: VideoStream, shape: torch.Size) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=stream.generator).to(self.device, self.dtype)

    def describe(self) -> dict[str, Any]:
        """What this model has, for `/readyz` (where an image model lists its ControlNet
        preprocessors): its chunk sizes in camera frames, step counts, cache, autoencoder, and the
        live controls it takes."""
        return {
            "chunk_frames": {"first": FIRST_CHUNK_FRAMES, "next": CHUNK_FRAMES},
            "steps": {"min": 1, "max": MAX_STEPS},
            "cache": {"sink": self.video.sink, "window": self.video.window},
            "shift": self.video.shift,
            "autoencoder": self.parts.autoencoder_name,
            "autoencoder_weights": self.parts.autoencoder_weights,
            "controls": list(VIDEO_CONTROLS),
        }

    # -- convenience -----------------------------------------------------------------------------

    def warmup(self, chunks: int = 2) -> None:
        """Run a few chunks of a throwaway stream so lazy initialisation happens before real traffic."""
        stream = self.open_stream()
        image = torch.zeros(self.frame_shape, dtype=torch.uint8)
        for _ in range(max(1, chunks)):
            self.step([(stream, [image] * stream.frames_needed)])
