"""Compiles every GPU configuration of ``xmoe.kernels.configs.TILES`` for sm_90 (and the
row-wise kernels, which take no configuration) and prints ``{"<config>/<kernel>": shared memory
bytes}`` as JSON. Run as a script by
``test_configs.py``, in a process without ``TRITON_INTERPRET`` (the interpreter's patched
language cannot generate code)."""

from __future__ import annotations

import json

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget

from xmoe.kernels import ops
from xmoe.kernels.configs import TILES, Tiles

GPU_CONFIGS = {
    # configuration: the operand dtype it is chosen for
    "sm90_16bit": "bf16",
    "sm90_fp32": "fp32",
    "default": "bf16",
}

_INDEX = "*i64"
WIDTH = 2048
"""The reduction width (a constexpr of the GEMM and row-dot kernels): the largest d_model of
the issue's benchmark sizes."""


def _gathered_mm(tiles: Tiles, dtype: str, activation: str = ""):
    """The forward's second GEMM: every option on (gather, bias, scale, scatter); with an
    ``activation``, the first GEMM (gathered, bias, the activation in its epilogue), with the
    columns per product that :func:`ops.gathered_mm_act` launches it with."""
    pointers = dict.fromkeys(("a_ptr", "b_ptr", "bias_ptr", "c_ptr", "act_ptr"), f"*{dtype}")
    pointers |= {"scale_ptr": "*fp32"} | dict.fromkeys(
        ("a_idx_ptr", "c_idx_ptr", "tile_expert_ptr", "tile_row_ptr", "bounds_ptr"), _INDEX
    )
    block_n = tiles.block_n // 2 if activation == "swiglu" else tiles.block_n
    constexprs = dict(
        GATHER_A=True, SCATTER_C=not activation, HAS_BIAS=True, HAS_SCALE=not activation,
        STORE_C=True, ACTIVATION=activation, ACC=tl.float32, PRECISION="ieee", K=WIDTH,
        BLOCK_M=tiles.block_m, BLOCK_N=block_n, BLOCK_K=tiles.block_k,
    )  # fmt: skip
    return ops._gathered_mm_kernel, pointers, constexprs


def _gathered_mm_gelu(tiles: Tiles, dtype: str):
    """The forward's first GEMM, plain experts (every elementwise activation compiles alike)."""
    return _gathered_mm(tiles, dtype, "gelu")


def _gathered_mm_swiglu(tiles: Tiles, dtype: str):
    """The forward's first GEMM, gated experts: two accumulators, gate and up."""
    return _gathered_mm(tiles, dtype, "swiglu")


def _grouped_wgrad(tiles: Tiles, dtype: str):
    """The weight gradient with both operands gathered and x scaled."""
    pointers = dict.fromkeys(("x_ptr", "y_ptr", "out_ptr"), f"*{dtype}")
    pointers |= {"scale_ptr": "*fp32"} | dict.fromkeys(
        ("x_idx_ptr", "y_idx_ptr", "bounds_ptr"), _INDEX
    )
    constexprs = dict(
        GATHER_X=True, GATHER_Y=True, HAS_SCALE=True, ACC=tl.float32, PRECISION="ieee",
        BLOCK_R=tiles.block_k, BLOCK_K=tiles.block_m, BLOCK_M=tiles.block_n,
    )  # fmt: skip
    return ops._grouped_wgrad_kernel, pointers, constexprs


def _rowdot(tiles: Tiles, dtype: str):
    """The routing-weight gradient's row dot, both sides gathered, accumulating."""
    pointers = dict.fromkeys(("x_ptr", "y_ptr"), f"*{dtype}") | {"out_ptr": "*fp32"}
    pointers |= dict.fromkeys(("x_idx_ptr", "y_idx_ptr"), _INDEX)
    constexprs = dict(
        GATHER_X=True, GATHER_Y=True, ACCUMULATE=True, ACC=tl.float32, K=WIDTH,
        BLOCK_R=ops.COLUMN_BLOCK // 4, BLOCK_K=ops.COLUMN_BLOCK,
    )  # fmt: skip
    return ops._rowdot_kernel, pointers, constexprs


def _combine(tiles: Tiles, dtype: str):
    """The per-token sum of token-major rows."""
    pointers = dict.fromkeys(("y_ptr", "out_ptr"), f"*{dtype}") | {"rowptr_ptr": _INDEX}
    return ops._combine_kernel, pointers, dict(ACC=tl.float32, BLOCK_D=ops.COLUMN_BLOCK)


def compile_for_sm90(config: str, kernel) -> int:
    """Shared memory bytes of ``kernel`` compiled with the configuration ``config``."""
    tiles = TILES[config]
    fn, pointers, constexprs = kernel(tiles, GPU_CONFIGS[config])
    signature = {
        name: pointers.get(name, "constexpr" if name in constexprs else "i32")
        for name in fn.arg_names
    }
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    options = {"num_warps": tiles.num_warps, "num_stages": tiles.num_stages}
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    assert "cubin" in compiled.asm, f"{config}/{fn.__name__}: no cubin"
    return compiled.metadata.shared


if __name__ == "__main__":
    kernels = (_gathered_mm, _gathered_mm_gelu, _gathered_mm_swiglu, _grouped_wgrad)
    shared = {
        f"{config}/{kernel.__name__}": compile_for_sm90(config, kernel)
        for config in GPU_CONFIGS
        for kernel in kernels
    }
    shared |= {
        f"sm90_16bit/{k.__name__}": compile_for_sm90("sm90_16bit", k) for k in (_rowdot, _combine)
    }
    print(json.dumps(shared))
