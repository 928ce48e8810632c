"""ONNX: export the three networks once into the engine cache, check them, run them with ONNX Runtime.

Exporter: the dynamo exporter (`torch.onnx.export(..., dynamo=True)`). It exports the diffusers
UNet2DConditionModel and AutoencoderTiny with a symbolic batch dimension, matches torch within
~5e-6 in float32, and emits a clean opset-18 graph (no Constant/Identity clutter, attention as
MatMul/Softmax that TensorRT fuses). The TorchScript exporter (`dynamo=False`) also works and
exports ~20x faster, but it is deprecated and frozen upstream; an export runs once per key, so the
maintained path wins.

Shapes: height and width are static (part of the key), the batch axis is dynamic, so one file
serves every batch the engine forms (frames x guidance x stream-batch steps).

Extra inputs: the UNet can be exported with optional extra inputs and outputs (`UNetExtras`: the
temporal feature bank's keys and values), after the plain three inputs and the prediction, with
their own dynamic axes; such a graph is a separate artifact, keyed by the extras' tag, and checked
against torch output by output like the plain one.

On the CPU, ONNX Runtime runs a second artifact derived from the export: onnxscript's ORT
rewriter replaces attention, layer-norm-with-residual and GELU subgraphs by ORT's fused kernels
(`com.microsoft` ops): the tiny UNet at 512x512 went from 35-37 to 33-34 ms on 2 cores, outputs
equal to 3e-7 (its attention is small; the SD UNet's is not). The plain export stays the portable
graph that TensorRT builds from (it has no such ops), and CUDA keeps it too until the fused graph
has been checked there.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import onnx_ir
import onnxruntime as ort
import onnxscript
import torch
from onnxscript.rewriter import ort_fusions

from livediff.backends.base import CompiledBackend
from livediff.backends.cache import (
    COMPONENTS,
    CONTROLNET,
    DEPTH,
    KNOWN_COMPONENTS,
    Artifact,
    EngineCache,
    EngineKey,
    damaged,
    device_tag,
    precision_tag,
)
from livediff.backends.control_residuals import RESIDUALS, ControlNetResiduals
from livediff.backends.modules import DepthNetwork, UNet, VaeDecoder, VaeEncoder
from livediff.backends.temporal_attention import EMPTY_SLOT
from livediff.backends.unet_extras import NO_EXTRAS, ExtrasUNet, UNetExtras, unet_extras
from livediff.backends.unet_feature import DYNAMIC_AXES, TensorSpec
from livediff.config import EngineSettings
from livediff.errors import BackendUnavailable, ConfigError, LivediffError
from livediff.models import ModelParts

log = logging.getLogger(__name__)

OPSET = 18
"""The dynamo exporter's native opset (no version conversion); ONNX Runtime and TensorRT 10 run it."""
EXPORTER = f"onnx-opset{OPSET}-torch{torch.__version__}-diffusers{diffusers.__version__}"
ONNX_FILE = "model.onnx"
ORT_FUSIONS = f"ort-fusions-onnxscript{onnxscript.__version__}"
INPUTS = {
    "vae_encoder": ("images",),
    "unet": ("latents", "timesteps", "embeds"),
    "vae_decoder": ("latents",),
    CONTROLNET: ("latents", "timesteps", "embeds", "control_image", "control_scale"),
    DEPTH: ("pixel_values",),
}
OUTPUTS = {"vae_encoder": "latents", "unet": "prediction", "vae_decoder": "images", CONTROLNET: RESIDUALS,
           DEPTH: "depth"}  # fmt: skip
TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2, "bf16": 1e-1}
"""Largest max-abs difference from torch, relative to max(1, largest |output|).

fp32: kernels differ only in summation order, ~1e-7 relative per op; measured 5e-6 on the tiny
model, so 1e-3 leaves room for the ~10x deeper SD UNet. A broken export (wrong op semantics,
timesteps or scaling) is off by 1e-1 or more. fp16: one ulp is ~1e-3 relative and it compounds
over the layers; 5e-2 still catches broken graphs. bf16 (OpenVINO on the CPU): 8 significant
bits, one ulp ~4e-3 relative; measured up to 2e-2 on the tiny model, so 1e-1 (a graph that is
wrong, not rounded, is off by the size of its output).
"""

