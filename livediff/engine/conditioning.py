"""Prompt -> text embeddings, computed once per prompt and kept in an LRU cache."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PromptEmbedding:
    embeds: torch.Tensor
    """(1, tokens, dim) on the engine's device and dtype."""
    truncated: bool
    """The prompt was longer than the tokenizer's limit and was cut."""


class ConditioningCache:
    """An LRU cache from prompt text to its embedding; hits and misses are counted.

    A prompt change costs one text-encoder call the first time and a dictionary look-up after.
    """

    def __init__(self, encode: Callable[[str], PromptEmbedding], capacity: int = 64) -> None:
        self._encode = encode
        self._capacity = capacity
        self._entries: OrderedDict[str, PromptEmbedding] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, prompt: str) -> PromptEmbedding:
        entry = self._entries.get(prompt)
        if entry is not None:
            self.hits += 1
            self._entries.move_to_end(prompt)
            return entry
        self.misses += 1
        entry = self._encode(prompt)
        self._entries[prompt] = entry
        if len(self._entries) > self._capacity:
            self._entries.popitem(last=False)
        return entry

    def blend(self, prompt: str, other: str, weight: float) -> PromptEmbedding:
        """Embeddings of `prompt` and `other` mixed linearly: weight 0 is `prompt`, 1 is `other`."""
        first = self.get(prompt)
        if weight <= 0.0 or not other:
            return first
        second = self.get(other)
        return PromptEmbedding(
            embeds=torch.lerp(first.embeds, second.embeds, weight),
            truncated=first.truncated or second.truncated,
        )


def clip_encoder(tokenizer: object, text_encoder: torch.nn.Module) -> Callable[[str], PromptEmbedding]:
    """The encode function for a CLIP tokenizer and text encoder (last hidden state, as SD uses)."""
    max_length: int = tokenizer.model_max_length  # type: ignore[attr-defined]

    @torch.inference_mode()
    def encode(prompt: str) -> PromptEmbedding:
        ids = tokenizer(prompt, truncation=False).input_ids  # type: ignore[operator]
        padded = tokenizer(  # type: ignore[operator]
            prompt, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
        ).input_ids
        embeds = text_encoder(padded.to(text_encoder.device), return_dict=False)[0]
        return PromptEmbedding(embeds=embeds, truncated=len(ids) > max_length)

    return encode
