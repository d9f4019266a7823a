"""Expert parallelism on torch.distributed (gloo, CPU): 2 and 4 processes spawned by the tests.

Each launch starts its processes once and runs many cases inside them (process start-up is the
cost on 2 cores); the workers return plain numbers and messages, the tests assert on them. The
processes rendezvous through a file (no TCP port to choose) and every launch has a timeout, so a
hang fails a test instead of stalling the suite.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.distributed as dist

import xmoe
from xmoe.distributed import DistributedError, launch
from xmoe.distributed.data_parallel import sync_gradients
from xmoe.distributed.groups import ExpertParallelGroups
from xmoe.distributed.sharding import expert_parallel, expert_slice

TIMEOUT_S = 120  # per launch; a healthy one takes seconds

# name -> (MoEConfig fields, tokens per rank for 2 ranks, for 4 ranks)
_BASE = {"d_model": 8, "num_experts": 4, "d_expert": 6}
CASES = {
    "threshold-dropless": ({}, (5, 7), (5, 7, 3, 6)),
    "threshold-capacity": ({"capacity_factor": 1.0, "min_capacity": 1}, (9, 6), (9, 6, 4, 7)),
    "topk-capacity": (
        {"router": "topk", "top_k": 2, "capacity_factor": 1.0, "min_capacity": 1},
        (9, 6),
        (9, 6, 4, 7),
    ),
    "topk-dropless-loop": ({"router": "topk", "backend": "loop"}, (6, 5), (6, 5, 2, 3)),
    # DeepSeekMoE: a shared expert beside the sharded routed ones, the device-level loss
    "deepseek-shared-device-loss": (
        {"router": "deepseek", "num_shared_experts": 1, "router_options": {"device_groups": 2}},
        (9, 6),
        (9, 6, 4, 7),
    ),
    "zero-tokens-on-a-rank": ({"capacity_factor": 1.5}, (0, 9), (7, 0, 5, 0)),
    # 8 experts and 1-2 tokens per rank: every rank sends nothing to most experts
    "few-tokens-many-experts": (
        {"num_experts": 8, "router": "topk", "top_k": 1},
        (1, 2),
        (1, 2, 1, 1),
    ),
    # a routing state per token (RMoE's GRU): routing stays on the token's rank
    "recurrent-capacity": (
        {"router": "recurrent", "router_options": {"state_dim": 4}, "capacity_factor": 1.0},
        (9, 6),
        (9, 6, 4, 7),
    ),
    "swiglu-no-bias-renormalize": (
        {"activation": "swiglu", "bias": False, "renormalize": True, "capacity_factor": 1.0},
        (8, 8),
        (8, 8, 8, 8),
    ),
    # routers of the related papers: the router's rows stay whole on every rank
    "null-topk-capacity": (
        {
            "router": "null_topk",
            "router_options": {"num_null": 2},
            "top_k": 3,
            "capacity_factor": 1.0,
            "min_capacity": 1,
        },
        (9, 6),
        (9, 6, 4, 7),
    ),
    "null-threshold": (
        {"router": "null_threshold", "router_options": {"num_null": 3}},
        (5, 7),
        (5, 7, 0, 6),
    ),
    "expert-choice": (
        {"router": "expert_choice", "capacity_factor": 1.0, "min_capacity": 1},
        (9, 6),
        (9, 6, 4, 0),
    ),
    "sigmoid-capacity": (
        {"router": "sigmoid", "capacity_factor": 1.0, "min_capacity": 1},
        (9, 6),
        (9, 6, 4, 7),
    ),
    # the frozen random router has no gradient on any rank
    "smoe-dropout-capacity": (
        {"router": "smoe_dropout", "capacity_factor": 1.0, "min_capacity": 1},
        (9, 6),
        (9, 6, 4, 0),
    ),
    # THOR: each rank draws its own expert for its batch (random per rank, as data parallel
    # THOR trains); the reference replays each rank's draw (see _seed_draws)
    "thor-random": ({"router": "thor"}, (9, 6), (9, 6, 4, 7)),
    "thor-ensemble": (
        {"router": "thor", "router_options": {"inference": "ensemble"}},
        (5, 7),
        (5, 7, 3, 6),
    ),
    # MoE++'s router on a plain FFN pool shards (its expert kind does not: a named error)
    "moepp-router": ({"router": "moepp"}, (9, 6), (9, 6, 4, 7)),
}


def _max_error(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    if a is None or b is None:  # no gradient (a frozen router): both or it is an error
        return 0.0 if a is None and b is None else math.inf
    if a.shape != b.shape:
        return math.inf
    return float((a - b).detach().abs().max()) if a.numel() else 0.0


def _same_summary(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        (math.isnan(a[k]) and math.isnan(b[k])) or math.isclose(a[k], b[k], abs_tol=1e-12)
        for k in a
    )


def _seed_draws(rank: int) -> None:
    """Seed the global generator, from which THOR draws its experts, for rank ``rank``'s call:
    each rank draws its own, and the single-process reference repeats that rank's draws."""
    torch.manual_seed(1000 + rank)


