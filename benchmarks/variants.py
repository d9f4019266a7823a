"""What the layer benchmark times: xmoe, its dense bound, HF's experts back-ends, capacity padding.

Every builder returns named :class:`Variant` objects over the same input and cotangent, so the
harness can time them side by side. Shape legend as in xmoe: S tokens, D d_model, E experts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from xmoe import MoEConfig, MoELayer
from xmoe.dispatch.engines import GroupedEngine
from xmoe.flops import ffn_flops
from xmoe.routing import Selection, route_pairs

BATCHED_MM_MAX_BYTES = 1 << 30
CALIBRATION_TOKENS = 1024
CALIBRATION_SEED_OFFSET = 7919
FLOOR = "floor: its expert GEMMs alone"


@dataclass
class Variant:
    forward: Callable[[], object]
    forward_backward: Callable[[], None]  # from gradients reset to None
    reset_grads: Callable[[], None]
    module: nn.Module  # whose parameter gradients the memory probe leaves out
    experts_per_token: float | None = None
    moe_flops_per_token: float | None = None


@dataclass
class Setting:
    num_tokens: int
    d_model: int
    num_experts: int
    d_expert: int
    device: torch.device
    dtype: torch.dtype
    seed: int = 0


def make_inputs(s: Setting) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(s.seed)
    x = torch.randn(s.num_tokens, s.d_model, generator=generator)
    cotangent = torch.randn(s.num_tokens, s.d_model, generator=generator)
    x = x.to(s.device, s.dtype).requires_grad_(True)
    return x, cotangent.to(s.device, s.dtype)


def module_variant(module: nn.Module, x: torch.Tensor, cotangent: torch.Tensor, **info):
    def output():
        out = module(x)
        return out.hidden_states if hasattr(out, "hidden_states") else out

    def forward():
        with torch.no_grad():
            return output()

    def reset_grads():
        x.grad = None
        for p in module.parameters():
            p.grad = None

    def forward_backward():
        reset_grads()
        output().backward(cotangent)

    return Variant(forward, forward_backward, reset_grads, module, **info)


def calibrated_xmoe(s: Setting, target_experts: float, **config) -> MoELayer:
    """An XMoE layer whose router is scaled so that, at t=0.9 and dropless, tokens want
    ``target_experts`` experts on average: a stand-in for a trained, peaked router (a fresh
    router is near-uniform and wants almost every expert).

    The scale is fitted on at least :data:`CALIBRATION_TOKENS` tokens drawn apart from the
    benchmark's inputs, and the router's rows from another stream than theirs (sharing one made
    the first input token equal router row 0, and decode-sized calls extremely peaked)."""
    torch.manual_seed(s.seed)
    probe = MoELayer(MoEConfig(s.d_model, s.num_experts, s.d_expert, threshold=0.9))
    calibration = Setting(
        max(s.num_tokens, CALIBRATION_TOKENS), s.d_model, s.num_experts, s.d_expert,
        torch.device("cpu"), torch.float32, s.seed + CALIBRATION_SEED_OFFSET,
    )  # fmt: skip
    x, _ = make_inputs(calibration)
    base = torch.randn(
        s.num_experts,
        s.d_model,
        generator=torch.Generator().manual_seed(s.seed + 2 * CALIBRATION_SEED_OFFSET),
    )
    base /= s.d_model**0.5
    low, high = 0.1, 50.0
    with torch.no_grad():
        for _ in range(30):
            scale = (low * high) ** 0.5
            probe.router.weight.copy_(base * scale)
            wanted = probe(x.detach()).routing.experts_wanted_per_token
            low, high = (scale, high) if wanted > target_experts else (low, scale)
    torch.manual_seed(s.seed + 1)
    layer = MoELayer(MoEConfig(s.d_model, s.num_experts, s.d_expert, **config))
    with torch.no_grad():
        layer.router.weight.copy_(base * (low * high) ** 0.5)
    return layer.to(s.device, s.dtype)


class DenseFFN(nn.Module):
    """The bound: one FFN whose hidden width equals experts-per-token × d_expert. Gated, its
    gate and up projections are one matmul, as xmoe's are."""

    def __init__(self, d_model: int, hidden: int, gated: bool, bias: bool) -> None:
        super().__init__()
        self.gated = gated
        self.up = nn.Linear(d_model, 2 * hidden if gated else hidden, bias=bias)
        self.down = nn.Linear(hidden, d_model, bias=bias)

    def forward(self, x):
        if self.gated:
            gate, up = self.up(x).chunk(2, dim=-1)
            return self.down(F.silu(gate) * up)
        return self.down(F.gelu(self.up(x)))


