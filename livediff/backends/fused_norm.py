"""GroupNorm and SiLU in one kernel: `--backend cuda-graph-fused-norm`.

Each of the UNet's residual blocks (diffusers' `ResnetBlock2D`) runs GroupNorm then SiLU twice, the
second time after adding the time embedding: eagerly three or four kernels, each reading and
writing the whole activation. `group_norm_silu` does (add) + GroupNorm + SiLU in one Triton kernel
(CUDA only): one program per (image, group) reads the group twice, once for its mean and variance
(float32, E[x^2] - E[x]^2) and once to normalise, scale, shift, apply SiLU and write. Any strides:
channels-last activations (the fast path's) are read in memory order. Anywhere else (the CPU, no
Triton) it is the torch reference, `group_norm_silu_reference`: the same ops the block ran.

GroupNorm: Wu and He, "Group Normalization" (ECCV 2018, arXiv 1803.08494); SiLU: Elfwing et al.,
arXiv 1702.03118 (x * sigmoid(x)).

`fuse_resnets` puts the fused forward on every block whose norm is GroupNorm, whose nonlinearity is
SiLU and whose time embedding is added (diffusers' `time_embedding_norm="default"`); it is done on a
copy of the UNet (`with_fused_norm`), never on the model the engine was given. The GPU kit measures
the variant against `cuda-graph` and checks the kernel against torch (`variants`, `gpu-tests`);
whether it pays depends on how much of a step GroupNorm takes (the kit's profile lists the top
kernels).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.resnet import ResnetBlock2D

from livediff.models import ModelParts

NAME = "cuda-graph-fused-norm"
BLOCK = 1024
"""Elements per Triton block; a group of SD's largest level (10 channels x 64 x 64) is 40 blocks."""

_kernel: Any = None


def triton_available() -> bool:
    """Whether Triton is installed (it comes with torch's CUDA wheels)."""
    return importlib.util.find_spec("triton") is not None


def _triton_kernel() -> Any:
    """The Triton kernel, defined on first use (Triton is imported only where it runs)."""
    global _kernel
    if _kernel is not None:
        return _kernel
    import triton
    import triton.language as tl

    @triton.jit  # type: ignore[misc]
    def group_norm_silu_kernel(x_ptr, add_ptr, w_ptr, b_ptr, out_ptr, HW, W, cpg, s_n, s_c, s_h, s_w, add_n,
                               eps, HAS_ADD: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                               BLOCK: tl.constexpr):  # fmt: skip
        n = tl.program_id(0)
        g = tl.program_id(1)
        count = cpg * HW
        base = n * s_n + g * cpg * s_c
        total = tl.zeros([BLOCK], dtype=tl.float32)
        squares = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, count, BLOCK):
            i = start + tl.arange(0, BLOCK)
            mask = i < count
            if CHANNELS_LAST:
                c = i % cpg
                p = i // cpg
            else:
                c = i // HW
                p = i % HW
            offsets = base + c * s_c + (p // W) * s_h + (p % W) * s_w
            v = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            if HAS_ADD:
                v += tl.load(add_ptr + n * add_n + g * cpg + c, mask=mask, other=0.0).to(tl.float32)
            total += v
            squares += v * v
        mean = tl.sum(total, axis=0) / count
        variance = tl.maximum(tl.sum(squares, axis=0) / count - mean * mean, 0.0)
        rstd = 1.0 / tl.sqrt(variance + eps)
        for start in range(0, count, BLOCK):
            i = start + tl.arange(0, BLOCK)
            mask = i < count
            if CHANNELS_LAST:
                c = i % cpg
                p = i // cpg
            else:
                c = i // HW
                p = i % HW
            offsets = base + c * s_c + (p // W) * s_h + (p % W) * s_w
            v = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            if HAS_ADD:
                v += tl.load(add_ptr + n * add_n + g * cpg + c, mask=mask, other=0.0).to(tl.float32)
            weight = tl.load(w_ptr + g * cpg + c, mask=mask, other=1.0).to(tl.float32)
            bias = tl.load(b_ptr + g * cpg + c, mask=mask, other=0.0).to(tl.float32)
            y = (v - mean) * rstd * weight + bias
            y = y * tl.sigmoid(y)
            tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=mask)

    _kernel = group_norm_silu_kernel
    return _kernel


def group_norm_silu_reference(x: torch.Tensor, norm: torch.nn.GroupNorm, add: torch.Tensor | None = None
                              ) -> torch.Tensor:  # fmt: skip
    """silu(group_norm(x + add)) with torch's ops, as `ResnetBlock2D` runs them: x (N, C, H, W),
    `add` None or (N, C, 1, 1) (the projected time embedding)."""
    if add is not None:
        x = x + add
    return F.silu(F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps))


