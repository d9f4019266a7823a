"""expert_output_norms: the Gram form against the experts' outputs computed in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from xmoe.routing.expert_norms import down_grams, expert_output_norms, gram_norms


def weights(experts: int, d_model: int, d_expert: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """(w_gate, w_up, w_down) of random experts, float64."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(experts, d_model, d_expert)] * 2 + [(experts, d_expert, d_model)]
    return tuple(torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes)


def reference_norms(x_SD, w_gate, w_up, w_down) -> torch.Tensor:
    """(S, E) the norm of each expert's output, materialised token by token in float64."""
    rows = []
    for x in x_SD.to(torch.float64):
        row = []
        for gate, up, down in zip(w_gate, w_up, w_down, strict=True):
            h = F.silu(x @ gate.double()) * (x @ up.double())
            row.append(torch.linalg.vector_norm(h @ down.double()))
        rows.append(torch.stack(row))
    return torch.stack(rows) if rows else torch.zeros(0, w_gate.shape[0], dtype=torch.float64)


@pytest.mark.parametrize("gram", [None, True, False])
@pytest.mark.parametrize(
    ("tokens", "d_model", "d_expert", "chunk"),
    [(10, 24, 1, 3), (10, 24, 4, 4), (10, 24, 16, 1024), (10, 12, 16, 7), (1, 24, 4, 3)],
)
def test_norms_match_the_float64_outputs(tokens, d_model, d_expert, chunk, gram):
    w_gate, w_up, w_down = weights(5, d_model, d_expert)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, d_model, generator=gen, dtype=torch.float64)
    expected = reference_norms(x, w_gate, w_up, w_down)
    got = expert_output_norms(x, w_gate, w_up, w_down, chunk_tokens=chunk, gram=gram)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=0)
    got32 = expert_output_norms(
        x.float(), w_gate.float(), w_up.float(), w_down.float(), chunk_tokens=chunk, gram=gram
    )
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), expected, rtol=1e-4, atol=1e-5 * expected.max())


def test_no_tokens_give_an_empty_result():
    w_gate, w_up, w_down = weights(5, 24, 4)
    got = expert_output_norms(torch.zeros(0, 24, dtype=torch.float64), w_gate, w_up, w_down)
    assert got.shape == (0, 5) and got.dtype == torch.float64


def test_cancelling_outputs_give_small_norms_not_nan():
    """Two down rows equal but for 1e-12 and activations (t, -t): the true norms are ~1e-12·|t|,
    below the Gram form's rounding, which comes out negative for most tokens; they must read
    as small non-negative norms, not NaN."""
    gen = torch.Generator().manual_seed(3)
    row = torch.randn(1, 1, 32, generator=gen, dtype=torch.float64)
    delta = torch.randn(1, 1, 32, generator=gen, dtype=torch.float64)
    w_down = torch.cat([row, row + 1e-12 * delta], 1)
    sign = torch.tensor([1.0, -1.0], dtype=torch.float64)
    h_EHS = sign[:, None] * torch.randn(1, 1, 256, generator=gen, dtype=torch.float64)
    norms = gram_norms(h_EHS, down_grams(w_down))
    assert torch.isfinite(norms).all() and (norms >= 0).all()
    assert float(norms.max()) <= 1e-6 * float(h_EHS.abs().max() * row.norm())


class _LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any operation returns."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, tuple | list) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.numel = max(self.numel, tensor.numel())
        return out


def test_small_experts_never_materialise_their_outputs():
    """Below D neurons per expert no (S, E, D) tensor of outputs exists (the slow part at H=4):
    nothing larger than the inputs, the weights or the activations is made."""
    tokens, d_model, d_expert, experts = 64, 32, 4, 16
    w_gate, w_up, w_down = weights(experts, d_model, d_expert)
    x = torch.randn(tokens, d_model, dtype=torch.float64)
    with _LargestTensor() as largest:
        expert_output_norms(x, w_gate, w_up, w_down)
    assert largest.numel <= max(tokens, d_model) * experts * d_expert < tokens * experts * d_model


@pytest.mark.parametrize("chunk", [0, -1])
def test_chunk_tokens_below_one_is_refused(chunk):
    w_gate, w_up, w_down = weights(5, 24, 4)
    with pytest.raises(ValueError, match=f"chunk_tokens={chunk} must be >= 1"):
        expert_output_norms(torch.zeros(3, 24, dtype=torch.float64), w_gate, w_up, w_down, chunk)
