"""``quantize``: MC-MoE's pre-loading mixed-precision quantisation (Huang et al. 2024), with real
packed storage.

Every routed expert's ``w1`` and ``w2`` are quantised group-wise (affine: ``code = round((w -
zero) / scale)``, one scale and zero per ``group_size`` consecutive weights) at a width from
{2, 3, 4, 8} bits chosen per expert by an integer program (:func:`allocate_bits`,
``scipy.optimize.milp``): minimise ``Σ_j usage_j · loss_j(b_j)`` (the measured squared
quantisation error of expert j at b bits, times the routing mass it received on the calibration
tokens) subject to the packed codes fitting ``bits`` per weight on average over all experts of
all MoE layers. Codes are packed into uint8 bytes (:func:`pack_bits`), and the experts
dequantise them on the fly at each call (:class:`QuantizedExperts`). Biases stay as they were.

Shape legend: E experts, J experts of all layers, B widths, D d_model, H d_expert, F the first
layer's width, n weights, g groups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import Bounds, LinearConstraint, milp
from torch import nn

from xmoe.compression.base import (
    CompressionError,
    CompressionPass,
    PassOptions,
    collect_routing,
    moe_layers,
)
from xmoe.compression.merge import ffn_experts_of, replace_inner
from xmoe.config import MoEConfig
from xmoe.dispatch import DispatchPlan
from xmoe.experts import ExpertKind, FFNExperts
from xmoe.experts.fused import expert_ffn
from xmoe.experts.weights import ExpertWeights
from xmoe.registry import PASSES

WIDTHS = (2, 3, 4, 8)
"""The bit widths an expert may take."""

_MATRICES = ("w1", "w2")


def pack_bits(codes_n: torch.Tensor, bits: int) -> torch.Tensor:
    """(ceil(n·bits/8),) uint8: the low ``bits`` bits of each code, least significant first,
    as one little-endian bit stream."""
    shifts = torch.arange(bits, device=codes_n.device)
    stream = ((codes_n.to(torch.int64)[:, None] >> shifts) & 1).flatten()
    stream = torch.cat([stream, stream.new_zeros(-len(stream) % 8)])
    weights = 1 << torch.arange(8, device=codes_n.device)
    return (stream.view(-1, 8) * weights).sum(dim=1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """(count,) int64 codes of :func:`pack_bits`."""
    shifts = torch.arange(8, device=packed.device)
    stream = ((packed.to(torch.int64)[:, None] >> shifts) & 1).flatten()[: count * bits]
    return (stream.view(count, bits) << torch.arange(bits, device=packed.device)).sum(dim=1)


def quantize_groups(
    values_n: torch.Tensor, bits: int, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Affine group-wise quantisation of n values: ``(codes (g·group_size,), scale (g,),
    zero (g,))``, the last group padded with its first value. Each value is within ``scale / 2``
    of ``zero + code · scale`` (a constant group is exact)."""
    padded = torch.cat([values_n, values_n[:1].expand(-len(values_n) % group_size)])
    groups = padded.view(-1, group_size)
    zero = groups.min(dim=1).values
    spread = groups.max(dim=1).values - zero
    levels = (1 << bits) - 1
    scale = torch.where(spread > 0, spread / levels, torch.ones_like(spread))
    codes = ((groups - zero[:, None]) / scale[:, None]).round().clamp(0, levels)
    return codes.flatten().to(torch.uint8), scale, zero


def dequantize_groups(
    codes: torch.Tensor, scale_g: torch.Tensor, zero_g: torch.Tensor, count: int
) -> torch.Tensor:
    """(count,) values of :func:`quantize_groups`' output, in the scale's dtype."""
    values = codes.view(len(scale_g), -1).to(scale_g.dtype) * scale_g[:, None] + zero_g[:, None]
    return values.flatten()[:count]


def quantization_error(values_n: torch.Tensor, bits: int, group_size: int) -> float:
    """Σ (value − dequantised value)² of :func:`quantize_groups` at ``bits``."""
    codes, scale, zero = quantize_groups(values_n, bits, group_size)
    return float((dequantize_groups(codes, scale, zero, len(values_n)) - values_n).square().sum())


