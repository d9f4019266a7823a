"""The commands that run the bundled demos and experiments: ``xmoe demo`` (a small XMoE LM
against a top-2 LM), ``xmoe layer-demo`` (one layer, toy data) and ``xmoe reproduce`` (the paper's
family, or with ``--suite routers`` every registered router, over seeds)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def layer_demo_command(args: argparse.Namespace) -> int:
    from xmoe.demos.layer import DemoSettings, run_demo

    run_demo(DemoSettings(num_tokens=args.tokens, steps=args.steps, seed=args.seed))
    return 0


def demo_command(args: argparse.Namespace) -> int:
    from xmoe.demos.lm import LMDemoSettings, run_lm_demo

    steps = {} if args.steps is None else {"steps": args.steps}  # the default lives in settings
    run_lm_demo(LMDemoSettings(**steps, out=Path(args.out), seed=args.seed))
    return 0


def reproduce_command(args: argparse.Namespace) -> int:
    from xmoe.experiments.reproduce import QUICK, ReproduceSettings, reproduce

    routers = args.suite == "routers"
    out = args.out or ("runs/reproduce-routers" if routers else "runs/reproduce")
    values = {
        "suite": args.suite,
        "presets": args.presets and tuple(args.presets),  # None: the suite's rows
        "ablations": None if args.ablations is None else tuple(args.ablations),
        "seeds": (2 if routers else 3) if args.seeds is None else args.seeds,
        "tokens": args.tokens,
        "eval_batches": args.eval_batches,
        "jobs": args.jobs,
        "device": args.device,
        "out": Path(out),
        "docs": Path(args.docs),
        "progress": not args.no_progress,
        "command": "xmoe " + " ".join(sys.argv[1:]) if sys.argv[1:] else "xmoe reproduce",
    }
    if args.quick:  # a small budget into its own folders, so it never touches the real results
        values |= QUICK | {"out": Path(out + "-quick")}
        values["docs"] = values["out"] / "docs"
        if routers:
            values["ablations"] = None  # the lm suite's quick ablation is no routers row
    print(f"wrote {reproduce(ReproduceSettings(**values))}")
    return 0
