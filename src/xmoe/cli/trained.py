"""The commands that read a trained run: ``xmoe eval`` (validation perplexity and expert use),
``xmoe generate`` (sampled text) and ``xmoe export`` (a transformers directory). Eval and
generate also read what ``xmoe compress`` wrote from a run."""

from __future__ import annotations

import argparse
import os
import sys


def load_trained(path: str | os.PathLike):
    """``(TransformerLM in eval mode, TrainConfig, checkpoint record)`` of a run directory or
    checkpoint file, or of a compressed run directory (``xmoe compress``'s output)."""
    from xmoe.compression.saving import is_compressed_run, load_compressed_run
    from xmoe.training.rundir import RunDir

    if is_compressed_run(path):
        return load_compressed_run(path)
    return RunDir(path).load_model()


def eval_command(args: argparse.Namespace) -> int:
    from xmoe.training.evaluate import evaluate
    from xmoe.training.rundir import RunDir, tokenizer_fingerprint
    from xmoe.training.trainer import load_token_data

    run = RunDir(args.checkpoint)
    model, config, meta = load_trained(args.checkpoint)
    tokenizer = run.load_tokenizer()
    run.check_tokenizer(tokenizer, meta, config.model.vocab_size)
    if args.threshold is not None:
        model.set_threshold(args.threshold)
    model.set_capacity_at_eval(args.capacity)
    data = load_token_data(config, progress=not args.no_progress)
    same = tokenizer is None or data.tokenizer is None
    if not (same or tokenizer_fingerprint(tokenizer) == tokenizer_fingerprint(data.tokenizer)):
        raise ValueError(
            f"the tokenizer in {run.tokenizer_path} differs from the corpus tokenizer in the "
            "cache; evaluate with the cache the run was trained with (XMOE_CACHE_DIR)"
        )
    parts = {"all": data.val}
    for domain, (start, end) in (data.val_domains or {}).items():
        parts[domain] = data.val[start:end]
    print(f"{args.checkpoint}: {config.preset}, step {meta['step']}")
    for name, tokens in parts.items():
        ev = evaluate(model, tokens, config.batch_size, config.seq_len, args.batches or None)
        print(
            f"  {name:>12}: perplexity {ev.perplexity:.3f} (loss {ev.loss:.4f}, {ev.tokens:,} "
            f"tokens), experts/token {ev.experts_per_token:.2f}, "
            f"MoE MFLOP/token {ev.moe_flops_per_token / 1e6:.3f}"
        )
    return 0


def generate_command(args: argparse.Namespace) -> int:
    from xmoe.hf.generation import generate_text
    from xmoe.training.rundir import RunDir
    from xmoe.training.text import TextCodec

    model, config, meta = load_trained(args.checkpoint)
    codec = TextCodec(RunDir(args.checkpoint), config.model.vocab_size, meta)
    text, stats = generate_text(
        model,
        codec,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
        threshold=args.threshold,
    )
    print(text)
    print(
        f"[{stats['new_tokens']} tokens in {stats['seconds']:.2f} s: "
        f"{stats['tokens_per_second']:.1f} tokens/s, "
        f"experts/token {stats['experts_per_token']:.2f}]",
        file=sys.stderr,
    )
    return 0


def export_command(args: argparse.Namespace) -> int:
    from xmoe.cli.export import export_run

    out = export_run(args.run, args.out, force=args.force)
    print(f"wrote a transformers model directory: {out}")
    return 0
