"""``xmoe compress``: a trained run's experts merged, pruned or quantised by passes from
:data:`xmoe.registry.PASSES`, written to a new directory (staged, put in place when complete)
that ``xmoe eval`` and ``xmoe generate`` read like the run."""

from __future__ import annotations

import argparse


def compress_command(args: argparse.Namespace) -> int:
    import torch

    from xmoe.compression import compress, model_size, parse_pass
    from xmoe.compression.saving import save_compressed_lm
    from xmoe.training.rundir import RunDir
    from xmoe.training.trainer import load_token_data

    passes = [parse_pass(text) for text in args.passes]
    run = RunDir(args.run)
    model, config, meta = run.load_model()
    seq_len = args.seq_len or config.seq_len
    if args.calibration_tokens < seq_len:
        raise ValueError(
            f"--calibration-tokens={args.calibration_tokens} is invalid: it must be at least "
            f"one window of --seq-len={seq_len} tokens"
        )
    if args.eval_batches < 0:
        raise ValueError(f"--eval-batches={args.eval_batches} is invalid: it must be >= 0")
    data = load_token_data(config, progress=not args.no_progress)
    train = data.train
    windows = min(args.calibration_tokens, len(train)) // seq_len
    calibration = train[: windows * seq_len].astype("int64").reshape(windows, seq_len)
    before = model_size(model).expert_bytes
    quality = _validation(model, config, data.val, args.eval_batches)
    model = compress(model, passes, torch.from_numpy(calibration), progress=not args.no_progress)
    # the run's record and tokenizer go along: xmoe eval and xmoe generate read the output
    tokenizer = run.tokenizer_path if run.tokenizer_path.is_file() else None
    out = save_compressed_lm(
        model, args.out, passes=passes, force=args.force, run_meta=meta, tokenizer_file=tokenizer
    )
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


def _validation(model, config, tokens, batches: int):
    """The model's :class:`~xmoe.training.evaluate.EvalResult` on ``batches`` validation
    batches (its routing statistics give the active FLOPs), or None when ``batches`` is 0."""
    from xmoe.training.evaluate import evaluate

    if batches == 0:
        return None
    return evaluate(model, tokens, config.batch_size, config.seq_len, batches)
