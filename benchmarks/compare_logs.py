"""Whether two training runs logged the same numbers: every field of every ``log.jsonl`` line
except throughput (``*per_second*``), which depends on the machine.

    python -m benchmarks.compare_logs RUN_DIR_A RUN_DIR_B

Used to show that a refactor changes no result: train the same preset on the same seed and
thread count on two checkouts (``xmoe --threads 1 train --preset tiny --max-steps 40 --out ...``)
and compare. Exits 1 and prints the first differing lines when they differ.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def logged(run_dir: Path) -> list[dict]:
    """The run's log lines without throughput fields."""
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    return [{k: v for k, v in row.items() if "per_second" not in k} for row in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    args = parser.parse_args(argv)
    a, b = logged(args.run_a), logged(args.run_b)
    if a == b:
        print(f"identical: {len(a)} log lines, every field but throughput")
        return 0
    print(f"differ: {len(a)} vs {len(b)} log lines")
    shown = 0
    for row_a, row_b in zip(a, b, strict=False):
        if row_a != row_b and shown < 3:
            print(f"  {row_a}\n  {row_b}")
            shown += 1
    return 1


if __name__ == "__main__":
    sys.exit(main())
