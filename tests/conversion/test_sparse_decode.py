"""The batch-1 sparse decode MLP against the dense computation in float64: random, empty and full
masks at odd sizes, one token (the embedding_bag path) and several (the masked GEMM path)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.conversion.test_sparsify import tiny_llama
from xmoe.conversion import UnsupportedModelError
from xmoe.conversion.sparse_decode import (
    SparseDecodeMLP,
    decode_mlps,
    keeping_threshold,
    kept_rows_sum,
)

HIDDEN, FFN = 13, 29  # odd sizes: no power-of-two row lengths or bag splits


def dense_weights(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random float64 gate and up (FFN, HIDDEN) and down (HIDDEN, FFN): nn.Linear layout."""
    generator = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(shape, generator=generator, dtype=torch.float64)
        for shape in ((FFN, HIDDEN), (FFN, HIDDEN), (HIDDEN, FFN))
    )


def masked_dense(x_SD, weights, x_threshold, h_threshold, x_scale=1.0, h_scale=1.0):
    """The masked MLP computed densely from the nn.Linear layout, token by token."""
    gate, up, down = weights
    x_SD = torch.where(x_SD.abs() * x_scale > x_threshold, x_SD, 0)
    h_SI = F.silu(x_SD @ gate.T) * (x_SD @ up.T)
    h_SI = torch.where(h_SI.abs() * h_scale > h_threshold, h_SI, 0)
    return h_SI @ down.T


def ones(scale: torch.Tensor | None) -> torch.Tensor | float:
    """A score scale for the reference: 1 when the MLP has none."""
    return 1.0 if scale is None else scale


def random_input(tokens: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(
        tokens, HIDDEN, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )


@pytest.mark.parametrize("kept", [0.0, 0.2, 0.5, 0.9, 1.0])
def test_kept_rows_sum_one_token_is_the_masked_sum(kept):
    generator = torch.Generator().manual_seed(2)
    rows_NR = torch.randn(37, 23, generator=generator, dtype=torch.float64)
    a_SN = torch.randn(1, 37, generator=generator, dtype=torch.float64)
    keep_SN = torch.rand(1, 37, generator=generator) < kept
    expected = sum(
        (a_SN[0, n] * rows_NR[n] for n in keep_SN[0].nonzero()[:, 0]),
        torch.zeros(23, dtype=torch.float64),
    )
    got = kept_rows_sum(a_SN, keep_SN, rows_NR)
    assert got.shape == (1, 23)
    torch.testing.assert_close(got[0], expected, rtol=0, atol=1e-12)


def test_one_token_reads_only_kept_rows():
    """The dropped rows are NaN: the decode path never reads them, so its sum stays finite."""
    generator = torch.Generator().manual_seed(3)
    rows_NR = torch.randn(31, 17, generator=generator, dtype=torch.float64)
    a_SN = torch.randn(1, 31, generator=generator, dtype=torch.float64)
    keep_SN = torch.rand(1, 31, generator=generator) < 0.5
    poisoned = rows_NR.clone()
    poisoned[~keep_SN[0]] = float("nan")
    torch.testing.assert_close(
        kept_rows_sum(a_SN, keep_SN, poisoned),
        kept_rows_sum(a_SN.expand(2, -1), keep_SN.expand(2, -1), rows_NR)[:1],
        rtol=0,
        atol=1e-12,
    )


@pytest.mark.parametrize("kept", [0.0, 0.35, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("scaled", [False, True])
def test_one_token_matches_masked_dense(kept, scaled):
    """Thresholds keeping ``kept`` of each site, on |a| (TEAL) or on |a| times random
    per-channel scales (WINA-like)."""
    weights = dense_weights()
    generator = torch.Generator().manual_seed(4)
    x_scale = torch.rand(HIDDEN, generator=generator, dtype=torch.float64) if scaled else None
    h_scale = torch.rand(FFN, generator=generator, dtype=torch.float64) if scaled else None
    x_SD = random_input(1)
    x_t = keeping_threshold(x_SD.abs() * ones(x_scale), kept)
    identity = torch.eye(FFN, dtype=torch.float64)
    h_SI = masked_dense(x_SD, (weights[0], weights[1], identity), x_t, 0, ones(x_scale))
    h_t = keeping_threshold(h_SI.abs() * ones(h_scale), kept)
    mlp = SparseDecodeMLP(*weights, x_t, h_t, x_scale, h_scale)
    expected = masked_dense(x_SD, weights, x_t, h_t, ones(x_scale), ones(h_scale))
    torch.testing.assert_close(mlp(x_SD), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(mlp(x_SD[0]), expected[0], rtol=0, atol=1e-12)
    assert expected.any() == (kept > 0)


def test_zero_thresholds_are_the_dense_mlp_and_inf_keeps_nothing():
    weights = dense_weights(5)
    x = random_input(1, seed=6)
    gate, up, down = weights
    dense = (F.silu(x @ gate.T) * (x @ up.T)) @ down.T
    torch.testing.assert_close(SparseDecodeMLP(*weights)(x), dense, rtol=0, atol=1e-12)
    assert not SparseDecodeMLP(*weights, x_threshold=float("inf"))(x).any()
    assert not SparseDecodeMLP(*weights, h_threshold=float("inf"))(x).any()


def test_prefill_matches_decoding_token_by_token():
    weights = dense_weights(7)
    mlp = SparseDecodeMLP(*weights, x_threshold=0.6, h_threshold=0.4)
    x = random_input(6, seed=8).reshape(2, 3, HIDDEN)
    prefill = mlp(x)
    assert prefill.shape == (2, 3, HIDDEN)
    one_by_one = torch.stack([mlp(token) for token in x.reshape(-1, HIDDEN)]).reshape(2, 3, HIDDEN)
    torch.testing.assert_close(prefill, one_by_one, rtol=0, atol=1e-12)
    torch.testing.assert_close(prefill, masked_dense(x, weights, 0.6, 0.4), rtol=0, atol=1e-12)


def test_keeping_threshold_keeps_the_fraction():
    scores = torch.tensor([0.5, 3.0, 1.0, 2.0])
    assert keeping_threshold(scores, 0.5) == 1.5
    assert keeping_threshold(scores, 1.0) == 0.0
    assert keeping_threshold(scores, 0.0) == float("inf")
    with pytest.raises(ValueError, match=r"kept=1.5 must be in \[0, 1\]"):
        keeping_threshold(scores, 1.5)


def test_set_thresholds_changes_the_masks():
    weights = dense_weights(9)
    x = random_input(1, seed=10)
    mlp = SparseDecodeMLP(*weights)
    mlp.set_thresholds(0.5, 0.3)
    torch.testing.assert_close(mlp(x), masked_dense(x, weights, 0.5, 0.3), rtol=0, atol=1e-12)


def test_decode_mlps_of_a_llama_are_its_dense_mlps():
    model = tiny_llama()
    x = torch.randn(1, 1, model.config.hidden_size, dtype=torch.float64)
    dense_mlps = [layer.mlp for layer in model.model.layers]
    sparse = decode_mlps(model)
    assert len(sparse) == len(dense_mlps)
    for dense_mlp, sparse_mlp in zip(dense_mlps, sparse, strict=True):
        torch.testing.assert_close(sparse_mlp(x), dense_mlp(x), rtol=0, atol=1e-12)


def test_decode_mlps_refuses_an_unsupported_model():
    with pytest.raises(UnsupportedModelError, match="is not supported"):
        decode_mlps(torch.nn.Linear(2, 2))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"x_threshold": -0.1}, r"x_threshold=-0.1 must be >= 0"),
        ({"h_threshold": float("nan")}, r"h_threshold=nan must be >= 0"),
        ({"x_scale_D": torch.ones(HIDDEN + 1)}, r"x_scale_D must be \(13,\)"),
        ({"h_scale_I": -torch.ones(FFN)}, r"h_scale_I must be \(29,\), finite and >= 0"),
    ],
)
def test_bad_options_are_named(changes, message):
    with pytest.raises(ValueError, match=message):
        SparseDecodeMLP(*dense_weights(), **changes)