Progress = Callable[[str], None]


class ParityError(LivediffError):
    """An exported or compiled network disagrees with torch beyond the tolerance."""


# -- what gets exported ------------------------------------------------------------------------------


def torch_module(parts: ModelParts, component: str, extras: UNetExtras = NO_EXTRAS) -> torch.nn.Module:
    """The network as the engine calls it; the UNet with `extras` returns (prediction, *extra outputs);
    the `controlnet` is `parts.controlnet`'s and the `depth` estimator `parts.depth`'s (see
    `ModelParts.with_controlnet`, `with_depth`)."""
    if extras and component != "unet":
        raise ValueError(f"only the unet takes extra inputs, not the {component}")
    if component == "vae_encoder":
        return VaeEncoder(parts.vae).eval()
    if component == "unet":
        return (ExtrasUNet(parts.unet, extras) if extras else UNet(parts.unet)).eval()
    if component == "vae_decoder":
        return VaeDecoder(parts.vae).eval()
    if component == CONTROLNET:
        if parts.controlnet is None:
            raise ValueError("the controlnet component needs parts.with_controlnet(...)")
        return ControlNetResiduals(parts.controlnet.model).eval()
    if component == DEPTH:
        if parts.depth is None:
            raise ValueError("the depth component needs parts.with_depth(...)")
        return DepthNetwork(parts.depth.model).eval()
    raise ValueError(f"component must be one of {', '.join(KNOWN_COMPONENTS)}, got {component!r}")


def export_dtype(parts: ModelParts) -> torch.dtype:
    """float32 on CPU (ONNX Runtime's CPU kernels are float32); the model dtype on CUDA."""
    if parts.device.type != "cuda":
        return torch.float32
    if parts.dtype not in (torch.float16, torch.float32):
        raise ConfigError(f"the onnx and tensorrt backends run float16 or float32 on CUDA, not {parts.dtype}")
    return parts.dtype


def input_names(component: str, extras: UNetExtras = NO_EXTRAS) -> list[str]:
    return [*INPUTS[component], *(spec.name for spec in extras.inputs)]


def output_names(component: str, extras: UNetExtras = NO_EXTRAS) -> list[str]:
    return [OUTPUTS[component], *(spec.name for spec in extras.outputs)]


