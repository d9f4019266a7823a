"""Count the experts a model's MoE layers computed while some code runs (e.g. ``generate()``)."""

from __future__ import annotations

from torch import nn

from xmoe.layer import MoELayer


class ExpertUsage:
    """Context manager that hooks every :class:`~xmoe.MoELayer` of ``model``.

    ``with ExpertUsage(model) as usage: model.generate(...)``; then ``usage.experts_per_token``
    is the mean over layers of (kept pairs / tokens) over every call made inside the block.
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, MoELayer)]
        self.pairs = [0] * len(self.layers)
        self.tokens = [0] * len(self.layers)
        self._handles = []

    def _hook(self, index: int):
        def record(module, inputs, output) -> None:
            self.pairs[index] += int(output.routing.kept_per_token.sum())
            self.tokens[index] += output.routing.kept_per_token.numel()

        return record

    def __enter__(self) -> ExpertUsage:
        self._handles = [
            layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(self.layers)
        ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def experts_per_token(self) -> float:
        """Mean over MoE layers of experts computed per token (0 without MoE layers)."""
        rates = [p / t for p, t in zip(self.pairs, self.tokens, strict=True) if t]
        return sum(rates) / len(rates) if rates else 0.0
