"""Bad configuration and bad input fail loudly, naming the parameter and its range."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from xmoe import ConfigError, MoEConfig, MoELayer
from xmoe.config import _is_number
from xmoe.models import ModelConfig
from xmoe.training.config import TrainConfig, apply_overrides

BASE = {"d_model": 8, "num_experts": 4, "d_expert": 4}
MODEL_BASE = {"vocab_size": 16, "d_model": 8, "num_layers": 2, "num_heads": 2}
MODEL_BASE |= {"max_seq_len": 16, "d_ff": 16}
TRAIN_BASE = {"model": ModelConfig(**MODEL_BASE, moe=MoEConfig(**BASE)), "seq_len": 8}
BASES = {MoEConfig: BASE, ModelConfig: MODEL_BASE, TrainConfig: TRAIN_BASE}

INF, NAN = float("inf"), float("nan")


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
        MoEConfig.from_dict({**BASE, "num_expert": 3})


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


# (class, field, bad value, fragment of the allowed range the message must state)
BAD_VALUES = [
    # non-finite floats
    (MoEConfig, "threshold", NAN, "(0, 1]"),
    (MoEConfig, "threshold", INF, "(0, 1]"),
    (MoEConfig, "init_std", INF, "finite number > 0"),
    (MoEConfig, "init_std", NAN, "finite number > 0"),
    (MoEConfig, "aux_loss_coef", INF, "finite number >= 0"),
    (MoEConfig, "aux_loss_coef", NAN, "finite number >= 0"),
    (MoEConfig, "capacity_factor", NAN, "finite number > 0"),
    (ModelConfig, "rope_theta", INF, "finite number > 0"),
    (ModelConfig, "norm_eps", NAN, "finite number > 0"),
    (ModelConfig, "init_std", INF, "finite number > 0"),
    (ModelConfig, "dropout", NAN, "[0, 1)"),
    (TrainConfig, "lr", INF, "finite number > 0"),
    (TrainConfig, "lr", NAN, "finite number > 0"),
    (TrainConfig, "min_lr_ratio", NAN, "[0, 1]"),
    (TrainConfig, "warmup_fraction", INF, "[0, 1)"),
    (TrainConfig, "beta1", NAN, "[0, 1)"),
    (TrainConfig, "beta2", NAN, "[0, 1)"),
    (TrainConfig, "weight_decay", INF, "finite number >= 0"),
    (TrainConfig, "grad_clip", NAN, "finite number >= 0"),
    # bools in numeric fields
    (MoEConfig, "threshold", True, "(0, 1]"),
    (MoEConfig, "init_std", True, "> 0"),
    (MoEConfig, "aux_loss_coef", False, ">= 0"),
    (MoEConfig, "capacity_factor", True, "> 0"),
    (MoEConfig, "d_model", True, "positive integer"),
    (MoEConfig, "min_capacity", True, ">= 1"),
    (MoEConfig, "top_k", True, "[1, num_experts=4]"),
    (ModelConfig, "dropout", False, "[0, 1)"),
    (ModelConfig, "init_std", True, "> 0"),
    (ModelConfig, "vocab_size", True, "positive integer"),
    (ModelConfig, "moe_every", True, "[1, num_layers=2]"),
    (TrainConfig, "lr", True, "> 0"),
    (TrainConfig, "warmup_fraction", False, "[0, 1)"),
    (TrainConfig, "batch_size", True, "positive integer"),
    (TrainConfig, "seed", False, "[0, 2**63 - 1]"),
    (TrainConfig, "eval_batches", False, ">= 0"),
    # non-bools in bool fields
    (MoEConfig, "bias", 1, "a bool"),
    (MoEConfig, "renormalize", "yes", "a bool"),
    (MoEConfig, "capacity_at_eval", 0, "a bool"),
    (MoEConfig, "check_finite", None, "a bool"),
    (ModelConfig, "tie_embeddings", 1, "a bool"),
    # wrong types in str (choice) fields: ConfigError, not TypeError
    (MoEConfig, "router", ["threshold"], "one of"),
    (MoEConfig, "router", None, "one of"),
    (MoEConfig, "activation", ["gelu"], "one of"),
    (MoEConfig, "init", None, "one of"),
    (MoEConfig, "backend", {"auto": 1}, "one of"),
    (ModelConfig, "dense_activation", ["gelu"], "one of"),
    (ModelConfig, "dense_activation", None, "one of"),
    (TrainConfig, "data", ["synthetic"], "one of"),
    (TrainConfig, "precision", None, "one of"),
    (TrainConfig, "preset", None, "a str"),
    # wrong types in nested-config fields
    (ModelConfig, "moe", 5, "None, an MoEConfig"),
    (ModelConfig, "moe", "threshold", "None, an MoEConfig"),
    (TrainConfig, "model", 5, "a ModelConfig"),
    (TrainConfig, "model", None, "a ModelConfig"),
]


def _ids(case):
    cls, field, value, _ = case
    return f"{cls.__name__}.{field}={value!r}"


@pytest.mark.parametrize("how", ["construct", "replace"])
@pytest.mark.parametrize("case", BAD_VALUES, ids=[_ids(c) for c in BAD_VALUES])
def test_every_bad_value_is_a_config_error_naming_field_and_range(case, how):
    cls, field, value, fragment = case
    base = BASES[cls]
    with pytest.raises(ConfigError) as info:
        if how == "construct":
            cls(**{**base, field: value})
        else:
            dataclasses.replace(cls(**base), **{field: value})
    message = str(info.value)
    assert message.startswith(f"{field}="), message
    assert f"{field} must be" in message and fragment in message, message


@pytest.mark.parametrize("value", [1, 0.5, -2, 0, 10**400])
def test_is_number_accepts_finite_ints_and_floats(value):
    assert _is_number(value) is True


@pytest.mark.parametrize("value", [True, False, INF, -INF, NAN, "1", None, [1]])
def test_is_number_rejects_bools_non_finite_and_non_numbers(value):
    assert _is_number(value) is False


@pytest.mark.parametrize("cls", list(BASES))
def test_configs_are_frozen(cls):
    config = cls(**BASES[cls])
    field = dataclasses.fields(cls)[0].name
    before = getattr(config, field)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(config, field, before)
    with pytest.raises(dataclasses.FrozenInstanceError):
        delattr(config, field)
    assert getattr(config, field) == before


def test_frozen_assignment_of_a_bad_value_changes_nothing():
    config = MoEConfig(**BASE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.threshold = 5
    assert config.threshold == 0.9
    model = ModelConfig(**MODEL_BASE, moe=config)
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.moe.threshold = 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.moe = None


@pytest.mark.parametrize("cls", list(BASES))
def test_frozen_configs_round_trip_hash_and_compare(cls):
    config = cls(**BASES[cls])
    again = cls.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and hash(again) == hash(config)
    assert len({config, again}) == 1
    assert again.to_dict() == config.to_dict()


def test_replace_validates_and_leaves_the_original_alone():
    config = ModelConfig(**MODEL_BASE, moe=MoEConfig(**BASE))
    lower = dataclasses.replace(config, moe=dataclasses.replace(config.moe, threshold=0.5))
    assert lower.moe.threshold == 0.5 and config.moe.threshold == 0.9
    assert lower != config and hash(lower) != hash(config)
    with pytest.raises(ConfigError, match=r"^moe_every=3 is invalid: .*\[1, num_layers=2\]"):
        dataclasses.replace(config, moe_every=3)


def test_nested_dicts_become_configs():
    model = ModelConfig(**MODEL_BASE, moe=dict(BASE))
    assert isinstance(model.moe, MoEConfig)
    train = TrainConfig(model=model.to_dict(), seq_len=8)
    assert train.model == model and isinstance(train.model.moe, MoEConfig)


@pytest.mark.parametrize(
    "cls,values,missing",
    [
        (MoEConfig, {"d_model": 64, "d_expert": 32}, "['num_experts']"),
        (MoEConfig, {}, "['d_model', 'num_experts', 'd_expert']"),
        (ModelConfig, {"d_model": 8}, "['vocab_size']"),
        (TrainConfig, {"lr": 1e-3}, "['model']"),
    ],
)
def test_from_dict_names_missing_fields_and_class(cls, values, missing):
    with pytest.raises(ConfigError) as info:
        cls.from_dict(values)
    message = str(info.value)
    assert message.startswith(f"missing {cls.__name__} field(s) {missing}"), message


def test_nested_from_dict_names_missing_fields():
    with pytest.raises(ConfigError, match=r"missing MoEConfig field\(s\) \['num_experts'\]"):
        ModelConfig.from_dict({**MODEL_BASE, "moe": {"d_model": 8, "d_expert": 4}})
    with pytest.raises(ConfigError, match=r"missing ModelConfig field\(s\) \['vocab_size'\]"):
        TrainConfig.from_dict({"model": {"d_model": 8}})


@pytest.mark.parametrize("cls", list(BASES))
@pytest.mark.parametrize("values", [None, [("d_model", 8)], "d_model=8", 5])
def test_from_dict_rejects_non_dicts(cls, values):
    with pytest.raises(ConfigError, match=f"^{cls.__name__} must be given as a dict"):
        cls.from_dict(values)


def test_hf_config_missing_or_bad_moe_is_a_config_error():
    pytest.importorskip("transformers")
    from xmoe.hf import XMoEConfig

    with pytest.raises(ConfigError, match=r"missing MoEConfig field\(s\) \['num_experts'\]"):
        XMoEConfig(moe={"d_model": 64, "d_expert": 32})
    with pytest.raises(ConfigError, match="MoEConfig must be given as a dict"):
        XMoEConfig(moe=["threshold"])
    with pytest.raises(ConfigError, match=r"^threshold=inf is invalid"):
        XMoEConfig(
            d_model=64, moe={"d_model": 64, "num_experts": 4, "d_expert": 8, "threshold": INF}
        )
    with pytest.raises(ConfigError, match=r"^dropout=True is invalid"):
        XMoEConfig(dropout=True)


@pytest.mark.parametrize(
    "override,field",
    [
        ("lr=inf", "lr"),
        ("lr=nan", "lr"),
        ("moe.threshold=nan", "threshold"),
        ("moe.init_std=inf", "init_std"),
        ("model.dropout=nan", "dropout"),
        ("moe.router=none", "router"),
        ("precision=none", "precision"),
    ],
)
def test_overrides_reject_non_finite_and_mistyped_values(override, field):
    with pytest.raises(ConfigError, match=f"^{field}="):
        apply_overrides(TrainConfig(**TRAIN_BASE), [override])


def test_overrides_return_a_new_validated_config():
    config = TrainConfig(**TRAIN_BASE)
    changed = apply_overrides(config, ["moe.threshold=0.5", "lr=1e-3"])
    assert changed.model.moe.threshold == 0.5 and changed.lr == 1e-3
    assert config.model.moe.threshold == 0.9 and not math.isclose(config.lr, 1e-3)


@pytest.mark.parametrize(("grad_clip", "clip_norm"), [(0.5, 0.5), (0.0, math.inf)])
def test_clip_norm_is_grad_clip_or_no_clipping(grad_clip, clip_norm):
    assert TrainConfig(**TRAIN_BASE, grad_clip=grad_clip).clip_norm == clip_norm
