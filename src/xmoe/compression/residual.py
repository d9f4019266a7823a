"""``residual``: ResMoE's barycentre expert plus compressed residuals (Ai et al. 2025; §23 of the
related-systems spec).

Per MoE layer, data-free: the experts' hidden neurons are aligned to a barycentre expert by
Hungarian matching (:mod:`~xmoe.compression.merge`'s alignment), the barycentre is the mean of
the aligned experts, and the two steps repeat until no permutation changes (at most
``iterations`` rounds, starting from expert 0). Each aligned expert's ``w1`` and ``w2`` are held
as the barycentre's plus a compressed residual ``R_e = P_e W_e − W̄``: its truncated SVD at
``rank`` (factors ``U_e`` (rows, r) scaled by the singular values and ``V_e`` (r, cols)) or its
``keep`` fraction of largest-magnitude entries (a packed 1-bit mask and the kept values). The
factors are what is stored, not a dense copy; the experts rebuild ``W̄ + R̃_e`` at each call.
An aligned expert computes what it did (its hidden neurons are a sum), so no permutation is
stored. Biases stay per expert as they were (``b1`` permuted with the neurons).
``barycentre="zero"`` is the naive baseline: no alignment and no barycentre, each expert's own
weights compressed (per-expert SVD or magnitude pruning).

Shape legend: E experts, D d_model, H d_expert, F the first layer's width, r rank, k kept
entries per expert, n entries per matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from xmoe.compression.base import CompressionError, CompressionPass, PassOptions, moe_layers
from xmoe.compression.merge import (
    alignment,
    ffn_experts_of,
    neuron_features,
    permute_neurons,
    replace_inner,
)
from xmoe.compression.quantize import pack_bits, unpack_bits
from xmoe.config import MoEConfig
from xmoe.dispatch import DispatchPlan
from xmoe.experts import ExpertKind, FFNExperts
from xmoe.experts.fused import expert_ffn
from xmoe.experts.weights import ExpertWeights
from xmoe.registry import PASSES

METHODS = ("svd", "prune")
BARYCENTRES = ("aligned", "zero")
_MATRICES = ("w1", "w2")


class ResidualExperts(ExpertKind):
    """E FFN experts held as a barycentre (or none) plus each expert's compressed residual, per
    matrix M in (w1, w2) of shape (rows, cols) (module docstring).

    Parameters: ``M_bar`` (rows, cols) with a barycentre; ``M_u`` (E, rows, r) and ``M_v``
    (E, r, cols) for ``method="svd"``, ``M_values`` (E, k) for ``"prune"``, whose buffer
    ``M_mask`` (uint8, ceil(E·n/8)) packs which entries are kept, row-major; ``b1``, ``b2``
    when the config has biases. ``sizes[M]`` is r or k.
    """

    def __init__(
        self,
        config: MoEConfig,
        num_experts: int,
        method: str,
        sizes: dict[str, int],
        barycentre: bool,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(config, num_experts)
        self.method, self.sizes, self.barycentre = method, dict(sizes), barycentre
        first = 2 * config.d_expert if config.gated else config.d_expert
        self.shapes = {"w1": (config.d_model, first), "w2": (config.d_expert, config.d_model)}
        for name, (rows, cols) in self.shapes.items():
            size = self.sizes[name]
            if barycentre:
                self._parameter(f"{name}_bar", (rows, cols), dtype)
            if method == "svd":
                self._parameter(f"{name}_u", (num_experts, rows, size), dtype)
                self._parameter(f"{name}_v", (num_experts, size, cols), dtype)
            else:
                self._parameter(f"{name}_values", (num_experts, size), dtype)
                mask_bytes = math.ceil(num_experts * rows * cols / 8)
                self.register_buffer(f"{name}_mask", torch.zeros(mask_bytes, dtype=torch.uint8))
        self.b1 = (
            nn.Parameter(torch.zeros(num_experts, first, dtype=dtype)) if config.bias else None
        )
        self.b2 = (
            nn.Parameter(torch.zeros(num_experts, config.d_model, dtype=dtype))
            if config.bias
            else None
        )
        self._flops_E = torch.full(
            (num_experts,), config.expert_flops, dtype=torch.int64, device="cpu"
        )

    def _parameter(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.register_parameter(name, nn.Parameter(torch.zeros(shape, dtype=dtype)))

    @torch.no_grad()
    def load_residuals(self, name: str, residual_ERC: torch.Tensor) -> None:
        """Compress the (E, rows, cols) residuals of matrix ``name`` into this module."""
        size = self.sizes[name]
        if self.method == "svd":
            u_ERR, s_ER, vh_ERC = torch.linalg.svd(residual_ERC, full_matrices=False)
            getattr(self, f"{name}_u").copy_(u_ERR[..., :size] * s_ER[:, None, :size])
            getattr(self, f"{name}_v").copy_(vh_ERC[:, :size])
            return
        flat_En = residual_ERC.flatten(1)
        kept_Ek = flat_En.abs().topk(size, dim=1).indices
        mask_En = torch.zeros_like(flat_En, dtype=torch.bool).scatter_(1, kept_Ek, True)
        getattr(self, f"{name}_values").copy_(flat_En[mask_En].view(len(flat_En), size))
        getattr(self, f"{name}_mask").copy_(pack_bits(mask_En.flatten(), 1))

    def matrix(self, name: str) -> torch.Tensor:
        """(E, rows, cols) the matrix ``name`` (``w1`` or ``w2``) of every expert, rebuilt."""
        rows, cols = self.shapes[name]
        if self.method == "svd":
            weight = getattr(self, f"{name}_u") @ getattr(self, f"{name}_v")
        else:
            count = self.num_experts * rows * cols
            mask = unpack_bits(getattr(self, f"{name}_mask"), 1, count).bool()
            values = getattr(self, f"{name}_values")
            weight = values.new_zeros(count).masked_scatter(mask, values.flatten())
            weight = weight.view(self.num_experts, rows, cols)
        return weight + getattr(self, f"{name}_bar") if self.barycentre else weight

    def forward(
        self, x_SD: torch.Tensor, plan: DispatchPlan, weight_N: torch.Tensor
    ) -> torch.Tensor:
        c = self.config
        weights = ExpertWeights(
            self.matrix("w1"), self.b1, self.matrix("w2"), self.b2, c.activation
        )
        return expert_ffn(x_SD, weights.to(x_SD.dtype), plan, weight_N, c.expert_ffn, c.backend)

    def reset_parameters(self) -> None:
        raise CompressionError("residual experts are not drawn anew: compress a trained model")

    def flops_per_pair_E(self) -> torch.Tensor:
        return self._flops_E  # a pair runs one rebuilt FFN

    def sharded_parameters(self) -> list[str]:
        raise NotImplementedError("residual experts are not sharded over processes")

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, method={self.method}, sizes={self.sizes}, "
            f"barycentre={self.barycentre}"
        )


@dataclass(frozen=True)
class ResidualOptions(PassOptions):
    """Attributes:
    method: ``"svd"`` (truncated SVD of each residual) or ``"prune"`` (magnitude pruning).
    rank: with ``"svd"``, the residuals' rank, >= 1 (required; each matrix keeps at most its
        full rank, min(rows, cols)).
    keep: with ``"prune"``, the fraction of each residual's entries kept, in (0, 1].
    barycentre: ``"aligned"`` (ResMoE) or ``"zero"`` (the naive baseline: each expert's own
        weights compressed, no barycentre).
    iterations: most rounds of alignment and averaging, >= 1.
    """

    method: str = "svd"
    rank: int = 0
    keep: float = 1.0
    barycentre: str = "aligned"
    iterations: int = 10

    def __post_init__(self) -> None:
        for name, allowed in (("method", METHODS), ("barycentre", BARYCENTRES)):
            if getattr(self, name) not in allowed:
                raise CompressionError(
                    f"residual: {name}={getattr(self, name)!r} is invalid: it must be one of "
                    f"{allowed}"
                )
        rank = ("rank", 1, f" with method={self.method!r}") if self.method == "svd" else None
        for name, low, context in filter(None, (rank, ("iterations", 1, ""))):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise CompressionError(
                    f"residual: {name}={value!r} is invalid{context}: it must be an integer "
                    f">= {low}"
                )
        valid = isinstance(self.keep, int | float) and not isinstance(self.keep, bool)
        if not valid or not 0 < self.keep <= 1:
            raise CompressionError(
                f"residual: keep={self.keep!r} is invalid: it must be a fraction in (0, 1]"
            )


@PASSES.register("residual")
class Residual(CompressionPass):
    """ResMoE (module docstring); data-free (the calibration is not read); options
    :class:`ResidualOptions`."""

    Options = ResidualOptions

    @classmethod
    @torch.no_grad()
    def apply(cls, model: nn.Module, options: ResidualOptions, calibration: torch.Tensor):
        layers = moe_layers(model)
        targets = [
            ffn_experts_of("residual", i, layer.experts)[0] for i, layer in enumerate(layers)
        ]
        for index, experts in enumerate(targets):
            _check_rank(index, experts, options)
        for layer, experts in zip(layers, targets, strict=True):
            replace_inner(layer, residual_experts(experts, options))
        return model


def _check_rank(index: int, experts: FFNExperts, options: ResidualOptions) -> None:
    full = max(min(w.shape[1:]) for w in (experts.w1, experts.w2))
    if options.method == "svd" and options.rank > full:
        raise CompressionError(
            f"residual: rank={options.rank} is more than MoE layer {index}'s full rank {full} "
            "(the largest min(rows, cols) of its expert matrices)"
        )


def barycentre(
    w1_EDF: torch.Tensor, b1_EF: torch.Tensor | None, w2_EHD: torch.Tensor, iterations: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The experts with their hidden neurons aligned to their barycentre (the mean of the
    aligned experts), by alternating Hungarian alignment and averaging from expert 0 until no
    permutation changes, at most ``iterations`` rounds: ``(w1, b1, w2)`` aligned, stacked."""
    experts = [
        (w1_EDF[e], None if b1_EF is None else b1_EF[e], w2_EHD[e]) for e in range(len(w1_EDF))
    ]
    centre, perms, aligned = experts[0], None, experts
    for _ in range(iterations):
        reference = neuron_features(*centre)
        new = [alignment(reference, neuron_features(*expert)) for expert in experts]
        aligned = [
            permute_neurons(*expert, perm) for expert, perm in zip(experts, new, strict=True)
        ]
        centre = tuple(_mean([a[i] for a in aligned]) for i in range(3))
        if perms is not None and all(torch.equal(p, q) for p, q in zip(perms, new, strict=True)):
            break
        perms = new
    return tuple(_stack([a[i] for a in aligned]) for i in range(3))


