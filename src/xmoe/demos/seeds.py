"""The demo over several seeds: ``python -m xmoe.demos.seeds`` -> docs/results/demo.md.

Each seed runs :func:`xmoe.demos.lm.run_lm_demo` exactly as ``make demo`` does (sample text and
per-token lines included, so the wall time is the demo's) and stores its numbers atomically in
``<out>/seed<N>.json``; a rerun skips the seeds already done, so an interrupted table resumes.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from xmoe.demos.lm import (
    BASELINE,
    DEMO_VOCAB,
    FLOP_BUDGET,
    FLOP_TARGET,
    XMOE,
    LMDemoSettings,
    demo_config,
    run_lm_demo,
)
from xmoe.storage import atomic_write_text

REPORT = Path("docs/results/demo.md")


def run_seed(seed: int, steps: int, out: Path) -> dict:
    """The stored result of ``seed``, running the demo for it first if it is not stored."""
    path = out / f"seed{seed}.json"
    if path.is_file():
        stored = json.loads(path.read_text(encoding="utf-8"))
        if stored.get("steps") == steps:
            return stored
    result = run_lm_demo(LMDemoSettings(steps=steps, out=out / f"runs-seed{seed}", seed=seed))
    result |= {"seed": seed, "steps": steps, "threads": torch.get_num_threads()}
    atomic_write_text(path, json.dumps(result, indent=1) + "\n")
    return result


def report(results: list[dict], command: str) -> str:
    """The markdown page of the seed table."""
    steps = results[0]["steps"]
    config = demo_config(BASELINE, LMDemoSettings(steps=steps))
    tokens = steps * config.batch_size * config.seq_len
    trained = f"{XMOE} t={demo_config(XMOE, LMDemoSettings(steps=steps)).model.moe.threshold}"
    lines = [
        "# The demo over seeds: XMoE against top-2 on the demo's budget",
        "",
        f"Made by `{command}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
        f"Machine: {platform.machine()}, {results[0]['threads']} torch threads, "
        f"torch {torch.__version__}, fp32, CPU.",
        "",
        f"Each seed runs `make demo` (`xmoe demo --seed N`): `{BASELINE}` and `{XMOE}` presets, "
        f"BPE vocabulary {DEMO_VOCAB}, {steps} steps of {config.batch_size} x {config.seq_len} "
        f"({tokens:,} training tokens per model), validation on the first "
        "16 x 16 x 128 held-out tokens, dropless. "
        f"{XMOE} is evaluated at its trained threshold and at the largest t of 0.9, 0.8, ... "
        f"whose MoE FLOPs on training tokens are <= {FLOP_BUDGET}x top-2's (chosen t; no "
        "retraining). 'x top-2' is MoE FLOPs per token over top-2's. Wall time is the whole demo "
        "(data from the cache, both trainings, evaluation, sample, per-token lines).",
        "",
        f"Target: {XMOE} at the chosen t with perplexity <= top-2's at <= {FLOP_TARGET}x "
        "top-2's MoE FLOPs, in every seed.",
        "",
        f"| seed | top-2 ppl | {trained} ppl | x top-2 | chosen t | ppl | x top-2 "
        "| change vs top-2 | experts/token | target | wall time |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        base, full = r["rows"][BASELINE], r["rows"][trained]
        best = r["rows"][f"{XMOE} t={r['threshold']}"]
        change = 100.0 * (best["perplexity"] / base["perplexity"] - 1.0)
        lines.append(
            f"| {r['seed']} | {base['perplexity']:.2f} | {full['perplexity']:.2f} | "
            f"{full['flop_ratio']:.2f} | {r['threshold']} | {best['perplexity']:.2f} | "
            f"{best['flop_ratio']:.2f} | {change:+.1f}% | {best['experts_per_token']:.2f} | "
            f"{'met' if r['shown'] else 'missed'} | {r['wall_seconds'] / 60:.1f} min |"
        )
    met = sum(r["shown"] for r in results)
    lines += ["", f"Target met in {met} of {len(results)} seeds.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=LMDemoSettings.steps)
    parser.add_argument("--out", type=Path, default=Path("runs/demo-seeds"))
    parser.add_argument("--report", type=Path, default=REPORT)
    args = parser.parse_args(argv)
    results = [run_seed(seed, args.steps, args.out) for seed in args.seeds]
    command = "python -m xmoe.demos.seeds " + " ".join(
        ["--seeds", *map(str, args.seeds), "--steps", str(args.steps)]
    )
    atomic_write_text(args.report, report(results, command))
    print(f"wrote {args.report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
