"""What every compression pass shares: its options, the MoE layers it acts on, and the routing
statistics it reads from calibration tokens.

Shape legend: B sequences, T tokens per sequence, S calibration tokens, E experts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from torch import nn

from xmoe.config import DictConfig
from xmoe.layer import MoELayer


class CompressionError(ValueError):
    """A pass that cannot run as asked: bad options, or a model it cannot act on (one line)."""


@dataclass(frozen=True)
class PassOptions(DictConfig):
    """A pass's options; a subclass validates its fields in ``__post_init__``."""

    @classmethod
    def parse(cls, pass_name: str, values: dict[str, Any]) -> PassOptions:
        """The options from ``values``; a string value (from the command line) is read as the
        field's annotated type (int, float, bool or str; required fields have no default to
        read a type from, unlike ``key=value`` config overrides)."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise CompressionError(
                f"{pass_name}: unknown option(s) {unknown}; known options: {sorted(known)}"
            )
        typed = {name: _typed(pass_name, known[name], value) for name, value in values.items()}
        try:
            return cls(**typed)
        except TypeError as error:  # a required option is missing
            raise CompressionError(f"{pass_name}: {error}") from None


def _typed(pass_name: str, field, value: Any) -> Any:
    if not isinstance(value, str):
        return value
    kind = {"int": int, "float": float, "bool": _bool}.get(str(field.type), str)
    try:
        return kind(value)
    except ValueError:
        raise CompressionError(
            f"{pass_name}: {field.name}={value!r} is invalid: it must be a {field.type}"
        ) from None


def _bool(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0"):
        raise ValueError(text)
    return text.lower() in ("true", "1")


class CompressionPass(ABC):
    """One compression method: a file with a subclass registered in
    :data:`xmoe.registry.PASSES`. :meth:`apply` changes the model's MoE layers in place and
    returns the model, so passes compose in sequence."""

    Options: ClassVar[type[PassOptions]] = PassOptions

    @classmethod
    @abstractmethod
    def apply(cls, model: nn.Module, options: PassOptions, calibration: torch.Tensor) -> nn.Module:
        """Compress ``model`` (an xmoe ``TransformerLM``) given ``calibration`` (B, T) token
        ids; returns the model."""


class RouterWrapper(nn.Module):
    """A pass's router around a layer's router (``inner``): it overrides ``forward``; everything
    else (weights, tunables, ``set_threshold``, FLOPs) is the wrapped router's, reached through
    attribute lookup, so the layer and the routers stay as they are."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "inner":
                raise
            return getattr(self.inner, name)


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """The model's MoE layers in module order; a model with none is refused."""
    layers = [module for module in model.modules() if isinstance(module, MoELayer)]
    if not layers:
        raise CompressionError(
            f"{type(model).__name__} has no MoE layers: compression passes act on experts"
        )
    return layers


@dataclass
class LayerRouting:
    """A layer's routing over the calibration tokens.

    Attributes:
        logits_SE: (S, E) router logits (fp32 or wider), the similarity MC-SMoE groups by.
        counts_E: (E,) how many tokens selected each expert (its usage frequency).
        mass_E: (E,) the combine weight each expert received, summed over tokens.
    """

    logits_SE: torch.Tensor
    counts_E: torch.Tensor
    mass_E: torch.Tensor


@torch.no_grad()
def collect_routing(
    model: nn.Module, calibration_BT: torch.Tensor, batch_size: int = 32
) -> list[LayerRouting]:
    """Run ``model`` (eval mode, no gradients) on the calibration windows and record every MoE
    layer's routing (:class:`LayerRouting`, one per layer in module order)."""
    check_calibration(calibration_BT)
    layers = moe_layers(model)
    logits: list[list[torch.Tensor]] = [[] for _ in layers]
    counts = [torch.zeros(layer.config.num_experts, dtype=torch.float64) for layer in layers]
    mass = [torch.zeros(layer.config.num_experts, dtype=torch.float64) for layer in layers]

    def hook(index: int):
        def record(router, args, output) -> None:
            x_SD, state = args[0], args[1] if len(args) > 1 else None
            logits[index].append(router.logits_and_state(x_SD, state)[0].detach().cpu())
            selection = output.selection
            expert_N = selection.expert_idx_SK[selection.wanted_SK].cpu()
            weight_N = selection.weight_SK[selection.wanted_SK].detach().cpu().double()
            counts[index].index_add_(0, expert_N, torch.ones_like(weight_N))
            mass[index].index_add_(0, expert_N, weight_N)

        return record

    handles = [layer.router.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for batch in calibration_BT.split(batch_size):
            model(batch.to(device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return [
        LayerRouting(torch.cat(chunks), count, weight)
        for chunks, count, weight in zip(logits, counts, mass, strict=True)
    ]


def check_calibration(calibration_BT: torch.Tensor) -> None:
    """Refuse calibration that is not (B, T) integer token ids with at least one token."""
    if (
        not isinstance(calibration_BT, torch.Tensor)
        or calibration_BT.dim() != 2
        or calibration_BT.dtype not in (torch.int64, torch.int32)
        or calibration_BT.numel() == 0
    ):
        shape = tuple(getattr(calibration_BT, "shape", ()))
        raise CompressionError(
            f"calibration must be a non-empty (B, T) int64 tensor of token ids, got shape {shape}"
        )
