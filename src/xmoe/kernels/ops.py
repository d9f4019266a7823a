"""The Triton kernels and their launchers (imports triton: load it through :mod:`xmoe.kernels.ffn`).

* :func:`gathered_mm`: ``c[r] = scale[r] · (a[idx[r]] · b[expert(r)] + bias[expert(r)])`` over
  the grouped rows r of a :class:`~xmoe.kernels.schedule.Schedule`, reading ``a`` through the
  gather index in the kernel, writing row r at ``out_idx[r]`` (a scatter) or at r;
* :func:`gathered_mm_act`: the same GEMM (gathered, with bias) with the expert activation in its
  epilogue, ``act(c)``, and for the gated ``swiglu`` ``silu(c_gate)·c_up`` on the fused
  ``[gate | up]`` layout (one program computes a tile's gate and up columns from one A tile);
* :func:`grouped_wgrad`: ``out[e] = Σ_{r in e} (scale[r] · x[xi[r]])ᵀ y[yi[r]]`` per expert,
  zeros for an empty expert;
* :func:`rowdot`: ``out[r] (+)= <x[xi[r]], y[yi[r]]>``;
* :func:`combine`: ``out[s] = Σ_{slots j of s} y[j]``, pairs grouped per token (no atomics).

Loops whose bounds are loaded from memory are ``while`` loops: triton 3.6's interpreter refuses
``range`` over loaded bounds. The reduction widths ``K`` of the ``range`` loops are constexprs:
3.6's interpreter cannot take a runtime bound either (with numpy 2.4), and a width is fixed per
model, so a kernel compiles once per layer shape, never per batch size. Accumulation is in fp32
(float64 for float64 operands, which the interpreter runs).

Shape legend: S tokens, N grouped rows, E experts, K reduction width, M output width.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import triton
import triton.language as tl

from xmoe.config import GATED_ACTIVATIONS
from xmoe.kernels.configs import Tiles
from xmoe.kernels.schedule import Schedule

COLUMN_BLOCK = 128
"""Columns per program of the row-wise kernels (row dot, combine)."""


@triton.jit
def _activation(h, h_up, ACTIVATION: tl.constexpr):
    """The expert activation of :mod:`xmoe.experts.activations` on an accumulator tile
    (``h_up``: the up columns, read by ``swiglu`` only)."""
    if ACTIVATION == "gelu":  # the exact (erf) GELU
        return 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))
    elif ACTIVATION == "relu":
        return tl.maximum(h, 0.0)
    elif ACTIVATION == "silu":
        return h * tl.sigmoid(h)
    else:  # swiglu
        return h * tl.sigmoid(h) * h_up


@triton.jit
def _gathered_mm_kernel(
    a_ptr, a_idx_ptr, b_ptr, bias_ptr, scale_ptr, c_ptr, c_idx_ptr, act_ptr,
    tile_expert_ptr, tile_row_ptr, bounds_ptr,
    M, K: tl.constexpr,
    stride_am, stride_ak, stride_be, stride_bk, stride_bm, stride_bias_e, stride_cm, stride_cn,
    stride_act,
    GATHER_A: tl.constexpr, SCATTER_C: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr, STORE_C: tl.constexpr, ACTIVATION: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # gated (ACTIVATION "swiglu"): M is the activation's width, b and c hold 2M columns, the up
    # half M columns after the gate; one A tile feeds both products
    tile = tl.program_id(0)
    expert = tl.load(tile_expert_ptr + tile)
    if expert >= 0:
        rows = tl.load(tile_row_ptr + tile) + tl.arange(0, BLOCK_M)
        row_mask = rows < tl.load(bounds_ptr + expert + 1)
        a_rows = rows.to(tl.int64)
        if GATHER_A:
            a_rows = tl.load(a_idx_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < M
        b_mask_cols = col_mask[None, :]
        b_base = b_ptr + expert.to(tl.int64) * stride_be
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < K
            a = tl.load(
                a_ptr + a_rows[:, None] * stride_am + ks[None, :] * stride_ak,
                mask=row_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            b_ptrs = b_base + ks[:, None] * stride_bk + cols[None, :] * stride_bm
            b_mask = k_mask[:, None] & b_mask_cols
            acc = tl.dot(a, tl.load(b_ptrs, mask=b_mask, other=0.0), acc,
                         input_precision=PRECISION, out_dtype=ACC)  # fmt: skip
            if ACTIVATION == "swiglu":
                b_up = tl.load(b_ptrs + M * stride_bm, mask=b_mask, other=0.0)
                acc_up = tl.dot(a, b_up, acc_up, input_precision=PRECISION, out_dtype=ACC)
        if HAS_BIAS:
            bias_ptrs = bias_ptr + expert * stride_bias_e + cols
            acc += tl.load(bias_ptrs, mask=col_mask, other=0.0).to(ACC)[None, :]
            if ACTIVATION == "swiglu":
                acc_up += tl.load(bias_ptrs + M, mask=col_mask, other=0.0).to(ACC)[None, :]
        if HAS_SCALE:
            acc *= tl.load(scale_ptr + rows, mask=row_mask, other=0.0).to(ACC)[:, None]
        c_rows = rows.to(tl.int64)
        if SCATTER_C:
            c_rows = tl.load(c_idx_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        mask = row_mask[:, None] & col_mask[None, :]
        if STORE_C:
            c_ptrs = c_ptr + c_rows[:, None] * stride_cm + cols[None, :] * stride_cn
            tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)
            if ACTIVATION == "swiglu":
                tl.store(c_ptrs + M * stride_cn, acc_up.to(c_ptr.dtype.element_ty), mask=mask)
        if ACTIVATION != "":
            act = _activation(acc, acc_up, ACTIVATION)
            act_ptrs = act_ptr + c_rows[:, None] * stride_act + cols[None, :]
            tl.store(act_ptrs, act.to(act_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grouped_wgrad_kernel(
    x_ptr, x_idx_ptr, scale_ptr, y_ptr, y_idx_ptr, bounds_ptr, out_ptr,
    K, M,
    stride_xn, stride_xk, stride_yn, stride_ym, stride_oe, stride_ok, stride_om,
    GATHER_X: tl.constexpr, GATHER_Y: tl.constexpr, HAS_SCALE: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    expert = tl.program_id(0)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ms = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    k_mask, m_mask = ks < K, ms < M
    end = tl.load(bounds_ptr + expert + 1)
    row0 = tl.load(bounds_ptr + expert)
    acc = tl.zeros((BLOCK_K, BLOCK_M), dtype=ACC)
    while row0 < end:  # bounds loaded from memory: a while loop (triton 3.6)
        rows = row0 + tl.arange(0, BLOCK_R)
        row_mask = rows < end
        x_rows, y_rows = rows.to(tl.int64), rows.to(tl.int64)
        if GATHER_X:
            x_rows = tl.load(x_idx_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        if GATHER_Y:
            y_rows = tl.load(y_idx_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        x = tl.load(
            x_ptr + x_rows[:, None] * stride_xn + ks[None, :] * stride_xk,
            mask=row_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        if HAS_SCALE:
            scale = tl.load(scale_ptr + rows, mask=row_mask, other=0.0)
            x = (x.to(ACC) * scale.to(ACC)[:, None]).to(x_ptr.dtype.element_ty)
        y = tl.load(
            y_ptr + y_rows[:, None] * stride_yn + ms[None, :] * stride_ym,
            mask=row_mask[:, None] & m_mask[None, :],
            other=0.0,
        )
        acc = tl.dot(tl.trans(x), y, acc, input_precision=PRECISION, out_dtype=ACC)
        row0 += BLOCK_R
    out = out_ptr + expert.to(tl.int64) * stride_oe
    tl.store(
        out + ks[:, None] * stride_ok + ms[None, :] * stride_om,
        acc.to(out_ptr.dtype.element_ty),
        mask=k_mask[:, None] & m_mask[None, :],
    )


@triton.jit(do_not_specialize=["N"])
def _rowdot_kernel(
    x_ptr, x_idx_ptr, y_ptr, y_idx_ptr, out_ptr,
    N, stride_x, stride_y, K: tl.constexpr,
    GATHER_X: tl.constexpr, GATHER_Y: tl.constexpr, ACCUMULATE: tl.constexpr,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < N
    x_rows, y_rows = rows.to(tl.int64), rows.to(tl.int64)
    if GATHER_X:
        x_rows = tl.load(x_idx_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    if GATHER_Y:
        y_rows = tl.load(y_idx_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_R,), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        mask = row_mask[:, None] & (ks < K)[None, :]
        x = tl.load(x_ptr + x_rows[:, None] * stride_x + ks[None, :], mask=mask, other=0.0)
        y = tl.load(y_ptr + y_rows[:, None] * stride_y + ks[None, :], mask=mask, other=0.0)
        acc += tl.sum(x.to(ACC) * y.to(ACC), axis=1)
    if ACCUMULATE:
        acc += tl.load(out_ptr + rows, mask=row_mask, other=0.0).to(ACC)
    tl.store(out_ptr + rows, acc.to(out_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _combine_kernel(
    y_ptr, rowptr_ptr, out_ptr, D, stride_y, stride_out,
    ACC: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    slot = tl.load(rowptr_ptr + token)
    end = tl.load(rowptr_ptr + token + 1)
    acc = tl.zeros((BLOCK_D,), dtype=ACC)
    while slot < end:  # bounds loaded from memory: a while loop (triton 3.6)
        acc += tl.load(y_ptr + slot * stride_y + cols, mask=col_mask, other=0.0).to(ACC)
        slot += 1
    out = out_ptr + token.to(tl.int64) * stride_out + cols
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=col_mask)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _precision(dtype: torch.dtype) -> str:
    """fp32 products in full precision unless torch allows TF32 (as torch's own matmuls)."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _launch_options(tiles: Tiles) -> dict:
    return {"num_warps": tiles.num_warps, "num_stages": tiles.num_stages}


def gathered_mm(
    a: torch.Tensor,
    b_EKM: torch.Tensor,
    schedule: Schedule,
    tiles: Tiles,
    *,
    gather: bool = False,
    bias_EM: torch.Tensor | None = None,
    scale_N: torch.Tensor | None = None,
    scatter: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """(N, M) rows ``scale · (a_row · b[expert] + bias[expert])``.

    Args:
        a: (S, K) token rows read through ``schedule.token_N`` when ``gather``, else (N, K)
            grouped rows. b_EKM: (E, K, M), any strides (a transposed view is read as is).
        schedule: the plan's tiles, built for ``tiles.block_m``.
        bias_EM: (E, M) added per expert, or None. scale_N: (N,) multiplies each row, or None.
        scatter: write grouped row r at ``schedule.slot_N[r]`` (token-major order).
        out: (N, M) buffer to write into (every row is written), else a new one.
    """
    if out is None:
        out = a.new_empty(schedule.num_pairs, b_EKM.shape[2])
    options = {"gather": gather, "bias_EM": bias_EM, "scale_N": scale_N, "scatter": scatter}
    _launch_gathered_mm(a, b_EKM, schedule, tiles, out, None, "", **options)
    return out


def gathered_mm_act(
    x_SK: torch.Tensor,
    w1_EKF: torch.Tensor,
    schedule: Schedule,
    tiles: Tiles,
    activation: str,
    *,
    bias_EF: torch.Tensor | None = None,
    keep_pre: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The first layer in one kernel: (N, F) pre-activations ``h = gather(x)·w1 + b1`` and
    (N, H) activations ``act(h)``, the activation applied in the GEMM's epilogue (no second pass
    over ``h``).

    Args:
        x_SK: (S, K) token rows, read through ``schedule.token_N``. w1_EKF: (E, K, F); for
            ``swiglu`` F = 2H, ``[gate | up]``, else F = H. bias_EF: (E, F) or None.
        activation: a key of :data:`xmoe.experts.activations.ACTIVATION_FNS`.
        keep_pre: also write ``h`` (the backward's saved state); else it is never stored and
            None is returned in its place (inference).
    """
    gated = activation in GATED_ACTIVATIONS
    width = w1_EKF.shape[2] // 2 if gated else w1_EKF.shape[2]
    act_NH = x_SK.new_empty(schedule.num_pairs, width)
    pre_NF = x_SK.new_empty(schedule.num_pairs, w1_EKF.shape[2]) if keep_pre else None
    # gated: half the columns per product, so that a tile holds as many as an ungated one
    gated_tiles = replace(tiles, block_n=tiles.block_n // 2) if gated else tiles
    _launch_gathered_mm(
        x_SK, w1_EKF, schedule, gated_tiles, pre_NF, act_NH, activation, gather=True,
        bias_EM=bias_EF, width=width,
    )  # fmt: skip
    return pre_NF, act_NH


def _launch_gathered_mm(
    a, b_EKM, schedule: Schedule, tiles: Tiles, out, act_out, activation: str, *,
    gather: bool, bias_EM, scale_N=None, scatter: bool = False, width: int | None = None,
) -> None:  # fmt: skip
    """One launch of the gathered GEMM; ``width``: the output columns per product (``b``'s,
    or half of them when gated); ``out`` or ``act_out`` may be None (not written)."""
    depth, width = b_EKM.shape[1], b_EKM.shape[2] if width is None else width
    if schedule.num_pairs == 0:
        return
    if bias_EM is not None and bias_EM.stride(1) != 1:
        bias_EM = bias_EM.contiguous()
    c = act_out if out is None else out  # a placeholder pointer when out is not written
    grid = (schedule.tile_expert_T.shape[0], triton.cdiv(width, tiles.block_n))
    _gathered_mm_kernel[grid](
        a, schedule.token_N, b_EKM, bias_EM, scale_N, c, schedule.slot_N, act_out,
        schedule.tile_expert_T, schedule.tile_row_T, schedule.bounds_E1,
        width, depth,
        a.stride(0), a.stride(1), *b_EKM.stride(),
        0 if bias_EM is None else bias_EM.stride(0), c.stride(0), c.stride(1),
        0 if act_out is None else act_out.stride(0),
        GATHER_A=gather, SCATTER_C=scatter, HAS_BIAS=bias_EM is not None,
        HAS_SCALE=scale_N is not None, STORE_C=out is not None, ACTIVATION=activation,
        ACC=_acc(a.dtype), PRECISION=_precision(a.dtype),
        BLOCK_M=schedule.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        **_launch_options(tiles),
    )  # fmt: skip


def grouped_wgrad(
    x: torch.Tensor,
    y: torch.Tensor,
    schedule: Schedule,
    tiles: Tiles,
    *,
    gather_x: bool = False,
    gather_y: bool = False,
    scale_N: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """(E, K, M) ``Σ_{r in e} (scale[r] · x_row)ᵀ y_row`` per expert, zeros for an empty one.

    Args:
        x: (S, K) token rows when ``gather_x`` (read through ``schedule.token_N``), else (N, K).
        y: (S, M) token rows when ``gather_y``, else (N, M). scale_N: (N,) scales x's rows.
        out: (E, K, M) buffer to write into (all of it is written), else a new one.
    """
    num_experts = schedule.bounds_E1.shape[0] - 1
    depth, width = x.shape[1], y.shape[1]
    if out is None:
        out = x.new_empty(num_experts, depth, width)
    grid = (num_experts, triton.cdiv(depth, tiles.block_m), triton.cdiv(width, tiles.block_n))
    _grouped_wgrad_kernel[grid](
        x, schedule.token_N, scale_N, y, schedule.token_N, schedule.bounds_E1, out,
        depth, width,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1), *out.stride(),
        GATHER_X=gather_x, GATHER_Y=gather_y, HAS_SCALE=scale_N is not None,
        ACC=_acc(x.dtype), PRECISION=_precision(x.dtype),
        BLOCK_R=tiles.block_k, BLOCK_K=tiles.block_m, BLOCK_M=tiles.block_n,
        **_launch_options(tiles),
    )  # fmt: skip
    return out


def rowdot(
    x: torch.Tensor,
    y: torch.Tensor,
    out_N: torch.Tensor,
    *,
    x_idx_N: torch.Tensor | None = None,
    y_idx_N: torch.Tensor | None = None,
    accumulate: bool = False,
) -> torch.Tensor:
    """``out_N[r] (+)= <x[x_idx[r]], y[y_idx[r]]>`` (rows r when an index is None), in place.

    ``x`` and ``y`` have the same width and contiguous rows; ``out_N`` sets the result's dtype.
    """
    num_rows = out_N.shape[0]
    if num_rows == 0:
        return out_N
    x, y = _rows_contiguous(x), _rows_contiguous(y)
    grid = (triton.cdiv(num_rows, COLUMN_BLOCK // 4),)
    _rowdot_kernel[grid](
        x, x_idx_N, y, y_idx_N, out_N,
        num_rows, x.stride(0), y.stride(0), x.shape[1],
        GATHER_X=x_idx_N is not None, GATHER_Y=y_idx_N is not None, ACCUMULATE=accumulate,
        ACC=_acc(x.dtype), BLOCK_R=COLUMN_BLOCK // 4, BLOCK_K=COLUMN_BLOCK,
    )  # fmt: skip
    return out_N


def combine(y: torch.Tensor, schedule: Schedule, out: torch.Tensor | None = None) -> torch.Tensor:
    """(S, M) sums of the token-major rows ``y`` (N, M) of each token; zeros for a token without
    pairs. ``out``: (S, M) buffer to write into (every row is written), else a new one."""
    y = _rows_contiguous(y)
    if out is None:
        out = y.new_empty(schedule.num_tokens, y.shape[1])
    if schedule.num_tokens == 0:
        return out
    grid = (schedule.num_tokens, triton.cdiv(y.shape[1], COLUMN_BLOCK))
    _combine_kernel[grid](
        y, schedule.rowptr_S1, out, y.shape[1], y.stride(0), out.stride(0),
        ACC=_acc(y.dtype), BLOCK_D=COLUMN_BLOCK,
    )  # fmt: skip
    return out


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()
