"""SparseMLP: a dense SwiGLU MLP split into neuron-group experts, as an :class:`xmoe.MoELayer`.

Shape legend: S tokens, D hidden size, E experts, H neurons per expert.
"""

from __future__ import annotations

from typing import Any

import torch

from xmoe.config import MoEConfig
from xmoe.conversion.config import SparsifyConfig
from xmoe.layer import MoELayer, Routed

SEPARATE_UP_KEY = "mlp.w_up"
"""How a sparsified MLP's up projection was named before 0.1.0, when it was stored apart from
the gate (today both are ``w_gate_up``): weights of that layout are refused
(:func:`~xmoe.experts.ffn.separate_up_error`)."""

LEGACY_KEYS = {"w_gate_up": "experts.w1", "w_down": "experts.w2"}
"""A SparseMLP's state-dict names of its expert weights from 0.1.0 until it became an MoELayer,
and their names now (the same tensors; ``router.weight`` kept its name): loaded under the new
names (:meth:`SparseMLP.upgrade_legacy_keys`, :func:`upgraded_name`)."""


def upgraded_name(name: str) -> str:
    """``name`` (a parameter's, dotted) with a :data:`LEGACY_KEYS` name at its end replaced by
    today's; any other name unchanged."""
    for old, new in LEGACY_KEYS.items():
        if name == old or name.endswith(f".{old}"):
            return name[: len(name) - len(old)] + new
    return name


def moe_config(hidden_size: int, settings: SparsifyConfig, num_experts: int) -> MoEConfig:
    """The MoELayer recipe of a SparseMLP: E bias-free SwiGLU FFN experts of ``expert_size``
    neurons, routed by the ``dense_split`` router with the rule ``settings`` names. The balance
    loss is unscaled (``aux_loss_coef`` 1): :attr:`SparseMLP.aux_loss` is the plain Switch
    loss."""
    top_k = settings.top_k(num_experts)
    rule = {"top_k": top_k} if top_k is not None else {"threshold": settings.threshold}
    return MoEConfig(
        d_model=hidden_size,
        num_experts=num_experts,
        d_expert=settings.expert_size,
        router="dense_split",
        router_options=rule_options(settings),
        activation="swiglu",
        bias=False,
        aux_loss_coef=1.0,
        **rule,
    )


def rule_options(settings: SparsifyConfig) -> dict[str, str]:
    """The ``dense_split`` router's scoring, selection and combine under ``settings``."""
    selection = "topk" if settings.active_fraction is not None else "threshold"
    return {"scoring": settings.router, "selection": selection, "combine": settings.combine}


class SparseMLP(MoELayer):
    """Drop-in replacement of a transformers ``LlamaMLP``: (..., D) -> (..., D), an
    :class:`~xmoe.MoELayer` (``route`` then ``compute``) of the ``dense_split`` router
    (:mod:`xmoe.routing.dense_split`) and FFN experts with the SwiGLU activation.

    Expert e computes ``down_e(silu(gate_e x) · up_e x)`` on its H neurons; the selected experts
    are summed **unweighted** (``combine="unweighted"``, the default), so each contributes
    exactly its slice of the dense FFN and selecting all E reproduces the dense MLP; or scaled
    by E times their router probability (``combine="weighted"``). Scores: the router's softmax
    (``learned``) or the true expert output-norm shares (``oracle``). Selection: top-k or
    threshold. All three come from :attr:`settings` (changed with :meth:`configure`).

    After each forward: ``experts_per_token`` (S,) int64 selected experts per token and
    ``aux_loss`` (Switch balance loss of the router softmax, in eval mode too; 0 for the
    oracle).

    Parameters: ``experts.w1`` (E, D, 2H) (the gate and up projections side by side, one
    matmul; :attr:`w_gate_up`, with :attr:`w_gate` and :attr:`w_up` its halves),
    ``experts.w2`` (E, H, D) (:attr:`w_down`), ``router.weight`` (E, D). State dicts of the
    earlier layout (``w_gate_up``, ``w_down``) load too (:data:`LEGACY_KEYS`).
    """

    def __init__(self, hidden_size: int, settings: SparsifyConfig, num_experts: int) -> None:
        super().__init__(moe_config(hidden_size, settings, num_experts))
        self.num_experts = num_experts
        self.expert_size = settings.expert_size
        self.settings = settings
        with torch.no_grad():  # filled by sparsify() or a load
            for parameter in self.parameters():
                parameter.zero_()
        self.register_load_state_dict_pre_hook(self.upgrade_legacy_keys)
        self.experts_per_token: torch.Tensor | None = None
        self.aux_loss: torch.Tensor | None = None

    @staticmethod
    def upgrade_legacy_keys(
        module: SparseMLP, state_dict: dict[str, Any], prefix: str, *args: Any
    ) -> None:
        """``load_state_dict`` pre-hook: rename the :data:`LEGACY_KEYS` of ``state_dict``
        under ``prefix`` to today's names (in place; a name already there is left alone)."""
        for old, new in LEGACY_KEYS.items():
            if prefix + old in state_dict and prefix + new not in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)

    @property
    def w_gate_up(self) -> torch.Tensor:
        """(E, D, 2H) the experts' gate and up projections side by side (``experts.w1``)."""
        return self.experts.w1

    @property
    def w_down(self) -> torch.Tensor:
        """(E, H, D) the experts' down projections (``experts.w2``)."""
        return self.experts.w2

    @property
    def w_gate(self) -> torch.Tensor:
        """(E, D, H) view: the gate projection, the SiLU branch."""
        return self.w_gate_up[..., : self.expert_size]

    @property
    def w_up(self) -> torch.Tensor:
        """(E, D, H) view: the up projection, the linear branch."""
        return self.w_gate_up[..., self.expert_size :]

    def configure(self, settings: SparsifyConfig) -> None:
        """Switch the selection rule, router kind or combine (weights are unchanged)."""
        if settings.expert_size != self.expert_size:
            raise ValueError(
                f"expert_size={settings.expert_size} does not match this module's "
                f"{self.expert_size}"
            )
        top_k = settings.top_k(self.num_experts)
        if top_k is None:
            self.router.set_threshold(settings.threshold)
        else:
            self.router.set_top_k(top_k)
        self.router.set_rule(**rule_options(settings))
        self.settings = settings

    def scores(self, x_SD: torch.Tensor) -> torch.Tensor:
        """(S, E) expert scores summing to 1 per token (at least fp32)."""
        return self.router.scores(x_SD, self.experts)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x_SD = hidden_states.reshape(-1, self.config.d_model)
        routed = self.route(x_SD)
        self.experts_per_token = routed.stats.wanted_per_token
        self.aux_loss = self._balance_loss(routed)
        return self.compute(x_SD, routed).view(hidden_states.shape)

    def _balance_loss(self, routed: Routed) -> torch.Tensor:
        """The router's losses of this call, in eval mode too (the layer computes them in
        training mode only); 0 for none (the oracle, or no tokens)."""
        probs_SE = routed.probs_SE
        losses = routed.losses
        if not self.training and probs_SE.shape[0] > 0:
            losses = self.router.losses(probs_SE, routed.pairs.selection)
        return sum(losses.values(), probs_SE.new_zeros(()))
