"""xmoe as a transformers experts back-end, with a routing threshold for pretrained top-k models.

transformers 5 runs the experts of its MoE models (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek, ...)
through one registry: the model's router picks ``top_k_index``/``top_k_weights`` (S, K) and the
experts module, decorated by ``transformers.integrations.moe.use_experts_implementation``, calls
the function registered under ``config._experts_implementation`` as
``fn(experts_module, hidden_states, top_k_index, top_k_weights)``.
:func:`register_experts_implementation` registers :func:`xmoe_experts_forward` as ``"xmoe"``::

    register_experts_implementation()
    model = AutoModelForCausalLM.from_pretrained(name, experts_implementation="xmoe")
    set_expert_threshold(model, 0.8)  # keep the top experts holding 80% of the top-k mass

The kept (token, expert) pairs become a :class:`~xmoe.dispatch.DispatchPlan` and run through
xmoe's fused expert FFN (:func:`~xmoe.experts.expert_ffn`), which computes those pairs only. The
experts' weights are passed as views (slices and transposes), never copied. Experts that FFN
cannot express (a custom ``_apply_gate`` such as gpt-oss's, an activation other than SiLU for
gated experts or GELU/ReLU/SiLU for plain ones) run through a
per-expert loop of ordinary autograd ops over the same plan, with a warning naming the reason.

Shape legend: S tokens, K routed experts per token, N kept pairs, D hidden size, H expert
intermediate size, E experts.
"""

from __future__ import annotations

import math
import numbers
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import GELUActivation, SiLUActivation
from transformers.integrations.moe import ExpertsInterface, _default_apply_gate

from xmoe.dispatch import DispatchPlan
from xmoe.experts import ExpertWeights, expert_ffn
from xmoe.experts.activations import ELEMENTWISE_ACTIVATIONS
from xmoe.models.usage import KeptPairsCounter
from xmoe.routing import Selection, route_pairs
from xmoe.routing.threshold import mass_prefix_mask

IMPLEMENTATION = "xmoe"
"""The ``experts_implementation`` name xmoe registers under."""

THRESHOLD_ATTR = "xmoe_threshold"
"""Attribute of an experts module holding its threshold t (absent: 1.0, every routed expert)."""

KEPT_ATTR = "xmoe_kept_per_token"
"""Attribute an experts module gets on each xmoe forward: (S,) int64 experts computed per token."""


def register_experts_implementation() -> None:
    """Register :func:`xmoe_experts_forward` as ``experts_implementation="xmoe"`` (idempotent:
    registering again replaces the entry with the same function)."""
    ExpertsInterface.register(IMPLEMENTATION, xmoe_experts_forward)


def threshold_mask(
    top_k_index: torch.Tensor, top_k_weights: torch.Tensor, threshold: float
) -> torch.Tensor:
    """The routed experts each token keeps under threshold t.

    The K weights of a token are ranked by descending weight (equal weights by ascending expert
    id) and normalised to sum 1; the token keeps ranks 1..j for the smallest j whose cumulative
    normalised mass reaches t: the threshold router's rule
    (:func:`~xmoe.routing.threshold.mass_prefix_mask`: float64 sums, the first always kept).
    t >= 1 keeps all K. Weights are assumed non-negative; a token whose weights sum to 0 keeps
    all K.

    Args:
        top_k_index: (S, K) int64 expert ids.
        top_k_weights: (S, K) routing weights, in any order.
        threshold: t in (0, 1].

    Returns:
        (S, K) bool, aligned with ``top_k_index``.
    """
    if threshold >= 1.0:
        return torch.ones_like(top_k_index, dtype=torch.bool)
    weights_SK = top_k_weights.detach().to(torch.float64)
    # two stable sorts: by expert id, then by descending weight, so ties rank the lower id first
    by_id_SK = top_k_index.argsort(dim=1, stable=True)
    by_weight_SK = weights_SK.gather(1, by_id_SK).argsort(dim=1, descending=True, stable=True)
    rank_SK = by_id_SK.gather(1, by_weight_SK)  # column of each rank
    ranked_SK = weights_SK.gather(1, rank_SK)
    total_S1 = ranked_SK.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    keep_ranked_SK = mass_prefix_mask(ranked_SK / total_S1, threshold)
    return torch.zeros_like(keep_ranked_SK).scatter_(1, rank_SK, keep_ranked_SK)