@torch.no_grad()
def residual_experts(experts: FFNExperts, options: ResidualOptions) -> ResidualExperts:
    """``experts`` held as a barycentre plus compressed residuals (module docstring)."""
    w1, b1, w2, b2 = (None if t is None else t.detach() for t in experts.weights().tensors())
    if options.barycentre == "aligned":
        w1, b1, w2 = barycentre(w1, b1, w2, options.iterations)
    matrices = {"w1": w1, "w2": w2}
    sizes = {name: _size(weight, options) for name, weight in matrices.items()}
    module = ResidualExperts(
        experts.config,
        experts.num_experts,
        options.method,
        sizes,
        options.barycentre == "aligned",
        w1.dtype,
    ).to(w1.device)
    for name, weight in matrices.items():
        if module.barycentre:
            getattr(module, f"{name}_bar").copy_(weight.mean(dim=0))
            weight = weight - weight.mean(dim=0)
        module.load_residuals(name, weight)
    for name, bias in (("b1", b1), ("b2", b2)):
        if bias is not None:
            getattr(module, name).copy_(bias)
    return module


def _size(weight_ERC: torch.Tensor, options: ResidualOptions) -> int:
    """The rank (svd) or kept entries per expert (prune) of one matrix's residuals."""
    rows, cols = weight_ERC.shape[1:]
    if options.method == "svd":
        return min(options.rank, rows, cols)
    return max(1, round(options.keep * rows * cols))


def _mean(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
    return None if tensors[0] is None else torch.stack(tensors).mean(dim=0)


def _stack(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
    return None if tensors[0] is None else torch.stack(tensors)