def sample_inputs(
    parts: ModelParts, component: str, height: int, width: int, batch: int, dtype: torch.dtype, seed: int = 0,
    extras: UNetExtras = NO_EXTRAS, bank: int = 2,
) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """Random inputs shaped as the engine calls the network (timesteps stay float32, as the engine passes them).

    With `extras`, their inputs follow, `bank` slots on the bank axis; float32 specs (logit biases)
    get a mix of weights and empty slots, so masking is part of every check. The `controlnet` gets a
    control image in [0, 1] and a different conditioning scale per row (0 among them); the `depth`
    estimator normalised images at its input size for frames of `height` x `width`.
    """
    generator = torch.Generator().manual_seed(seed)
    latent = (height // 8, width // 8)
    vae_config: Any = parts.vae.config
    unet_config: Any = parts.unet.config  # type: ignore[attr-defined]
    if component == "vae_encoder":
        tensors: tuple[torch.Tensor, ...] = (torch.rand(batch, 3, height, width, generator=generator) * 2 - 1,)
    elif component == DEPTH:
        assert parts.depth is not None, "the depth component needs parts.with_depth(...)"
        tensors = (torch.randn(batch, 3, *parts.depth.input_size(height, width), generator=generator),)
    elif component == "vae_decoder":
        tensors = (torch.randn(batch, vae_config.latent_channels, *latent, generator=generator),)
    else:
        tokens = parts.tokenizer.model_max_length
        tensors = (
            torch.randn(batch, unet_config.in_channels, *latent, generator=generator),
            torch.linspace(999.0, 1.0, batch),
            torch.randn(batch, tokens, unet_config.cross_attention_dim, generator=generator),
        )
        if component == CONTROLNET:
            tensors += (torch.rand(batch, 3, height, width, generator=generator), torch.linspace(0.0, 1.5, batch))
    tensors = tuple(t.to(parts.device, torch.float32 if t.dim() == 1 else dtype) for t in tensors)
    extra = tuple(_sample_extra(spec, batch, bank, generator).to(parts.device, torch.float32 if spec.float32 else dtype)
                  for spec in extras.inputs)  # fmt: skip
    return tensors + extra


def _sample_extra(spec: TensorSpec, batch: int, bank: int, generator: torch.Generator) -> torch.Tensor:
    shape = [batch if d == "batch" else bank if d == "bank" else int(d) for d in spec.shape]
    if not spec.float32:
        return torch.randn(shape, generator=generator)
    # logit biases: row r gets weights ln(0.5), ln(1), ln(2) in turn on its first slots, the rest empty
    bias = torch.full(shape, EMPTY_SLOT)
    for row in range(batch):
        filled = row % (bank + 1)  # 0 (no bank) .. bank slots filled
        bias[row, :filled] = math.log(2.0 ** (row % 3 - 1))
    return bias


def export_onnx(module: torch.nn.Module, sample: tuple[torch.Tensor, ...], component: str, path: Path,
                extras: UNetExtras = NO_EXTRAS) -> None:  # fmt: skip
    """Write `module` as an ONNX graph with a dynamic batch axis (weights in `path`.data beside it).

    Weights always go to an external file: over 2 GB (SD UNet in float32) they must, and one layout
    for every model keeps the cache simple. `sample` must have a batch (and bank) above 1, or the
    axis is specialised away. `extras`' inputs come after the plain ones, with their dynamic axes.
    """
    axes = {name: torch.export.Dim(name, min=low, max=high) for name, (low, high) in DYNAMIC_AXES.items()}
    axes["batch"] = torch.export.Dim("batch", min=1)
    plain = tuple({0: axes["batch"]} for _ in INPUTS[component])
    dynamic: tuple[Any, ...] = plain
    if extras:  # ExtrasUNet.forward(latents, timesteps, embeds, *extra): the extras are one varargs group
        dynamic = (*plain, tuple({i: axes[name] for i, name in spec.dynamic().items()} for spec in extras.inputs))
    with _quiet_exporter():
        torch.onnx.export(
            module,
            sample,
            str(path),
            input_names=input_names(component, extras),
            output_names=output_names(component, extras),
            dynamic_shapes=dynamic,
            opset_version=OPSET,
            dynamo=True,
            external_data=True,
            verbose=False,
        )


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's notes that say nothing about our graphs: torchvision ops it cannot
    register (nothing here uses them), a deprecated pytree check inside torch, and the batch axis
    name it merges (all inputs share one batch dimension on purpose). Parity is checked after."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
            warnings.filterwarnings("ignore", message=r"# The axis name: (batch|bank)", category=UserWarning)
            yield
    finally:
        registration.setLevel(level)


def check_outputs(label: str, expected: torch.Tensor | tuple[torch.Tensor, ...], actual: list[torch.Tensor],
                  precision: str, names: list[str]) -> float:  # fmt: skip
    """`check_parity` over every output of a graph (`expected` a tensor or a tuple); the largest difference."""
    wanted = expected if isinstance(expected, tuple) else (expected,)
    if len(wanted) != len(actual):
        raise ParityError(f"{label}: {len(actual)} outputs, torch gives {len(wanted)}")
    return max(check_parity(f"{label} {name}", e, a, precision) for e, a, name in zip(wanted, actual, names))


def check_parity(label: str, expected: torch.Tensor, actual: torch.Tensor, precision: str) -> float:
    """The max abs difference of `actual` from `expected`; raises `ParityError` above the tolerance."""
    expected, actual = expected.float().cpu(), actual.float().cpu()
    if expected.shape != actual.shape:
        raise ParityError(f"{label}: output shape {tuple(actual.shape)}, torch gives {tuple(expected.shape)}")
    diff = (expected - actual).abs().max().item()
    tolerance = TOLERANCE[precision] * max(1.0, expected.abs().max().item())
    if not diff <= tolerance:  # also catches NaN
        raise ParityError(
            f"{label}: max abs diff from torch {diff:.3g} exceeds the tolerance {tolerance:.3g}; the exported graph "
            "is wrong (an exporter or runtime bug): report it with the model name, then use --backend torch"
        )
    return diff


# -- the engine cache --------------------------------------------------------------------------------


def component_model(parts: ModelParts, component: str) -> str:
    """What the key names as the model: the ControlNet for the `controlnet`, the depth estimator for
    `depth`, else the model."""
    if component == CONTROLNET:
        assert parts.controlnet is not None, "the controlnet component needs parts.with_controlnet(...)"
        return parts.controlnet.ref
    if component == DEPTH:
        assert parts.depth is not None, "the depth component needs parts.with_depth(...)"
        return parts.depth.ref
    return parts.ref


def component_revision(parts: ModelParts, component: str) -> str:
    """The model revision, plus the VAE choice for the VAE halves (`--vae` swaps them, not the UNet);
    the ControlNet's (the depth estimator's) revision for the `controlnet` (`depth`).

    A CPU export of a bfloat16 model is a float32 copy of bfloat16-rounded weights: not the
    float32 model's graph, so the weights' dtype is part of its revision.
    """
    if component == CONTROLNET:
        assert parts.controlnet is not None, "the controlnet component needs parts.with_controlnet(...)"
        revision = parts.controlnet.revision
    elif component == DEPTH:
        assert parts.depth is not None, "the depth component needs parts.with_depth(...)"
        revision = parts.depth.revision
    else:
        revision = parts.revision if component == "unet" else f"{parts.revision}+vae={parts.vae_ref}"
    if parts.dtype != export_dtype(parts):
        revision += f"+weights={precision_tag(parts.dtype)}"
    return revision


def onnx_key(settings: EngineSettings, parts: ModelParts, component: str, extras: UNetExtras = NO_EXTRAS) -> EngineKey:
    return EngineKey(
        model=component_model(parts, component),
        revision=component_revision(parts, component),
        component=component,
        height=settings.height,
        width=settings.width,
        batch="dynamic",
        precision=precision_tag(export_dtype(parts)),
        runtime=EXPORTER,
        device=device_tag(parts.device),
        extras=extras.tag,
    )


def artifact_label(component: str, extras: UNetExtras = NO_EXTRAS) -> str:
    """How progress lines name an artifact: `unet`, or `unet+bank-v1` for the UNet with extra inputs."""
    return f"{component}+{extras.tag}" if extras else component


def ensure_onnx(
    settings: EngineSettings, parts: ModelParts, component: str, progress: Progress, verify: bool = True,
    extras: UNetExtras = NO_EXTRAS,
) -> Artifact:  # fmt: skip
    """The cached ONNX file of `component` (with `extras`), exported (and, with `verify`, checked on
    ONNX Runtime) if missing.

    The TensorRT backend passes `verify=False`: it checks the engine it compiles from this file instead.
    """
    key = onnx_key(settings, parts, component, extras)
    dtype = export_dtype(parts)
    label = artifact_label(component, extras)

    def build(path: Path) -> None:
        module = export_module(parts, component, extras)
        size = f"{settings.width}x{settings.height}"
        progress(f"exporting {label} ({size}, {key.precision}) to ONNX (opset {OPSET})...")
        sample = sample_inputs(parts, component, settings.height, settings.width, 2, dtype, extras=extras)
        export_onnx(module, sample, component, path, extras)
        if verify:
            verify_on_ort(settings, parts, component, module, path, "export", progress, extras)

    artifact = EngineCache(settings.engines_dir).get_or_build(key, ONNX_FILE, build)
    progress(f"{label}: {'built' if artifact.built else 'reused'} {artifact.path}")
    return artifact


def ensure_ort_graph(settings: EngineSettings, parts: ModelParts, component: str, progress: Progress,
                     extras: UNetExtras = NO_EXTRAS) -> Artifact:  # fmt: skip
    """The export with ONNX Runtime's fused kernels put in (see the module docstring), checked against torch."""
    source = ensure_onnx(settings, parts, component, progress, extras=extras)
    key = dataclasses.replace(onnx_key(settings, parts, component, extras), runtime=f"{EXPORTER}+{ORT_FUSIONS}")
    label = artifact_label(component, extras)

    def build(path: Path) -> None:
        model, counts = ort_fusions.optimize_for_ort(onnx_ir.load(source.path))
        onnx_ir.save(model, path, external_data=path.name + ".data")
        fused = ", ".join(f"{n} {name}" for name, n in counts.items() if n) or "nothing"
        progress(f"{label}: fused for ONNX Runtime: {fused}")
        module = export_module(parts, component, extras)
        verify_on_ort(settings, parts, component, module, path, "fused graph", progress, extras)

    artifact = EngineCache(settings.engines_dir).get_or_build(key, ONNX_FILE, build)
    progress(f"{label}: {'built' if artifact.built else 'reused'} {artifact.path}")
    return artifact


def ensure_for_ort(settings: EngineSettings, parts: ModelParts, component: str, progress: Progress,
                   extras: UNetExtras = NO_EXTRAS) -> Artifact:  # fmt: skip
    """What the onnx backend runs: the fused graph on the CPU, the plain export on CUDA, and the
    plain export for a UNet with LoRA inputs (the fusions turned its LoRA-added attention
    projections into an Attention node ONNX Runtime refused: "Invalid bias shape")."""
    if parts.device.type == "cpu" and not any(spec.name == "lora_scales" for spec in extras.inputs):
        return ensure_ort_graph(settings, parts, component, progress, extras)
    return ensure_onnx(settings, parts, component, progress, extras=extras)


def export_module(parts: ModelParts, component: str, extras: UNetExtras = NO_EXTRAS) -> torch.nn.Module:
    """The torch module that is exported, in the export dtype (a float32 copy for the CPU export)."""
    module = torch_module(parts, component, extras)
    dtype = export_dtype(parts)
    return copy.deepcopy(module).to(dtype) if dtype != parts.dtype else module


def verify_on_ort(
    settings: EngineSettings, parts: ModelParts, component: str, module: torch.nn.Module, path: Path, what: str,
    progress: Progress, extras: UNetExtras = NO_EXTRAS,
) -> None:  # fmt: skip
    """Run the graph at `path` on ONNX Runtime and `module` on the same new inputs (batch 3, and 3
    bank slots where the graph has a bank axis: neither is the export's 2); `ParityError` if apart."""
    dtype = export_dtype(parts)
    check = sample_inputs(parts, component, settings.height, settings.width, 3, dtype, seed=1, extras=extras, bank=3)
    with torch.inference_mode():
        expected = module(*check)
        actual = OrtRunner(path, parts.device).run(*check)
    label = f"{artifact_label(component, extras)} {what} ({settings.width}x{settings.height}, {precision_tag(dtype)})"
    diff = check_outputs(label, expected, actual, precision_tag(dtype), output_names(component, extras))
    progress(f"{artifact_label(component, extras)}: {what} matches torch on ONNX Runtime, max abs diff {diff:.2e} "
             "(batch 3)")  # fmt: skip


# -- running -----------------------------------------------------------------------------------------

_DTYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16}
_NUMPY = {torch.float32: np.float32, torch.float16: np.float16}


