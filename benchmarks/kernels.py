"""Kernel benchmark (issue 28): the layer through the Triton kernels (``expert_ffn="triton"``)
against the plain path (``"xmoe"``), transformers' ``grouped_mm`` experts back-end on the same
routing and weights, and the dense bound (one SwiGLU FFN with the same FLOPs).

Sizes (bf16 on CUDA): T=16384, d=2048, 64 experts x 512, top-4; T=16384, d=1024, 128 x 128,
top-8; and T=1, 16, 256 at the first size's widths. Each is timed forward and forward+backward
(from gradients reset to None), side by side and interleaved; TFLOP/s counts the expert FFN's
FLOPs (3x the forward's for forward+backward); peak memory is CUDA's high-water mark of one
forward+backward above what was allocated before it, less the parameter gradients it creates.
Writes ``docs/benchmarks/kernels_cuda.md`` with the issue's targets.

    python -m benchmarks.kernels [--rounds 10] [--warmup 3]
    python -m benchmarks.kernels --quick --device cpu   # tiny fp32 sizes under triton's CPU
                                                        # interpreter: a smoke test, no timing
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

from xmoe import MoEConfig, MoELayer

from benchmarks.harness import time_interleaved
from benchmarks.variants import (
    DenseFFN,
    HFExpertsOnRouting,
    Setting,
    Variant,
    XMoEExpertsOnRouting,
    _copy_experts,
    _mixtral_config,
    make_inputs,
    module_variant,
)

BURST_TOKENS = 256
"""Sizes at or below this many tokens time bursts of :data:`BURST_CALLS` calls."""
BURST_CALLS = 20
KERNELS, PLAIN = "layer, kernels", "layer, plain path"
ROUTED_KERNELS, ROUTED_PLAIN, HF = "experts, kernels", "experts, plain path", "HF grouped_mm"
TARGETS = {"bound": 2.0, "bound_moonshot": 1.3, "over_hf": 1.5, "over_plain": 3.0}


@dataclass(frozen=True)
class Size:
    tokens: int
    d_model: int
    experts: int
    d_expert: int
    top_k: int

    def title(self) -> str:
        return (
            f"T={self.tokens}, d={self.d_model}, {self.experts} experts x {self.d_expert}, "
            f"top-{self.top_k}, SwiGLU"
        )


FULL = {
    "fine-4": Size(16384, 2048, 64, 512, 4),
    "fine-8": Size(16384, 1024, 128, 128, 8),
    **{f"T{t}": Size(t, 2048, 64, 512, 4) for t in (1, 16, 256)},
}
QUICK = {"fine-4": Size(16, 16, 4, 8, 2), "fine-8": Size(16, 16, 6, 8, 3)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    args = parser.parse_args(argv)
    if args.device != "cuda" and not args.quick:
        parser.error(f"--device={args.device} runs the kernels under triton's interpreter: "
                     "only the --quick sizes")  # fmt: skip
    return args


def build_variants(size: Size, device: torch.device, dtype: torch.dtype) -> dict[str, Variant]:
    """Every variant on the same tokens, cotangent, top-k routing and expert weights."""
    s = Setting(size.tokens, size.d_model, size.experts, size.d_expert, device, dtype)
    x, cotangent = make_inputs(s)
    config = MoEConfig(
        size.d_model, size.experts, size.d_expert, router="topk", top_k=size.top_k,
        activation="swiglu", bias=False, init_std=0.05, expert_ffn="triton",
    )  # fmt: skip
    torch.manual_seed(s.seed)
    kernels = MoELayer(config).to(device, dtype)
    plain = MoELayer(dataclasses.replace(config, expert_ffn="xmoe")).to(device, dtype)
    plain.load_state_dict(kernels.state_dict())
    with torch.no_grad():
        top_k_weights, top_k_index = kernels.router.probabilities(x).topk(size.top_k, dim=-1)
    top_k_weights = top_k_weights.to(dtype).requires_grad_(True)
    hf_experts = _hf_grouped_mm(s, size.top_k, kernels)
    torch.manual_seed(s.seed)
    hidden = size.top_k * size.d_expert
    bound = DenseFFN(size.d_model, hidden, gated=True, bias=False).to(device, dtype)
    modules = {
        KERNELS: kernels,
        PLAIN: plain,
        ROUTED_KERNELS: XMoEExpertsOnRouting(kernels, top_k_index, top_k_weights),
        ROUTED_PLAIN: XMoEExpertsOnRouting(plain, top_k_index, top_k_weights),
        HF: HFExpertsOnRouting(hf_experts, top_k_index, top_k_weights),
        f"bound: dense SwiGLU {size.d_model}x{hidden}": bound,
    }
    flops = float(size.top_k * config.expert_flops)
    return {
        name: module_variant(module, x, cotangent, experts_per_token=float(size.top_k),
                             moe_flops_per_token=flops)
        for name, module in modules.items()
    }  # fmt: skip


def _hf_grouped_mm(s: Setting, top_k: int, layer: MoELayer):
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    experts = MixtralExperts(_mixtral_config(s, top_k, "grouped_mm")).to(s.device, s.dtype)
    _copy_experts(experts, layer)
    return experts


def check_agreement(variants: dict[str, Variant], dtype: torch.dtype) -> float:
    """The largest difference of the kernels' outputs from the plain path's and HF's, relative
    to the largest output; raises past bf16's rounding (a wrong kernel is never timed)."""
    pairs = ((KERNELS, PLAIN), (ROUTED_KERNELS, ROUTED_PLAIN), (ROUTED_KERNELS, HF))
    worst = 0.0
    for ours, other in pairs:
        got, want = variants[ours].forward().float(), variants[other].forward().float()
        error = float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))
        worst = max(worst, error)
    limit = 1e-4 if dtype == torch.float32 else 3e-2
    if worst > limit:
        raise RuntimeError(f"the kernels disagree with the plain path / HF: {worst:.3g} > {limit}")
    return worst


