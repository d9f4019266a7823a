"""Every Triton kernel of ``xmoe.kernels.ops`` against a float64 reference, under triton's CPU
interpreter (``conftest.py``): random routings with empty experts, one token, uneven loads,
dropped pairs and sizes that are not multiples of the tile. Inputs are views into NaN-padded
buffers (an unmasked read out of bounds turns the result into NaN) and outputs views into
sentinel-padded ones (a write out of bounds changes a sentinel): the interpreter checks no
bounds itself."""

from __future__ import annotations

import pytest
import torch

from xmoe.dispatch.engines import LoopEngine
from xmoe.dispatch.plan import DispatchPlan
from xmoe.experts.activations import ACTIVATION_FNS
from xmoe.kernels.configs import TILES, Tiles, interpreting
from xmoe.kernels.schedule import build_schedule

pytest.importorskip("triton")
from xmoe.kernels import ops  # after the skip: it imports triton

pytestmark = pytest.mark.skipif(
    not interpreting(), reason="CPU tensors under triton's interpreter, off where a GPU is"
)

SENTINEL = 12345.0
PAD = 3

CASES = {
    # name: (tokens, experts, most experts per token, d_model, first width, dropped fraction)
    "one_token": (1, 3, 2, 24, 20, 0.0),
    "uneven": (48, 7, 4, 72, 40, 0.15),
    "all_dropped": (5, 4, 2, 24, 20, 1.0),
}
EXPERT_POPULARITY = [8.0, 1.0, 0.0, 4.0, 1.0, 0.0, 2.0]
"""Selection weights per expert: uneven loads, and experts 2 and 5 never chosen (empty)."""


def random_plan(case: str, seed: int = 0) -> DispatchPlan:
    """Token-major pairs (0 to the case's most experts per token, popular experts more often),
    a random fraction dropped, then grouped by expert (stable), as ``route_pairs`` groups them."""
    num_tokens, num_experts, max_k, _, _, dropped = CASES[case]
    generator = torch.Generator().manual_seed(seed)
    popularity = torch.tensor(EXPERT_POPULARITY[:num_experts])
    tokens, experts = [], []
    for token in range(num_tokens):
        k = int(torch.randint(1 if num_tokens == 1 else 0, max_k + 1, (), generator=generator))
        chosen = torch.multinomial(popularity, k, generator=generator) if k else []
        tokens += [token] * k
        experts += [int(e) for e in chosen]
    keep = torch.rand(len(tokens), generator=generator) >= dropped
    token_N = torch.tensor(tokens, dtype=torch.int64)[keep]
    expert_N = torch.tensor(experts, dtype=torch.int64)[keep]
    order_N = torch.sort(expert_N, stable=True).indices
    counts_E = torch.bincount(expert_N, minlength=num_experts)
    return DispatchPlan(token_N[order_N], expert_N[order_N], counts_E, num_tokens)


def padded(t: torch.Tensor, fill: float = float("nan")) -> torch.Tensor:
    """``t`` as a view into a buffer with ``PAD`` rows and columns of ``fill`` around it (its
    last two dimensions)."""
    *lead, rows, cols = t.shape
    buffer = t.new_full((*lead, rows + 2 * PAD, cols + 2 * PAD), fill)
    view = buffer[..., PAD : PAD + rows, PAD : PAD + cols]
    view.copy_(t)
    return view


def assert_pad_untouched(view: torch.Tensor) -> None:
    """Everything of ``view``'s padded buffer outside ``view`` still holds :data:`SENTINEL`."""
    buffer = view._base
    inside = torch.zeros(buffer.shape, dtype=torch.bool)
    inside[..., PAD : PAD + view.shape[-2], PAD : PAD + view.shape[-1]] = True
    assert bool((buffer[~inside] == SENTINEL).all()), "a kernel wrote outside its output"


