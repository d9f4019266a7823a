"""transformers experts back-ends: ``experts_implementation="xmoe"`` against transformers' own
``eager`` and ``grouped_mm`` on Mixtral and Qwen3-MoE, and xmoe's threshold knob t.

Each family's seeded random-initialised model is built once per back-end with the same weights.
Timed side by side and interleaved (median of the rounds after warm-up), inference mode: the
experts call of the first MoE layer on routing captured from one forward, and the whole model
forward; then forward+backward of that experts call at t=1. Writes
``docs/benchmarks/hf_experts.md``.

    python -m benchmarks.hf_experts [--threads 1 2] [--rounds 7] [--warmup 2] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, MixtralConfig, PretrainedConfig, Qwen3MoeConfig

from xmoe.hf.experts import (
    KEPT_ATTR,
    ExpertCounter,
    register_experts_implementation,
    set_expert_threshold,
)

from benchmarks.harness import TIMING_MALLOC_ENV, reexec_with, time_interleaved

THRESHOLDS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)
BASELINES = ("eager", "grouped_mm")


@dataclass(frozen=True)
class Size:
    hidden: int
    expert: int  # intermediate size of one expert
    experts: int
    top_k: int
    layers: int
    heads: int
    vocab: int
    batch: int
    seq: int


FULL = Size(hidden=256, expert=256, experts=32, top_k=8, layers=2, heads=4, vocab=1024,
            batch=4, seq=128)  # fmt: skip
QUICK = Size(hidden=32, expert=16, experts=8, top_k=4, layers=1, heads=2, vocab=64, batch=2, seq=8)


def _shared(size: Size) -> dict:
    return {
        "vocab_size": size.vocab,
        "hidden_size": size.hidden,
        "num_hidden_layers": size.layers,
        "num_attention_heads": size.heads,
        "num_key_value_heads": size.heads,
        "num_experts_per_tok": size.top_k,
        "max_position_embeddings": 2 * size.seq,
    }


FAMILIES: dict[str, Callable[[Size], PretrainedConfig]] = {
    "Mixtral": lambda s: MixtralConfig(
        **_shared(s), intermediate_size=s.expert, num_local_experts=s.experts
    ),
    # as the released Qwen3-MoE checkpoints: top-k weights renormalised, MoE in every layer
    "Qwen3-MoE": lambda s: Qwen3MoeConfig(
        **_shared(s),
        intermediate_size=s.expert,
        moe_intermediate_size=s.expert,
        num_experts=s.experts,
        norm_topk_prob=True,
    ),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    return parser.parse_args(argv)


def build_models(family: str, size: Size, device, dtype) -> dict[str, nn.Module]:
    """One model per back-end (eager, grouped_mm, xmoe), all with the seed-0 weights."""
    config = FAMILIES[family](size)
    models: dict[str, nn.Module] = {}
    for implementation in (*BASELINES, "xmoe"):
        torch.manual_seed(0)
        # each its own config: from_config writes the implementation into the one it is given
        model = AutoModelForCausalLM.from_config(
            copy.deepcopy(config), experts_implementation=implementation
        )
        if models:
            model.load_state_dict(models["eager"].state_dict())
        models[implementation] = model.to(device, dtype).eval()
    return models


def _first_experts(model: nn.Module) -> nn.Module:
    return next(m for m in model.modules() if hasattr(m, "gate_up_proj"))


@torch.no_grad()
def capture_experts_call(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(hidden_states, top_k_index, top_k_weights) the first experts module gets for ``ids``."""
    captured = []
    handle = _first_experts(model).register_forward_pre_hook(
        lambda module, inputs: captured.append(inputs)
    )
    model(ids)
    handle.remove()
    return captured[0]


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def _experts_fwd_bwd(module: nn.Module, inputs, cotangent: torch.Tensor) -> Callable[[], None]:
    hidden, index, weights = inputs
    hidden = hidden.detach().requires_grad_(True)
    weights = weights.detach().requires_grad_(True)

    def run() -> None:
        hidden.grad = weights.grad = None
        module.zero_grad(set_to_none=True)
        module(hidden, index, weights).backward(cotangent)

    return run


