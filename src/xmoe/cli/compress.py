"""``xmoe compress``: a trained run's experts merged, pruned or quantised by passes from
:data:`xmoe.registry.PASSES`, written to a new directory (staged, put in place when complete);
and ``xmoe compress-grid``: the compression table (``docs/results/compression.md``), its options
from :class:`~xmoe.experiments.compression_grid.CompressionGridSettings`."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from xmoe.cli.options import from_options

GRID_EXCLUDE = ("command",)
"""CompressionGridSettings fields that are no option: the CLI records the command line itself."""

QUICK = {"calibration_tokens": 512, "eval_batches": 2}
"""``--quick``: tiny models, and calibration and evaluation to match (minutes, not hours)."""


def compress_grid_command(args: argparse.Namespace) -> int:
    from xmoe.experiments.compression_grid import CompressionGridSettings
    from xmoe.experiments.compression_report import compression_table

    recorded = {"command": "xmoe " + " ".join(sys.argv[1:])} if sys.argv[1:] else {}
    settings = from_options(CompressionGridSettings, args, exclude=GRID_EXCLUDE, **recorded)
    if settings.quick:  # into its own folders unless told, so it never touches the real table
        out = Path(args.out or "runs/compression-grid-quick")
        given = {name: getattr(settings, name) for name in QUICK if getattr(args, name) is not None}
        docs = Path(args.docs) if args.docs else out / "docs"
        settings = replace(settings, **(QUICK | given), out=out, docs=docs)
    print(f"wrote {compression_table(settings)} (and compression.png beside it)")
    return 0


def compress_command(args: argparse.Namespace) -> int:
    from xmoe.compression import compress, model_size, parse_pass, save_compressed
    from xmoe.training.rundir import RunDir
    from xmoe.training.trainer import load_token_data

    passes = [parse_pass(text) for text in args.passes]
    model, config, _ = RunDir(args.run).load_model()
    seq_len = args.seq_len or config.seq_len
    if args.calibration_tokens < seq_len:
        raise ValueError(
            f"--calibration-tokens={args.calibration_tokens} is invalid: it must be at least "
            f"one window of --seq-len={seq_len} tokens"
        )
    if args.eval_batches < 0:
        raise ValueError(f"--eval-batches={args.eval_batches} is invalid: it must be >= 0")
    data = load_token_data(config, progress=not args.no_progress)
    calibration = _windows(data.train, args.calibration_tokens, seq_len)
    # a pass with a domain option (reduce) calibrates on that domain's first windows alone
    domains = {
        name: _windows(data.train[start:end], args.calibration_tokens, seq_len)
        for name, (start, end) in (data.train_domains or {}).items()
        if end - start >= seq_len
    }
    before = model_size(model).expert_bytes
    quality = _validation(model, config, data.val, args.eval_batches)
    model = compress(model, passes, calibration, domains=domains, progress=not args.no_progress)
    out = save_compressed(model, args.out, passes=passes, force=args.force)
    size = model_size(model, out)
    print(
        f"wrote {out}: expert bytes {before:,} -> {size.expert_bytes:,} resident "
        f"({size.expert_bytes / before:.1%}); {size.disk_bytes:,} bytes on disk"
    )
    if quality is not None:
        after = _validation(model, config, data.val, args.eval_batches)
        for name, result in (("before", quality), ("after", after)):
            print(
                f"  {name:>6}: validation perplexity {result.perplexity:.3f}, experts/token "
                f"{result.experts_per_token:.2f}, MoE MFLOP/token "
                f"{result.moe_flops_per_token / 1e6:.3f}"
            )
    return 0


def _windows(tokens, count: int, seq_len: int):
    """(B, seq_len) int64 tensor: the first ``count`` of ``tokens`` (fewer if there are fewer)
    in whole windows."""
    import torch

    windows = min(count, len(tokens)) // seq_len
    return torch.from_numpy(tokens[: windows * seq_len].astype("int64").reshape(windows, seq_len))


def _validation(model, config, tokens, batches: int):
    """The model's :class:`~xmoe.training.evaluate.EvalResult` on ``batches`` validation
    batches (its routing statistics give the active FLOPs), or None when ``batches`` is 0."""
    from xmoe.training.evaluate import evaluate

    if batches == 0:
        return None
    return evaluate(model, tokens, config.batch_size, config.seq_len, batches)
