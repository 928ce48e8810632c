"""TensorRT: compile the cached ONNX graphs into engines for this GPU, check them, run them.

Each engine has one optimisation profile: height and width fixed, the batch from 1 to the most the
engine can ask for (see `batch_profile`); a UNet with extra inputs (the feature bank) also spans
their other dynamic axes (the bank's 1 to 4 frames, see `input_profiles`). Engines are tied to the
GPU's compute capability and the TensorRT version, both in the cache key. `tensorrt` is imported
only here, and only when needed.

Precision: the network is strongly typed, so the engine computes in the ONNX file's dtype, which is
the model's (float16 on CUDA by default). Not `BuilderFlag.FP16`: weak typing is deprecated since
TensorRT 10.12 and removed in 11, which `pip install tensorrt` now installs; strong typing works on both.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from livediff.backends.base import CompiledBackend
from livediff.backends.cache import (
    COMPONENTS,
    CONTROLNET,
    Artifact,
    EngineCache,
    EngineKey,
    damaged,
    device_tag,
    precision_tag,
)
from livediff.backends.onnx_backend import (
    EXPORTER,
    INPUTS,
    NO_EXTRAS,
    Progress,
    artifact_label,
    check_outputs,
    component_model,
    component_revision,
    ensure_onnx,
    export_dtype,
    output_names,
    sample_inputs,
    torch_module,
)
from livediff.backends.unet_extras import UNetExtras, unet_extras
from livediff.backends.unet_feature import DYNAMIC_AXES
from livediff.config import MAX_STEPS, EngineSettings
from livediff.errors import BackendUnavailable
from livediff.models import ModelParts

log = logging.getLogger(__name__)

PLAN_FILE = "model.plan"
WORKSPACE_BYTES = 8 << 30
"""Most scratch memory a layer's tactic may use while building (TensorRT's default is all free memory)."""


def require_tensorrt(device: torch.device) -> ModuleType:
    """The `tensorrt` module; raises `BackendUnavailable` naming all that is missing (GPU, package)."""
    missing = []
    if device.type != "cuda" or not torch.cuda.is_available():
        missing.append(f"a CUDA GPU (the engine's device is {device})")
    try:
        import tensorrt
    except ImportError as exc:
        missing.append(f"the tensorrt package ({exc}): `pip install tensorrt` or `pip install 'livediff[tensorrt]'`")
    if missing:
        raise BackendUnavailable(
            "the tensorrt backend needs " + " and ".join(missing) + "; or run with --backend onnx or --backend torch"
        )
    return tensorrt


@functools.cache
def _logger(trt: ModuleType) -> Any:
    """One logger per process: TensorRT ignores (and warns about) a second one."""
    return trt.Logger(trt.Logger.WARNING)


def batch_profile(settings: EngineSettings, component: str) -> tuple[int, int, int]:
    """(min, opt, max) batch: the VAE sees frames; the UNet (and a ControlNet) frames x 2 (guidance) x
    steps (stream batch)."""
    frames = settings.max_batch
    if component not in ("unet", CONTROLNET):
        return 1, frames, frames
    return 1, frames, frames * 2 * (MAX_STEPS if settings.stream_batch else 1)


Shape = tuple[int, ...]


def input_profiles(
    settings: EngineSettings, component: str, static: dict[str, Shape], extras: UNetExtras = NO_EXTRAS
) -> dict[str, tuple[Shape, Shape, Shape]]:
    """(min, opt, max) shape of every network input. `static` holds each input's shape with -1 for
    dynamic axes (as TensorRT's parser reports them): the batch follows `batch_profile`, an extra
    input's named axes their `DYNAMIC_AXES` bounds (optimised for the smallest: one bank frame)."""
    batch = batch_profile(settings, component)
    specs = {spec.name: spec for spec in extras.inputs}
    profiles = {}
    for name, shape in static.items():
        axes: tuple[int | str, ...] = specs[name].shape if name in specs else ("batch", *shape[1:])
        if name not in specs and name not in INPUTS[component]:
            raise ValueError(f"{component} graph has an unexpected input {name!r}")
        picks = []
        for k in range(3):
            dims = []
            for axis in axes:
                if axis == "batch":
                    dims.append(batch[k])
                elif isinstance(axis, str):
                    low, high = DYNAMIC_AXES[axis]
                    dims.append((low, low, high)[k])
                else:
                    dims.append(int(axis))
            picks.append(tuple(dims))
        profiles[name] = (picks[0], picks[1], picks[2])
    return profiles


def engine_key(settings: EngineSettings, parts: ModelParts, component: str, trt_version: str,
               extras: UNetExtras = NO_EXTRAS) -> EngineKey:  # fmt: skip
    low, opt, high = batch_profile(settings, component)
    return EngineKey(
        model=component_model(parts, component),
        revision=component_revision(parts, component),
        component=component,
        height=settings.height,
        width=settings.width,
        batch=f"{low}-{opt}-{high}",
        precision=precision_tag(export_dtype(parts)),
        runtime=f"tensorrt-{trt_version}+{EXPORTER}",
        device=device_tag(parts.device),
        extras=extras.tag,
    )


def build_plan(trt: ModuleType, onnx_path: Path, plan_path: Path,
               profiles: Callable[[dict[str, Shape]], dict[str, tuple[Shape, Shape, Shape]]]) -> None:  # fmt: skip
    """Compile `onnx_path` (strongly typed, one optimisation profile over `profiles` of the inputs'
    parsed shapes); write the serialized engine."""
    builder = trt.Builder(_logger(trt))
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))  # 11: the default
    parser = trt.OnnxParser(network, _logger(trt))
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    shapes = builder.create_optimization_profile()
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    for name, (low, opt, high) in profiles({t.name: tuple(t.shape) for t in inputs}).items():
        shapes.set_shape(name, low, opt, high)
    config.add_optimization_profile(shapes)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}; its log above says why")
    plan_path.write_bytes(memoryview(plan))


