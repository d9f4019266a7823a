"""What ``import xmoe`` costs on top of ``import torch``, each in a fresh interpreter.

    python -m benchmarks.import_time [--runs 5] [--src DIR]

``--src`` imports xmoe from another checkout's ``src`` (e.g. an older commit in a git worktree)
to compare. Prints the median seconds of ``import torch`` and of what ``import xmoe`` adds, and
whether transformers was imported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

_PROBE = (
    "import sys, time\n"
    "start = time.perf_counter(); import torch; torch_s = time.perf_counter() - start\n"
    "import xmoe; xmoe_s = time.perf_counter() - start - torch_s\n"
    "print(torch_s, xmoe_s, 'transformers' in sys.modules, xmoe.__file__)"
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--src", help="import xmoe from this src directory instead")
    args = parser.parse_args(argv)
    env = dict(os.environ)
    if args.src:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [args.src, env.get("PYTHONPATH")]))
    torch_s, xmoe_s = [], []
    for _ in range(args.runs):
        out = subprocess.run(
            [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True
        ).stdout.split()
        torch_s.append(float(out[0]))
        xmoe_s.append(float(out[1]))
    print(f"xmoe from {out[3]}; transformers imported: {out[2]}")
    print(
        f"import torch: median {statistics.median(torch_s):.2f} s; import xmoe adds: median "
        f"{statistics.median(xmoe_s):.3f} s (min {min(xmoe_s):.3f}, max {max(xmoe_s):.3f}), "
        f"{args.runs} runs"
    )


if __name__ == "__main__":
    main()