def allocate_bits(
    cost_JB: np.ndarray, size_J: np.ndarray, widths: tuple[int, ...], budget: float
) -> list[int]:
    """The width per item minimising ``Σ_j cost_JB[j, b_j]`` subject to
    ``Σ_j size_J[j] · width_{b_j} <= budget`` (a binary integer program, ``scipy.optimize.milp``:
    one variable per (item, width), each item takes exactly one width)."""
    num_items, num_widths = cost_JB.shape
    smallest = float(np.sum(size_J) * min(widths))
    if budget < smallest:
        raise CompressionError(
            f"quantize: a budget of {budget:g} bits is below the smallest possible "
            f"{smallest:g} (every weight at {min(widths)} bits)"
        )
    one_each = np.kron(np.eye(num_items), np.ones(num_widths))
    bits_used = np.outer(size_J, widths).reshape(1, -1)
    result = milp(
        c=np.asarray(cost_JB, dtype=np.float64).ravel(),
        integrality=np.ones(num_items * num_widths),
        bounds=Bounds(0, 1),
        constraints=[LinearConstraint(one_each, 1, 1), LinearConstraint(bits_used, 0, budget)],
        options={"mip_rel_gap": 0.0},  # the optimum, not one within HiGHS's default gap
    )
    if not result.success:
        raise CompressionError(f"quantize: the bit allocation found no solution ({result.message})")
    chosen = result.x.reshape(num_items, num_widths).argmax(axis=1)
    return [widths[b] for b in chosen]


class QuantizedExperts(ExpertKind):
    """E FFN experts whose ``w1`` and ``w2`` are held as packed group-wise codes, expert e at
    ``bits[e]`` bits, dequantised at each call (the biases are kept as they were).

    Buffers per matrix M in (w1, w2): ``M_codes`` (uint8, every expert's packed codes one after
    another), ``M_scale`` and ``M_zero`` (E, groups) in the compute dtype; ``bits_E`` (E,).
    Parameters ``b1``, ``b2`` when the config has biases.
    """

    def __init__(
        self,
        config: MoEConfig,
        num_experts: int,
        bits: list[int],
        group_size: int,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(config, num_experts)
        if len(bits) != num_experts or any(b not in WIDTHS for b in bits):
            raise CompressionError(
                f"quantize: bits={bits} is invalid: one width from {WIDTHS} per expert "
                f"({num_experts})"
            )
        self.bits, self.group_size = list(bits), group_size
        first = 2 * config.d_expert if config.gated else config.d_expert
        self.shapes = {"w1": (config.d_model, first), "w2": (config.d_expert, config.d_model)}
        for name, (rows, cols) in self.shapes.items():
            groups = math.ceil(rows * cols / group_size)
            total = sum(self._code_bytes(name, b) for b in bits)
            self.register_buffer(f"{name}_codes", torch.zeros(total, dtype=torch.uint8))
            self.register_buffer(f"{name}_scale", torch.ones(num_experts, groups, dtype=dtype))
            self.register_buffer(f"{name}_zero", torch.zeros(num_experts, groups, dtype=dtype))
        self.register_buffer("bits_E", torch.tensor(bits, dtype=torch.int64))
        bias = config.bias
        self.b1 = nn.Parameter(torch.zeros(num_experts, first, dtype=dtype)) if bias else None
        self.b2 = (
            nn.Parameter(torch.zeros(num_experts, config.d_model, dtype=dtype)) if bias else None
        )
        self._flops_E = torch.full(
            (num_experts,), config.expert_flops, dtype=torch.int64, device="cpu"
        )

    def _padded(self, name: str) -> int:
        rows, cols = self.shapes[name]
        return math.ceil(rows * cols / self.group_size) * self.group_size

    def _code_bytes(self, name: str, bits: int) -> int:
        return math.ceil(self._padded(name) * bits / 8)

    def _offsets(self, name: str) -> list[int]:
        sizes = [self._code_bytes(name, b) for b in self.bits]
        return [sum(sizes[:e]) for e in range(len(sizes) + 1)]

    @torch.no_grad()
    def load_from(self, experts: FFNExperts) -> QuantizedExperts:
        """Quantise ``experts``' weights into this module (its widths); returns it."""
        for name in _MATRICES:
            weight = getattr(experts, name).detach()
            packed = []
            for e, bits in enumerate(self.bits):
                codes, scale, zero = quantize_groups(weight[e].flatten(), bits, self.group_size)
                packed.append(pack_bits(codes, bits))
                getattr(self, f"{name}_scale")[e] = scale
                getattr(self, f"{name}_zero")[e] = zero
            getattr(self, f"{name}_codes").copy_(torch.cat(packed))
        for name in ("b1", "b2"):
            if getattr(self, name) is not None:
                getattr(self, name).copy_(getattr(experts, name))
        return self

    def dequantized(self, name: str) -> torch.Tensor:
        """(E, rows, cols) the matrix ``name`` (``w1`` or ``w2``) of every expert, decoded."""
        codes, offsets = getattr(self, f"{name}_codes"), self._offsets(name)
        scale, zero = getattr(self, f"{name}_scale"), getattr(self, f"{name}_zero")
        rows, cols = self.shapes[name]
        padded = self._padded(name)
        return torch.stack(
            [
                dequantize_groups(
                    unpack_bits(codes[offsets[e] : offsets[e + 1]], bits, padded),
                    scale[e],
                    zero[e],
                    rows * cols,
                ).view(rows, cols)
                for e, bits in enumerate(self.bits)
            ]
        )

    def forward(
        self, x_SD: torch.Tensor, plan: DispatchPlan, weight_N: torch.Tensor
    ) -> torch.Tensor:
        c = self.config
        weights = ExpertWeights(
            self.dequantized("w1"), self.b1, self.dequantized("w2"), self.b2, c.activation
        )
        return expert_ffn(x_SD, weights.to(x_SD.dtype), plan, weight_N, c.expert_ffn, c.backend)

    def reset_parameters(self) -> None:
        raise CompressionError("quantized experts are not drawn anew: quantize a trained model")

    def flops_per_pair_E(self) -> torch.Tensor:
        return self._flops_E

    @property
    def dtype(self) -> torch.dtype:
        return self.w1_scale.dtype

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, bits={self.bits}, group_size={self.group_size}"


@dataclass(frozen=True)
class QuantizeOptions(PassOptions):
    """Attributes:
    bits: the average width of the packed expert weights (the budget), in [2, 8].
    group_size: weights per scale and zero, >= 2.
    allocation: ``"program"`` (MC-MoE's integer program) or ``"uniform"`` (the naive baseline:
        every expert at ``bits``, one of the widths).
    """

    bits: float = 4.0
    group_size: int = 64
    allocation: str = "program"

    def __post_init__(self) -> None:
        if self.allocation not in ("program", "uniform"):
            raise CompressionError(
                f"quantize: allocation={self.allocation!r} is invalid: it must be 'program' or "
                "'uniform'"
            )
        if self.allocation == "uniform" and self.bits not in WIDTHS:
            raise CompressionError(
                f"quantize: bits={self.bits} is invalid with allocation='uniform': every expert "
                f"takes one width from {WIDTHS}"
            )
        if isinstance(self.bits, bool) or not isinstance(self.bits, int | float):
            raise CompressionError(f"quantize: bits={self.bits!r} is invalid: it must be a number")
        if not min(WIDTHS) <= self.bits <= max(WIDTHS):
            raise CompressionError(
                f"quantize: bits={self.bits} is invalid: the average width must be in "
                f"[{min(WIDTHS)}, {max(WIDTHS)}] (widths {WIDTHS})"
            )
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int):
            raise CompressionError(f"quantize: group_size={self.group_size!r} must be an integer")
        if self.group_size < 2:
            raise CompressionError(f"quantize: group_size={self.group_size} must be >= 2")