class TrtRunner:
    """One deserialized engine, called with torch CUDA tensors; runs on its own stream, ordered by events.

    A stream of its own because TensorRT synchronises around `execute_async_v3` on the default
    stream, which the engine thread uses.
    """

    def __init__(self, path: Path, device: torch.device) -> None:
        trt = require_tensorrt(device)
        self.device = device
        self.stream = torch.cuda.Stream(device)
        with torch.cuda.device(device):
            self.engine = trt.Runtime(_logger(trt)).deserialize_cuda_engine(path.read_bytes())
            if self.engine is None:
                failed = RuntimeError("TensorRT could not deserialize it (another TensorRT version or GPU?)")
                raise damaged(path, failed)
            self.context = self.engine.create_execution_context()
        dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16}
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.inputs = [(n, dtypes[self.engine.get_tensor_dtype(n)]) for n in names if is_input[n]]
        self.outputs = [(n, dtypes[self.engine.get_tensor_dtype(n)]) for n in names if not is_input[n]]

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        """The first output (the only one but for the UNet with extras)."""
        return self.run(*tensors)[0]

    def run(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Every output, in the engine's order."""
        args = [t.to(dtype).contiguous() for t, (_, dtype) in zip(tensors, self.inputs, strict=True)]
        for a, (name, _) in zip(args, self.inputs):
            if not self.context.set_input_shape(name, tuple(a.shape)):
                raise ValueError(f"input {name} of shape {tuple(a.shape)} is outside this engine's profile")
            self.context.set_tensor_address(name, a.data_ptr())
        outs = []
        for name, dtype in self.outputs:
            out = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=dtype, device=self.device)
            self.context.set_tensor_address(name, out.data_ptr())
            outs.append(out)
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed; its log above says why")
        current.wait_stream(self.stream)
        return outs


def ensure_engine(settings: EngineSettings, parts: ModelParts, component: str, progress: Progress,
                  extras: UNetExtras = NO_EXTRAS) -> Artifact:  # fmt: skip
    """The cached engine of `component` (with `extras`), compiled from the cached ONNX file and checked
    against torch if missing."""
    trt = require_tensorrt(parts.device)
    key = engine_key(settings, parts, component, trt.__version__, extras)
    profile = batch_profile(settings, component)
    label = artifact_label(component, extras)

    def build(path: Path) -> None:
        onnx = ensure_onnx(settings, parts, component, progress, verify=False, extras=extras)
        progress(f"compiling {label} with TensorRT {trt.__version__} (batch {key.batch}); this takes minutes...")
        build_plan(trt, onnx.path, path, lambda static: input_profiles(settings, component, static, extras))
        batch = min(2, profile[2])
        check = sample_inputs(parts, component, settings.height, settings.width, batch, parts.dtype, seed=1,
                              extras=extras)  # fmt: skip
        with torch.inference_mode():
            expected = torch_module(parts, component, extras)(*check)
            actual = TrtRunner(path, parts.device).run(*check)
        names = output_names(component, extras)
        diff = check_outputs(f"TensorRT {label}", expected, actual, "fp16", names)  # fp32 engines run TF32
        progress(f"{label}: TensorRT parity max abs diff {diff:.2e} (batch {batch})")

    artifact = EngineCache(settings.engines_dir).get_or_build(key, PLAN_FILE, build)
    progress(f"{label}: {'built' if artifact.built else 'reused'} {artifact.path}")
    return artifact


class TensorRTBackend(CompiledBackend):
    """The three networks as TensorRT engines from the engine cache (compiled on first use)."""

    def __init__(self, settings: EngineSettings, parts: ModelParts, progress: Progress | None = None) -> None:
        require_tensorrt(parts.device)  # before any work: what is missing, and how to get it
        export_dtype(parts)  # bfloat16 is refused here too, not after an export
        report = progress or log.info
        runners = [TrtRunner(ensure_engine(settings, parts, c, report).path, parts.device) for c in COMPONENTS]
        extras = unet_extras(settings, parts)
        extras_unet = None
        if extras:
            extras_unet = TrtRunner(ensure_engine(settings, parts, "unet", report, extras).path, parts.device).run
        super().__init__("tensorrt", runners, parts.dtype, torch_threads=None,  # engines in the model's dtype
                         extras=extras, extras_unet=extras_unet)  # fmt: skip