class CapacityPadded(nn.Module):
    """GShard-style capacity compute, as in the XMoE reference code: every expert computes all C
    of its slots, used or not. Dispatch/combine use index copies rather than the reference's
    (S, E, C) one-hot einsum, which only makes this baseline cheaper than the original."""

    def __init__(self, layer: MoELayer) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x_SD):
        layer, config = self.layer, self.layer.config
        probs_SE = layer.router.probabilities(x_SD)
        num_tokens = x_SD.shape[0]
        capacity = config.capacity(num_tokens)
        pairs = route_pairs(layer.router.select(probs_SE), config.num_experts, capacity)
        plan = pairs.plan
        starts_E = plan.counts_E.cumsum(0) - plan.counts_E
        position_N = torch.arange(plan.num_pairs, device=x_SD.device)
        slot_N = plan.expert_idx_N * capacity + position_N - starts_E[plan.expert_idx_N]
        slots = x_SD.new_zeros(config.num_experts * capacity, config.d_model)
        slots = slots.index_copy(0, slot_N, plan.gather(x_SD))
        experts = layer.experts
        h_ECH = torch.bmm(slots.view(config.num_experts, capacity, -1), experts.w1)
        h_ECH = F.gelu(h_ECH + experts.b1.unsqueeze(1))
        y_ECD = torch.bmm(h_ECH, experts.w2) + experts.b2.unsqueeze(1)
        y_ND = y_ECD.reshape(-1, config.d_model).index_select(0, slot_N)
        y_ND = y_ND * pairs.weight_N.to(y_ND.dtype).unsqueeze(1)
        return plan.scatter_add(y_ND)


class ExpertGEMMs(nn.Module):
    """The floor under any grouped dispatch: only the expert matmuls of the layer's own kept
    pairs, on pre-gathered rows (no routing, gather, activation, bias or combine). Forward: the
    two grouped matmuls; backward: the four (two input, two weight gradients)."""

    def __init__(self, layer: MoELayer, x_SD: torch.Tensor) -> None:
        super().__init__()
        config = layer.config
        with torch.no_grad():
            selection = layer.router(x_SD).selection
        capacity = config.capacity(x_SD.shape[0])
        self.plan = route_pairs(selection, config.num_experts, capacity, config.renormalize).plan
        self.w1, self.w2 = layer.experts.w1.detach(), layer.experts.w2.detach()
        generator = torch.Generator().manual_seed(0)
        num_pairs, d_model = self.plan.num_pairs, config.d_model
        first, hidden = self.w1.shape[2], self.w2.shape[1]
        self.xg_ND, self.dy_ND = (
            torch.randn(num_pairs, d_model, generator=generator).to(x_SD) for _ in range(2)
        )
        self.a_NH = torch.randn(num_pairs, hidden, generator=generator).to(x_SD)
        self.dh_NF = torch.randn(num_pairs, first, generator=generator).to(x_SD)

    def forward(self, x_SD):
        GroupedEngine.mm(self.xg_ND, self.w1, self.plan)
        return GroupedEngine.mm(self.a_NH, self.w2, self.plan)

    def backward_gemms(self) -> None:
        plan = self.plan
        GroupedEngine.mm(self.dy_ND, self.w2.transpose(1, 2), plan)
        GroupedEngine.wgrad(self.a_NH, self.dy_ND, plan)
        GroupedEngine.mm(self.dh_NF, self.w1.transpose(1, 2), plan)
        GroupedEngine.wgrad(self.xg_ND, self.dh_NF, plan)


def gemm_floor_variant(layer: MoELayer, x: torch.Tensor, cotangent: torch.Tensor, **info):
    floor = ExpertGEMMs(layer, x.detach())
    variant = module_variant(floor, x, cotangent, **info)

    def forward_backward():
        with torch.no_grad():
            floor(x)
            floor.backward_gemms()

    variant.forward_backward = forward_backward
    return variant


