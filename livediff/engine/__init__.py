"""The streaming img2img engine: tensors in, tensors out, no server needed."""

from livediff.engine.conditioning import ConditioningCache, PromptEmbedding
from livediff.engine.stream import STAGES, StepResult, Stream, StreamEngine

__all__ = ["STAGES", "ConditioningCache", "PromptEmbedding", "StepResult", "Stream", "StreamEngine"]
