"""Named training presets: the paper's family at a size that trains on 2 CPU cores.

Total FFN width at MoE positions is held equal (8 x d_ff), as in the paper: Switch 8 x d_ff
(top-1), top-2 16 x d_ff/2, XMoE 16 / 32 / 64 experts of d_ff/2, d_ff/4, d_ff/8 at t=0.9.
Capacity factors grow with the split so that the padded worst case equals Switch's
(γ = 1 for Switch, 2 for 16 experts, 4 for 32, 8 for 64). The dense model has one d_ff FFN.
"""

from __future__ import annotations

from xmoe.config import ConfigError, MoEConfig
from xmoe.models.config import ModelConfig
from xmoe.training.config import TrainConfig

CORPUS_MODEL = {
    "vocab_size": 8192,
    "d_model": 128,
    "num_layers": 4,
    "num_heads": 4,
    "max_seq_len": 256,
    "d_ff": 512,
}
CORPUS_TRAINING = {"batch_size": 32, "seq_len": 128, "max_steps": 1000, "lr": 2e-3}

# (router, experts, width divisor of d_ff, top_k, capacity factor)
_FAMILY = {
    "dense": None,
    "switch": ("topk", 8, 1, 1, 1.0),
    "top2": ("topk", 16, 2, 2, 2.0),
    "xmoe-16": ("threshold", 16, 2, 2, 2.0),
    "xmoe-32": ("threshold", 32, 4, 2, 4.0),
    "xmoe-64": ("threshold", 64, 8, 2, 8.0),
}

PRESETS = (*_FAMILY, "tiny")


def _moe(model: dict, spec: tuple | None) -> MoEConfig | None:
    if spec is None:
        return None
    router, experts, divisor, top_k, gamma = spec
    return MoEConfig(
        d_model=model["d_model"],
        num_experts=experts,
        d_expert=model["d_ff"] // divisor,
        router=router,
        threshold=0.9,
        top_k=top_k,
        capacity_factor=gamma,
        activation="gelu",
        bias=True,
        aux_loss_coef=0.01,
    )


def preset(name: str) -> TrainConfig:
    """The :class:`TrainConfig` of preset ``name`` (one of :data:`PRESETS`)."""
    if name == "tiny":
        model = {"vocab_size": 64, "d_model": 32, "num_layers": 2, "num_heads": 2}
        model |= {"max_seq_len": 64, "d_ff": 64}
        moe = MoEConfig(d_model=32, num_experts=8, d_expert=16, capacity_factor=2.0)
        return TrainConfig(
            model=ModelConfig(**model, moe=moe),
            data="synthetic",
            batch_size=8,
            seq_len=32,
            max_steps=30,
            lr=5e-3,
            eval_interval=10,
            eval_batches=4,
            checkpoint_interval=10,
            log_interval=5,
            preset=name,
        )
    if name not in _FAMILY:
        raise ConfigError(f"preset={name!r} is invalid: preset must be one of {PRESETS}")
    model = dict(CORPUS_MODEL)
    return TrainConfig(
        model=ModelConfig(**model, moe=_moe(model, _FAMILY[name])),
        data="corpus",
        preset=name,
        **CORPUS_TRAINING,
    )