def training_variants(
    s: Setting, threshold: float, capacity_factor: float | None, full: bool = True
) -> dict[str, Variant]:
    """xmoe against the dense bound and capacity padding; ``full`` adds its loop fallback and
    the floor of its expert GEMMs alone."""
    x, cotangent = make_inputs(s)
    variants = {}
    layer = calibrated_xmoe(s, 4.0, threshold=threshold, capacity_factor=capacity_factor)
    with torch.no_grad():
        stats = layer(x).routing
    kept = stats.experts_per_token
    info = {"experts_per_token": kept, "moe_flops_per_token": float(stats.flops_per_token)}
    variants["xmoe (auto)"] = module_variant(layer, x, cotangent, **info)
    if full:
        variants[FLOOR] = gemm_floor_variant(layer, x, cotangent, **info)
        loop = calibrated_xmoe(
            s, 4.0, threshold=threshold, capacity_factor=capacity_factor, backend="loop"
        )
        variants["xmoe (loop fallback)"] = module_variant(loop, x, cotangent, **info)
    hidden = max(1, round(kept * s.d_expert))
    torch.manual_seed(s.seed)
    bound = DenseFFN(s.d_model, hidden, gated=False, bias=True).to(s.device, s.dtype)
    variants[f"bound: dense FFN {s.d_model}x{hidden}"] = module_variant(
        bound,
        x,
        cotangent,
        experts_per_token=kept,
        moe_flops_per_token=float(ffn_flops(s.d_model, hidden, gated=False)),
    )
    if capacity_factor is not None:
        capacity = layer.config.capacity(s.num_tokens)
        padded_flops = s.num_experts * capacity * layer.config.expert_flops / s.num_tokens
        variants[f"capacity padding (C={capacity})"] = module_variant(
            CapacityPadded(layer),
            x,
            cotangent,
            experts_per_token=kept,
            moe_flops_per_token=padded_flops,
        )
    return variants


class XMoEExpertsOnRouting(nn.Module):
    """xmoe's dispatch + experts on a given top-k routing (what HF's experts modules take)."""

    def __init__(self, layer: MoELayer, top_k_index, top_k_weights) -> None:
        super().__init__()
        self.layer, self.top_k_index, self.top_k_weights = layer, top_k_index, top_k_weights

    def forward(self, x_SD):
        config = self.layer.config
        wanted = torch.ones_like(self.top_k_index, dtype=torch.bool)
        weights = self.top_k_weights
        pairs = route_pairs(
            Selection(self.top_k_index, weights, wanted, weights), config.num_experts
        )
        return self.layer.experts(x_SD, pairs.plan, pairs.weight_N)


class HFExpertsOnRouting(nn.Module):
    def __init__(self, experts, top_k_index, top_k_weights) -> None:
        super().__init__()
        self.experts, self.top_k_index, self.top_k_weights = experts, top_k_index, top_k_weights

    def forward(self, x_SD):
        return self.experts(x_SD, self.top_k_index, self.top_k_weights)


def _mixtral_config(s: Setting, top_k: int, implementation: str):
    from transformers import MixtralConfig

    hf_config = MixtralConfig(
        hidden_size=s.d_model,
        intermediate_size=s.d_expert,
        num_local_experts=s.num_experts,
        num_experts_per_tok=top_k,
        hidden_act="silu",
    )
    hf_config._experts_implementation = implementation
    return hf_config


@torch.no_grad()
def _copy_experts(experts, layer: MoELayer) -> None:
    """xmoe's stacked SwiGLU weights ((E, D, 2H) ``[gate | up]``, (E, H, D)) into transformers'
    (E, 2H, D) and (E, D, H) layout."""
    w = layer.experts
    experts.gate_up_proj.copy_(w.w1.transpose(1, 2))
    experts.down_proj.copy_(w.w2.transpose(1, 2))


def _hf_implementations(s: Setting, top_k: int) -> list[str]:
    pair_weight_bytes = (
        s.num_tokens * top_k * 3 * s.d_model * s.d_expert * torch.finfo(s.dtype).bits // 8
    )
    if pair_weight_bytes <= BATCHED_MM_MAX_BYTES:
        return ["eager", "batched_mm", "grouped_mm"]
    print(
        f"  HF batched_mm not run: it would gather {pair_weight_bytes / 2**30:.1f} GiB of "
        "expert weights (one copy per token-expert pair)"
    )
    return ["eager", "grouped_mm"]


