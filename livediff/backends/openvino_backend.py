"""OpenVINO: compile the cached ONNX graphs for this CPU, check them, run them.

Why a second CPU runtime: ONNX Runtime has no bfloat16 kernels on the CPU, OpenVINO has, and on
CPUs with bf16 instructions (AVX512_BF16, AMX) they are about twice as fast: the tiny model's three
networks at 512x512 on 2 Zen 4 cores take ~60 ms in bf16, against ~100 ms for ONNX Runtime or
OpenVINO in float32 (`livediff bench --dtype bfloat16 --backend onnx,openvino`).

Precision follows the engine's dtype (`--dtype`): float32 runs f32, bfloat16 runs bf16 where the
CPU has bf16 instructions and f32 where it has not (the key and the backend's name say which).
The compiled model is cached in `engines/` like a TensorRT engine, tied to the OpenVINO version
and the precision; it is built from the plain ONNX export (the batch axis stays dynamic) and
checked against torch once, when built. `openvino` is imported only here, and only when needed.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from livediff.backends.base import CompiledBackend
from livediff.backends.cache import COMPONENTS, Artifact, EngineCache, EngineKey, damaged
from livediff.backends.onnx_backend import (
    EXPORTER,
    NO_EXTRAS,
    Progress,
    artifact_label,
    check_outputs,
    ensure_onnx,
    export_module,
    onnx_key,
    output_names,
    sample_inputs,
)
from livediff.backends.unet_extras import UNetExtras, unet_extras
from livediff.config import EngineSettings
from livediff.errors import BackendUnavailable
from livediff.models import ModelParts

log = logging.getLogger(__name__)

BLOB_FILE = "model.blob"
_HINTS = {"fp32": "f32", "bf16": "bf16"}


def require_openvino(device: torch.device) -> ModuleType:
    """The `openvino` module; raises `BackendUnavailable` naming all that is missing (CPU device, package)."""
    missing = []
    if device.type != "cpu":
        missing.append(f"the engine on the CPU (its device is {device}; on CUDA use --backend tensorrt or onnx)")
    try:
        import openvino
    except ImportError as exc:
        missing.append(f"the openvino package ({exc}): `pip install 'livediff[openvino]'`")
    if missing:
        raise BackendUnavailable(
            "the openvino backend needs " + " and ".join(missing) + "; or run with --backend onnx or --backend torch"
        )
    return openvino


@functools.cache
def _core(ov: ModuleType) -> Any:
    return ov.Core()


def cpu_has_bf16(ov: ModuleType) -> bool:
    """Whether OpenVINO computes bf16 natively on this CPU (AVX512_BF16 or AMX instructions)."""
    return "BF16" in _core(ov).get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def run_precision(ov: ModuleType, dtype: torch.dtype) -> str:
    """What the networks compute in: `bf16` for a bfloat16 engine on a CPU with bf16 instructions, else `fp32`."""
    return "bf16" if dtype == torch.bfloat16 and cpu_has_bf16(ov) else "fp32"


def blob_key(settings: EngineSettings, parts: ModelParts, component: str, ov: ModuleType,
             extras: UNetExtras = NO_EXTRAS) -> EngineKey:  # fmt: skip
    """The ONNX export's key, with the run precision and the OpenVINO version."""
    return dataclasses.replace(
        onnx_key(settings, parts, component, extras),
        precision=run_precision(ov, parts.dtype),
        runtime=f"openvino-{ov.__version__}+{EXPORTER}",
    )


def cpu_config(precision: str) -> dict[str, Any]:
    """For compiling and for loading a compiled model: a loaded one takes the CPU's default
    precision (bf16 where the CPU has it) unless told again."""
    return {
        "INFERENCE_PRECISION_HINT": _HINTS[precision],
        "PERFORMANCE_HINT": "LATENCY",  # one request at a time, on all its threads
        "INFERENCE_NUM_THREADS": torch.get_num_threads(),  # as ONNX Runtime: keep the server's spare core free
    }


def compile_onnx(ov: ModuleType, onnx_path: Path, precision: str) -> Any:
    return _core(ov).compile_model(str(onnx_path), "CPU", cpu_config(precision))


