"""Dynamic-MoE's top-p routing: keep experts until their mass first exceeds p.

The same family as XMoE's threshold rule, differing at the boundary: an expert is kept iff the
mass of the strictly better experts is **at most** p (XMoE: strictly below t), so the expert
whose inclusive mass first exceeds p is the last one kept. Dynamic-MoE routes dropless and trains
with a router-entropy loss; here the entropy loss is on by default (``entropy_coef=0.1``, our
choice from short runs on this project's LM, see ``docs/routing.md``) and capacity is whatever
the layer's config says (None = dropless, the Dynamic-MoE setting).
"""

from __future__ import annotations

from dataclasses import dataclass

from xmoe.registry import ROUTERS
from xmoe.routing.threshold import ThresholdOptions, ThresholdRouter


@dataclass(frozen=True)
class TopPOptions(ThresholdOptions):
    """:class:`ThresholdOptions` with the entropy loss on by default."""

    entropy_coef: float = 0.1


@ROUTERS.register("topp")
class TopPRouter(ThresholdRouter):
    """Keeps sorted position j iff the mass of the strictly better experts is at most p
    (``threshold``: ``MoEConfig.threshold`` at construction, then ``set_threshold``)."""

    Options = TopPOptions
    at_most = True
