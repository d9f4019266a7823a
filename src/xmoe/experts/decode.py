"""Inference for a handful of tokens: expert weights used in place, the dispatch plan unread.

At decode sizes a layer call is a few dozen tiny kernels, and their count, not their FLOPs, sets
the time. Where reading tensors on the host costs nothing (:mod:`xmoe.device`), the
selection is read once and each selected expert runs on views of its own weights: no sort by
expert, no per-pair weight copies (which at T=1 move as many bytes as the matmuls read), and
the routing weight and the combine folded into one ``addmm_`` per expert.

Shape legend: S tokens, K ranked experts per token, D d_model, H d_expert, E experts.
"""

from __future__ import annotations

import torch

from xmoe.device import host_reads_cheap
from xmoe.experts.activations import ACTIVATION_FNS
from xmoe.experts.ffn import FFNExperts
from xmoe.experts.fused import AUTO, FALLBACK
from xmoe.experts.kind import ExpertKind
from xmoe.experts.weights import ExpertWeights

DECODE_MAX_TOKENS = 1
"""Calls with at most this many tokens take :func:`decode_ffn` (under ``backend="auto"``): its
op count grows with the distinct experts selected, the plan path's does not, and from two
tokens on the plan path measured as fast or faster (``python -m benchmarks.tuning``,
docs/benchmarks/tuning_cpu.md)."""


def decode_path(experts: ExpertKind, x_SD: torch.Tensor, pairs) -> torch.Tensor | None:
    """The local dispatcher's decode path (:class:`~xmoe.dispatch.LocalDispatcher`): the
    (S, D) output of :func:`decode_ffn` over the routed pairs' selection when
    :func:`use_decode_path` holds, else None (the plan path runs).

    ``pairs``: the call's :class:`~xmoe.routing.RoutedPairs` (its plan is not read)."""
    if not use_decode_path(experts, x_SD, pairs.capacity):
        return None
    selection = pairs.selection
    return decode_ffn(
        x_SD,
        selection.expert_idx_SK,
        selection.weight_SK,
        selection.wanted_SK,
        experts,
        pairs.renormalize,
    )


def use_decode_path(experts: ExpertKind, x_SD: torch.Tensor, capacity: int | None) -> bool:
    """Whether this call runs :func:`decode_ffn`: FFN experts, ``auto`` back-end, the ``xmoe``
    or ``auto`` expert FFN (another named one runs every call; ``auto`` is ``xmoe`` where host
    reads are cheap), few tokens, dropless, no gradient wanted, and host reads that cost no
    sync."""
    return (
        isinstance(experts, FFNExperts)
        and experts.config.backend == "auto"
        and experts.config.expert_ffn in (AUTO, FALLBACK)
        and 0 < x_SD.shape[0] <= DECODE_MAX_TOKENS
        and capacity is None
        and not (torch.is_grad_enabled() and _needs_grad(x_SD, experts))
        and host_reads_cheap(x_SD.device)
    )


def _needs_grad(x_SD: torch.Tensor, experts: ExpertKind) -> bool:
    return x_SD.requires_grad or any(p.requires_grad for p in experts.parameters())


def _groups(expert_idx_SK, wanted_SK) -> dict[int, list[tuple[int, int]]]:
    """Expert -> its (token, rank) pairs, in the order experts are first selected."""
    experts_SK, wanted_SK = expert_idx_SK.tolist(), wanted_SK.tolist()
    groups: dict[int, list[tuple[int, int]]] = {}
    for token, (experts, wanted) in enumerate(zip(experts_SK, wanted_SK, strict=True)):
        for rank, (expert, keep) in enumerate(zip(experts, wanted, strict=True)):
            if keep:
                groups.setdefault(expert, []).append((token, rank))
    return groups


