"""The dispatcher seam: how a layer's kept (token, expert) pairs reach their experts and back.

A :class:`~xmoe.MoELayer` routes on the token's process (``MoELayer.route``: the
:class:`~xmoe.routing.RoutedPairs` of its kept pairs, which carry their
:class:`~xmoe.dispatch.DispatchPlan` and routing weights) and hands tokens and routed pairs to its
dispatcher (``MoELayer.compute``), which returns the combined ``(S, D)`` output (torchtitan's
``TokenDispatcher`` seam)::

    route (router, capacity) -> dispatch -> expert compute -> combine

- :class:`LocalDispatcher` (every layer's default): the experts are here; the fused expert FFN
  gathers each token row once, computes, and scatter-adds the weighted rows (one autograd
  function, :func:`xmoe.experts.fused.expert_ffn`), unless its ``decode`` path takes the
  call (a handful of tokens at inference, :func:`xmoe.experts.decode.decode_path`).
- :class:`~xmoe.distributed.all_to_all.AllToAllDispatcher`: the experts are sharded over processes;
  rows travel to their expert's process and back (expert parallelism).

Dispatchers read the routed pairs by their attributes (``plan``, ``weight_N``, ``selection``,
``capacity``, ``renormalize``) and import nothing from :mod:`xmoe.routing`.

Shape legend: S tokens, N kept pairs, D d_model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class Dispatcher(ABC):
    """Runs ``experts`` over the kept pairs of ``pairs`` and returns their weighted sum per token.

    ``__call__(experts, x_SD, pairs)``: ``x_SD`` (S, D) tokens in the compute dtype, ``pairs``
    the :class:`~xmoe.routing.RoutedPairs` of these S tokens over all E experts (``pairs.plan``
    the kept pairs, ``pairs.weight_N`` (N,) their differentiable routing weights). Returns
    (S, D) in the dtype of ``x_SD``: ``out[s] = Σ_{pairs (s, e)} weight · FFN_e(x[s])``, zeros
    for a token with no pair.
    """

    name: str = "dispatcher"

    @abstractmethod
    def __call__(self, experts: nn.Module, x_SD: torch.Tensor, pairs) -> torch.Tensor: ...


DecodePath = Callable[[nn.Module, torch.Tensor, Any], torch.Tensor | None]
"""``(experts, x_SD, pairs) -> (S, D) output``, or None when the call is not one it takes."""


class LocalDispatcher(Dispatcher):
    """All experts are on this process: dispatch, compute and combine are one fused call.

    Args:
        decode: a path for small inference calls that uses the experts in place and reads the
            selection, not the plan; asked first, the plan path runs when it returns None. It
            comes from the experts' side (:func:`xmoe.experts.decode.decode_path`), which
            dispatch does not import.
    """

    name = "local"

    def __init__(self, decode: DecodePath | None = None) -> None:
        self.decode = decode

    def __call__(self, experts, x_SD, pairs):
        if self.decode is not None:
            y_SD = self.decode(experts, x_SD, pairs)
            if y_SD is not None:
                return y_SD
        plan = pairs.plan
        if plan.num_tokens == 0:
            return x_SD.new_zeros(0, x_SD.shape[1])
        return experts(x_SD, plan, pairs.weight_N)

    def __repr__(self) -> str:
        decode = "" if self.decode is None else f"decode={self.decode.__name__}"
        return f"LocalDispatcher({decode})"