@PASSES.register("quantize")
class Quantize(CompressionPass):
    """MC-MoE's mixed-precision quantisation (module docstring); options
    :class:`QuantizeOptions`."""

    Options = QuantizeOptions

    @classmethod
    @torch.no_grad()
    def apply(cls, model: nn.Module, options: QuantizeOptions, calibration: torch.Tensor):
        layers = moe_layers(model)
        targets = [ffn_experts_of("quantize", i, layer.experts) for i, layer in enumerate(layers)]
        routing = collect_routing(model, calibration)
        usage, cost, size = [], [], []
        for (experts, group_E), stats in zip(targets, routing, strict=True):
            mass = torch.zeros(experts.num_experts, dtype=torch.float64)
            usage.append(mass.index_add_(0, group_E, stats.mass_E) / stats.logits_SE.shape[0])
            for e in range(experts.num_experts):
                values = [getattr(experts, name)[e].flatten() for name in _MATRICES]
                size.append(sum(len(v) for v in values))
                cost.append(
                    [
                        sum(quantization_error(v, b, options.group_size) for v in values)
                        for b in WIDTHS
                    ]
                )
        # usage weighs each expert's loss; the floor keeps unused experts from taking wide
        # widths for nothing (among solutions of equal weighted loss)
        weight_J = torch.cat(usage).numpy() + 1e-6
        cost_JB = weight_J[:, None] * np.asarray(cost)
        if options.allocation == "uniform":
            bits = [int(options.bits)] * len(size)
        else:
            bits = allocate_bits(cost_JB, np.asarray(size), WIDTHS, options.bits * sum(size))
        start = 0
        for layer, (experts, _) in zip(layers, targets, strict=True):
            chosen = bits[start : start + experts.num_experts]
            start += experts.num_experts
            quantized = QuantizedExperts(
                experts.config, experts.num_experts, chosen, options.group_size, experts.w1.dtype
            ).to(experts.w1.device)
            replace_inner(layer, quantized.load_from(experts))
        return model
