"""``xmoe train``: a preset trained in one process or expert-parallel over ranks, stopped by
SIGTERM as by Ctrl-C, and exported for transformers when it completes."""

from __future__ import annotations

import argparse
import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path


class Terminated(KeyboardInterrupt):
    """SIGTERM: ``xmoe train`` stops as on Ctrl-C (the same unwinding: files closed, the run's
    lock released, ranks stopped), and exits with 143 (128 + SIGTERM)."""


def _terminate(signum, frame) -> None:
    raise Terminated


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Raise :class:`Terminated` on SIGTERM inside the block (from the main thread only: the
    one where Python runs signal handlers); the previous handler afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def train_command(args: argparse.Namespace) -> int:
    import importlib.util

    from xmoe.training.config import apply_overrides
    from xmoe.training.presets import preset
    from xmoe.training.trainer import train

    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"max_steps={args.max_steps}")
    config = apply_overrides(preset(args.preset), overrides)
    out = Path(args.out or f"runs/{args.preset}")
    export = importlib.util.find_spec("transformers") is not None
    if not export:
        print("transformers is not installed: the HF export is skipped (pip install xmoe[hf])")
    if args.fresh_optimizer and not args.resume:
        raise ValueError("--fresh-optimizer applies to --resume only")
    options = {"resume": args.resume, "progress": not args.no_progress}
    options["fresh_optimizer"] = args.fresh_optimizer
    with _sigterm_as_interrupt():  # a run stopped by SIGTERM unwinds as on Ctrl-C
        result = _train_parallel(config, out, args.nproc, options)
        if result is None:  # one process
            result = train(config, out, **options)
        if export and result is not False:  # rank 0's result: the run is complete
            from xmoe.cli.export import export_run

            export_run(out)
    if result is False:  # a torchrun rank other than 0: rank 0 prints
        return 0
    ev = result.final_eval
    print(
        f"{config.preset}: {result.steps} steps, train loss {result.train_loss:.4f}, "
        f"val perplexity {ev.perplexity:.2f}, experts/token {ev.experts_per_token:.2f}, "
        f"MoE MFLOP/token {ev.moe_flops_per_token / 1e6:.3f}, "
        f"{result.train_tokens_per_second:,.0f} train tokens/s -> {out}"
    )
    return 0


def _train_parallel(config, out: Path, nproc: int, options: dict):
    """Expert-parallel training (``docs/distributed.md``): ``--nproc N`` spawns N ranks here;
    under torchrun this process is one rank. Returns rank 0's result, False on the other
    torchrun ranks, None for a one-process run."""
    if nproc < 1:
        raise ValueError(f"--nproc={nproc} is invalid: must be >= 1")
    from xmoe.distributed.launcher import init_from_env

    if init_from_env():  # torchrun -m xmoe.cli.main train ...: this process is one rank
        from xmoe.distributed.groups import ExpertParallelGroups
        from xmoe.distributed.training import ExpertParallelTraining
        from xmoe.training.trainer import train

        groups = ExpertParallelGroups.create()
        if not groups.is_main:
            options = {**options, "progress": False}
        result = train(config, out, parallel=ExpertParallelTraining(groups), **options)
        return result if groups.is_main else False
    if nproc == 1:
        return None
    from xmoe.distributed.training import train_distributed

    return train_distributed(config, out, nproc, **options)
