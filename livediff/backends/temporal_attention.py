"""The feature bank inside the UNet: self-attention that also attends to earlier frames' keys and values.

Idea from StreamV2V (Liang et al., "Looking Backward: Streaming Video-to-Video Translation with
Feature Banks", arXiv 2405.15757; training-free): each self-attention layer (`attn1` of every
transformer block) of the UNet computes its keys and values for the current frame as usual, then
attends over them *and* over the keys and values the same layer computed for the stream's
previous frame(s). The current frame borrows the details it had a moment ago, so textures stay
put instead of being drawn anew every frame. Self-attention in SD UNets has no positional
encoding, so the bank's order does not matter.

One call, many streams: every row of the UNet batch (a frame at one denoising step) brings its
own bank, `N` slots of keys and values per layer, and a bias per slot that is added to the softmax
logits of the slot's keys: `ln(weight)` for a filled slot (weight 1 is StreamV2V's plain extended
attention; above 1 leans on the past, below 1 on the present) and `EMPTY_SLOT` for an unfilled
one, whose keys then get zero attention (exactly zero: exp underflows). A row without a bank has
all slots empty, so streams with banks of different sizes, or none, share one call. Each layer also
returns the current frame's keys and values, which the engine keeps for the next frame.

Graph interface (`TemporalBank`, a `UNetFeature`): inputs `bank_bias` (batch, bank) float32 and one
`bank_kv_{i}` (batch, bank, 2, tokens_i, channels_i) per self-attention layer i (keys then values,
after the layer's `to_k` / `to_v`); outputs one `bank_new_{i}` (batch, 2, tokens_i, channels_i).

On torch the rows that have a bank are split from those that have none (`bank_rows` /
`plain_rows`, index tensors the engine adds): the latter run diffusers' own attention on their own
keys, bit for bit what they ran without the feature. An exported graph has no such split; there
rows without a bank run the masked attention, equal up to summation order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from livediff.backends.unet_feature import Collect, TensorSpec

BANK_TAG = "bank-v1"
"""The engine-key tag of graphs with the feature bank; bump when the graph's interface changes."""
EMPTY_SLOT = -30000.0
"""Logit bias of an unfilled slot: far below any real logit, within float16's range, so its keys
get exactly zero attention in every precision the backends run."""


@dataclass(frozen=True)
class BankLayer:
    """One self-attention layer of the UNet, as the bank sees it."""

    name: str
    """The `Attention` module's path in the UNet (`down_blocks.1.attentions.0.transformer_blocks.0.attn1`)."""
    tokens: int
    """Sequence length at the engine's size: latent height x width at the layer's resolution level."""
    channels: int
    """Width of its keys and values (`to_k.out_features`)."""

    def bytes_per_frame(self, dtype: torch.dtype) -> int:
        """Memory one frame of this layer's keys and values takes in the bank."""
        return 2 * self.tokens * self.channels * torch.empty((), dtype=dtype).element_size()


