"""Time one ``NeuronMLP.decode`` call (batch-1 decode of one neurons-mode MLP) at SmolLM2-135M's
shape: what the path's small torch ops cost on top of its kept-row sums.

    python -m benchmarks.neuron_decode_call [--baseline OTHER/src/xmoe/conversion/neuron_mlp.py]

D=576, I=1536, fp32, 1 thread, inference mode; random weights and WINA-like random scales, the
``gate_up`` and ``down`` thresholds each keeping half of a site's scores over 64 random tokens
(so a token keeps ~50% at each). Variants, timed in interleaved rounds on the same tokens:
this checkout's ``NeuronMLP`` (``forward``, which decodes one token), ``--baseline``'s (another
checkout's ``neuron_mlp.py``, loaded beside this one with the same weights, for before/after in
one run), the floor (the two kept-row sums alone, masks given) and the dense MLP on the same
row-major copies. Prints each one's best per-call µs and its ratio to this checkout's.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch
from torch import nn

from xmoe.conversion import NeuronMLP, SparsifyConfig
from xmoe.conversion.sparse_decode import keeping_threshold, kept_rows_sum

from benchmarks.harness import time_interleaved
from benchmarks.sparsify_decode import RowMajorMLP

HIDDEN, FFN = 576, 1536  # SmolLM2-135M


def random_mlp(cls: type[nn.Module] = NeuronMLP, hidden: int = HIDDEN, ffn: int = FFN) -> nn.Module:
    """A ``cls`` (a NeuronMLP class) of seeded random weights and scales, thresholds keeping
    about half of each site's entries."""
    torch.manual_seed(0)
    mlp = cls(hidden, ffn, SparsifyConfig(mode="neurons", target_flops=0.5)).eval()
    with torch.no_grad():
        mlp.scale_gate_up.copy_(torch.rand(hidden) + 0.5)
        mlp.scale_down.copy_(torch.rand(ffn) + 0.5)
        x = torch.randn(64, hidden)
        mlp.threshold_gate_up.fill_(keeping_threshold(mlp.score("gate_up", x), 0.5))
        x = torch.where(mlp.keep("gate_up", x), x, 0)
        h = nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x)
        mlp.threshold_down.fill_(keeping_threshold(mlp.score("down", h), 0.5))
    return mlp.requires_grad_(False)


def load_baseline(path: Path) -> type[nn.Module]:
    """The ``NeuronMLP`` class of another checkout's ``neuron_mlp.py`` (its own imports resolve
    to this checkout's package)."""
    spec = importlib.util.spec_from_file_location("baseline_neuron_mlp", path)
    if spec is None or spec.loader is None or not path.is_file():
        raise SystemExit(f"xmoe: error: --baseline {path} is not a readable neuron_mlp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.NeuronMLP


def variants(mlp: NeuronMLP, x: torch.Tensor, baseline: type[nn.Module] | None) -> dict:
    """The timed calls on the token ``x`` (1, 1, D)."""
    gate_up_DJ, down_ID = mlp.row_major()
    x_1D = x.reshape(1, -1)
    kept_x = mlp.keep("gate_up", x_1D)
    gate, up = kept_rows_sum(x_1D, kept_x, gate_up_DJ).chunk(2, dim=-1)
    h = nn.functional.silu(gate) * up
    kept_n = mlp.keep("down", h)
    dense = RowMajorMLP(mlp)
    calls = {"this checkout": lambda: mlp(x)}
    if baseline is not None:
        ffn, hidden = mlp.gate_proj.weight.shape
        before = random_mlp(baseline, hidden, ffn)
        before.load_state_dict(mlp.state_dict())
        calls["baseline"] = lambda: before(x)
    calls["kept-row sums alone"] = lambda: (
        kept_rows_sum(x_1D, kept_x, gate_up_DJ),
        kept_rows_sum(h, kept_n, down_ID),
    )
    calls["dense, row-major"] = lambda: dense(x)
    return calls


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, help="another checkout's neuron_mlp.py")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--calls", type=int, default=200, help="calls per timed sample")
    parser.add_argument("--hidden", type=int, default=HIDDEN)
    parser.add_argument("--ffn", type=int, default=FFN)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    baseline = load_baseline(args.baseline) if args.baseline else None
    mlp = random_mlp(hidden=args.hidden, ffn=args.ffn)
    x = torch.randn(1, 1, args.hidden, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        calls = variants(mlp, x, baseline)
        timings = time_interleaved(calls, args.rounds, 2, torch.device("cpu"), args.calls)
    best = {name: timing.min_ms * 1e3 for name, timing in timings.items()}
    kept = float(mlp.flops_fraction.mean())
    print(f"NeuronMLP.decode, D={args.hidden}, I={args.ffn}, FFN FLOPs {kept:.0%}, 1 thread:")
    for name, micros in best.items():
        print(f"  {name}: {micros:.1f} µs/call ({micros / best['this checkout']:.2f}x this)")
    return best


if __name__ == "__main__":
    main()
