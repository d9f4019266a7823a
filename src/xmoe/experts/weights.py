"""The weights of E stacked FFN experts as one named value, for the compute functions.

Shape legend: E experts, D d_model, H d_expert, F the first layer's width (H, or 2H when gated).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from xmoe.config import GATED_ACTIVATIONS


@dataclass(frozen=True)
class ExpertWeights:
    """E FFN experts ``(act(x·w1 + b1))·w2 + b2``, stacked along the first dimension.

    Attributes:
        w1: (E, D, F); for gated experts ``[gate | up]`` side by side (F = 2H), else F = H.
        b1: (E, F) or None. w2: (E, H, D). b2: (E, D) or None.
        activation: a key of :data:`xmoe.experts.activations.ACTIVATION_FNS`.
    """

    w1: torch.Tensor
    b1: torch.Tensor | None
    w2: torch.Tensor
    b2: torch.Tensor | None
    activation: str

    def __post_init__(self) -> None:
        hidden = self.w2.shape[1]
        first_width = 2 * hidden if self.activation in GATED_ACTIVATIONS else hidden
        if self.w1.shape[2] != first_width:
            raise ValueError(
                f"w1.shape={tuple(self.w1.shape)} does not fit activation={self.activation!r} "
                f"with w2.shape={tuple(self.w2.shape)}: the first layer must be {first_width} wide"
            )

    def tensors(self) -> tuple[torch.Tensor | None, ...]:
        """``(w1, b1, w2, b2)``, the order the autograd function takes them in."""
        return self.w1, self.b1, self.w2, self.b2

    def slice(self, experts: slice) -> ExpertWeights:
        """The experts ``experts`` (views)."""
        return self._map(lambda t: t[experts])

    def to(self, dtype: torch.dtype) -> ExpertWeights:
        """Every tensor in ``dtype`` (``self`` when they already are: no work per call)."""
        if all(t is None or t.dtype == dtype for t in self.tensors()):
            return self
        return self._map(lambda t: t.to(dtype))

    def _map(self, fn) -> ExpertWeights:
        w1, b1, w2, b2 = (None if t is None else fn(t) for t in self.tensors())
        return replace(self, w1=w1, b1=b1, w2=w2, b2=b2)