def decode_ffn(
    x_SD: torch.Tensor,
    expert_idx_SK: torch.Tensor,
    weight_SK: torch.Tensor,
    wanted_SK: torch.Tensor,
    experts: FFNExperts,
    renormalize: bool,
) -> torch.Tensor:
    """Weighted expert outputs summed per token, one expert at a time.

    Args:
        x_SD: (S, D) tokens in the compute dtype.
        expert_idx_SK: (S, K) int64 ranked experts per token. weight_SK: (S, K) their combine
            weights. wanted_SK: (S, K) bool, the pairs to compute (all of them: dropless).
        experts: the layer's experts (weights cast to ``x_SD``'s dtype when they differ).
        renormalize: divide each token's wanted weights by their sum, as ``route_pairs`` does.

    Returns:
        (S, D) output in ``x_SD``'s dtype.
    """
    dtype = x_SD.dtype
    ffn = experts.weights().to(dtype)
    weight_SK = weight_SK.detach()
    if renormalize:
        total_S1 = (weight_SK * wanted_SK).sum(dim=1, keepdim=True)
        weight_SK = weight_SK / total_S1.clamp_min(torch.finfo(total_S1.dtype).tiny)
    weights = weight_SK.tolist()  # Python floats: exact for fp32 and float64 routers

    groups = _groups(expert_idx_SK, wanted_SK)
    out_SD = torch.zeros_like(x_SD)
    singles = [(expert, *pairs[0]) for expert, pairs in groups.items() if len(pairs) == 1]
    if singles:
        _add_single_rows(x_SD, singles, weights, ffn, out_SD)
    for expert, pairs in groups.items():
        if len(pairs) == 1:
            continue
        tokens = torch.tensor([t for t, _ in pairs], device=x_SD.device)
        weight_N1 = torch.tensor(
            [[weights[t][r]] for t, r in pairs], dtype=dtype, device=x_SD.device
        )
        h_NF = _first_layer(x_SD.index_select(0, tokens), expert, ffn)
        a_NH = ACTIVATION_FNS[ffn.activation].forward(h_NF)
        y_ND = torch.mm(a_NH.mul_(weight_N1), ffn.w2[expert])
        if ffn.b2 is not None:
            y_ND.addmm_(weight_N1, ffn.b2[expert : expert + 1])
        out_SD.index_add_(0, tokens, y_ND)
    return out_SD


def _add_single_rows(x_SD, singles, weights, ffn: ExpertWeights, out_SD) -> None:
    """Experts selected by one token each (every expert, at one token): their first layers are
    written into one (P, F) buffer and activated by one call, since a call's fixed cost is
    most of its time at one row (exact GELU's especially, on CPU); then one ``addmm_`` per
    expert adds its weighted output into its token's row.

    ``singles``: (expert, token, rank) per expert; ``weights``: (S, K) nested Python floats."""
    one_token = x_SD.shape[0] == 1  # then rows need no slicing

    def row(t_SD: torch.Tensor, token: int) -> torch.Tensor:
        return t_SD if one_token else t_SD[token : token + 1]

    h_PF = x_SD.new_empty(len(singles), ffn.w1.shape[2])
    for index, (expert, token, _) in enumerate(singles):
        _first_layer(row(x_SD, token), expert, ffn, out=h_PF[index : index + 1])
    a_PH = ACTIVATION_FNS[ffn.activation].forward(h_PF)
    for index, (expert, token, rank) in enumerate(singles):
        row(out_SD, token).addmm_(
            a_PH[index : index + 1], ffn.w2[expert], alpha=weights[token][rank]
        )
    if ffn.b2 is not None:  # Σ weight·b2[expert] per token: a few ops, not two per expert
        device = x_SD.device
        experts_P = torch.tensor([expert for expert, _, _ in singles], device=device)
        tokens_P = torch.tensor([token for _, token, _ in singles], device=device)
        weight_P1 = torch.tensor(
            [[weights[token][rank]] for _, token, rank in singles], dtype=x_SD.dtype, device=device
        )
        out_SD.index_add_(0, tokens_P, ffn.b2.index_select(0, experts_P).mul_(weight_P1))


def _first_layer(x_ND, expert: int, ffn: ExpertWeights, out=None) -> torch.Tensor:
    """``x·w1[e] + b1[e]`` (N, F): one matmul, gated or not (the gate and up projections of
    gated experts sit side by side in ``w1``)."""
    if ffn.b1 is None:
        return torch.mm(x_ND, ffn.w1[expert], out=out)
    return torch.addmm(ffn.b1[expert], x_ND, ffn.w1[expert], out=out)