def _layer_case(fields: dict, tokens: tuple[int, ...], groups: ExpertParallelGroups) -> dict:
    """The expert-parallel layer on this rank's tokens against the single-process layer on the
    same weights: every rank's tokens go through the full layer in turn (per-rank capacity),
    with the per-rank losses summed, so the reference gradients are those of all ranks."""
    rank, world = groups.rank, groups.world_size
    config = xmoe.MoEConfig(**{**_BASE, **fields})
    torch.manual_seed(0)
    reference = xmoe.MoELayer(config).double()
    xs = [torch.randn(n, config.d_model, dtype=torch.float64) for n in tokens]
    targets = [torch.randn(n, config.d_model, dtype=torch.float64) for n in tokens]
    layer = xmoe.MoELayer(config).double()
    layer.load_state_dict(reference.state_dict())
    expert_parallel(layer, groups)

    x = xs[rank].clone().requires_grad_()
    _seed_draws(rank)
    out = layer(x)
    ((out.hidden_states * targets[rank]).sum() + out.aux_loss).backward()
    sync_gradients(layer, groups)  # router summed over all ranks; experts over their replicas

    ref_out = ref_x_grad = None
    for r, (xr, target) in enumerate(zip(xs, targets, strict=True)):
        xr = xr.clone().requires_grad_()
        _seed_draws(r)
        o = reference(xr)
        ((o.hidden_states * target).sum() + o.aux_loss).backward()
        if r == rank:
            ref_out, ref_x_grad = o, xr.grad
    part = expert_slice(config.num_experts, groups.expert_parallel_size, groups.ep_rank)
    errors = {
        "output": _max_error(out.hidden_states, ref_out.hidden_states),
        "aux_loss": _max_error(out.aux_loss, ref_out.aux_loss),
        "x_grad": _max_error(x.grad, ref_x_grad),
    }
    for name, param in layer.router.named_parameters():
        full = getattr(reference.router, name)
        errors[f"router_{name}_grad"] = _max_error(param.grad, full.grad)
    for name, param in layer.experts.named_parameters():
        full = getattr(reference.experts, name)
        errors[f"{name}_grad"] = _max_error(param.grad, full.grad[part])
    for name, value in ref_out.aux_losses.items():
        errors[f"aux_{name}"] = _max_error(out.aux_losses[name], value)
    same_stats = _same_summary(out.routing.summary(), ref_out.routing.summary()) and bool(
        torch.equal(out.routing.expert_load, ref_out.routing.expert_load)
    )
    with torch.no_grad():  # eval mode: dropless, no autograd
        layer.eval(), reference.eval()
        _seed_draws(rank)
        eval_output = layer(xs[rank]).hidden_states
        _seed_draws(rank)
        errors["eval_output"] = _max_error(eval_output, reference(xs[rank]).hidden_states)
    return {"errors": errors, "same_stats": same_stats, "world": world}


def _expect_error(make) -> str:
    try:
        make()
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


def _layer_scenarios(column: int, expert_parallel_size: int | None = None) -> dict:
    """Every case of :data:`CASES` on this rank, then the bad setups (a collective each)."""
    groups = ExpertParallelGroups.create(expert_parallel_size)
    results = {
        name: _layer_case(fields, sizes[column], groups) for name, (fields, *sizes) in CASES.items()
    }
    rank, world = dist.get_rank(), dist.get_world_size()
    # E not divisible by the expert-parallel size
    bad_experts = world * 2 - 1 if world > 1 else 3
    results["bad-divisibility"] = _expect_error(
        lambda: expert_parallel(
            xmoe.MoELayer(xmoe.MoEConfig(**{**_BASE, "num_experts": bad_experts})), groups
        )
    )
    # one rank built its layer with another threshold
    threshold = 0.9 if rank else 0.8
    config = xmoe.MoEConfig(**{**_BASE, "threshold": threshold})
    results["bad-config"] = _expect_error(lambda: expert_parallel(xmoe.MoELayer(config), groups))
    # MoE++'s pool: its experts' roles are positions in the whole pool
    pool = {"constant_experts": 1, "copy_experts": 1, "zero_experts": 0}
    moepp = xmoe.MoEConfig(**_BASE, router="moepp", experts="moepp", expert_options=pool)
    results["moepp-pool"] = _expect_error(lambda: expert_parallel(xmoe.MoELayer(moepp), groups))
    # the process group still works after the agreed failures
    layer = expert_parallel(xmoe.MoELayer(xmoe.MoEConfig(**_BASE)), groups)
    results["after-errors"] = tuple(layer(torch.randn(3, 8)).hidden_states.shape)
    return results


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return launch(_layer_scenarios, 2, 0, deadline_s=TIMEOUT_S, threads=1)


