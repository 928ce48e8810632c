from __future__ import annotations

import pytest

from livediff.config import EngineSettings, StreamParams
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
