"""Tuning benchmark: the measurements behind xmoe's size thresholds on this machine.

* ``CHUNK_ELEMENTS`` (:mod:`xmoe.experts.ffn_function`): expert-range chunk size of the fused
  expert FFN, at the layer benchmark's training size: forward+backward time of the ``grouped``
  and ``loop`` engines, and peak activation memory.
* ``DECODE_MAX_TOKENS`` (:mod:`xmoe.experts.decode`): up to how many tokens an inference call
  runs the decode path instead of the dispatch plan.
* The stacked weight layout at decode: one token through one expert's first layer, experts in
  turn (their weights read from memory, as in decode), with xmoe's (E, in, out) layout,
  ``nn.Linear``'s and transformers' (E, out, in), and a plain read of the same bytes.

    python -m benchmarks.tuning [--threads 2] [--rounds 5] [--quick]

Writes ``docs/benchmarks/tuning_cpu.md``. Times are ratios within one run (interleaved rounds).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch

from xmoe.experts import decode, ffn_function

from benchmarks.harness import (
    MEMORY_MALLOC_ENV,
    TIMING_MALLOC_ENV,
    peak_rss_mib,
    reexec_with,
    time_interleaved,
)
from benchmarks.variants import Setting, calibrated_xmoe, make_inputs, module_variant

CHUNK_SIZES = (1 << 17, 1 << 18, 1 << 19, 1 << 20, 1 << 21)
DECODE_TOKENS = (1, 2, 4, 8, 16, 32)
QUICK_CHUNK_SIZES = (1 << 12, 1 << 14)  # several chunks and one at the quick size
QUICK_DECODE_TOKENS = (1, 8)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    parser.add_argument("--probe-chunk", type=int, help=argparse.SUPPRESS)  # memory child
    return parser.parse_args(argv)


def _train_setting(args) -> Setting:
    size = (256, 64, 16, 32) if args.quick else (4096, 512, 64, 128)
    return Setting(*size, torch.device("cpu"), torch.float32)


def _train_layer(args, backend: str):
    return calibrated_xmoe(_train_setting(args), 4.0, threshold=0.9, backend=backend)


def _patched(module, name: str, value, fn):
    """``fn`` run with ``module.name`` set to ``value`` (restored afterwards)."""

    def run():
        saved = getattr(module, name)
        setattr(module, name, value)
        try:
            fn()
        finally:
            setattr(module, name, saved)

    return run


def _train_variant(args, backend: str):
    setting = _train_setting(args)
    return module_variant(_train_layer(args, backend), *make_inputs(setting))


def probe_memory(args) -> None:
    """Child process: peak activation MiB of one forward+backward at ``--probe-chunk``."""
    ffn_function.CHUNK_ELEMENTS = args.probe_chunk
    variant = _train_variant(args, "auto")
    variant.forward_backward()
    variant.reset_grads()
    peak = peak_rss_mib(variant.forward_backward)
    grads = sum(p.grad.numel() * p.grad.element_size() for p in variant.module.parameters())
    print(f"{peak - grads / 2**20:.2f}")


def _memory(args, chunk: int) -> str:

    command = [sys.executable, "-m", "benchmarks.tuning", "--probe-chunk", str(chunk)]
    if args.quick:
        command.append("--quick")
    env = {k: v for k, v in os.environ.items() if k not in TIMING_MALLOC_ENV}
    result = subprocess.run(
        command, capture_output=True, text=True, env={**env, **MEMORY_MALLOC_ENV}, check=False
    )
    return result.stdout.strip().splitlines()[-1] if result.returncode == 0 else "failed"


def chunk_section(args) -> str:
    setting = _train_setting(args)
    variants = {backend: _train_variant(args, backend) for backend in ("auto", "loop")}
    chunk_sizes = QUICK_CHUNK_SIZES if args.quick else CHUNK_SIZES
    fns = {
        (backend, chunk): _patched(ffn_function, "CHUNK_ELEMENTS", chunk, variant.forward_backward)
        for backend, variant in variants.items()
        for chunk in chunk_sizes
    }
    timing = time_interleaved(fns, args.rounds, args.warmup, torch.device("cpu"))
    best = min(t.min_ms for t in timing.values())
    rows = []
    for chunk in chunk_sizes:
        memory = _memory(args, chunk)
        cells = [f"{chunk:,} ({chunk * 4 / 2**20:g} MiB fp32)", f"{chunk // setting.d_model:,}"]
        for backend in variants:
            t = timing[(backend, chunk)]
            cells.append(f"{t.min_ms:.1f} / {t.median_ms:.1f} ({t.min_ms / best:.2f}x)")
        rows.append([*cells, memory])
        print("  " + " | ".join(rows[-1]), flush=True)
    header = ["CHUNK_ELEMENTS", "rows per chunk", "auto (grouped) fwd+bwd ms", "loop fwd+bwd ms",
              "peak activation MiB"]  # fmt: skip
    return (
        f"### Chunk size at T={setting.num_tokens}, d={setting.d_model}, "
        f"{setting.num_experts} experts x {setting.d_expert}, t=0.9 (about 4 experts/token)\n\n"
        "Times: min / median ms (min relative to the fastest cell); memory: forward+backward "
        "peak minus the parameter gradients it creates, in a fresh process.\n\n"
        + _table(header, rows)
    )


DECODE_SHAPES = {
    "lm presets (d=128, 32 x 128)": (128, 32, 128),
    "wide (d=512, 64 x 128)": (512, 64, 128),
}
QUICK_DECODE_SHAPES = {"quick (d=64, 16 x 32)": (64, 16, 32)}


def decode_section(args) -> str:
    shapes = QUICK_DECODE_SHAPES if args.quick else DECODE_SHAPES
    rows = []
    for shape_name, (d_model, experts, d_expert) in shapes.items():
        for num_tokens in QUICK_DECODE_TOKENS if args.quick else DECODE_TOKENS:
            rows += _decode_rows(args, shape_name, num_tokens, d_model, experts, d_expert)
    header = ["shape", "tokens", "layer", "experts/token", "decode path ms", "plan path ms",
              "decode / plan"]  # fmt: skip
    return (
        "### Decode path crossover (inference forward, routing included)\n\n"
        f"`DECODE_MAX_TOKENS` is {decode.DECODE_MAX_TOKENS}.\n\n" + _table(header, rows)
    )


def _decode_rows(args, shape_name, num_tokens, d_model, experts, d_expert):
    setting = Setting(num_tokens, d_model, experts, d_expert, torch.device("cpu"), torch.float32)
    layers = {
        "topk-4 SwiGLU": calibrated_xmoe(
            setting, 4.0, router="topk", top_k=4, activation="swiglu", bias=False
        ).eval(),
        "threshold t=0.9 GELU": calibrated_xmoe(setting, 4.0, threshold=0.9).eval(),
    }
    x = torch.randn(num_tokens, d_model, generator=torch.Generator().manual_seed(1))
    fns = {}
    for name, layer in layers.items():
        forward = module_variant(layer, x, x).forward  # inference: no_grad
        for path, limit in (("decode", 1 << 30), ("plan", 0)):
            fns[(name, path)] = _patched(decode, "DECODE_MAX_TOKENS", limit, forward)
    timing = time_interleaved(fns, args.rounds, args.warmup, torch.device("cpu"), calls=20)
    rows = []
    for name, layer in layers.items():
        with torch.no_grad():
            kept = layer(x).routing.experts_per_token
        d, p = timing[(name, "decode")].min_ms, timing[(name, "plan")].min_ms
        cells = [shape_name, str(num_tokens), name, f"{kept:.2f}", f"{d:.3f}", f"{p:.3f}"]
        rows.append([*cells, f"{d / p:.2f}x"])
        print("  " + " | ".join(rows[-1]), flush=True)
    return rows


def layout_section(args) -> str:
    shapes = QUICK_DECODE_SHAPES if args.quick else DECODE_SHAPES
    rows = []
    for shape_name, dims in shapes.items():
        rows += _layout_rows(args, shape_name, *dims)
    header = ["shape", "expert matrix", "product", "µs per expert", "/ xmoe layout"]
    return (
        "### Weight layout at decode (one token, one expert's first layer, experts in turn)\n\n"
        + _table(header, rows)
    )


def _layout_rows(args, shape_name, d_model, experts, d_expert):
    generator = torch.Generator().manual_seed(0)
    in_out = torch.randn(experts, d_model, d_expert, generator=generator)
    out_in = in_out.transpose(1, 2).contiguous()
    x_1D = torch.randn(1, d_model, generator=generator)
    turn = iter(range(1 << 62))

    def cycling(product):
        return lambda: product(next(turn) % experts)

    fns = {
        "xmoe (E, in, out): x @ W[e]": cycling(lambda e: torch.mm(x_1D, in_out[e])),
        "nn.Linear (E, out, in): x @ W[e].T": cycling(lambda e: torch.mm(x_1D, out_in[e].t())),
        "read the same bytes: W[e].sum()": cycling(lambda e: in_out[e].sum()),
    }
    timing = time_interleaved(fns, args.rounds, args.warmup, torch.device("cpu"), calls=200)
    base = timing["xmoe (E, in, out): x @ W[e]"].min_ms
    rows = []
    for name, t in timing.items():
        cells = [shape_name, f"{d_model} x {d_expert}", name, f"{t.min_ms * 1e3:.1f}"]
        rows.append([*cells, f"{t.min_ms / base:.2f}x"])
        print("  " + " | ".join(rows[-1]), flush=True)
    return rows


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.probe_chunk is not None:
        probe_memory(args)
        return
    reexec_with(TIMING_MALLOC_ENV)
    torch.set_num_threads(args.threads)
    machine = f"{platform.machine()}, {args.threads} threads, torch {torch.__version__}"
    print(f"xmoe tuning benchmark: {machine}", flush=True)
    parts = [chunk_section(args), decode_section(args), layout_section(args)]
    command = "python -m benchmarks.tuning " + " ".join(sys.argv[1:] if argv is None else argv)
    suffix = "cpu-quick" if args.quick else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"tuning_{suffix}.md"
    header = (
        f"# Tuning benchmark (cpu, float32)\n\nMade by `{command.strip()}` (`make bench`) on "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC. Machine: {machine}. Best of {args.rounds} "
        "interleaved rounds after a warm-up; the decode rows time bursts of 20 calls."
    )
    path.write_text("\n\n".join([header, *parts]) + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
