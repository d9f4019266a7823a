"""Triton kernels for the expert FFN (the ``"triton"`` entry of :data:`xmoe.registry.EXPERT_FFN`).

ScatterMoE's design: the grouped GEMM reads its A operand straight from the token rows through
the plan's sorted pair index (no gathered copy), and writes either grouped rows or, with the
routing weight applied in its epilogue, rows in token-major order that a combine kernel sums per
token (no atomics). The backward is the same gathered GEMM with transposed weights, grouped
weight-gradient GEMMs and a fused row dot for the routing weights.

This package imports without triton: :mod:`xmoe.kernels.configs` is plain Python, and
:mod:`xmoe.kernels.ffn` imports the kernels (:mod:`xmoe.kernels.ops`) only when it runs them.
On CPU the kernels run under triton's interpreter (``TRITON_INTERPRET=1`` set before the first
run), which is how the tests check them without a GPU.
"""

from __future__ import annotations

from xmoe.kernels.configs import TILES, Tiles, tiles_for, triton_available

__all__ = ["TILES", "Tiles", "tiles_for", "triton_available"]
