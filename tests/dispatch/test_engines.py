"""Fast path and fallbacks agree; dtypes, autocast and devices behave."""

from __future__ import annotations

import pytest
import torch

from xmoe import MoEConfig
from xmoe.dispatch import ENGINES, DispatchPlan, choose_engine
from xmoe.dispatch.engines import Engine

from helpers import (
    assert_close_grads,
    make_layer,
    register_for_test,
    run_both,
    use_host_reads,
)


def _forward_backward(layer, x, cotangent):
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    out = layer(x)
    (out.hidden_states.float() * cotangent).sum().add(out.aux_loss).backward()
    grads = {"x": x.grad, **{n: p.grad for n, p in layer.named_parameters()}}
    return out.hidden_states, grads


@pytest.mark.parametrize(
    "dtype,rtol,atol", [(torch.float32, 1e-4, 1e-4), (torch.bfloat16, 2e-2, 2e-2)]
)
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_grouped_batched_and_loop_agree(dtype, rtol, atol, activation):
    results = {}
    x = torch.randn(96, 32).to(dtype)
    cotangent = torch.randn(96, 32)
    for backend in sorted(ENGINES):
        config = MoEConfig(
            d_model=32,
            num_experts=16,
            d_expert=16,
            backend=backend,
            activation=activation,
            capacity_factor=2.0,
        )
        layer = make_layer(config, dtype=dtype, router_std=0.3)
        results[backend] = _forward_backward(layer, x, cotangent)
    ref_out, ref_grads = results["loop"]
    for backend in sorted(set(ENGINES) - {"loop"}):
        out, grads = results[backend]
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), ref_out.float(), rtol=rtol, atol=atol)
        for name, grad in ref_grads.items():
            torch.testing.assert_close(
                grads[name].float(), grad.float(), rtol=rtol, atol=atol, msg=f"{backend} {name}"
            )


CPU, CUDA = torch.device("cpu"), torch.device("cuda")
F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16

CHOICES = [
    # (backend, dtype, device, num_pairs, d_model, d_expert, engine chosen before the registry)
    ("auto", F32, CPU, 8, 64, 32, "batched"),
    ("auto", F32, CPU, 256, 64, 32, "batched"),  # batched_max_pairs(64, 32) == 256
    ("auto", F32, CPU, 257, 64, 32, "grouped"),
    ("auto", F32, CPU, 4096, 64, 32, "grouped"),
    ("auto", F16, CPU, 4096, 64, 32, "grouped"),
    ("auto", BF16, CPU, 4096, 64, 32, "grouped"),
    ("auto", F64, CPU, 8, 64, 32, "batched"),  # batched whatever the dtype
    ("auto", F64, CPU, 4096, 64, 32, "loop"),
    ("auto", F32, CPU, 4096, 62, 32, "loop"),  # rows not a multiple of 16 bytes
    ("auto", BF16, CPU, 4096, 64, 12, "loop"),
    ("auto", F32, CPU, 0, 64, 32, "batched"),
    ("auto", BF16, CUDA, 4096, 64, 32, "grouped"),
    ("auto", F32, CUDA, 4096, 64, 32, "loop"),  # grouped_mm on CUDA: bf16 only
    ("auto", F32, CUDA, 8, 64, 32, "batched"),
    ("loop", F32, CPU, 8, 64, 32, "loop"),
    ("loop", F64, CUDA, 4096, 62, 12, "loop"),
    ("batched", F32, CPU, 4096, 64, 32, "batched"),  # named: runs past its auto size
    ("batched", F64, CPU, 4096, 62, 12, "batched"),
    ("grouped", F32, CPU, 8, 64, 32, "grouped"),
    ("grouped", BF16, CUDA, 4096, 64, 32, "grouped"),
]


@pytest.mark.parametrize("backend,dtype,device,num_pairs,d_model,d_expert,expected", CHOICES)
def test_engine_choices_are_pinned(backend, dtype, device, num_pairs, d_model, d_expert, expected):
    """The registry chooses what the hard-coded chain chose, for each case the rule tells apart
    (size at the batched bound, dtype, alignment, device, named back-ends)."""
    engine = choose_engine(backend, dtype, device, num_pairs, d_model, d_expert)
    assert engine is ENGINES[expected]


