"""``xmoe sparsify``: a dense causal LM directory converted into neuron-group MoE MLPs (or, with
``--mode neurons``, threshold-sparse MLPs), recovered with ``--recovery-tokens N``; and
``xmoe sparsify-grid``: the SmolLM2-135M quality/compute grid. Their settings options come from
:class:`~xmoe.conversion.SparsifyConfig` and :class:`~xmoe.experiments.sparsify_grid.EvalSettings`
(:mod:`xmoe.cli.options`)."""

from __future__ import annotations

import argparse
import sys

from xmoe.cli.options import from_options

GRID_EXCLUDE = ("command",)
"""EvalSettings fields that are no option: the CLI records the command line itself."""

_PIPELINE = ("calibration_tokens", "seq_len", "calibration_text")
"""``sparsify_directory``'s own options, passed only when given (it holds their defaults)."""


def sparsify_grid_command(args: argparse.Namespace) -> int:
    from xmoe.experiments.sparsify_grid import EvalSettings, run_eval

    recorded = {"command": "xmoe " + " ".join(sys.argv[1:])} if sys.argv[1:] else {}
    report = run_eval(from_options(EvalSettings, args, exclude=GRID_EXCLUDE, **recorded))
    print(f"wrote {report} (and {report.with_suffix('.png').name} beside it)")
    return 0


def _recovery(args: argparse.Namespace):
    """The :class:`~xmoe.conversion.recovery.RecoveryConfig` the ``--recovery-*`` options give,
    or None without ``--recovery-tokens`` (the budget, which turns recovery on).

    Raises:
        ValueError: another ``--recovery-*`` option without ``--recovery-tokens``.
        ConfigError: a bad recovery setting.
    """
    from xmoe.conversion.recovery import RecoveryConfig

    if args.recovery_tokens is not None:
        return from_options(RecoveryConfig, args, prefix="recovery_")
    given = [k for k, v in vars(args).items() if k.startswith("recovery_") and v is not None]
    if given:
        option = "--" + given[0].replace("_", "-")
        raise ValueError(f"{option} needs --recovery-tokens N, the recovery's token budget")
    return None


def sparsify_command(args: argparse.Namespace) -> int:
    from xmoe.conversion import SparsifyConfig, neuron_mlps, sparse_mlps
    from xmoe.conversion.pipeline import REAL_MODEL_HINT, real_model_available, sparsify_directory

    settings = from_options(SparsifyConfig, args)  # a bad value is named before any loading
    recovery = _recovery(args)
    if not real_model_available():
        print(f"note: {REAL_MODEL_HINT}")
    pipeline = {name: getattr(args, name) for name in _PIPELINE if getattr(args, name) is not None}
    options = {k: v for k, v in settings.to_dict().items() if k != "expert_size"}
    sparse = sparsify_directory(
        args.model,
        args.out,
        settings.expert_size,
        progress=not args.no_progress,
        force=args.force,
        recovery=recovery,
        recovery_checkpoint=args.recovery_checkpoint,
        **pipeline,
        **options,
    )
    if recovery is not None:
        print(
            f"recovered: {recovery.steps} steps of {recovery.batch_size}×{recovery.seq_len} "
            f"tokens distilled from {args.model}"
            + (
                "; thresholds re-solved on the recovered weights"
                if settings.mode == "neurons"
                else ""
            )
        )
    if settings.mode == "neurons":
        print(
            f"{len(neuron_mlps(sparse))} MLPs -> neuron thresholds at sites "
            f"{'+'.join(settings.sites)} ({settings.scoring} scoring, {settings.allocation} "
            f"allocation, target {settings.target_flops:g} of the FFN FLOPs) -> {args.out}"
        )
        return 0
    modules = sparse_mlps(sparse)
    rule = (
        f"threshold {settings.threshold}"
        if settings.threshold is not None
        else f"active fraction {settings.active_fraction}"
    )
    print(
        f"{len(modules)} MLPs -> {modules[0].num_experts} experts of {settings.expert_size} "
        f"neurons ({settings.partition} partition, {settings.router} router, {rule}) -> {args.out}"
    )
    return 0
