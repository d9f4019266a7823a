"""Routers, selection rules, capacity and auxiliary losses.

``ROUTERS`` maps a config's ``router`` name to its class; importing this package registers the
built-in routers. A new router is a new file here that decorates its class with
``@ROUTERS.register("name")`` plus an import below.
"""

from xmoe.routing.registry import Registry

ROUTERS: Registry = Registry("router")

from xmoe.routing import threshold, topk  # noqa: E402, F401  (registers the built-ins)
from xmoe.routing.base import Router  # noqa: E402
from xmoe.routing.losses import switch_balance_loss  # noqa: E402
from xmoe.routing.pairs import RoutedPairs, route_pairs  # noqa: E402
from xmoe.routing.selection import Selection, ranked_topk  # noqa: E402
from xmoe.routing.stats import RoutingStats  # noqa: E402

__all__ = [
    "ROUTERS",
    "RoutedPairs",
    "Router",
    "RoutingStats",
    "Selection",
    "ranked_topk",
    "route_pairs",
    "switch_balance_loss",
]
