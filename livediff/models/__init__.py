"""Model loading: hub ids, local diffusers folders and the built-in random-weight models."""

from livediff.models.builtin import BUILDERS, builtin_dir
from livediff.models.loading import DEFAULT_MODEL, ModelParts, load_model, resolve_auto

__all__ = ["BUILDERS", "DEFAULT_MODEL", "ModelParts", "builtin_dir", "load_model", "resolve_auto"]
