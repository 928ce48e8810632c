from __future__ import annotations

import pytest

from livediff.config import ControlParams, EngineSettings, StreamParams
from livediff.errors import ConfigError


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"strength": 0.5, "steps": 1}, (499,)),
        ({"strength": 1.0, "steps": 2}, (999, 499)),
        ({"strength": 0.8, "steps": 4}, (799, 599, 399, 199)),
        ({"t_index_list": (900, 500, 100)}, (900, 500, 100)),
    ],
)
def test_timesteps(params: dict, expected: tuple[int, ...]) -> None:
    assert StreamParams(**params).timesteps == expected


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"height": 100}, "height"),
        ({"width": 513}, "width"),
        ({"backend": "cuda-magic"}, "backend"),
        ({"max_batch": 0}, "max_batch"),
        ({"compile": True, "backend": "onnx"}, "compile"),
        ({"compile": True, "backend": "cuda-graph"}, "compile"),
    ],
)
def test_engine_settings_name_the_bad_field(changes: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        EngineSettings(**changes)


def test_cuda_graph_is_a_backend_setting() -> None:
    assert EngineSettings(backend="cuda-graph").backend == "cuda-graph"  # whether CUDA is there is checked at start


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"steps": 0}, "steps"),
        ({"steps": 5}, "steps"),
        ({"strength": 0.0}, "strength"),
        ({"strength": 1.5}, "strength"),
        ({"guidance": -1.0}, "guidance"),
        ({"blend_weight": 2.0}, "blend_weight"),
        ({"t_index_list": (100, 500)}, "t_index_list"),
        ({"t_index_list": (1000,)}, "t_index_list"),
        ({"t_index_list": (900, 700, 500, 300, 100)}, "t_index_list"),
        ({"seed": -1}, "seed"),
    ],
)
def test_stream_params_name_the_bad_field(changes: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        StreamParams(**changes)


@pytest.mark.parametrize(
    ("controlnets", "message"),
    [
        ((("bad name", "tiny"),), "not a name"),
        ((("edges", ""),), "has no source"),
        ((("edges", "tiny"), ("edges", "sd-turbo-random")), "named twice"),
    ],
)
def test_engine_settings_check_the_controlnets(controlnets: tuple, message: str) -> None:
    with pytest.raises(ConfigError, match=f"controlnets: .*{message}"):
        EngineSettings(controlnets=controlnets)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"name": "no spaces"}, "name"),
        ({"preprocessor": "pose"}, "preprocessor"),
        ({"scale": -0.1}, "scale"),
        ({"scale": 2.5}, "scale"),
        ({"start": 1.0}, "start"),
        ({"start": 0.5, "end": 0.5}, "end"),
    ],
)
def test_control_params_name_the_bad_field(changes: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=f"^{field} "):
        ControlParams(**{"name": "edges", **changes})


def test_a_stream_takes_at_most_four_controlnets() -> None:
    four = tuple(ControlParams(name=f"c{i}") for i in range(4))
    assert StreamParams(controlnet=list(four)).controlnet == four  # any sequence, kept as a tuple
    with pytest.raises(ConfigError, match="controlnet takes at most 4"):
        StreamParams(controlnet=(*four, ControlParams(name="c4")))


@pytest.mark.parametrize(("start", "end", "active"), [(0.0, 1.0, [True, True, True, True]),
                                                     (0.0, 0.5, [True, True, False, False]),
                                                     (0.3, 1.0, [False, False, True, True]),
                                                     (0.25, 0.75, [False, True, True, False])])  # fmt: skip
def test_control_guidance_start_and_end_pick_steps_as_diffusers_does(start: float, end: float,
                                                                     active: list[bool]) -> None:  # fmt: skip
    control = ControlParams(name="edges", start=start, end=end)
    assert [control.active(k, 4) for k in range(4)] == active
    # diffusers: keep = 1 - float(i / n < start or (i + 1) / n > end)
    assert active == [not (k / 4 < start or (k + 1) / 4 > end) for k in range(4)]
