"""The MoEfication target: how much each neuron-group expert contributes to each token (what
the ``dense_split`` router's oracle ranks by, and its learned router is fitted to).

Shape legend: S tokens, D hidden size, E experts, H neurons per expert.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def expert_output_norms(
    x_SD: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    chunk_tokens: int = 1024,
    gram: bool | None = None,
) -> torch.Tensor:
    """‖down_e(silu(gate_e x) · up_e x)‖₂ of every expert e for every token.

    Runs every expert's gate and up (dense cost), in chunks of tokens. The norm of expert e's
    output ``W_eᵀ h`` (``W_e = w_down[e]``, H x D) is ``√(hᵀ G_e h)`` with the Gram matrix
    ``G_e = W_e W_eᵀ`` (H x H, once per call): H² multiply-adds per expert and token instead of
    the output's H·D, and no (S, E, D) tensor (at H=4 on SmolLM2's shape that tensor was most of
    the time). Below D neurons per expert this is the cheaper form and the default; ``gram``
    forces one form (the benchmark's side-by-side).

    Args:
        x_SD: (S, D) MLP inputs.
        w_gate, w_up: (E, D, H). w_down: (E, H, D).
        chunk_tokens: tokens per chunk (≥ 1).
        gram: the Gram form (True), the expert outputs (False), or the cheaper of the two (None).

    Returns:
        (S, E) norms in the dtype of ``x_SD``.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be >= 1")
    num_experts, d_model, d_expert = w_gate.shape
    # (I, D) with each expert's rows together, so a chunk's activations come out (E, H, S): the
    # Gram form then sums H contiguous rows of S tokens, not S·E runs of H numbers.
    gate_ID = w_gate.transpose(1, 2).reshape(-1, d_model)
    up_ID = w_up.transpose(1, 2).reshape(-1, d_model)
    use_gram = d_expert < d_model if gram is None else gram
    gram_EHH = down_grams(w_down) if use_gram else None
    norms = []
    for x in x_SD.split(chunk_tokens):
        x_DS = x.T
        h_EHS = (F.silu(gate_ID @ x_DS) * (up_ID @ x_DS)).view(num_experts, d_expert, -1)
        if gram_EHH is None:
            y_SED = torch.einsum("ehs,ehd->sed", h_EHS, w_down)
            norms.append(torch.linalg.vector_norm(y_SED, dim=-1))
        else:
            norms.append(gram_norms(h_EHS, gram_EHH).to(x_SD.dtype))
    return torch.cat(norms) if norms else x_SD.new_zeros(0, num_experts)


def down_grams(w_down: torch.Tensor) -> torch.Tensor:
    """(E, H, H) float64 Gram matrices ``W_e W_eᵀ`` of the down projections w_down (E, H, D).

    Float64 because the quadratic form squares the condition: a norm much smaller than
    ‖h‖·‖W_e‖ (its terms cancelling) would lose every digit in float32.
    """
    w_EHD = w_down.to(torch.float64)
    return w_EHD @ w_EHD.transpose(1, 2)


def gram_norms(h_EHS: torch.Tensor, gram_EHH: torch.Tensor) -> torch.Tensor:
    """(S, E) float64 ``√(h_eᵀ G_e h_e)`` of every token's expert activations h_EHS (E, H, S).

    Rounding can leave a cancelled-out norm slightly below zero; it is clamped to 0 before the
    square root (no NaN).
    """
    h_EHS = h_EHS.to(torch.float64)
    squares_ES = (torch.bmm(gram_EHH, h_EHS) * h_EHS).sum(dim=1)  # G_e is symmetric
    return squares_ES.clamp_min(0).sqrt().T


def norm_shares(norms_SE: torch.Tensor) -> torch.Tensor:
    """(S, E) norms -> each expert's share of the token's total (rows sum to 1; an all-zero row
    stays zero instead of 0/0)."""
    total_S1 = norms_SE.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(norms_SE.dtype).tiny)
    return norms_SE / total_S1
