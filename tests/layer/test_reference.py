"""The layer against the per-token float64 reference: outputs, aux loss, statistics, gradients."""

from __future__ import annotations

import pytest
import torch

from xmoe import MoEConfig
from xmoe.dispatch import ENGINES
from xmoe.experts import decode

from helpers import assert_close_grads, make_layer, run_both, use_host_reads

CASES = [
    # (router, capacity_factor, num_tokens, extra config)
    ("threshold", None, 40, {}),
    ("threshold", None, 1, {}),
    ("threshold", 1.0, 40, {}),  # over-subscribed experts drop pairs
    ("threshold", 0.25, 40, {"min_capacity": 1}),  # heavy overflow, some tokens lose all
    ("threshold", 1.0, 3, {}),  # batch smaller than min_capacity: C clamps to S
    ("threshold", None, 30, {"threshold": 0.5, "renormalize": True}),
    ("threshold", 0.5, 30, {"renormalize": True, "min_capacity": 1}),
    ("threshold", None, 12, {"threshold": 1.0}),
    ("topk", None, 40, {"top_k": 2}),
    ("topk", 1.0, 40, {"top_k": 3}),
    ("topk", None, 1, {"top_k": 1}),
    ("topk", 2.0, 5, {"top_k": 2, "min_capacity": 1}),
]


@pytest.mark.parametrize("path", ["auto", "sync_free", "loop"])
@pytest.mark.parametrize("router,capacity_factor,num_tokens,extra", CASES)
@pytest.mark.parametrize("activation,bias", [("gelu", True), ("relu", False), ("swiglu", True)])
def test_matches_reference_float64(
    monkeypatch, router, capacity_factor, num_tokens, extra, activation, bias, path
):
    """``auto`` runs these small calls on unsorted pairs and the batched engine (the decode
    path), except with capacity; ``loop`` on pairs sorted by expert and host segments;
    ``sync_free`` with no host reads."""
    use_host_reads(monkeypatch, path != "sync_free")
    config = MoEConfig(
        d_model=12,
        num_experts=10,
        d_expert=6,
        router=router,
        capacity_factor=capacity_factor,
        activation=activation,
        bias=bias,
        backend="loop" if path == "loop" else "auto",
        **extra,
    )
    layer = make_layer(config, seed=num_tokens)
    x = torch.randn(num_tokens, 12, dtype=torch.float64)
    out, ref, layer_grads, ref_grads = run_both(layer, x)

    torch.testing.assert_close(out.hidden_states, ref.hidden_states, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss, rtol=1e-10, atol=1e-12)
    assert out.routing.wanted_per_token.tolist() == [len(w) for w in ref.wanted]
    assert out.routing.kept_per_token.tolist() == [len(k) for k in ref.kept]
    load = [sum(e in k for k in ref.kept) for e in range(config.num_experts)]
    assert out.routing.expert_load.tolist() == load
    wanted_pairs = sum(len(w) for w in ref.wanted)
    kept_pairs = sum(len(k) for k in ref.kept)
    assert float(out.routing.drop_fraction) == pytest.approx(1 - kept_pairs / wanted_pairs)
    assert float(out.routing.flops_per_token) == pytest.approx(ref.flops_per_token)
    assert_close_grads(layer_grads, ref_grads, rtol=1e-9, atol=1e-11)


def test_cases_exercise_what_they_claim():
    """The capacity cases really drop pairs and leave experts empty, so the suite can fail."""
    config = MoEConfig(d_model=12, num_experts=10, d_expert=6, capacity_factor=0.25, min_capacity=1)
    layer = make_layer(config, seed=40)
    out = layer(torch.randn(40, 12, dtype=torch.float64))
    assert float(out.routing.drop_fraction) > 0.2
    assert (out.routing.kept_per_token == 0).any()  # tokens with residual only
    tiny = make_layer(MoEConfig(d_model=12, num_experts=10, d_expert=6), seed=3)
    assert (tiny(torch.randn(3, 12, dtype=torch.float64)).routing.expert_load == 0).any()


