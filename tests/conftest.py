"""Session-wide test setup.

Without a GPU the kernel tests run the Triton kernels on CPU tensors under triton's interpreter,
which triton reads when the kernels are decorated: so ``TRITON_INTERPRET=1`` is set here, in the
root conftest, before any test module (``tests/experts`` collects every registered expert FFN,
the Triton one included) imports :mod:`xmoe.kernels.ops`. (The interpreter runs programs one at a
time, does no bounds checking and ignores ``tl.device_assert``: the tests pad buffers with
sentinels instead.) With a GPU the kernels compile, the interpreter tests skip and
``tests/kernels/test_ffn_cuda.py`` runs the kernels on the device."""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
