"""The expert FFN through the Triton kernels: ``EXPERT_FFN["triton"]``.

Forward: ``h = gather(x)·w1 + b1`` with the activation in the same kernel's epilogue (the gather
inside the GEMM), then ``y = w · (a·w2 + b2)`` with the routing weight in the GEMM's epilogue,
written in token-major order and summed per token by the combine kernel (no atomics).

Backward saves what :mod:`xmoe.experts.ffn_function` saves (the pre-activations (N, F), no
gathered copy): ``g = gather(dy)·w2ᵀ``, the routing-weight gradient ``<g, a> + <dy, b2>`` as
fused row dots, ``dw2 = (w·a)ᵀ gather(dy)`` and ``db2 = Σ w·gather(dy)`` as grouped weight
gradients, ``dh = act'(h) · w·g``, ``dx = combine(dh·w1ᵀ)``, ``dw1 = gather(x)ᵀ dh``.

Both are ``torch.library`` custom ops (``xmoe::triton_ffn`` and ``xmoe::triton_ffn_backward``,
with fake implementations and the autograd formula registered), so ``torch.compile`` traces the
expert FFN as one op in each direction instead of breaking its graph at the kernel launches.

Shape legend: S tokens, N kept pairs (sorted by expert), D d_model, H d_expert, F the first
layer's width (H, or 2H when gated), E experts.
"""

from __future__ import annotations

from typing import ClassVar

import torch

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

Tensor = torch.Tensor
GRADIENTS = ("x", "weight", "w1", "b1", "w2", "b2")
"""The differentiable inputs of ``xmoe::triton_ffn``, in order."""


def _ops():
    """The kernels module, imported on first use (it imports triton)."""
    from xmoe.kernels import ops

    return ops


def _schedule(tensors: list[Tensor], tiles: list[int]) -> tuple[Schedule, Tiles]:
    """The schedule and tiles an op was given as a tensor list and an int list."""
    tiles_ = Tiles(*tiles)
    return Schedule(*tensors, tiles_.block_m), tiles_


def _op_args(schedule: Schedule, tiles: Tiles) -> tuple[list[Tensor], list[int]]:
    """A schedule and tiles as custom-op arguments (tensors and ints, the schema's types)."""
    fields = (tiles.block_m, tiles.block_n, tiles.block_k, tiles.num_warps, tiles.num_stages)
    return list(schedule[:-1]), list(fields)


@torch.library.custom_op("xmoe::triton_ffn", mutates_args=())
def triton_ffn(
    x_SD: Tensor,
    weight_N: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    schedule: list[Tensor],
    activation: str,
    tiles: list[int],
    keep_pre: bool,
) -> tuple[Tensor, Tensor]:
    """(S, D) ``Σ_{pairs of s} weight · FFN_e(x_s)`` and the (N, F) pre-activations, or an
    empty (0, F) tensor unless ``keep_pre`` (inference: never written).

    ``schedule``: the tensors of a :class:`Schedule` (its ``block_m`` is ``tiles[0]``);
    ``tiles``: the fields of a :class:`Tiles`."""
    plan, tiles_ = _schedule(schedule, tiles)
    ops = _ops()
    h_NF, a_NH = ops.gathered_mm_act(
        x_SD, w1, plan, tiles_, activation, bias_EF=b1, keep_pre=keep_pre
    )
    y_ND = ops.gathered_mm(a_NH, w2, plan, tiles_, bias_EM=b2, scale_N=weight_N, scatter=True)
    return ops.combine(y_ND, plan), x_SD.new_empty(0, w1.shape[2]) if h_NF is None else h_NF


@triton_ffn.register_fake
def _(x_SD, weight_N, w1, b1, w2, b2, schedule, activation, tiles, keep_pre):
    # the schedule's first tensor is token_N (N,), its last rowptr_S1 (S + 1,)
    num_tokens, num_pairs = schedule[-1].shape[0] - 1, schedule[0].shape[0]
    pre_NF = x_SD.new_empty(num_pairs if keep_pre else 0, w1.shape[2])
    return x_SD.new_empty(num_tokens, x_SD.shape[1]), pre_NF


