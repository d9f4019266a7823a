"""`make demo`: train a top-2 LM and an XMoE LM of equal size on Shakespeare + KJV, then show
the trade the paper claims: XMoE at top-2's perplexity or better for about half of top-2's MoE
FLOPs, and how the number of experts differs from token to token.

The demo budget is sized for about five minutes on 2 CPU cores: a 2048-entry BPE vocabulary (the
8192-entry LM head of the presets dominated a step) and more, not bigger, steps. Everything else
is the presets' (``top2`` and ``xmoe-32``). XMoE is evaluated at its trained threshold and at
the largest t of a grid whose MoE FLOPs, measured on training tokens, are at most half of
top-2's (t is an inference knob: no retraining; the validation text plays no part in choosing it).
``python -m xmoe.demos.seeds`` runs this demo over several seeds (docs/results/demo.md).
"""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from xmoe.data import eval_batches
from xmoe.experiments.reproduce import HEADLINE_THRESHOLD
from xmoe.registry import ROUTERS
from xmoe.training.config import apply_overrides
from xmoe.training.evaluate import evaluate
from xmoe.training.presets import preset
from xmoe.training.text import expert_count_lines, load_text_model
from xmoe.training.trainer import load_model, load_token_data, train

BASELINE, XMOE = "top2", "xmoe-32"
DEMO_VOCAB = 2048
DEMO_BATCH = 16
DEMO_EVAL_BATCHES = 16
FLOP_BUDGET = 0.5  # XMoE's evaluation threshold is chosen to compute at most this x top-2's
FLOP_TARGET = 0.6  # what the demo must show: XMoE's perplexity <= top-2's at <= this x its FLOPs
THRESHOLD_GRID = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)
CALIBRATION_BATCHES = 2
SENTENCE = "To be, or not to be, that is the question: and God said, Let there be light."
REPRODUCTION_PAGE = Path("docs/results/lm.md")


@dataclass(frozen=True)
class LMDemoSettings:
    """steps: optimizer steps per model (batches of 16 x 128 tokens); out: scratch run
    directories (replaced on every run); seed: initialisation and batch order; quiet: skip the
    text sample and the per-token lines (the seed table measures the same training)."""

    steps: int = 450
    out: Path = Path("runs/demo")
    seed: int = 0
    quiet: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps={self.steps!r} is invalid: must be an integer >= 1")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed={self.seed!r} is invalid: must be an integer >= 0")


def demo_config(name: str, settings: LMDemoSettings):
    """The demo's :class:`TrainConfig` for preset ``name``: the preset on the demo budget."""
    return apply_overrides(
        preset(name),
        [
            f"model.vocab_size={DEMO_VOCAB}",
            f"max_steps={settings.steps}",
            f"batch_size={DEMO_BATCH}",
            f"seed={settings.seed}",
            "eval_batches=4",
            f"eval_interval={settings.steps}",
            f"checkpoint_interval={settings.steps}",
        ],
    )


def _row(ev, baseline_mflops: float | None = None) -> dict[str, float]:
    mflops = ev.moe_flops_per_token / 1e6
    return {
        "perplexity": ev.perplexity,
        "moe_mflops": mflops,
        "flop_ratio": mflops / baseline_mflops if baseline_mflops else 1.0,
        "experts_per_token": ev.experts_per_token,
    }


@torch.no_grad()
def experts_used_shares(model, tokens: np.ndarray, seq_len: int) -> dict[str, float]:
    """Share of (token, MoE layer) decisions that computed 1, 2, 3 and 4+ experts, on the first
    validation batch (eval mode, dropless)."""
    x_BT, _ = next(iter(eval_batches(tokens, DEMO_BATCH, seq_len, 1)))
    was_training = model.training
    model.eval()
    counts = torch.cat([s.kept_per_token.flatten() for s in model(x_BT).routing])
    model.train(was_training)
    shares = {str(k): float((counts == k).float().mean()) for k in (1, 2, 3)}
    shares["4+"] = float((counts >= 4).float().mean())
    return shares


def threshold_for_budget(model, tokens: np.ndarray, seq_len: int, baseline_flops: float) -> float:
    """The largest t of :data:`THRESHOLD_GRID` at which ``model`` computes at most
    :data:`FLOP_BUDGET` x ``baseline_flops`` MoE FLOPs per token on the first windows of
    ``tokens`` (training tokens); the smallest t of the grid if none does."""
    for threshold in THRESHOLD_GRID:
        model.set_threshold(threshold)
        ev = evaluate(model, tokens, DEMO_BATCH, seq_len, CALIBRATION_BATCHES)
        if ev.moe_flops_per_token <= FLOP_BUDGET * baseline_flops:
            return threshold
    return THRESHOLD_GRID[-1]


def reproduction_headline(page: Path = REPRODUCTION_PAGE) -> str | None:
    """The reproduction's headline line for xmoe-32 (docs/results/lm.md), if the page is here."""
    if not page.is_file():
        return None
    pattern = rf"^- ({XMOE} at t={HEADLINE_THRESHOLD}: perplexity .*? top-2's MoE FLOPs)"
    match = re.search(pattern, page.read_text(encoding="utf-8"), flags=re.M)
    return match.group(1) if match else None


