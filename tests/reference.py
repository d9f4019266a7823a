"""A slow, plainly written MoE layer: a Python loop over tokens, for tests only.

It follows the XMoE rule as ``docs/routing.md`` states it, word by word, and shares no code
with ``xmoe`` beyond the config dataclass. Routing decisions are made on Python floats; the
outputs and the aux loss are built from tensor ops so that autograd gives reference gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from xmoe import MoEConfig, MoELayer


@dataclass
class ReferenceOutput:
    hidden_states: torch.Tensor  # (S, D)
    aux_loss: torch.Tensor
    wanted: list[list[int]]  # per token, the experts its rule selected, best first
    kept: list[list[int]]  # per token, the experts that survived capacity
    flops_per_token: float
    state: torch.Tensor | None = None  # the routing state for the next MoE layer


def _activation(name: str, h: torch.Tensor) -> torch.Tensor:
    if name == "gelu":
        return 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))
    if name == "relu":
        return torch.clamp(h, min=0.0)
    if name == "silu":
        return h * torch.sigmoid(h)
    raise ValueError(name)


def _expert(params: dict[str, torch.Tensor], config: MoEConfig, e: int, x: torch.Tensor):
    h = x @ params["experts.w1"][e]
    if config.bias:
        h = h + params["experts.b1"][e]
    if config.gated:  # w1 = [gate | up], each d_expert wide
        gate, up = h[..., : config.d_expert], h[..., config.d_expert :]
        a = _activation("silu", gate) * up
    else:
        a = _activation(config.activation, h)
    y = a @ params["experts.w2"][e]
    if config.bias:
        y = y + params["experts.b2"][e]
    return y


def _gru_cell(params: dict[str, torch.Tensor], x: torch.Tensor, h: torch.Tensor):
    """One GRU step of one token (``torch.nn.GRUCell``'s equations, gates r, z, n)."""
    gi = params["router.gru_ih"] @ x + params["router.gru_b_ih"]
    gh = params["router.gru_hh"] @ h + params["router.gru_b_hh"]
    (ir, iz, in_), (hr, hz, hn) = gi.chunk(3), gh.chunk(3)
    r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
    n = torch.tanh(in_ + r * hn)
    return (1 - z) * n + z * h


def _logits(config, params, x, state):
    """(S, E) router logits token by token, and the state for the next MoE layer."""
    rows, states = [], []
    for s in range(x.shape[0]):
        if config.router.startswith("recurrent"):  # RMoE: a GRU over depth, logits from its state
            size = params["router.proj"].shape[0]
            h = state[s] if state is not None else x.new_zeros(size)
            h = _gru_cell(params, params["router.proj"] @ x[s], h)
            rows.append(params["router.weight"] @ h)
            states.append(h)
            continue
        z = params["router.weight"] @ x[s]
        gate_map = params.get("router.gate_map")
        if config.router == "moepp" and gate_map is not None:  # MoE++'s gating residual
            if state is not None:
                z = z + gate_map @ state[s]
            states.append(z)
        rows.append(z)
    logits = torch.stack(rows) if rows else x.new_zeros(0, config.num_experts)
    return logits, (torch.stack(states) if states else None)


def _pool_expert(params, config: MoEConfig, roles, e: int, x: torch.Tensor):
    """Expert e of the pool on one token, by its role (MoE++'s zero-computation experts)."""
    role = roles[e]
    if role == "zero":
        return torch.zeros_like(x)
    if role == "copy":
        return x
    if role == "constant":
        j = e - roles.index("constant")
        a = torch.softmax(params["experts.constant_gate"][j] @ x, dim=-1)
        return a[0] * x + a[1] * params["experts.constant"][j]
    if config.experts == "moepp":  # its FFN experts are under experts.ffn.
        params = {k.replace("experts.ffn.", "experts."): v for k, v in params.items()}
    return _expert(params, config, e, x)


def reference_forward(
    config: MoEConfig,
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    state: torch.Tensor | None = None,
) -> ReferenceOutput:
    """The layer's output on x (S, D), computed token by token; ``state``: the previous MoE
    layer's routing state (``ReferenceOutput.state``)."""
    num_tokens, num_experts = x.shape[0], config.num_experts
    logits, next_state = _logits(config, params, x, state)
    probs = torch.softmax(logits, dim=-1)
    roles = config.expert_options.roles(num_experts)

    wanted: list[list[int]] = []
    for s in range(num_tokens):
        p = probs[s].tolist()
        order = sorted(range(num_experts), key=lambda e, p=p: (-p[e], e))
        if config.router in ("topk", "moepp", "recurrent"):
            chosen = order[: config.top_k]
        else:
            chosen = []
            for e in order:
                if math.fsum(p[c] for c in chosen) < config.threshold:
                    chosen.append(e)
        wanted.append(chosen)

    kept_pairs = {(s, e) for s in range(num_tokens) for e in wanted[s]}
    capacity = config.capacity(num_tokens)
    if capacity is not None:
        kept_pairs = set()
        for e in range(num_experts):
            candidates = [
                (rank, -probs[s, e].item(), s)
                for s in range(num_tokens)
                for rank, chosen in enumerate(wanted[s])
                if chosen == e
            ]
            for _, _, s in sorted(candidates)[:capacity]:
                kept_pairs.add((s, e))
    kept = [[e for e in wanted[s] if (s, e) in kept_pairs] for s in range(num_tokens)]

    rows = []
    for s in range(num_tokens):
        # the MoE++ router gives a zero expert weight 0
        zeroed = [config.router == "moepp" and roles[e] == "zero" for e in kept[s]]
        weights = [probs[s, e] * (not z) for e, z in zip(kept[s], zeroed, strict=True)]
        if config.renormalize and weights:
            total = sum(weights)
            weights = [w / total for w in weights]
        y = x.new_zeros(x.shape[1])
        for e, w in zip(kept[s], weights, strict=True):
            y = y + w * _pool_expert(params, config, roles, e, x[s])
        rows.append(y)
    hidden = torch.stack(rows) if rows else x.new_zeros(0, x.shape[1])

    top1 = [wanted[s][0] for s in range(num_tokens)]
    fraction = torch.tensor(
        [top1.count(e) / num_tokens for e in range(num_experts)], dtype=probs.dtype
    )
    tau = config.router_options.tau if config.router == "moepp" else 1.0
    eta = torch.tensor([1.0 if role == "ffn" else tau for role in roles], dtype=probs.dtype)
    aux = config.aux_loss_coef * num_experts * (eta * probs.mean(dim=0) * fraction).sum()

    matrices = 3 if config.gated else 2
    role_flops = {"ffn": 2 * matrices * config.d_model * config.d_expert}
    role_flops["constant"] = 2 * 2 * config.d_model  # its (2, D) map
    pair_flops = sum(role_flops.get(roles[e], 0) for k in kept for e in k)
    # the router: every matrix it holds, once per token
    router_matrices = [p for n, p in params.items() if n.startswith("router.") and p.dim() == 2]
    flops = pair_flops / num_tokens + sum(2 * p.numel() for p in router_matrices)
    return ReferenceOutput(hidden, aux, wanted, kept, flops, next_state)


def layer_params(layer: MoELayer, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """A detached float64 copy of the layer's parameters that requires grad."""
    return {
        name: p.detach().to(dtype).clone().requires_grad_(True)
        for name, p in layer.named_parameters()
    }


def dense_ffn(params: dict[str, torch.Tensor], config: MoEConfig, x: torch.Tensor):
    """Expert 0 applied to every token: what a one-expert layer must equal."""
    return torch.stack([_expert(params, config, 0, x[s]) for s in range(x.shape[0])])
