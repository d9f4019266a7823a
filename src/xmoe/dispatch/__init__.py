"""Dispatch: the plan of grouped rows, the grouped-matmul engines, and the dispatcher seam."""

from xmoe.dispatch.dispatcher import Dispatcher, LocalDispatcher
from xmoe.dispatch.engines import ENGINES, batched_max_pairs, choose_engine, grouped_supported
from xmoe.dispatch.plan import DispatchPlan

__all__ = [
    "ENGINES",
    "DispatchPlan",
    "Dispatcher",
    "LocalDispatcher",
    "batched_max_pairs",
    "choose_engine",
    "grouped_supported",
]
