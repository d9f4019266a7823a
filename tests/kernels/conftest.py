"""Without a GPU the kernel tests run the Triton kernels on CPU tensors under triton's
interpreter, which triton reads when the kernels are decorated: so ``TRITON_INTERPRET=1`` is set
here, at collection, before any test imports :mod:`xmoe.kernels.ops`. (The interpreter runs
programs one at a time, does no bounds checking and ignores ``tl.device_assert``: the tests pad
buffers with sentinels instead.) With a GPU the kernels compile, the interpreter tests skip
and ``test_ffn_cuda.py`` runs the kernels on the device."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
