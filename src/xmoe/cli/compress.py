"""``xmoe compress``: a trained run's experts merged, pruned or quantised by passes from
:data:`xmoe.registry.PASSES`, written to a new directory (staged, put in place when complete)."""

from __future__ import annotations

import argparse


def compress_command(args: argparse.Namespace) -> int:
    import torch

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
    train = load_token_data(config, progress=not args.no_progress).train
    windows = min(args.calibration_tokens, len(train)) // seq_len
    calibration = train[: windows * seq_len].astype("int64").reshape(windows, seq_len)
    before = model_size(model).expert_bytes
    model = compress(model, passes, torch.from_numpy(calibration), progress=not args.no_progress)
    out = save_compressed(model, args.out, passes=passes, force=args.force)
    size = model_size(model, out)
    print(
        f"wrote {out}: expert bytes {before:,} -> {size.expert_bytes:,} resident "
        f"({size.expert_bytes / before:.1%}); {size.disk_bytes:,} bytes on disk"
    )
    return 0
