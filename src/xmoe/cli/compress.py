"""``xmoe compress``: a trained run's experts merged, pruned or quantised by passes from
:data:`xmoe.registry.PASSES`, written to a new directory (staged, put in place when complete)
that ``xmoe eval`` and ``xmoe generate`` read like the run; or a transformers model directory of
a compression family (:data:`xmoe.registry.COMPRESS_FAMILIES`), written as a transformers
directory that ``from_pretrained`` loads. And ``xmoe compress-grid``: the compression table
(``docs/results/compression.md``), its options from
:class:`~xmoe.experiments.compression_grid.CompressionGridSettings`."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from xmoe.cli.options import from_options

HF_SEQ_LEN = 256
"""Calibration window length for a transformers directory when ``--seq-len`` is not given."""

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
    from xmoe.compression import parse_pass
    from xmoe.training.rundir import RunDir

    passes = [parse_pass(text) for text in args.passes]
    run = RunDir(args.run)
    if not run.has_checkpoint and (run.path / "config.json").is_file():
        return _compress_transformers(args, passes)
    if args.calibration_text is not None:
        raise ValueError(
            "--calibration-text is for transformers directories: a run calibrates on its corpus"
        )
    return _compress_run(args, passes, run)


def _check_sizes(args: argparse.Namespace, seq_len: int) -> None:
    if args.calibration_tokens < seq_len:
        raise ValueError(
            f"--calibration-tokens={args.calibration_tokens} is invalid: it must be at least "
            f"one window of --seq-len={seq_len} tokens"
        )
    if args.eval_batches < 0:
        raise ValueError(f"--eval-batches={args.eval_batches} is invalid: it must be >= 0")


def _compress_transformers(args: argparse.Namespace, passes: list) -> int:
    """A transformers directory compressed, calibrated on ``--calibration-text`` (else the
    project's corpus) in its own tokenizer; its tokenizer goes along."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from xmoe.compression import compress, model_size, save_compressed
    from xmoe.compression.families import family_of
    from xmoe.conversion.pipeline import calibration_windows, has_tokenizer

    source = Path(args.run)
    seq_len = args.seq_len or HF_SEQ_LEN
    _check_sizes(args, seq_len)
    if args.eval_batches:
        raise ValueError(
            "--eval-batches needs a run directory (its validation data); a transformers "
            "directory has none"
        )
    if not has_tokenizer(source):
        raise ValueError(
            f"calibration needs the tokenizer of {source}, and it holds none: save it next to "
            "the model"
        )
    text = args.calibration_text
    calibration = calibration_windows(source, args.calibration_tokens, seq_len, text)
    model = AutoModelForCausalLM.from_pretrained(source).eval()
    _, family = family_of(model)  # a model of no family is named before any work
    model = family.prepare(model)  # its MoE layers as xmoe's, measured before the passes
    before = model_size(model).expert_bytes
    model = compress(model, passes, calibration, progress=not args.no_progress)
    out = save_compressed(
        model, args.out, passes=passes, force=args.force,
        tokenizer=AutoTokenizer.from_pretrained(source),
    )  # fmt: skip
    _print_size(model, before, out)
    return 0


def _print_size(model, before: int, out: Path) -> None:
    """The measured expert bytes before (``before``) and after, and the output's bytes on disk."""
    from xmoe.compression import model_size

    size = model_size(model, out)
    print(
        f"wrote {out}: expert bytes {before:,} -> {size.expert_bytes:,} resident "
        f"({size.expert_bytes / before:.1%}); {size.disk_bytes:,} bytes on disk"
    )


def _compress_run(args: argparse.Namespace, passes: list, run) -> int:
    from xmoe.compression import compress, model_size
    from xmoe.compression.calibration import corpus_calibration
    from xmoe.compression.saving import save_compressed_lm
    from xmoe.training.trainer import load_token_data

    model, config, meta = run.load_model()
    seq_len = args.seq_len or config.seq_len
    _check_sizes(args, seq_len)
    data = load_token_data(config, progress=not args.no_progress)
    calibration = corpus_calibration(
        data.train, data.train_domains, args.calibration_tokens, seq_len
    )
    before = model_size(model).expert_bytes
    quality = _validation(model, config, data.val, args.eval_batches)
    model = compress(
        model, passes, calibration.mixed, domains=calibration.domains, progress=not args.no_progress
    )
    # the run's record and tokenizer go along: xmoe eval and xmoe generate read the output
    tokenizer = run.tokenizer_path if run.tokenizer_path.is_file() else None
    out = save_compressed_lm(
        model, args.out, passes=passes, force=args.force, run_meta=meta, tokenizer_file=tokenizer
    )
    _print_size(model, before, out)
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