def bank_layers(unet: Any, height: int, width: int) -> tuple[BankLayer, ...]:
    """The self-attention layers of a diffusers UNet2DConditionModel at a frame size of `height` x `width` pixels.

    A layer's resolution level follows from its place: `down_blocks.i` at level i, `mid_block` at
    the lowest, `up_blocks.j` at level (levels - 1 - j); each level halves the latent (rounding up,
    as the stride-2 convolutions do).
    """
    levels = len(unet.config.block_out_channels)
    sizes = [(height // 8, width // 8)]
    for _ in range(levels - 1):
        h, w = sizes[-1]
        sizes.append(((h + 1) // 2, (w + 1) // 2))
    layers = []
    for name, module in unet.named_modules():
        if not (isinstance(module, Attention) and name.endswith(".attn1") and not module.is_cross_attention):
            continue
        block, index = name.split(".")[:2]
        if block == "down_blocks":
            level = int(index)
        elif block == "up_blocks":
            level = levels - 1 - int(index)
        elif block == "mid_block":
            level = levels - 1
        else:
            raise ValueError(f"self-attention layer {name} outside the down, mid and up blocks")
        h, w = sizes[level]
        layers.append(BankLayer(name=name, tokens=h * w, channels=module.to_k.out_features))
    if not layers:
        raise ValueError("this UNet has no self-attention layers: the feature bank has nothing to attend with")
    return tuple(layers)


@dataclass
class BankCall:
    """One UNet call's bank: what each layer attends to, and where it leaves this frame's keys and values."""

    bias: torch.Tensor
    """(rows, N) logit bias per slot: ln(weight) for a filled slot, `EMPTY_SLOT` for an empty one."""
    kv: dict[str, torch.Tensor]
    """Layer name -> (rows, N, 2, tokens, channels) keys and values of earlier frames."""
    bank_rows: torch.Tensor | None = None
    """torch only: indices of the rows that have a bank; with `plain_rows`, the rest run plain attention."""
    plain_rows: torch.Tensor | None = None
    new: dict[str, torch.Tensor] = field(default_factory=dict)
    """Layer name -> (rows, 2, tokens, channels) this frame's keys and values, filled by the call."""


class BankAttnProcessor(AttnProcessor2_0):
    """diffusers' SDPA attention, extended by a `BankCall` when the UNet call passes one (`temporal=`).

    Without one it is `AttnProcessor2_0` itself. Installed on every attention layer of the UNet
    (diffusers hands the same keyword arguments to all of them); `layer` is None on the layers
    the bank leaves alone (cross-attention).
    """

    def __init__(self, layer: str | None) -> None:
        super().__init__()
        self.layer = layer

    def __call__(  # type: ignore[override]
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        temporal: BankCall | None = None,
    ) -> torch.Tensor:
        if temporal is None or self.layer is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(f"{self.layer}: the feature bank extends self-attention without a mask only")
        return self._with_bank(attn, hidden_states, temb, temporal)

    def _with_bank(self, attn: Attention, hidden_states: torch.Tensor, temb: torch.Tensor | None,
                   call: BankCall) -> torch.Tensor:  # fmt: skip
        assert self.layer is not None
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        rows = hidden_states.shape[0]

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        call.new[self.layer] = torch.stack([key, value], dim=1)
        bank = call.kv[self.layer]  # (rows, N, 2, tokens, channels)
        past_keys = bank[:, :, 0].flatten(1, 2)
        past_values = bank[:, :, 1].flatten(1, 2)
        tokens = key.shape[1]
        bias = call.bias.to(query.dtype)[:, :, None].expand(-1, -1, tokens).flatten(1)  # (rows, N * tokens)
        mask = torch.cat([bias.new_zeros(rows, tokens), bias], dim=1)[:, None, None, :]

        if call.bank_rows is not None and call.plain_rows is not None and call.plain_rows.numel():
            out = torch.empty_like(query)
            plain, banked = call.plain_rows, call.bank_rows
            out[plain] = self._attend(attn, query[plain], key[plain], value[plain], None)
            out[banked] = self._attend(
                attn, query[banked], torch.cat([key[banked], past_keys[banked]], dim=1),
                torch.cat([value[banked], past_values[banked]], dim=1), mask[banked],
            )  # fmt: skip
        else:
            out = self._attend(
                attn, query, torch.cat([key, past_keys], dim=1), torch.cat([value, past_values], dim=1), mask
            )

        hidden_states = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    @staticmethod
    def _attend(attn: Attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
        """Multi-head SDPA as AttnProcessor2_0 runs it: (rows, tokens, channels) in and out."""
        rows, head_dim = query.shape[0], key.shape[-1] // attn.heads
        q = query.view(rows, -1, attn.heads, head_dim).transpose(1, 2)
        k = key.view(rows, -1, attn.heads, head_dim).transpose(1, 2)
        v = value.view(rows, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
        return out.transpose(1, 2).reshape(rows, -1, attn.heads * head_dim).to(query.dtype)


class TemporalBank:
    """The feature bank as a `UNetFeature`: its graph inputs and outputs, and how the UNet call gets them."""

    tag = BANK_TAG

    def __init__(self, layers: tuple[BankLayer, ...]) -> None:
        self.layers = layers
        self.inputs = (
            TensorSpec("bank_bias", ("batch", "bank"), float32=True),
            *(TensorSpec(f"bank_kv_{i}", ("batch", "bank", 2, layer.tokens, layer.channels))
              for i, layer in enumerate(layers)),
        )  # fmt: skip
        self.outputs = tuple(TensorSpec(f"bank_new_{i}", ("batch", 2, layer.tokens, layer.channels))
                             for i, layer in enumerate(layers))  # fmt: skip

    def install(self, unet: torch.nn.Module) -> None:
        """Put a `BankAttnProcessor` on every attention layer (a no-op when already there)."""
        current: dict[str, Any] = unet.attn_processors  # type: ignore[assignment]
        wanted = {layer.name for layer in self.layers}
        if all(isinstance(p, BankAttnProcessor) for p in current.values()):
            return
        processors = {}
        for name in current:
            module = name.removesuffix(".processor")
            processors[name] = BankAttnProcessor(module if module in wanted else None)
        unet.set_attn_processor(processors)  # type: ignore[operator]

    def bind(self, values: Mapping[str, torch.Tensor], unet_kwargs: dict[str, Any]) -> Collect:
        call = BankCall(
            bias=values["bank_bias"],
            kv={layer.name: values[f"bank_kv_{i}"] for i, layer in enumerate(self.layers)},
            bank_rows=values.get("bank_rows"),
            plain_rows=values.get("plain_rows"),
        )
        unet_kwargs.setdefault("cross_attention_kwargs", {})["temporal"] = call

        def collect() -> dict[str, torch.Tensor]:
            missing = [layer.name for layer in self.layers if layer.name not in call.new]
            if missing:
                raise RuntimeError(f"the UNet call did not reach the self-attention layers {missing}")
            return {f"bank_new_{i}": call.new[layer.name] for i, layer in enumerate(self.layers)}

        return collect

    def neutral(self, rows: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """One empty slot per row: every row attends to its own frame alone."""
        values = {"bank_bias": torch.full((rows, 1), EMPTY_SLOT, device=device)}
        for i, layer in enumerate(self.layers):
            values[f"bank_kv_{i}"] = torch.zeros((rows, 1, 2, layer.tokens, layer.channels), device=device, dtype=dtype)
        return values

    def bytes_per_frame(self, dtype: torch.dtype) -> int:
        """Memory one frame of the bank takes, over all layers, for one denoising step."""
        return sum(layer.bytes_per_frame(dtype) for layer in self.layers)


def slot_bias(weight: float) -> float:
    """The logit bias of a filled slot: ln(weight)."""
    return math.log(weight)