def cuda_peak_mib(variant: Variant, device: torch.device) -> float | None:
    """CUDA high-water mark of one forward+backward above the allocation before it, less the
    parameter gradients it creates (activations and transients only); None off CUDA."""
    if device.type != "cuda":
        return None
    variant.reset_grads()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    variant.forward_backward()
    torch.cuda.synchronize(device)
    grads = sum(p.grad.nbytes for p in variant.module.parameters() if p.grad is not None)
    return (torch.cuda.max_memory_allocated(device) - before - grads) / 2**20


@dataclass
class Result:
    fwd_ms: float
    fwdbwd_ms: float
    fwd_tflops: float
    fwdbwd_tflops: float
    peak_mib: float | None


def bench_size(size: Size, args, device: torch.device, dtype: torch.dtype) -> tuple[dict, float]:
    variants = build_variants(size, device, dtype)
    disagreement = check_agreement(variants, dtype)
    calls = BURST_CALLS if size.tokens <= BURST_TOKENS and not args.quick else 1
    timed = [
        time_interleaved({n: getattr(v, mode) for n, v in variants.items()}, args.rounds,
                         args.warmup, device, calls)
        for mode in ("forward", "forward_backward")
    ]  # fmt: skip
    results = {}
    for name, variant in variants.items():
        flops = variant.moe_flops_per_token * size.tokens
        fwd, fwdbwd = timed[0][name].min_ms, timed[1][name].min_ms
        peak = cuda_peak_mib(variant, device)
        results[name] = Result(fwd, fwdbwd, flops / fwd / 1e9, 3 * flops / fwdbwd / 1e9, peak)
        print(f"  {name}: fwd {fwd:.3f} ms, fwd+bwd {fwdbwd:.3f} ms", flush=True)
    return results, disagreement


