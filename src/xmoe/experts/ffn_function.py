"""The expert FFN over a dispatch plan as one autograd function.

Forward: gather token rows once, ``h = x·w1 + b1`` per expert (for gated experts ``w1`` holds
the gate and up projections side by side, so both are this one matmul), the activation (
``silu(gate)·up`` when gated), fold the routing weight into the small activation (``a·w``,
(N, H) rather than the (N, D) output), ``y = (w·a)·w2 + w·b2``, scatter-add to tokens.

Backward is written out so that it saves only the pre-activations (N, F): the gathered input is
re-gathered, the activation recomputed, and the routing-weight gradient is taken as
``<g, a> + <dy, b2>`` with ``g = dy·w2ᵀ``, which the input gradient needs anyway. That keeps the
saved state near a dense FFN's of the same FLOPs, and touches each (N, D) buffer as few times
as possible (on CPU these passes, not the matmuls, are the overhead over a dense FFN). The input
gradient is one matmul ``dh·w1ᵀ`` and the first layer's weight gradient one ``xᵀ·dh``, gated or
not.

Large plans run in chunks of consecutive experts (:data:`CHUNK_ELEMENTS`), forward and backward,
so no (N, D) buffer is ever whole; each chunk's weight gradients go straight into the full
gradient tensors. Without autograd (inference) the forward runs without an autograd context.

Shape legend: S tokens, N kept pairs, D d_model, H d_expert, F the first layer's width (H, or
2H when gated), E experts.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from xmoe.dispatch.engines import choose_engine
from xmoe.dispatch.plan import DispatchPlan
from xmoe.experts.activations import ACTIVATION_FNS
from xmoe.experts.fused import ExpertFFN
from xmoe.experts.weights import ExpertWeights
from xmoe.registry import EXPERT_FFN

CHUNK_ELEMENTS = 1 << 20
"""Grouped rows x d_model per chunk (4 MiB in fp32): larger plans run expert range by expert
range, so the (N, D) gathers and outputs never exist whole (peak memory, cache reuse). At the
layer benchmark's training size 4 MiB chunks were the fastest and kept peak activation memory
at the dense bound's; smaller ones were slower, 8 MiB ones used more memory
(``python -m benchmarks.tuning``, docs/benchmarks/tuning_cpu.md)."""


def _chunk_rows(d_model: int) -> int:
    return max(1, CHUNK_ELEMENTS // d_model)


class _Needs(NamedTuple):
    """Which inputs of :class:`ExpertFFNFunction` want a gradient, by name."""

    x: bool
    weight: bool
    w1: bool
    b1: bool
    w2: bool
    b2: bool


def _chunk_forward(x_SD, weights: ExpertWeights, plan, weight_N, engine, out_SD):
    """One expert range: adds its weighted outputs into ``out_SD``; returns the
    pre-activations (N, F) that the backward needs."""
    xg_ND = plan.gather(x_SD)
    h_NF = engine.mm(xg_ND, weights.w1, plan)
    del xg_ND
    if weights.b1 is not None:
        plan.add_expert_rows_(h_NF, weights.b1)
    weight_col_N1 = weight_N.to(h_NF.dtype).unsqueeze(1)
    a_NH = ACTIVATION_FNS[weights.activation].forward(h_NF).mul_(weight_col_N1)
    y_ND = engine.mm(a_NH, weights.w2, plan)
    del a_NH
    if weights.b2 is not None:
        plan.add_expert_rows_(y_ND, weights.b2, weight_N.to(y_ND.dtype))
    plan.scatter_add(y_ND, out_SD)
    return h_NF


def _ffn_forward(x_SD, weights: ExpertWeights, plan, weight_N, engine):
    """Returns the (S, D) output and, per chunk, ``(sub_plan, rows, experts, h_NF)``."""
    out_SD = x_SD.new_zeros(plan.num_tokens, x_SD.shape[1])
    saved = []
    for sub, rows, experts in plan.chunks(_chunk_rows(x_SD.shape[1])):
        h_NF = _chunk_forward(x_SD, weights.slice(experts), sub, weight_N[rows], engine, out_SD)
        saved.append((sub, rows, experts, h_NF))
    return out_SD, saved


_GRADIENTS = ("weight", "w1", "b1", "w2", "b2")
"""The gradients a chunk computes, by the name of their input."""


def _chunk_backward(ctx, grad_SD, x_SD, weights: ExpertWeights, h_NF, plan, weight_N, dx_SD, into):
    """Gradients of one expert range (``weights`` without ``b1``); the input gradient is added
    into ``dx_SD``, and the weight gradients written into ``into["w1"]`` / ``into["w2"]``
    (slices of the full gradients) where not None.

    Returns {name: gradient} over :data:`_GRADIENTS` for this range (None where not needed)."""
    engine, need = ctx.engine, ctx.need
    activation = ACTIVATION_FNS[weights.activation]
    w1, w2, b2 = weights.w1, weights.w2, weights.b2
    out = dict.fromkeys(_GRADIENTS)
    dy_ND = plan.gather(grad_SD)  # gradient of each pair's weighted output
    weight_col_N1 = weight_N.to(dy_ND.dtype).unsqueeze(1)
    g_NH = engine.mm(dy_ND, w2.transpose(1, 2), plan)  # d(output)/d(w·a), unweighted
    a_NH = activation.forward(h_NF)

    if need.weight:
        # accumulate in the routing weight's dtype (fp32 or float64), not in bf16
        out["weight"] = torch.linalg.vecdot(g_NH, a_NH).to(weight_N.dtype)
    if b2 is not None and (need.weight or need.b2):
        bias_dot_N, out["b2"] = plan.expert_rowdot_and_weighted_sum(dy_ND, b2, weight_N)
        if need.weight:
            out["weight"] += bias_dot_N
    if need.w2:
        out["w2"] = engine.wgrad(a_NH.mul_(weight_col_N1), dy_ND, plan, into["w2"])
    del a_NH, dy_ND

    dh_NF = activation.backward(g_NH.mul_(weight_col_N1), h_NF)
    del g_NH

    if ctx.has_b1 and need.b1:
        out["b1"] = plan.expert_sum(dh_NF)
    if need.x:  # before the re-gather, so two (N, D) buffers never coexist
        dxg_ND = engine.mm(dh_NF, w1.transpose(1, 2), plan)
        plan.scatter_add(dxg_ND, dx_SD)
        del dxg_ND
    if need.w1:
        out["w1"] = engine.wgrad(plan.gather(x_SD), dh_NF, plan, into["w1"])
    return out


def _full_gradients(need: _Needs, weights: ExpertWeights, weight_N, has_b1) -> dict:
    """Uninitialised gradients over :data:`_GRADIENTS`, None where no chunk computes one."""

    def empty(like, shape, wanted: bool):
        return like.new_empty(shape) if wanted else None

    w1, w2, b2 = weights.w1, weights.w2, weights.b2
    num_experts, _, first_width = w1.shape
    b2_wanted = b2 is not None and (need.weight or need.b2)
    return {
        "weight": empty(weight_N, weight_N.shape, need.weight),
        "w1": empty(w1, w1.shape, need.w1),
        "b1": empty(w1, (num_experts, first_width), has_b1 and need.b1),
        "w2": empty(w2, w2.shape, need.w2),
        "b2": empty(w2, None if b2 is None else b2.shape, b2_wanted),
    }


class ExpertFFNFunction(torch.autograd.Function):
    """The expert FFN over a plan; forward and backward run expert range by expert range."""

    @staticmethod
    def forward(ctx, x_SD, weight_N, w1, b1, w2, b2, plan, activation, engine):
        weights = ExpertWeights(w1, b1, w2, b2, activation)
        out_SD, saved = _ffn_forward(x_SD, weights, plan, weight_N, engine)
        ctx.save_for_backward(x_SD, weight_N, w1, w2, b2, *(h for *_, h in saved))
        ctx.chunks = [(sub, rows, experts) for sub, rows, experts, _ in saved]
        ctx.activation, ctx.engine = activation, engine
        ctx.has_b1 = b1 is not None
        return out_SD

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_SD):
        x_SD, weight_N, w1, w2, b2, *pre_activations = ctx.saved_tensors
        weights = ExpertWeights(w1, None, w2, b2, ctx.activation)
        grad_SD = grad_SD.contiguous()
        ctx.need = need = _Needs(*ctx.needs_input_grad[:6])
        dx_SD = torch.zeros_like(x_SD) if need.x else None
        chunked = len(ctx.chunks) > 1
        # full gradients, written into as chunks finish (the weight ones directly by the
        # engines): never a second full copy
        grads = _full_gradients(need, weights, weight_N, ctx.has_b1) if chunked else None
        for (sub, rows, experts), h_NF in zip(ctx.chunks, pre_activations, strict=True):
            into = dict.fromkeys(("w1", "w2"))
            if chunked:
                into = {k: None if grads[k] is None else grads[k][experts] for k in into}
            chunk = _chunk_backward(
                ctx, grad_SD, x_SD, weights.slice(experts), h_NF, sub, weight_N[rows], dx_SD, into
            )
            if not chunked:
                grads = chunk
                break
            for name, key in (("weight", rows), ("b1", experts), ("b2", experts)):
                if grads[name] is not None:
                    grads[name][key] = chunk[name]
        db2 = grads["b2"] if need.b2 else None
        return dx_SD, grads["weight"], grads["w1"], grads["b1"], grads["w2"], db2, None, None, None


def ffn_over_plan(
    x_SD: torch.Tensor,
    weights: ExpertWeights,
    plan: DispatchPlan,
    weight_N: torch.Tensor,
    engine,
) -> torch.Tensor:
    """Weighted sum of expert FFN outputs per token.

    Args:
        x_SD: (S, D) tokens, in the dtype of ``weights``. weights: the experts.
        plan: the grouped rows (N pairs). weight_N: (N,) routing weight per grouped row.
        engine: an engine from :mod:`xmoe.dispatch.engines`.

    Returns:
        (S, D) ``Σ_{pairs of s} weight · FFN_e(x_s)``; tokens with no pair get zeros.
    """
    tensors = (x_SD, weight_N, *weights.tensors())
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return ExpertFFNFunction.apply(
            x_SD, weight_N, *weights.tensors(), plan, weights.activation, engine
        )
    return _ffn_forward(x_SD, weights, plan, weight_N, engine)[0]  # inference: no autograd


@EXPERT_FFN.register("xmoe")
class XmoeFFN(ExpertFFN):
    """:func:`ffn_over_plan` over the engine ``backend`` names (``"auto"``: the one
    :func:`~xmoe.dispatch.engines.choose_engine` picks for this call). Any dtype, any size."""

    @staticmethod
    def forward(
        x_SD: torch.Tensor,
        weights: ExpertWeights,
        plan: DispatchPlan,
        weight_N: torch.Tensor,
        backend: str,
    ) -> torch.Tensor:
        d_expert, d_model = weights.w2.shape[1], weights.w2.shape[2]
        engine = choose_engine(backend, x_SD.dtype, x_SD.device, plan.num_pairs, d_model, d_expert)
        return ffn_over_plan(x_SD, weights, plan, weight_N, engine)
