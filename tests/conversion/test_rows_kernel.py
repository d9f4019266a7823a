"""The native kept-rows sum and dot products (xmoe.conversion.rows_kernel) against float64
references and against their torch fallbacks (embedding_bag, a masked GEMV): random, empty,
full and single-row masks, strided inputs, the fallbacks (float64, autograd, strided rows, a
forced kernel) and a failed build. The library is built
once per cache directory (a fraction of a second); the tests that need it skip without a C
compiler."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch

from xmoe.conversion import rows_kernel
from xmoe.conversion.rows_kernel import native_kept_rows_dot, native_kept_rows_sum, using_kernel
from xmoe.conversion.sparse_decode import kept_rows_dot, kept_rows_sum

ROWS, WIDTH = 37, 23  # odd: eight-row passes plus a remainder, no vector-width row length


@pytest.fixture
def native():
    """The built kernel (skips without a compiler); the loaded library is kept for the session."""
    if rows_kernel._library() is None:
        pytest.skip("no C compiler: the native kept-rows sum cannot be built here")


@pytest.fixture
def fresh_library(tmp_path, monkeypatch):
    """An empty cache directory and no loaded library; the session's library afterwards."""
    monkeypatch.setenv("XMOE_CACHE_DIR", str(tmp_path))
    rows_kernel._library.cache_clear()
    yield tmp_path / "ops"
    rows_kernel._library.cache_clear()


