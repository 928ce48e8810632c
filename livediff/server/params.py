"""Live-control JSON -> StreamParams: the same body over PATCH /api/sessions/{id}, the `control`
data channel, POST /offer's `params` and WHIP query strings.

Fields: prompt, negative_prompt, strength, steps, t_index_list, seed, guidance,
blend {"prompt", "weight"}, similarity_filter, similarity_threshold, max_skip_frames, passthrough, probe,
temporal {"bank", "weight", "motion_strength": [low, high] or null},
controlnet [{"name", "preprocessor", "scale", "start", "end"}, ...] (the whole list each time; [] or null: none),
loras [{"name", "scale"}, ...] (the whole list each time; [] or null: none),
image_prompt {"image": "frame" | "upload", "scale"} or null (`parse_image_prompt`).
A wrong type, an unknown field or a value out of range is a `ParamError` naming the field (422),
nested fields by their path (`temporal.bank`, `controlnet[0].scale`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from livediff.config import IMAGE_SOURCES, ControlParams, ImagePromptParams, LoRAParams, StreamParams
from livediff.errors import ConfigError

T = TypeVar("T")

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
SESSION_FIELDS = ("probe", "reset", "record", "record_input")
"""Fields that belong to the session, not to the engine stream (`record`, `record_input`: docs/jobs.md)."""
_OBJECTS: dict[str, dict[str, tuple[str, type]]] = {
    "blend": {"prompt": ("blend_prompt", str), "weight": ("blend_weight", float)},
    "temporal": {
        "bank": ("temporal_bank", int),
        "weight": ("temporal_weight", float),
        "motion_strength": ("motion_strength", tuple),
    },
}
"""JSON objects -> their members: (StreamParams field, type)."""
_PATHS = {field: f"{name}.{member}" for name, members in _OBJECTS.items() for member, (field, _) in members.items()}
"""StreamParams field -> its path in the JSON (`blend_weight` -> `blend.weight`)."""


class ParamError(ValueError):
    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def _check_type(name: str, value: Any, kind: type) -> Any:
    if kind is tuple:  # a pair of numbers, or null
        if value is None:
            return None
        if isinstance(value, list) and len(value) == 2:
            return tuple(_check_type(name, v, float) for v in value)
        raise ParamError(name, f"{name} must be a list of two numbers [low, high] or null")
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind in (str, bool) and isinstance(value, kind):
        return value
    raise ParamError(name, f"{name} must be a {kind.__name__}, got {type(value).__name__}")


_CONTROL: dict[str, type] = {"name": str, "preprocessor": str, "scale": float, "start": float, "end": float}
"""A `controlnet` entry's members and their types (`ControlParams`)."""


def _parse_entries(
    field: str, value: Any, members: dict[str, type], make: Callable[..., T], what: str
) -> tuple[T, ...]:
    """A list of objects (`controlnet`, `loras`) -> `make(**members)` each; every error names the
    entry's member (`loras[1].scale`). `what` says what an entry's `name` picks."""
    if value is None:
        return ()
    shape = ", ".join(f'"{m}": {"str" if kind is str else "number"}' for m, kind in members.items())
    if not isinstance(value, list):
        raise ParamError(field, f"{field} must be a list of objects {{{shape}}}, or null")
    entries = []
    for i, entry in enumerate(value):
        path = f"{field}[{i}]"
        if not isinstance(entry, Mapping):
            raise ParamError(path, f"{path} must be an object with a name")
        unknown = sorted(set(entry) - set(members))
        if unknown:
            raise ParamError(f"{path}.{unknown[0]}", f"unknown field {unknown[0]!r} in {path}")
        if "name" not in entry:
            raise ParamError(f"{path}.name", f"{path}.name is missing: which {what}")
        given = {m: _check_type(f"{path}.{m}", entry[m], kind) for m, kind in members.items() if m in entry}
        try:
            entries.append(make(**given))
        except ConfigError as exc:
            raise ParamError(f"{path}.{str(exc).split(' ', 1)[0]}", f"{path}.{exc}") from None
    return tuple(entries)


_LORA: dict[str, type] = {"name": str, "scale": float}
"""A `loras` entry's members and their types (`LoRAParams`)."""


def parse_loras(value: Any) -> tuple[LoRAParams, ...]:
    """The `loras` list -> LoRAParams, each error naming its entry's member (`loras[1].scale`)."""
    return _parse_entries("loras", value, _LORA, LoRAParams, "LoRA")


def lora_query(text: str) -> list[dict[str, Any]]:
    """`loras=NAME[:SCALE]`, comma separated for several: `ink:0.8,film` -> [{"name": "ink", "scale": 0.8},
    {"name": "film"}]."""
    entries: list[dict[str, Any]] = []
    for item in (part.strip() for part in text.split(",")):
        name, colon, scale = item.partition(":")
        try:
            if not name:
                raise ValueError(item)
            entries.append({"name": name, "scale": float(scale)} if colon else {"name": name})
        except ValueError:
            raise ParamError("loras", f"loras: {item!r} is not NAME[:SCALE] (comma separated for several)") from None
    return entries


