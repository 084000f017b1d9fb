"""SteerConfig: defaults, validation, and the steer_config.json round trip."""

import json

import pytest
import torch

from steer_fast import SteerConfig
from steer_fast.constants import FORMAT_VERSION, STEER_TYPE


def test_defaults_match_the_documented_api():
    config = SteerConfig()
    # The published configuration: rank 8, SiLU, no biases, down-projection init scaled by 1e-3,
    # after every decoder block.
    assert (config.rank, config.activation, config.bias, config.scale) == (8, "silu", False, 1.0)
    assert (config.init, config.site) == ("published", ("block",))
    assert config.layers is None and config.fuse_residual is True and config.dtype is None
    assert config.backend == "auto"
    assert config.steer_type == STEER_TYPE == "post_block"
    assert config.format_version == FORMAT_VERSION


def test_the_library_fields_are_not_arguments():
    with pytest.raises(TypeError):
        SteerConfig(steer_type="lora")
    with pytest.raises(TypeError):
        SteerConfig(format_version=2)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"rank": -3}, "rank"),
        ({"rank": 2.0}, "rank"),
        ({"rank": True}, "rank"),
        ({"activation": "swish"}, "activation"),
        ({"activation": 3}, "activation"),
        ({"rank": 0, "activation": "silu"}, "activation"),
        ({"rank": 0, "bias": True}, "bias"),
        ({"rank": 0, "init": "lora"}, "init"),
        ({"init": "xavier"}, "init"),
        ({"site": "residual"}, "site"),
        ({"site": []}, "site"),
        ({"site": ["mlp", "mlp"]}, "site"),
        ({"site": b"mlp"}, "site"),
        ({"bias": 1}, "bias"),
        ({"scale": float("nan")}, "scale"),
        ({"scale": "1"}, "scale"),
        ({"layers": []}, "layers"),
        ({"layers": [0, 0]}, "layers"),
        ({"layers": [-1]}, "layers"),
        ({"layers": "0,1"}, "layers"),
        ({"layers": [1.0]}, "layers"),
        ({"fuse_residual": "yes"}, "fuse_residual"),
        ({"dtype": torch.int8}, "dtype"),
        ({"dtype": torch.float8_e4m3fn}, "dtype"),
        ({"dtype": torch.complex64}, "dtype"),
        ({"dtype": "int32"}, "dtype"),
        ({"dtype": "float64", "backend": "triton"}, "dtype"),
        ({"backend": "cuda"}, "backend"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"num_layers": 0}, "num_layers"),
        ({"layers": [0, 4], "num_layers": 4}, "layers"),
    ],
)
def test_bad_values_raise_value_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SteerConfig(**kwargs)


def test_rank_zero_and_sites_are_normalised():
    vector = SteerConfig(rank=0)
    assert (vector.activation, vector.bias, vector.init) == ("identity", False, None)
    assert SteerConfig(rank=0, activation="identity").activation == "identity"
    assert SteerConfig(site="mlp").site == ("mlp",)
    assert SteerConfig(site=["mlp", "attn"]).site == ("attn", "mlp")
    assert SteerConfig(site=("mlp", "block")).to_dict()["site"] == ["block", "mlp"]
    assert SteerConfig(init="lora").init == "lora"


def test_a_format_1_file_keeps_its_meaning():
    """Files written before sites, rank 0 and the init option: every field was saved, so the
    new defaults do not change them."""
    values = {
        "activation": "identity",
        "backend": "auto",
        "bias": True,
        "dtype": None,
        "format_version": 1,
        "fuse_residual": True,
        "hidden_size": 32,
        "layers": None,
        "num_layers": 2,
        "rank": 8,
        "scale": 1.0,
        "steer_type": "post_block",
    }
    config = SteerConfig.from_dict(values)
    assert (config.activation, config.bias, config.site) == ("identity", True, ("block",))


def test_values_are_normalised():
    config = SteerConfig(layers=[3, 1], dtype="torch.bfloat16", scale=2, rank=4)
    assert config.layers == (1, 3)
    assert config.dtype is torch.bfloat16
    assert isinstance(config.scale, float)
    assert SteerConfig(dtype="float16").dtype is torch.float16


def test_json_round_trip_has_sorted_keys_and_every_field(tmp_path):
    config = SteerConfig(
        rank=3,
        activation="gelu_tanh",
        bias=False,
        scale=-0.5,
        layers=[2, 0],
        fuse_residual=False,
        dtype=torch.bfloat16,
        backend="torch",
        hidden_size=64,
        num_layers=4,
    )
    text = config.to_json_string()
    values = json.loads(text)
    assert list(values) == sorted(values)
    assert values["dtype"] == "bfloat16" and values["layers"] == [0, 2]
    assert values["steer_type"] == "post_block" and values["format_version"] == FORMAT_VERSION
    path = tmp_path / "steer_config.json"
    path.write_text(text)
    assert SteerConfig.from_json_file(path) == config
    assert SteerConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "change, match",
    [
        ({"steer_type": "lora"}, "steer_type"),
        ({"format_version": FORMAT_VERSION + 1}, "format_version"),
        ({"format_version": "1"}, "format_version"),
        ({"lora_alpha": 16}, "unknown steer config keys"),
        ({"rank": -1}, "rank"),
    ],
)
def test_from_dict_rejects_what_it_cannot_read(change, match):
    values = SteerConfig().to_dict()
    values.update(change)
    with pytest.raises(ValueError, match=match):
        SteerConfig.from_dict(values)


def test_from_json_file_rejects_invalid_json(tmp_path):
    path = tmp_path / "steer_config.json"
    path.write_text("{rank: 4")
    with pytest.raises(ValueError, match="not valid JSON"):
        SteerConfig.from_json_file(path)