def _activation_name(act_fn: nn.Module) -> str | None:
    """The ``ACTIVATION_FNS`` key computing exactly ``act_fn``, or None. Exact types only: a
    subclass may compute something else (as transformers' clipped and approximate GELUs do)."""
    kind = type(act_fn)
    if kind in (SiLUActivation, nn.SiLU):
        return "silu"
    if kind is nn.ReLU:
        return "relu"
    if kind is GELUActivation and act_fn.act is F.gelu:
        return "gelu"
    if kind is nn.GELU and act_fn.approximate == "none":
        return "gelu"
    return None


def _fused_operands(module: nn.Module) -> ExpertWeights | str:
    """``module``'s weights as :func:`expert_ffn` operands, or why it cannot run them.

    transformers stores a projection as (E, out, in), or (E, in, out) when ``is_transposed``;
    expert_ffn wants (E, in, out), so the former is passed transposed. A gated module's
    ``gate_up_proj`` output is split by the default ``_apply_gate`` into halves ``act(gate) *
    up``, the layout of xmoe's gated ``w1``: it is passed whole, biases included.
    """
    if module.has_gate and type(module)._apply_gate is not _default_apply_gate:
        return "it defines its own _apply_gate"
    activation = _activation_name(module.act_fn)
    name = type(module.act_fn).__name__
    down = module.down_proj if module.is_transposed else module.down_proj.transpose(1, 2)
    b2 = module.down_proj_bias if module.has_bias else None
    if not module.has_gate:
        if activation is None:
            return f"activation {name} is not one of xmoe's {list(ELEMENTWISE_ACTIVATIONS)}"
        up = module.up_proj if module.is_transposed else module.up_proj.transpose(1, 2)
        b1 = module.up_proj_bias if module.has_bias else None
        return ExpertWeights(up, b1, down, b2, activation)
    if activation != "silu":
        return f"gated experts with activation {name}: xmoe's gated experts are SiLU (SwiGLU)"
    gate_up = module.gate_up_proj if module.is_transposed else module.gate_up_proj.transpose(1, 2)
    b1 = module.gate_up_proj_bias if module.has_bias else None
    return ExpertWeights(gate_up, b1, down, b2, "swiglu")


def _projection(
    x_ND: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool
) -> torch.Tensor:
    """One expert's projection of its rows; ``weight`` is (out, in), or (in, out) if transposed."""
    out = x_ND @ weight if transposed else F.linear(x_ND, weight)
    return out if bias is None else out + bias


def _generic_experts(
    module: nn.Module, x_SD: torch.Tensor, plan: DispatchPlan, weight_N: torch.Tensor
) -> torch.Tensor:
    """The experts' own ops (``_apply_gate``/``act_fn``, biases) per expert segment of ``plan``:
    any module the fused path cannot express, still computing the kept pairs only. (S, D)."""
    gated = module.has_gate
    up = module.gate_up_proj if gated else module.up_proj
    up_bias = (
        (module.gate_up_proj_bias if gated else module.up_proj_bias) if module.has_bias else None
    )
    down_bias = module.down_proj_bias if module.has_bias else None
    xg_ND = plan.gather(x_SD)
    outputs = []
    for expert, start, end in plan.segments:
        h = _projection(
            xg_ND[start:end],
            up[expert],
            None if up_bias is None else up_bias[expert],
            module.is_transposed,
        )
        h = module._apply_gate(h) if gated else module.act_fn(h)
        y = _projection(
            h,
            module.down_proj[expert],
            None if down_bias is None else down_bias[expert],
            module.is_transposed,
        )
        outputs.append(y * weight_N[start:end, None].to(y.dtype))
    out_SD = x_SD.new_zeros(plan.num_tokens, x_SD.shape[1])
    return plan.scatter_add(torch.cat(outputs), out_SD) if outputs else out_SD