def require_onnxruntime(device: torch.device) -> None:
    """Raises `BackendUnavailable` when the installed onnxruntime cannot run on `device`."""
    if device.type not in ("cpu", "cuda"):
        raise BackendUnavailable(f"the onnx backend runs on cpu or cuda, not {device}")
    if device.type == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise BackendUnavailable(
            f"the onnx backend on {device} needs onnxruntime-gpu, but the installed onnxruntime {ort.__version__} "
            "has no CUDA execution provider: `pip uninstall onnxruntime && pip install onnxruntime-gpu`, "
            "or run with --device cpu, or --backend torch"
        )


def session_options() -> ort.SessionOptions:
    """ORT's CPU thread pool sized like torch's, and sleeping, not spinning, between runs.

    The engine runs small torch ops (noise, schedule, pre/postprocess) between the three ORT
    calls of a step. ORT's workers spin for a while after each run by default and take the cores
    those ops need: on 2 cores at 512x512 a step took 209 ms with spinning, 108 ms without.
    The same thread budget as torch keeps `livediff serve`'s spare core free for the video codecs.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class OrtRunner:
    """One ONNX Runtime session, called with torch tensors on the engine's device, returning one.

    CPU: numpy views of the tensors go in, the output array is wrapped without a copy.
    CUDA: IO binding to the tensors' device memory, so the data never visits the host; ORT runs on
    its own stream, ordered with torch's current stream by events, and its end-of-run host sync is
    disabled: no synchronisation inside a step.
    """

    def __init__(self, path: Path, device: torch.device) -> None:
        require_onnxruntime(device)
        self.device = device
        self.run_options = ort.RunOptions()
        if device.type == "cuda":
            # ORT takes the null handle of torch's default stream for "no stream" and would run on its own,
            # unordered with torch's: give it a stream of its own and order the two with events.
            self.stream = torch.cuda.Stream(device)
            options = {"device_id": str(device.index or 0), "user_compute_stream": str(self.stream.cuda_stream)}
            providers: list[tuple[str, dict[str, str]]] = [("CUDAExecutionProvider", options)]
            self.run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        else:
            providers = [("CPUExecutionProvider", {})]
        try:
            self.session = ort.InferenceSession(str(path), session_options(), providers=providers)
        except Exception as exc:  # a damaged file: name it and the command that clears it
            raise damaged(path, exc) from exc
        wanted, active = providers[0][0], self.session.get_providers()
        if active[0] != wanted:  # ORT logs and carries on on the CPU when the CUDA libraries fail to load
            raise BackendUnavailable(f"onnxruntime could not start {wanted} (active: {active}); see its log above")
        self.inputs = [(i.name, _DTYPES[i.type]) for i in self.session.get_inputs()]
        # (name, dtype, shape after the batch: static in every graph exported here)
        self.outputs = [(o.name, _DTYPES[o.type], tuple(int(d) for d in o.shape[1:]))
                        for o in self.session.get_outputs()]  # fmt: skip

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        """The graph's first output (the only one but for the UNet with extras)."""
        return self.run(*tensors)[0]

    def run(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Every output, in the graph's order."""
        # Contiguous and in the graph's dtype: no-ops when they already are.
        args = [t.detach().to(dtype).contiguous() for t, (_, dtype) in zip(tensors, self.inputs, strict=True)]
        if self.device.type == "cpu":
            feeds = {name: a.numpy() for a, (name, _) in zip(args, self.inputs)}
            return [torch.from_numpy(out) for out in self.session.run(None, feeds, self.run_options)]
        return self._run_cuda(args)

    def _run_cuda(self, args: list[torch.Tensor]) -> list[torch.Tensor]:
        index = self.device.index or 0
        binding = self.session.io_binding()
        for a, (name, dtype) in zip(args, self.inputs):
            binding.bind_input(name, "cuda", index, _NUMPY[dtype], tuple(a.shape), a.data_ptr())
        outs = []
        for name, dtype, tail in self.outputs:
            out = torch.empty((args[0].shape[0], *tail), dtype=dtype, device=self.device)
            binding.bind_output(name, "cuda", index, _NUMPY[dtype], tuple(out.shape), out.data_ptr())
            outs.append(out)
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)  # inputs ready before ORT reads them
        self.session.run_with_iobinding(binding, self.run_options)
        current.wait_stream(self.stream)  # torch's next kernels wait for the output (no host sync)
        return outs


class OnnxBackend(CompiledBackend):
    """The three networks on ONNX Runtime, from the engine cache (exported on first use)."""

    def __init__(self, settings: EngineSettings, parts: ModelParts, progress: Progress | None = None) -> None:
        require_onnxruntime(parts.device)  # before any export: a missing runtime fails fast
        report = progress or log.info
        runners = [OrtRunner(ensure_for_ort(settings, parts, c, report).path, parts.device) for c in COMPONENTS]
        extras = unet_extras(settings, parts)
        extras_unet = None
        if extras:
            extras_unet = OrtRunner(ensure_for_ort(settings, parts, "unet", report, extras).path, parts.device).run
        # ORT's CPU pool has torch's thread count (session_options); the few torch ops around its
        # runs in a step take one thread: 2-thread torch ops left OpenMP workers spinning into the
        # next ORT run (512x512 on 2 cores: VAE encode 32 -> 26 ms, see `livediff bench`)
        threads = 1 if parts.device.type == "cpu" else None
        super().__init__(f"onnx-{parts.device.type}", runners, parts.dtype, torch_threads=threads,
                         extras=extras, extras_unet=extras_unet)  # fmt: skip
