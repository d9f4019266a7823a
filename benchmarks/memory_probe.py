"""Child process of the layer benchmark: peak memory of one variant's forward+backward,
excluding its parameter gradients (activations and transients only).

Usage: python -m benchmarks.memory_probe SECTION VARIANT [layer benchmark options]
Prints one JSON line ``{"peak_mib": ...}``.
"""

from __future__ import annotations

import json
import sys

from benchmarks.harness import peak_rss_mib
from benchmarks.layer import build_section, parse_args


def main() -> None:
    section, variant = sys.argv[1], sys.argv[2]
    args = parse_args(sys.argv[3:])
    variants = build_section(section, args)
    target = variants[variant]
    target.forward_backward()  # allocates the parameter gradients and any lazy state
    # Parameter gradients scale with total, not active, parameters: keep them allocated so the
    # measured call adds only activations and transients.
    peak = peak_rss_mib(lambda: target.forward_backward(reset_grads=False))
    print(json.dumps({"peak_mib": peak}))


if __name__ == "__main__":
    main()