def xmoe_experts_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """The ``"xmoe"`` experts implementation: ``Σ_{kept k} top_k_weights[s, k] · FFN_e(x_s)``.

    The kept pairs are those :func:`threshold_mask` keeps under the module's
    ``xmoe_threshold`` (absent: all K). Kept weights are used **raw**, not renormalised over the
    kept experts: the output is the model's own top-k sum with its smallest terms dropped
    (for a router that normalises its top-k weights, as Mixtral's, renormalising would instead
    scale every kept expert up). Sentinel ids of expert parallelism (>= E) are never computed.

    Args:
        self: an experts module of a transformers MoE model.
        hidden_states: (S, D) tokens.
        top_k_index: (S, K) int64 routed experts.
        top_k_weights: (S, K) their routing weights (differentiable).

    Returns:
        (S, D) in the dtype of ``hidden_states``; sets ``self.xmoe_kept_per_token`` (S,).
    """
    wanted_SK = threshold_mask(top_k_index, top_k_weights, getattr(self, THRESHOLD_ATTR, 1.0))
    if self._is_expert_parallel:
        wanted_SK &= top_k_index < self.num_experts
    setattr(self, KEPT_ATTR, wanted_SK.sum(dim=1))
    # dropless, so route_pairs needs no rank order of the K columns
    selection = Selection(top_k_index, top_k_weights, wanted_SK, top_k_weights)
    pairs = route_pairs(selection, self.num_experts)
    plan = pairs.plan
    operands = _fused_operands(self)
    if isinstance(operands, str):
        warnings.warn(
            f"{type(self).__name__} runs experts_implementation='xmoe' through a per-expert loop "
            f"of its own ops, not xmoe's fused kernel: {operands}",
            stacklevel=2,
        )
        x_SD = hidden_states.to(self.down_proj.dtype)
        return _generic_experts(self, x_SD, plan, pairs.weight_N).to(hidden_states.dtype)
    # computed in the weights' dtype, as transformers' grouped_mm does (autocast leaves them apart)
    x_SD = hidden_states.to(operands.w1.dtype)
    out_SD = expert_ffn(x_SD, operands, plan, pairs.weight_N)
    return out_SD.to(hidden_states.dtype)


def _is_experts_module(module: nn.Module) -> bool:
    """Whether ``module`` is an experts class decorated by ``use_experts_implementation``."""
    return hasattr(module, "_is_expert_parallel") and hasattr(type(module), "_apply_gate")


def xmoe_experts_modules(model: nn.Module) -> list[nn.Module]:
    """The experts modules of ``model`` that run with ``experts_implementation="xmoe"``."""
    return [
        m
        for m in model.modules()
        if _is_experts_module(m) and m.config._experts_implementation == IMPLEMENTATION
    ]


def set_expert_threshold(model: nn.Module, t: float) -> None:
    """Set threshold t on every experts module of ``model`` that runs with xmoe.

    Each token then computes only its best routed experts whose normalised top-k mass reaches
    t (:func:`threshold_mask`), with their raw weights (:func:`xmoe_experts_forward`); t=1
    computes all K, exactly as without a threshold. Inference-time knob: nothing is saved with
    the model, and modules switched to another implementation ignore it.

    Raises:
        ValueError: t is not a number in (0, 1], or no experts module of ``model`` runs with
            ``experts_implementation="xmoe"``. Nothing changes then.
    """
    valid = (
        isinstance(t, numbers.Real) and not isinstance(t, bool) and math.isfinite(t) and 0 < t <= 1
    )
    if not valid:
        raise ValueError(f"t must be a number in (0, 1], got {t!r}")
    modules = xmoe_experts_modules(model)
    if not modules:
        found = sorted(
            {
                str(m.config._experts_implementation)
                for m in model.modules()
                if _is_experts_module(m)
            }
        )
        raise ValueError(
            f"{type(model).__name__} has no experts running with experts_implementation="
            f"'{IMPLEMENTATION}' (found: {found or 'no transformers experts modules'}); call "
            "xmoe.hf.experts.register_experts_implementation(), then load with "
            f"experts_implementation='{IMPLEMENTATION}' or call "
            f"model.set_experts_implementation('{IMPLEMENTATION}')"
        )
    for module in modules:
        setattr(module, THRESHOLD_ATTR, float(t))


class ExpertCounter(KeptPairsCounter):
    """Context manager counting the experts computed per token by ``model``'s xmoe experts.

    ``with ExpertCounter(model) as counter: model(...)``; then ``counter.per_layer`` holds, per
    xmoe experts module (in ``model.modules()`` order), kept pairs / tokens over every call made
    inside the block, and ``counter.experts_per_token`` their mean.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__(xmoe_experts_modules(model))

    def kept_per_token(self, module: nn.Module, output) -> torch.Tensor:
        return getattr(module, KEPT_ATTR)
