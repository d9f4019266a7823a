"""Tile configurations of the Triton kernels, by device, in plain Python (no triton import).

Block sizes are chosen here per call, not by ``triton.autotune``: the row tiling of the grouped
GEMM fixes the tile schedule built in torch before the launch (:mod:`xmoe.kernels.ffn`), and a
fixed table compiles once per dtype and width, whatever the batch size. Every entry of
:data:`TILES` is compiled for sm_90 in the tests (shared memory within the H200's limit).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tiles:
    """One launch configuration.

    Attributes:
        block_m: grouped rows per GEMM tile (also the rows of one tile of the schedule).
        block_n: output columns per GEMM tile.
        block_k: reduction depth per step (rows per step of the weight-gradient kernel).
        num_warps, num_stages: triton's launch options (ignored by the interpreter).
    """

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2


TILES: dict[str, Tiles] = {
    # Hopper, bf16/fp16: 128x128 tiles, 3 stages of 32 KiB each in shared memory
    "sm90_16bit": Tiles(128, 128, 64, num_warps=8, num_stages=3),
    # Hopper, fp32: half the depth, so that 3 stages stay at 64 KiB of shared memory
    "sm90_fp32": Tiles(64, 128, 32, num_warps=8, num_stages=3),
    # other GPUs: small enough for any card's shared memory
    "default": Tiles(64, 64, 32, num_warps=4, num_stages=2),
    # the CPU interpreter: big tiles, few programs (each program is a numpy call sequence)
    "interpreter": Tiles(64, 64, 64),
}
"""Every shipped configuration by name."""

SM90_SHARED_MEMORY_BYTES = 232448
"""The most shared memory one block may use on sm_90 (H100/H200: 227 KiB)."""


def tiles_for(device: torch.device, dtype: torch.dtype) -> Tiles:
    """The configuration for operands of ``dtype`` on ``device``."""
    if device.type != "cuda":
        return TILES["interpreter"]
    if torch.cuda.get_device_capability(device) >= (9, 0):
        return TILES["sm90_fp32" if dtype == torch.float32 else "sm90_16bit"]
    return TILES["default"]


def triton_available() -> bool:
    """Whether triton is installed (without importing it)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except ValueError:  # sys.modules["triton"] is None: imports of it are blocked
        return False


def interpreting() -> bool:
    """Whether triton's CPU interpreter is on (it must be before the kernels are imported)."""
    return os.environ.get("TRITON_INTERPRET") == "1"