def bench_family(family: str, size: Size, args, device, dtype) -> tuple[str, str]:
    """Times one family at the current thread count; returns (sweep table, fwd+bwd table)."""
    models = build_models(family, size, device, dtype)
    xmoe = models["xmoe"]
    ids = torch.randint(
        0, size.vocab, (size.batch, size.seq), generator=torch.Generator().manual_seed(1)
    ).to(device)
    inputs = capture_experts_call(models["eager"], ids)
    experts = {name: _first_experts(model) for name, model in models.items()}

    with torch.no_grad():
        logits_error = _relative_error(xmoe(ids).logits, models["eager"](ids).logits)
        experts_error = _relative_error(experts["xmoe"](*inputs), experts["eager"](*inputs))

    def at(threshold: float, fn: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            set_expert_threshold(xmoe, threshold)  # microseconds: a walk over the modules
            fn()

        return run

    layer_fns, model_fns = {}, {}
    for name in BASELINES:
        layer_fns[name] = lambda m=experts[name]: m(*inputs)
        model_fns[name] = lambda m=models[name]: m(ids)
    layer_kept, model_kept = {}, {}
    for threshold in THRESHOLDS:
        name = f"xmoe t={threshold}"
        layer_fns[name] = at(threshold, lambda: experts["xmoe"](*inputs))
        model_fns[name] = at(threshold, lambda: xmoe(ids))
        with torch.no_grad():
            layer_fns[name]()
            layer_kept[name] = getattr(experts["xmoe"], KEPT_ATTR).float().mean().item()
            with ExpertCounter(xmoe) as counter:
                model_fns[name]()
            model_kept[name] = counter.experts_per_token
    with torch.no_grad():
        layer = time_interleaved(layer_fns, args.rounds, args.warmup, device)
        whole = time_interleaved(model_fns, args.rounds, args.warmup, device)

    rows = []
    for name in layer_fns:
        kept = f"{layer_kept[name]:.2f} / {model_kept[name]:.2f}" if name in layer_kept else ""
        row = [name, kept or f"{size.top_k} / {size.top_k}"]
        for timing in (layer, whole):
            median = timing[name].median_ms
            row += [f"{median:.2f}"]
            row += [f"{median / timing[base].median_ms:.2f}x" for base in BASELINES]
        rows.append(row)
        print("  " + " | ".join(row), flush=True)
    header = ["back-end", "experts/token (layer 0 / model)", "experts call ms"]
    header += [f"/ {base}" for base in BASELINES] + ["model forward ms"]
    header += [f"/ {base}" for base in BASELINES]
    sweep = _table(header, rows) + (
        f"\n\nxmoe at t=1 against eager: max relative error {experts_error:.1e} (experts call), "
        f"{logits_error:.1e} (logits)."
    )

    cotangent = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(2))
    training = time_interleaved(
        {n: _experts_fwd_bwd(m, inputs, cotangent.to(device, dtype)) for n, m in experts.items()},
        args.rounds,
        args.warmup,
        device,
    )
    train_rows = [
        [name, f"{t.median_ms:.2f}"]
        + [f"{t.median_ms / training[base].median_ms:.2f}x" for base in BASELINES]
        for name, t in training.items()
    ]
    train_header = ["back-end", "experts call fwd+bwd ms", *[f"/ {b}" for b in BASELINES]]
    return sweep, _table(train_header, train_rows)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.device == "cpu":
        reexec_with(TIMING_MALLOC_ENV)
    register_experts_implementation()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    size = QUICK if args.quick else FULL
    machine = f"{platform.processor() or platform.machine()}, torch {torch.__version__}"
    if device.type == "cuda":
        machine += f", {torch.cuda.get_device_name()}"
    print(f"transformers experts back-ends benchmark: {machine}", flush=True)
    sections = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for family in FAMILIES:
            print(f"\n== {family}, {threads} thread(s)", flush=True)
            sweep, training = bench_family(family, size, args, device, dtype)
            title = f"### {family}, {threads} thread{'s' if threads > 1 else ''}"
            sections.append(
                f"{title}: inference, t from 1 to 0.5\n\n{sweep}\n\n"
                f"{title}: training step of the experts call (t=1)\n\n{training}"
            )

    command = "python -m benchmarks.hf_experts " + " ".join(sys.argv[1:] if argv is None else argv)
    tokens = size.batch * size.seq
    document = "\n\n".join(
        [
            f"# transformers experts back-ends and the threshold knob ({args.device}, "
            f"{args.dtype})",
            f"Made by `{command.strip()}` (`make bench`) on {datetime.now(UTC):%Y-%m-%d %H:%M} "
            f"UTC. Machine: {machine}. Times are medians over {args.rounds} interleaved round(s) "
            f"after {args.warmup} warm-up round(s); ratios divide medians of the same run.",
            f"Models: random-initialised (seed 0) Mixtral and Qwen3-MoE, {size.layers} layer(s), "
            f"hidden {size.hidden}, {size.experts} experts of width {size.expert}, top-"
            f"{size.top_k}, vocabulary {size.vocab}; input {size.batch} x {size.seq} = {tokens} "
            "tokens. Each back-end's model has the same weights. 'experts call' is the first "
            "MoE layer's experts module on the routing captured from one forward (the part the "
            "back-end replaces; the router is the model's own); 'model forward' is the whole "
            'causal LM. `xmoe t=…` is `experts_implementation="xmoe"` with '
            "`set_expert_threshold(model, t)`: each token keeps its best routed experts whose "
            "renormalised top-k mass reaches t, with their raw weights; dropped pairs are not "
            "computed. experts/token is measured (first layer on the captured routing / mean "
            "over the layers of the model forward).",
            "**Random-initialised routers are near uniform**: a token's top-k weights are "
            "almost equal, so t removes experts roughly in proportion (about t·k kept). A "
            "trained router is peaked, and the same t keeps fewer experts; these rows show "
            "what the compute saving is worth in time, not the quality cost, which needs a "
            "trained model.",
            *sections,
        ]
    )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"hf_experts{'_quick' if args.quick else ''}.md"
    path.write_text(document + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
