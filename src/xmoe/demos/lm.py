"""`make demo`: fetch the corpus, train a small XMoE LM and a top-2 LM of equal size, compare
them, sample text, and show how many experts each token of a sentence used."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from xmoe.demos.text import TextCodec, expert_count_lines, generate_text
from xmoe.experiments.reproduce import HEADLINE_THRESHOLD
from xmoe.training.config import apply_overrides
from xmoe.training.evaluate import evaluate
from xmoe.training.presets import preset
from xmoe.training.rundir import RunDir
from xmoe.training.trainer import load_model, load_token_data, train

DEMO_PRESETS = ("xmoe-32", "top2")
SENTENCE = "To be, or not to be, that is the question: and God said, Let there be light."


@dataclass
class LMDemoSettings:
    """steps: optimizer steps per model (batches of 16 x 128 tokens); out: scratch run
    directories (replaced on every run); seed: initialisation and batch order."""

    steps: int = 120
    out: Path = Path("runs/demo")
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps={self.steps} is invalid: must be >= 1")


def run_lm_demo(settings: LMDemoSettings) -> dict[str, dict[str, float]]:
    print("Preparing Shakespeare + King James Bible (fetched once, then cached) ...")
    data = load_token_data(preset("dense"))
    print(f"  {len(data.train):,} training tokens, {len(data.val):,} validation tokens\n")
    results = {}
    for name in DEMO_PRESETS:
        config = apply_overrides(
            preset(name),
            [
                f"max_steps={settings.steps}",
                "batch_size=16",
                f"seed={settings.seed}",
                "eval_batches=8",
                f"eval_interval={settings.steps}",
                f"checkpoint_interval={settings.steps}",
            ],
        )
        run_dir = settings.out / name
        shutil.rmtree(run_dir, ignore_errors=True)
        moe = config.model.moe
        rule = f"top-{moe.top_k}" if moe.router == "topk" else f"t={moe.threshold}"
        print(f"Training {name}: {moe.num_experts} experts x {moe.d_expert}, {rule}")
        result = train(config, run_dir, data=data)
        ev = result.final_eval
        results[name] = {
            "perplexity": ev.perplexity,
            "moe_mflops": ev.moe_flops_per_token / 1e6,
            "experts_per_token": ev.experts_per_token,
            "tokens_per_second": result.train_tokens_per_second,
        }

    xmoe_dir = settings.out / DEMO_PRESETS[0]
    model, config, _ = load_model(xmoe_dir)
    model.set_threshold(HEADLINE_THRESHOLD)  # an inference knob: no retraining
    ev = evaluate(model, data.val, config.batch_size, config.seq_len, config.eval_batches)
    results[f"{DEMO_PRESETS[0]} t={HEADLINE_THRESHOLD}"] = {
        "perplexity": ev.perplexity,
        "moe_mflops": ev.moe_flops_per_token / 1e6,
        "experts_per_token": ev.experts_per_token,
        "tokens_per_second": results[DEMO_PRESETS[0]]["tokens_per_second"],
    }

    print(f"\nAfter {settings.steps} steps of 16 x 128 tokens (validation, dropless):")
    print(
        f"{'model':>14} | {'val ppl':>8} | {'MoE MFLOP/token':>15} | {'x top-2':>7} "
        f"| {'experts/token':>13}"
    )
    top2_flops = results["top2"]["moe_mflops"]
    for name, row in results.items():
        print(
            f"{name:>14} | {row['perplexity']:8.2f} | {row['moe_mflops']:15.3f} | "
            f"{row['moe_mflops'] / top2_flops:7.2f} | {row['experts_per_token']:13.2f}"
        )
    text, stats = generate_text(xmoe_dir, "ROMEO:", max_new_tokens=60, seed=settings.seed)
    print(f"\nSample from {DEMO_PRESETS[0]} ({stats['tokens_per_second']:.0f} tokens/s):\n{text}\n")
    codec = TextCodec(RunDir(xmoe_dir), config.model.vocab_size)
    for threshold in (0.9, HEADLINE_THRESHOLD):
        model.set_threshold(threshold)
        print(f"Experts used per token by {DEMO_PRESETS[0]} at t={threshold} (mean of its layers):")
        print("\n".join(expert_count_lines(model, codec, SENTENCE)) + "\n")
    print(
        "Each token takes the experts it needs; lowering t at inference trades a little "
        "perplexity for compute. The multi-seed comparison at 8x this budget is "
        "`make reproduce` (docs/results/lm.md)."
    )
    return results
