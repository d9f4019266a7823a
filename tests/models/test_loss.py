"""The chunked output projection + losses against ``F.cross_entropy`` (and THOR's KL) of the
whole logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from xmoe.models import loss as loss_module
from xmoe.models.loss import (
    fused_supported,
    linear_cross_entropy,
    paired_cross_entropy_and_kl,
    symmetric_kl_per_position,
)


def _operands(dtype=torch.float64, tokens: int = 37, vocab: int = 50, width: int = 8):
    generator = torch.Generator().manual_seed(0)
    h_ND = torch.randn(tokens, width, generator=generator, dtype=dtype).requires_grad_()
    weight_VD = torch.randn(vocab, width, generator=generator, dtype=dtype).requires_grad_()
    targets_N = torch.randint(0, vocab, (tokens,), generator=generator)
    targets_N[::5] = -100  # ignored positions add nothing
    return h_ND, weight_VD, targets_N


def _loss_and_grads(loss_fn, h_ND, weight_VD, targets_N, upstream: float = 1.0):
    h, weight = h_ND.detach().clone().requires_grad_(), weight_VD.detach().clone().requires_grad_()
    loss = loss_fn(h, weight, targets_N)
    (loss * upstream).backward()
    return loss.detach(), h.grad, weight.grad


def _plain(h_ND, weight_VD, targets_N):
    return F.cross_entropy(F.linear(h_ND, weight_VD), targets_N, ignore_index=-100)


# 4-row chunks (37 rows: a ragged last one), and one chunk
@pytest.mark.parametrize("chunk_elements", [50 * 4, 1 << 20])
def test_matches_cross_entropy_of_the_logits(monkeypatch, chunk_elements):
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", chunk_elements)
    operands = _operands()
    for upstream in (1.0, 0.25):
        fused = _loss_and_grads(linear_cross_entropy, *operands, upstream)
        plain = _loss_and_grads(_plain, *operands, upstream)
        for got, want in zip(fused, plain, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_fp32_within_float_tolerance_and_no_grad_loss(monkeypatch):
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 50 * 8)
    operands = _operands(torch.float32, tokens=64)
    fused = _loss_and_grads(linear_cross_entropy, *operands)
    plain = _loss_and_grads(_plain, *operands)
    for got, want in zip(fused, plain, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    with torch.no_grad():  # inference: the loss alone, no gradient work
        torch.testing.assert_close(linear_cross_entropy(*operands), plain[0])


def test_fused_only_without_autocast_in_fp32_or_fp64():
    h_ND, weight_VD, _ = _operands(torch.float32)
    assert fused_supported(h_ND, weight_VD)
    assert not fused_supported(h_ND.bfloat16(), weight_VD.bfloat16())
    assert not fused_supported(h_ND, weight_VD.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fused_supported(h_ND, weight_VD)


def test_paired_losses_chunk_by_chunk_match_the_whole_logits(monkeypatch):
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 50 * 4)  # 4-row chunks, a ragged last one
    h_a, weight, targets = _operands(torch.float32)
    h_b = (
        h_a.detach() + 0.3 * torch.randn(h_a.shape, generator=torch.Generator())
    ).requires_grad_()
    results = []
    for paired in (
        paired_cross_entropy_and_kl,
        lambda a, b, w, t: (*(_plain(h, w, t) for h in (a, b)), _whole_kl(a, b, w, t)),
    ):
        leaves = [x.detach().clone().requires_grad_() for x in (h_a, h_b, weight)]
        ce_a, ce_b, kl = paired(*leaves, targets)
        (ce_a + 2 * ce_b + 3 * kl).backward()
        results.append((ce_a, ce_b, kl, *(x.grad for x in leaves)))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def _whole_kl(h_a, h_b, weight, targets):
    log_a, log_b = (F.linear(h, weight).log_softmax(-1) for h in (h_a, h_b))
    kept = targets != -100
    return symmetric_kl_per_position(log_a, log_b)[kept].sum() / kept.sum()