@pytest.mark.parametrize("host_reads", [True, False], ids=["host", "sync_free"])
@pytest.mark.parametrize("backend", sorted(ENGINES))
@pytest.mark.parametrize("router", ["threshold", "topk"])
def test_fp32_backends_match_reference(monkeypatch, backend, router, host_reads):
    use_host_reads(monkeypatch, host_reads)
    config = MoEConfig(
        d_model=16,
        num_experts=12,
        d_expert=8,
        router=router,
        top_k=3,
        backend=backend,
        capacity_factor=1.5,
    )
    layer = make_layer(config, dtype=torch.float32, seed=7)
    x = torch.randn(64, 16)
    out, ref, layer_grads, ref_grads = run_both(layer, x)
    assert out.hidden_states.dtype == torch.float32
    assert out.routing.kept_per_token.tolist() == [len(k) for k in ref.kept]
    torch.testing.assert_close(out.hidden_states.double(), ref.hidden_states, rtol=1e-4, atol=1e-5)
    assert_close_grads(layer_grads, ref_grads, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("backend", "num_tokens", "unsorted"), [
    ("auto", 1, True), ("auto", 16, True), ("auto", 2048, False), ("loop", 1, False),
])  # fmt: skip
def test_decode_sized_calls_skip_the_sort(backend, num_tokens, unsorted):
    """Few pairs stay token-major (the batched engine needs no grouping); larger calls and the
    loop engine get pairs sorted by expert."""
    config = MoEConfig(d_model=16, num_experts=8, d_expert=8, backend=backend)
    layer = make_layer(config, dtype=torch.float32, router_std=0.3)
    plan = layer.route(torch.randn(num_tokens, 16)).pairs.plan
    assert plan.sorted_by_expert is not unsorted


@pytest.mark.parametrize(
    ("training", "num_tokens"),
    [(True, 40), (False, 40), (False, 1)],
    ids=["capacity", "eval", "decode"],
)
def test_route_then_compute_is_forward(monkeypatch, training, num_tokens):
    """forward is route then compute: same output, losses and statistics; a routed object
    computed twice gives the same output (and its routing is reused, not redone)."""
    decode_calls = []
    real_decode = decode.decode_ffn
    monkeypatch.setattr(decode, "decode_ffn", lambda *a: decode_calls.append(1) or real_decode(*a))
    config = MoEConfig(d_model=12, num_experts=10, d_expert=6, capacity_factor=1.0)
    layer = make_layer(config, seed=5).train(training)
    x = torch.randn(num_tokens, 12, dtype=torch.float64)
    with torch.set_grad_enabled(training):
        out = layer(x)
        routed = layer.route(x)
        first, second = layer.compute(x, routed), layer.compute(x, routed)
    assert torch.equal(first, out.hidden_states) and torch.equal(second, first)
    assert routed.losses.keys() == out.aux_losses.keys()
    assert all(torch.equal(routed.losses[k], v) for k, v in out.aux_losses.items())
    assert torch.equal(routed.stats.kept_per_token, out.routing.kept_per_token)
    assert torch.equal(routed.stats.expert_load, out.routing.expert_load)
    assert (float(routed.stats.drop_fraction) > 0) is training  # capacity drops in training
    assert len(decode_calls) == (3 if num_tokens == 1 else 0)  # the dispatcher's choice
    with pytest.raises(ValueError, match=rf"x_SD.shape=\({2 * num_tokens}, 12\) is invalid"):
        layer.compute(x.repeat(2, 1), routed)


def test_leading_dimensions_are_tokens():
    config = MoEConfig(d_model=8, num_experts=6, d_expert=4)
    layer = make_layer(config)
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    out = layer(x)
    assert out.hidden_states.shape == x.shape
    flat = layer(x.reshape(-1, 8))
    torch.testing.assert_close(out.hidden_states.reshape(-1, 8), flat.hidden_states)


