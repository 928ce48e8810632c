"""Image prompts inside the UNet: IP-Adapter's decoupled cross-attention with one image and one scale per row.

IP-Adapter (Ye et al., arXiv:2308.06721) gives each cross-attention layer (`attn2`) a second set
of keys and values, made from an image's tokens by the layer's `to_k_ip` / `to_v_ip`; the layer's
queries attend to them beside the text's, and that attention's output times a scale is added to
the text attention's before the output projection:

    out = to_out(Attn(q, K_text, V_text) + scale * Attn(q, to_k_ip(image), to_v_ip(image)))

diffusers' `IPAdapterAttnProcessor2_0` takes one scale per adapter for the whole call. Here each
row of the call (a stream's frame at one denoising step) brings its own image tokens and its own
scale, so streams with different reference images, different scales, or none share one UNet call.

Graph interface (`ImagePrompt`, a `UNetFeature`): inputs `ip_embeds` (batch, tokens, cross_dim),
each row's image tokens (the projection's output, `livediff.models.ip_adapter.encode_images`), and
`ip_scales` (batch,), each row's scale (0: the row is as without an image prompt). On torch
the engine also passes `ip_rows` (R,) int64, the rows that have an image prompt: only those rows'
image attention is computed and added (`index_add`), the others run exactly the plain processor's
arithmetic. An exported graph has no such split: there every row computes the image attention and
rows without one add 0 times it, which is exactly nothing.

The row index is fixed by a step's layout (which streams have an image prompt), the tokens and the
scales are tensors: under `cuda-graph` a new image or a new scale is a copy into the recording's
static inputs, never a new recording.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from livediff.backends.unet_feature import Collect, TensorSpec
from livediff.models.ip_adapter import IPAdapterWeights

IP_EMBEDS = "ip_embeds"
IP_SCALES = "ip_scales"
IP_ROWS = "ip_rows"
"""torch only: (R,) int64 rows that have an image prompt (the others are left as plain)."""
KWARG = "ip_hidden_states"
"""The cross-attention keyword the call's `ImagePromptCall` travels under: one diffusers passes
quietly over processors that do not take it (the self-attention layers' and the feature bank's)."""


@dataclass(frozen=True)
class ImagePromptCall:
    """One UNet call's image prompts."""

    embeds: torch.Tensor
    """(R, tokens, cross_dim) image tokens of the rows in `rows` (every row when `rows` is None)."""
    scales: torch.Tensor
    """(R,) each of those rows' scale."""
    rows: torch.Tensor | None
    """(R,) int64 row indices in the call; None: every row, in order."""