def group_norm_silu_triton(x: torch.Tensor, norm: torch.nn.GroupNorm, add: torch.Tensor | None = None
                           ) -> torch.Tensor:  # fmt: skip
    """The same in one Triton kernel: x (N, C, H, W) with any dense strides (the output has x's),
    `add` None or (N, C, 1, 1); the norm must be affine. Runs where Triton runs (CUDA; its
    interpreter on CPU tensors with TRITON_INTERPRET=1)."""
    n, c, h, w = x.shape
    groups = norm.num_groups
    if norm.weight is None or norm.bias is None or c % groups:
        raise ValueError(f"group_norm_silu needs an affine GroupNorm over C={c} in {groups} groups")
    out = torch.empty_like(x)  # same strides as a dense x
    channels_last = x.stride(1) == 1 and c > 1
    extra = x if add is None else add.reshape(n, c).contiguous()
    _triton_kernel()[(n, groups)](
        x, extra, norm.weight, norm.bias, out, h * w, w, c // groups, x.stride(0), x.stride(1), x.stride(2),
        x.stride(3), c, float(norm.eps), HAS_ADD=add is not None, CHANNELS_LAST=channels_last, BLOCK=BLOCK,
    )  # fmt: skip
    return out


def group_norm_silu(x: torch.Tensor, norm: torch.nn.GroupNorm, add: torch.Tensor | None = None) -> torch.Tensor:
    """silu(group_norm(x + add)): the Triton kernel on CUDA when Triton is installed, else the torch reference."""
    if x.is_cuda and triton_available():
        return group_norm_silu_triton(x, norm, add)
    return group_norm_silu_reference(x, norm, add)


class FusedResnetBlock2D(ResnetBlock2D):
    """`ResnetBlock2D` with its two GroupNorm+SiLU (the second after the time embedding's add) as
    `group_norm_silu`; everything else as diffusers runs it. Set on a block by `fuse_resnets`."""

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.time_emb_proj is None and temb is not None:  # a shape this fusion does not take
            return super().forward(input_tensor, temb, *args, **kwargs)
        hidden_states = group_norm_silu(input_tensor, self.norm1)
        if self.upsample is not None:
            if hidden_states.shape[0] >= 64:  # as diffusers: its nearest upsampling fails on large NHWC batches
                input_tensor = input_tensor.contiguous()
                hidden_states = hidden_states.contiguous()
            input_tensor = self.upsample(input_tensor)
            hidden_states = self.upsample(hidden_states)
        elif self.downsample is not None:
            input_tensor = self.downsample(input_tensor)
            hidden_states = self.downsample(hidden_states)
        hidden_states = self.conv1(hidden_states)
        add = None
        if self.time_emb_proj is not None:
            assert temb is not None
            if not self.skip_time_act:
                temb = self.nonlinearity(temb)
            add = self.time_emb_proj(temb)[:, :, None, None]
        hidden_states = group_norm_silu(hidden_states, self.norm2, add)
        hidden_states = self.dropout(hidden_states)
        hidden_states = self.conv2(hidden_states)
        if self.conv_shortcut is not None:
            input_tensor = self.conv_shortcut(input_tensor)
        return (input_tensor + hidden_states) / self.output_scale_factor  # type: ignore[no-any-return]


def fusable(block: torch.nn.Module) -> bool:
    """Whether `block` is a `ResnetBlock2D` the fused forward runs exactly: GroupNorm norms, SiLU,
    the time embedding added (not scale-shift)."""
    return (
        type(block) is ResnetBlock2D
        and isinstance(block.norm1, torch.nn.GroupNorm)
        and isinstance(block.norm2, torch.nn.GroupNorm)
        and block.norm1.affine
        and block.norm2.affine
        and isinstance(block.nonlinearity, torch.nn.SiLU)
        and block.time_embedding_norm == "default"
    )


def fuse_resnets(model: torch.nn.Module) -> int:
    """Give every fusable residual block of `model` the fused forward, in place; returns how many."""
    blocks = [m for m in model.modules() if fusable(m)]
    for block in blocks:
        block.__class__ = FusedResnetBlock2D
    return len(blocks)


def with_fused_norm(parts: ModelParts) -> tuple[ModelParts, int]:
    """`parts` with a copy of its UNet whose residual blocks run `group_norm_silu` (the given UNet
    is left as it was), and how many blocks were fused."""
    unet = copy.deepcopy(parts.unet)
    return dataclasses.replace(parts, unet=unet), fuse_resnets(unet)