@pytest.fixture(scope="module")
def four_ranks() -> list[dict]:
    return launch(_layer_scenarios, 4, 1, deadline_s=TIMEOUT_S, threads=1)


@pytest.fixture(scope="module")
def four_ranks_replicated() -> list[dict]:
    """2 expert-parallel groups of 2 ranks: experts replicated across data-parallel groups."""
    return launch(_layer_scenarios, 4, 1, 2, deadline_s=TIMEOUT_S, threads=1)


def _check_layer_results(results: list[dict]) -> None:
    for rank, result in enumerate(results):
        for name in CASES:
            case = result[name]
            assert case["same_stats"], (rank, name)
            bad = {k: v for k, v in case["errors"].items() if not v <= 1e-12}
            assert not bad, (rank, name, bad)
        assert result["after-errors"] == (3, 8)


def test_expert_parallel_layer_equals_single_process_on_2_ranks(two_ranks):
    _check_layer_results(two_ranks)


def test_expert_parallel_layer_equals_single_process_on_4_ranks(four_ranks):
    _check_layer_results(four_ranks)


def test_experts_replicated_over_data_parallel_groups(four_ranks_replicated):
    _check_layer_results(four_ranks_replicated)


@pytest.mark.parametrize("fixture", ["two_ranks", "four_ranks"])
def test_bad_setups_fail_on_every_rank_with_a_named_error(fixture, request):
    results = request.getfixturevalue(fixture)
    for result in results:
        assert result["bad-divisibility"].startswith("ConfigError: num_experts="), result
        assert "divisible by the expert-parallel size" in result["bad-divisibility"]
        assert result["bad-config"].startswith(
            "DistributedError: the MoE layer configs: rank 0 and rank 1 disagree"
        )
        assert "threshold" in result["bad-config"]
        assert result["moepp-pool"].startswith(
            "ConfigError: experts='moepp' is invalid under expert parallelism"
        )


def _fail_on_rank_1() -> None:
    if dist.get_rank() == 1:
        raise ValueError("rank 1 is broken")
    dist.barrier()  # rank 0 would wait here forever without the launcher's stop


def test_launch_reports_the_failing_rank_and_stops_the_others():
    with pytest.raises(DistributedError, match="rank 1 of 2: ValueError: rank 1 is broken"):
        launch(_fail_on_rank_1, 2, deadline_s=TIMEOUT_S, threads=1)


# --- training ---------------------------------------------------------------------------------


def _tiny(**changes):
    from xmoe.training.presets import preset

    base = {
        "grad_accum_steps": 4, "batch_size": 2, "max_steps": 4, "eval_interval": 2,
        "checkpoint_interval": 2, "log_interval": 1, "eval_batches": 2,
    }  # fmt: skip
    return dataclasses.replace(preset("tiny"), **(base | changes))


