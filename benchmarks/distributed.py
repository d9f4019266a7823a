"""Expert-parallel training on this machine: tokens/s and all-to-all volume per step at 1, 2 and
4 gloo ranks, and a paper model of all-to-all time against expert compute at real scale.

    python -m benchmarks.distributed [--ranks 1 2 4] [--steps 4] [--quick]
    python -m benchmarks.distributed --scale-model     # only the paper model (prints it)

Every run trains the same model on the same global batch per step: ``--micro-batches``
micro-batches of ``B x T`` tokens, split over the ranks as ``xmoe train --nproc`` splits them
(whole micro-batches per rank), experts sharded over all ranks, gradients of everything else
all-reduced. The routers are scaled once (as in ``benchmarks.lm_train``) so that tokens want
about ``--experts`` experts at t=0.9, and every rank starts from those weights. The CPU ranks
share the machine's cores, so this is a correctness-and-volume table, not a speedup claim: the
loss column is the first step's loss minus the single-process one.

The scale model (:func:`scale_model_rows`) is arithmetic, not a measurement: per token and MoE
layer, a training step moves each kept pair's row to its expert and back, forward and backward
(``4 · k · d · bytes`` of which the fraction ``(P-1)/P`` leaves the rank under uniform routing),
and computes ``3 · 2 · m · d · h · k`` expert FLOPs (m matmuls of d x h per expert; backward
twice the forward). Their ratio at a cluster's per-GPU bandwidth and sustained FLOP/s says where
the all-to-all, not the experts, sets the step time (when it is not overlapped).

Writes ``docs/benchmarks/distributed_cpu.md``.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

from xmoe import MoEConfig
from xmoe.flops import FORWARD_BACKWARD, ffn_flops
from xmoe.models import ModelConfig, TransformerLM

# name: (d_model, layers, heads, experts, d_expert, vocab, batch, seq_len, micro-batches)
SIZE = ("lm presets' shape", (128, 4, 4, 32, 128, 8192, 4, 128, 4))
QUICK_SIZE = ("quick", (32, 2, 2, 8, 16, 256, 2, 16, 4))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=4, help="timed steps (after one warm-up)")
    parser.add_argument("--experts", type=float, default=4.0, help="target experts per token")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    parser.add_argument("--scale-model", action="store_true", help="print the paper model only")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    return parser.parse_args(argv)


def _model_config(size) -> ModelConfig:
    d_model, layers, heads, experts, d_expert, vocab, _, seq_len, _ = size
    moe = MoEConfig(d_model=d_model, num_experts=experts, d_expert=d_expert, threshold=0.9)
    return ModelConfig(
        vocab_size=vocab,
        d_model=d_model,
        num_layers=layers,
        num_heads=heads,
        max_seq_len=seq_len,
        d_ff=4 * d_model,
        moe=moe,
    )


def _batches(size, steps: int) -> torch.Tensor:
    """(steps, micro-batches, B, T + 1) token ids, the same for every world size."""
    *_, vocab, batch, seq_len, micro = size
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (steps, micro, batch, seq_len + 1), generator=generator)


def _rank_run(size, state_path: str, steps: int) -> dict:
    """One rank: warm-up step + ``steps`` timed steps; per-step traffic and the losses."""
    import torch.distributed as dist

    from xmoe.distributed.data_parallel import clip_grad_norm, sum_values, sync_gradients
    from xmoe.distributed.groups import ExpertParallelGroups
    from xmoe.distributed.sharding import expert_parallel, traffic

    groups = ExpertParallelGroups.create()
    rank, world = groups.rank, groups.world_size
    model = TransformerLM(_model_config(size))
    model.load_state_dict(torch.load(state_path, weights_only=True))
    expert_parallel(model, groups)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-7)
    batches = _batches(size, steps + 1)
    micro = batches.shape[1]
    mine = range(rank * micro // world, (rank + 1) * micro // world)
    dense_bytes = sum(
        p.numel() * p.element_size()
        for name, p in model.named_parameters()
        if ".experts." not in f".{name}"
    )
    losses, seconds = [], []
    for step in range(steps + 1):
        for counter in traffic(model):
            counter.reset()
        dist.barrier()
        started = time.perf_counter()
        loss_sum = 0.0
        for index in mine:
            tokens = batches[step, index]
            out = model(tokens[:, :-1], tokens[:, 1:])
            ((out.loss + out.aux_loss) / micro).backward()
            loss_sum += float(out.loss.detach()) / micro
        (loss_sum,) = sum_values([loss_sum])
        sync_gradients(model, groups)
        clip_grad_norm(model, groups, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dist.barrier()
        if step:
            seconds.append(time.perf_counter() - started)
        losses.append(loss_sum)
    counters = traffic(model)
    sent = [
        sum(c.total_bytes for c in counters),
        sum(c.remote_bytes for c in counters),
    ]
    sent = sum_values([float(v) for v in sent])  # over the ranks, the last step
    return {
        "losses": losses,
        "seconds": seconds,
        "a2a_bytes": 2 * sent[0],  # forward + backward
        "a2a_remote_bytes": 2 * sent[1],
        "allreduce_bytes": dense_bytes if world > 1 else 0,
    }


def _scale_routers(model: TransformerLM, size, target: float) -> None:
    from benchmarks.lm_train import scale_routers

    probe = _batches(size, 1)[0, 0, :, :-1]
    scale_routers(model, probe, target)


def measure(size, ranks: list[int], steps: int, target: float, threads: int) -> list[dict]:
    """Rows per world size; ``threads``: torch intra-op threads of each rank."""
    from xmoe.distributed.launcher import launch

    torch.manual_seed(0)
    model = TransformerLM(_model_config(size))
    _scale_routers(model, size, target)
    rows = []
    with tempfile.TemporaryDirectory(prefix="xmoe-bench-") as directory:
        state_path = os.path.join(directory, "state.pt")
        torch.save(model.state_dict(), state_path)
        for world in ranks:
            result = launch(_rank_run, world, size, state_path, steps, threads=threads)[0]
            rows.append({"ranks": world, "threads_per_rank": threads, **result})
    return rows


# --- the paper model ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Cluster:
    name: str
    gpus: int
    gpus_per_node: int
    intra_gb_s: float  # per-GPU one-way bandwidth inside a node (GB/s)
    inter_gb_s: float  # per-GPU one-way bandwidth between nodes (GB/s)
    tflops: float  # sustained bf16 dense TFLOP/s per GPU (peak x an assumed 40% MFU)


CLUSTERS = (
    Cluster("1 node, 8 x H100 SXM (NVLink 4)", 8, 8, 450.0, 0.0, 989 * 0.4),
    Cluster("8 nodes x 8 H100, 8 x 400G InfiniBand per node", 64, 8, 450.0, 50.0, 989 * 0.4),
    Cluster("8 nodes x 8 A100, 1 x 100G Ethernet per node", 64, 8, 300.0, 12.5 / 8, 312 * 0.4),
)


@dataclass(frozen=True)
class MoEShape:
    name: str
    d_model: int
    d_expert: int
    experts_per_token: float
    matmuls: int  # per expert: 2 (FFN) or 3 (SwiGLU)


SHAPES = (
    MoEShape("Mixtral-8x7B-like (d 4096, h 14336, top-2, SwiGLU)", 4096, 14336, 2, 3),
    MoEShape("DeepSeek-V3-like (d 7168, h 2048, top-8, SwiGLU)", 7168, 2048, 8, 3),
    MoEShape("xmoe fine-grained (d 4096, h 512, ~4 kept, GELU)", 4096, 512, 4, 2),
)


def _effective_bandwidth(cluster: Cluster) -> tuple[float, float]:
    """(GB/s per GPU for its all-to-all traffic, fraction of rows leaving the GPU) with experts
    sharded over all GPUs and uniform routing: traffic to GPUs in the node goes at the
    intra-node rate, the rest at the inter-node rate, concurrently; the slower part sets the
    time."""
    remote = (cluster.gpus - 1) / cluster.gpus
    in_node = (cluster.gpus_per_node - 1) / cluster.gpus
    off_node = remote - in_node
    times = [in_node / cluster.intra_gb_s]
    if off_node > 0:
        times.append(off_node / cluster.inter_gb_s)
    return remote / max(times), remote


def scale_model_rows(bytes_per_element: int = 2) -> list[dict]:
    rows = []
    for shape in SHAPES:
        for cluster in CLUSTERS:
            bandwidth, remote = _effective_bandwidth(cluster)
            k, d, h = shape.experts_per_token, shape.d_model, shape.d_expert
            comm_bytes = 4 * k * d * bytes_per_element * remote  # per token and layer
            flops = FORWARD_BACKWARD * ffn_flops(d, h, gated=shape.matmuls == 3) * k
            comm_s = comm_bytes / (bandwidth * 1e9)
            compute_s = flops / (cluster.tflops * 1e12)
            rows.append(
                {
                    "shape": shape.name,
                    "cluster": cluster.name,
                    "kib_per_token": comm_bytes / 1024,
                    "bandwidth": bandwidth,
                    "comm_us_per_ktok": comm_s * 1e9,  # per 1000 tokens, in microseconds
                    "compute_us_per_ktok": compute_s * 1e9,
                    "ratio": comm_s / compute_s,
                }
            )
    return rows


def scale_model_markdown() -> list[str]:
    lines = [
        "| MoE layer | cluster (experts over all GPUs) | all-to-all KiB / token / layer "
        "(fwd+bwd, leaving the GPU) | effective GB/s per GPU | all-to-all µs / 1k tokens "
        "| expert compute µs / 1k tokens | all-to-all / compute |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in scale_model_rows():
        ratio = row["ratio"]
        mark = f"**{ratio:.2f}**" if ratio >= 1 else f"{ratio:.2f}"
        lines.append(
            f"| {row['shape']} | {row['cluster']} | {row['kib_per_token']:.1f} "
            f"| {row['bandwidth']:.3g} | {row['comm_us_per_ktok']:,.0f} "
            f"| {row['compute_us_per_ktok']:,.0f} | {mark} |"
        )
    return lines


def write_report(rows: list[dict], size, args, argv: list[str]) -> Path:
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / ("distributed_cpu_quick.md" if args.quick else "distributed_cpu.md")
    name, (d_model, layers, _, experts, d_expert, _, batch, seq_len, micro) = size
    tokens = micro * batch * seq_len
    reference = rows[0]["losses"][0] if rows and rows[0]["ranks"] == 1 else math.nan
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = " ".join(["python -m benchmarks.distributed", *argv])
    lines = [
        "# Expert-parallel training on CPU ranks (gloo)",
        "",
        f"Made by `{command}` (`make bench`) on {now}. Machine: {platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, gloo. Model: {name} (d={d_model}, "
        f"{layers} blocks, MoE in every second one, {experts} experts x {d_expert}, routers "
        f"scaled to want about {args.experts:g} experts per token at t=0.9); one step = "
        f"{micro} micro-batches of B={batch} x T={seq_len} ({tokens:,} tokens) split over the "
        f"ranks, experts sharded over all ranks; best of {args.steps} steps after a warm-up. "
        f"**The ranks share the machine's {os.cpu_count()} cores** (with whatever else runs "
        f"there; {args.threads} torch thread(s) per rank), so tokens/s measures overhead, not "
        "speedup. "
        "All-to-all bytes are summed over the ranks for one step, forward and backward "
        "(counts, token rows, routing weights, returned rows; fp32); 'leaving the rank' excludes "
        "a rank's rows for its own experts. The all-reduce column is the payload of the "
        "non-expert gradients per rank. Loss Δ: the first step's loss minus the single-process "
        "one (same weights, same tokens).",
        "",
        "| ranks | threads / rank | ms / step | tokens/s | all-to-all MiB / step | leaving the "
        "rank, MiB | grad all-reduce MiB / rank | loss Δ vs 1 process |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        best = min(row["seconds"])
        delta = row["losses"][0] - reference
        lines.append(
            f"| {row['ranks']} | {row['threads_per_rank']} | {best * 1e3:.0f} "
            f"| {tokens / best:,.0f} | {row['a2a_bytes'] / 2**20:.2f} "
            f"| {row['a2a_remote_bytes'] / 2**20:.2f} | {row['allreduce_bytes'] / 2**20:.2f} "
            f"| {delta:+.1e} |"
        )
    lines += [
        "",
        "## Where the all-to-all dominates at scale (paper model)",
        "",
        "Computed by `python -m benchmarks.distributed --scale-model` (arithmetic, not measured; "
        "bf16 rows, uniform routing, no overlap of communication with compute, peak link rates "
        "and 40% of peak FLOP/s; see docs/distributed.md).",
        "",
        *scale_model_markdown(),
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.scale_model:
        print("\n".join(scale_model_markdown()))
        return
    name, size = QUICK_SIZE if args.quick else SIZE
    rows = measure(size, sorted(set(args.ranks)), args.steps, args.experts, args.threads)
    for row in rows:
        print(
            f"{row['ranks']} ranks: {min(row['seconds']) * 1e3:.0f} ms/step, "
            f"all-to-all {row['a2a_bytes'] / 2**20:.2f} MiB/step"
        )
    argv = sys.argv[1:] if argv is None else argv
    print(f"wrote {write_report(rows, (name, size), args, argv)}")


if __name__ == "__main__":
    main()
