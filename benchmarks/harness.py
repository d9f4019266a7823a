"""Timing and memory measurement shared by the benchmarks.

Timing: every variant runs once per round, in the same order, for several rounds after a warm-up
(interleaving spreads machine noise over all variants); the minimum and median are reported.
Memory: a fresh child process per variant, with glibc forced to serve every large tensor by
mmap, so the process's resident high-water mark tracks live tensor bytes; the peak reported is
the high-water mark during one forward+backward from gradients reset to None, minus the resident
size just before it and minus the parameter gradients that call creates (activations and
transients only: the gradients scale with total parameters, which an MoE has many more of).
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

# glibc serves allocations above its mmap threshold with fresh pages that fault on first touch;
# its default threshold adapts upward, so some tensors get reused heap memory and others fresh
# pages, depending on history. The timing runs keep every large buffer in the heap instead (no
# page faults for anyone, as a caching allocator would); the memory probes force mmap instead.
TIMING_MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}
MEMORY_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def target_line(what: str, ratio: float, target: float, moonshot: float) -> str:
    """One Markdown bullet: ``what``'s measured speed-up against its target and moonshot."""
    return (
        f"- {what}: {ratio:.2f}x the faster dense layout (target ≥ {target}x: "
        f"{'met' if ratio >= target else 'missed'}; moonshot ≥ {moonshot}x: "
        f"{'met' if ratio >= moonshot else 'missed'})"
    )


def reexec_with(env: dict[str, str]) -> None:
    """Restart this process with ``env`` set (glibc reads these variables only at start-up)."""
    if all(os.environ.get(k) == v for k, v in env.items()):
        return
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, **env})


@dataclass
class Timing:
    min_ms: float
    median_ms: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    fns: dict[str, Callable[[], None]],
    rounds: int,
    warmup: int,
    device: torch.device,
    calls: int = 1,
) -> dict[str, Timing]:
    """Per-call milliseconds of each function, round by round in turn; a sample is ``calls``
    back-to-back calls (sub-millisecond calls are timed in bursts)."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for round_index in range(warmup + rounds):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            _sync(device)
            if round_index >= warmup:
                samples[name].append((time.perf_counter() - start) * 1e3 / calls)
    return {
        name: Timing(min(values), statistics.median(values)) for name, values in samples.items()
    }


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_rss_mib(fn: Callable[[], None]) -> float:
    """Resident high-water mark during ``fn`` above the resident size before it, in MiB."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current VmRSS
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) / 1024


def peak_memory_in_child(section: str, variant: str, args: list[str]) -> float | None:
    """Run ``benchmarks.memory_probe`` for one variant in a fresh process; None if it failed."""
    command = [sys.executable, "-m", "benchmarks.memory_probe", section, variant, *args]
    env = {k: v for k, v in os.environ.items() if k not in TIMING_MALLOC_ENV}
    env.update(MEMORY_MALLOC_ENV)
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        print(f"  memory probe {section}/{variant} failed: {result.stderr.strip()[-300:]}")
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_mib"]


def write_xmoe_vs_dense(
    path: Path,
    header: list[str],
    rows: list[dict],
    cells: Callable[[dict], str],
    target: float,
    measured: Callable[[dict], str],
) -> Path:
    """Write ``header``, then a table of ``rows`` (alternating xmoe, dense) and the verdicts.

    Each row has ``tokens_per_s`` and ``median_tokens_per_s``; ``cells(row)`` gives the row's
    leading table cells, ``measured(xmoe_row)`` names what the verdict compares. The ratio is
    xmoe's tokens/s over dense's; a verdict is met when it is at least ``target``.
    """
    lines, verdicts = list(header), []
    for xmoe_row, dense_row in zip(rows[::2], rows[1::2], strict=True):
        ratio = xmoe_row["tokens_per_s"] / dense_row["tokens_per_s"]
        for row, shown in ((xmoe_row, f"**{ratio:.2f}x**"), (dense_row, "")):
            lines.append(
                f"| {cells(row)} "
                f"| {row['tokens_per_s']:,.0f} ({row['median_tokens_per_s']:,.0f}) | {shown} |"
            )
        met = "met" if ratio >= target else "missed"
        verdicts.append(f"- {measured(xmoe_row)} = {ratio:.2f}x dense (target ≥ {target}x): {met}")
    path.write_text("\n".join([*lines, "", "### Target", "", *verdicts]) + "\n")
    return path


def run_sizes(
    title: str,
    sizes: dict,
    bench_size: Callable[[str, object, object], list[dict]],
    args,
    describe: Callable[[dict], str],
) -> list[dict]:
    """Every size's rows from ``bench_size(name, size, args)`` on ``args.threads`` threads,
    printing ``describe(row)`` and its tokens/s as each size finishes."""
    torch.set_num_threads(args.threads)
    print(f"{title}: {torch.get_num_threads()} threads, {platform.machine()}")
    rows = []
    for name, size in sizes.items():
        new_rows = bench_size(name, size, args)
        for row in new_rows:
            print(f"  {describe(row)}: {row['tokens_per_s']:,.0f} tok/s")
        rows += new_rows
    return rows
