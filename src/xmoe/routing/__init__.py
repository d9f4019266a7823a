"""Routers, selection rules, capacity and auxiliary losses.

Routers are looked up by name in :data:`xmoe.registry.ROUTERS`. A new router is a new file here
(a :class:`Router` subclass with its ``Options``, decorated with ``@ROUTERS.register("name")``)
plus its module's entry in that registry.
"""

from xmoe.registry import ROUTERS
from xmoe.routing.base import Router, RouterOutput
from xmoe.routing.losses import entropy_loss, switch_balance_loss
from xmoe.routing.pairs import RoutedPairs, route_pairs
from xmoe.routing.selection import Selection, ranked_topk
from xmoe.routing.stats import RoutingStats

__all__ = [
    "ROUTERS",
    "RoutedPairs",
    "Router",
    "RouterOutput",
    "RoutingStats",
    "Selection",
    "entropy_loss",
    "ranked_topk",
    "route_pairs",
    "switch_balance_loss",
]
