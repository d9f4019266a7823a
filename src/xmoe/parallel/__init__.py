"""Expert parallelism on torch.distributed: dispatchers, sharded experts, gradient and
checkpoint handling, and a process launcher (``docs/distributed.md``).

Importing this package is light: the torch.distributed parts load on first use.
"""

from __future__ import annotations

import importlib

from xmoe.parallel.dispatcher import LOCAL_DISPATCHER, Dispatcher, LocalDispatcher

_LAZY = {
    "AllToAllDispatcher": "xmoe.parallel.all_to_all",
    "DistributedError": "xmoe.parallel.groups",
    "ExpertParallelGroups": "xmoe.parallel.groups",
    "expert_parallel": "xmoe.parallel.sharding",
    "launch": "xmoe.parallel.launcher",
}

__all__ = ["LOCAL_DISPATCHER", "Dispatcher", "LocalDispatcher", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'xmoe.parallel' has no attribute {name!r}")