def _randn(*shape: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _case_tensors(case: str):
    plan = random_plan(case)
    num_tokens, num_experts, _, d_model, width, _ = CASES[case]
    return plan, num_tokens, num_experts, d_model, width


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("gather,scatter", [(True, False), (False, True)])
def test_gathered_mm_matches_the_reference(case, gather, scatter):
    """Gathered A operand (forward's first GEMM) or grouped A with bias, routing weight and
    scatter to token-major slots in the epilogue (forward's second GEMM, the input gradient)."""
    plan, num_tokens, num_experts, d_model, width = _case_tensors(case)
    tiles = TILES["interpreter"]
    schedule = build_schedule(plan, tiles.block_m)
    a = _randn(num_tokens if gather else plan.num_pairs, d_model, seed=1)
    b_EKM = _randn(num_experts, d_model, width, seed=2)
    bias_EM, scale_N = _randn(num_experts, width, seed=3), _randn(plan.num_pairs, seed=4)
    out = padded(torch.empty(plan.num_pairs, width, dtype=torch.float64), SENTINEL)

    ops.gathered_mm(
        padded(a), padded(b_EKM), schedule, tiles, gather=gather, bias_EM=padded(bias_EM),
        scale_N=scale_N, scatter=scatter, out=out,
    )  # fmt: skip

    rows_NK = a[plan.token_idx_N] if gather else a
    expected = torch.bmm(rows_NK.unsqueeze(1), b_EKM[plan.expert_idx_N]).squeeze(1)
    expected = (expected + bias_EM[plan.expert_idx_N]) * scale_N.unsqueeze(1)
    if scatter:
        expected = torch.empty_like(expected).index_copy_(0, schedule.slot_N, expected)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert_pad_untouched(out)


def test_gathered_mm_reads_a_transposed_weight_in_small_tiles():
    """The backward's ``dy·w2ᵀ``: a transposed (strided) weight, tiles of 16 (several row tiles
    per expert, several reduction steps, partial tiles at every edge), fp32 operands."""
    plan, num_tokens, num_experts, d_model, width = _case_tensors("uneven")
    tiles = Tiles(16, 16, 16)
    schedule = build_schedule(plan, tiles.block_m)
    grad_SD = _randn(num_tokens, d_model, seed=5, dtype=torch.float32)
    w2_EHD = _randn(num_experts, width, d_model, seed=6, dtype=torch.float32)
    out = ops.gathered_mm(grad_SD, w2_EHD.transpose(1, 2), schedule, tiles, gather=True)
    expected = torch.bmm(
        grad_SD.double()[plan.token_idx_N].unsqueeze(1),
        w2_EHD.double().transpose(1, 2)[plan.expert_idx_N],
    ).squeeze(1)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ["gelu", "relu", "silu", "swiglu"])
