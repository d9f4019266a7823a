"""SparsifyConfig: the validated settings of a dense -> sparse conversion."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from xmoe.config import ConfigError, DictConfig, _is_int, _is_number, _require, _require_choice

PARTITIONS = ("contiguous", "clustered")
"""``contiguous``: expert e owns neurons [e·H, (e+1)·H). ``clustered``: balanced k-means on the
neurons' activation patterns over calibration tokens (co-activated neurons share an expert)."""

COMBINES = ("unweighted", "weighted")
"""``unweighted``: each selected expert adds exactly its slice of the dense FFN (MoEfication).
``weighted``: expert e's output is scaled by E·p_e, its router probability times E, so a uniform
router reproduces the dense FFN at t=1 (the XMoE dense -> sparse route)."""

ROUTERS = ("learned", "oracle")
"""``learned``: a linear router per layer trained on calibration hidden states. ``oracle``:
ranks experts by the true L2 norm of their outputs (computes every expert; for measurement)."""


@dataclass(frozen=True)
class SparsifyConfig(DictConfig):
    """How a dense SwiGLU FFN becomes unweighted neuron-group experts.

    Exactly one selection rule is set: ``active_fraction`` f (top-k, k = ceil(f·E)) or
    ``threshold`` t (the smallest set of experts whose router probability mass reaches t); with
    neither given, top-k at f = 0.5.

    Args:
        expert_size: neurons per expert (H); must divide the FFN width (checked by ``sparsify``).
        partition: one of :data:`PARTITIONS`.
        router: one of :data:`ROUTERS`.
        active_fraction: f in (0, 1]; 0.5 when ``threshold`` is not set either.
        threshold: t in (0, 1], or None.
        router_steps: full-batch Adam steps of each layer's router (learned router).
        router_lr: their learning rate.
        cluster_iters: balanced k-means iterations (clustered partition).
        cluster_tokens: calibration tokens per layer the clustering reads (evenly spaced).
        seed: seeds the clustering's initial centroids.
        combine: one of :data:`COMBINES`.
    """

    expert_size: int
    partition: str = field(default="contiguous", metadata={"choices": PARTITIONS})
    router: str = field(default="learned", metadata={"choices": ROUTERS})
    active_fraction: float | None = None
    threshold: float | None = None
    router_steps: int = 300
    router_lr: float = 1e-2
    cluster_iters: int = 25
    cluster_tokens: int = 8192
    seed: int = 0
    combine: str = field(default="unweighted", metadata={"choices": COMBINES})

    def __post_init__(self) -> None:
        if self.active_fraction is None and self.threshold is None:
            object.__setattr__(self, "active_fraction", 0.5)  # frozen: no plain set
        _require(
            _is_int(self.expert_size) and self.expert_size >= 1,
            "expert_size",
            self.expert_size,
            "an int >= 1",
        )
        _require_choice("partition", self.partition, PARTITIONS)
        _require_choice("router", self.router, ROUTERS)
        _require_choice("combine", self.combine, COMBINES)
        if self.combine == "weighted" and self.router == "oracle":
            raise ConfigError(
                "combine='weighted' with router='oracle' is invalid: the weighted combine "
                "scales experts by a learned router's probabilities"
            )
        if (self.active_fraction is None) == (self.threshold is None):
            raise ConfigError(
                f"active_fraction={self.active_fraction!r}, threshold={self.threshold!r} is "
                "invalid: set exactly one of active_fraction (top-k) and threshold (mass rule)"
            )
        for name in ("active_fraction", "threshold"):
            value = getattr(self, name)
            if value is not None:
                _require(_is_number(value) and 0 < value <= 1, name, value, "a number in (0, 1]")
        for name in ("router_steps", "cluster_iters", "cluster_tokens"):
            value = getattr(self, name)
            _require(_is_int(value) and value >= 1, name, value, "an int >= 1")
        _require(
            _is_number(self.router_lr) and self.router_lr > 0,
            "router_lr",
            self.router_lr,
            "a number > 0",
        )
        _require(  # the clustering's KMeans random_state: scikit-learn takes 32-bit seeds
            _is_int(self.seed) and 0 <= self.seed < 2**32,
            "seed",
            self.seed,
            "an integer in [0, 2**32 - 1]",
        )

    def num_experts(self, intermediate_size: int) -> int:
        """E for an FFN of this width.

        Raises:
            ConfigError: ``expert_size`` does not divide ``intermediate_size``.
        """
        if intermediate_size % self.expert_size:
            raise ConfigError(
                f"expert_size={self.expert_size} is invalid: it must divide the FFN width "
                f"intermediate_size={intermediate_size}"
            )
        return intermediate_size // self.expert_size

    def top_k(self, num_experts: int) -> int | None:
        """k = ceil(f·E) under ``active_fraction`` (rounded first, so 0.3·10 gives 3), else
        None."""
        if self.active_fraction is None:
            return None
        return max(1, math.ceil(round(self.active_fraction * num_experts, 9)))
