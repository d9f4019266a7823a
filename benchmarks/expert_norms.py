"""Side-by-side timing of the oracle's expert output norms (issue 26 item 4): each expert's
output materialised (``gram=False``, the former computation) against its down projection's Gram
matrix (``gram=True``, the default below D neurons per expert), on random SwiGLU weights of
SmolLM2-135M's shape (D=576, I=1536) split into experts of H neurons, fp32, CPU.

    python -m benchmarks.expert_norms [--tokens 1024] [--sizes 4 16 64] [--threads 2] [--quick]

Both run once per round in turn (:func:`benchmarks.harness.time_interleaved`); prints a Markdown
table of their median milliseconds per call, the speed-up and the largest difference between the
two relative to the largest norm. ``--quick`` runs tiny sizes (a smoke test).
"""

from __future__ import annotations

import argparse
import math

import torch

from xmoe.routing.expert_norms import expert_output_norms

from benchmarks.harness import TIMING_MALLOC_ENV, reexec_with, time_interleaved


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--d-model", type=int, default=576)
    parser.add_argument("--width", type=int, default=1536, help="FFN width I")
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 16, 64], help="H values")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.d_model, args.width, args.sizes = 64, 32, 64, [1, 4, 16]
        args.rounds, args.warmup = 1, 0
    return args


def time_size(args: argparse.Namespace, d_expert: int) -> str:
    """One table row: both forms of the norms at ``d_expert`` neurons per expert."""
    gen = torch.Generator().manual_seed(0)
    experts = args.width // d_expert
    scale = 1 / math.sqrt(args.d_model)
    w_gate, w_up = (
        scale * torch.randn(experts, args.d_model, d_expert, generator=gen) for _ in range(2)
    )
    w_down = torch.randn(experts, d_expert, args.d_model, generator=gen) / math.sqrt(args.width)
    x = torch.randn(args.tokens, args.d_model, generator=gen)
    outputs = {}

    def form(gram: bool):
        def run() -> None:
            outputs[gram] = expert_output_norms(x, w_gate, w_up, w_down, gram=gram)

        return run

    timings = time_interleaved(
        {"outputs": form(False), "Gram": form(True)}, args.rounds, args.warmup, torch.device("cpu")
    )
    direct, gram = timings["outputs"].median_ms, timings["Gram"].median_ms
    error = float((outputs[True] - outputs[False]).abs().max() / outputs[False].max())
    return (
        f"| {d_expert} ({experts}) | {direct:.1f} | {gram:.1f} | **{direct / gram:.2f}x** "
        f"| {error:.1e} |"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    reexec_with(TIMING_MALLOC_ENV)
    torch.set_num_threads(args.threads)
    print(
        f"expert_output_norms, {args.tokens} tokens, D={args.d_model}, I={args.width}, fp32, "
        f"{args.threads} threads, median of {args.rounds}\n\n"
        "| H (E) | outputs ms | Gram ms | speed-up | max diff / max norm |\n"
        "|---|---|---|---|---|"
    )
    for d_expert in args.sizes:
        print(time_size(args, d_expert), flush=True)


if __name__ == "__main__":
    main()
