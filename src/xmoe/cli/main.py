"""The ``xmoe`` command line: argument parsing only; the work lives in the package."""

from __future__ import annotations

import argparse
import sys

import torch


def _demo(args: argparse.Namespace) -> int:
    from xmoe.demos.layer import DemoSettings, run_demo

    run_demo(DemoSettings(num_tokens=args.tokens, steps=args.steps, seed=args.seed))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xmoe", description="Adaptive, fine-grained Mixture-of-Experts for PyTorch."
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="show an XMoE layer against a top-2 layer")
    demo.add_argument("--tokens", type=int, default=512, help="training tokens (default 512)")
    demo.add_argument("--steps", type=int, default=400, help="fitting steps (default 400)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads={args.threads} is invalid: must be >= 1")
        torch.set_num_threads(args.threads)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
