"""SparsifyConfig: the validated settings of a dense -> sparse conversion."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from xmoe.config import ConfigError, DictConfig, _is_int, _is_number, _require, _require_choice
from xmoe.flops import masked_swiglu_fraction

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

MODES = ("experts", "neurons")
"""``experts``: neuron-group experts chosen per token by a router (MoEfication). ``neurons``: no
router; each input channel of gate/up and each neuron is skipped on its own when its score falls
below a threshold calibrated per layer and site (TEAL, WINA, CHESS)."""

SITES = ("gate_up", "down", "gate")
"""Where the neurons mode skips inputs. ``gate_up``: the channels x_j entering the gate and up
projections. ``down``: the neurons h_i = silu(g_i)·u_i entering the down projection. ``gate``:
gate-first (CHESS): the gate runs, neuron i is kept when |silu(g_i)|·E|u_i| reaches its
threshold, and up and down run on the kept neurons only (so not with ``down``)."""

SCORINGS = ("teal", "wina")
"""What the neurons mode compares with a threshold: ``teal`` the input's magnitude |x_j|;
``wina`` |x_j|·‖W[:, j]‖₂, times the norm of the weight column the input multiplies (over the
stacked gate and up for ``gate_up``, of the down projection for ``down`` and ``gate``)."""

ALLOCATIONS = ("uniform", "greedy")
"""How the neurons mode reaches ``target_flops`` in each layer. ``uniform``: every site skips
the same fraction of its inputs. ``greedy`` (TEAL): the site whose next step of sparsity adds the
least output error per FLOP saved on the calibration inputs is raised, until the layer is at
``target_flops``."""


@dataclass(frozen=True)
class SparsifyConfig(DictConfig):
    """How a dense SwiGLU FFN becomes sparse: unweighted neuron-group experts with a router
    (``mode="experts"``), or per-neuron and per-channel thresholds (``mode="neurons"``).

    Experts mode: ``expert_size`` is required and exactly one selection rule is set:
    ``active_fraction`` f (top-k, k = ceil(f·E)) or ``threshold`` t (the smallest set of experts
    whose router probability mass reaches t); with neither given, top-k at f = 0.5. Neurons
    mode: no experts, so ``expert_size``, ``active_fraction`` and ``threshold`` stay unset;
    ``target_flops``, ``scoring``, ``allocation`` and ``sites`` apply (experts mode ignores
    them).

    Args:
        expert_size: neurons per expert (H); must divide the FFN width (checked by ``sparsify``);
            experts mode only, where it is required.
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
        mode: one of :data:`MODES`.
        target_flops: F in (0, 1], the fraction of the dense FFN FLOPs each layer computes on the
            calibration tokens (neurons mode; 1.0 is the dense model).
        scoring: one of :data:`SCORINGS` (neurons mode).
        allocation: one of :data:`ALLOCATIONS` (neurons mode).
        sites: one or more of :data:`SITES` (neurons mode; ``down`` and ``gate`` exclude each
            other).
    """

    expert_size: int | None = None
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
    mode: str = field(default="experts", metadata={"choices": MODES})
    target_flops: float = 0.5
    scoring: str = field(default="wina", metadata={"choices": SCORINGS})
    allocation: str = field(default="greedy", metadata={"choices": ALLOCATIONS})
    sites: tuple[str, ...] = field(default=("gate_up", "down"), metadata={"choices": SITES})

    def __post_init__(self) -> None:
        _require_choice("mode", self.mode, MODES)
        self._check_neurons()
        if self.mode == "experts":
            if self.active_fraction is None and self.threshold is None:
                object.__setattr__(self, "active_fraction", 0.5)  # frozen: no plain set
            if self.expert_size is None:
                raise ConfigError(
                    "expert_size is required with mode='experts' (neurons per expert); "
                    "mode='neurons' takes none"
                )
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
        if self.mode == "experts" and (self.active_fraction is None) == (self.threshold is None):
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

    def _check_neurons(self) -> None:
        """The neurons mode's fields (checked in both modes: a bad value is never kept), and in
        neurons mode none of the experts mode's size and selection rule set."""
        for name in ("expert_size", "active_fraction", "threshold"):
            if self.mode == "neurons" and getattr(self, name) is not None:
                raise ConfigError(
                    f"{name}={getattr(self, name)!r} is invalid with mode='neurons': it has no "
                    "experts to size or select (set target_flops instead)"
                )
        if isinstance(self.sites, list):  # as JSON (config.json) gives it back
            object.__setattr__(self, "sites", tuple(self.sites))
        _require(
            isinstance(self.sites, tuple)
            and len(self.sites) > 0
            and all(isinstance(s, str) and s in SITES for s in self.sites)
            and len(set(self.sites)) == len(self.sites),
            "sites",
            self.sites,
            f"one or more distinct of {SITES}",
        )
        if {"down", "gate"} <= set(self.sites):
            raise ConfigError(
                f"sites={self.sites!r} is invalid: 'gate' (gate-first) already decides which "
                "neurons enter down; give 'down' or 'gate', not both"
            )
        _require(
            _is_number(self.target_flops) and 0 < self.target_flops <= 1,
            "target_flops",
            self.target_flops,
            "a number in (0, 1]",
        )
        _require_choice("scoring", self.scoring, SCORINGS)
        _require_choice("allocation", self.allocation, ALLOCATIONS)
        least = min_flops(self.sites)
        if self.target_flops < least:
            raise ConfigError(
                f"target_flops={self.target_flops!r} is unreachable with sites={self.sites!r}: "
                f"skipping every input there still leaves {least:.4g} of the FFN FLOPs; give "
                f"target_flops >= {least:.4g} or more sites"
            )

    def to_dict(self) -> dict[str, Any]:
        """The fields as ``config.json`` holds them (``sites`` a list), so the config of a loaded
        model equals that of the model it was saved from."""
        return super().to_dict() | {"sites": list(self.sites)}

    @property
    def needs_calibration(self) -> bool:
        """Whether the conversion reads calibration inputs (thresholds, clustering, a router)."""
        return self.mode == "neurons" or self.partition == "clustered" or self.router == "learned"

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


def flops_fraction(sites: tuple[str, ...], kept_x, kept_n):
    """The fraction of a SwiGLU FFN's dense FLOPs a token needs when it keeps a fraction
    ``kept_x`` of the channels entering gate/up and ``kept_n`` of the neurons (floats, or tensors
    of them elementwise; a site not in ``sites`` keeps all):
    :func:`xmoe.flops.masked_swiglu_fraction`, gate-first when ``gate`` is a site."""
    a = kept_x if "gate_up" in sites else 1.0
    b = kept_n if {"down", "gate"} & set(sites) else 1.0
    return masked_swiglu_fraction(a, b, gate_first="gate" in sites)


def min_flops(sites: tuple[str, ...]) -> float:
    """The least FFN-FLOP fraction ``sites`` can reach: every input there skipped."""
    return flops_fraction(sites, 0.0, 0.0)
