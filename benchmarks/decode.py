"""Decode benchmark: greedy ``generate()`` tokens/s of an XMoE model against a dense model with
the same active FFN FLOPs, through the transformers classes and their KV cache.

    python -m benchmarks.decode [--threads 2] [--new-tokens 256] [--rounds 3] [--quick]

Untrained routers are near uniform, so each MoE layer's router is scaled (one factor for the
whole model, found by bisection) until tokens want about ``--experts`` experts at t=0.9, a
stand-in for a trained, peaked router. The dense model's FFN width is then set to the experts
per token measured during generation times ``d_expert``. Writes
``docs/benchmarks/decode_cpu.md``.
"""

from __future__ import annotations

import argparse
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch

from xmoe.hf import XMoEConfig, XMoEForCausalLM
from xmoe.models.usage import ExpertUsage

from benchmarks.harness import (
    TIMING_MALLOC_ENV,
    reexec_with,
    run_sizes,
    time_interleaved,
    write_xmoe_vs_dense,
)
from benchmarks.lm_train import scale_routers

TARGET_RATIO = 0.9
PROMPT_LEN = 16

# name: (d_model, layers, heads, experts, d_expert, vocab)
SIZES = {
    "lm (the LM presets' shape)": (128, 4, 4, 32, 128, 8192),
    "wide (d=512, 64 x 128)": (512, 8, 8, 64, 128, 8192),
}
QUICK_SIZES = {"quick": (64, 2, 2, 16, 32, 512)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--experts", type=float, default=4.0, help="target experts per token")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    return parser.parse_args(argv)


def _config(size, d_ff: int, moe: bool, max_len: int) -> XMoEConfig:
    d_model, layers, heads, experts, d_expert, vocab = size
    moe_config = {"d_model": d_model, "num_experts": experts, "d_expert": d_expert} if moe else None
    return XMoEConfig(
        vocab_size=vocab,
        d_model=d_model,
        num_layers=layers,
        num_heads=heads,
        max_seq_len=max_len,
        d_ff=d_ff,
        moe=moe_config,
    )


@torch.no_grad()
def calibrated_xmoe(size, target: float, max_len: int) -> XMoEForCausalLM:
    torch.manual_seed(0)
    d_expert = size[4]
    model = XMoEForCausalLM(_config(size, round(target * d_expert), True, max_len)).eval()
    probe = torch.randint(
        0, size[5], (8, min(64, max_len)), generator=torch.Generator().manual_seed(1)
    )
    scale_routers(model.model.lm, probe, target)
    return model


def _generate_fn(model, prompt, new_tokens):
    def run():
        model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )

    return run


def bench_size(name, size, args) -> list[dict]:
    max_len = PROMPT_LEN + args.new_tokens
    xmoe_model = calibrated_xmoe(size, args.experts, max_len)
    rows = []
    for batch in args.batches:
        prompt = torch.randint(
            1, size[5], (batch, PROMPT_LEN), generator=torch.Generator().manual_seed(2)
        )
        with ExpertUsage(xmoe_model) as usage:
            _generate_fn(xmoe_model, prompt, args.new_tokens)()
        experts = usage.experts_per_token
        d_expert = size[4]
        torch.manual_seed(0)
        dense = XMoEForCausalLM(
            _config(size, max(8, round(experts * d_expert)), False, max_len)
        ).eval()
        models = {"xmoe (t=0.9)": xmoe_model, "dense, same active FLOPs": dense}
        with torch.no_grad():
            timings = time_interleaved(
                {k: _generate_fn(m, prompt, args.new_tokens) for k, m in models.items()},
                args.rounds,
                args.warmup,
                torch.device("cpu"),
            )
        moe = xmoe_model.model.lm.config.moe
        dense_flops = dense.model.lm.config.dense_ffn_flops / 1e6
        xmoe_flops = (moe.expert_flops * experts + moe.router_flops) / 1e6
        for label, flops, ffn in (
            ("xmoe (t=0.9)", xmoe_flops, f"{size[3]} x {d_expert}, {experts:.2f} experts/token"),
            ("dense, same active FLOPs", dense_flops, f"d_ff {dense.config.d_ff}"),
        ):
            timing = timings[label]
            tokens = batch * args.new_tokens
            rows.append(
                {
                    "size": name,
                    "batch": batch,
                    "model": label,
                    "ffn": ffn,
                    "mflops": flops,
                    "ms_per_step": timing.min_ms / args.new_tokens,
                    "tokens_per_s": tokens / (timing.min_ms / 1e3),
                    "median_tokens_per_s": tokens / (timing.median_ms / 1e3),
                }
            )
    return rows


def write_report(rows: list[dict], args) -> Path:
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / ("decode_cpu_quick.md" if args.quick else "decode_cpu.md")
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = " ".join(["python -m benchmarks.decode", *sys.argv[1:]])
    lines = [
        "# Decode benchmark (cpu, float32)",
        "",
        f"Made by `{command}` (`make bench`) on "
        f"{now}. Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}. Greedy `generate()` of {args.new_tokens} new tokens after a "
        f"{PROMPT_LEN}-token prompt through `XMoEForCausalLM` with transformers' `DynamicCache`; "
        f"best of {args.rounds} interleaved rounds (median in brackets). MoE in every second "
        "block; "
        "the XMoE routers are scaled to want about "
        f"{args.experts:g} experts per token; the dense model's FFN width is the measured experts "
        "per token times d_expert. MFLOP/token counts one MoE-position FFN (plus router).",
        "",
        "| size | batch | model | FFN | MFLOP/token | ms per step | tokens/s | xmoe / dense |",
        "|---|---|---|---|---|---|---|---|",
    ]
    return write_xmoe_vs_dense(
        path,
        lines,
        rows,
        lambda row: (
            f"{row['size']} | {row['batch']} | {row['model']} | {row['ffn']} "
            f"| {row['mflops']:.3f} | {row['ms_per_step']:.2f}"
        ),
        TARGET_RATIO,
        lambda row: f"{row['size']}, batch {row['batch']}: xmoe decode tokens/s",
    )


def main(argv: list[str] | None = None) -> None:
    reexec_with(TIMING_MALLOC_ENV)
    args = parse_args(argv)
    rows = run_sizes(
        "decode benchmark",
        QUICK_SIZES if args.quick else SIZES,
        bench_size,
        args,
        lambda row: f"{row['size']} B={row['batch']} {row['model']}",
    )
    print(f"wrote {write_report(rows, args)}")


if __name__ == "__main__":
    main()
