"""Autoregressive sampling with a key/value cache."""

from __future__ import annotations

import torch

from xmoe.models.transformer import TransformerLM
from xmoe.routing import RoutingStats


class KVCache:
    """Per-layer keys and values (B, H, K, C), grown by concatenation."""

    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx in self.keys:
            key_states = torch.cat((self.keys[layer_idx], key_states), dim=2)
            value_states = torch.cat((self.values[layer_idx], value_states), dim=2)
        self.keys[layer_idx], self.values[layer_idx] = key_states, value_states
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        keys = self.keys.get(layer_idx)
        return 0 if keys is None else keys.shape[2]


def scale_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / temperature``, finite for every finite ``temperature > 0``: the maximum is
    subtracted and the division done in float64, so a tiny temperature keeps only the largest
    logits (greedy) instead of overflowing to inf, and a huge one gives near-uniform weights
    instead of the nan of ``-inf / inf`` (1e300 is inf in float32). Same dtype as ``logits``."""
    wide = logits.double()
    wide = (wide - wide.amax(dim=-1, keepdim=True)) / temperature
    return wide.to(logits.dtype)


@torch.no_grad()
def generate(
    model: TransformerLM,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> tuple[torch.Tensor, list[float]]:
    """Extend ``input_ids`` (B, T) by ``max_new_tokens`` sampled tokens.

    ``temperature=0`` is greedy. Returns the (B, T + new) ids and the experts per token
    (mean over MoE layers) of every forward call, for reporting.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} is invalid: must be >= 0")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} is invalid: must be >= 0")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} is invalid: must be None or >= 1")
    limit = model.config.max_seq_len
    if input_ids.shape[1] + max_new_tokens > limit:
        raise ValueError(
            f"prompt ({input_ids.shape[1]} tokens) + max_new_tokens={max_new_tokens} exceeds "
            f"max_seq_len={limit}"
        )
    was_training = model.training
    model.eval()
    cache = KVCache() if use_cache else None
    ids = input_ids
    experts_per_call: list[float] = []
    next_input = ids
    for _ in range(max_new_tokens):
        out = model(next_input if use_cache else ids, cache=cache)
        if out.routing:
            experts_per_call.append(RoutingStats.mean(out.routing).experts_per_token)
        logits = out.logits[:, -1, :].float()
        if temperature == 0:
            next_token = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = scale_logits(logits, temperature)
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_token = torch.multinomial(logits.softmax(-1), 1, generator=generator)
        ids = torch.cat((ids, next_token), dim=1)
        next_input = next_token
    model.train(was_training)
    return ids, experts_per_call
