"""xmoe: adaptive, fine-grained Mixture-of-Experts for PyTorch.

Each token uses only the experts it needs (XMoE threshold routing), and only those
(token, expert) pairs are computed.
"""

from xmoe.config import ConfigError, MoEConfig
from xmoe.layer import MoELayer, MoEOutput
from xmoe.routing import ROUTERS, RoutingStats

__version__ = "0.1.0"

__all__ = ["ROUTERS", "ConfigError", "MoEConfig", "MoELayer", "MoEOutput", "RoutingStats"]
