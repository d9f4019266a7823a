"""Where reading a tensor's value on the host is cheap, and so where the code may branch on it.

On CPU a ``.tolist()`` is a memory copy; on an accelerator it waits for the device queue to
drain (a host sync). Code that would read routing results on the host (the per-expert segment
loop, expert-range chunks, the threshold router's widening) takes a tensor-only path on devices
not listed here, so that a forward+backward launches its kernels without waiting.

Syncs that remain off the CPU, per layer call (``tests/experts/test_ffn_function.py`` checks that no
Python-level host read is left):

* ``route_pairs``: the ``nonzero`` of the wanted (S, K) mask, since N, the number of pairs, is a
  shape and so must be known on the host; with a capacity, the boolean mask of the pairs that
  fit is a second.
* ``F.grouped_mm`` itself on CUDA GPUs without its CUTLASS path (other than SM90+ with bf16):
  PyTorch's fallback reads the offsets on the host.
* Only when asked for: ``check_finite=True`` (a ``bool`` of the input check), the Python
  numbers of :class:`~xmoe.routing.RoutingStats`, and the k* controller's ``end_step`` (once
  per optimizer step, not per call).
"""

from __future__ import annotations

import torch

HOST_READ_DEVICES = frozenset({"cpu"})
"""Device types whose tensors are read on the host without a sync. Tests empty it to run the
sync-free path on CPU."""


def host_reads_cheap(device: torch.device) -> bool:
    """Whether host reads of tensors on ``device`` cost no sync (see :data:`HOST_READ_DEVICES`)."""
    return device.type in HOST_READ_DEVICES
