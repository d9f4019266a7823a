"""``xmoe::triton_ffn`` as ``torch.compile`` sees it: one custom op with a fake implementation
and a registered autograd formula (its backward another op), under triton's CPU interpreter
(``conftest.py``)."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.test_ffn import NAMES, _operands
from xmoe.kernels.configs import TILES, interpreting
from xmoe.kernels.schedule import build_schedule

pytest.importorskip("triton")
from xmoe.kernels.ffn import _op_args, triton_ffn  # after the skip: it registers the ops

pytestmark = pytest.mark.skipif(
    not interpreting(), reason="CPU tensors under triton's interpreter, off where a GPU is"
)


def _op_inputs(case: str, activation: str):
    """The differentiable inputs (float64, requiring gradients) and the rest of the op's
    arguments for ``case``'s plan."""
    x, weights, plan, weight_N = _operands(case, activation, bias=True)
    schedule, tiles = _op_args(
        build_schedule(plan, TILES["interpreter"].block_m), TILES["interpreter"]
    )
    return [x, weight_N, *weights.tensors()], (schedule, activation, tiles)


def _output_and_grads(fn, leaves, rest):
    out_SD = fn(*leaves, *rest)
    cotangent = torch.randn(
        out_SD.shape, generator=torch.Generator().manual_seed(9), dtype=out_SD.dtype
    )
    return out_SD, torch.autograd.grad((out_SD * cotangent).sum(), leaves)


def _ffn(x, weight_N, w1, b1, w2, b2, schedule, activation, tiles):
    return torch.relu(triton_ffn(x, weight_N, w1, b1, w2, b2, schedule, activation, tiles, True)[0])


def test_torch_compile_traces_the_op_whole_and_matches_eager():
    """``fullgraph=True``: no graph break at the kernels; forward and every gradient equal
    (gated experts, bias, uneven loads and empty experts)."""
    leaves, rest = _op_inputs("uneven", "swiglu")
    compiled = torch.compile(_ffn, backend="aot_eager", fullgraph=True)
    out, grads = _output_and_grads(compiled, leaves, rest)
    ref_out, ref_grads = _output_and_grads(_ffn, leaves, rest)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    for name, got, want in zip(NAMES, grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=name)


def test_opcheck_passes():
    """Schema, fake implementation, autograd registration and AOT dispatch with dynamic
    shapes (``torch.library.opcheck``), on a one-token plan."""
    leaves, (schedule, activation, tiles) = _op_inputs("one_token", "swiglu")
    torch.library.opcheck(triton_ffn, (*leaves, schedule, activation, tiles, True))
