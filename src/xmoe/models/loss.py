"""The output projection and next-token cross-entropy in one pass over chunks of tokens.

At the LM reproduction's size (4096 tokens, V=8192, d_model=128) the (N, V) logits were half
of a CPU training step: the projection, a log-softmax, its backward and the zeroed gradient of
the loss each read or wrote 128 MiB, and every fresh buffer that size is page-faulted in again
each step. Here each chunk of rows is projected, turned into its loss and its logit gradient
``(softmax - onehot) / n`` while cache-resident, and multiplied straight into the input and
weight gradients, so no (N, V) buffer exists. The gradients are computed in the forward (the
loss is linear in its upstream gradient) and scaled by it in the backward.

The numbers are those of ``F.cross_entropy(F.linear(h, W), targets, ignore_index=-100)``
(mean over the kept targets) up to the order of the sums over tokens.

Shape legend: N tokens, D d_model, V vocab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

IGNORE_INDEX = -100
"""Targets with this id add nothing to the loss (``F.cross_entropy``'s default)."""

CHUNK_ELEMENTS = 1 << 20
"""Rows x V per chunk (4 MiB in fp32): a chunk's logits stay in cache from the projection to
its two gradient products. At V=8192 (128 rows) its three products ran at ~80 GFLOP/s on one
CPU thread, 256- and 512-row chunks at 50-60."""

FUSED_DTYPES = (torch.float32, torch.float64)
"""The dtypes the fused path runs in; others (and autocast) take the plain path, whose
rounding of the logits to the compute dtype this path would not reproduce."""


def _chunk_rows(vocab_size: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab_size)


def _chunk_loss_and_grad(
    h_nD: torch.Tensor,
    weight_VD: torch.Tensor,
    targets_n: torch.Tensor,
    inv_count: torch.Tensor,
    buffers: tuple[torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk's summed loss and its (n, V) logit gradient ``(softmax - onehot) / count``
    (zero rows for ignored targets), computed as ``log_softmax``'s backward computes it, in
    ``buffers`` (two (rows, V) scratch tensors, reused by every chunk: fresh ones would be
    page-faulted in chunk after chunk)."""
    logits_nV, logp_nV = (buffer[: h_nD.shape[0]] for buffer in buffers)
    torch.mm(h_nD, weight_VD.t(), out=logits_nV)
    torch.log_softmax(logits_nV, dim=-1, out=logp_nV)
    kept_n = targets_n != IGNORE_INDEX
    safe_n1 = torch.where(kept_n, targets_n, 0).unsqueeze(1)
    loss = -logp_nV.gather(1, safe_n1).squeeze(1).masked_fill(~kept_n, 0.0).sum()
    scale_n1 = torch.where(kept_n, inv_count, 0.0).unsqueeze(1).to(logp_nV.dtype)
    grad_nV = logp_nV.exp_().mul_(scale_n1)
    grad_nV.scatter_add_(1, safe_n1, -scale_n1)
    return loss, grad_nV


def _loss_and_grads(
    h_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor, need_h: bool, need_w: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The mean loss and, where asked for, its gradients for ``h`` and ``W``, chunk by chunk."""
    count = (targets_N != IGNORE_INDEX).sum()
    inv_count = 1.0 / count.to(h_ND.dtype)  # as nll_loss's backward scales
    loss = h_ND.new_zeros(())
    dh_ND = torch.empty_like(h_ND) if need_h else None
    dw_VD = torch.zeros_like(weight_VD) if need_w else None
    num_tokens, vocab_size = h_ND.shape[0], weight_VD.shape[0]
    rows = min(num_tokens, _chunk_rows(vocab_size))
    buffers = (h_ND.new_empty(rows, vocab_size), h_ND.new_empty(rows, vocab_size))
    for start in range(0, num_tokens, rows):
        h_nD = h_ND[start : start + rows]
        chunk_loss, grad_nV = _chunk_loss_and_grad(
            h_nD, weight_VD, targets_N[start : start + rows], inv_count, buffers
        )
        loss += chunk_loss
        if need_h:
            torch.mm(grad_nV, weight_VD, out=dh_ND[start : start + rows])
        if need_w:
            dw_VD.addmm_(grad_nV.t(), h_nD)
    return loss / count, dh_ND, dw_VD


class LinearCrossEntropy(torch.autograd.Function):
    """``cross_entropy(h·Wᵀ, targets)`` chunk by chunk; its gradients are computed in the
    forward (see the module docstring)."""

    @staticmethod
    def forward(ctx, h_ND, weight_VD, targets_N):
        loss, dh_ND, dw_VD = _loss_and_grads(h_ND, weight_VD, targets_N, *ctx.needs_input_grad[:2])
        ctx.save_for_backward(dh_ND, dw_VD)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        dh_ND, dw_VD = ctx.saved_tensors
        dh_ND = None if dh_ND is None else dh_ND * grad_loss
        dw_VD = None if dw_VD is None else dw_VD * grad_loss
        return dh_ND, dw_VD, None


def fused_supported(h: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`linear_cross_entropy` runs these operands (else the caller projects and
    takes ``F.cross_entropy`` of the logits)."""
    return (
        h.dtype in FUSED_DTYPES
        and weight.dtype == h.dtype
        and not torch.is_autocast_enabled(h.device.type)
    )


def linear_cross_entropy(
    h_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor
) -> torch.Tensor:
    """Mean next-token cross-entropy of the logits ``h·Wᵀ`` over targets != -100, without
    materialising the (N, V) logits (operands as :func:`fused_supported` allows).

    Args:
        h_ND: (N, D) final hidden states. weight_VD: (V, D) output projection.
        targets_N: (N,) int64 target ids in [0, V), or -100 where ignored.
    """
    h_ND = h_ND.contiguous()
    if torch.is_grad_enabled() and (h_ND.requires_grad or weight_VD.requires_grad):
        return LinearCrossEntropy.apply(h_ND, weight_VD, targets_N)
    return _loss_and_grads(h_ND, weight_VD, targets_N, need_h=False, need_w=False)[0]


def symmetric_kl_per_position(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """``½ [KL(p_a ‖ p_b) + KL(p_b ‖ p_a)]`` at each position of (..., V) log-probabilities."""
    return 0.5 * ((log_a.exp() - log_b.exp()) * (log_a - log_b)).sum(-1)


def paired_cross_entropy_and_kl(
    h_a_ND: torch.Tensor, h_b_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two passes' mean cross-entropies over targets != -100 and their mean
    :func:`symmetric_kl_per_position` over those positions, of the fp32 log-softmaxes of the
    logits ``h·Wᵀ`` (THOR's consistency objective), chunk of rows by chunk of rows under
    autograd: each chunk's log-softmax serves its cross-entropy and the KL, and no (N, V)
    tensor is allocated whole (its fresh pages and cache misses were a third of a THOR step on
    CPU). The same numbers as on the whole logits up to the order of the sums over tokens.

    Args:
        h_a_ND, h_b_ND: (N, D) final hidden states of the two passes. weight_VD: (V, D).
        targets_N: (N,) int64 target ids, -100 where ignored.
    """
    kept_N = targets_N != IGNORE_INDEX
    rows = _chunk_rows(weight_VD.shape[0])
    ce_a = ce_b = kl = weight_VD.new_zeros((), dtype=torch.float32)
    for start in range(0, targets_N.shape[0], rows):
        chunk = slice(start, start + rows)
        log_a, log_b = (
            F.linear(h_ND[chunk], weight_VD).float().log_softmax(-1) for h_ND in (h_a_ND, h_b_ND)
        )
        targets_n = targets_N[chunk]
        ce_a = ce_a + F.nll_loss(log_a, targets_n, ignore_index=IGNORE_INDEX, reduction="sum")
        ce_b = ce_b + F.nll_loss(log_b, targets_n, ignore_index=IGNORE_INDEX, reduction="sum")
        kl = kl + symmetric_kl_per_position(log_a, log_b)[kept_N[chunk]].sum()
    count = kept_N.sum()
    return ce_a / count, ce_b / count, kl / count.clamp_min(1)
