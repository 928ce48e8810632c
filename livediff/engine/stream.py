"""The streaming img2img engine: a batch of frames in, the transformed frames out.

One step, for frames of one or many streams:

1. passthrough streams get their input back (transport measurements); the similarity filter
   (host): frames that barely changed reuse their stream's last output
2. motion-aware strength (host, streams that ask for it): the input's smoothed motion sets this
   frame's strength, hence its timesteps (`livediff.engine.temporal.MotionEstimate`)
3. preprocess: one host-to-device copy of the uint8 batch, then to [-1, 1] in the model dtype;
   the control images of streams with ControlNets (`livediff.engine.preprocessors`: Canny edges,
   depth, the previous output), each kind once for all streams that use it, each a stage of its own
4. VAE encode -> latents
5. noise each latent to its stream's first timestep with the stream's fixed noise
6. few-step denoising (sequential steps, or Stream Batch: one UNet call for all steps); streams with
   a feature bank bring their earlier frames' attention keys and values to each UNet call and keep
   this frame's (`livediff.engine.temporal`); before each UNet call, each ControlNet in use runs
   on the rows of the streams that use it at that step and their residuals go into the same UNet
   call, zeros for rows without (`livediff.engine.control`; stage `controlnet`)
7. VAE decode
8. postprocess: back to uint8 HWC and one device-to-host copy

Frames are uint8 RGB tensors of shape (H, W, 3) on the host, as decoded video frames come.
Everything that depends only on a stream's params (embeddings, timesteps, coefficients, noise)
is prepared when the params change, never per frame. Per-stream state lives in `Stream`.

Steps 3-8 go through the backend's `stages(layout)`: computed there and then, or (`cuda-graph`)
replayed from a recording of the same stage for steps of the same layout. Each stage is a
function of tensors alone (per-stream tensors gathered beforehand into a `_Batch`), and what it
returns is copied before it is kept across steps. Per-stream params enter a step as tensors
(embeddings, schedule coefficients, whose timesteps motion-aware strength changes from frame to
frame, noise, ControlNet images and scales), so a param change replays the same recording; which
ControlNets run on which rows at which denoising step is part of the layout. So is each row's
feature-bank size: the banks' earlier keys and values, gathered for every UNet call of the step
before the `unet` stage (`livediff.engine.temporal.gather`, sized by the banks' sizes, not by how
full they are), enter it as tensors, and the keys and values it returns are stored into the
streams' rings after it, so a bank filling up or a param change replays the same recording.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from livediff.backends import EAGER, Backend, Stages, create_backend, resolve_backend
from livediff.backends.control_residuals import RESIDUALS
from livediff.backends.cuda_graph import CudaGraphBackend
from livediff.backends.image_prompt import IP_EMBEDS, IP_ROWS, IP_SCALES, ImagePrompt
from livediff.backends.multi_lora import LORA_ROW_SCALES, LORA_ROWS, LORA_SCALES, LORA_SLOTS, LoRARows, MultiLoRA
from livediff.backends.temporal_attention import TemporalBank
from livediff.backends.unet_extras import NO_EXTRAS
from livediff.config import ControlParams, EngineSettings, ImagePromptParams, LoRAParams, StreamParams
from livediff.engine import preprocessors
from livediff.engine.clock import StageClock
from livediff.engine.conditioning import ConditioningCache, clip_encoder
from livediff.engine.control import ControlInput, ControlModels, ControlRow, Key, RowIndices, residuals
from livediff.engine.device import resolve_device, resolve_dtype, torch_threads
from livediff.engine.schedule import NoiseSchedule, T
from livediff.engine.similarity import SimilarityFilter
from livediff.engine.temporal import BankFeed, BankRow, FeatureBank, MotionEstimate, gather, store
from livediff.errors import ConfigError
from livediff.models import ModelParts
from livediff.models.ip_adapter import encode_images, unconditional_tokens
from livediff.models.loading import load_engine_model

log = logging.getLogger(__name__)

VAE_SCALE = 8
"""Pixels per latent cell in each direction (all SD-family VAEs and TAESD)."""
STAGES = ("preprocess", "encode", "unet", "decode", "postprocess")


@dataclass
class Conditioning:
    """A stream's params turned into device tensors, once per change."""

    params: StreamParams
    embeds: torch.Tensor
    """(1, tokens, dim) prompt embedding (blended when the params say so)."""
    uncond: torch.Tensor | None
    """(1, tokens, dim) negative-prompt embedding when guidance > 1."""
    coefs: torch.Tensor
    """(5, steps) rows of `NoiseSchedule.table` for the stream's timesteps."""
    guidance: torch.Tensor
    """(1,) guidance scale on the device (1 means no guidance)."""
    truncated: bool
    lora: torch.Tensor | None = None
    """(slots,) float32 host scales of the engine's LoRAs that the stream applies; None: none."""


