"""Many LoRAs in one UNet call: the base weights run once for the batch, each row adds its own.

The multi-LoRA serving rule (Punica, Chen et al. 2023, arXiv:2310.18547; S-LoRA, Sheng et al.
2023, arXiv:2311.03285): a layer's output for row i is `base(x_i) + sum_k s_ik * up_k(down_k(x_i))`
over the LoRAs k the row's stream applies, each at its own scale s_ik. The engine's LoRAs sit in
preallocated slots: per adapted layer one `down` buffer (slots, rank, in[, kh, kw]) and one `up`
buffer (slots, rank, out), zero-padded to the largest rank and zero where a LoRA leaves the layer
alone, allocated once when the engine starts. A call names each row's scale per slot, a
(rows, slots) matrix (`LORA_SCALES`): the one input every backend takes (`UNetFeature`).

How the torch backends run it: from the scale matrix (on the host) a plan of the rows that apply
any LoRA, in one of two strategies (`MultiLoRA.strategy`):

- `segmented`: per slot that any row applies, its rows (selected by index) times the
  slot's own `down` and `up` (views: no weight copied), scaled per row and added to those rows of
  the base output: one product pair per LoRA in use, as Punica's segmented kernel groups rows by
  adapter.
- `gather` (the default): each row's `down` and `up` gathered by slot index into (rows, K * rank, in)
  and (rows, K * rank, out) and applied as two batched products (`torch.bmm`; a grouped
  convolution, one group per row, for a convolution's `down`), the scales multiplied in between:
  a fixed number of kernels whatever the mix; the fastest of the three in `livediff bench --lora`
  on the CPU (tiny model, 128x128, 4 rows: 1.83x plain, segmented 3.26x, dense 2.38x, PEFT 5.37x).

Either way rows without a LoRA are not touched (their output is the base layer's, computed once
for the whole batch as always) and a call where no row applies one is the plain call. Changing a
stream's LoRAs or scales changes only the scale matrix: no weight is written, no buffer allocated.

How an exported graph runs it (`dense`, used while tracing): every slot's pair stacked,
(slots * rank, in) and (slots * rank, out), each row's scales spread over its slots' ranks: the
same sum with fixed shapes, every row paying for all slots (the export spec's input is the same
scale matrix).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from livediff.backends.unet_feature import Collect, TensorSpec
from livediff.config import LoRAParams
from livediff.errors import ConfigError, ModelLoadError
from livediff.models.lora import LoRAWeights

LORA_SCALES = "lora_scales"
"""The UNet input: (rows, slots), each row's scale of each of the engine's LoRAs (0: not applied);
the engine passes it in float32 on the host."""
LORA_ROWS = "lora_rows"
"""torch only, for a recorded step (`cuda-graph`), with `LORA_SLOTS` and `LORA_ROW_SCALES`: (R,)
int64 rows that apply any LoRA, on the device; fixed by the step's layout."""
LORA_SLOTS = "lora_slots"
"""torch only, recorded step: (R, K) int64 slot of each such row's k-th LoRA (padding: slot 0 at
scale 0), on the device; data (which LoRA is in a slot is copied into the recording)."""
LORA_ROW_SCALES = "lora_row_scales"
"""torch only, recorded step: (R, K) float32 scale of each such row's k-th LoRA, on the device; data."""


