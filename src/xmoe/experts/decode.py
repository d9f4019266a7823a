"""Inference for a handful of tokens: expert weights used in place, no dispatch plan.

At decode sizes a layer call is a few dozen tiny kernels, and their count, not their FLOPs, sets
the time. Where reading tensors on the host costs nothing (:mod:`xmoe.dispatch.sync`), the
selection is read once and each selected expert runs on views of its own weights: no sort by
expert, no per-pair weight copies (which at T=1 move as many bytes as the matmuls read), and
the routing weight and the combine folded into one ``addmm_`` per expert.

Shape legend: S tokens, K ranked experts per token, D d_model, H d_expert, E experts.
"""

from __future__ import annotations

import torch

from xmoe.dispatch.sync import host_reads_cheap
from xmoe.experts.activations import ACTIVATION_FNS
from xmoe.experts.ffn import FFNExperts

DECODE_MAX_TOKENS = 1
"""Calls with at most this many tokens take :func:`decode_ffn` (under ``backend="auto"``): its
op count grows with the distinct experts selected, the plan path's does not, and from two
tokens on the plan path measured as fast or faster (``python -m benchmarks.tuning``,
docs/benchmarks/tuning_cpu.md)."""


def use_decode_path(experts: FFNExperts, x_SD: torch.Tensor, capacity: int | None) -> bool:
    """Whether this call runs :func:`decode_ffn`: ``auto`` back-end, few tokens, dropless,
    no gradient wanted, and host reads that cost no sync."""
    return (
        experts.config.backend == "auto"
        and 0 < x_SD.shape[0] <= DECODE_MAX_TOKENS
        and capacity is None
        and not (torch.is_grad_enabled() and _needs_grad(x_SD, experts))
        and host_reads_cheap(x_SD.device)
    )


def _needs_grad(x_SD: torch.Tensor, experts: FFNExperts) -> bool:
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted expert outputs summed per token, one expert at a time.

    Args:
        x_SD: (S, D) tokens in the compute dtype.
        expert_idx_SK: (S, K) int64 ranked experts per token. weight_SK: (S, K) their combine
            weights. wanted_SK: (S, K) bool, the pairs to compute (all of them: dropless).
        experts: the layer's experts (weights cast to ``x_SD``'s dtype when they differ).
        renormalize: divide each token's wanted weights by their sum, as ``route_pairs`` does.

    Returns:
        ((S, D) output in ``x_SD``'s dtype, (E,) int64 pairs per expert).
    """
    config = experts.config
    dtype = x_SD.dtype
    w1, w2, b1, b2 = (
        None if p is None else p.to(dtype) for p in (experts.w1, experts.w2, experts.b1, experts.b2)
    )
    weight_SK = weight_SK.detach()
    if renormalize:
        total_S1 = (weight_SK * wanted_SK).sum(dim=1, keepdim=True)
        weight_SK = weight_SK / total_S1.clamp_min(torch.finfo(total_S1.dtype).tiny)
    weights = weight_SK.tolist()  # Python floats: exact for fp32 and float64 routers

    groups = _groups(expert_idx_SK, wanted_SK)
    out_SD = torch.zeros_like(x_SD)
    for expert, pairs in groups.items():
        if len(pairs) == 1:
            token, rank = pairs[0]
            x_1D, out_1D = x_SD[token : token + 1], out_SD[token : token + 1]
            a_1H = _hidden(x_1D, expert, w1, b1, config.activation)
            weight = weights[token][rank]
            out_1D.addmm_(a_1H, w2[expert], alpha=weight)
            if b2 is not None:
                out_1D.add_(b2[expert], alpha=weight)
            continue
        tokens = torch.tensor([t for t, _ in pairs], device=x_SD.device)
        weight_N1 = torch.tensor(
            [[weights[t][r]] for t, r in pairs], dtype=dtype, device=x_SD.device
        )
        a_NH = _hidden(x_SD.index_select(0, tokens), expert, w1, b1, config.activation)
        y_ND = torch.mm(a_NH.mul_(weight_N1), w2[expert])
        if b2 is not None:
            y_ND.addmm_(weight_N1, b2[expert : expert + 1])
        out_SD.index_add_(0, tokens, y_ND)
    counts = [0] * config.num_experts
    for expert, pairs in groups.items():
        counts[expert] = len(pairs)
    return out_SD, torch.tensor(counts, device=x_SD.device)


def _hidden(x_ND, expert: int, w1, b1, activation: str) -> torch.Tensor:
    """The expert's activation (N, H) for its rows: one matmul for the first layer, gated or
    not (the gate and up projections of gated experts sit side by side in ``w1``)."""
    weight_DF = w1[expert]
    h_NF = torch.mm(x_ND, weight_DF) if b1 is None else torch.addmm(b1[expert], x_ND, weight_DF)
    return ACTIVATION_FNS[activation].forward(h_NF)
