"""xmoe: adaptive, fine-grained Mixture-of-Experts for PyTorch.

Each token uses only the experts it needs (XMoE threshold routing), and only those
(token, expert) pairs are computed.
"""

import importlib.util

from xmoe.config import ConfigError, MoEConfig
from xmoe.layer import MoELayer, MoEOutput
from xmoe.routing import ROUTERS, RoutingStats

__version__ = "0.1.0"

if importlib.util.find_spec("transformers") is not None:  # the optional ``hf`` extra
    from xmoe.hf import autoregister

    autoregister.install()  # registers when transformers loads its Auto classes, not now

__all__ = ["ROUTERS", "ConfigError", "MoEConfig", "MoELayer", "MoEOutput", "RoutingStats"]
