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
    target.forward_backward()  # any lazy state, so the measured call allocates only its own
    # Parameter gradients scale with total, not active, parameters, and with gradients reset to
    # None (the PyTorch default) the tensors backward returns become them: measure from None and
    # leave out exactly the gradient bytes that appear, so activations and transients remain.
    target.reset_grads()  # freed before the measurement starts, not during it
    peak = peak_rss_mib(target.forward_backward)
    grads = [p.grad for p in target.module.parameters() if p.grad is not None]
    peak -= sum(g.numel() * g.element_size() for g in grads) / 2**20
    print(json.dumps({"peak_mib": peak}))


if __name__ == "__main__":
    main()
