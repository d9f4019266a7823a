"""``reduce``: UNCURL's task-aware expert reduction (Sarkar et al. 2024, "Revisiting SMoE
Language Models by Evaluating Inefficiencies with Task Specific Expert Pruning"; §26 of the
related-systems spec).

After training, each MoE layer goes from E to ``groups`` experts (E/r for a reduction factor r)
by merging the experts that one task uses alike: the groups are chosen from the router's
outputs on that task's data alone, the corpus domain ``domain`` (e.g. ``"kjv"``), not on mixed
calibration. The grouping and merging are :mod:`~xmoe.compression.merge`'s (router-logit
similarity, alignment, usage-weighted averages), so experts the domain never selects weigh
nothing in their group: the domain keeps the function of the experts it uses. ``compress``
hands the pass the domain's calibration windows (its ``domains`` argument).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from xmoe.compression.base import CompressionError
from xmoe.compression.merge import Merge, MergeOptions
from xmoe.registry import PASSES


@dataclass(frozen=True)
class ReduceOptions(MergeOptions):
    """:class:`~xmoe.compression.merge.MergeOptions`, plus:

    domain: the corpus domain whose calibration windows choose the groups (required; one of
        the data's domains, e.g. ``"kjv"`` or ``"shakespeare"``, ``"synthetic"`` for toy data).
    """

    pass_name: ClassVar[str] = "reduce"

    domain: str = field(kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.domain, str) or not self.domain:
            raise CompressionError(
                f"reduce: domain={self.domain!r} is invalid: it must name a corpus domain"
            )


@PASSES.register("reduce")
class Reduce(Merge):
    """UNCURL's reduction (module docstring): :class:`~xmoe.compression.merge.Merge` on one
    domain's windows; options :class:`ReduceOptions`."""

    Options = ReduceOptions
