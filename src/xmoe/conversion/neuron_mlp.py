"""NeuronMLP: a dense SwiGLU MLP that skips, per token, the input channels and neurons whose
score falls below a calibrated threshold (the ``neurons`` mode of ``sparsify``: TEAL, WINA,
CHESS). No router, so no router FLOPs: a skipped input is one compare away.

Batch-1 decode (one token, no gradients recorded) reads only the kept weight rows: each site's
weights in a row-major copy, summed by :func:`~xmoe.conversion.sparse_decode.kept_rows_sum`
(one contiguous row per input channel of gate/up and per neuron of down), so skipped inputs are
skipped bytes, which is what one token's time is. Prefill, batches and training run the dense
masked computation: every token keeps different rows, so their union is dense (TEAL keeps
prefill dense too), and gradients need the parameters themselves.

Training (``recover``) keeps the hard masks in the forward pass with Q-Sparse's
straight-through estimator: the backward pass treats the mask as the identity, so a skipped
entry gets the gradient it would get if kept (CATS's fine-tune instead holds the mask constant,
which gives skipped entries none and leaves the neurons just below a threshold no signal).

Shape legend: S tokens, D hidden size, I FFN width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from xmoe.conversion.config import SITES, SparsifyConfig, flops_fraction
from xmoe.conversion.rows_kernel import native_neuron_decode
from xmoe.conversion.sparse_decode import kept_rows_dot, kept_rows_sum, row_major


class _StraightThrough(torch.autograd.Function):
    """``where(keep, value, 0)`` forward; the identity backward (Q-Sparse's estimator)."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return torch.where(keep, value, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def masked(value: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``value`` with the entries ``keep`` drops zeroed, the gradient passed straight through
    the mask to every entry (:class:`_StraightThrough`) when autograd records."""
    if torch.is_grad_enabled() and value.requires_grad:
        return _StraightThrough.apply(value, keep)
    return torch.where(keep, value, 0)


class NeuronMLP(nn.Module):
    """Drop-in replacement of a transformers ``LlamaMLP``: (..., D) -> (..., D), computing
    ``down(silu(gate x) · up x)`` with masked inputs.

    Per site (:data:`~xmoe.conversion.config.SITES`), an input entry is kept when
    ``|value| · scale >= threshold``, else it is zeroed: ``gate_up`` masks the channels x_j
    (``scale_gate_up`` (D,)), ``down`` the neurons h_i entering down (``scale_down`` (I,)),
    ``gate`` (gate-first) the neurons by |silu(g_i)| (``scale_gate`` (I,), CHESS's E|u_i|),
    before up and down. The scales fold in the scoring (WINA's column norms); they and the 0-dim
    thresholds are buffers, saved with the weights and fixed when the weights are fine-tuned.
    Every site has its buffers whatever ``settings.sites`` holds (one weight layout for every
    choice); a site not in ``settings.sites`` is not applied. A zero threshold keeps every entry,
    so the module is then exactly the dense MLP.

    After each forward: ``flops_fraction`` (S,), each token's fraction of the dense FFN FLOPs
    that its kept inputs need (:func:`~xmoe.conversion.config.flops_fraction`), computed when
    first read.

    One token without gradients takes the decode path (:meth:`decode`): the same output from
    the kept rows of a row-major copy of the weights, made on first use and remade when a weight
    changes (not saved: it is derived). Gate-first reads gate's rows of the kept channels, then
    only the kept neurons' rows of up (``up_proj.weight`` itself) and of down.

    Parameters: ``gate_proj``, ``up_proj`` (D -> I) and ``down_proj`` (I -> D), bias-free
    ``nn.Linear`` as in the dense MLP.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, settings: SparsifyConfig) -> None:
        super().__init__()
        self.settings = settings
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        widths = {"gate_up": hidden_size, "down": intermediate_size, "gate": intermediate_size}
        for site in SITES:
            self.register_buffer(f"scale_{site}", torch.ones(widths[site]))
            self.register_buffer(f"threshold_{site}", torch.zeros(()))
        self._kept: tuple[torch.Tensor | None, torch.Tensor | None] | None = None
        self._flops_fraction: torch.Tensor | None = None
        self._row_major: tuple[torch.Tensor, torch.Tensor] | None = None
        self._row_major_of: tuple | None = None

    @property
    def flops_fraction(self) -> torch.Tensor | None:
        """(S,) float64 each token's FFN-FLOP fraction in the last forward (None before one).
        Computed on first read from the masks :meth:`kept_masks` kept: computing it in every
        decode step cost ~20 µs of a ~230 µs SmolLM2-sized call (measured), read or not."""
        if self._flops_fraction is None and self._kept is not None:
            self._flops_fraction = self.token_flops_fraction(*self._kept)
        return self._flops_fraction

    def score(self, site: str, value: torch.Tensor) -> torch.Tensor:
        """(..., W) the scores of ``value``'s entries at ``site``: |value| · scale."""
        return value.abs().mul_(_as(getattr(self, f"scale_{site}"), value.dtype))

    def keep(self, site: str, value: torch.Tensor) -> torch.Tensor:
        """(..., W) bool: which entries of ``value`` at ``site`` score at least its threshold."""
        return self.score(site, value) >= _as(getattr(self, f"threshold_{site}"), value.dtype)

    def masked_gate_up(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """``(kept_x, silu(gate x'), up x')`` on ``x'``, the channels of ``x`` the ``gate_up``
        site keeps (``kept_x`` None without that site)."""
        kept_x = self.keep("gate_up", x) if "gate_up" in self.settings.sites else None
        if kept_x is not None:
            x = masked(x, kept_x)
        return kept_x, F.silu(self.gate_proj(x)), self.up_proj(x)

    def masked_neurons(
        self, activated: torch.Tensor, up: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(kept_n, h)``: the neurons the ``gate`` or ``down`` site keeps (None without
        either), and h = silu(g)·u with the others zeroed."""
        h = activated * up
        kept_n = self.kept_neurons(activated, h)
        return kept_n, h if kept_n is None else masked(h, kept_n)

    def kept_neurons(self, activated: torch.Tensor, h: torch.Tensor) -> torch.Tensor | None:
        """(..., I) bool: the neurons the ``gate`` site keeps by silu(g), else the ``down`` site
        by h = silu(g)·u (None without either)."""
        if "gate" in self.settings.sites:
            return self.keep("gate", activated)
        if "down" in self.settings.sites:
            return self.keep("down", h)
        return None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = _as(hidden_states, self.gate_proj.weight.dtype)
        if self.decodes(x):
            return _as(self.decode(x), hidden_states.dtype)
        kept_x, activated, up = self.masked_gate_up(x)
        kept_n, h = self.masked_neurons(activated, up)
        self.kept_masks(kept_x, kept_n)
        return self.down_proj(h).to(hidden_states.dtype)

    def kept_masks(self, kept_x: torch.Tensor | None, kept_n: torch.Tensor | None) -> None:
        """Keep this forward's masks for :attr:`flops_fraction` (computed when read)."""
        self._kept, self._flops_fraction = (kept_x, kept_n), None

    def decodes(self, x: torch.Tensor) -> bool:
        """Whether ``x`` (..., D) takes the decode path: one token, and autograd records
        nothing (training needs the dense path's gradients to the parameters)."""
        if x.shape[:-1].numel() != 1:
            return False
        if not torch.is_grad_enabled():
            return True
        return not (x.requires_grad or any(p.requires_grad for p in self.parameters()))

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """One token's output (..., D), computed from the kept rows only (the masks and
        ``flops_fraction`` as in the dense path). h is not masked: the kept-row sum reads only
        the kept neurons' entries. Gate-first reads gate's rows of the kept channels, then up's
        rows of the kept neurons only (CHESS's kernel): its bytes follow its FLOPs."""
        first_DJ, down_ID = self.row_major()
        x_1D = x.reshape(1, -1)
        sites = self.settings.sites
        fused = self.fused_decode(x_1D, first_DJ, down_ID)
        if fused is not None:
            out, kept_x, kept_n = fused
            neuron_site = "gate" in sites or "down" in sites
            self.kept_masks(kept_x if "gate_up" in sites else None, kept_n if neuron_site else None)
            return out.reshape(x.shape)
        kept_x = self.keep("gate_up", x_1D) if "gate_up" in self.settings.sites else None
        first = x_1D @ first_DJ if kept_x is None else kept_rows_sum(x_1D, kept_x, first_DJ)
        if "gate" in self.settings.sites:
            activated = F.silu(first)
            kept_n = self.keep("gate", activated)
            x_1D = x_1D if kept_x is None else torch.where(kept_x, x_1D, 0)
            h = activated * kept_rows_dot(x_1D, kept_n, self.up_proj.weight)
        else:
            gate, up = first.chunk(2, dim=-1)
            activated = F.silu(gate)
            h = activated * up
            kept_n = self.kept_neurons(activated, h)
        out = h @ down_ID if kept_n is None else kept_rows_sum(h, kept_n, down_ID)
        self.kept_masks(kept_x, kept_n)
        return out.reshape(x.shape)

    def fused_decode(
        self, x_1D: torch.Tensor, first_DJ: torch.Tensor, down_ID: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """:meth:`decode` in one native call
        (:func:`~xmoe.conversion.rows_kernel.native_neuron_decode`), or None where it does not
        apply (the torch path then computes the same)."""
        neuron_site = "gate" if "gate" in self.settings.sites else "down"
        return native_neuron_decode(
            x_1D,
            self.settings.sites,
            (self.scale_gate_up, self.threshold_gate_up),
            (getattr(self, f"scale_{neuron_site}"), getattr(self, f"threshold_{neuron_site}")),
            (first_DJ, self.up_proj.weight, down_ID),
        )

    def row_major(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The decode path's ``(gate_up_DJ, down_ID)``, gate-first's ``(gate_DI, down_ID)``
        (:func:`~xmoe.conversion.sparse_decode.row_major`), remade when a weight was replaced
        or changed in place (its storage or version counter moved) or the sites changed."""
        weights = (self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)
        gate_first = "gate" in self.settings.sites
        of = (gate_first, *((w.data_ptr(), _version(w), w.dtype) for w in weights))
        if self._row_major is None or self._row_major_of != of:
            gate, up, down = weights
            tables = row_major(gate, None if gate_first else up, down)
            self._row_major, self._row_major_of = tables, of
        return self._row_major

    def token_flops_fraction(
        self, kept_x: torch.Tensor | None, kept_n: torch.Tensor | None
    ) -> torch.Tensor:
        """(S,) float64 each token's FFN-FLOP fraction from its masks (``sites`` is never empty,
        so at least one mask is there; a missing one keeps all)."""
        with torch.no_grad():
            share_x = 1.0 if kept_x is None else kept_x.flatten(0, -2).double().mean(dim=-1)
            share_n = 1.0 if kept_n is None else kept_n.flatten(0, -2).double().mean(dim=-1)
            return flops_fraction(self.settings.sites, share_x, share_n)


def _as(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` in ``dtype``, without a ``to`` call when it already is (at decode it always
    is, and a no-op ``to`` still costs a dispatch)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _version(weight: torch.Tensor) -> int:
    """``weight``'s version counter, which in-place changes advance (an inference tensor has
    none, and only inference mode can change it: -1)."""
    return -1 if weight.is_inference() else weight._version


def neuron_mlps(model: nn.Module) -> list[NeuronMLP]:
    """The :class:`NeuronMLP` modules of ``model``, in order."""
    return [m for m in model.modules() if isinstance(m, NeuronMLP)]


def ffn_flops_fraction(model: nn.Module) -> float:
    """Mean FFN-FLOP fraction per token over the NeuronMLPs of ``model``'s last forward (every
    layer has the same FFN, so this is the model's fraction of its dense FFN FLOPs).

    Raises:
        ValueError: the model has no NeuronMLP, or none has run.
    """
    fractions = [m.flops_fraction for m in neuron_mlps(model) if m.flops_fraction is not None]
    if not fractions:
        raise ValueError(
            f"{type(model).__name__} has no NeuronMLP that has run: convert it with "
            "sparsify(mode='neurons') and run a forward first"
        )
    return sum(float(f.mean()) for f in fractions) / len(fractions)