def run_lm_demo(settings: LMDemoSettings) -> dict:
    """Train both models, evaluate, print the comparison; returns the numbers printed."""
    started = time.perf_counter()
    configs = {name: demo_config(name, settings) for name in (BASELINE, XMOE)}
    print("Preparing Shakespeare + King James Bible (fetched once, then cached) ...")
    data = load_token_data(configs[BASELINE])
    tokens_per_model = settings.steps * DEMO_BATCH * configs[BASELINE].seq_len
    print(
        f"  {len(data.train):,} training tokens, {len(data.val):,} validation tokens, "
        f"BPE vocabulary {DEMO_VOCAB}; each model trains on {tokens_per_model:,} tokens\n"
    )
    train_seconds = {}
    for name, config in configs.items():
        moe = config.model.moe
        rule = ", ".join(
            f"{knob}={moe.tunable(knob)}" for knob in ROUTERS[moe.router].tunable_names
        )
        print(f"Training {name}: {moe.num_experts} experts x {moe.d_expert}, {rule}")
        shutil.rmtree(settings.out / name, ignore_errors=True)
        begun = time.perf_counter()
        train(config, settings.out / name, data=data)
        train_seconds[name] = time.perf_counter() - begun

    seq_len = configs[BASELINE].seq_len
    baseline, _, _ = load_model(settings.out / BASELINE)
    rows = {BASELINE: _row(evaluate(baseline, data.val, DEMO_BATCH, seq_len, DEMO_EVAL_BATCHES))}
    base_flops = rows[BASELINE]["moe_mflops"] * 1e6
    model, _, _ = load_model(settings.out / XMOE)
    trained = configs[XMOE].model.moe.threshold
    chosen = threshold_for_budget(model, data.train, seq_len, base_flops)
    for threshold in (trained, chosen):
        model.set_threshold(threshold)  # an inference knob: no retraining
        ev = evaluate(model, data.val, DEMO_BATCH, seq_len, DEMO_EVAL_BATCHES)
        rows[f"{XMOE} t={threshold}"] = _row(ev, rows[BASELINE]["moe_mflops"])
    headline_label = f"{XMOE} t={chosen}"
    shares = experts_used_shares(model, data.val, seq_len)  # model: XMoE at the chosen t

    eval_tokens = DEMO_EVAL_BATCHES * DEMO_BATCH * seq_len
    print(f"\nValidation ({eval_tokens:,} held-out tokens, dropless):")
    print(
        f"{'model':>14} | {'val ppl':>8} | {'MoE MFLOP/token':>15} | {'x top-2':>7} "
        f"| {'experts/token':>13}"
    )
    for label, row in rows.items():
        print(
            f"{label:>14} | {row['perplexity']:8.2f} | {row['moe_mflops']:15.3f} | "
            f"{row['flop_ratio']:7.2f} | {row['experts_per_token']:13.2f}"
        )
    best, base = rows[headline_label], rows[BASELINE]
    change = 100.0 * (best["perplexity"] / base["perplexity"] - 1.0)
    shown = best["perplexity"] <= base["perplexity"] and best["flop_ratio"] <= FLOP_TARGET
    print(
        f"\n{headline_label}: perplexity {best['perplexity']:.2f} vs top-2 "
        f"{base['perplexity']:.2f} ({change:+.1f}%) at {best['flop_ratio']:.2f}x top-2's MoE "
        f"FLOPs: {'XMoE matches or beats top-2 at' if shown else 'not shown this run:'} "
        f"<= {FLOP_TARGET}x the FLOPs{'' if shown else ' with equal or better perplexity'}."
    )
    print(
        f"  t={chosen} is the largest t of {THRESHOLD_GRID[0]}, {THRESHOLD_GRID[1]}, ... whose "
        f"MoE FLOPs on training tokens are <= {FLOP_BUDGET}x top-2's."
    )
    print(
        f"  Its tokens use different numbers of experts (per MoE layer, t={chosen}): "
        + ", ".join(f"{k}: {100 * v:.0f}%" for k, v in shares.items())
    )
    headline = reproduction_headline()
    print(
        f"  Reproduction (`make reproduce`, 2M tokens x 3 seeds, vocabulary 8192, "
        f"{REPRODUCTION_PAGE}): {headline or 'see that page'}."
    )
    print("  This demo over 3 seeds: docs/results/demo.md (`python -m xmoe.demos.seeds`).")

    if not settings.quiet:
        from xmoe.hf.generation import generate_text  # imports transformers: only to sample

        lm, codec = load_text_model(settings.out / XMOE)
        text, stats = generate_text(lm, codec, "ROMEO:", max_new_tokens=60, seed=settings.seed)
        print(f"\nSample from {XMOE} ({stats['tokens_per_second']:.0f} tokens/s):\n{text}\n")
        for threshold in (trained, chosen):
            model.set_threshold(threshold)
            print(f"Experts used per token by {XMOE} at t={threshold} (mean of its MoE layers):")
            print("\n".join(expert_count_lines(model, codec, SENTENCE)) + "\n")
    seconds = time.perf_counter() - started
    print(f"Demo finished in {seconds / 60:.1f} min.")
    return {
        "rows": rows,
        "threshold": chosen,
        "experts_used_shares": shares,
        "train_seconds": train_seconds,
        "wall_seconds": seconds,
        "shown": shown,
    }