def _table(results: dict[str, Result]) -> list[str]:
    bound = next(r for n, r in results.items() if n.startswith("bound"))
    lines = [
        "| variant | fwd ms | fwd+bwd ms | fwd TFLOP/s | fwd+bwd TFLOP/s | fwd+bwd / bound "
        "| peak MiB (fwd+bwd) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        peak = "" if r.peak_mib is None else f"{r.peak_mib:,.0f}"
        lines.append(
            f"| {name} | {r.fwd_ms:.3f} | {r.fwdbwd_ms:.3f} | {r.fwd_tflops:.1f} "
            f"| {r.fwdbwd_tflops:.1f} | {r.fwdbwd_ms / bound.fwdbwd_ms:.2f}x | {peak} |"
        )
    return lines


def _met(ok: bool) -> str:
    return "met" if ok else "missed"


def targets(all_results: dict[str, dict[str, Result]]) -> list[str]:
    """The issue's targets, each with its measured value."""
    lines = ["### Targets", ""]
    first, second = all_results["fine-4"], all_results["fine-8"]
    bound = next(r for n, r in first.items() if n.startswith("bound"))
    ratio = first[KERNELS].fwdbwd_ms / bound.fwdbwd_ms
    lines.append(
        f"- fine-4 (64x512, top-4): layer fwd+bwd through the kernels / dense bound = "
        f"**{ratio:.2f}x** (target ≤ {TARGETS['bound']}x: {_met(ratio <= TARGETS['bound'])}; "
        f"moonshot ≤ {TARGETS['bound_moonshot']}x: {_met(ratio <= TARGETS['bound_moonshot'])})"
    )
    for name, results in (("fine-4", first), ("fine-8", second)):
        for mode in ("fwd", "fwdbwd"):
            ours = getattr(results[ROUTED_KERNELS], f"{mode}_tflops")
            hf = getattr(results[HF], f"{mode}_tflops")
            lines.append(
                f"- {name} {mode}: kernels {ours:.1f} vs transformers grouped_mm {hf:.1f} "
                f"TFLOP/s on the same routing = **{ours / hf:.2f}x** (target ≥ "
                f"{TARGETS['over_hf']}x: {_met(ours / hf >= TARGETS['over_hf'])})"
            )
    speedup = second[KERNELS].fwdbwd_tflops / second[PLAIN].fwdbwd_tflops
    lines.append(
        f"- fine-8 (128x128, top-8): layer fwd+bwd TFLOP/s, kernels / plain path = "
        f"**{speedup:.2f}x** (target ≥ {TARGETS['over_plain']}x: "
        f"{_met(speedup >= TARGETS['over_plain'])})"
    )
    for name, results in (("fine-4", first), ("fine-8", second)):
        ours, plain = results[KERNELS].peak_mib, results[PLAIN].peak_mib
        if ours is not None and plain is not None:
            lines.append(
                f"- {name}: peak memory kernels {ours:,.0f} MiB vs plain path {plain:,.0f} MiB "
                f"(target ≤ plain: {_met(ours <= plain)})"
            )
    return lines


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":  # the kernels run on CPU tensors only under the interpreter
        os.environ["TRITON_INTERPRET"] = "1"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    machine = f"{platform.machine()}, torch {torch.__version__}, {device.type} {dtype}"
    if device.type == "cuda":
        import triton

        machine += f", triton {triton.__version__}, {torch.cuda.get_device_name(device)}"
    print(f"xmoe kernel benchmark: {machine}", flush=True)
    torch.manual_seed(0)
    sizes = QUICK if args.quick else FULL
    all_results, parts = {}, []
    for name, size in sizes.items():
        print(f"\n== {name}: {size.title()}", flush=True)
        results, disagreement = bench_size(size, args, device, dtype)
        all_results[name] = results
        parts += [
            f"### {name}: {size.title()}",
            "",
            *_table(results),
            "",
            f"Kernels against the plain path and HF: largest difference {disagreement:.2g} of "
            "the largest output.",
            "",
        ]
    command = "python -m benchmarks.kernels " + " ".join(sys.argv[1:] if argv is None else argv)
    document = [
        f"# Triton kernel benchmark ({device.type}, {str(dtype).removeprefix('torch.')})",
        "",
        f"Made by `{command.strip()}` (`benchmarks/gpu_session.sh`) on "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC. Machine: {machine}. Times are the minimum "
        f"over {args.rounds} interleaved rounds after {args.warmup} warm-up rounds (sizes of "
        f"at most {BURST_TOKENS} tokens: per call of a burst of {BURST_CALLS}). TFLOP/s counts "
        "the expert FFN's FLOPs of the kept pairs (forward+backward: 3x the forward's). "
        "`layer`: MoELayer with its top-k router; `experts`: the expert FFN alone on the "
        "routing that HF's `grouped_mm` back-end gets too.",
        "",
        *targets(all_results),
        "",
        *parts,
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"kernels_{device.type}{'-quick' if args.quick else ''}.md"
    path.write_text("\n".join(document))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