@torch.library.custom_op("xmoe::triton_ffn_backward", mutates_args=())
def triton_ffn_backward(
    grad_SD: Tensor,
    x_SD: Tensor,
    weight_N: Tensor,
    h_NF: Tensor,
    weights: list[Tensor | None],
    schedule: list[Tensor],
    activation: str,
    tiles: list[int],
    needs: list[bool],
) -> list[Tensor]:
    """The gradients of ``xmoe::triton_ffn``'s inputs :data:`GRADIENTS`, where ``needs`` says
    (an empty tensor in the place of one not wanted, or of ``b1``'s or ``b2``'s when None).
    ``weights``: ``[w1, w2, b2]``."""
    w1, w2, b2 = weights
    plan, tiles_ = _schedule(schedule, tiles)
    need = dict(zip(GRADIENTS, needs, strict=True))
    ops, act = _ops(), ACTIVATION_FNS[activation]
    grad_SD = grad_SD.contiguous()
    grads = dict.fromkeys(GRADIENTS)
    # d(output)/d(w·a), unweighted: the gathered GEMM with w2 transposed
    g_NH = ops.gathered_mm(grad_SD, w2.transpose(1, 2), plan, tiles_, gather=True)
    a_NH = act.forward(h_NF)
    if need["weight"]:
        grads["weight"] = ops.rowdot(g_NH, a_NH, torch.empty_like(weight_N))
        if b2 is not None:
            rows = {"x_idx_N": plan.token_N, "y_idx_N": plan.expert_N}
            ops.rowdot(grad_SD, b2, grads["weight"], **rows, accumulate=True)
    if need["w2"]:
        scaled = {"gather_y": True, "scale_N": weight_N}
        grads["w2"] = ops.grouped_wgrad(a_NH, grad_SD, plan, tiles_, **scaled)
    if b2 is not None and need["b2"]:
        column_N1 = weight_N.to(grad_SD.dtype).unsqueeze(1)
        grads["b2"] = ops.grouped_wgrad(column_N1, grad_SD, plan, tiles_, gather_y=True)[:, 0]
    del a_NH
    dh_NF = act.backward(g_NH.mul_(weight_N.to(g_NH.dtype).unsqueeze(1)), h_NF)
    del g_NH
    if need["b1"]:
        ones_N1 = dh_NF.new_ones(dh_NF.shape[0], 1)
        grads["b1"] = ops.grouped_wgrad(ones_N1, dh_NF, plan, tiles_)[:, 0]
    if need["x"]:
        dx_ND = ops.gathered_mm(dh_NF, w1.transpose(1, 2), plan, tiles_, scatter=True)
        grads["x"] = ops.combine(dx_ND, plan)
    if need["w1"]:
        grads["w1"] = ops.grouped_wgrad(x_SD, dh_NF, plan, tiles_, gather_x=True)
    return [x_SD.new_empty(0) if g is None else g for g in grads.values()]


@triton_ffn_backward.register_fake
def _(grad_SD, x_SD, weight_N, h_NF, weights, schedule, activation, tiles, needs):
    w1, w2, b2 = weights
    shapes = {
        "x": x_SD.shape,
        "weight": weight_N.shape,
        "w1": w1.shape,
        "b1": (w1.shape[0], w1.shape[2]),
        "w2": w2.shape,
        "b2": None if b2 is None else b2.shape,
    }
    like = {"weight": weight_N}
    return [
        like.get(name, x_SD).new_empty(shapes[name] if wanted and shapes[name] else (0,))
        for name, wanted in zip(GRADIENTS, needs, strict=True)
    ]


def _setup_context(ctx, inputs, output) -> None:
    x_SD, weight_N, w1, b1, w2, b2, schedule, activation, tiles, _ = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x_SD, weight_N, w1, w2, b2, output[1], *schedule)
    ctx.activation, ctx.tiles, ctx.has_b1 = activation, tiles, b1 is not None


def _backward(ctx, grad_SD, _grad_pre):
    x_SD, weight_N, w1, w2, b2, h_NF, *schedule = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:6])
    needs[GRADIENTS.index("b1")] &= ctx.has_b1
    needs[GRADIENTS.index("b2")] &= b2 is not None
    options = {"schedule": schedule, "activation": ctx.activation, "tiles": ctx.tiles}
    grads = triton_ffn_backward(grad_SD, x_SD, weight_N, h_NF, [w1, w2, b2], needs=needs, **options)
    grads = [g if wanted else None for g, wanted in zip(grads, needs, strict=True)]
    return *grads, [None] * len(schedule), None, None, None  # none for the schedule's tensors


triton_ffn.register_autograd(_backward, setup_context=_setup_context)


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
        keep_pre = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in tensors
        )  # inference: the pre-activations are never stored
        schedule_tensors, tile_fields = _op_args(schedule, tiles)
        return triton_ffn(*tensors, schedule_tensors, weights.activation, tile_fields, keep_pre)[0]
