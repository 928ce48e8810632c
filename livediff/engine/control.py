"""ControlNet conditioning per stream: the engine's ControlNets, loaded off the frame path, and the
residuals of one UNet call whose rows use different ControlNets, scales, or none.

1. `ControlModels` holds the networks ControlNet conditioning needs: the ControlNets the engine
   was given (`EngineSettings.controlnets`, by name) and the depth estimator of the `depth`
   control image. Each is loaded the first time a stream names it, on a loader thread of its own
   (reading the weights, and on the compiled backends exporting, compiling and checking its
   graph, the depth estimator's too: seconds to minutes), never in an engine step; a stream's frames run without a
   ControlNet that is still loading, and with it from the first step after it is ready. A load
   is a `Future`, which the server waits on to tell the client. Switching a stream between
   loaded ControlNets, scales or preprocessors costs nothing but the next frame.
2. The engine computes each stream's control images once per frame (`livediff.engine.preprocessors`).
3. For each UNet call, `residuals` takes every row's ControlNets (`ControlRow`s: a row is a frame
   at one denoising step, and for guidance one branch), runs each ControlNet once over the rows
   that use it (rows of different streams together, each with its own control image and scale),
   and adds up the (rows, total) residuals (`livediff.backends.control_residuals`); rows without a
   ControlNet stay zero. So streams with different ControlNets or none share one UNet call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from livediff.backends import create_controlnet, create_depth
from livediff.backends.base import Runner
from livediff.config import ControlParams, EngineSettings
from livediff.engine import preprocessors
from livediff.errors import ConfigError
from livediff.models import ModelParts
from livediff.models.controlnet import load_controlnet
from livediff.models.depth import DepthParts, load_depth_model

log = logging.getLogger(__name__)

Key = tuple[str, str]
"""What a load is of: ("controlnet", name) or ("preprocessor", "depth")."""
DEPTH: Key = ("preprocessor", "depth")


def load_state(future: Future[Any]) -> str:
    """A started load's state, read now: `loading`, `ready`, or `failed` (it raised or was cancelled)."""
    if not future.done():
        return "loading"
    return "failed" if future.cancelled() or future.exception() is not None else "ready"


