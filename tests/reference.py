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


def _expert(
    params: dict[str, torch.Tensor],
    config: MoEConfig,
    e: int,
    x: torch.Tensor,
    pool: str = "experts",
):
    h = x @ params[f"{pool}.w1"][e]
    if config.bias:
        h = h + params[f"{pool}.b1"][e]
    if config.gated:  # w1 = [gate | up], each d_expert wide
        gate, up = h[..., : config.d_expert], h[..., config.d_expert :]
        a = _activation("silu", gate) * up
    else:
        a = _activation(config.activation, h)
    y = a @ params[f"{pool}.w2"][e]
    if config.bias:
        y = y + params[f"{pool}.b2"][e]
    return y


def _combine_weight(config: MoEConfig, p: torch.Tensor) -> torch.Tensor:
    """A kept expert's combine weight: its probability, or for DSMoE's sigmoid gate g the gate
    times a mask that is 1 forward and has g's gradient backward (straight-through)."""
    if config.router == "sigmoid":
        return p * (1.0 + p - p.detach())
    return p


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
    layer's routing state (``ReferenceOutput.state``).

    The ``null_topk`` / ``null_threshold`` routers (AdaMoE) rank the router's n + m rows, of which
    ids >= n are null experts: ranked and counted by the balance loss, never computed, and the
    true picks' weights are divided by their sum. ``expert_choice`` (in training mode): each
    expert takes its C most probable tokens; no balance loss."""
    num_tokens, num_experts = x.shape[0], config.num_experts
    logits, next_state = _logits(config, params, x, state)
    sigmoid = config.router == "sigmoid"  # DSMoE: independent gates, not a distribution
    probs = torch.sigmoid(logits) if sigmoid else torch.softmax(logits, dim=-1)
    num_ranked = probs.shape[1]  # the true experts and any null ones
    null = config.router in ("null_topk", "null_threshold")
    roles = config.expert_options.roles(num_experts)

    takers: dict[int, list[int]] = {}  # expert choice: per expert, the tokens it takes
    if config.router == "expert_choice":
        for e in range(num_experts):
            by_prob = sorted(range(num_tokens), key=lambda s, e=e: (-probs[s, e].item(), s))
            takers[e] = by_prob[: config.capacity(num_tokens)]

    top_k_routers = ("topk", "null_topk", "deepseek", "smoe_dropout", "moepp", "recurrent")
    ranked: list[list[int]] = []  # per token, the rule's choice among all ranked experts
    for s in range(num_tokens):
        p = probs[s].tolist()
        order = sorted(range(num_ranked), key=lambda e, p=p: (-p[e], e))
        if config.router in top_k_routers:  # smoe_dropout: eval, or training step 0
            chosen = order[: config.top_k]
        elif config.router == "expert_choice":
            chosen = [e for e in order if s in takers[e]]
        elif sigmoid:  # open gates, or the best expert when none is open
            tau = config.router_options.gate_threshold
            chosen = [e for e in order if p[e] > tau] or order[:1]
        else:
            chosen = []
            for e in order:
                if math.fsum(p[c] for c in chosen) < config.threshold:
                    chosen.append(e)
        ranked.append(chosen)
    wanted = [[e for e in chosen if e < num_experts] for chosen in ranked]

    kept_pairs = {(s, e) for s in range(num_tokens) for e in wanted[s]}
    capacity = config.capacity(num_tokens)
    if capacity is not None:
        kept_pairs = set()
        for e in range(num_experts):
            candidates = [
                (rank, -probs[s, e].item(), s)
                for s in range(num_tokens)
                for rank, chosen in enumerate(ranked[s])
                if chosen == e
            ]
            for _, _, s in sorted(candidates)[:capacity]:
                kept_pairs.add((s, e))
    kept = [[e for e in wanted[s] if (s, e) in kept_pairs] for s in range(num_tokens)]

    rows = []
    for s in range(num_tokens):
        weights = [_combine_weight(config, probs[s, e]) for e in kept[s]]
        if null and weights:  # over the true picks, before capacity
            total = sum(probs[s, e] for e in wanted[s])
            weights = [w / total for w in weights]
        if config.router == "smoe_dropout":  # softmax over the selected logits
            weights = [w / sum(probs[s, e] for e in wanted[s]) for w in weights]
        if config.router == "moepp":  # the MoE++ router gives a zero expert weight 0
            weights = [w * (roles[e] != "zero") for e, w in zip(kept[s], weights, strict=True)]
        if config.renormalize and weights:
            total = sum(weights)
            weights = [w / total for w in weights]
        y = x.new_zeros(x.shape[1])
        for e, w in zip(kept[s], weights, strict=True):
            y = y + w * _pool_expert(params, config, roles, e, x[s])
        for j in range(config.num_shared_experts):  # always on, unweighted
            y = y + _expert(params, config, j, x[s], "shared_experts")
        rows.append(y)
    hidden = torch.stack(rows) if rows else x.new_zeros(0, x.shape[1])

    if config.router == "expert_choice":  # balanced by construction: no balance loss
        aux = probs.sum() * 0.0
    elif config.router.startswith("deepseek"):
        aux = _deepseek_aux(config, probs, wanted)
    elif config.router == "moepp" and set(roles) != {"ffn"}:
        aux = _moepp_aux(config, probs, wanted, roles)
    else:
        top1 = [ranked[s][0] for s in range(num_tokens)]
        fraction = torch.tensor(
            [top1.count(e) / num_tokens for e in range(num_ranked)], dtype=probs.dtype
        )
        aux = config.aux_loss_coef * num_ranked * (probs.mean(dim=0) * fraction).sum()
    if sigmoid:
        aux = aux + config.router_options.sparsity_coef * probs.mean()

    matrices = 3 if config.gated else 2
    role_flops = {"ffn": 2 * matrices * config.d_model * config.d_expert}
    role_flops["constant"] = 2 * 2 * config.d_model  # its (2, D) map
    pair_flops = sum(role_flops.get(roles[e], 0) for k in kept for e in k)
    pair_flops += config.num_shared_experts * num_tokens * role_flops["ffn"]
    # the router: every matrix it holds, once per token
    router_matrices = [p for n, p in params.items() if n.startswith("router.") and p.dim() == 2]
    flops = pair_flops / num_tokens + sum(2 * p.numel() for p in router_matrices)
    return ReferenceOutput(hidden, aux, wanted, kept, flops, next_state)


def _deepseek_aux(config: MoEConfig, probs: torch.Tensor, wanted: list[list[int]]):
    """DeepSeekMoE's losses as its paper writes them: ``α₁ Σ_i f_i P_i`` with
    ``f_i = N'/(K'T) · #{t selects i}`` (K'T: all selected pairs) and ``P_i = mean_t s_{i,t}``,
    plus ``α₂ Σ_d f'_d P'_d`` over D contiguous groups (f' the group's mean f, P' its sum P)."""
    num_experts = config.num_experts
    pairs = [e for chosen in wanted for e in chosen]
    f = [num_experts * pairs.count(i) / len(pairs) for i in range(num_experts)]
    mean_p = probs.mean(dim=0)
    aux = config.aux_loss_coef * sum(f[i] * mean_p[i] for i in range(num_experts))
    options = config.router_options
    groups = options.device_groups
    if groups > 1:
        size = num_experts // groups
        for d in range(groups):
            members = range(d * size, (d + 1) * size)
            group_f = sum(f[i] for i in members) / size
            group_p = sum(mean_p[i] for i in members)
            aux = aux + options.device_balance_coef * group_f * group_p
    return aux


def _moepp_aux(
    config: MoEConfig, probs: torch.Tensor, wanted: list[list[int]], roles: tuple[str, ...]
):
    """MoE++'s heterogeneous balance loss as its paper writes it (Eq. 7): ``α Σ_i η_i f_i P_i``
    with ``f_i = N/(kT) · #{t selects i}`` (kT: all selected pairs, before capacity),
    ``P_i = mean_t p_{t,i}`` and η_i 1 for FFN experts, τ for zero-computation ones."""
    num_experts = config.num_experts
    pairs = [e for chosen in wanted for e in chosen]
    mean_p = probs.mean(dim=0)
    tau = config.router_options.tau
    terms = []
    for i in range(num_experts):
        f_i = num_experts * pairs.count(i) / len(pairs)
        eta_i = 1.0 if roles[i] == "ffn" else tau
        terms.append(eta_i * f_i * mean_p[i])
    return config.aux_loss_coef * sum(terms)


def layer_params(layer: MoELayer, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """A detached float64 copy of the layer's parameters that requires grad."""
    return {
        name: p.detach().to(dtype).clone().requires_grad_(True)
        for name, p in layer.named_parameters()
    }


def dense_ffn(params: dict[str, torch.Tensor], config: MoEConfig, x: torch.Tensor):
    """Expert 0 applied to every token: what a one-expert layer must equal."""
    return torch.stack([_expert(params, config, 0, x[s]) for s in range(x.shape[0])])