class ImagePromptAttnProcessor(torch.nn.Module):
    """SDPA cross-attention (diffusers' `AttnProcessor2_0`) plus, when the call carries an
    `ImagePromptCall`, each of its rows' image attention times the row's scale.

    Holds the layer's `to_k_ip` and `to_v_ip` (bias-free, cross_dim -> width: the layout of
    diffusers' `IPAdapterAttnProcessor2_0`); without a call it is `AttnProcessor2_0` itself.
    """

    def __init__(self, to_k_ip: torch.Tensor, to_v_ip: torch.Tensor) -> None:
        """`to_k_ip`, `to_v_ip`: (width, cross_dim) weights."""
        super().__init__()
        width, cross = to_k_ip.shape
        self.to_k_ip = torch.nn.Linear(cross, width, bias=False, device=to_k_ip.device, dtype=to_k_ip.dtype)
        self.to_v_ip = torch.nn.Linear(cross, width, bias=False, device=to_v_ip.device, dtype=to_v_ip.dtype)
        with torch.no_grad():
            self.to_k_ip.weight.copy_(to_k_ip)
            self.to_v_ip.weight.copy_(to_v_ip)
        self.plain = AttnProcessor2_0()

    def __call__(  # type: ignore[override]
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        ip_hidden_states: ImagePromptCall | None = None,
        temporal: Any = None,
    ) -> torch.Tensor:
        """`temporal`: the feature bank's call, which concerns self-attention only (taken so that
        diffusers does not warn about it on every call)."""
        if ip_hidden_states is None:
            return self.plain(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        return self._with_image(attn, hidden_states, encoder_hidden_states, attention_mask, temb, ip_hidden_states)

    def _with_image(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                    attention_mask: torch.Tensor | None, temb: torch.Tensor | None,
                    call: ImagePromptCall) -> torch.Tensor:  # fmt: skip
        # the plain processor's arithmetic, step for step, so rows without an image are bit for bit plain
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        rows, tokens, _ = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, tokens, rows)
            attention_mask = attention_mask.view(rows, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        q = query.view(rows, -1, attn.heads, head_dim).transpose(1, 2)
        k = key.view(rows, -1, attn.heads, head_dim).transpose(1, 2)
        v = value.view(rows, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(rows, -1, attn.heads * head_dim).to(q.dtype)

        # the image prompt: the rows' queries against their own image's keys and values
        image = call.embeds.to(q.dtype)
        count = image.shape[0]
        q_rows = q if call.rows is None else q.index_select(0, call.rows)
        k_ip = self.to_k_ip(image).view(count, -1, attn.heads, head_dim).transpose(1, 2)
        v_ip = self.to_v_ip(image).view(count, -1, attn.heads, head_dim).transpose(1, 2)
        seen = F.scaled_dot_product_attention(q_rows, k_ip, v_ip, dropout_p=0.0, is_causal=False)
        seen = seen.transpose(1, 2).reshape(count, -1, attn.heads * head_dim).to(q.dtype)
        seen = seen * call.scales.to(q.dtype)[:, None, None]
        out = out + seen if call.rows is None else out.index_add(0, call.rows, seen)

        hidden_states = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class ImagePrompt:
    """The IP-Adapter as a `UNetFeature`: its graph inputs, and its processors on the UNet's `attn2` layers.

    Built once at start from the loaded adapter (`livediff.models.ip_adapter.load_ip_adapter`),
    which also carries the image encoder the engine runs once per image change.
    """

    def __init__(self, adapter: IPAdapterWeights) -> None:
        self.adapter = adapter
        self.tag = f"ip{adapter.tokens}-{adapter.digest}"
        self.inputs: tuple[TensorSpec, ...] = (
            TensorSpec(IP_EMBEDS, ("batch", adapter.tokens, adapter.cross_dim)),
            TensorSpec(IP_SCALES, ("batch",)),
        )
        self.outputs: tuple[TensorSpec, ...] = ()

    def install(self, unet: torch.nn.Module) -> None:
        """Put an `ImagePromptAttnProcessor` on each of the adapter's `attn2` layers, the other
        layers' processors as they are (a no-op when already there). Installed after the feature
        bank's, which sets every layer's processor."""
        current: dict[str, Any] = unet.attn_processors  # type: ignore[assignment]
        processors = dict(current)
        changed = False
        for path, (to_k_ip, to_v_ip) in self.adapter.layers.items():
            name = f"{path}.processor"
            if name not in processors:
                raise ValueError(f"the IP-Adapter names {path}, which this UNet does not have")
            if not isinstance(processors[name], ImagePromptAttnProcessor):
                processors[name] = ImagePromptAttnProcessor(to_k_ip, to_v_ip)
                changed = True
        if changed:
            unet.set_attn_processor(processors)  # type: ignore[operator]

    def bind(self, values: Mapping[str, torch.Tensor], unet_kwargs: dict[str, Any]) -> Collect:
        rows = values.get(IP_ROWS)
        embeds, scales = values[IP_EMBEDS], values[IP_SCALES]
        if rows is not None:
            embeds, scales = embeds.index_select(0, rows), scales.index_select(0, rows)
        call = ImagePromptCall(embeds, scales, rows)
        unet_kwargs.setdefault("cross_attention_kwargs", {})[KWARG] = call
        return dict

    def neutral(self, rows: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Zero tokens at scale 0: the image attention adds exactly nothing."""
        return {
            IP_EMBEDS: torch.zeros((rows, self.adapter.tokens, self.adapter.cross_dim), device=device, dtype=dtype),
            IP_SCALES: torch.zeros((rows,), device=device, dtype=dtype),
        }