class ControlModels:
    """The engine's ControlNets by name and its depth estimator, each loaded once, on first request.

    `request` and the lookups run on the engine's thread; loads run on a loader thread and hand
    their result over through their future, which the engine's thread reads.
    """

    def __init__(self, settings: EngineSettings, parts: ModelParts,
                 create: Callable[..., Runner] = create_controlnet) -> None:  # fmt: skip
        """`create` builds a loaded ControlNet's runner (`livediff.backends.create_controlnet`)."""
        self.settings = settings
        self.parts = parts
        self.sources = dict(settings.controlnets)
        """ControlNet name -> its source (hub id, folder, built-in)."""
        self._create = create
        self._loads: dict[Key, Future[Any]] = {}
        self._pool: ThreadPoolExecutor | None = None

    def __bool__(self) -> bool:
        return bool(self.sources)

    def check(self, controls: Sequence[ControlParams], current: Sequence[ControlParams] = ()) -> None:
        """`ConfigError` naming the field (`controlnet[0].name`) for what this engine cannot serve.

        Entries also in `current` (the stream's own, same name and control image) pass: a load of
        theirs that failed was told to the client when it failed, and must not refuse every later
        change of the stream's other params."""
        kept = {(c.name, c.preprocessor) for c in current}
        for i, control in enumerate(controls):
            if (control.name, control.preprocessor) in kept:
                continue
            field = f"controlnet[{i}]"
            if control.name not in self.sources:
                have = ", ".join(self.sources) or "none (start it with --controlnet NAME=SOURCE)"
                raise ConfigError(f"{field}.name {control.name!r} is not one of this engine's ControlNets: {have}")
            error = self.error(("controlnet", control.name))
            if error:
                raise ConfigError(f"{field}.name {control.name!r} could not be loaded: {error}")
            if control.preprocessor == "depth":
                if not self.settings.depth_model:
                    raise ConfigError(f"{field}.preprocessor depth needs a depth model (start with --depth-model)")
                error = self.error(DEPTH)
                if error:
                    raise ConfigError(f"{field}.preprocessor depth: the depth model could not be loaded: {error}")

    def request(self, controls: Sequence[ControlParams]) -> dict[Key, Future[Any]]:
        """Start loading whatever `controls` need that is not loaded; the loads not done well (still
        running, or failed), by key."""
        wanted: list[Key] = [("controlnet", c.name) for c in controls]
        if any(c.preprocessor == "depth" for c in controls):
            wanted.append(DEPTH)
        running = {}
        for key in dict.fromkeys(wanted):
            future = self._loads.get(key)
            if future is None or future.cancelled():  # a cancelled load never ran (`close`): start it again
                future = self._loads[key] = self._loader().submit(self._load, key)
            if not future.done() or future.exception() is not None:
                running[key] = future
        return running

    def close(self) -> None:
        """Drop the loads still queued (a load under way finishes on its thread); a later request
        starts them again on a new loader thread."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def _loader(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="livediff-control-loader")
        return self._pool

    def _load(self, key: Key) -> Runner | DepthNet:
        kind, name = key
        parts = self.parts
        height, width = self.settings.height, self.settings.width
        with torch.inference_mode():
            if kind == "controlnet":
                controlnet = load_controlnet(self.sources[name], parts.unet, parts.device, parts.dtype)
                runner = self._create(self.settings, parts, controlnet)
                unet: Any = parts.unet
                config = unet.config
                latents = torch.zeros((1, config.in_channels, height // 8, width // 8), device=parts.device,
                                      dtype=parts.dtype)  # fmt: skip
                embeds = torch.zeros((1, parts.tokenizer.model_max_length, config.cross_attention_dim),
                                     device=parts.device, dtype=parts.dtype)  # fmt: skip
                image = torch.zeros((1, 3, height, width), device=parts.device, dtype=parts.dtype)
                one = torch.ones(1, device=parts.device)
                runner(latents, one, embeds, image, one)  # first-run costs (torch.compile) here, not in a step
                log.info("ControlNet %s (%s) ready", name, self.sources[name])
                return runner
            model = load_depth_model(self.settings.depth_model, parts.device, parts.dtype)
            depth = DepthNet(model, create_depth(self.settings, parts, model))
            preprocessors.depth(torch.zeros((1, 3, height, width), device=parts.device, dtype=parts.dtype),
                                depth.model, depth.network)  # fmt: skip
            log.info("depth model %s ready", self.settings.depth_model)
            return depth

    def _done(self, key: Key) -> Future[Any] | None:
        """The load of `key` if it ran to an end (a result or an error); None while it is queued or
        running, never asked for, or cancelled."""
        future = self._loads.get(key)
        return None if future is None or not future.done() or future.cancelled() else future

    def _result(self, key: Key) -> Any:
        future = self._done(key)
        return None if future is None or future.exception() is not None else future.result()

    def runner(self, name: str) -> Runner | None:
        """ControlNet `name`'s runner once loaded, else None."""
        return self._result(("controlnet", name))  # type: ignore[no-any-return]

    def runners(self, names: Iterable[str]) -> dict[str, Runner]:
        """The runners of loaded ControlNets `names`, by name (`KeyError` for one not loaded)."""
        found = {name: self.runner(name) for name in names}
        missing = [name for name, runner in found.items() if runner is None]
        if missing:
            raise KeyError(f"ControlNets not loaded: {', '.join(missing)}")
        return {name: runner for name, runner in found.items() if runner is not None}

    def depth(self) -> DepthNet | None:
        """The depth estimator once loaded, else None."""
        return self._result(DEPTH)  # type: ignore[no-any-return]

    def error(self, key: Key) -> str | None:
        """Why the load of `key` failed, or None."""
        future = self._done(key)
        return None if future is None or future.exception() is None else str(future.exception())

    def state(self, key: Key) -> str:
        """`ready`, `loading`, `failed` or `unloaded` (never asked for)."""
        future = self._loads.get(key)
        if future is None or future.cancelled():
            return "unloaded"
        return load_state(future)

    def ready(self, control: ControlParams) -> bool:
        """Whether `control` can run now: its ControlNet loaded and, for `depth`, the depth estimator."""
        if self.runner(control.name) is None:
            return False
        return control.preprocessor != "depth" or self.depth() is not None


