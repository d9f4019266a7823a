"""``xmoe sparsify``: a dense causal LM directory converted into neuron-group MoE MLPs, or with
``--eval`` the SmolLM2-135M quality/compute grid; and the ``--recover`` spec's parser."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def recover_spec(text: str) -> tuple[int, str, float]:
    """``SIZE:PARTITION:FRACTION`` (``16:clustered:0.5``) -> (16, "clustered", 0.5)."""
    parts = text.split(":")
    try:
        size, partition, fraction = int(parts[0]), parts[1], float(parts[2])
    except (IndexError, ValueError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not SIZE:PARTITION:FRACTION (e.g. 16:clustered:0.5)"
        ) from None
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"{text!r} is not SIZE:PARTITION:FRACTION")
    return size, partition, fraction


_CONVERT_ONLY = ("model", "expert_size", "out", "active_fraction", "threshold",
                 "calibration_text")  # fmt: skip
_EVAL_ONLY = ("run_dir", "docs", "expert_sizes", "fractions", "partitions", "routers", "recover",
              "xmoe_route", "xmoe_thresholds", "eval_tokens", "recovery_tokens",
              "recovery_lr", "timing_tokens", "timing_repeats")  # fmt: skip


def _sparsify_eval(args: argparse.Namespace) -> int:
    from xmoe.conversion.evaluation import EvalSettings, run_eval
    from xmoe.conversion.recovery import RecoveryConfig

    given = [name for name in _CONVERT_ONLY if getattr(args, name) is not None]
    if args.partition is not None or args.router is not None:
        given.append("partition/router")
    if args.force:
        given.append("force")
    if given:
        raise ValueError(
            f"--eval runs its own grid on SmolLM2-135M; it does not take {given} "
            "(use --expert-sizes, --partitions, --routers, --fractions)"
        )
    values = {
        "out": Path(args.run_dir or "runs/sparsify-eval"),
        "docs": Path(args.docs or "docs/results"),
        "progress": not args.no_progress,
        "command": "xmoe " + " ".join(sys.argv[1:]) if sys.argv[1:] else "xmoe sparsify --eval",
    }
    for name in ("expert_sizes", "fractions", "partitions", "routers", "xmoe_thresholds"):
        if getattr(args, name) is not None:
            values[name] = tuple(getattr(args, name))
    if args.recover is not None:
        values["recover"] = tuple(args.recover)
    for name in ("xmoe_route", "eval_tokens", "timing_tokens", "timing_repeats"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    if args.calibration_tokens is not None:
        values["calibration_tokens"] = args.calibration_tokens
    if args.router_steps is not None:
        values["router_steps"] = args.router_steps
    if args.seq_len is not None:
        values["seq_len"] = args.seq_len
    recovery = {"seed": args.seed if args.seed is not None else 0}
    if args.recovery_tokens is not None:
        recovery["tokens"] = args.recovery_tokens
    if args.recovery_lr is not None:
        recovery["lr"] = args.recovery_lr
    values["recovery"] = RecoveryConfig(**recovery)
    report = run_eval(EvalSettings(**values))
    print(f"wrote {report} (and {report.with_suffix('.png').name} beside it)")
    return 0


def sparsify_command(args: argparse.Namespace) -> int:
    if args.eval:
        return _sparsify_eval(args)
    from xmoe.conversion.pipeline import REAL_MODEL_HINT, real_model_available, sparsify_directory
    from xmoe.conversion.sparsify import sparse_mlps

    given = [name for name in _EVAL_ONLY if getattr(args, name) is not None]
    if given:
        raise ValueError(f"{given} only apply with --eval")
    needed = (("MODEL", "model"), ("--expert-size", "expert_size"), ("--out", "out"))
    missing = [flag for flag, name in needed if getattr(args, name) is None]
    if missing:
        raise ValueError(f"sparsify needs {', '.join(missing)} (or --eval for the SmolLM2 grid)")
    if not real_model_available():
        print(f"note: {REAL_MODEL_HINT}")
    partition = args.partition or "contiguous"
    router = args.router or "learned"
    sparse = sparsify_directory(
        args.model,
        args.out,
        args.expert_size,
        calibration_tokens=16384 if args.calibration_tokens is None else args.calibration_tokens,
        seq_len=256 if args.seq_len is None else args.seq_len,
        calibration_text=args.calibration_text,
        progress=not args.no_progress,
        partition=partition,
        router=router,
        active_fraction=args.active_fraction,
        threshold=args.threshold,
        router_steps=300 if args.router_steps is None else args.router_steps,
        seed=0 if args.seed is None else args.seed,
        force=args.force,
    )
    modules = sparse_mlps(sparse)
    rule = (
        f"threshold {args.threshold}"
        if args.threshold is not None
        else f"active fraction {modules[0].settings.active_fraction}"
    )
    print(
        f"{len(modules)} MLPs -> {modules[0].num_experts} experts of {args.expert_size} neurons "
        f"({partition} partition, {router} router, {rule}) -> {args.out}"
    )
    return 0
