"""The dispatcher seam: how a layer's kept (token, expert) pairs reach their experts and back.

A :class:`~xmoe.MoELayer` routes on the token's process, builds the
:class:`~xmoe.dispatch.DispatchPlan` of its kept pairs, and hands tokens, plan and routing
weights to its dispatcher, which returns the combined ``(S, D)`` output (torchtitan's
``TokenDispatcher`` seam)::

    route (router, capacity) -> dispatch -> expert compute -> combine

- :class:`LocalDispatcher` (every layer's default): the experts are here; the fused expert FFN
  gathers each token row once, computes, and scatter-adds the weighted rows (one autograd
  function, :func:`xmoe.experts.ffn_function.expert_ffn`).
- :class:`~xmoe.distributed.all_to_all.AllToAllDispatcher`: the experts are sharded over processes;
  rows travel to their expert's process and back (expert parallelism).

Shape legend: S tokens, N kept pairs, D d_model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from xmoe.dispatch.plan import DispatchPlan


class Dispatcher(ABC):
    """Runs ``experts`` over the kept pairs of ``plan`` and returns their weighted sum per token.

    ``__call__(experts, x_SD, plan, weight_N)``: ``x_SD`` (S, D) tokens in the compute dtype,
    ``plan`` the kept pairs of these S tokens over all E experts, ``weight_N`` (N,) their routing
    weights (differentiable). Returns (S, D) in the dtype of ``x_SD``:
    ``out[s] = Σ_{pairs (s, e)} weight · FFN_e(x[s])``, zeros for a token with no pair.
    """

    name: str = "dispatcher"

    @abstractmethod
    def __call__(
        self, experts: nn.Module, x_SD: torch.Tensor, plan: DispatchPlan, weight_N: torch.Tensor
    ) -> torch.Tensor: ...


class LocalDispatcher(Dispatcher):
    """All experts are on this process: dispatch, compute and combine are one fused call."""

    name = "local"

    def __call__(self, experts, x_SD, plan, weight_N):
        if plan.num_tokens == 0:
            return x_SD.new_zeros(0, x_SD.shape[1])
        return experts(x_SD, plan, weight_N)

    def __repr__(self) -> str:
        return "LocalDispatcher()"


LOCAL_DISPATCHER = LocalDispatcher()
"""The stateless default of every :class:`~xmoe.MoELayer` (shared, never mutated)."""
