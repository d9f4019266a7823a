"""SparseMLP: a dense SwiGLU MLP split into unweighted neuron-group experts with a router.

Shape legend: S tokens, D hidden size, E experts, H neurons per expert, K ranked experts per
token, N computed (token, expert) pairs.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from xmoe.conversion.config import SparsifyConfig
from xmoe.experts import ExpertWeights, expert_ffn
from xmoe.routing import route_pairs, switch_balance_loss
from xmoe.routing.dense_split import select_experts
from xmoe.routing.expert_norms import expert_output_norms, norm_shares

SEPARATE_UP_KEY = "mlp.w_up"
"""How a sparsified MLP's up projection was named before 0.1.0, when it was stored apart from
the gate (today both are ``w_gate_up``): weights of that layout are refused
(:func:`~xmoe.experts.ffn.separate_up_error`)."""


class SparseMLP(nn.Module):
    """Drop-in replacement of a transformers ``LlamaMLP``: (..., D) -> (..., D).

    Expert e computes ``down_e(silu(gate_e x) · up_e x)`` on its H neurons; the selected experts
    are summed **unweighted** (``combine="unweighted"``, the default), so each contributes
    exactly its slice of the dense FFN and selecting all E reproduces the dense MLP; or scaled
    by E times their router probability (``combine="weighted"``, see :meth:`combine_weights`).
    Only the selected pairs are computed, through
    xmoe's dispatch (:class:`~xmoe.dispatch.DispatchPlan`, :func:`~xmoe.experts.expert_ffn`).

    Scores: the router's softmax (``learned``) or the true expert output-norm shares
    (``oracle``, which computes every expert to rank them). Selection: top-k or threshold, from
    :attr:`settings` (changed with :meth:`configure`).

    After each forward: ``experts_per_token`` (S,) int64 selected experts per token and
    ``aux_loss`` (Switch balance loss of the router softmax; 0 for the oracle).

    Parameters: ``w_gate_up`` (E, D, 2H) (the gate and up projections side by side, one
    matmul; :attr:`w_gate` and :attr:`w_up` are its halves), ``w_down`` (E, H, D), ``router``
    (E, D).
    """

    def __init__(self, hidden_size: int, settings: SparsifyConfig, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.expert_size = settings.expert_size
        self.settings = settings
        shape = (num_experts, hidden_size, 2 * settings.expert_size)
        self.w_gate_up = nn.Parameter(torch.zeros(shape))
        self.w_down = nn.Parameter(torch.zeros(num_experts, settings.expert_size, hidden_size))
        self.router = nn.Linear(hidden_size, num_experts, bias=False)
        nn.init.zeros_(self.router.weight)
        self.experts_per_token: torch.Tensor | None = None
        self.aux_loss: torch.Tensor | None = None

    @property
    def w_gate(self) -> torch.Tensor:
        """(E, D, H) view: the gate projection, the SiLU branch."""
        return self.w_gate_up[..., : self.expert_size]

    @property
    def w_up(self) -> torch.Tensor:
        """(E, D, H) view: the up projection, the linear branch."""
        return self.w_gate_up[..., self.expert_size :]

    def configure(self, settings: SparsifyConfig) -> None:
        """Switch the selection rule or router kind (weights are unchanged)."""
        if settings.expert_size != self.expert_size:
            raise ValueError(
                f"expert_size={settings.expert_size} does not match this module's "
                f"{self.expert_size}"
            )
        self.settings = settings

    def scores(self, x_SD: torch.Tensor) -> torch.Tensor:
        """(S, E) expert scores summing to 1 per token (at least fp32)."""
        dtype = torch.promote_types(x_SD.dtype, torch.float32)
        if self.settings.router == "oracle":
            with torch.no_grad():
                norms_SE = expert_output_norms(x_SD, self.w_gate, self.w_up, self.w_down)
            return norm_shares(norms_SE.to(dtype))
        return torch.softmax(self.router(x_SD).to(dtype), dim=-1)

    def combine_weights(self, prob_SK: torch.Tensor) -> torch.Tensor:
        """(S, K) the factor each ranked pair's expert output is multiplied by (the selection's
        ``weight_SK``; elementwise in the scores ``prob_SK``).

        ``unweighted``: exactly 1 in value, so each selected expert adds its slice of the dense
        FFN. While autograd records (recovery fine-tuning of a learned router) it is
        ``p / stop_grad(p)``: still 1 in value, but the LM loss reaches the router through it
        (a straight-through estimate; top-k alone passes no gradient to the router).
        ``weighted``: ``E · p`` (XMoE route: a uniform router is the dense FFN at t=1).
        """
        if self.settings.combine == "weighted":
            return prob_SK * self.num_experts
        if self.settings.router == "learned" and torch.is_grad_enabled() and prob_SK.requires_grad:
            return prob_SK / prob_SK.detach().clamp_min(torch.finfo(prob_SK.dtype).tiny)
        return torch.ones_like(prob_SK, requires_grad=False).detach()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x_SD = hidden_states.reshape(-1, shape[-1]).to(self.w_gate.dtype)
        scores_SE = self.scores(x_SD)
        selection = select_experts(
            scores_SE, self.settings.top_k(self.num_experts), self.settings.threshold
        )
        selection = replace(selection, weight_SK=self.combine_weights(selection.probs_SK))
        pairs = route_pairs(selection, self.num_experts)
        self.experts_per_token = selection.wanted_SK.sum(dim=1)
        if self.settings.router == "oracle":
            self.aux_loss = scores_SE.new_zeros(())
        else:
            self.aux_loss = switch_balance_loss(scores_SE, selection.top1_expert_S)
        plan = pairs.plan
        weight_N = pairs.weight_N.to(x_SD.dtype)  # the selection's combine weights
        weights = ExpertWeights(self.w_gate_up, None, self.w_down, None, "swiglu")
        out_SD = expert_ffn(x_SD, weights, plan, weight_N)
        return out_SD.to(hidden_states.dtype).view(shape)
