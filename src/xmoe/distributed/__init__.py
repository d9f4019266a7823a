"""Expert parallelism on torch.distributed: dispatchers, sharded experts, gradient and
checkpoint handling, and a process launcher (``docs/distributed.md``).

Importing this package is light: the torch.distributed parts load on first use.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "AllToAllDispatcher": "xmoe.distributed.all_to_all",
    "DistributedError": "xmoe.distributed.groups",
    "ExpertParallelGroups": "xmoe.distributed.groups",
    "expert_parallel": "xmoe.distributed.sharding",
    "launch": "xmoe.distributed.launcher",
}

__all__ = [*_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'xmoe.distributed' has no attribute {name!r}")
