"""The kernel tests run the Triton kernels on CPU tensors under triton's interpreter, which
triton reads when the kernels are decorated: so ``TRITON_INTERPRET=1`` is set here, at
collection, before any test imports :mod:`xmoe.kernels.ops`. (The interpreter runs programs one
at a time, does no bounds checking and ignores ``tl.device_assert``: the tests pad buffers with
sentinels instead.)"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"