def hf_variants(s: Setting, top_k: int) -> dict[str, Variant]:
    """Identical top-k routing and identical SwiGLU weights through xmoe and HF's back-ends."""
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    x, cotangent = make_inputs(s)
    layer = calibrated_xmoe(
        s, 4.0, router="topk", top_k=top_k, activation="swiglu", bias=False, init_std=0.05
    )
    with torch.no_grad():
        probs = layer.router.probabilities(x)
    top_k_weights, top_k_index = probs.topk(top_k, dim=-1)
    top_k_weights = top_k_weights.to(s.dtype).requires_grad_(True)

    variants = {
        "xmoe": module_variant(
            XMoEExpertsOnRouting(layer, top_k_index, top_k_weights), x, cotangent
        ),
    }
    reference = variants["xmoe"].forward()
    for implementation in _hf_implementations(s, top_k):
        experts = MixtralExperts(_mixtral_config(s, top_k, implementation)).to(s.device, s.dtype)
        _copy_experts(experts, layer)
        module = HFExpertsOnRouting(experts, top_k_index, top_k_weights)
        variant = module_variant(module, x, cotangent)
        tolerance = 1e-3 if s.dtype == torch.float32 else 5e-2
        torch.testing.assert_close(variant.forward(), reference, rtol=tolerance, atol=tolerance)
        variants[f"HF {implementation}"] = variant
    torch.manual_seed(s.seed)
    bound = DenseFFN(s.d_model, top_k * s.d_expert, gated=True, bias=False).to(s.device, s.dtype)
    variants[f"bound: dense SwiGLU {s.d_model}x{top_k * s.d_expert}"] = module_variant(
        bound, x, cotangent
    )
    for variant in variants.values():
        variant.experts_per_token = float(top_k)
        variant.moe_flops_per_token = float(top_k * layer.config.expert_flops)
    return variants


class HFMoEBlock(nn.Module):
    """transformers' Mixtral sparse block on (S, D) tokens: its top-k router, renormalised
    weights, then its experts back-end."""

    def __init__(self, block) -> None:
        super().__init__()
        self.block = block

    def forward(self, x_SD):
        return self.block(x_SD.unsqueeze(0)).squeeze(0)


def hf_block_variants(s: Setting, top_k: int) -> dict[str, Variant]:
    """Whole layers, routing included, in eval mode: xmoe's MoELayer (top-k, renormalised)
    against transformers' Mixtral sparse block with each experts back-end, identical weights."""
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    x, cotangent = make_inputs(s)
    layer = calibrated_xmoe(
        s, 4.0, router="topk", top_k=top_k, activation="swiglu", bias=False, init_std=0.05,
        renormalize=True,
    ).eval()  # fmt: skip
    variants = {"xmoe layer": module_variant(layer, x, cotangent)}
    reference = variants["xmoe layer"].forward()
    for implementation in _hf_implementations(s, top_k):
        block = MixtralSparseMoeBlock(_mixtral_config(s, top_k, implementation))
        block = block.to(s.device, s.dtype).eval()
        with torch.no_grad():
            block.gate.weight.copy_(layer.router.weight)
        _copy_experts(block.experts, layer)
        variant = module_variant(HFMoEBlock(block), x, cotangent)
        tolerance = 1e-3 if s.dtype == torch.float32 else 5e-2
        torch.testing.assert_close(variant.forward(), reference, rtol=tolerance, atol=tolerance)
        variants[f"HF Mixtral block, {implementation}"] = variant
    for variant in variants.values():
        variant.experts_per_token = float(top_k)
        variant.moe_flops_per_token = float(top_k * layer.config.expert_flops)
    return variants


def pair_variants(s: Setting, d_ff: int) -> dict[str, Variant]:
    """Top-2 over 16 experts of d_ff/2 against XMoE over 64 of d_ff/8 (equal parameters)."""
    x, cotangent = make_inputs(s)
    top2_setting = Setting(s.num_tokens, s.d_model, 16, d_ff // 2, s.device, s.dtype, s.seed)
    xmoe_setting = Setting(s.num_tokens, s.d_model, 64, d_ff // 8, s.device, s.dtype, s.seed)
    layers = {
        f"top-2 16x{d_ff // 2}": calibrated_xmoe(top2_setting, 4.0, router="topk", top_k=2),
        f"XMoE 64x{d_ff // 8} t=0.9": calibrated_xmoe(xmoe_setting, 4.0, threshold=0.9),
    }
    variants = {}
    for name, layer in layers.items():
        with torch.no_grad():
            stats = layer(x).routing
        variants[name] = module_variant(
            layer,
            x,
            cotangent,
            experts_per_token=stats.experts_per_token,
            moe_flops_per_token=float(stats.flops_per_token),
        )
    return variants
