"""The expert FFN over a dispatch plan as one autograd function.

Forward: gather token rows once, ``h = x·w1 + b1`` per expert, activation (or
``silu(h)·(x·w3)`` when gated), fold the routing weight into the small activation
(``a·w``, (N, H) rather than the (N, D) output), ``y = (w·a)·w2 + w·b2``, scatter-add to tokens.

Backward is written out so that it saves only the pre-activations (N, H): the gathered input is
re-gathered, the activation recomputed, and the routing-weight gradient is taken as
``<g, a> + <dy, b2>`` with ``g = dy·w2ᵀ``, which the input gradient needs anyway. That keeps the
saved state near a dense FFN's of the same FLOPs, and touches each (N, D) buffer as few times
as possible (on CPU these passes, not the matmuls, are the overhead over a dense FFN).

Large plans run in chunks of consecutive experts (:data:`CHUNK_ELEMENTS`), forward and backward,
so no (N, D) buffer is ever whole; each chunk's weight gradients go straight into the full
gradient tensors. Without autograd (inference) the forward runs without an autograd context.

Shape legend: S tokens, N kept pairs, D d_model, H d_expert, E experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from xmoe.dispatch.plan import DispatchPlan
from xmoe.experts.activations import ACTIVATION_FNS


def _activate(h_NH, gate_NH, activation: str):
    """The expert activation; ``gate_NH`` is the ``x·w3`` branch of gated experts or None."""
    if gate_NH is not None:
        return F.silu(h_NH).mul_(gate_NH)
    return ACTIVATION_FNS[activation].forward(h_NH)


CHUNK_ELEMENTS = 1 << 20
"""Grouped rows x d_model per chunk (4 MiB in fp32): larger plans run expert range by expert
range, so the (N, D) gathers and outputs never exist whole (peak memory, cache reuse). At the
layer benchmark's training size 4 MiB chunks were the fastest and kept peak activation memory
at the dense bound's; smaller ones were slower, 8 MiB ones used more memory
(``python -m benchmarks.tuning``, docs/benchmarks/tuning_cpu.md)."""


def _chunk_rows(d_model: int) -> int:
    return max(1, CHUNK_ELEMENTS // d_model)


def _slice(weight, experts: slice):
    return None if weight is None else weight[experts]


def _chunk_forward(x_SD, weight_N, w1, b1, w2, b2, w3, plan, activation, engine, out_SD):
    """One expert range: adds its weighted outputs into ``out_SD``; returns the
    pre-activations (N, H) and the gate branch (or None) that the backward needs."""
    xg_ND = plan.gather(x_SD)
    h_NH = engine.mm(xg_ND, w1, plan)
    if b1 is not None:
        plan.add_expert_rows_(h_NH, b1)
    gate_NH = engine.mm(xg_ND, w3, plan) if w3 is not None else None
    del xg_ND
    weight_col_N1 = weight_N.to(h_NH.dtype).unsqueeze(1)
    a_NH = _activate(h_NH, gate_NH, activation).mul_(weight_col_N1)
    y_ND = engine.mm(a_NH, w2, plan)
    del a_NH
    if b2 is not None:
        plan.add_expert_rows_(y_ND, b2, weight_N.to(y_ND.dtype))
    plan.scatter_add(y_ND, out_SD)
    return h_NH, gate_NH


def _ffn_forward(x_SD, weight_N, w1, b1, w2, b2, w3, plan, activation, engine):
    """Returns the (S, D) output and, per chunk, ``(sub_plan, rows, experts, h_NH, gate_NH)``."""
    out_SD = x_SD.new_zeros(plan.num_tokens, x_SD.shape[1])
    saved = []
    for sub, rows, experts in plan.chunks(_chunk_rows(x_SD.shape[1])):
        h_NH, gate_NH = _chunk_forward(
            x_SD,
            weight_N[rows],
            w1[experts],
            _slice(b1, experts),
            w2[experts],
            _slice(b2, experts),
            _slice(w3, experts),
            sub,
            activation,
            engine,
            out_SD,
        )
        saved.append((sub, rows, experts, h_NH, gate_NH))
    return out_SD, saved


def _chunk_backward(
    ctx, grad_SD, x_SD, weight_N, w1, w2, w3, b2, h_NH, gate_NH, plan, dx_SD, wgrad_out
):
    """Gradients of one expert range; the input gradient is added into ``dx_SD``, and the
    weight gradients written into ``wgrad_out`` = (dw1, dw2, dw3) slices where not None.

    Returns (dweight, dw1, db1, dw2, db2, dw3) for this range (None where not needed)."""
    engine, need = ctx.engine, ctx.needs_input_grad
    dweight = dw1 = db1 = dw2 = db2 = dw3 = None
    dy_ND = plan.gather(grad_SD)  # gradient of each pair's weighted output
    weight_col_N1 = weight_N.to(dy_ND.dtype).unsqueeze(1)
    g_NH = engine.mm(dy_ND, w2.transpose(1, 2), plan)  # d(output)/d(w·a), unweighted
    a_NH = _activate(h_NH, gate_NH, ctx.activation)

    if need[1]:
        # accumulate in the routing weight's dtype (fp32 or float64), not in bf16
        dweight = torch.linalg.vecdot(g_NH, a_NH).to(weight_N.dtype)
    if b2 is not None and (need[1] or need[5]):
        bias_dot_N, db2 = plan.expert_rowdot_and_weighted_sum(dy_ND, b2, weight_N)
        if need[1]:
            dweight += bias_dot_N
    if need[4]:
        dw2 = engine.wgrad(a_NH.mul_(weight_col_N1), dy_ND, plan, wgrad_out[1])
    del a_NH, dy_ND

    da_NH = g_NH.mul_(weight_col_N1)
    if gate_NH is not None:
        dgate_NH = F.silu(h_NH).mul_(da_NH)
        dh_NH = torch.ops.aten.silu_backward(da_NH.mul_(gate_NH), h_NH)
    else:
        dgate_NH = None
        dh_NH = ACTIVATION_FNS[ctx.activation].backward(da_NH, h_NH)
    del da_NH, g_NH

    if ctx.has_b1 and need[3]:
        db1 = plan.expert_sum(dh_NH)
    if need[0]:  # before the re-gather, so two (N, D) buffers never coexist
        dxg_ND = engine.mm(dh_NH, w1.transpose(1, 2), plan)
        if dgate_NH is not None:
            dxg_ND += engine.mm(dgate_NH, w3.transpose(1, 2), plan)
        plan.scatter_add(dxg_ND, dx_SD)
        del dxg_ND
    if need[2] or (dgate_NH is not None and need[6]):
        xg_ND = plan.gather(x_SD)
        if need[2]:
            dw1 = engine.wgrad(xg_ND, dh_NH, plan, wgrad_out[0])
        if dgate_NH is not None and need[6]:
            dw3 = engine.wgrad(xg_ND, dgate_NH, plan, wgrad_out[2])
        del xg_ND
    return dweight, dw1, db1, dw2, db2, dw3


def _full_gradients(need, weight_N, w1, w2, w3, b2, has_b1) -> list:
    """Uninitialised (dweight, dw1, db1, dw2, db2, dw3), None where no chunk computes one."""

    def empty(like, shape, wanted: bool):
        return like.new_empty(shape) if wanted else None

    num_experts, _, d_expert = w1.shape
    return [
        empty(weight_N, weight_N.shape, need[1]),
        empty(w1, w1.shape, need[2]),
        empty(w1, (num_experts, d_expert), has_b1 and need[3]),
        empty(w2, w2.shape, need[4]),
        empty(w2, None if b2 is None else b2.shape, b2 is not None and (need[1] or need[5])),
        empty(w1, None if w3 is None else w3.shape, w3 is not None and need[6]),
    ]


class ExpertFFNFunction(torch.autograd.Function):
    """The expert FFN over a plan; forward and backward run expert range by expert range."""

    @staticmethod
    def forward(ctx, x_SD, weight_N, w1, b1, w2, b2, w3, plan, activation, engine):
        out_SD, saved = _ffn_forward(x_SD, weight_N, w1, b1, w2, b2, w3, plan, activation, engine)
        activations = [t for _, _, _, h, gate in saved for t in (h, gate) if t is not None]
        ctx.save_for_backward(x_SD, weight_N, w1, w2, w3, b2, *activations)
        ctx.chunks = [(sub, rows, experts) for sub, rows, experts, _, _ in saved]
        ctx.activation, ctx.engine = activation, engine
        ctx.has_b1 = b1 is not None
        return out_SD

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_SD):
        x_SD, weight_N, w1, w2, w3, b2, *activations = ctx.saved_tensors
        per_chunk = 2 if w3 is not None else 1
        grad_SD = grad_SD.contiguous()
        need = ctx.needs_input_grad
        dx_SD = torch.zeros_like(x_SD) if need[0] else None
        chunked = len(ctx.chunks) > 1
        # full gradients, written into as chunks finish (the weight ones directly by the
        # engines): never a second full copy
        grads = _full_gradients(need, weight_N, w1, w2, w3, b2, ctx.has_b1) if chunked else None
        for index, (sub, rows, experts) in enumerate(ctx.chunks):
            h_NH = activations[index * per_chunk]
            gate_NH = activations[index * per_chunk + 1] if w3 is not None else None
            wgrad_out = (None, None, None)
            if chunked:
                wgrad_out = tuple(None if g is None else g[experts] for g in grads[1::2])
            chunk = _chunk_backward(
                ctx,
                grad_SD,
                x_SD,
                weight_N[rows],
                w1[experts],
                w2[experts],
                _slice(w3, experts),
                _slice(b2, experts),
                h_NH,
                gate_NH,
                sub,
                dx_SD,
                wgrad_out,
            )
            if not chunked:
                grads = chunk
                break
            for index_in_grads, key in ((0, rows), (2, experts), (4, experts)):
                if grads[index_in_grads] is not None:
                    grads[index_in_grads][key] = chunk[index_in_grads]
        dweight, dw1, db1, dw2, db2, dw3 = grads
        return dx_SD, dweight, dw1, db1, dw2, db2 if need[5] else None, dw3, None, None, None


def expert_ffn(
    x_SD: torch.Tensor,
    weight_N: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    w3: torch.Tensor | None,
    plan: DispatchPlan,
    activation: str,
    engine,
) -> torch.Tensor:
    """Weighted sum of expert FFN outputs per token.

    Args:
        x_SD: (S, D) tokens. weight_N: (N,) routing weight per grouped row.
        w1: (E, D, H), b1: (E, H) or None, w2: (E, H, D), b2: (E, D) or None,
        w3: (E, D, H) or None (gated experts). All in one dtype with ``x_SD``.
        plan: the grouped rows. activation: a key of ``ACTIVATION_FNS`` (ignored when gated).
        engine: an engine from :mod:`xmoe.dispatch.engines`.

    Returns:
        (S, D) ``Σ_{pairs of s} weight · FFN_e(x_s)``; tokens with no pair get zeros.
    """
    args = (x_SD, weight_N, w1, b1, w2, b2, w3, plan, activation, engine)
    tensors = (x_SD, weight_N, w1, b1, w2, b2, w3)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return ExpertFFNFunction.apply(*args)
    return _ffn_forward(*args)[0]  # inference: no autograd context to build or keep
