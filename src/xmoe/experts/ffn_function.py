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

import torch
from torch.autograd.function import once_differentiable

from xmoe.config import GATED_ACTIVATIONS
from xmoe.dispatch.plan import DispatchPlan
from xmoe.experts.activations import ACTIVATION_FNS

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


def _chunk_forward(x_SD, weight_N, w1, b1, w2, b2, plan, activation, engine, out_SD):
    """One expert range: adds its weighted outputs into ``out_SD``; returns the
    pre-activations (N, F) that the backward needs."""
    xg_ND = plan.gather(x_SD)
    h_NF = engine.mm(xg_ND, w1, plan)
    del xg_ND
    if b1 is not None:
        plan.add_expert_rows_(h_NF, b1)
    weight_col_N1 = weight_N.to(h_NF.dtype).unsqueeze(1)
    a_NH = ACTIVATION_FNS[activation].forward(h_NF).mul_(weight_col_N1)
    y_ND = engine.mm(a_NH, w2, plan)
    del a_NH
    if b2 is not None:
        plan.add_expert_rows_(y_ND, b2, weight_N.to(y_ND.dtype))
    plan.scatter_add(y_ND, out_SD)
    return h_NF


def _ffn_forward(x_SD, weight_N, w1, b1, w2, b2, plan, activation, engine):
    """Returns the (S, D) output and, per chunk, ``(sub_plan, rows, experts, h_NF)``."""
    out_SD = x_SD.new_zeros(plan.num_tokens, x_SD.shape[1])
    saved = []
    for sub, rows, experts in plan.chunks(_chunk_rows(x_SD.shape[1])):
        h_NF = _chunk_forward(
            x_SD,
            weight_N[rows],
            w1[experts],
            _slice(b1, experts),
            w2[experts],
            _slice(b2, experts),
            sub,
            activation,
            engine,
            out_SD,
        )
        saved.append((sub, rows, experts, h_NF))
    return out_SD, saved


def _chunk_backward(ctx, grad_SD, x_SD, weight_N, w1, w2, b2, h_NF, plan, dx_SD, wgrad_out):
    """Gradients of one expert range; the input gradient is added into ``dx_SD``, and the
    weight gradients written into ``wgrad_out`` = (dw1, dw2) slices where not None.

    Returns (dweight, dw1, db1, dw2, db2) for this range (None where not needed)."""
    engine, need = ctx.engine, ctx.needs_input_grad
    activation = ACTIVATION_FNS[ctx.activation]
    dweight = dw1 = db1 = dw2 = db2 = None
    dy_ND = plan.gather(grad_SD)  # gradient of each pair's weighted output
    weight_col_N1 = weight_N.to(dy_ND.dtype).unsqueeze(1)
    g_NH = engine.mm(dy_ND, w2.transpose(1, 2), plan)  # d(output)/d(w·a), unweighted
    a_NH = activation.forward(h_NF)

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

    dh_NF = activation.backward(g_NH.mul_(weight_col_N1), h_NF)
    del g_NH

    if ctx.has_b1 and need[3]:
        db1 = plan.expert_sum(dh_NF)
    if need[0]:  # before the re-gather, so two (N, D) buffers never coexist
        dxg_ND = engine.mm(dh_NF, w1.transpose(1, 2), plan)
        plan.scatter_add(dxg_ND, dx_SD)
        del dxg_ND
    if need[2]:
        dw1 = engine.wgrad(plan.gather(x_SD), dh_NF, plan, wgrad_out[0])
    return dweight, dw1, db1, dw2, db2


def _full_gradients(need, weight_N, w1, w2, b2, has_b1) -> list:
    """Uninitialised (dweight, dw1, db1, dw2, db2), None where no chunk computes one."""

    def empty(like, shape, wanted: bool):
        return like.new_empty(shape) if wanted else None

    num_experts, _, first_width = w1.shape
    return [
        empty(weight_N, weight_N.shape, need[1]),
        empty(w1, w1.shape, need[2]),
        empty(w1, (num_experts, first_width), has_b1 and need[3]),
        empty(w2, w2.shape, need[4]),
        empty(w2, None if b2 is None else b2.shape, b2 is not None and (need[1] or need[5])),
    ]


class ExpertFFNFunction(torch.autograd.Function):
    """The expert FFN over a plan; forward and backward run expert range by expert range."""

    @staticmethod
    def forward(ctx, x_SD, weight_N, w1, b1, w2, b2, plan, activation, engine):
        out_SD, saved = _ffn_forward(x_SD, weight_N, w1, b1, w2, b2, plan, activation, engine)
        ctx.save_for_backward(x_SD, weight_N, w1, w2, b2, *(h for *_, h in saved))
        ctx.chunks = [(sub, rows, experts) for sub, rows, experts, _ in saved]
        ctx.activation, ctx.engine = activation, engine
        ctx.has_b1 = b1 is not None
        return out_SD

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_SD):
        x_SD, weight_N, w1, w2, b2, *pre_activations = ctx.saved_tensors
        grad_SD = grad_SD.contiguous()
        need = ctx.needs_input_grad
        dx_SD = torch.zeros_like(x_SD) if need[0] else None
        chunked = len(ctx.chunks) > 1
        # full gradients, written into as chunks finish (the weight ones directly by the
        # engines): never a second full copy
        grads = _full_gradients(need, weight_N, w1, w2, b2, ctx.has_b1) if chunked else None
        for (sub, rows, experts), h_NF in zip(ctx.chunks, pre_activations, strict=True):
            wgrad_out = (None, None)
            if chunked:
                wgrad_out = tuple(None if g is None else g[experts] for g in grads[1::2])
            chunk = _chunk_backward(
                ctx,
                grad_SD,
                x_SD,
                weight_N[rows],
                w1[experts],
                w2[experts],
                _slice(b2, experts),
                h_NF,
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
        dweight, dw1, db1, dw2, db2 = grads
        return dx_SD, dweight, dw1, db1, dw2, db2 if need[5] else None, None, None, None


def expert_ffn(
    x_SD: torch.Tensor,
    weight_N: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    plan: DispatchPlan,
    activation: str,
    engine,
) -> torch.Tensor:
    """Weighted sum of expert FFN outputs per token.

    Args:
        x_SD: (S, D) tokens. weight_N: (N,) routing weight per grouped row.
        w1: (E, D, F), b1: (E, F) or None, w2: (E, H, D), b2: (E, D) or None, all in one dtype
            with ``x_SD``. F = H for plain experts; for gated ones F = 2H, ``[gate | up]``.
        plan: the grouped rows. activation: a key of ``ACTIVATION_FNS`` (``swiglu`` when gated).
        engine: an engine from :mod:`xmoe.dispatch.engines`.

    Returns:
        (S, D) ``Σ_{pairs of s} weight · FFN_e(x_s)``; tokens with no pair get zeros.
    """
    first_width = 2 * w2.shape[1] if activation in GATED_ACTIVATIONS else w2.shape[1]
    if w1.shape[2] != first_width:
        raise ValueError(
            f"w1.shape={tuple(w1.shape)} does not fit activation={activation!r} with "
            f"w2.shape={tuple(w2.shape)}: the first layer must be {first_width} wide"
        )
    args = (x_SD, weight_N, w1, b1, w2, b2, plan, activation, engine)
    tensors = (x_SD, weight_N, w1, b1, w2, b2)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return ExpertFFNFunction.apply(*args)
    return _ffn_forward(*args)[0]  # inference: no autograd context to build or keep