@dataclass
class Stream:
    """Everything one stream carries between frames. Created by `StreamEngine.open_stream`."""

    conditioning: Conditioning
    noise: torch.Tensor
    """(steps, C, h, w) fixed noise, one slice per denoising step: steady noise, steady video."""
    similarity: SimilarityFilter
    pending: torch.Tensor | None = None
    """Stream Batch only: (steps - 1, C, h, w) latents still being denoised, at timesteps 1.."""
    last_output: torch.Tensor | None = None
    bank: FeatureBank | None = None
    """The feature bank's keys and values of earlier frames, when `params.temporal_bank` > 0."""
    motion: MotionEstimate | None = None
    """Motion-aware strength: the smoothed motion of the input, when `params.motion_strength` is set."""
    strength: float | None = None
    """Motion-aware strength: the strength of the latest frame (None: `params.strength` applies)."""
    coefs: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict)
    """Motion-aware strength: (5, steps) schedule coefficients per timestep set met so far."""
    control_image: torch.Tensor | None = None
    """(3, H, W) in [0, 1]: the control image of the stream's first ControlNet at its latest frame
    (None while none has run); a new tensor every frame, never written in place."""
    image_tokens: torch.Tensor | None = None
    """(1, tokens, cross_dim) the image prompt's tokens (`livediff.backends.image_prompt`), made
    once per image change; None: no image prompt, or its frame not captured yet."""
    image_key: tuple[str, int] | None = None
    """(`ImagePromptParams.image`, `version`) of the image `image_tokens` are of, or are waiting for."""
    capture_pending: bool = False
    """The image prompt asks for the stream's frame and none has come yet: the next one is taken."""
    last_input: torch.Tensor | None = None
    """(H, W, 3) uint8 host: the latest frame the stream brought (what `image: frame` captures)."""
    uploaded_image: torch.Tensor | None = None
    """(H, W, 3) uint8 host: the image uploaded for the stream's image prompt (`image: upload`)."""
    frames: int = 0
    skipped: int = 0

    @property
    def params(self) -> StreamParams:
        return self.conditioning.params


@dataclass
class StepResult:
    outputs: list[torch.Tensor]
    """One (H, W, 3) uint8 host tensor per input frame, in input order."""
    skipped: list[bool]
    """Which frames the similarity filter answered with the previous output (passthrough frames are not skips)."""
    timings_ms: dict[str, float] = field(default_factory=dict)
    """Milliseconds per stage for the whole batch (empty when no frame ran the networks)."""


Controls = list[ControlInput]
"""A frame's ControlNets that can run now, each with its (3, H, W) control image and its scale."""


@dataclass
class ImagePromptRows:
    """The image prompts of one UNet call's rows (`livediff.backends.image_prompt`)."""

    tokens: torch.Tensor
    """(N, tokens, cross_dim) each row's image tokens (zeros for rows without an image prompt)."""
    scales: torch.Tensor
    """(N,) each row's scale (0 for rows without), in the model dtype."""
    rows: tuple[int, ...]
    """The rows that have an image prompt: part of the step's layout, so a fixed index under `cuda-graph`."""

    def repeat_each(self, times: int) -> ImagePromptRows:
        """Each row repeated `times` times in a row (Stream Batch)."""
        rows = tuple(row * times + k for row in self.rows for k in range(times))
        return ImagePromptRows(self.tokens.repeat_interleave(times, dim=0),
                               self.scales.repeat_interleave(times, dim=0), rows)  # fmt: skip


