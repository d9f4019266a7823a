"""Named training presets: the paper's family at a size that trains on 2 CPU cores, and the
router ablations of ``xmoe reproduce``.

Total FFN width at MoE positions is held equal (8 x d_ff), as in the paper: Switch 8 x d_ff
(top-1), top-2 16 x d_ff/2, XMoE 16 / 32 / 64 experts of d_ff/2, d_ff/4, d_ff/8 at t=0.9.
Capacity factors grow with the split so that the padded worst case equals Switch's
(γ = 1 for Switch, 2 for 16 experts, 4 for 32, 8 for 64). The dense model has one d_ff FFN.

The ``xmoe-*`` presets route on normalised logits with a fixed scale s = 3.7, the configuration
that won the reproduction (docs/results/lm.md); ``xmoe-32-paper`` is the paper's own router
(plain logits, small normal init), and the other ``xmoe-32-*`` / ``topp-32`` presets each change
one thing from it or from xmoe-32 (docs/routing.md).
"""

from __future__ import annotations

from dataclasses import replace

from xmoe.config import ConfigError, MoEConfig, _is_int, _require
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

LOGIT_SCALE = 3.7
_NORMALISED = {"logit_scale": LOGIT_SCALE}


# (router, experts, width divisor of d_ff, top_k, capacity factor, router options)
_FAMILY = {
    "dense": None,
    "switch": ("topk", 8, 1, 1, 1.0, {}),
    "top2": ("topk", 16, 2, 2, 2.0, {}),
    "xmoe-16": ("threshold", 16, 2, 2, 2.0, _NORMALISED),
    "xmoe-32": ("threshold", 32, 4, 2, 4.0, _NORMALISED),
    "xmoe-64": ("threshold", 64, 8, 2, 8.0, _NORMALISED),
}
_TARGETED = {**_NORMALISED, "target_experts": 4.0}  # k* = 4 of 32: top-2's FLOPs at t=0.9
ABLATIONS = {
    "xmoe-32-paper": ("threshold", 32, 4, 2, 4.0, {}),
    "xmoe-32-linear-init": ("threshold", 32, 4, 2, 4.0, {"init": "linear"}),
    "xmoe-32-entropy": ("threshold", 32, 4, 2, 4.0, {"entropy_coef": 0.1}),
    "xmoe-32-target": ("threshold", 32, 4, 2, 4.0, _TARGETED),
    "xmoe-32-decay": (
        "threshold",
        32,
        4,
        2,
        4.0,
        {**_TARGETED, "target_start": 16.0, "target_decay_steps": 200},
    ),
    "topp-32": ("topp", 32, 4, 2, None, {}),
}
_ALL = {**_FAMILY, **ABLATIONS}

PRESETS = (*_FAMILY, *ABLATIONS, "tiny")


def preset_moe(name: str, model: dict) -> MoEConfig | None:
    """The MoE layer of preset ``name`` (a family or ablation row; None for dense) for
    ``model``'s d_model and d_ff, so that another model size can take the same routers."""
    spec = _ALL[name]
    if spec is None:
        return None
    router, experts, divisor, top_k, gamma, options = spec
    return MoEConfig(
        d_model=model["d_model"],
        num_experts=experts,
        d_expert=model["d_ff"] // divisor,
        router=router,
        router_options=options,
        threshold=0.4 if router == "topp" else 0.9,  # Dynamic-MoE's p; XMoE's t
        top_k=top_k,
        capacity_factor=gamma,
        activation="gelu",
        bias=True,
        aux_loss_coef=0.01,
    )


def fine_grained_shared(
    base: MoEConfig,
    split: int,
    shared: int,
    router: str = "deepseek",
    router_options: dict | None = None,
) -> MoEConfig:
    """DeepSeekMoE's segmentation of a top-k layer: each of ``base``'s E experts split into
    ``split`` = m experts of ``d_expert / m``, ``shared`` = K_s of the mE always on and the
    rest routed by ``router`` with top-k = mk - K_s. Total and active expert weights (the
    matrices :func:`xmoe.flops.ffn_params` counts; biases and router rows differ) equal
    ``base``'s exactly; the capacity factor grows by m, so the padded worst case stays equal.

    Raises:
        ConfigError: ``split`` does not divide ``base.d_expert``, or ``shared`` is not in
            [0, m·k - 1] (at least one routed expert per token).
    """
    _require(
        _is_int(split) and split >= 1 and base.d_expert % split == 0,
        "split",
        split,
        f"a positive divisor of d_expert={base.d_expert}",
    )
    active = split * base.top_k
    _require(
        _is_int(shared) and 0 <= shared < active,
        "shared",
        shared,
        f"an integer in [0, split * top_k - 1 = {active - 1}]",
    )
    gamma = base.capacity_factor
    return replace(
        base,
        num_experts=split * base.num_experts - shared,
        d_expert=base.d_expert // split,
        top_k=active - shared,
        num_shared_experts=shared,
        router=router,
        router_options=router_options or {},
        capacity_factor=None if gamma is None else gamma * split,
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
            device="cpu",  # tests compare runs bit for bit; CUDA kernels need not be deterministic
            preset=name,
        )
    if name not in _ALL:
        raise ConfigError(f"preset={name!r} is invalid: preset must be one of {PRESETS}")
    model = dict(CORPUS_MODEL)
    return TrainConfig(
        model=ModelConfig(**model, moe=preset_moe(name, model)),
        data="corpus",
        preset=name,
        **CORPUS_TRAINING,
    )
