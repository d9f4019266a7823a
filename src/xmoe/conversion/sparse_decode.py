"""Batch-1 decode of a threshold-masked SwiGLU MLP that reads only the kept weight rows.

TEAL/WINA-style input sparsity drops, per token, the input channels j of ``x`` whose score
``|x_j| · scale_j`` is at most a threshold (before gate/up) and the neurons i of
``h = silu(gate x) · up x`` whose ``|h_i| · scale_i`` is (before down). At one token decode is
memory-bound: its time is the weight bytes read, so skipping a channel must skip reading its
weights. Each site therefore keeps a row-major copy in which every input channel (gate/up site)
and every neuron (down site) is one contiguous row, and sums the kept rows scaled by the kept
activations with a fused gather-axpy that never materialises the gathered rows
(``index_select`` + ``mv`` copies them and is slower than dense;
``../shared/reviews/2026-12-02-sparsify-anchors.md`` §6): a small C kernel
(:mod:`~xmoe.conversion.rows_kernel`), else ``F.embedding_bag(..., per_sample_weights=...,
mode="sum")``.

Prefill (more than one token) applies the same per-token masks by zeroing the dropped
activations and multiplying by the same row-major copies, one GEMM per site: the outputs equal
decoding the tokens one by one, at dense cost, since each token keeps different rows and their
union is dense (TEAL keeps prefill dense for the same reason). Inference only: the copies are
buffers, not parameters.

Shape legend: S tokens, D hidden size, I FFN width (neurons), J = 2I (gate then up), N rows of a
site, R row length.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from xmoe.conversion.architecture import supported_mlps
from xmoe.conversion.rows_kernel import native_kept_rows_dot, native_kept_rows_sum
from xmoe.registry import FAMILIES


def kept_rows_sum(a_SN: torch.Tensor, keep_SN: torch.Tensor, rows_NR: torch.Tensor) -> torch.Tensor:
    """``(a ⊙ keep) @ rows``: each token's kept rows scaled by its kept activations, (S, R).

    At one token (S == 1) only the kept rows are read: by the native kernel
    (:func:`~xmoe.conversion.rows_kernel.native_kept_rows_sum`) where it applies, else by one
    ``embedding_bag`` over their indices. Splitting the rows over a helper thread measured no
    faster once the weights come from memory (30 MLPs) and about twice as slow when they sit in
    cache (one MLP): the hand-off costs more than the second thread's reads gain. More tokens
    zero the dropped activations and run one GEMM.
    """
    if a_SN.shape[0] != 1:
        return a_SN.masked_fill(~keep_SN, 0) @ rows_NR
    summed = native_kept_rows_sum(a_SN, keep_SN, rows_NR)
    if summed is not None:
        return summed
    kept_K = keep_SN.reshape(-1).nonzero().view(-1)
    # take: at S == 1 a flat index is the column index, and it is the cheapest gather (µs count)
    weights_K = torch.take(a_SN, kept_K)
    return F.embedding_bag(
        kept_K, rows_NR, _one_bag(kept_K.device), mode="sum", per_sample_weights=weights_K
    )


def kept_rows_dot(x_SR: torch.Tensor, keep_SN: torch.Tensor, rows_NR: torch.Tensor) -> torch.Tensor:
    """``keep ⊙ (x @ rows^T)``: each token's dot products with its kept rows, 0 for the
    others, (S, N). At one token the native kernel
    (:func:`~xmoe.conversion.rows_kernel.native_kept_rows_dot`) reads only the kept rows where
    it applies; otherwise one GEMM reads them all (gathering the kept rows first copies them,
    which costs more than the GEMV it shortens)."""
    if x_SR.shape[0] == 1:
        dots = native_kept_rows_dot(x_SR, keep_SN, rows_NR)
        if dots is not None:
            return dots
    return (x_SR @ rows_NR.T).masked_fill(~keep_SN, 0)


_ONE_BAG: dict[torch.device, torch.Tensor] = {}
"""Per device, the offsets of a single bag (a 2-D input fails at K = 0), made once: a decode
step sums kept rows twice per layer, and allocating them each time was a fifth of a call's
overhead (~2.5 of ~12 µs per call, measured)."""


def _one_bag(device: torch.device) -> torch.Tensor:
    if device not in _ONE_BAG:
        with torch.inference_mode(False):  # a normal tensor: autograd may save it later
            _ONE_BAG[device] = torch.zeros(1, dtype=torch.long, device=device)
    return _ONE_BAG[device]


class SparseDecodeMLP(nn.Module):
    """A SwiGLU MLP ``down(silu(gate x) · up x)`` with thresholded inputs: (..., D) -> (..., D).

    Kept: input channel j of x if ``|x_j| · x_scale_j > x_threshold``, neuron i if
    ``|h_i| · h_scale_i > h_threshold`` (no scale: TEAL's magnitude score; WINA's
    column norms are ``gate_up_DJ.norm(dim=1)`` and ``down_ID.norm(dim=1)``). Thresholds 0 keep
    every nonzero activation, so the output is the dense MLP's; ``inf`` keeps nothing.

    Buffers: ``gate_up_DJ`` (row j: input channel j's gate weights then its up weights),
    ``down_ID`` (row i: neuron i's output weights), ``x_scale_D`` and ``h_scale_I`` (None when
    not given).
    """

    def __init__(
        self,
        gate_ID: torch.Tensor,
        up_ID: torch.Tensor,
        down_DI: torch.Tensor,
        x_threshold: float = 0.0,
        h_threshold: float = 0.0,
        x_scale_D: torch.Tensor | None = None,
        h_scale_I: torch.Tensor | None = None,
    ) -> None:
        """
        Args:
            gate_ID, up_ID, down_DI: the dense weights in ``nn.Linear`` layout (a family's
                ``dense_weights``); copied, so the dense model may be freed.
            x_threshold, h_threshold: score thresholds of the gate/up and down inputs, >= 0.
            x_scale_D, h_scale_I: per-channel / per-neuron score factors, finite and >= 0;
                None: 1 (TEAL's magnitude score).

        Raises:
            ValueError: naming the argument, its value and what is allowed.
        """
        super().__init__()
        ffn, hidden = gate_ID.shape
        if up_ID.shape != (ffn, hidden) or down_DI.shape != (hidden, ffn):
            raise ValueError(
                f"weights: gate {tuple(gate_ID.shape)}, up {tuple(up_ID.shape)}, down "
                f"{tuple(down_DI.shape)}; need gate and up (I, D) and down (D, I)"
            )
        gate_up_DJ, down_ID = row_major(gate_ID, up_ID, down_DI)
        self.register_buffer("gate_up_DJ", gate_up_DJ)
        self.register_buffer("down_ID", down_ID)
        self.register_buffer("x_scale_D", _scale("x_scale_D", x_scale_D, hidden, gate_ID))
        self.register_buffer("h_scale_I", _scale("h_scale_I", h_scale_I, ffn, gate_ID))
        self.set_thresholds(x_threshold, h_threshold)

    def set_thresholds(self, x_threshold: float, h_threshold: float) -> None:
        """Change both sites' thresholds (each >= 0; ``inf`` keeps nothing)."""
        for name, value in (("x_threshold", x_threshold), ("h_threshold", h_threshold)):
            if not value >= 0:  # also refuses NaN
                raise ValueError(f"{name}={value} must be >= 0 (inf keeps nothing)")
        self.x_threshold = float(x_threshold)
        self.h_threshold = float(h_threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        D, J = self.gate_up_DJ.shape
        if x.shape[-1] != D:
            raise ValueError(f"input's last dimension is {x.shape[-1]}, this MLP's hidden size {D}")
        x_SD = x.reshape(-1, D)
        keep_x = _scores(x_SD, self.x_scale_D) > self.x_threshold
        g_SI, u_SI = kept_rows_sum(x_SD, keep_x, self.gate_up_DJ).split(J // 2, dim=-1)
        h_SI = F.silu(g_SI) * u_SI
        keep_h = _scores(h_SI, self.h_scale_I) > self.h_threshold
        return kept_rows_sum(h_SI, keep_h, self.down_ID).reshape(x.shape)


def row_major(
    gate_ID: torch.Tensor, up_ID: torch.Tensor | None, down_DI: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The decode layout of a SwiGLU MLP's ``nn.Linear`` weights, detached copies: ``gate_up_DJ``
    (row j: input channel j's gate weights then its up weights: one table, so one gather-axpy
    serves both projections) and ``down_ID`` (row i: neuron i's output weights). With ``up_ID``
    None the first table is ``gate_DI``, gate's alone (gate-first reads up per neuron, from
    ``nn.Linear``'s own layout)."""
    with torch.no_grad():
        first = gate_ID if up_ID is None else torch.cat([gate_ID, up_ID])
        return first.T.contiguous(), down_DI.T.contiguous()


def _scores(a: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """``|a| · scale`` (``|a|`` when there is no scale: one op less per decode step)."""
    return a.abs() if scale is None else a.abs() * scale


def _scale(
    name: str, scale: torch.Tensor | None, size: int, like: torch.Tensor
) -> torch.Tensor | None:
    """``scale`` checked to be (size,), finite and >= 0, as ``like``'s dtype (None stays)."""
    if scale is None:
        return None
    if scale.shape != (size,) or not bool(torch.isfinite(scale).all() and (scale >= 0).all()):
        raise ValueError(f"{name} must be ({size},), finite and >= 0; got {tuple(scale.shape)}")
    return scale.detach().to(like)


def keeping_threshold(scores: torch.Tensor, kept: float) -> float:
    """A threshold that keeps the ``kept`` fraction (rounded to a count) of ``scores``, halfway
    between the last kept and the first dropped score, so that rounding differences between
    two computations of the same scores cannot flip a mask: 0 keeps all nonzero, inf none."""
    if not 0 <= kept <= 1:
        raise ValueError(f"kept={kept} must be in [0, 1]")
    ranked = scores.flatten().sort(descending=True).values
    count = round(kept * ranked.numel())
    if count == ranked.numel():
        return 0.0
    return math.inf if count == 0 else float(ranked[count - 1] + ranked[count]) / 2


def decode_mlps(model: nn.Module) -> list[SparseDecodeMLP]:
    """A :class:`SparseDecodeMLP` (thresholds 0: the dense MLP) of each decoder layer's MLP of a
    dense model of a registered family, in layer order.

    Raises:
        UnsupportedModelError: the model is not one ``sparsify`` converts.
    """
    name, mlps = supported_mlps(model)
    return [SparseDecodeMLP(*FAMILIES[name].dense_weights(mlp)) for mlp in mlps]