@dataclass(frozen=True)
class DepthNet:
    """The loaded depth estimator: its model (input size, normalisation) and its network as the backend runs it."""

    model: DepthParts
    network: Runner


@dataclass(frozen=True)
class ControlRow:
    """One ControlNet on one row of a UNet call."""

    name: str
    """The ControlNet (`EngineSettings.controlnets`)."""
    scale: torch.Tensor
    """() float32 on the device: the row's conditioning scale (a tensor, so that a recorded step
    reads each replay's scale from its inputs)."""
    image: torch.Tensor
    """(3, H, W) control image in [0, 1], the row's stream's."""


@dataclass(frozen=True)
class ControlInput:
    """One of a frame's ControlNets as a step takes it: what fixes the step's work (`name`, `active`)
    beside its tensors (`image`, `scale`), so that a recorded step replays with any image and scale."""

    name: str
    active: tuple[bool, ...]
    """Per denoising step of the stream: whether the ControlNet runs then (`ControlParams.active`)."""
    image: torch.Tensor
    """(3, H, W) control image in [0, 1]."""
    scale: torch.Tensor
    """() float32 on the device."""


class RowIndices:
    """Device index tensors for row tuples, each made once and kept: the rows a ControlNet runs on are
    fixed by a step's layout, so a recorded step reads the same tensor on every replay (it is made
    when the layout's first step runs eagerly, never while a step is recorded)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._made: dict[tuple[int, ...], torch.Tensor] = {}

    def __call__(self, rows: tuple[int, ...]) -> torch.Tensor:
        found = self._made.get(rows)
        if found is None:
            found = self._made[rows] = torch.tensor(rows, dtype=torch.long).to(self.device)
        return found


def residuals(rows: Sequence[Sequence[ControlRow]], latents: torch.Tensor, timesteps: torch.Tensor,
              embeds: torch.Tensor, runners: Mapping[str, Runner],
              indices: Callable[[tuple[int, ...]], torch.Tensor] | None = None) -> torch.Tensor | None:  # fmt: skip
    """The summed ControlNet residuals of one UNet call, (rows, total); None when no row has a ControlNet.

    `latents`, `timesteps`, `embeds` are the call's (the ControlNet sees what the UNet sees). Each
    ControlNet runs once, on the rows that use it; a ControlNet every row uses in order runs on the
    call's tensors as they are and its output is the sum (the common case: no gather, no zeros).
    `indices` gives the device index tensor of a row tuple (`RowIndices`; default: made per call).
    Nothing here reads the host's values of a tensor, so a step with ControlNets can be recorded.
    """
    groups: dict[str, list[tuple[int, ControlRow]]] = {}
    for r, controls in enumerate(rows):
        for control in controls:
            groups.setdefault(control.name, []).append((r, control))
    total: torch.Tensor | None = None
    device = latents.device
    for name, members in groups.items():
        index = tuple(r for r, _ in members)
        images = torch.stack([c.image for _, c in members])
        scales = torch.stack([c.scale for _, c in members]).float()
        if index == tuple(range(len(rows))):
            out = runners[name](latents, timesteps, embeds, images, scales)
            total = out if total is None else total.add_(out)
            continue
        at = indices(index) if indices is not None else torch.tensor(index, dtype=torch.long).to(device)
        out = runners[name](latents.index_select(0, at), timesteps.index_select(0, at), embeds.index_select(0, at),
                            images, scales)  # fmt: skip
        if total is None:
            total = torch.zeros((len(rows), out.shape[1]), device=device, dtype=out.dtype)
        total.index_add_(0, at, out)
    return total
