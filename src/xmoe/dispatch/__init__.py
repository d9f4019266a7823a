"""Dispatch: the plan of grouped rows and the grouped-matmul engines."""

from xmoe.dispatch.engines import ENGINES, batched_max_pairs, choose_engine, grouped_supported
from xmoe.dispatch.plan import DispatchPlan

__all__ = ["ENGINES", "DispatchPlan", "batched_max_pairs", "choose_engine", "grouped_supported"]