@dataclass
class _Batch:
    """The per-stream tensors of one denoising pass, stacked along the batch."""

    coefs: torch.Tensor
    """(B, 5, steps) schedule coefficients."""
    noise: torch.Tensor
    """(B, steps, C, h, w) each stream's fixed noise."""
    embeds: torch.Tensor
    uncond: torch.Tensor | None = None
    guidance: torch.Tensor | None = None
    """(B, 1, 1, 1), with `uncond`, when any frame uses classifier-free guidance."""
    pending: tuple[torch.Tensor | None, ...] = ()
    """Stream Batch only: each stream's `Stream.pending` (None on its first frame)."""
    bank: tuple[BankFeed, ...] = ()
    """The feature bank's inputs of each UNet call of the pass, in call order (`StreamEngine._bank_calls`);
    empty when no stream has a bank."""
    controls: tuple[Controls, ...] = ()
    """Each frame's ControlNets with their control images; empty when no stream has one."""
    clock: StageClock | None = None
    """With `controls` in an eager step only: the step's clock, which times the ControlNets' runs as
    a stage of their own (a recorded stage takes no clock: its ControlNets are timed within `unet`)."""
    lora: LoRARows | None = None
    """Each frame's LoRAs (`livediff.backends.multi_lora`); None when no frame applies one."""
    image: ImagePromptRows | None = None
    """Each frame's image prompt; None when no frame has one."""

    def repeat_each(self, times: int) -> _Batch:
        """Each frame's conditioning repeated `times` times in a row (Stream Batch)."""

        def repeat(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.repeat_interleave(times, dim=0)

        return _Batch(self.coefs, self.noise, self.embeds.repeat_interleave(times, dim=0),
                      repeat(self.uncond), repeat(self.guidance), self.pending, self.bank,
                      tuple(controls for controls in self.controls for _ in range(times)), self.clock,
                      None if self.lora is None else self.lora.repeat_each(times),
                      None if self.image is None else self.image.repeat_each(times))  # fmt: skip


class StreamEngine:
    """Few-step img2img over batches of frames from any number of streams.

    Not thread-safe: one thread (the device's worker) calls every method.
    """

    def __init__(self, settings: EngineSettings, parts: ModelParts | None = None) -> None:
        self.device = resolve_device(settings.device)
        settings = settings.replace(backend=resolve_backend(settings.backend, self.device, settings.engines_dir))
        self.settings = settings
        if parts is None:
            self.dtype = resolve_dtype(settings.dtype, self.device, settings.backend)
            parts = load_engine_model(settings, self.device, self.dtype)
        elif settings.dtype != "auto" and resolve_dtype(settings.dtype, self.device) != parts.dtype:
            raise ConfigError(f"dtype {settings.dtype} asked for, but the model given was loaded in {parts.dtype}")
        elif parts.lcm_lora != settings.lcm_lora:
            fused = parts.lcm_lora
            raise ConfigError(f"lcm_lora {settings.lcm_lora!r} asked for, but the model given has {fused!r} fused")
        self.dtype = parts.dtype
        self.parts = parts
        self.backend: Backend = create_backend(settings, self.parts)
        self.schedule = NoiseSchedule(self.parts.scheduler, self.device)
        self.conditioning = ConditioningCache(
            clip_encoder(self.parts.tokenizer, self.parts.text_encoder), settings.cache_size
        )
        extras = getattr(self.backend, "extras", NO_EXTRAS)
        self.bank_feature = next((f for f in extras.features if isinstance(f, TemporalBank)), None)
        """The UNet's feature-bank interface when the backend was built with it (`feature_bank`), else None."""
        self.lora_feature = next((f for f in extras.features if isinstance(f, MultiLoRA)), None)
        """The engine's LoRAs in their slots when it was started with some (`loras`), else None."""
        self.image_feature = next((f for f in extras.features if isinstance(f, ImagePrompt)), None)
        """The engine's IP-Adapter when it was started with one (`ip_adapter`), else None."""
        self._image_uncond = None if self.image_feature is None else unconditional_tokens(self.image_feature.adapter)
        """(1, tokens, cross_dim): what the unconditional branch of guidance attends to for an image prompt."""
        self.controls = ControlModels(settings, self.parts)
        """The ControlNets streams may name (`controlnets`) and the depth estimator, loaded on first use."""
        self._row_indices = RowIndices(self.device)
        """Device index tensors of the rows each ControlNet runs on, kept for recorded steps."""
        self._network_threads = torch.get_num_threads()
        """torch's threads for the depth network, whatever the backend leaves to the step's own small ops."""
        channels = self.parts.unet.config.in_channels
        self.latent_shape = (channels, settings.height // VAE_SCALE, settings.width // VAE_SCALE)
        self.frame_shape = (settings.height, settings.width, 3)
        self._staging_cpu = (
            torch.empty((settings.max_batch, *self.frame_shape), dtype=torch.uint8).pin_memory()
            if self.device.type == "cuda"
            else None
        )
        log.info(
            "engine: model %s (%s), backend %s, %s %s, %dx%d",
            self.parts.ref, self.parts.revision, self.backend.name, self.device, self.dtype,
            settings.width, settings.height,
        )  # fmt: skip

    # -- streams ---------------------------------------------------------------------------------

    def open_stream(self, params: StreamParams | None = None) -> Stream:
        """A new stream with `params`; the ControlNets it names start loading if they are not (see
        `control_loads`). `ConfigError` naming the field for a param this engine cannot serve."""
        params = params or StreamParams()
        self._check(params)
        self._check_image(params, None, None)
        stream = Stream(
            conditioning=self._condition(params),
            noise=self._noise(params),
            similarity=SimilarityFilter(params.seed),
            bank=self._bank(params),
            motion=MotionEstimate() if params.motion_strength else None,
        )
        self._take_image(stream, params.image_prompt)
        return stream

    def update(self, stream: Stream, params: StreamParams) -> None:
        """Apply new params from the next frame on: no reload, no recompile.

        The feature bank follows `bank_rule`: kept across prompt, blend, strength and weight
        changes, dropped when the seed, the step count, guidance on/off or the bank size change.
        """
        self._check(params, stream.params)
        self._check_image(params, stream.image_key, stream.uploaded_image)
        old = stream.params
        stream.conditioning = self._condition(params)
        if (params.seed, len(params.timesteps)) != (old.seed, len(old.timesteps)):
            stream.noise = self._noise(params)
        if params.timesteps != old.timesteps or params.seed != old.seed:
            stream.pending = None
        if not params.similarity_filter:
            stream.similarity.reset()
        if bank_rule(old, params) == "drop":
            stream.bank = self._bank(params)
        elif stream.bank is not None:
            stream.bank.weight = params.temporal_weight
        if params.motion_strength is None:
            stream.motion, stream.strength = None, None
        elif stream.motion is None:
            stream.motion = MotionEstimate()
        if len(params.timesteps) != len(old.timesteps):
            stream.coefs.clear()
        self._take_image(stream, params.image_prompt)

    def set_uploaded_image(self, stream: Stream, image: torch.Tensor) -> None:
        """Keep `image`, (H, W, 3) uint8 RGB on the host (any size), as the stream's uploaded image:
        what an image prompt with `image: upload` takes at its next image request (a new `version`).
        `ConfigError` naming `image_prompt` for anything else."""
        if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
            raise ConfigError(f"image_prompt image must be (H, W, 3) uint8 RGB, got {image.dtype} {tuple(image.shape)}")
        stream.uploaded_image = image

    def _check_image(self, params: StreamParams, key: tuple[str, int] | None, uploaded: torch.Tensor | None) -> None:
        """`ConfigError` naming `image_prompt.image` for an `upload` image asked for before one was uploaded."""
        prompt = params.image_prompt
        if prompt is None:
            return
        if prompt.image == "upload" and (prompt.image, prompt.version) != key and uploaded is None:
            raise ConfigError(
                "image_prompt.image 'upload': no image was uploaded for this session "
                "(PUT /api/sessions/{id}/image-prompt first)"
            )

    def _take_image(self, stream: Stream, prompt: ImagePromptParams | None) -> None:
        """Encode the image `prompt` asks for when it is another than the stream's (the image
        encoder runs here, on the engine's thread, once per image change); a scale change alone
        encodes nothing. A frame asked for before the stream has one is taken at its next frame."""
        if prompt is None:
            stream.image_tokens, stream.image_key, stream.capture_pending = None, None, False
            return
        key = (prompt.image, prompt.version)
        if key == stream.image_key:
            return
        stream.image_key = key
        image = stream.uploaded_image if prompt.image == "upload" else stream.last_input
        stream.capture_pending = image is None
        stream.image_tokens = None if image is None else self._encode_image(image)

    def _encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """(1, tokens, cross_dim) image tokens of an (H, W, 3) uint8 host image."""
        assert self.image_feature is not None
        with torch_threads(self._network_threads):
            return encode_images(self.image_feature.adapter, [image]).to(self.device, self.dtype)

    def control_loads(self, params: StreamParams) -> dict[Key, Future[Any]]:
        """The loads `params`' ControlNets (and the depth estimator) wait for, or that failed, by key;
        empty when all are ready. Starts any not started: they run off the frame path, and until one
        is done the stream's frames run without it."""
        return self.controls.request(params.controlnet)

    def check_params(self, params: StreamParams, current: StreamParams | None = None) -> None:
        """Raise `ConfigError` (naming the field) when this engine cannot serve `params`, as
        `open_stream` and `update` would: `temporal_bank` without the feature bank, a ControlNet this
        engine does not have or could not load, `depth` without a depth model. `current`: the
        stream's params now, whose ControlNets pass as they are (see `ControlModels.check`). Starts no load."""
        if params.temporal_bank and self.bank_feature is None:
            raise ConfigError(
                f"temporal_bank needs an engine started with the feature bank (feature_bank, `--feature-bank`); "
                f"the {self.backend.name} backend here runs without it"
            )
        self.controls.check(params.controlnet, current.controlnet if current else ())
        if params.loras:
            if self.lora_feature is None:
                raise ConfigError(
                    "loras[0].name needs an engine with LoRAs; this one has none (start it with --lora NAME=SOURCE)"
                )
            self.lora_feature.check(params.loras)
        if params.image_prompt is not None and self.image_feature is None:
            raise ConfigError("image_prompt needs an engine started with an IP-Adapter (--ip-adapter SOURCE)")

    def _check(self, params: StreamParams, current: StreamParams | None = None) -> None:
        """`check_params`, then start the ControlNets' loads."""
        self.check_params(params, current)
        self.controls.request(params.controlnet)

    def close(self) -> None:
        """Drop the ControlNet loads still queued (at shutdown: none runs after the server ended)."""
        self.controls.close()

    def _bank(self, params: StreamParams) -> FeatureBank | None:
        if not params.temporal_bank or self.bank_feature is None:
            return None
        return FeatureBank(self.bank_feature.layers, params.temporal_bank, params.temporal_weight, self.device,
                           self.dtype)  # fmt: skip

    def _condition(self, params: StreamParams) -> Conditioning:
        prompt = self.conditioning.blend(params.prompt, params.blend_prompt, params.blend_weight)
        uncond = None
        if params.guidance > 1.0:
            uncond = self.conditioning.get(params.negative_prompt).embeds
        return Conditioning(
            params=params,
            embeds=prompt.embeds,
            uncond=uncond,
            coefs=self.schedule.coefficients(params.timesteps),
            guidance=torch.tensor([max(params.guidance, 1.0)], device=self.device),
            truncated=prompt.truncated,
            lora=self.lora_feature.row(params.loras) if self.lora_feature is not None else None,
        )

    def _noise(self, params: StreamParams) -> torch.Tensor:
        generator = torch.Generator().manual_seed(params.seed)  # on the host: the same on every device
        noise = torch.randn((len(params.timesteps), *self.latent_shape), generator=generator)
        return noise.to(self.device, self.dtype)

    # -- the step --------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, batch: Sequence[tuple[Stream, torch.Tensor]]) -> StepResult:
        """Transform one frame per entry; entries may belong to different streams."""
        if not 1 <= len(batch) <= self.settings.max_batch:
            raise ValueError(f"batch of {len(batch)} frames; this engine takes 1 to {self.settings.max_batch}")
        for _, image in batch:
            if tuple(image.shape) != self.frame_shape or image.dtype != torch.uint8:
                raise ValueError(
                    f"frames must be torch uint8 tensors of shape {self.frame_shape}, "
                    f"got {type(image).__module__}.{type(image).__name__} {image.dtype} {tuple(image.shape)}"
                )
        for stream, image in batch:
            stream.last_input = image
            if stream.capture_pending:  # an image prompt waiting for the stream's first frame
                stream.capture_pending = False
                stream.image_tokens = self._encode_image(image)
        with torch_threads(self.backend.torch_threads):
            return self._step(batch)

    def _step(self, batch: Sequence[tuple[Stream, torch.Tensor]]) -> StepResult:
        passthrough = [stream.params.passthrough for stream, _ in batch]
        skipped = [not through and self._skip(stream, image) for (stream, image), through in zip(batch, passthrough)]
        run = [i for i, (skip, through) in enumerate(zip(skipped, passthrough)) if not (skip or through)]
        outputs: list[torch.Tensor | None] = [
            image if through else stream.last_output if skip else None
            for (stream, image), skip, through in zip(batch, skipped, passthrough)
        ]
        timings: dict[str, float] = {}
        if run:
            streams = [batch[i][0] for i in run]
            images, timings = self._run(streams, [batch[i][1] for i in run])
            for i, stream, image in zip(run, streams, images):
                stream.last_output = outputs[i] = image
        for (stream, _), skip in zip(batch, skipped):
            stream.frames += 1
            stream.skipped += skip
        return StepResult(outputs=outputs, skipped=skipped, timings_ms=timings)  # type: ignore[arg-type]

    def _skip(self, stream: Stream, image: torch.Tensor) -> bool:
        params = stream.params
        if not params.similarity_filter or stream.last_output is None:
            return False
        return stream.similarity.should_skip(image, params.similarity_threshold, params.max_skip_frames)

    def _run(self, streams: list[Stream], images: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict[str, float]]:
        clock = StageClock(self.device)
        for stream, image in zip(streams, images):
            if stream.motion is not None:
                self._follow_motion(stream, image)
        ready = [[c for c in stream.params.controlnet if self.controls.ready(c)] for stream in streams]
        stages = self.backend.stages(self._layout(streams, ready))
        pixels = stages.run("preprocess", self._preprocess, self._upload(images))
        clock.mark("preprocess")
        controls = self._control_images(streams, images, pixels, clock, ready)
        latents = stages.run("encode", self.backend.encode, pixels)
        clock.mark("encode")
        groups: dict[int, list[int]] = {}
        for i, stream in enumerate(streams):
            groups.setdefault(len(stream.params.timesteps), []).append(i)
        if len(groups) == 1:
            step_clock = clock if stages is EAGER else None  # a recorded stage takes no clock
            denoised = self._denoise_group(streams, latents, stages, controls, step_clock)
        else:  # streams with different step counts: one pass per count (such a step is never recorded)
            denoised = torch.empty_like(latents)
            for members in groups.values():
                index = torch.tensor(members, device=self.device)
                denoised[index] = self._denoise_group([streams[i] for i in members], latents[index], stages,
                                                      [controls[i] for i in members], clock)  # fmt: skip
        clock.mark("unet")
        decoded = stages.run("decode", self.backend.decode, denoised)
        clock.mark("decode")
        # the step's one wait for the device; a copy even on the CPU, where a recorded stage's buffer is reused
        frames = stages.run("postprocess", self._postprocess, decoded).to("cpu", copy=True)
        clock.mark("postprocess")
        return list(frames.unbind(0)), clock.durations_ms()

    def _layout(self, streams: list[Stream], ready: list[list[ControlParams]]) -> Hashable | None:
        """What fixes the shapes and the order of work of a step of `streams`: batch size, step
        count, guidance, under Stream Batch which streams start their pipeline, and which loaded
        ControlNets (`ready`, per stream) run on which rows at which denoising steps, each stream's
        feature-bank size (0: none), which rows have an image prompt (appended when any has), and
        how many LoRAs each row applies (appended as `("lora", counts)` when any does). None (never
        recorded) when the streams' step counts differ (that step gathers its groups by index).
        Params that are tensors in the step (prompt embeddings, strength and motion-aware strength's
        timesteps as schedule coefficients, noise from the seed, ControlNet scales and images, the
        bank's weight and its earlier frames, image-prompt tokens and scales, which LoRAs a row
        applies and at what scales) are not part of it: a change of them, or a bank filling up,
        replays the same recording."""
        steps = {len(stream.params.timesteps) for stream in streams}
        if len(steps) > 1:
            return None
        count = steps.pop()
        guided = any(stream.conditioning.uncond is not None for stream in streams)
        starting = tuple(stream.pending is None for stream in streams) if self._stream_batch(streams) else ()
        banks = tuple(0 if s.bank is None else s.bank.frames for s in streams) if self._banked(streams) else ()
        controls = tuple(tuple((c.name, _active(c, count)) for c in row) for row in ready) if any(ready) else ()
        imaged = tuple(self._image_of(stream) is not None for stream in streams)
        layout: tuple[Hashable, ...] = (len(streams), count, guided, starting, banks, controls)
        if any(imaged):
            layout += (imaged,)  # which rows have an image prompt
        loras = tuple(0 if s.conditioning.lora is None else int(torch.count_nonzero(s.conditioning.lora))
                      for s in streams)  # fmt: skip
        return layout + (("lora", loras),) if any(loras) else layout  # the LoRA rows' fixed shape

    def _upload(self, images: list[torch.Tensor]) -> torch.Tensor:
        """(B, H, W, 3) uint8 frames on the device, in one host-to-device copy."""
        if self._staging_cpu is not None:  # CUDA: stack straight into pinned memory, copy asynchronously
            host = torch.stack(images, out=self._staging_cpu[: len(images)])
        else:
            host = images[0].unsqueeze(0) if len(images) == 1 else torch.stack(images)
        return host.to(self.device, non_blocking=True)

    def _preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, 3, H, W) in [-1, 1], the model dtype, channels-last where the backend wants it."""
        pixels = frames.permute(0, 3, 1, 2).to(self.dtype)
        pixels = pixels.div_(127.5).sub_(1.0)
        if self.backend.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        return pixels

    def _control_images(self, streams: list[Stream], images: list[torch.Tensor], pixels: torch.Tensor,
                        clock: StageClock, wanted: list[list[ControlParams]]) -> list[Controls]:  # fmt: skip
        """Each stream's ControlNets that can run now (`wanted`: loaded), with their control images
        and scales: each kind of image made once for all the streams that use it, timed as a stage
        named after it."""
        users: dict[str, list[int]] = {}
        for i, ready in enumerate(wanted):
            for control in ready:
                if i not in users.setdefault(control.preprocessor, []):
                    users[control.preprocessor].append(i)
        made: dict[tuple[int, str], torch.Tensor] = {}
        for kind, members in users.items():
            if kind == "canny":
                out = preprocessors.canny([images[i] for i in members], self.device, self.dtype)
            elif kind == "depth":
                depth = self.controls.depth()
                assert depth is not None  # `ready` saw it loaded
                with torch_threads(self._network_threads):  # a torch depth network takes every thread
                    out = preprocessors.depth(pixels[members], depth.model, depth.network)
            else:  # previous: the stream's last output (its input until it has one)
                previous = [streams[i].last_output for i in members]
                out = preprocessors.upload([images[i] if p is None else p for i, p in zip(members, previous)],
                                           self.device, self.dtype)  # fmt: skip
            clock.mark(kind)
            made.update(((i, kind), image) for i, image in zip(members, out))
        result = [
            [ControlInput(c.name, _active(c, len(streams[i].params.timesteps)), made[i, c.preprocessor],
                          torch.full((), c.scale, dtype=torch.float32, device=self.device)) for c in ready]
            for i, ready in enumerate(wanted)
        ]  # fmt: skip
        for stream, imaged in zip(streams, result):
            stream.control_image = imaged[0].image if imaged else None
        return result

    def _follow_motion(self, stream: Stream, image: torch.Tensor) -> None:
        """Motion-aware strength: this frame's strength from the smoothed motion (see `MotionEstimate`)."""
        assert stream.motion is not None and stream.params.motion_strength is not None
        stream.motion.observe(image)
        stream.strength = stream.motion.strength(*stream.params.motion_strength)

    def _coefs(self, stream: Stream) -> torch.Tensor:
        """(5, steps) coefficients of this frame's timesteps: the params', or the motion-aware strength's."""
        if stream.strength is None:
            return stream.conditioning.coefs
        timesteps = stream.params.timesteps_at(stream.strength)
        coefs = stream.coefs.get(timesteps)
        if coefs is None:
            coefs = stream.coefs[timesteps] = self.schedule.coefficients(timesteps)
        return coefs

    def _postprocess(self, decoded: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, still on the device."""
        frames = decoded.clamp(-1.0, 1.0).add_(1.0).mul_(127.5).round_().to(torch.uint8)
        return frames.permute(0, 2, 3, 1).contiguous()

    # -- denoising -------------------------------------------------------------------------------

    def _stream_batch(self, streams: list[Stream]) -> bool:
        return self.settings.stream_batch and len(streams[0].params.timesteps) > 1

    def _denoise_group(self, streams: list[Stream], x0: torch.Tensor, stages: Stages, controls: list[Controls],
                       clock: StageClock | None) -> torch.Tensor:  # fmt: skip
        """Denoise the latents of streams that share a step count (`clock`: None in a recorded step)."""
        batch = self._gather(streams, controls, clock)
        calls = self._bank_calls(streams, guided=batch.uncond is not None)
        if calls:
            assert self.bank_feature is not None
            batch.bank = tuple(gather(rows, self.bank_feature.layers, self.device, self.dtype) for rows in calls)
        if not self._stream_batch(streams):
            denoised, news = stages.run("unet", self._denoise, x0, batch)
        else:
            denoised, pending, news = stages.run("unet", self._denoise_stream_batch, x0, batch)
            for stream, latents in zip(streams, pending):
                stream.pending = latents.clone()  # the stage's own buffer is overwritten by the next step
        for rows, new in zip(calls, news):  # after the stage: its outputs copied into the rings
            store(rows, new)
        return denoised

    def _banked(self, streams: Sequence[Stream]) -> bool:
        return self.bank_feature is not None and any(stream.bank is not None for stream in streams)

    def _bank_calls(self, streams: list[Stream], guided: bool) -> list[list[BankRow | None]]:
        """The bank rows of each UNet call a denoising pass of `streams` makes, in call order (empty
        when no stream has a bank): a row is a stream's bank at the slot (denoising step, guidance
        branch) of that row, as `_denoise` and `_denoise_stream_batch` lay out their calls."""
        if not self._banked(streams):
            return []
        banks = [stream.bank for stream in streams]
        steps = len(streams[0].params.timesteps)
        branches = (1, 0) if guided else (0,)  # with guidance the unconditional rows come first

        def rows(step_of: list[int], repeat: int) -> list[BankRow | None]:
            each = [bank for bank in banks for _ in range(repeat)]
            return [None if bank is None else BankRow(bank, (step, branch))
                    for branch in branches for bank, step in zip(each, step_of)]  # fmt: skip

        if self._stream_batch(streams):
            return [rows(list(range(steps)) * len(banks), steps)]
        return [rows([k] * len(banks), 1) for k in range(steps)]

    def _gather(self, streams: list[Stream], controls: list[Controls], clock: StageClock | None) -> _Batch:
        """The per-stream tensors of a denoising pass, stacked (device copies; motion-aware strength
        computes a timestep set's coefficients the first time the stream meets it), the banks and
        the ControlNets with their control images."""
        controlled = any(controls)
        conds = [s.conditioning for s in streams]
        batch = _Batch(
            coefs=torch.stack([self._coefs(s) for s in streams]),
            noise=torch.stack([s.noise for s in streams]),
            embeds=torch.cat([c.embeds for c in conds]),
            pending=tuple(s.pending for s in streams) if self._stream_batch(streams) else (),
            controls=tuple(controls) if controlled else (),
            clock=clock if controlled else None,
            lora=self._lora_rows(conds),
            image=self._image_rows(streams),
        )
        if any(c.uncond is not None for c in conds):
            batch.uncond = torch.cat([c.embeds if c.uncond is None else c.uncond for c in conds])
            batch.guidance = torch.cat([c.guidance for c in conds]).to(self.dtype)[:, None, None, None]
        return batch

    def _lora_rows(self, conds: list[Conditioning]) -> LoRARows | None:
        """The frames' LoRAs: their (B, slots) host scales, with the rows' slots and scales as
        device tensors where the backend records steps (`MultiLoRA.fixed_rows`); None when none
        applies a LoRA."""
        if self.lora_feature is None or all(c.lora is None for c in conds):
            return None
        zero = torch.zeros(len(self.lora_feature.names))
        matrix = torch.stack([zero if c.lora is None else c.lora for c in conds])
        if isinstance(self.backend, CudaGraphBackend):  # a layout's eager first step runs what its recording will
            return self.lora_feature.fixed_rows(matrix, self.device)
        return LoRARows(matrix)

    @staticmethod
    def _image_of(stream: Stream) -> torch.Tensor | None:
        """The stream's image tokens when its params ask for an image prompt and they are made."""
        return stream.image_tokens if stream.params.image_prompt is not None else None

    def _image_rows(self, streams: list[Stream]) -> ImagePromptRows | None:
        """Each stream's image tokens and scale stacked (zeros for streams without), None when none has one."""
        tokens = [self._image_of(stream) for stream in streams]
        if self._image_uncond is None or all(t is None for t in tokens):
            return None
        zero = torch.zeros_like(self._image_uncond)
        scales = [0.0 if t is None or s.params.image_prompt is None else s.params.image_prompt.scale
                  for s, t in zip(streams, tokens)]  # fmt: skip
        return ImagePromptRows(
            tokens=torch.cat([zero if t is None else t for t in tokens]),
            scales=torch.tensor(scales, dtype=self.dtype).to(self.device, non_blocking=True),
            rows=tuple(i for i, t in enumerate(tokens) if t is not None),
        )

    def _predict(self, x: torch.Tensor, timesteps: torch.Tensor, batch: _Batch, steps: Sequence[int],
                 call: int) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:  # fmt: skip
        """The UNet's prediction, with classifier-free guidance for the frames that ask for it, and
        the bank's new keys and values per layer (empty without a bank).

        `steps` is each row's denoising step index; `call` the index of this UNet call in the pass
        (its `batch.bank` feed)."""
        controls = self._control_rows(batch, steps)
        bank = batch.bank[call] if batch.bank else None
        if batch.uncond is None or batch.guidance is None:
            return self._unet(x, timesteps, batch.embeds, bank, controls, batch.clock, batch.lora, batch.image)
        both, new = self._unet(
            torch.cat([x, x]), torch.cat([timesteps, timesteps]), torch.cat([batch.uncond, batch.embeds]), bank,
            controls + controls, batch.clock, None if batch.lora is None else batch.lora.doubled(),
            self._guided_image(batch.image, x.shape[0]),
        )  # fmt: skip
        unconditional, conditional = both.chunk(2)
        return unconditional + batch.guidance * (conditional - unconditional), new

    def _guided_image(self, image: ImagePromptRows | None, count: int) -> ImagePromptRows | None:
        """`image` for a guided call of 2 x `count` rows: the unconditional half attends to the
        projection of no image (diffusers' negative image embeddings), the conditional half to its image."""
        if image is None:
            return None
        assert self._image_uncond is not None
        uncond = self._image_uncond.expand(count, -1, -1)
        return ImagePromptRows(torch.cat([uncond, image.tokens]), torch.cat([image.scales, image.scales]),
                               image.rows + tuple(row + count for row in image.rows))  # fmt: skip

    @staticmethod
    def _control_rows(batch: _Batch, steps: Sequence[int]) -> list[list[ControlRow]]:
        """Each row's ControlNets active at its denoising step (`ControlParams.active`)."""
        if not batch.controls:
            return [[] for _ in steps]
        return [[ControlRow(c.name, c.scale, c.image) for c in controls if c.active[step]]
                for controls, step in zip(batch.controls, steps)]  # fmt: skip

    def _unet(self, x: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor, bank: BankFeed | None,
              controls: list[list[ControlRow]], clock: StageClock | None,
              lora: LoRARows | None = None,
              image: ImagePromptRows | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:  # fmt: skip
        """One UNet call: the plain graph when no row has a bank, a ControlNet or a LoRA, else the
        graph with extra inputs (the ControlNets run first). `bank`: the call's bank feed (None
        without); returns the prediction and, with `bank`, this frame's keys and values per layer
        (`bank_new_{i}`), which the engine stores after the stage. `lora`: the rows' LoRAs, None
        when none applies one."""
        values: dict[str, torch.Tensor] = {}
        if lora is not None:
            values[LORA_SCALES] = lora.matrix
            if lora.slots is not None and lora.scales is not None:  # a fixed plan: device tensors a recording reads
                values[LORA_ROWS], values[LORA_SLOTS] = self._row_indices(lora.rows), lora.slots
                values[LORA_ROW_SCALES] = lora.scales
        if image is not None:
            values[IP_EMBEDS], values[IP_SCALES] = image.tokens, image.scales
            if image.rows != tuple(range(x.shape[0])):
                values[IP_ROWS] = self._row_indices(image.rows)
        if bank is not None:
            values.update(bank.values())
        if any(controls):
            runners = self.controls.runners({row.name for row_controls in controls for row in row_controls})
            with clock.part("controlnet") if clock is not None else contextlib.nullcontext():
                summed = residuals(controls, x, timesteps, embeds, runners, self._row_indices)
            assert summed is not None  # some row has a ControlNet
            values[RESIDUALS] = summed
        if not values:
            return self.backend.unet(x, timesteps, embeds), ()
        prediction, outputs = self.backend.unet_with(x, timesteps, embeds, values)
        if bank is None:
            return prediction, ()
        return prediction, tuple(outputs[f"bank_new_{i}"] for i in range(len(bank.kv)))

    def _denoise(self, x0: torch.Tensor, batch: _Batch) -> tuple[torch.Tensor, tuple[tuple[torch.Tensor, ...], ...]]:
        """All steps of each frame in turn: `steps` UNet calls of batch B. Returns the (B, C, h, w)
        outputs and, with `batch.bank`, each call's new bank keys and values per layer."""
        coefs, noise = batch.coefs, batch.noise
        steps = coefs.shape[-1]
        x = self.schedule.add_noise(x0, noise[:, 0], coefs[:, :, 0])
        news = []
        for k in range(steps):
            output, new = self._predict(x, coefs[:, T, k], batch, [k] * coefs.shape[0], call=k)
            news.append(new)
            denoised = self.schedule.predict_x0(x, output, coefs[:, :, k])
            if k + 1 < steps:
                x = self.schedule.add_noise(denoised, noise[:, k + 1], coefs[:, :, k + 1])
        return denoised, tuple(news) if batch.bank else ()

    def _denoise_stream_batch(self, x0: torch.Tensor, batch: _Batch
                              ) -> tuple[torch.Tensor, torch.Tensor, tuple[tuple[torch.Tensor, ...], ...]]:  # fmt: skip
        """One UNet call of batch B * steps: this frame's first step beside the earlier frames' later steps.

        The output of a call is the frame that entered steps - 1 calls ago; each stream's `pending`
        carries the latents in between. Returns (B, C, h, w) outputs, (B, steps - 1, C, h, w)
        next `pending` and, with `batch.bank`, the call's new bank keys and values per layer.
        """
        coefs, noise = batch.coefs, batch.noise
        size, steps = coefs.shape[0], coefs.shape[-1]
        pending = []
        for i, latents in enumerate(batch.pending):
            if latents is None:  # first frame: start the pipeline filled with this frame
                later = coefs[i, :, 1:].T
                latents = self.schedule.add_noise(x0[i].expand(steps - 1, -1, -1, -1), noise[i, 1:], later)
            pending.append(latents)
        fresh = self.schedule.add_noise(x0, noise[:, 0], coefs[:, :, 0])
        x = torch.cat([fresh.unsqueeze(1), torch.stack(pending)], dim=1).flatten(0, 1)
        flat_coefs = coefs.transpose(1, 2).flatten(0, 1)  # (B * steps, 5), frame-major
        output, new = self._predict(x, flat_coefs[:, T], batch.repeat_each(steps), list(range(steps)) * size, call=0)
        denoised = self.schedule.predict_x0(x, output, flat_coefs).unflatten(0, (size, steps))
        renoised = self.schedule.add_noise(
            denoised[:, :-1].flatten(0, 1), noise[:, 1:].flatten(0, 1), coefs[:, :, 1:].transpose(1, 2).flatten(0, 1)
        ).unflatten(0, (size, steps - 1))
        return denoised[:, -1], renoised, (new,) if batch.bank else ()

    # -- convenience -----------------------------------------------------------------------------

    def warmup(self, frames: int = 2) -> None:
        """Run a few frames so lazy initialisation and compilation happen before real traffic
        (of the UNet with the feature bank and with a LoRA too, when the engine has them)."""
        streams = [self.open_stream()]
        if self.bank_feature is not None:
            streams.append(self.open_stream(StreamParams(temporal_bank=1)))
        if self.lora_feature is not None:
            streams.append(self.open_stream(StreamParams(loras=(LoRAParams(self.lora_feature.names[0]),))))
        if self.image_feature is not None:  # its frame is captured at the first step: the encoder warms up too
            streams.append(self.open_stream(StreamParams(image_prompt=ImagePromptParams())))
        image = torch.zeros(self.frame_shape, dtype=torch.uint8)
        for stream in streams:
            for _ in range(frames):
                self.step([(stream, image)])
        warmed = getattr(self.backend, "warmed", None)
        if warmed is not None:  # a backend that keeps what warm-up compiled (the compile cache)
            warmed()


def bank_rule(old: StreamParams, new: StreamParams) -> str:
    """What a param change does to a stream's feature bank: `keep` or `drop`.

    Kept when the prompt, negative prompt, blend, strength (timesteps at the same step count) or
    the bank's weight change: a new prompt then takes over within `temporal_bank` frames, each
    frame replacing the oldest in the bank, which softens the cut. Dropped (the next frame starts
    an empty bank) when the seed changes (new noise: the old frames' features belong to another
    picture), the step count or guidance on/off changes (the bank's slots no longer match the
    UNet rows), or the bank size changes.
    """
    if (new.seed, len(new.timesteps), new.guidance > 1.0, new.temporal_bank) != (
        old.seed,
        len(old.timesteps),
        old.guidance > 1.0,
        old.temporal_bank,
    ):
        return "drop"
    return "keep"


def _active(control: ControlParams, steps: int) -> tuple[bool, ...]:
    """Per denoising step of `steps`: whether `control` runs then."""
    return tuple(control.active(k, steps) for k in range(steps))
