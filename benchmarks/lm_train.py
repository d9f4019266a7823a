"""LM training benchmark: training tokens/s (forward, backward and an AdamW step) of an XMoE
:class:`~xmoe.models.TransformerLM` against a dense TransformerLM of the same active FLOPs, same
width and depth.

    python -m benchmarks.lm_train [--threads 2] [--rounds 3] [--quick]

As in ``benchmarks.decode``, the untrained routers are scaled (one factor for the whole model,
found by bisection) until tokens want about ``--experts`` experts at t=0.9, a stand-in for a
trained, peaked router; the learning rate is tiny so that routing holds while timed. The dense
model's FFN width is the experts per token measured in a first training step times
``d_expert``. Writes ``docs/benchmarks/lm_train_cpu.md``.
"""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch

from xmoe import MoEConfig
from xmoe.models import ModelConfig, TransformerLM
from xmoe.models.usage import ExpertUsage

from benchmarks.harness import (
    TIMING_MALLOC_ENV,
    reexec_with,
    run_sizes,
    time_interleaved,
    write_xmoe_vs_dense,
)

TARGET_RATIO = 0.8
LEARNING_RATE = 1e-7

# name: (d_model, layers, heads, experts, d_expert, vocab, batch, seq_len)
SIZES = {
    "lm (the LM presets' shape)": (128, 4, 4, 32, 128, 8192, 16, 128),
    "wide (d=512, 64 x 128)": (512, 8, 8, 64, 128, 8192, 8, 128),
}
QUICK_SIZES = {"quick": (64, 2, 2, 16, 32, 512, 2, 16)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--experts", type=float, default=4.0, help="target experts per token")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    return parser.parse_args(argv)


def scale_routers(lm: TransformerLM, probe_BT: torch.Tensor, target: float) -> None:
    """Scale every MoE router of ``lm`` by one factor, found by bisection, so that tokens of
    ``probe_BT`` want about ``target`` experts (the routers' direction is kept)."""
    base = [layer.router.weight.detach() / layer.router.weight.std() for layer in lm.moe_layers]

    def apply(scale: float) -> None:
        with torch.no_grad():
            for layer, weight in zip(lm.moe_layers, base, strict=True):
                layer.router.weight.copy_(weight * scale)

    low, high = 0.01, 100.0
    training = lm.training
    lm.eval()
    with torch.no_grad():
        for _ in range(25):
            scale = (low * high) ** 0.5
            apply(scale)
            with ExpertUsage(lm) as usage:
                lm(probe_BT)
            low, high = (scale, high) if usage.experts_per_token > target else (low, scale)
    apply((low * high) ** 0.5)
    lm.train(training)


def _model_config(size, d_ff: int, moe: bool) -> ModelConfig:
    d_model, layers, heads, experts, d_expert, vocab, _, seq_len = size
    moe_config = (
        MoEConfig(d_model=d_model, num_experts=experts, d_expert=d_expert, threshold=0.9)
        if moe
        else None
    )
    return ModelConfig(
        vocab_size=vocab,
        d_model=d_model,
        num_layers=layers,
        num_heads=heads,
        max_seq_len=seq_len,
        d_ff=d_ff,
        moe=moe_config,
    )


def train_step_fn(lm: TransformerLM, tokens_BT: torch.Tensor) -> Callable[[], None]:
    """One training step on ``tokens_BT``: next-token loss plus aux loss, backward, AdamW.

    PyTorch's fused CPU AdamW, so that its per-parameter passes do not stand in for the layers'
    cost. A tiny learning rate: every step does the full optimizer work, but the weights barely
    move, so the calibrated routing (and the dense width matched to it) holds over the steps."""
    optimizer = torch.optim.AdamW(lm.parameters(), lr=LEARNING_RATE, fused=True)
    inputs_BT, targets_BT = tokens_BT[:, :-1], tokens_BT[:, 1:]
    lm.train()

    def step() -> None:
        out = lm(inputs_BT, targets_BT)
        (out.loss + out.aux_loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def bench_size(name: str, size, args) -> list[dict]:
    d_model, _, _, experts, d_expert, vocab, batch, seq_len = size
    generator = torch.Generator().manual_seed(1)
    tokens_BT = torch.randint(0, vocab, (batch, seq_len + 1), generator=generator)
    torch.manual_seed(0)
    xmoe_lm = TransformerLM(_model_config(size, round(args.experts * d_expert), True))
    scale_routers(xmoe_lm, tokens_BT[:, :-1], args.experts)
    xmoe_step = train_step_fn(xmoe_lm, tokens_BT)
    with ExpertUsage(xmoe_lm) as usage:
        xmoe_step()  # also the warm-up of the optimizer state
    experts_per_token = usage.experts_per_token
    torch.manual_seed(0)
    dense_lm = TransformerLM(
        _model_config(size, max(8, round(experts_per_token * d_expert)), False)
    )
    steps = {
        "xmoe (t=0.9)": xmoe_step,
        "dense, same active FLOPs": train_step_fn(dense_lm, tokens_BT),
    }
    with ExpertUsage(xmoe_lm) as usage:
        timings = time_interleaved(steps, args.rounds, args.warmup, torch.device("cpu"))
    experts_per_token = usage.experts_per_token  # over the timed steps
    tokens = batch * seq_len
    ffns = {
        "xmoe (t=0.9)": f"{experts} x {d_expert}, {experts_per_token:.2f} experts/token",
        "dense, same active FLOPs": f"d_ff {dense_lm.config.d_ff}",
    }
    return [
        {
            "size": name,
            "model": label,
            "ffn": ffns[label],
            "ms_per_step": timing.min_ms,
            "tokens_per_s": tokens / (timing.min_ms / 1e3),
            "median_tokens_per_s": tokens / (timing.median_ms / 1e3),
            "shape": f"B={batch}, T={seq_len}, d={d_model}",
        }
        for label, timing in timings.items()
    ]


def write_report(rows: list[dict], args, argv: list[str]) -> Path:
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / ("lm_train_cpu_quick.md" if args.quick else "lm_train_cpu.md")
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = " ".join(["python -m benchmarks.lm_train", *argv])
    lines = [
        "# LM training benchmark (cpu, float32)",
        "",
        f"Made by `{command}` (`make bench`) on {now}. Machine: {platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}. One training step is "
        "forward, next-token loss plus the routers' aux loss, backward and an AdamW step of a "
        f"`TransformerLM`; best of {args.rounds} interleaved rounds (median in brackets). MoE in "
        "every second block; the XMoE routers are scaled to want about "
        f"{args.experts:g} experts per token at t=0.9, and the learning rate ({LEARNING_RATE:g}) "
        "is too small to move them while timed; the dense model has the same width and depth, "
        "with FFN width the experts per token measured in a first training step times d_expert. "
        "AdamW is PyTorch's fused one.",
        "",
        "| size | shape | model | FFN | ms per step | tokens/s | xmoe / dense |",
        "|---|---|---|---|---|---|---|",
    ]
    return write_xmoe_vs_dense(
        path,
        lines,
        rows,
        lambda row: (
            f"{row['size']} | {row['shape']} | {row['model']} | {row['ffn']} "
            f"| {row['ms_per_step']:.1f}"
        ),
        TARGET_RATIO,
        lambda row: f"{row['size']}: xmoe training tokens/s",
    )


def main(argv: list[str] | None = None) -> None:
    reexec_with(TIMING_MALLOC_ENV)
    args = parse_args(argv)
    rows = run_sizes(
        "LM training benchmark",
        QUICK_SIZES if args.quick else SIZES,
        bench_size,
        args,
        lambda row: f"{row['size']} {row['model']}",
    )
    print(f"wrote {write_report(rows, args, sys.argv[1:] if argv is None else argv)}")


if __name__ == "__main__":
    main()