@pytest.mark.parametrize("case", ["uneven", "all_dropped"])
def test_the_activation_in_the_epilogue_matches_the_reference(case, activation):
    """The first layer in one kernel: the gathered GEMM with bias and, in its epilogue, the
    activation (``swiglu`` on the fused ``[gate | up]`` layout, gate and up columns of a tile in
    one program), the pre-activations written or not (inference)."""
    plan, num_tokens, num_experts, d_model, width = _case_tensors(case)
    tiles = TILES["interpreter"]
    schedule = build_schedule(plan, tiles.block_m)
    x_SK, w1_EKF = _randn(num_tokens, d_model, seed=1), _randn(num_experts, d_model, width, seed=2)
    b1_EF = _randn(num_experts, width, seed=3)
    args = (padded(x_SK), padded(w1_EKF), schedule, tiles, activation)
    pre, act = ops.gathered_mm_act(*args, bias_EF=padded(b1_EF))

    expected_pre = torch.bmm(x_SK[plan.token_idx_N].unsqueeze(1), w1_EKF[plan.expert_idx_N])
    expected_pre = expected_pre.squeeze(1) + b1_EF[plan.expert_idx_N]
    expected_act = ACTIVATION_FNS[activation].forward(expected_pre)
    torch.testing.assert_close(pre, expected_pre, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(act, expected_act, rtol=1e-12, atol=1e-12)
    no_pre, act_only = ops.gathered_mm_act(*args, bias_EF=padded(b1_EF), keep_pre=False)
    assert no_pre is None
    torch.testing.assert_close(act_only, expected_act, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", sorted(CASES))
def test_grouped_wgrad_matches_the_reference(case):
    """Per-expert ``(scale·x)ᵀ y`` with x gathered from token rows (``dw1``) and y grouped, and
    with y gathered (``dw2``); an empty expert's gradient is zeros, written."""
    plan, num_tokens, num_experts, d_model, width = _case_tensors(case)
    tiles = TILES["interpreter"]
    schedule = build_schedule(plan, tiles.block_m)
    x_SK, y_NM = _randn(num_tokens, d_model, seed=7), _randn(plan.num_pairs, width, seed=8)
    scale_N = _randn(plan.num_pairs, seed=9)
    expected = torch.zeros(num_experts, d_model, width, dtype=torch.float64)
    scaled_NK = x_SK[plan.token_idx_N] * scale_N.unsqueeze(1)
    for n, expert in enumerate(plan.expert_idx_N.tolist()):
        expected[expert] += torch.outer(scaled_NK[n], y_NM[n])

    out = padded(torch.empty_like(expected), SENTINEL)
    ops.grouped_wgrad(
        padded(x_SK), padded(y_NM), schedule, tiles, gather_x=True, scale_N=scale_N, out=out
    )
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert_pad_untouched(out)

    # the other way round (y gathered from token rows, x grouped), against the plain path
    out_MK = ops.grouped_wgrad(y_NM, x_SK, schedule, tiles, gather_y=True)
    expected_MK = LoopEngine.wgrad(y_NM, x_SK[plan.token_idx_N], plan)
    torch.testing.assert_close(out_MK, expected_MK, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", sorted(CASES))
def test_rowdot_and_combine_match_the_reference(case):
    """The routing-weight gradient's row dots (gathered on either side, accumulated) and the
    per-token combine of token-major rows (zeros for a token without pairs)."""
    plan, num_tokens, num_experts, d_model, _ = _case_tensors(case)
    schedule = build_schedule(plan, TILES["interpreter"].block_m)
    grad_SD, b2_ED = _randn(num_tokens, 150, seed=10), _randn(num_experts, 150, seed=11)
    g_ND = _randn(plan.num_pairs, 150, seed=12)
    out_N = ops.rowdot(g_ND, padded(g_ND), torch.empty(plan.num_pairs, dtype=torch.float64))
    ops.rowdot(
        padded(grad_SD), b2_ED, out_N, x_idx_N=plan.token_idx_N, y_idx_N=plan.expert_idx_N,
        accumulate=True,
    )  # fmt: skip
    bias_dot_N = (grad_SD[plan.token_idx_N] * b2_ED[plan.expert_idx_N]).sum(1)
    expected_N = (g_ND * g_ND).sum(1) + bias_dot_N
    torch.testing.assert_close(out_N, expected_N, rtol=1e-12, atol=1e-12)

    y_ND = _randn(plan.num_pairs, d_model, seed=13)
    out_SD = padded(torch.empty(num_tokens, d_model, dtype=torch.float64), SENTINEL)
    ops.combine(padded(y_ND), schedule, out=out_SD)
    token_major_N = torch.empty_like(plan.token_idx_N).index_copy_(
        0, schedule.slot_N, plan.token_idx_N
    )
    expected_SD = torch.zeros(num_tokens, d_model, dtype=torch.float64)
    torch.testing.assert_close(out_SD, expected_SD.index_add_(0, token_major_N, y_ND))
    assert_pad_untouched(out_SD)


def test_the_schedule_covers_every_row_once_and_orders_slots_by_token():
    plan = random_plan("uneven")
    schedule = build_schedule(plan, 16)
    covered = torch.zeros(plan.num_pairs, dtype=torch.int64)
    tiles = zip(schedule.tile_expert_T.tolist(), schedule.tile_row_T.tolist(), strict=True)
    for expert, row in tiles:
        if expert >= 0:
            end = min(row + 16, int(schedule.bounds_E1[expert + 1]))
            assert (plan.expert_idx_N[row:end] == expert).all()
            covered[row:end] += 1
    assert covered.tolist() == [1] * plan.num_pairs
    token_major_N = torch.empty_like(plan.token_idx_N).index_copy_(
        0, schedule.slot_N, plan.token_idx_N
    )
    assert torch.equal(token_major_N, torch.sort(plan.token_idx_N).values)
    counts_S = torch.bincount(plan.token_idx_N, minlength=plan.num_tokens)
    assert torch.equal(schedule.rowptr_S1.diff(), counts_S)
