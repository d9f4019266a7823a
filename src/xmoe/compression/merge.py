"""``merge``: MC-SMoE's expert merging (Li et al. 2024, "Merge, then Compress").

Per MoE layer: the ``groups`` most used experts on the calibration tokens are dominant; every
other expert joins the dominant one whose router-logit column is most similar (cosine over the
calibration tokens); each member's hidden neurons are aligned to the dominant expert's by
Hungarian matching; each group becomes one expert, the usage-weighted average of its aligned
members. The router keeps its E rows; each row's expert maps to its group's merged expert.

Shape legend: S tokens, N kept pairs, E routed experts, G merged experts, D d_model,
H d_expert, F the first layer's width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from xmoe.compression.base import (
    CompressionError,
    CompressionPass,
    LayerRouting,
    PassOptions,
    collect_routing,
    moe_layers,
)
from xmoe.config import MoEConfig
from xmoe.dispatch import DispatchPlan
from xmoe.experts import ExpertKind, FFNExperts
from xmoe.layer import MoELayer
from xmoe.registry import PASSES


class MergedExperts(ExpertKind):
    """E routed experts computed by G merged ones: the pairs of expert e run on
    ``inner`` expert ``group_E[e]`` (any expert kind of G experts, e.g. quantised later).

    Buffers: ``group_E`` (E,) int64. Submodule: ``inner``.
    """

    def __init__(self, config: MoEConfig, inner: ExpertKind) -> None:
        super().__init__(config)
        self.inner = inner
        self.register_buffer("group_E", torch.zeros(config.num_experts, dtype=torch.int64))

    def forward(
        self, x_SD: torch.Tensor, plan: DispatchPlan, weight_N: torch.Tensor
    ) -> torch.Tensor:
        group_N = self.group_E[plan.expert_idx_N]
        order_N = torch.argsort(group_N, stable=True)  # the inner plan is sorted by group
        counts_G = torch.bincount(group_N, minlength=self.inner.num_experts)
        grouped = DispatchPlan(
            plan.token_idx_N[order_N], group_N[order_N], counts_G, plan.num_tokens
        )
        return self.inner(x_SD, grouped, weight_N[order_N])

    def reset_parameters(self) -> None:
        self.inner.reset_parameters()

    def flops_per_pair_E(self) -> torch.Tensor:
        # the statistics take the cost per routed expert: its group's. The kinds keep their FLOP
        # vectors on the host; equal costs (FFN experts) need no read of the device's group_E
        flops_G = self.inner.flops_per_pair_E()
        if bool((flops_G == flops_G[0]).all()):
            return flops_G[:1].expand(self.num_experts)
        return flops_G[self.group_E.cpu()]

    @property
    def dtype(self) -> torch.dtype:
        return self.inner.dtype

    def sharded_parameters(self) -> list[str]:
        raise NotImplementedError("merged experts are not sharded over processes")

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, groups={self.inner.num_experts}"


@dataclass(frozen=True)
class MergeOptions(PassOptions):
    """Attributes:
    groups: merged experts per MoE layer, in [1, num_experts].
    grouping: ``"router"`` (MC-SMoE: dominant experts, router-logit similarity) or
        ``"random"`` (the naive baseline: balanced random groups drawn from ``seed``).
    weighting: ``"usage"`` (MC-SMoE) or ``"uniform"`` (the plain average).
    align: align each member's hidden neurons to the group's dominant expert first.
    seed: of the random grouping (plus the layer's index).
    """

    pass_name: ClassVar[str] = "merge"
    """The pass the errors name (a pass that merges too, ``reduce``, sets its own)."""

    groups: int
    grouping: str = "router"
    weighting: str = "usage"
    align: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.groups, bool) or not isinstance(self.groups, int) or self.groups < 1:
            raise CompressionError(
                f"{self.pass_name}: groups={self.groups!r} is invalid: it must be an integer >= 1"
            )
        for name, allowed in (
            ("grouping", ("router", "random")),
            ("weighting", ("usage", "uniform")),
        ):
            if getattr(self, name) not in allowed:
                raise CompressionError(
                    f"{self.pass_name}: {name}={getattr(self, name)!r} is invalid: it must be "
                    f"one of {allowed}"
                )
        if not isinstance(self.align, bool):
            raise CompressionError(
                f"{self.pass_name}: align={self.align!r} is invalid: it must be a bool"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise CompressionError(
                f"{self.pass_name}: seed={self.seed!r} is invalid: it must be an integer"
            )


@PASSES.register("merge")
class Merge(CompressionPass):
    """MC-SMoE's merge (module docstring); options :class:`MergeOptions`."""

    Options = MergeOptions

    @classmethod
    @torch.no_grad()
    def apply(cls, model: nn.Module, options: MergeOptions, calibration: torch.Tensor):
        layers = moe_layers(model)
        targets = [
            ffn_experts_of(options.pass_name, i, layer.experts) for i, layer in enumerate(layers)
        ]
        for index, (experts, _) in enumerate(targets):
            _check_groups(options.pass_name, index, experts.num_experts, options.groups)
        routing = collect_routing(model, calibration)
        for index, (layer, (experts, routed_E), stats) in enumerate(
            zip(layers, targets, routing, strict=True)
        ):
            held = held_routing(stats, routed_E, experts.num_experts)
            if options.grouping == "router":
                group_E = group_experts(held, options.groups)
            else:
                group_E = random_groups(experts.num_experts, options.groups, options.seed + index)
            layer.experts = merged_experts(experts, held, group_E, options, routed_E)
        return model


def ffn_experts_of(
    pass_name: str, index: int, experts: ExpertKind
) -> tuple[FFNExperts, torch.Tensor]:
    """The FFN experts MoE layer ``index`` holds (a merged or pruned layer's inner ones), which
    every pass that rewrites experts compresses, and the (E,) map from its routed experts to
    them; experts already quantized or residual-compressed are refused."""
    if isinstance(experts, MergedExperts):
        inner, routed_E = experts.inner, experts.group_E.cpu()
    else:
        inner, routed_E = experts, torch.arange(experts.num_experts)
    if type(inner) is not FFNExperts:
        raise CompressionError(
            f"{pass_name}: MoE layer {index} holds {type(inner).__name__}, not FFN experts "
            "(already quantized or residual-compressed?): quantize and residual go last"
        )
    return inner, routed_E


def replace_inner(layer: MoELayer, experts: ExpertKind) -> None:
    """Put ``experts`` in place of the FFN experts :func:`ffn_experts_of` gave for ``layer``."""
    if isinstance(layer.experts, MergedExperts):
        layer.experts.inner = experts
    else:
        layer.experts = experts


def held_routing(stats: LayerRouting, routed_E: torch.Tensor, held: int) -> LayerRouting:
    """``stats`` of the E routed experts as the ``held`` experts they map to (``routed_E``):
    counts and mass summed, and each held expert's logit column the mass-weighted mean of its
    routed experts' (a pruned expert, never selected, weighs nothing; plain mean if none was)."""
    if torch.equal(routed_E, torch.arange(held)):
        return stats
    counts = torch.zeros(held, dtype=stats.counts_E.dtype).index_add_(0, routed_E, stats.counts_E)
    mass = torch.zeros(held, dtype=stats.mass_E.dtype).index_add_(0, routed_E, stats.mass_E)
    member_EH = torch.nn.functional.one_hot(routed_E, held).double()
    share_EH = member_EH * stats.mass_E[:, None]
    unused = share_EH.sum(dim=0) == 0
    share_EH[:, unused] = member_EH[:, unused]
    share_EH = share_EH / share_EH.sum(dim=0)
    return LayerRouting(stats.logits_SE.double() @ share_EH, counts, mass)


def _check_groups(pass_name: str, index: int, held: int, groups: int) -> None:
    if groups > held:
        raise CompressionError(
            f"{pass_name}: groups={groups} is more than MoE layer {index}'s num_experts={held}"
        )


def group_experts(stats: LayerRouting, groups: int) -> torch.Tensor:
    """(E,) each expert's group in [0, groups): the ``groups`` most used experts are dominant
    (ties to the lower id; group ids in expert order), every other expert joins the dominant
    expert whose router-logit column is most similar (cosine)."""
    ranking = sorted(range(len(stats.counts_E)), key=lambda e: (-float(stats.counts_E[e]), e))
    dominant = sorted(ranking[:groups])
    columns_SE = stats.logits_SE.double()
    columns_SE = columns_SE / columns_SE.norm(dim=0).clamp_min(1e-12)
    similarity_EG = columns_SE.T @ columns_SE[:, dominant]
    group_E = similarity_EG.argmax(dim=1)
    group_E[dominant] = torch.arange(groups)
    return group_E


def random_groups(num_experts: int, groups: int, seed: int) -> torch.Tensor:
    """(E,) balanced random groups (sizes differ by at most one), drawn from ``seed``."""
    order = torch.randperm(num_experts, generator=torch.Generator().manual_seed(seed))
    group_E = torch.empty(num_experts, dtype=torch.int64)
    group_E[order] = torch.arange(num_experts) % groups
    return group_E


def neuron_features(w1_DF: torch.Tensor, b1_F, w2_HD: torch.Tensor) -> torch.Tensor:
    """(H, *) every hidden neuron's weights side by side: its first-layer column(s) (gate and
    up for gated experts), bias entries, and second-layer row: what alignment matches."""
    hidden = w2_HD.shape[0]
    parts = [w1_DF.T.reshape(-1, hidden, w1_DF.shape[0]).transpose(0, 1).flatten(1), w2_HD]
    if b1_F is not None:
        parts.append(b1_F.reshape(-1, hidden).T)
    return torch.cat(parts, dim=1)


def permute_neurons(
    w1_DF: torch.Tensor, b1_F, w2_HD: torch.Tensor, perm_H: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """One expert with its hidden neurons reordered (neuron h takes old neuron ``perm_H[h]``):
    the same function, since the hidden layer is a sum over its neurons."""
    hidden = w2_HD.shape[0]
    halves = w1_DF.shape[1] // hidden  # 2 for gated experts: gate and up move together
    perm_F = torch.cat([perm_H + half * hidden for half in range(halves)])
    b1 = None if b1_F is None else b1_F[perm_F]
    return w1_DF[:, perm_F], b1, w2_HD[perm_H]


def alignment(reference_HX: torch.Tensor, other_HX: torch.Tensor) -> torch.Tensor:
    """(H,) the permutation of ``other``'s neurons that best matches ``reference``'s (Hungarian
    matching on the inner products of their :func:`neuron_features`)."""
    score_HH = (reference_HX.detach().double() @ other_HX.detach().double().T).numpy()
    _, columns = linear_sum_assignment(score_HH, maximize=True)
    return torch.as_tensor(columns, dtype=torch.int64)


@torch.no_grad()
def merged_experts(
    experts: FFNExperts,
    stats: LayerRouting,
    group_E: torch.Tensor,
    options: MergeOptions,
    routed_E: torch.Tensor | None = None,
) -> MergedExperts:
    """The merged experts of ``experts`` in the groups ``group_E`` (E,): each group's members
    aligned to its most used member (with ``options.align``) and averaged, weighted by usage
    (uniformly where no member was used, or with ``weighting="uniform"``). ``routed_E`` maps the
    layer's routed experts to ``experts`` when they differ (a pruned layer's kept experts)."""
    groups = options.groups
    w1, b1, w2, b2 = (None if t is None else t.detach() for t in experts.weights().tensors())
    inner = FFNExperts(experts.config, groups).to(w1.device, w1.dtype)
    merged = [inner.w1, inner.b1, inner.w2, inner.b2]
    for group in range(groups):
        members = (group_E == group).nonzero().squeeze(1).tolist()
        reference = group_dominant(stats, members)
        features = neuron_features(w1[reference], _row(b1, reference), w2[reference])
        aligned = []
        for e in members:
            perm_H = (
                alignment(features, neuron_features(w1[e], _row(b1, e), w2[e]))
                if options.align
                else torch.arange(w2.shape[1])
            )
            first, bias, second = permute_neurons(w1[e], _row(b1, e), w2[e], perm_H)
            aligned.append((first, bias, second, _row(b2, e)))
        share = stats.counts_E[members].to(w1.dtype)
        if options.weighting == "uniform" or share.sum() == 0:
            share = torch.ones_like(share)
        share = share / share.sum()
        for slot, target in enumerate(merged):
            if target is not None:
                target[group] = sum(
                    s * parts[slot] for s, parts in zip(share, aligned, strict=True)
                )
    module = MergedExperts(experts.config, inner).to(w1.device)
    module.group_E.copy_(group_E if routed_E is None else group_E[routed_E])
    return module


def group_dominant(stats: LayerRouting, members: list[int]) -> int:
    """The most used member (ties to the lower id): the expert the others are aligned to."""
    return min(members, key=lambda e: (-float(stats.counts_E[e]), e))


def _row(tensor: torch.Tensor | None, index: int) -> torch.Tensor | None:
    return None if tensor is None else tensor[index]
