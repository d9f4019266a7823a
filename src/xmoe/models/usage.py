"""Count the experts a model's MoE layers computed while some code runs (e.g. ``generate()``)."""

from __future__ import annotations

import torch
from torch import nn

from xmoe.layer import MoELayer
from xmoe.routing.stats import layer_mean


class KeptPairsCounter:
    """Context manager that hooks ``modules`` and sums, per module, the (token, expert) pairs
    kept and the tokens seen over every call made inside the block.

    Subclasses say which modules to hook and where a call's per-token counts are
    (:meth:`kept_per_token`).
    """

    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = modules
        self.pairs = [0] * len(modules)
        self.tokens = [0] * len(modules)
        self._handles = []

    def kept_per_token(self, module: nn.Module, output) -> torch.Tensor:
        """(S,) experts kept by each token of the call that returned ``output``."""
        raise NotImplementedError

    def _hook(self, index: int):
        def record(module, inputs, output) -> None:
            kept_S = self.kept_per_token(module, output)
            self.pairs[index] += int(kept_S.sum())
            self.tokens[index] += kept_S.numel()

        return record

    def __enter__(self):
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.modules)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def per_layer(self) -> list[float]:
        """Experts per token of each hooked module (0 for one never called)."""
        return [p / t if t else 0.0 for p, t in zip(self.pairs, self.tokens, strict=True)]

    @property
    def experts_per_token(self) -> float:
        """Mean over the modules that ran of experts computed per token (0 if none ran)."""
        rates = [p / t for p, t in zip(self.pairs, self.tokens, strict=True) if t]
        return layer_mean(rates) if rates else 0.0


class ExpertUsage(KeptPairsCounter):
    """Hooks every :class:`~xmoe.MoELayer` of ``model``.

    ``with ExpertUsage(model) as usage: model.generate(...)``; then ``usage.experts_per_token``
    is the mean over layers of (kept pairs / tokens) over every call made inside the block.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__([m for m in model.modules() if isinstance(m, MoELayer)])

    def kept_per_token(self, module: nn.Module, output) -> torch.Tensor:
        return output.routing.kept_per_token
