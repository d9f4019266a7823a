"""FLOP counts of the FFNs and routers: the one place their formulas live.

Counted as every table in docs/ counts them: forward FLOPs for one token, 2 FLOPs per
multiply-add, weight matrices only (biases, activations, norms and softmax are not counted).
A plain FFN has 2 matrices of D x H (in, out); a gated one 3 (gate, up, out).

Imports nothing from xmoe, so the configs at the bottom of the package can use it.
"""

from __future__ import annotations

FORWARD_BACKWARD = 3
"""Training FLOPs over forward FLOPs of a matmul: the backward computes two products (the input's
gradient and the weight's) for the forward's one."""


def ffn_params(d_model: int, d_hidden: int, gated: bool) -> int:
    """Weight-matrix entries of one FFN (or expert) of hidden width ``d_hidden``."""
    matrices = 3 if gated else 2
    return matrices * d_model * d_hidden


def ffn_flops(d_model: int, d_hidden: int, gated: bool) -> int:
    """Forward FLOPs of one FFN (or one expert) on one token."""
    return 2 * ffn_params(d_model, d_hidden, gated)


def masked_swiglu_fraction(kept_inputs, kept_neurons, gate_first: bool):
    """The fraction of a gated FFN's forward FLOPs left when a token keeps a fraction
    ``kept_inputs`` of the channels entering gate/up and ``kept_neurons`` of the neurons (floats,
    or tensors of them elementwise). The gate and up read the kept channels and down the kept
    neurons; gate-first, the gate runs on every kept channel and up only for the kept neurons."""
    up = kept_inputs * kept_neurons if gate_first else kept_inputs
    return (kept_inputs + up + kept_neurons) / 3


def router_flops(d_model: int, num_experts: int) -> int:
    """Forward FLOPs of a linear router (one (E, D) matrix) on one token."""
    return 2 * d_model * num_experts


def constant_expert_flops(d_model: int) -> int:
    """Forward FLOPs of one MoE++ constant expert ``a₁·x + a₂·v`` on one token: its (2, D)
    map to ``[a₁, a₂]`` (the mix itself is elementwise, uncounted like activations)."""
    return 2 * 2 * d_model


def routed_flops_per_token(kept_pairs, num_tokens, expert_flops, router_flops: int):
    """Forward MoE FLOPs per token of a call: ``kept_pairs`` (token, expert) pairs computed over
    ``num_tokens`` tokens, each costing ``expert_flops``, plus the router on every token
    (``router_flops``: whatever every token costs, shared experts included).

    ``kept_pairs`` and ``expert_flops`` may also be (E,) tensors, per expert (a pool whose
    experts differ in cost): the products are summed. Works on Python numbers and on tensors
    alike (pairs are multiplied before dividing, as the statistics always did, so the numbers
    in docs/ stay bit for bit).
    """
    pair_flops = kept_pairs * expert_flops
    if getattr(pair_flops, "ndim", 0):  # per expert: load times cost, summed over experts
        pair_flops = pair_flops.sum()
    return pair_flops / num_tokens + router_flops