def _losses(run) -> list[tuple[int, float, float]]:
    lines = (run / "log.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"], r["grad_norm"]) for r in map(json.loads, lines) if "loss" in r]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The same run in one process and on 2 ranks (``xmoe train --nproc 2``), and the 2-rank
    run resumed from its step-2 checkpoint on 1 process, on 2 and on 4 ranks."""
    import shutil

    from xmoe.cli.main import main
    from xmoe.distributed.training import train_distributed
    from xmoe.training.checkpoint import previous_path
    from xmoe.training.trainer import train

    root = tmp_path_factory.mktemp("distributed")
    config = _tiny()
    train(config, root / "one", progress=False)
    fields = ("grad_accum_steps", "batch_size", "max_steps", "eval_interval",
              "checkpoint_interval", "log_interval", "eval_batches")  # fmt: skip
    overrides = [f"{k}={getattr(config, k)}" for k in fields]
    args = ["train", "--preset", "tiny", "--nproc", "2", "--out", str(root / "two")]
    assert main([*args, "--no-progress", *overrides]) == 0
    for name in ("resume1", "resume2", "resume4"):  # back to step 2's checkpoint, as after a crash
        shutil.copytree(root / "two", root / name)
        checkpoint = root / name / "checkpoint.safetensors"
        previous_path(checkpoint).replace(checkpoint)
    train(config, root / "resume1", resume=True, progress=False)
    options = {"resume": True, "progress": False, "deadline_s": TIMEOUT_S}
    train_distributed(config, root / "resume2", 2, **options)
    train_distributed(config, root / "resume4", 4, **options)
    return root


def test_two_ranks_train_like_one_process(trained):
    one, two = _losses(trained / "one"), _losses(trained / "two")
    assert [s for s, *_ in two] == [1, 2, 3, 4]
    for (_, loss, norm), (_, ref_loss, ref_norm) in zip(two, one, strict=True):
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        assert norm == pytest.approx(ref_norm, rel=1e-4)


def test_a_two_rank_run_resumes_on_two_ranks_bit_for_bit(trained):
    assert _losses(trained / "resume2") == _losses(trained / "two")


@pytest.mark.parametrize("run", ["resume1", "resume4"])
def test_a_two_rank_checkpoint_resumes_on_1_and_on_4(trained, run):
    one = _losses(trained / "one")
    resumed = _losses(trained / run)
    assert [s for s, *_ in resumed] == [1, 2, 3, 4]
    for (_, loss, norm), (_, ref_loss, ref_norm) in zip(resumed, one, strict=True):
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        assert norm == pytest.approx(ref_norm, rel=1e-4)


def test_the_two_rank_checkpoint_is_the_single_process_format(trained):
    from xmoe.training.checkpoint import load_checkpoint
    from xmoe.training.trainer import load_model

    one = load_checkpoint(trained / "one")
    two = load_checkpoint(trained / "resume4")
    assert one.model_state.keys() == two.model_state.keys()
    for name, value in one.model_state.items():
        assert two.model_state[name].shape == value.shape, name
        assert torch.allclose(two.model_state[name], value, rtol=1e-4, atol=1e-6), name
    assert one.optimizer_state["state"].keys() == two.optimizer_state["state"].keys()
    model, _, meta = load_model(trained / "resume4")
    assert meta["step"] == 4 and model.moe_layers[0].experts.w1.shape[0] == 8


def test_grad_accum_steps_must_split_over_the_ranks(tmp_path):
    from xmoe.distributed.training import train_distributed

    with pytest.raises(DistributedError, match="grad_accum_steps=3 is invalid with 2 processes"):
        train_distributed(
            _tiny(grad_accum_steps=3), tmp_path / "r", 2, progress=False, deadline_s=TIMEOUT_S
        )


def test_a_failure_on_rank_0_alone_stops_every_rank(tmp_path):
    """Only rank 0 takes the run's lock: held elsewhere, rank 0 fails and the others are told."""
    from xmoe.distributed.training import train_distributed
    from xmoe.training.rundir import RunDir

    run = tmp_path / "run"
    with RunDir(run).lock("another writer"), pytest.raises(DistributedError, match="in use by"):
        train_distributed(_tiny(), run, 2, progress=False, deadline_s=TIMEOUT_S)


def test_distributed_benchmark_quick(tmp_path):
    from benchmarks.distributed import main, scale_model_rows

    main(["--quick", "--ranks", "1", "2", "--steps", "1", "--out", str(tmp_path)])
    table = (tmp_path / "distributed_cpu_quick.md").read_text()
    assert "python -m benchmarks.distributed --quick" in table
    rows = [line for line in table.splitlines() if line.startswith("| 2 | ")]
    assert len(rows) == 1
    assert abs(float(rows[0].split("|")[-2])) < 1e-5  # the same loss as 1 process
    # the paper model: all-to-all over compute grows as links slow down
    ratios = {(r["shape"], r["cluster"]): r["ratio"] for r in scale_model_rows()}
    for shape in {s for s, _ in ratios}:
        values = [v for (s, _), v in ratios.items() if s == shape]
        assert values == sorted(values)


def test_the_cli_names_the_field_when_nproc_does_not_split_the_step(tmp_path, capsys):
    from xmoe.cli.main import main

    code = main(["train", "--preset", "tiny", "--nproc", "2", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1].startswith("xmoe: error: rank ") and "grad_accum_steps=1 is invalid" in err[-1]
