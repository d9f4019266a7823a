"""The expert FFN through the Triton kernels: ``EXPERT_FFN["triton"]``.

Forward: ``h = gather(x)·w1 + b1`` (the gather inside the GEMM), the activation, then
``y = w · (a·w2 + b2)`` with the routing weight in the GEMM's epilogue, written in token-major
order and summed per token by the combine kernel (no atomics).

Backward saves what :mod:`xmoe.experts.ffn_function` saves (the pre-activations (N, F), no
gathered copy): ``g = gather(dy)·w2ᵀ``, the routing-weight gradient ``<g, a> + <dy, b2>`` as
fused row dots, ``dw2 = (w·a)ᵀ gather(dy)`` and ``db2 = Σ w·gather(dy)`` as grouped weight
gradients, ``dh = act'(h) · w·g``, ``dx = combine(dh·w1ᵀ)``, ``dw1 = gather(x)ᵀ dh``.

Shape legend: S tokens, N kept pairs (sorted by expert), D d_model, H d_expert, F the first
layer's width (H, or 2H when gated), E experts.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch.autograd.function import once_differentiable

from xmoe.dispatch.plan import DispatchPlan
from xmoe.experts.activations import ACTIVATION_FNS
from xmoe.experts.fused import ExpertFFN
from xmoe.experts.weights import ExpertWeights
from xmoe.kernels.configs import Tiles, interpreting, tiles_for, triton_available
from xmoe.kernels.schedule import Schedule, build_schedule
from xmoe.registry import EXPERT_FFN

CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INTERPRETER_DTYPES = (torch.float32, torch.float64)
"""The interpreter's bf16 ``tl.dot`` is wrong, and float64 runs there only (for the tests)."""


def _ops():
    """The kernels module, imported on first use (it imports triton)."""
    from xmoe.kernels import ops

    return ops


def _forward(x_SD, weights: ExpertWeights, weight_N, schedule: Schedule, tiles: Tiles):
    """Returns the (S, D) output and the pre-activations (N, F)."""
    ops = _ops()
    h_NF = ops.gathered_mm(x_SD, weights.w1, schedule, tiles, gather=True, bias_EM=weights.b1)
    a_NH = ACTIVATION_FNS[weights.activation].forward(h_NF)
    y_ND = ops.gathered_mm(
        a_NH, weights.w2, schedule, tiles, bias_EM=weights.b2, scale_N=weight_N, scatter=True
    )
    return ops.combine(y_ND, schedule), h_NF


class TritonFFNFunction(torch.autograd.Function):
    """The expert FFN over a schedule, forward and backward as Triton kernels."""

    @staticmethod
    def forward(ctx, x_SD, weight_N, w1, b1, w2, b2, schedule, activation, tiles):
        weights = ExpertWeights(w1, b1, w2, b2, activation)
        out_SD, h_NF = _forward(x_SD, weights, weight_N, schedule, tiles)
        ctx.save_for_backward(x_SD, weight_N, w1, w2, b2, h_NF)
        ctx.schedule, ctx.activation, ctx.tiles = schedule, activation, tiles
        ctx.has_b1 = b1 is not None
        return out_SD

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_SD):
        x_SD, weight_N, w1, w2, b2, h_NF = ctx.saved_tensors
        need_x, need_weight, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:6]
        schedule, tiles, ops = ctx.schedule, ctx.tiles, _ops()
        activation = ACTIVATION_FNS[ctx.activation]
        grad_SD = grad_SD.contiguous()
        # d(output)/d(w·a), unweighted: the gathered GEMM with w2 transposed
        g_NH = ops.gathered_mm(grad_SD, w2.transpose(1, 2), schedule, tiles, gather=True)
        a_NH = activation.forward(h_NF)
        d_weight = d_w1 = d_b1 = d_w2 = d_b2 = d_x = None
        if need_weight:
            d_weight = ops.rowdot(g_NH, a_NH, torch.empty_like(weight_N))
            if b2 is not None:
                rows = {"x_idx_N": schedule.token_N, "y_idx_N": schedule.expert_N}
                ops.rowdot(grad_SD, b2, d_weight, **rows, accumulate=True)
        if need_w2:
            scaled = {"gather_y": True, "scale_N": weight_N}
            d_w2 = ops.grouped_wgrad(a_NH, grad_SD, schedule, tiles, **scaled)
        if b2 is not None and need_b2:
            column_N1 = weight_N.to(grad_SD.dtype).unsqueeze(1)
            d_b2 = ops.grouped_wgrad(column_N1, grad_SD, schedule, tiles, gather_y=True)[:, 0]
        del a_NH
        dh_NF = activation.backward(g_NH.mul_(weight_N.to(g_NH.dtype).unsqueeze(1)), h_NF)
        del g_NH
        if ctx.has_b1 and need_b1:
            ones_N1 = dh_NF.new_ones(dh_NF.shape[0], 1)
            d_b1 = ops.grouped_wgrad(ones_N1, dh_NF, schedule, tiles)[:, 0]
        if need_x:
            dx_ND = ops.gathered_mm(dh_NF, w1.transpose(1, 2), schedule, tiles, scatter=True)
            d_x = ops.combine(dx_ND, schedule)
        if need_w1:
            d_w1 = ops.grouped_wgrad(x_SD, dh_NF, schedule, tiles, gather_x=True)
        return d_x, d_weight, d_w1, d_b1, d_w2, d_b2, None, None, None


def _sorted(plan: DispatchPlan, weight_N: torch.Tensor):
    """The plan with its rows grouped by expert (decode-sized plans arrive token-major), and
    the weights in the same order (through autograd)."""
    if plan.sorted_by_expert:
        return plan, weight_N
    order_N = torch.sort(plan.expert_idx_N, stable=True).indices
    token_N, expert_N = plan.token_idx_N[order_N], plan.expert_idx_N[order_N]
    sorted_plan = DispatchPlan(token_N, expert_N, plan.counts_E, plan.num_tokens)
    return sorted_plan, weight_N.index_select(0, order_N)


@EXPERT_FFN.register("triton")
class TritonFFN(ExpertFFN):
    """The Triton kernels of :mod:`xmoe.kernels.ops`: fp32/bf16/fp16 on CUDA, and on CPU
    fp32/float64 under triton's interpreter (``TRITON_INTERPRET=1``, for tests)."""

    requirement: ClassVar[str] = (
        "the Triton kernels need triton and CUDA with fp32/bf16/fp16 (on CPU, fp32/float64 "
        "under TRITON_INTERPRET=1)"
    )
    auto_devices: ClassVar[frozenset[str]] = frozenset({"cuda"})  # the interpreter: by name

    @classmethod
    def supports(cls, dtype, device, num_pairs, d_model, d_expert) -> bool:
        if not triton_available():
            return False
        if device.type == "cuda":
            return dtype in CUDA_DTYPES
        return device.type == "cpu" and interpreting() and dtype in INTERPRETER_DTYPES

    @staticmethod
    def forward(
        x_SD: torch.Tensor,
        weights: ExpertWeights,
        plan: DispatchPlan,
        weight_N: torch.Tensor,
        backend: str,
    ) -> torch.Tensor:
        plan, weight_N = _sorted(plan, weight_N)
        tiles = tiles_for(x_SD.device, x_SD.dtype)
        schedule = build_schedule(plan, tiles.block_m)
        tensors = (x_SD, weight_N, *weights.tensors())
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
            return TritonFFNFunction.apply(
                x_SD, weight_N, *weights.tensors(), schedule, weights.activation, tiles
            )
        return _forward(x_SD, weights, weight_N, schedule, tiles)[0]  # inference: no autograd