def operands(keep: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 ``a`` (1, ROWS), ``keep`` (1, ROWS) and ``rows`` (ROWS, WIDTH); ``keep``: ``none``,
    ``all``, ``one`` (a single row) or ``half`` (random)."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(1, ROWS, generator=generator)
    rows = torch.randn(ROWS, WIDTH, generator=generator)
    masks = {
        "none": torch.zeros(1, ROWS, dtype=torch.bool),
        "all": torch.ones(1, ROWS, dtype=torch.bool),
        "one": torch.arange(ROWS)[None] == 17,
        "half": torch.rand(1, ROWS, generator=generator) < 0.5,
    }
    return a, masks[keep], rows


def masked_sum(a: torch.Tensor, keep: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The float64 reference: ``(a ⊙ keep) @ rows``."""
    return (torch.where(keep, a, 0).double() @ rows.double()).float()


@pytest.mark.parametrize("keep", ["none", "all", "one", "half"])
def test_native_sum_equals_the_masked_sum_and_embedding_bag(native, keep):
    a, keep_mask, rows = operands(keep)
    got = native_kept_rows_sum(a, keep_mask, rows)
    assert got is not None and got.shape == (1, WIDTH) and got.dtype == torch.float32
    torch.testing.assert_close(got, masked_sum(a, keep_mask, rows), rtol=0, atol=1e-5)
    with using_kernel("embedding_bag"):
        assert native_kept_rows_sum(a, keep_mask, rows) is None
        fallback = kept_rows_sum(a, keep_mask, rows)
    torch.testing.assert_close(got, fallback, rtol=0, atol=1e-5)
    if keep == "none":
        assert torch.equal(got, torch.zeros(1, WIDTH))


def test_native_sum_reads_only_the_kept_rows(native):
    a, keep, rows = operands("half", seed=1)
    poisoned = rows.clone()
    poisoned[~keep[0]] = float("nan")
    torch.testing.assert_close(
        native_kept_rows_sum(a, keep, poisoned), masked_sum(a, keep, rows), rtol=0, atol=1e-5
    )


def test_strided_inputs_are_read_by_value(native):
    a, keep, rows = operands("half", seed=2)
    a_strided = torch.stack([a[0], -a[0]], dim=1).reshape(1, -1)[:, ::2]
    keep_strided = keep.repeat_interleave(2, dim=1)[:, ::2]
    assert not a_strided.is_contiguous() and not keep_strided.is_contiguous()
    torch.testing.assert_close(
        native_kept_rows_sum(a_strided, keep_strided, rows),
        masked_sum(a, keep, rows),
        rtol=0,
        atol=1e-5,
    )


def test_what_the_kernel_does_not_compute_falls_back_to_embedding_bag(native):
    """float64, strided rows and a gradient to record are summed by kept_rows_sum's
    embedding_bag, exactly (float64) and differentiably."""
    a, keep, rows = operands("half", seed=3)
    a64, rows64 = a.double(), rows.double()
    assert native_kept_rows_sum(a64, keep, rows64) is None
    torch.testing.assert_close(
        kept_rows_sum(a64, keep, rows64), torch.where(keep, a64, 0) @ rows64, rtol=0, atol=1e-12
    )
    strided = rows.T.contiguous().T
    assert native_kept_rows_sum(a, keep, strided) is None
    a_grad = a.clone().requires_grad_()
    assert native_kept_rows_sum(a_grad, keep, rows) is None
    kept_rows_sum(a_grad, keep, rows).sum().backward()
    torch.testing.assert_close(a_grad.grad, torch.where(keep, rows.sum(dim=1), 0))


def test_a_mask_of_another_size_is_refused_by_name(native):
    a, keep, rows = operands("half")
    with pytest.raises(ValueError, match=r"sum: a \(1, 36\) .* need 37 entries and one bool per"):
        native_kept_rows_sum(a[:, 1:], keep[:, 1:], rows)
    x = torch.randn(1, WIDTH)
    with pytest.raises(ValueError, match=r"dot: x \(1, 22\) .* need 23 entries .* \(37, 23\)"):
        native_kept_rows_dot(x[:, 1:], keep, rows)
    with pytest.raises(ValueError, match=r"dot: .* keep \(1, 36\) \(torch.bool\)"):
        native_kept_rows_dot(x, keep[:, 1:], rows)
    with pytest.raises(ValueError, match=r"keep \(1, 37\) \(torch.float32\)"):
        native_kept_rows_dot(x, keep.float(), rows)


def masked_dots(x: torch.Tensor, keep: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The float64 reference, row by row: ``x · rows[i]`` for a kept row i, else 0."""
    dots = [float(x[0].double() @ row.double()) if kept else 0.0
            for row, kept in zip(rows, keep[0].tolist(), strict=True)]  # fmt: skip
    return torch.tensor([dots], dtype=torch.float32)


@pytest.mark.parametrize("keep", ["none", "all", "one", "half"])
@pytest.mark.parametrize("width", [WIDTH, 16, 40])  # a remainder only, one pass, both
def test_native_dots_equal_the_per_row_reference_and_read_only_kept_rows(native, keep, width):
    _, keep_mask, rows = operands(keep, seed=5)
    rows = torch.randn(ROWS, width, generator=torch.Generator().manual_seed(6))
    x = torch.randn(1, width, generator=torch.Generator().manual_seed(7))
    poisoned = rows.clone()
    poisoned[~keep_mask[0]] = float("nan")
    got = native_kept_rows_dot(x, keep_mask, poisoned)
    assert got is not None and got.shape == (1, ROWS) and got.dtype == torch.float32
    torch.testing.assert_close(got, masked_dots(x, keep_mask, rows), rtol=0, atol=1e-5)
    with using_kernel("embedding_bag"):  # the fallback: one GEMV, the dropped dots zeroed
        assert native_kept_rows_dot(x, keep_mask, rows) is None
        torch.testing.assert_close(kept_rows_dot(x, keep_mask, rows), got, rtol=0, atol=1e-5)
    x64, rows64 = x.double(), rows.double()  # and float64, which the kernel leaves to torch
    assert native_kept_rows_dot(x64, keep_mask, rows64) is None
    torch.testing.assert_close(
        kept_rows_dot(x64, keep_mask, rows64).float(), got, rtol=0, atol=1e-5
    )


def test_dots_of_several_tokens_mask_each_tokens_rows():
    generator = torch.Generator().manual_seed(8)
    x, rows = (
        torch.randn(3, WIDTH, generator=generator),
        torch.randn(ROWS, WIDTH, generator=generator),
    )
    keep = torch.rand(3, ROWS, generator=generator) < 0.5
    expected = torch.cat([masked_dots(x[s : s + 1], keep[s : s + 1], rows) for s in range(3)])
    torch.testing.assert_close(kept_rows_dot(x, keep, rows), expected, rtol=0, atol=1e-5)


def test_an_unknown_kernel_is_refused_by_name(monkeypatch):
    a, keep, rows = operands("half")
    monkeypatch.setenv("XMOE_DECODE_KERNEL", "mkl")
    with pytest.raises(ValueError, match="XMOE_DECODE_KERNEL='mkl': must be one of native, emb"):
        kept_rows_sum(a, keep, rows)
    monkeypatch.setenv("XMOE_DECODE_KERNEL", "embedding_bag")
    assert native_kept_rows_sum(a, keep, rows) is None


def test_a_failed_build_falls_back_with_one_warning(fresh_library, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    a, keep, rows = operands("half", seed=4)
    with pytest.warns(UserWarning, match="native kept-rows sum is unavailable .*nonexistent/cc"):
        got = kept_rows_sum(a, keep, rows)
    torch.testing.assert_close(got, masked_sum(a, keep, rows), rtol=0, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the reason is given once per process
        assert native_kept_rows_sum(a, keep, rows) is None
    assert not list(fresh_library.glob("*"))  # no partial library left behind


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_a_damaged_cached_library_is_rebuilt(fresh_library, monkeypatch):
    monkeypatch.delenv("CC", raising=False)
    damaged = fresh_library / f"kept_rows_sum-{rows_kernel._build_key('cc')}.so"
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(b"not a shared object")
    a, keep, rows = operands("half", seed=5)
    torch.testing.assert_close(
        native_kept_rows_sum(a, keep, rows), masked_sum(a, keep, rows), rtol=0, atol=1e-5
    )
    assert damaged.read_bytes().startswith(b"\x7fELF")


def test_fused_decode_refuses_tables_that_do_not_fit_by_name(native):
    from xmoe.conversion.rows_kernel import native_neuron_decode

    x, down = torch.randn(1, 8), torch.randn(12, 8)
    channels, neurons = (torch.ones(8), torch.zeros(())), (torch.ones(12), torch.zeros(()))
    with pytest.raises(ValueError, match=r"first table \(8, 12\) do not fit down \(12, 8\)"):
        native_neuron_decode(
            x, ("gate_up", "down"), channels, neurons, (torch.randn(8, 12), None, down)
        )
    with using_kernel("embedding_bag"):
        tables = (torch.randn(8, 24), None, down)
        assert native_neuron_decode(x, ("gate_up", "down"), channels, neurons, tables) is None
