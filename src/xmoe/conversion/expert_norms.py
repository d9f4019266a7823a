"""The MoEfication target: how much each neuron-group expert contributes to each token.

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
) -> torch.Tensor:
    """‖down_e(silu(gate_e x) · up_e x)‖₂ of every expert e for every token.

    Runs every expert (dense cost), in chunks of tokens so the (S, E, D) outputs never exist
    at once.

    Args:
        x_SD: (S, D) MLP inputs.
        w_gate, w_up: (E, D, H). w_down: (E, H, D).

    Returns:
        (S, E) norms in the dtype of ``x_SD``.
    """
    num_experts, d_model, d_expert = w_gate.shape
    gate_DI = w_gate.permute(1, 0, 2).reshape(d_model, num_experts * d_expert)
    up_DI = w_up.permute(1, 0, 2).reshape(d_model, num_experts * d_expert)
    norms = []
    for x in x_SD.split(chunk_tokens):
        h_SEH = (F.silu(x @ gate_DI) * (x @ up_DI)).view(-1, num_experts, d_expert)
        y_SED = torch.einsum("seh,ehd->sed", h_SEH, w_down)
        norms.append(torch.linalg.vector_norm(y_SED, dim=-1))
    return torch.cat(norms) if norms else x_SD.new_zeros(0, num_experts)


def norm_shares(norms_SE: torch.Tensor) -> torch.Tensor:
    """(S, E) norms -> each expert's share of the token's total (rows sum to 1; an all-zero row
    stays zero instead of 0/0)."""
    total_S1 = norms_SE.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(norms_SE.dtype).tiny)
    return norms_SE / total_S1
