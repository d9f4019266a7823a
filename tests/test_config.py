"""Bad configuration and bad input fail loudly, naming the parameter and its range."""

from __future__ import annotations

import pytest
import torch

from xmoe import ConfigError, MoEConfig, MoELayer

BASE = {"d_model": 8, "num_experts": 4, "d_expert": 4}


@pytest.mark.parametrize(
    "field,value,fragment",
    [
        ("threshold", 0.0, "(0, 1]"),
        ("threshold", 1.5, "(0, 1]"),
        ("threshold", -0.1, "(0, 1]"),
        ("top_k", 0, "[1, num_experts=4]"),
        ("top_k", 5, "[1, num_experts=4]"),
        ("d_model", 0, "positive integer"),
        ("num_experts", -2, "positive integer"),
        ("d_expert", 2.5, "positive integer"),
        ("capacity_factor", 0.0, "> 0"),
        ("capacity_factor", -1.0, "> 0"),
        ("capacity_factor", float("inf"), "finite"),
        ("min_capacity", 0, ">= 1"),
        ("router", "nope", "one of"),
        ("activation", "tanh", "one of"),
        ("init", "xavier", "one of"),
        ("backend", "cuda", "one of"),
        ("aux_loss_coef", -0.01, ">= 0"),
        ("init_std", 0.0, "> 0"),
    ],
)
def test_bad_config_names_parameter_and_range(field, value, fragment):
    with pytest.raises(ConfigError) as info:
        MoEConfig(**{**BASE, "router": "topk" if field == "top_k" else "threshold", field: value})
    message = str(info.value)
    assert message.startswith(f"{field}=")
    assert fragment in message


def test_config_round_trips_through_dict():
    config = MoEConfig(**BASE, router="topk", capacity_factor=1.25)
    assert MoEConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="unknown MoEConfig field"):
        MoEConfig.from_dict({**BASE, "experts": 3})


def test_wrong_last_dimension():
    layer = MoELayer(MoEConfig(**BASE))
    with pytest.raises(ValueError, match=r"d_model=8"):
        layer(torch.randn(3, 7))


def test_integer_input_rejected():
    layer = MoELayer(MoEConfig(**BASE))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(3, 8, dtype=torch.long))


def test_non_finite_input_rejected_when_checking():
    x = torch.randn(3, 8)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        MoELayer(MoEConfig(**BASE, check_finite=True))(x)


def test_grouped_backend_refuses_what_it_cannot_run():
    layer = MoELayer(MoEConfig(d_model=6, num_experts=4, d_expert=4, backend="grouped"))
    with pytest.raises(ValueError, match="backend='grouped'"):
        layer(torch.randn(40, 6))  # 6 fp32 values = 24 bytes per row: not 16-byte aligned
    layer64 = MoELayer(MoEConfig(**BASE, backend="grouped")).double()
    with pytest.raises(ValueError, match="backend='grouped'"):
        layer64(torch.randn(40, 8, dtype=torch.float64))
