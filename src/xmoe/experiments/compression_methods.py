"""The rows of `xmoe compress-grid`: each compression method (a registered pass, or a pass with a
naive baseline's options) and how a target share of the expert bytes maps to its options.

A pass joins the table through a :data:`METHODS` entry; the grid
(:mod:`xmoe.experiments.compression_grid`) skips, with a note, a registered pass without one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Experts:
    """What a byte fraction maps to options from: one MoE layer's routed experts (every MoE
    layer of the reproduction's models is alike).

    Attributes:
        num_experts: E per layer. layers: MoE layers.
        weights: matrix weights of one expert (``w1`` and ``w2``).
        rank_cost: weights one rank of a factorised expert takes (both matrices' rows + cols).
        element_bits: bits of one weight as trained (32 for fp32).
        domain: the corpus domain a domain-calibrated pass (``reduce``) reduces for.
        kept: elements of one expert that quantize and residual hold as trained (its biases).
    """

    num_experts: int
    layers: int
    weights: int
    rank_cost: int
    element_bits: int
    domain: str
    kept: int = 0

    def budget(self, fraction: float) -> float:
        """Elements of one expert's matrices that fit ``fraction`` of its bytes beside the
        elements held as trained."""
        return fraction * (self.weights + self.kept) - self.kept


def _groups(experts: Experts, fraction: float) -> dict[str, Any]:
    """Merged experts per layer holding ``fraction`` of the experts (their bytes)."""
    return {"groups": max(1, math.floor(fraction * experts.num_experts))}


def _removed(experts: Experts, fraction: float) -> dict[str, Any]:
    """Experts to prune over all layers so that ``fraction`` of them is kept."""
    total = experts.num_experts * experts.layers
    return {"experts": total - max(experts.layers, math.floor(fraction * total))}


GREEDY_ROUNDS = 6
"""At most this many scoring rounds per greedy prune cell (``per_round`` experts go per round):
exact greedy costs one calibration forward per candidate per removal, about 17k forwards for the
xmoe-64 model's three cells, which is hours on a CPU."""


def _greedy_removed(experts: Experts, fraction: float) -> dict[str, Any]:
    """:func:`_removed`, in at most :data:`GREEDY_ROUNDS` scoring rounds."""
    options = _removed(experts, fraction)
    per_round = math.ceil(options["experts"] / GREEDY_ROUNDS)
    return options | ({"per_round": per_round} if per_round > 1 else {})


def _bits(experts: Experts, fraction: float, group_size: int = 64) -> dict[str, Any] | None:
    """The widest width whose codes plus one scale and zero per ``group_size`` weights fit the
    fraction (None when even 2 bits do not)."""
    from xmoe.compression.quantize import WIDTHS

    bits = experts.element_bits
    budget = experts.budget(fraction) * bits / experts.weights - 2 * bits / group_size
    fitting = [width for width in WIDTHS if width <= budget]
    return {"bits": max(fitting), "group_size": group_size} if fitting else None


def _rank(experts: Experts, fraction: float, barycentre: bool) -> dict[str, Any] | None:
    """The residual rank whose factors (plus, with ``barycentre``, one full expert per layer)
    fit the fraction (None when no rank >= 1 does)."""
    shared = experts.weights if barycentre else 0
    budget = experts.num_experts * experts.budget(fraction) - shared
    rank = math.floor(budget / (experts.num_experts * experts.rank_cost))
    return {"rank": rank} if rank >= 1 else None


def _with(options: Callable, **extra: Any) -> Callable[[Experts, float], dict | None]:
    """``options`` with ``extra`` options added (a naive baseline of the same pass)."""

    def build(experts: Experts, fraction: float) -> dict[str, Any] | None:
        base = options(experts, fraction)
        return None if base is None else base | extra

    return build


def _barycentre_rank(experts: Experts, fraction: float) -> dict[str, Any] | None:
    return _rank(experts, fraction, barycentre=True)


def _plain_rank(experts: Experts, fraction: float) -> dict[str, Any] | None:
    return _rank(experts, fraction, barycentre=False)


@dataclass(frozen=True)
class Method:
    """A row family of the table: pass ``pass_name`` with the options ``options`` gives for a
    byte fraction (None: out of the pass's reach), or for no fraction when ``sized`` is False
    (a pass that changes FLOPs, not bytes). ``baseline_of`` names the methods this row is the
    naive baseline of."""

    name: str
    pass_name: str
    options: Callable[[Experts, float], dict[str, Any] | None]
    baseline_of: tuple[str, ...] = ()
    sized: bool = True


METHODS: tuple[Method, ...] = (
    Method("merge", "merge", _groups),
    Method("uniform-averaging", "merge", _with(_groups, weighting="uniform", align=False),
           ("merge",)),
    Method("random-grouping", "merge", _with(_groups, grouping="random"), ("merge", "reduce")),
    Method("reduce", "reduce", lambda e, f: _groups(e, f) | {"domain": e.domain}),
    Method("residual", "residual", _barycentre_rank),
    Method("per-expert-svd", "residual", _with(_plain_rank, barycentre="zero"), ("residual",)),
    Method("quantize", "quantize", _bits),
    Method("uniform-bits", "quantize", _with(_bits, allocation="uniform"), ("quantize",)),
    Method("prune", "prune", _greedy_removed),
    Method("magnitude-pruning", "prune", _with(_removed, method="magnitude"), ("prune",)),
    Method("dynamic-prune", "dynamic-prune", lambda e, f: {"beta": 0.5}, sized=False),
)  # fmt: skip
"""Every method and naive baseline of the table. A pass at a fraction: merge and reduce keep
``floor(f·E)`` experts per layer, prune ``floor(f·E·layers)`` in all
(greedy in at most :data:`GREEDY_ROUNDS` rounds), quantize the widest width
whose codes and group scales fit ``f`` of the fp32 bytes (8 bits take 28%: quantize reaches
only 25%, at 4 bits), residual the rank whose factors (and barycentre) fit ``f``; the biases
these two hold as trained take their share first. Measured bytes, not these formulas, are what
the table reports."""