def parse_image_prompt(current: ImagePromptParams | None, value: Any) -> ImagePromptParams | None:
    """The `image_prompt` object -> ImagePromptParams, errors naming the member (`image_prompt.scale`).

    `image` asks for an image: `frame` captures the stream's current frame, `upload` takes the
    image last uploaded (`PUT /api/sessions/{id}/image-prompt`); each request takes it anew (the
    `version` counts them), even when it names the source the stream has now. Without `image`,
    the stream keeps its image (a scale change alone). null: no image prompt."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ParamError(
            "image_prompt", 'image_prompt must be an object {"image": "frame" or "upload", "scale": number} or null'
        )
    unknown = sorted(set(value) - {"image", "scale"})
    if unknown:
        raise ParamError(f"image_prompt.{unknown[0]}", f"unknown field {unknown[0]!r} in image_prompt")
    scale = _check_type("image_prompt.scale", value["scale"], float) if "scale" in value else None
    if "image" in value:
        image = _check_type("image_prompt.image", value["image"], str)
        if image not in IMAGE_SOURCES:
            raise ParamError(
                "image_prompt.image", f"image_prompt.image must be one of {', '.join(IMAGE_SOURCES)}, got {image!r}"
            )
        version = current.version + 1 if current is not None else 0
    elif current is None:
        raise ParamError("image_prompt.image", "image_prompt.image is missing: frame or upload")
    else:
        image, version = current.image, current.version
    if scale is None:
        scale = current.scale if current is not None else 1.0
    try:
        return ImagePromptParams(image, scale, version)
    except ConfigError as exc:
        raise refusal(exc) from None


def image_prompt_query(text: str) -> dict[str, Any]:
    """`image_prompt=IMAGE[:SCALE]` (WHIP query): `frame:0.6` -> {"image": "frame", "scale": 0.6}."""
    image, colon, scale = text.partition(":")
    try:
        return {"image": image, "scale": float(scale)} if colon else {"image": image}
    except ValueError:
        raise ParamError("image_prompt.scale", f"image_prompt: {text!r} is not IMAGE[:SCALE] (frame:0.6)") from None


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
            if value is not None and (
                not isinstance(value, list) or any(not isinstance(t, int) or isinstance(t, bool) for t in value)
            ):
                raise ParamError(name, "t_index_list must be a list of integers or null")
            changes[name] = tuple(value) if value is not None else None
        elif name in _OBJECTS:
            members = _OBJECTS[name]
            if not isinstance(value, Mapping) or set(value) - set(members):
                names: dict[type, str] = {str: "str", tuple: "[number, number]"}
                shape = ", ".join(f'"{m}": {names.get(kind, "number")}' for m, (_, kind) in members.items())
                raise ParamError(name, f"{name} must be an object {{{shape}}}")
            for member, (field, kind) in members.items():
                if member in value:
                    changes[field] = _check_type(f"{name}.{member}", value[member], kind)
        elif name == "controlnet":
            changes[name] = _parse_entries(name, value, _CONTROL, ControlParams, "ControlNet")
        elif name == "loras":
            changes[name] = parse_loras(value)
        elif name == "image_prompt":
            changes[name] = parse_image_prompt(current.image_prompt, value)
        elif name in SESSION_FIELDS:
            session[name] = _check_type(name, value, bool)
        else:
            raise ParamError(name, f"unknown field {name!r}")
    try:
        return current.replace(**changes), session
    except ConfigError as exc:
        raise refusal(exc) from None


def refusal(exc: ConfigError) -> ParamError:
    """A `ConfigError` about a StreamParams field (its message starts with the field's name) as a
    `ParamError` naming the field as the JSON does: from validation, or from an engine that cannot
    serve a param (`temporal_bank` without the feature bank). The message names it as the JSON does
    too (`temporal.bank must be ...`), not by the dataclass field."""
    message = str(exc)
    field = message.split(" ", 1)[0]
    path = _PATHS.get(field)
    return ParamError(field, message) if path is None else ParamError(path, path + message[len(field) :])


def query_name(path: str) -> str:
    """The name a URL query (and `livediff run --param`) gives a field: `temporal.bank` -> `temporal_bank`."""
    return next((field for field, nested in _PATHS.items() if nested == path), path)


def as_query(exc: ParamError) -> ParamError:
    """`exc` naming its field as a URL query writes it (`temporal_bank`), for params that came from one."""
    if exc.field is None or not exc.message.startswith(exc.field):
        return exc
    name = query_name(exc.field)
    return ParamError(name, name + exc.message[len(exc.field) :])


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
            elif name == "controlnet":
                data[name] = _controls_from_query(text)
            elif name == "loras":
                data[name] = lora_query(text)
            elif name == "image_prompt":
                data[name] = image_prompt_query(text)
            elif name in _PATHS:  # blend_prompt=...&temporal_bank=2: the object's members, flat
                parent, member = _PATHS[name].split(".")
                kind = _OBJECTS[parent][member][1]
                if kind is tuple:  # motion_strength=0.3,0.6
                    value: Any = [float(part) for part in text.split(",")]
                else:
                    value = text if kind is str else kind(text)
                data.setdefault(parent, {})[member] = value
            else:
                data[name] = text
        except ParamError:
            raise
        except ValueError:
            raise ParamError(name, f"{name}: {text!r} is not a {kind.__name__ if kind else 'number'}") from None
    return data


def _controls_from_query(text: str) -> list[dict[str, Any]]:
    """`controlnet=NAME[:PREPROCESSOR[:SCALE[:START[:END]]]]`, comma separated for several:
    `canny:canny:0.8,depth:depth:0.5` -> [{"name": "canny", "preprocessor": "canny", "scale": 0.8}, ...]."""
    entries = []
    members = list(_CONTROL)
    for item in (part.strip() for part in text.split(",")):
        fields = item.split(":")
        try:
            if not item or len(fields) > len(members):
                raise ValueError(item)
            entries.append({m: f if _CONTROL[m] is str else float(f) for m, f in zip(members, fields)})
        except ValueError:
            raise ParamError("controlnet", f"controlnet: {item!r} is not NAME[:PREPROCESSOR[:SCALE[:START[:END]]]] "
                             "(comma separated for several)") from None  # fmt: skip
    return entries