@dataclass(frozen=True)
class LoRARows:
    """The LoRAs of one UNet call's rows, as the engine passes them.

    `matrix` alone on an eager backend (the call plans its rows from it on the host). Where steps
    are recorded (`cuda-graph`, `cuda-graph-compiled`) also the `gather` plan as device tensors of
    a shape fixed by the layout (`rows` and K, the most LoRAs a row applies, are part of it), so a
    recording reads the slots and scales as data: loading, switching or rescaling a LoRA copies new
    values into the same recording.
    """

    matrix: torch.Tensor
    """(N, slots) float32 host scales (`LORA_SCALES`)."""
    rows: tuple[int, ...] = ()
    """With `slots`: the rows that apply any LoRA, in order."""
    slots: torch.Tensor | None = None
    """(R, K) int64 on the device (`LORA_SLOTS`); None on an eager backend."""
    scales: torch.Tensor | None = None
    """(R, K) float32 on the device (`LORA_ROW_SCALES`); None on an eager backend."""

    def repeat_each(self, times: int) -> LoRARows:
        """Each row repeated `times` times in a row (Stream Batch)."""

        def repeat(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.repeat_interleave(times, dim=0)

        rows = tuple(row * times + k for row in self.rows for k in range(times))
        return LoRARows(self.matrix.repeat_interleave(times, dim=0), rows, repeat(self.slots), repeat(self.scales))

    def doubled(self) -> LoRARows:
        """The rows of a guided call (unconditional half, then conditional half: the same LoRAs)."""

        def twice(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else torch.cat([t, t])

        count = self.matrix.shape[0]
        rows = self.rows + tuple(row + count for row in self.rows)
        return LoRARows(torch.cat([self.matrix, self.matrix]), rows, twice(self.slots), twice(self.scales))


@dataclass(frozen=True)
class LoRAPlan:
    """A call's LoRA rows, gathered from the scale matrix (the `gather` form)."""

    rows: torch.Tensor
    """(R,) int64 indices of the rows that apply any LoRA, on the device."""
    all_rows: bool
    """Whether `rows` is every row of the call in order (then no row is selected or scattered)."""
    slots: torch.Tensor
    """(R, K) int64 slot of each row's k-th LoRA (padding: slot 0 at scale 0), on the device."""
    scales: torch.Tensor
    """(R, K * rank) each row's scale per LoRA, repeated over the slot's rank, in the model dtype."""
    used: frozenset[int]
    """The slots any row applies (layers that none of them adapts are skipped)."""


@dataclass(frozen=True)
class Segment:
    """The rows of a call that apply one slot's LoRA (the `segmented` form)."""

    slot: int
    rows: torch.Tensor
    """(n,) int64 row indices, on the device."""
    all_rows: bool
    """Whether `rows` is every row of the call in order."""
    scales: torch.Tensor
    """(n,) each row's scale of this slot, in the model dtype, on the device."""


@dataclass(frozen=True)
class SegmentPlan:
    """A call's LoRA rows grouped by slot: one product per slot used, straight on the slot's weights."""

    segments: tuple[Segment, ...]
    used: frozenset[int]


@dataclass(frozen=True)
class DensePlan:
    """A call's scale matrix spread over the ranks (the `dense` form, for exported graphs)."""

    scales: torch.Tensor
    """(N, slots * rank) in the model dtype."""


class _Layer:
    """One adapted layer's slot buffers."""

    def __init__(self, module: torch.nn.Module, slots: int, rank: int, device: torch.device,
                 dtype: torch.dtype) -> None:  # fmt: skip
        self.conv = isinstance(module, torch.nn.Conv2d)
        if self.conv:
            assert isinstance(module, torch.nn.Conv2d)
            if module.groups != 1 or module.padding_mode != "zeros":
                raise ModelLoadError(f"a LoRA on a grouped or padded-mode convolution is not supported ({module})")
            fan_in: tuple[int, ...] = (module.in_channels, *module.kernel_size)
            out = module.out_channels
        elif isinstance(module, torch.nn.Linear):
            fan_in, out = (module.in_features,), module.out_features
        else:
            raise ModelLoadError(f"a LoRA on a {type(module).__name__} layer is not supported (linear and conv only)")
        self.module = module
        self.rank = rank
        self.down = torch.zeros((slots, rank, *fan_in), device=device, dtype=dtype)
        self.up = torch.zeros((slots, rank, out), device=device, dtype=dtype)
        self.present: set[int] = set()

    def delta(self, x: torch.Tensor, plan: LoRAPlan | DensePlan) -> torch.Tensor:
        """The LoRA part of the output for the plan's rows: (R, *out_shape[1:])."""
        if isinstance(plan, DensePlan):
            return self._dense(x, plan)
        rows = x if plan.all_rows else x.index_select(0, plan.rows)
        count, k = plan.slots.shape
        # index_select, not `self.down[plan.slots]`: advanced indexing copies element by element on the
        # CPU (9.3 ms against 0.07 ms for a (4, 16, 64, 3, 3) gather; 22% of a tiny UNet call with LoRAs)
        flat = plan.slots.reshape(-1)
        down = self.down.index_select(0, flat).reshape(count, k, *self.down.shape[1:])  # (R, K, rank, in[, kh, kw])
        down = down.to(x.dtype)  # no-op but in an export's copy
        up = self.up.index_select(0, flat).reshape(count, k * self.rank, -1).to(x.dtype)  # (R, K * rank, out)
        spread = plan.scales.to(x.dtype)
        if self.conv:
            module = self.module
            assert isinstance(module, torch.nn.Conv2d)
            kernel = down.reshape(count * k * self.rank, *down.shape[3:])
            hidden = F.conv2d(rows.reshape(1, -1, *rows.shape[2:]), kernel, None, module.stride, module.padding,
                              module.dilation, groups=count)  # fmt: skip
            size = hidden.shape[2:]
            hidden = hidden.reshape(count, k * self.rank, -1) * spread[:, :, None]
            return torch.bmm(up.transpose(1, 2), hidden).reshape(count, -1, *size)
        flat = rows.reshape(count, -1, rows.shape[-1])  # (R, tokens, in)
        hidden = torch.bmm(flat, down.reshape(count, k * self.rank, -1).transpose(1, 2))
        hidden = hidden * spread[:, None, :]
        return torch.bmm(hidden, up).reshape(*rows.shape[:-1], -1)

    def add_segments(self, x: torch.Tensor, output: torch.Tensor, plan: SegmentPlan) -> torch.Tensor:
        """`output` (the base layer's, written in place) plus each segment's rows' LoRA product,
        computed on the slot's own `down` and `up` (views: no weight is copied)."""
        for segment in plan.segments:
            if segment.slot not in self.present:
                continue
            down, up = self.down[segment.slot].to(x.dtype), self.up[segment.slot].to(x.dtype)
            rows = x if segment.all_rows else x.index_select(0, segment.rows)
            shape = (-1,) + (1,) * (rows.dim() - 1)
            if self.conv:
                module = self.module
                assert isinstance(module, torch.nn.Conv2d)
                hidden = F.conv2d(rows, down, None, module.stride, module.padding, module.dilation)
                hidden = hidden * segment.scales.to(x.dtype).reshape(shape)
                delta = torch.einsum("nrhw,ro->nohw", hidden, up)
            else:
                hidden = (rows @ down.T) * segment.scales.to(x.dtype).reshape(shape)
                delta = hidden @ up
            if segment.all_rows:
                output = output.add_(delta.to(output.dtype))
            else:
                output = output.index_add_(0, segment.rows, delta.to(output.dtype))
        return output

    def _dense(self, x: torch.Tensor, plan: DensePlan) -> torch.Tensor:
        # in x's dtype: an export traces a float32 copy of a bfloat16 engine's UNet
        down, up, spread = self.down.to(x.dtype), self.up.to(x.dtype), plan.scales.to(x.dtype)
        slots, rank = down.shape[:2]
        up = up.reshape(slots * rank, -1)  # (S * rank, out)
        if self.conv:
            module = self.module
            assert isinstance(module, torch.nn.Conv2d)
            kernel = down.reshape(slots * rank, *down.shape[2:])
            hidden = F.conv2d(x, kernel, None, module.stride, module.padding, module.dilation)
            hidden = hidden * spread[:, :, None, None]
            return torch.einsum("nchw,co->nohw", hidden, up)
        hidden = x @ down.reshape(slots * rank, -1).T
        scales = spread.reshape(spread.shape[0], *([1] * (x.dim() - 2)), -1)
        return (hidden * scales) @ up


def _tracing() -> bool:
    """Whether the call is being traced for an export (TorchScript, torch.export or the ONNX exporter)."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()


class MultiLoRA:
    """The engine's LoRAs in slots on the UNet's layers, applied per row: a `UNetFeature`.

    Built once at start from the loaded LoRAs (`livediff.models.lora.load_lora`); slot i holds
    `names[i]`. `install` adds a forward hook to each adapted layer that does nothing unless a
    call with LoRA rows is running (`bind`), so the plain UNet call is as it was.
    """

    def __init__(self, loras: Sequence[LoRAWeights], unet: Any) -> None:
        """`unet`: the diffusers UNet2DConditionModel the LoRAs were loaded for."""
        if not loras:
            raise ValueError("MultiLoRA needs at least one LoRA")
        self.names = tuple(lora.name for lora in loras)
        self.rank = max(lora.rank for lora in loras)
        device, dtype = next(unet.parameters()).device, next(unet.parameters()).dtype
        self.dtype = dtype
        self.layers: dict[str, _Layer] = {}
        digest = 0
        for slot, lora in enumerate(loras):
            for path, pair in lora.layers.items():
                layer = self.layers.get(path)
                if layer is None:
                    layer = self.layers[path] = _Layer(unet.get_submodule(path), len(loras), self.rank, device, dtype)
                if pair.down.shape[1:] != layer.down.shape[2:] or pair.up.shape[0] != layer.up.shape[2]:
                    shapes = f"{tuple(pair.down.shape)} against {tuple(layer.down.shape[2:])}"
                    raise ModelLoadError(f"LoRA {lora.name}: layer {path} does not fit this UNet ({shapes})")
                rank = pair.down.shape[0]
                layer.down[slot, :rank] = pair.down.to(device, dtype)
                layer.up[slot, :rank] = pair.up.T.to(device, dtype)
                layer.present.add(slot)
                digest = zlib.crc32(pair.down.float().numpy().tobytes()[:4096], digest)
        self.tag = f"lora{len(self.names)}r{self.rank}-{digest:08x}"
        self.inputs: tuple[TensorSpec, ...] = (TensorSpec(LORA_SCALES, ("batch", len(self.names))),)
        self.outputs: tuple[TensorSpec, ...] = ()
        self._plan: LoRAPlan | SegmentPlan | DensePlan | None = None
        self.strategy = "gather"  # the fastest of the three on the CPU in `bench --lora` (tiny, 128x128)
        """How the torch backends run a call's LoRA rows (the export traces `dense`): `segmented`
        (one product per slot used, on its own weights), `gather` (the rows' weights gathered by
        slot into two batched products) or `dense` (every slot for every row, as the export);
        see `livediff bench --lora` for what each costs."""
        self._installed = False

    def slot(self, name: str) -> int | None:
        """The slot of the LoRA `name`, None when the engine has none of that name."""
        return self.names.index(name) if name in self.names else None

    def check(self, loras: Sequence[LoRAParams]) -> None:
        """`ConfigError` naming the field (`loras[1].name`) for a LoRA this engine does not have."""
        for i, lora in enumerate(loras):
            if lora.name not in self.names:
                raise ConfigError(f"loras[{i}].name {lora.name!r} is not one of this engine's LoRAs: "
                                  f"{', '.join(self.names)}")  # fmt: skip

    def row(self, loras: Sequence[LoRAParams]) -> torch.Tensor | None:
        """(slots,) float32 host scales of a stream's `loras` (a LoRA named twice adds up); None
        when it applies none (or all at scale 0): its rows then pay nothing."""
        scales = torch.zeros(len(self.names))
        for lora in loras:
            index = self.slot(lora.name)
            if index is None:
                raise ConfigError(f"loras: {lora.name!r} is not one of this engine's LoRAs")
            scales[index] += lora.scale
        return scales if bool(scales.any()) else None

    # -- UNetFeature --------------------------------------------------------------------------

    def install(self, unet: torch.nn.Module) -> None:
        """Add each adapted layer's forward hook (inert outside a LoRA call); once."""
        if self._installed:
            return
        for layer in self.layers.values():
            layer.module.register_forward_hook(self._hook(layer))
        self._installed = True

    def _hook(self, layer: _Layer) -> Any:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
            plan = self._plan
            if plan is None or (not isinstance(plan, DensePlan) and not plan.used & layer.present):
                return None
            if isinstance(plan, SegmentPlan):
                return layer.add_segments(args[0], output, plan)
            delta = layer.delta(args[0], plan)
            if isinstance(plan, DensePlan) or plan.all_rows:
                return output + delta.to(output.dtype)
            return output.index_add(0, plan.rows, delta.to(output.dtype))

        return hook

    def bind(self, values: Mapping[str, torch.Tensor], unet_kwargs: dict[str, Any]) -> Collect:
        scales = values[LORA_SCALES]
        slots = values.get(LORA_SLOTS)
        if slots is None:
            self._plan = self.plan(scales)
        else:
            self._plan = self.fixed_plan(values[LORA_ROWS], slots, values[LORA_ROW_SCALES], scales.shape[0])

        def collect() -> dict[str, torch.Tensor]:
            self._plan = None
            return {}

        return collect

    def neutral(self, rows: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return {LORA_SCALES: torch.zeros((rows, len(self.names)), device=device, dtype=torch.float32)}

    # -- plans ----------------------------------------------------------------------------------

    def plan(self, scales: torch.Tensor) -> LoRAPlan | SegmentPlan | DensePlan | None:
        """The plan of a (rows, slots) scale matrix: `dense` while tracing an export or when the
        matrix is on an accelerator (no host sync inside a call), else `strategy`'s (None: no row applies any)."""
        if self.strategy == "dense" and not bool(scales.any()):
            return None
        if _tracing() or scales.device.type != "cpu" or self.strategy == "dense":
            spread = scales.to(self.dtype).repeat_interleave(self.rank, dim=1)
            return DensePlan(spread.to(next(iter(self.layers.values())).down.device))
        device = next(iter(self.layers.values())).down.device
        if self.strategy == "segmented":
            return self.segment_plan(scales, device)
        return self.gather_plan(scales, device)

    def segment_plan(self, scales: torch.Tensor, device: torch.device) -> SegmentPlan | None:
        """The `segmented` plan of a host (rows, slots) scale matrix: per slot used, its rows and their scales."""
        segments = []
        for slot in range(scales.shape[1]):
            rows = scales[:, slot].nonzero().flatten()
            if rows.numel():
                segments.append(Segment(slot, rows.to(device), rows.numel() == scales.shape[0],
                                        scales[rows, slot].to(device, self.dtype)))  # fmt: skip
        if not segments:
            return None
        return SegmentPlan(tuple(segments), frozenset(segment.slot for segment in segments))

    @staticmethod
    def _gather_host(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """From a host (rows, slots) scale matrix: the (R,) rows that apply any LoRA, each one's
        (R, K) slots and (R, K) scales (K: the most LoRAs a row applies; padding slot 0 at scale
        0); None when no row applies one."""
        applied = scales != 0
        counts = applied.sum(dim=1)
        rows = counts.nonzero().flatten()
        if rows.numel() == 0:
            return None
        k = int(counts.max())
        slots = torch.zeros((rows.numel(), k), dtype=torch.long)
        row_scales = torch.zeros((rows.numel(), k))
        for i, row in enumerate(rows.tolist()):
            found = applied[row].nonzero().flatten()
            slots[i, : found.numel()] = found
            row_scales[i, : found.numel()] = scales[row, found]
        return rows, slots, row_scales

    def fixed_rows(self, scales: torch.Tensor, device: torch.device) -> LoRARows | None:
        """A host (rows, slots) scale matrix as `LoRARows` with the `gather` plan's tensors on
        `device` (for a recorded step); None when no row applies a LoRA."""
        found = self._gather_host(scales)
        if found is None:
            return None
        rows, slots, row_scales = found
        return LoRARows(scales, tuple(rows.tolist()), slots.to(device), row_scales.to(device))

    def fixed_plan(self, rows: torch.Tensor, slots: torch.Tensor, scales: torch.Tensor, total: int) -> LoRAPlan:
        """The `gather` plan from device tensors (`LORA_ROWS`, `LORA_SLOTS`, `LORA_ROW_SCALES`) of
        a call of `total` rows, with no host sync (a CUDA graph records it): every layer with a LoRA
        runs (which slots are used is data), its values the same as `gather_plan`'s."""
        count, k = slots.shape
        spread = scales.to(self.dtype)[:, :, None].expand(count, k, self.rank).reshape(count, k * self.rank)
        return LoRAPlan(rows=rows, all_rows=count == total, slots=slots, scales=spread,
                        used=frozenset(range(len(self.names))))  # fmt: skip

    def gather_plan(self, scales: torch.Tensor, device: torch.device) -> LoRAPlan | None:
        """The `gather` plan of a host (rows, slots) scale matrix (see the module docstring)."""
        found = self._gather_host(scales)
        if found is None:
            return None
        rows, slots, row_scales = found
        spread = row_scales.repeat_interleave(self.rank, dim=1)
        return LoRAPlan(
            rows=rows.to(device),
            all_rows=rows.numel() == scales.shape[0],
            slots=slots.to(device),
            scales=spread.to(device, self.dtype),
            used=frozenset(slots[row_scales != 0].tolist()),
        )
