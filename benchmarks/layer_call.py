"""Time one MoE layer call at decode sizes: what a per-call overhead (a few small ops) costs.

Run it on two checkouts and compare (the layer is built from the same seed on each)::

    PYTHONPATH=<checkout>/src python -m benchmarks.layer_call --label <name>

d=512, 64 experts x 128, top-4, renormalised, SwiGLU, eval, inference mode, 1 thread; prints the
best of ``--batches`` batches of ``--calls`` calls per token count (the minimum is the number
least disturbed by other work on a shared machine).
"""

from __future__ import annotations

import argparse
import time

import torch

from xmoe import MoEConfig, MoELayer


def time_calls(layer: MoELayer, num_tokens: int, batches: int, calls: int) -> float:
    """Best per-call seconds of ``layer`` on ``num_tokens`` random tokens."""
    x = torch.randn(num_tokens, layer.config.d_model)
    with torch.inference_mode():
        for _ in range(min(calls, 200)):
            layer(x)
        best = float("inf")
        for _ in range(batches):
            start = time.perf_counter()
            for _ in range(calls):
                layer(x)
            best = min(best, (time.perf_counter() - start) / calls)
    return best


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", default="xmoe")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = MoEConfig(
        d_model=512, num_experts=64, d_expert=128, router="topk", top_k=4, renormalize=True,
        activation="swiglu", bias=False,
    )  # fmt: skip
    layer = MoELayer(config).eval()
    times = {t: time_calls(layer, t, args.batches, args.calls) for t in args.tokens}
    line = args.label + " " + " ".join(f"T={t}: {s * 1e6:.1f}us" for t, s in times.items())
    print(line)
    return line


if __name__ == "__main__":
    main()