@pytest.mark.parametrize("host_reads", [True, False], ids=["host", "sync_free"])
def test_many_experts_widen_the_ranking_exactly(monkeypatch, host_reads):
    """Near-uniform probabilities over 64 experts need 58 experts at t=0.9 (more than the
    first ranking width): the widening (or, sync-free, one ranking over all experts) must give
    the reference's exact answer."""
    use_host_reads(monkeypatch, host_reads)
    config = MoEConfig(d_model=8, num_experts=64, d_expert=4, threshold=0.9)
    layer = make_layer(config, router_std=1e-3)
    x = torch.randn(6, 8, dtype=torch.float64)
    out, ref, layer_grads, ref_grads = run_both(layer, x)
    assert out.routing.wanted_per_token.tolist() == [len(w) for w in ref.wanted]
    assert min(len(w) for w in ref.wanted) > 32
    torch.testing.assert_close(out.hidden_states, ref.hidden_states)
    assert_close_grads(layer_grads, ref_grads, rtol=1e-9, atol=1e-11)


def test_empty_input():
    layer = make_layer(MoEConfig(d_model=8, num_experts=4, d_expert=4))
    x = torch.randn(0, 8, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    assert out.hidden_states.shape == (0, 8)
    (out.hidden_states.sum() + out.aux_loss).backward()
    assert x.grad.shape == (0, 8)


@pytest.mark.parametrize("backend", sorted(ENGINES))
@pytest.mark.parametrize(("activation", "bias"), [("gelu", True), ("swiglu", False)])
def test_chunked_expert_ranges_match_reference(monkeypatch, backend, activation, bias):
    """Large plans run expert range by expert range; force many small chunks (one expert over
    the limit on its own included) and check outputs and every gradient."""
    from xmoe.experts import ffn_function

    monkeypatch.setattr(ffn_function, "CHUNK_ELEMENTS", 16 * 7)  # 7 rows per chunk at d=16
    dtype = torch.float64 if backend == "loop" else torch.float32
    tolerance = (
        {"rtol": 1e-9, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    )
    config = MoEConfig(
        d_model=16, num_experts=12, d_expert=8, threshold=0.8, capacity_factor=2.0,
        activation=activation, bias=bias, backend=backend,
    )  # fmt: skip
    layer = make_layer(config, dtype=dtype, seed=11)
    x = torch.randn(48, 16)
    out, ref, layer_grads, ref_grads = run_both(layer, x)
    assert int(out.routing.kept_per_token.sum()) > 3 * 7  # really several chunks
    torch.testing.assert_close(out.hidden_states.double(), ref.hidden_states, **tolerance)
    assert_close_grads(layer_grads, ref_grads, **tolerance)


def test_plan_chunks_cover_rows_and_experts_in_order():
    from xmoe.dispatch import DispatchPlan

    counts = torch.tensor([3, 0, 9, 1, 0, 2, 4, 0])
    expert_N = torch.repeat_interleave(torch.arange(8), counts)
    plan = DispatchPlan(torch.arange(expert_N.numel()), expert_N, counts, expert_N.numel())
    expected = {  # a chunk closes once it holds max_rows; trailing empty experts join the last
        4: ([(0, 12), (12, 19)], [(0, 3), (3, 8)]),
        1: (
            [(0, 3), (3, 12), (12, 13), (13, 15), (15, 19)],
            [(0, 1), (1, 3), (3, 4), (4, 6), (6, 8)],
        ),
    }
    for max_rows, (row_ranges, expert_ranges) in expected.items():
        chunks = plan.chunks(max_rows)
        assert [(r.start, r.stop) for _, r, _ in chunks] == row_ranges
        assert [(e.start, e.stop) for _, _, e in chunks] == expert_ranges
        for sub, rows, experts in chunks:
            assert torch.equal(sub.expert_idx_N + experts.start, expert_N[rows])
            assert torch.equal(sub.counts_E, counts[experts])
    assert plan.chunks(100)[0][0] is plan
