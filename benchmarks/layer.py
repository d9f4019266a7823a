"""Layer benchmark: is the FLOP saving of adaptive routing a saving in time?

Times forward and forward+backward, side by side and interleaved, of: the xmoe layer (fast path
and loop fallback); the bound (a dense FFN with the same FLOPs); Hugging Face transformers' own
experts back-ends (eager, batched_mm, grouped_mm) on identical top-k routing and weights;
capacity padding as in the XMoE reference code; and top-2 against XMoE at equal parameters.
Writes a Markdown table and a plot to ``docs/benchmarks/``.

    python -m benchmarks.layer [--threads 2] [--device cpu] [--dtype float32] [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch

from benchmarks.harness import (
    TIMING_MALLOC_ENV,
    peak_memory_in_child,
    reexec_with,
    time_interleaved,
)
from benchmarks.variants import (
    FLOOR,
    Setting,
    hf_block_variants,
    hf_variants,
    pair_variants,
    training_variants,
)

SWEEP_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
TARGETS = {
    "bound_ratio": 1.3,
    "cuda_bound_ratio": 2.0,
    "memory_ratio": 1.5,
    "pair_over_flops": 1.05,
    "block_over_hf": 0.8,
}
SMALL_CALL_TOKENS = 128
"""Sections at or below this many tokens time bursts of calls (see ``time_interleaved``)."""
BURST_CALLS = 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory probes")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    args = parser.parse_args(argv)
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    return args


def _sizes(args) -> dict:
    if args.quick:
        return {"train": (256, 64, 16, 32), "decode": (1, 16), "pair_d_ff": 256}
    return {"train": (4096, 512, 64, 128), "decode": (1, 16, 128), "pair_d_ff": 2048}


def _setting(args, num_tokens: int, d_model: int, num_experts: int, d_expert: int) -> Setting:
    return Setting(
        num_tokens,
        d_model,
        num_experts,
        d_expert,
        torch.device(args.device),
        getattr(torch, args.dtype),
    )


def build_section(section: str, args) -> dict:
    sizes = _sizes(args)
    if section == "train":
        return training_variants(_setting(args, *sizes["train"]), 0.9, capacity_factor=8.0)
    if section.startswith(("hf-T", "block-T")):
        num_tokens = _section_tokens(section)
        _, d_model, num_experts, d_expert = sizes["train"]
        build = hf_variants if section.startswith("hf-T") else hf_block_variants
        return build(_setting(args, num_tokens, d_model, num_experts, d_expert), top_k=4)
    if section == "pair":
        num_tokens, d_model, _, _ = sizes["train"]
        return pair_variants(_setting(args, num_tokens, d_model, 1, 1), sizes["pair_d_ff"])
    raise ValueError(f"unknown section {section!r}")


def _section_tokens(section: str) -> int:
    return int(section.split("-T")[1])


def _row(name, variant, fwd, fwdbwd, bound_fwd, bound_fb, num_tokens, memory) -> list[str]:
    return [
        name,
        f"{variant.experts_per_token:.2f}" if variant.experts_per_token is not None else "",
        f"{fwd.min_ms:.2f} / {fwd.median_ms:.2f}",
        f"{fwdbwd.min_ms:.2f} / {fwdbwd.median_ms:.2f}",
        f"{num_tokens / fwdbwd.min_ms * 1e3:,.0f}",
        f"{fwd.min_ms / bound_fwd:.2f}x" if bound_fwd else "",
        f"{fwdbwd.min_ms / bound_fb:.2f}x" if bound_fb else "",
        f"{memory:.1f}" if memory is not None else "",
    ]


HEADER = [
    "variant",
    "experts/token",
    "fwd ms (min / median)",
    "fwd+bwd ms (min / median)",
    "tokens/s (fwd+bwd)",
    "fwd / bound",
    "fwd+bwd / bound",
    "peak MiB (fwd+bwd, no grads)",
]


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def run_section(section: str, args, title: str, results: dict) -> str:
    print(f"\n== {title}", flush=True)
    variants = build_section(section, args)
    device = torch.device(args.device)
    small = "-T" in section and _section_tokens(section) <= SMALL_CALL_TOKENS
    calls = BURST_CALLS if small else 1
    fwd = time_interleaved(
        {n: v.forward for n, v in variants.items()}, args.rounds, args.warmup, device, calls
    )
    fwdbwd = time_interleaved(
        {n: v.forward_backward for n, v in variants.items()},
        args.rounds,
        args.warmup,
        device,
        calls,
    )
    bound = next((n for n in variants if n.startswith("bound")), None)
    memory = {}
    for name in variants:
        no_probe = section.startswith("block-T") or name == FLOOR  # the floor allocates nothing
        if args.no_memory or device.type != "cpu" or no_probe:
            memory[name] = None
        else:
            memory[name] = peak_memory_in_child(section, name, sys.argv[1:])
    num_tokens = next(iter(variants.values())).forward().shape[0]
    rows = []
    for name, variant in variants.items():
        rows.append(
            _row(
                name,
                variant,
                fwd[name],
                fwdbwd[name],
                fwd[bound].min_ms if bound else None,
                fwdbwd[bound].min_ms if bound else None,
                num_tokens,
                memory[name],
            )
        )
        print("  " + " | ".join(rows[-1]), flush=True)
    results[section] = {
        "variants": variants,
        "fwd": fwd,
        "fwdbwd": fwdbwd,
        "memory": memory,
        "bound": bound,
    }
    return f"### {title}\n\n" + _table(HEADER, rows)


def run_sweep(args, results: dict) -> str:
    print("\n== threshold sweep", flush=True)
    num_tokens, d_model, num_experts, d_expert = _sizes(args)["train"]
    setting = _setting(args, num_tokens, d_model, num_experts, d_expert)
    points = []
    for threshold in SWEEP_THRESHOLDS:
        variants = training_variants(setting, threshold, capacity_factor=8.0, full=False)
        xmoe_name = "xmoe (auto)"
        padded_name = next(n for n in variants if n.startswith("capacity"))
        timing = time_interleaved(
            {n: variants[n].forward_backward for n in (xmoe_name, padded_name)},
            args.rounds,
            args.warmup,
            torch.device(args.device),
        )
        point = (
            threshold,
            variants[xmoe_name].experts_per_token,
            timing[xmoe_name].min_ms,
            timing[padded_name].min_ms,
        )
        points.append(point)
        print(
            f"  t={threshold}: experts/token {point[1]:.2f}, xmoe {point[2]:.1f} ms, "
            f"capacity padding {point[3]:.1f} ms",
            flush=True,
        )
    results["sweep"] = points
    rows = [[f"{t}", f"{k:.2f}", f"{x:.2f}", f"{p:.2f}"] for t, k, x, p in points]
    header = ["t", "experts/token (kept)", "xmoe fwd+bwd ms", "capacity padding fwd+bwd ms"]
    return "### Threshold sweep (training size, γ=8)\n\n" + _table(header, rows)


def plot_sweep(points, path: Path, machine: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    experts = [p[1] for p in points]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(experts, [p[2] for p in points], "o-", label="xmoe (computes kept pairs only)")
    ax.plot(experts, [p[3] for p in points], "s--", label="capacity padding (all E·C slots)")
    for t, k, x, _ in points:
        ax.annotate(f"t={t}", (k, x), textcoords="offset points", xytext=(4, -12), fontsize=8)
    ax.set_xlabel("experts per token (kept)")
    ax.set_ylabel("forward+backward time (ms, min of rounds)")
    ax.set_title(f"Time vs experts per token as t sweeps 0.5 → 1.0\n{machine}", fontsize=9)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _verdict(value: float, key: str) -> str:
    return f"(target ≤ {TARGETS[key]}x): {'met' if value <= TARGETS[key] else 'missed'}"


def _targets(results) -> str:
    lines = ["### Targets", ""]
    train = results["train"]
    ratio = train["fwdbwd"]["xmoe (auto)"].min_ms / train["fwdbwd"][train["bound"]].min_ms
    bound_key = "cuda_bound_ratio" if results["device"] == "cuda" else "bound_ratio"
    lines.append(
        f"- fwd+bwd / dense bound at the training size: **{ratio:.2f}x** "
        + _verdict(ratio, bound_key)
    )
    if FLOOR in train["fwdbwd"]:
        floor = train["fwdbwd"][FLOOR].min_ms
        bound_ms = train["fwdbwd"][train["bound"]].min_ms
        lines.append(
            f"- of which the expert GEMMs alone (same kept pairs, pre-gathered rows): "
            f"{floor / bound_ms:.2f}x the bound; xmoe's dispatch, activation, biases and "
            f"combine add {(train['fwdbwd']['xmoe (auto)'].min_ms - floor) / bound_ms:.2f}x"
        )
    mem = train["memory"]
    if mem.get("xmoe (auto)") is not None and mem.get(train["bound"]):
        m = mem["xmoe (auto)"] / mem[train["bound"]]
        lines.append(
            f"- peak memory (fwd+bwd, without parameter gradients) / bound: **{m:.2f}x** "
            + _verdict(m, "memory_ratio")
        )
    for section, data in results.items():
        if not section.startswith("block-T"):
            continue
        hf_time, hf_name = min((t.min_ms, n) for n, t in data["fwd"].items() if n.startswith("HF"))
        ours = data["fwd"]["xmoe layer"].min_ms
        lines.append(
            f"- one layer with routing, T={_section_tokens(section)}, inference forward: xmoe "
            f"{ours:.3f} ms vs fastest transformers block ({hf_name}) {hf_time:.3f} ms: "
            f"**{ours / hf_time:.2f}x** " + _verdict(ours / hf_time, "block_over_hf")
        )
    for section, data in results.items():
        if not section.startswith("hf-T"):
            continue
        for mode in ("fwd", "fwdbwd"):
            hf_best = min((t.min_ms, n) for n, t in data[mode].items() if n.startswith("HF"))
            ours = data[mode]["xmoe"].min_ms
            verdict = "met" if ours <= hf_best[0] else "missed"
            lines.append(
                f"- T={section[4:]} {mode}: xmoe {ours:.2f} ms vs fastest HF "
                f"({hf_best[1]}) {hf_best[0]:.2f} ms: {ours / hf_best[0]:.2f}x, {verdict}"
            )
    pair = results["pair"]
    (top2, v2), (xm, vx) = list(pair["variants"].items())
    time_ratio = pair["fwdbwd"][xm].min_ms / pair["fwdbwd"][top2].min_ms
    flop_ratio = vx.moe_flops_per_token / v2.moe_flops_per_token
    lines.append(
        f"- {xm} vs {top2}: time ratio {time_ratio:.2f}, FLOP ratio {flop_ratio:.2f}, "
        f"time/FLOP = **{time_ratio / flop_ratio:.2f}x** "
        + _verdict(time_ratio / flop_ratio, "pair_over_flops")
    )
    sweep = sorted(results["sweep"], key=lambda p: p[1])
    monotone = all(b[2] >= a[2] * 0.95 for a, b in itertools.pairwise(sweep))
    spread = max(p[3] for p in sweep) / min(p[3] for p in sweep)
    lines.append(
        f"- sweep: xmoe time rises with experts/token (within 5%): "
        f"{'yes' if monotone else 'no'}; capacity padding max/min time {spread:.2f}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.device == "cpu":
        reexec_with(TIMING_MALLOC_ENV)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    machine = (
        f"{platform.processor() or platform.machine()}, {args.threads} threads, "
        f"torch {torch.__version__}, {args.device} {args.dtype}"
    )
    if args.device == "cuda":
        machine += f", {torch.cuda.get_device_name()}"
    print(f"xmoe layer benchmark: {machine}", flush=True)
    num_tokens, d_model, num_experts, d_expert = _sizes(args)["train"]
    results: dict = {}
    parts = [
        run_section(
            "train",
            args,
            f"Training size: T={num_tokens}, d={d_model}, "
            f"{num_experts} experts x {d_expert}, GELU, t=0.9, γ=8",
            results,
        ),
    ]
    results["device"] = args.device
    for t in _sizes(args)["decode"][:2]:
        parts.append(
            run_section(
                f"block-T{t}",
                args,
                f"One layer with routing, inference: xmoe's MoELayer (top-4, renormalised, SwiGLU) "
                f"and transformers' Mixtral sparse block on the same weights: T={t}, "
                f"d={d_model}, {num_experts}x{d_expert}",
                results,
            )
        )
    for t in (num_tokens, *_sizes(args)["decode"]):
        parts.append(
            run_section(
                f"hf-T{t}",
                args,
                f"Same top-4 routing and SwiGLU weights through xmoe and HF "
                f"transformers' experts back-ends: T={t}, d={d_model}, {num_experts}x{d_expert}",
                results,
            )
        )
    parts.append(
        run_section(
            "pair",
            args,
            f"Equal parameters: top-2 16x{_sizes(args)['pair_d_ff'] // 2} "
            f"vs XMoE 64x{_sizes(args)['pair_d_ff'] // 8} (t=0.9), T={num_tokens}",
            results,
        )
    )
    parts.append(run_sweep(args, results))

    args.out.mkdir(parents=True, exist_ok=True)
    suffix = f"{args.device}{'-quick' if args.quick else ''}"
    plot_path = args.out / f"layer_sweep_{suffix}.png"
    plot_sweep(results["sweep"], plot_path, machine)
    command = "python -m benchmarks.layer " + " ".join(sys.argv[1:])
    document = "\n\n".join(
        [
            f"# Layer benchmark ({args.device}, {args.dtype})",
            f"Made by `{command.strip()}` (`make bench`) on "
            f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC.\n"
            f"Machine: {machine}. Times are the minimum / median over {args.rounds} interleaved "
            f"rounds after {args.warmup} warm-up rounds. CPU timing runs with glibc's large "
            "allocations kept in the heap (`MALLOC_MMAP_MAX_=0`), as a caching allocator would; "
            "memory is measured per variant in a fresh process. The XMoE routers are scaled to "
            "want about 4 experts per token at t=0.9 (a fresh router is near-uniform).",
            _targets(results),
            *parts,
            f"![time vs experts per token]({plot_path.name})",
        ]
    )
    (args.out / f"layer_{suffix}.md").write_text(document + "\n")
    print(f"\nwrote {args.out / f'layer_{suffix}.md'} and {plot_path}")


if __name__ == "__main__":
    main()
