"""Every shipped GPU configuration of ``xmoe.kernels.configs.TILES`` compiles for sm_90 (H100/H200)
on this CPU-only machine, within the H200's shared memory: CI rejects a configuration the GPU
would refuse. Compiling needs no GPU (triton ships ptxas); about 1-5 s per kernel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from xmoe.kernels.configs import SM90_SHARED_MEMORY_BYTES, TILES, tiles_for

pytest.importorskip("triton")

COMPILER = Path(__file__).with_name("sm90_compiler.py")


def test_every_gpu_configuration_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, str(COMPILER)], env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    shared = json.loads(result.stdout.strip().splitlines()[-1])
    gpu_configs = set(TILES) - {"interpreter"}
    assert {name.split("/")[0] for name in shared} == gpu_configs
    too_big = {name: size for name, size in shared.items() if size > SM90_SHARED_MEMORY_BYTES}
    assert not too_big, f"over the H200's {SM90_SHARED_MEMORY_BYTES} bytes of shared memory"


def test_the_cpu_runs_the_interpreter_configuration():
    assert tiles_for(torch.device("cpu"), torch.float32) == TILES["interpreter"]