@pytest.mark.parametrize(
    "dtype,device,d_model,d_expert",
    [(F64, CPU, 64, 32), (F32, CPU, 62, 32), (BF16, CPU, 64, 12), (F32, CUDA, 64, 32)],
)
def test_a_named_engine_that_cannot_run_the_operands_raises(dtype, device, d_model, d_expert):
    with pytest.raises(ValueError, match=r"backend='grouped' cannot run .* grouped_mm needs"):
        choose_engine("grouped", dtype, device, 4096, d_model, d_expert)


def test_backends_are_auto_and_the_registered_engines():
    from xmoe.config import BACKENDS

    assert list(BACKENDS) == ["auto", *sorted(ENGINES)] == ["auto", "batched", "grouped", "loop"]


def test_input_dtype_is_kept_and_router_runs_in_fp32():
    config = MoEConfig(d_model=16, num_experts=8, d_expert=8)
    layer = make_layer(config, dtype=torch.float32)
    x = torch.randn(50, 16)
    out32 = layer(x)
    out16 = layer(x.bfloat16())
    assert out16.hidden_states.dtype == torch.bfloat16
    assert layer.router.probabilities(x.bfloat16()).dtype == torch.float32
    torch.testing.assert_close(
        out16.hidden_states.float(), out32.hidden_states, rtol=5e-2, atol=5e-2
    )


def test_cpu_autocast_bf16():
    config = MoEConfig(d_model=16, num_experts=8, d_expert=8)
    layer = make_layer(config, dtype=torch.float32)
    x = torch.randn(50, 16, requires_grad=True)
    reference = layer(x).hidden_states
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.hidden_states.dtype == torch.bfloat16
    torch.testing.assert_close(out.hidden_states.float(), reference, rtol=5e-2, atol=5e-2)
    out.hidden_states.float().sum().backward()
    assert layer.experts.w1.grad.dtype == torch.float32 and x.grad is not None


def _random_plan(counts: list[int], sort: bool, seed: int) -> DispatchPlan:
    """A plan with these rows per expert: sorted by expert, or shuffled (token-major)."""
    counts_E = torch.tensor(counts)
    expert_N = torch.repeat_interleave(torch.arange(len(counts)), counts_E)
    if not sort:
        expert_N = expert_N[torch.randperm(expert_N.numel(), generator=_gen(seed))]
    return DispatchPlan(torch.arange(expert_N.numel()), expert_N, counts_E, expert_N.numel(), sort)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


PLANS = {
    "empty_experts": [3, 0, 5, 0, 1, 0],
    "one_row": [0, 0, 1, 0, 0, 0],
    "no_rows": [0, 0, 0, 0, 0, 0],
    "one_expert": [0, 0, 0, 0, 7, 0],
    "all_experts": [2, 1, 4, 3, 1, 2],
}
DTYPES = {F64: (1e-12, 1e-12), F32: (1e-5, 1e-5), BF16: (2e-2, 2e-2)}


