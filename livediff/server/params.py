"""Live-control JSON -> StreamParams: the same body over PATCH /api/sessions/{id}, the `control`
data channel, POST /offer's `params` and WHIP query strings.

Fields: prompt, negative_prompt, strength, steps, t_index_list, seed, guidance,
blend {"prompt", "weight"}, similarity_filter, similarity_threshold, max_skip_frames, passthrough, probe.
A wrong type, an unknown field or a value out of range is a `ParamError` naming the field (422).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from livediff.config import StreamParams
from livediff.errors import ConfigError

MAX_PROMPT_CHARS = 2000

_TYPES: dict[str, type] = {
    "prompt": str,
    "negative_prompt": str,
    "strength": float,
    "steps": int,
    "seed": int,
    "guidance": float,
    "similarity_filter": bool,
    "similarity_threshold": float,
    "max_skip_frames": int,
    "passthrough": bool,
}
SESSION_FIELDS = ("probe",)
"""Fields that belong to the session, not to the engine stream."""


class ParamError(ValueError):
    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def _check_type(name: str, value: Any, kind: type) -> Any:
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind in (str, bool) and isinstance(value, kind):
        return value
    raise ParamError(name, f"{name} must be a {kind.__name__}, got {type(value).__name__}")


def parse_update(current: StreamParams, data: Mapping[str, Any]) -> tuple[StreamParams, dict[str, Any]]:
    """`current` with the changes in `data`, and the session fields (probe) found in `data`."""
    if not isinstance(data, Mapping):
        raise ParamError(None, "params must be a JSON object")
    changes: dict[str, Any] = {}
    session: dict[str, Any] = {}
    for name, value in data.items():
        if name in _TYPES:
            changes[name] = _check_type(name, value, _TYPES[name])
            if isinstance(changes[name], str) and len(changes[name]) > MAX_PROMPT_CHARS:
                raise ParamError(name, f"{name} is longer than {MAX_PROMPT_CHARS} characters")
        elif name == "t_index_list":
            if value is not None and (not isinstance(value, list) or
                                      any(not isinstance(t, int) or isinstance(t, bool) for t in value)):
                raise ParamError(name, "t_index_list must be a list of integers or null")
            changes[name] = tuple(value) if value is not None else None
        elif name == "blend":
            if not isinstance(value, Mapping) or set(value) - {"prompt", "weight"}:
                raise ParamError(name, 'blend must be an object {"prompt": str, "weight": number}')
            if "prompt" in value:
                changes["blend_prompt"] = _check_type("blend.prompt", value["prompt"], str)
            if "weight" in value:
                changes["blend_weight"] = _check_type("blend.weight", value["weight"], float)
        elif name in SESSION_FIELDS:
            session[name] = _check_type(name, value, bool)
        else:
            raise ParamError(name, f"unknown field {name!r}")
    try:
        return current.replace(**changes), session
    except ConfigError as exc:
        field = str(exc).split(" ", 1)[0]
        field = {"blend_weight": "blend.weight"}.get(field, field)
        raise ParamError(field, str(exc)) from None


def parse_query(query: Mapping[str, str]) -> dict[str, Any]:
    """WHIP publishers (OBS) can only pass params in the URL: `?prompt=...&strength=0.6&probe=1`."""
    data: dict[str, Any] = {}
    for name, text in query.items():
        kind = _TYPES.get(name, bool if name in SESSION_FIELDS else None)
        try:
            if kind is bool:
                data[name] = text.lower() in ("1", "true", "yes", "on")
            elif kind is int:
                data[name] = int(text)
            elif kind is float:
                data[name] = float(text)
            elif name == "blend_prompt":
                data.setdefault("blend", {})["prompt"] = text
            elif name == "blend_weight":
                data.setdefault("blend", {})["weight"] = float(text)
            else:
                data[name] = text
        except ValueError:
            raise ParamError(name, f"{name}: {text!r} is not a {kind.__name__ if kind else 'number'}") from None
    return data