def test_bad_shapes_are_named():
    gate, up, down = dense_weights()
    with pytest.raises(ValueError, match=r"need gate and up \(I, D\) and down \(D, I\)"):
        SparseDecodeMLP(gate, up, down.T)
    with pytest.raises(ValueError, match="last dimension is 12, this MLP's hidden size 13"):
        SparseDecodeMLP(gate, up, down)(torch.zeros(1, 12, dtype=torch.float64))


def test_one_token_backward_after_a_first_call_in_inference_mode(monkeypatch):
    """The single bag's offsets are made once; made inside inference mode they must still be a
    normal tensor, which autograd may save for a later backward."""
    import xmoe.conversion.sparse_decode as sparse_decode

    monkeypatch.setattr(sparse_decode, "_ONE_BAG", {})
    rows_NR = torch.randn(5, 3, dtype=torch.float64)
    keep_SN = torch.tensor([[True, False, True, True, False]])
    with torch.inference_mode():
        kept_rows_sum(torch.ones(1, 5, dtype=torch.float64), keep_SN, rows_NR)
    a_SN = torch.ones(1, 5, dtype=torch.float64, requires_grad=True)
    kept_rows_sum(a_SN, keep_SN, rows_NR).sum().backward()
    torch.testing.assert_close(a_SN.grad[0], rows_NR.sum(dim=1) * keep_SN[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("threads", [1, 2])
def test_one_token_sum_of_many_kept_rows_is_the_masked_sum(threads):
    """A layer-sized sum (hundreds of kept rows) on one or two threads is the masked sum, and
    the rows it drops are never read (NaN there would show)."""
    generator = torch.Generator().manual_seed(11)
    rows_NR = torch.randn(601, 257, generator=generator, dtype=torch.float64)
    a_SN = torch.randn(1, 601, generator=generator, dtype=torch.float64)
    keep_SN = torch.rand(1, 601, generator=generator) < 0.5
    expected = a_SN.masked_fill(~keep_SN, 0) @ rows_NR
    rows_NR[~keep_SN[0]] = float("nan")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = kept_rows_sum(a_SN, keep_SN, rows_NR)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