def check_engine(engine: type[Engine], counts: list[int], dtype: torch.dtype, seed: int) -> None:
    """``mm`` and ``wgrad`` (fresh and into a given buffer) against a float64 per-row sum and
    the loop engine, on a sorted plan and, for an engine that runs them, a shuffled one."""
    k, m = 16, 8  # 16-byte rows in every dtype grouped_mm takes
    if not engine.runs(dtype, CPU, k, m):
        pytest.skip(f"does not run {dtype}")
    for sort in (True, False) if engine.runs_unsorted else (True,):
        plan = _random_plan(counts, sort, seed)
        n, e = plan.num_pairs, plan.num_experts
        a_NK = torch.randn(n, k, generator=_gen(seed), dtype=F64)
        b_EKM = torch.randn(e, k, m, generator=_gen(seed + 1), dtype=F64)
        g_NM = torch.randn(n, m, generator=_gen(seed + 2), dtype=F64)
        a, b, g = (t.to(dtype) for t in (a_NK, b_EKM, g_NM))  # both sides see the rounded inputs
        mm_NM = torch.einsum("nk,nkm->nm", a.double(), b.double()[plan.expert_idx_N])
        wgrad_EKM = torch.zeros(e, k, m, dtype=F64)
        for i, x in enumerate(plan.expert_idx_N.tolist()):
            wgrad_EKM[x] += torch.outer(a[i].double(), g[i].double())
        rtol, atol = DTYPES[dtype]
        got = engine.mm(a, b, plan)
        assert got.dtype == dtype and got.shape == (n, m)
        torch.testing.assert_close(got.double(), mm_NM, rtol=rtol, atol=atol)
        fresh = engine.wgrad(a, g, plan)
        out_EKM = torch.full((e, k, m), float("nan"), dtype=dtype)
        into = engine.wgrad(a, g, plan, out_EKM)
        assert into.data_ptr() == out_EKM.data_ptr()  # a slice of a full gradient: no copy
        for result in (fresh, out_EKM):
            assert result.dtype == dtype
            torch.testing.assert_close(result.double(), wgrad_EKM, rtol=rtol, atol=atol)
        if sort:  # the loop engine is the reference on the plans it runs
            ref = ENGINES["loop"]
            torch.testing.assert_close(got, ref.mm(a, b, plan), rtol=rtol, atol=atol)
            torch.testing.assert_close(fresh, ref.wgrad(a, g, plan), rtol=rtol, atol=atol)


@pytest.mark.parametrize("host_reads", [True, False], ids=["host", "sync_free"])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_every_registered_engine_conforms(monkeypatch, engine, plan, dtype, host_reads):
    """Registering an engine puts it under this test: forward and weight gradient on plans with
    empty experts, one row and none, in each dtype it runs."""
    use_host_reads(monkeypatch, host_reads)
    check_engine(ENGINES[engine], PLANS[plan], dtype, seed=len(plan))


class _OneHotEngine(Engine):
    """A toy engine, one file's worth: every row times every expert, the row's own kept by a
    one-hot mask. Any order of rows; ``auto`` takes it for at most 4 pairs in float64."""

    priority = 30
    runs_unsorted = True

    @classmethod
    def supports(cls, dtype, device, num_pairs, d_model, d_expert) -> bool:
        return dtype == torch.float64 and num_pairs <= 4

    @staticmethod
    def mm(a_NK, b_EKM, plan):
        onehot_NE = torch.nn.functional.one_hot(plan.expert_idx_N, plan.num_experts).to(a_NK)
        return torch.einsum("ne,nk,ekm->nm", onehot_NE, a_NK, b_EKM)

    @staticmethod
    def wgrad(a_NK, g_NM, plan, out_EKM=None):
        onehot_NE = torch.nn.functional.one_hot(plan.expert_idx_N, plan.num_experts).to(a_NK)
        sum_EKM = torch.einsum("ne,nk,nm->ekm", onehot_NE, a_NK, g_NM)
        return sum_EKM if out_EKM is None else out_EKM.copy_(sum_EKM)


def test_a_registered_engine_is_a_backend_a_candidate_and_under_test(monkeypatch):
    """One class plus one registry entry: a valid ``backend``, chosen by ``auto`` where it is
    the highest priority that supports the call, conformant, and the layer's float64 reference
    holds through it."""
    register_for_test(monkeypatch, ENGINES, "onehot", _OneHotEngine)
    from xmoe.config import BACKENDS

    assert "onehot" in BACKENDS
    assert choose_engine("auto", F64, CPU, 4, 12, 6) is _OneHotEngine
    assert choose_engine("auto", F64, CPU, 5, 12, 6) is ENGINES["batched"]
    assert choose_engine("auto", F32, CPU, 4, 12, 6) is ENGINES["batched"]
    for counts in PLANS.values():
        check_engine(_OneHotEngine, counts, F64, seed=3)
    config = MoEConfig(
        d_model=12, num_experts=10, d_expert=6, capacity_factor=1.0, backend="onehot"
    )
    out, ref, layer_grads, ref_grads = run_both(make_layer(config), torch.randn(20, 12, dtype=F64))
    torch.testing.assert_close(out.hidden_states, ref.hidden_states, rtol=1e-10, atol=1e-12)
    assert_close_grads(layer_grads, ref_grads, rtol=1e-9, atol=1e-11)