class OvRunner:
    """One compiled model, called with CPU torch tensors; returns a tensor of its own (the output is copied)."""

    def __init__(self, compiled: Any) -> None:
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self.inputs = [port.get_any_name() for port in compiled.inputs]

    @classmethod
    def load(cls, ov: ModuleType, path: Path, precision: str) -> OvRunner:
        try:
            compiled = _core(ov).import_model(path.read_bytes(), "CPU", cpu_config(precision))
        except Exception as exc:  # a damaged blob: name it and the command that clears it
            raise damaged(path, exc) from exc
        loaded = compiled.get_property("INFERENCE_PRECISION_HINT")
        if loaded != getattr(ov.Type, _HINTS[precision]):
            raise RuntimeError(f"OpenVINO loaded {path} to run in {loaded}, not {precision}; delete it")
        return cls(compiled)

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        """The first output (the only one but for the UNet with extras)."""
        return self.run(*tensors)[0]

    def run(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Every output, in the graph's order."""
        feeds = {name: t.detach().float().contiguous().numpy() for name, t in zip(self.inputs, tensors, strict=True)}
        result = self.request.infer(feeds, share_inputs=True, share_outputs=False)
        return [torch.from_numpy(result[i]) for i in range(len(self.compiled.outputs))]


def ensure_blob(settings: EngineSettings, parts: ModelParts, component: str, progress: Progress,
                extras: UNetExtras = NO_EXTRAS) -> Artifact:  # fmt: skip
    """The cached compiled model of `component` (with `extras`), compiled from the cached ONNX file and
    checked if missing.

    Checked twice when built: compiled in f32 it must match torch as closely as ONNX Runtime does
    (a conversion error shows there), and the run precision within that precision's tolerance.
    """
    ov = require_openvino(parts.device)
    key = blob_key(settings, parts, component, ov, extras)
    label = artifact_label(component, extras)

    def build(path: Path) -> None:
        onnx = ensure_onnx(settings, parts, component, progress, verify=False, extras=extras)
        progress(f"compiling {label} with OpenVINO {ov.__version__} ({key.precision})...")
        check = sample_inputs(parts, component, settings.height, settings.width, 2, torch.float32, seed=1,
                              extras=extras, bank=3)  # fmt: skip
        names = output_names(component, extras)
        with torch.inference_mode():
            expected = export_module(parts, component, extras)(*check)  # float32, as the ONNX file
            for precision in dict.fromkeys(("fp32", key.precision)):
                compiled = compile_onnx(ov, onnx.path, precision)
                diff = check_outputs(f"OpenVINO {label}", expected, OvRunner(compiled).run(*check), precision, names)
                progress(f"{label}: OpenVINO {precision} matches torch, max abs diff {diff:.2e} (batch 2)")
        path.write_bytes(compiled.export_model().getbuffer())

    artifact = EngineCache(settings.engines_dir).get_or_build(key, BLOB_FILE, build)
    progress(f"{label}: {'built' if artifact.built else 'reused'} {artifact.path}")
    return artifact


class OpenVinoBackend(CompiledBackend):
    """The three networks compiled by OpenVINO for the CPU, from the engine cache (built on first use)."""

    def __init__(self, settings: EngineSettings, parts: ModelParts, progress: Progress | None = None) -> None:
        ov = require_openvino(parts.device)  # before any export: what is missing, and how to get it
        precision = run_precision(ov, parts.dtype)
        report = progress or log.info
        runners = [OvRunner.load(ov, ensure_blob(settings, parts, c, report).path, precision) for c in COMPONENTS]
        extras = unet_extras(settings, parts)
        extras_unet = None
        if extras:
            extras_unet = OvRunner.load(ov, ensure_blob(settings, parts, "unet", report, extras).path, precision).run
        # OpenVINO has its own CPU pool: torch's ops around its runs take one thread (see OnnxBackend)
        super().__init__(f"openvino-{precision}", runners, parts.dtype, torch_threads=1, extras=extras,
                         extras_unet=extras_unet)  # fmt: skip
