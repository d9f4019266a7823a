"""The measurements of one model in ``xmoe sparsify-grid``: held-out perplexity, experts and
FFN FLOPs per token (:func:`measure_quality`), and FFN / forward wall time against the dense
model, timed side by side (:func:`time_side_by_side`).

Shape legend: B windows, T tokens per window, D hidden size, E experts, H neurons per expert,
I FFN width.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from xmoe import flops
from xmoe.conversion.architecture import layer_mlps
from xmoe.conversion.neuron_mlp import neuron_mlps
from xmoe.conversion.sparsify import sparse_mlps
from xmoe.experiments.neuron_oracle import oracle_mlps
from xmoe.experiments.sparsify_data import DOMAINS
from xmoe.experiments.sparsify_settings import EvalSettings
from xmoe.routing.stats import layer_mean


@torch.no_grad()
def measure_quality(model: nn.Module, data: dict[str, torch.Tensor], settings: EvalSettings,
                    desc: str) -> dict[str, Any]:  # fmt: skip
    """Perplexity per held-out domain, experts per token and FFN FLOPs per token.

    FFN FLOPs (:mod:`xmoe.flops`, SwiGLU): dense 6·D·I per layer; sparse 6·D·H per selected
    expert plus the router's 2·D·E (none for the oracle, which is not a deployable router: its
    ranking costs a dense FFN), per layer, averaged over the evaluated tokens. A neurons-mode
    model (or the per-neuron oracle) has no experts: its MLPs' own per-token FLOP fractions
    count (``flops_fraction``, no router), ``experts_per_token`` is None, and
    ``ffn_flops_share_by_domain`` holds the share per held-out domain: thresholds shared by
    both domains give each domain's tokens the compute their own scores pass, not F each.
    """
    config = model.config
    modules = sparse_mlps(model)
    masked = [*neuron_mlps(model), *oracle_mlps(model)]  # no experts: per-token FLOP fractions
    selected = [0.0] * len(modules)
    kept = {d: [0.0] * len(masked) for d in DOMAINS}
    tokens = dict.fromkeys(DOMAINS, 0)
    result: dict[str, Any] = {"ppl": {}, "nll": {}}
    batches = [(d, b) for d in DOMAINS for b in data[f"eval_{d}"].split(settings.eval_batch)]
    nll = dict.fromkeys(DOMAINS, 0.0)
    count = dict.fromkeys(DOMAINS, 0)
    for domain, ids_BT in tqdm(batches, desc=desc, disable=not settings.progress, leave=False):
        logits = model(input_ids=ids_BT, use_cache=False).logits[:, :-1].float()
        targets = ids_BT[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
        )
        nll[domain] += float(loss)
        count[domain] += targets.numel()
        for index, module in enumerate(modules):
            selected[index] += float(module.experts_per_token.double().sum())
        for index, module in enumerate(masked):
            kept[domain][index] += float(module.flops_fraction.sum())
        tokens[domain] += ids_BT.numel()
    tokens_seen = sum(tokens.values())
    for domain in DOMAINS:
        result["nll"][domain] = nll[domain] / count[domain]
        result["ppl"][domain] = math.exp(result["nll"][domain])
    d_model = config.hidden_size
    dense_flops = flops.ffn_flops(d_model, config.intermediate_size, gated=True)
    if masked:
        result["experts_per_token"] = None
        by_domain = {d: layer_mean([k / tokens[d] for k in kept[d]]) for d in DOMAINS}
        result["ffn_flops_share_by_domain"] = by_domain
        result["active_share"] = sum(by_domain[d] * tokens[d] for d in DOMAINS) / tokens_seen
        result["ffn_flops"] = result["active_share"] * dense_flops * config.num_hidden_layers
    elif modules:
        per_layer = []
        for index, module in enumerate(modules):
            learned = module.settings.router == "learned"
            per_layer.append(
                flops.routed_flops_per_token(
                    selected[index],
                    tokens_seen,
                    flops.ffn_flops(d_model, module.expert_size, gated=True),
                    flops.router_flops(d_model, module.num_experts) if learned else 0,
                )
            )
        result["experts_per_token"] = layer_mean([s / tokens_seen for s in selected])
        result["active_share"] = result["experts_per_token"] / modules[0].num_experts
        result["ffn_flops"] = layer_mean(per_layer) * config.num_hidden_layers
    else:
        result["experts_per_token"] = None
        result["active_share"] = 1.0
        result["ffn_flops"] = float(dense_flops * config.num_hidden_layers)
    result["ffn_flops_share"] = result["ffn_flops"] / (dense_flops * config.num_hidden_layers)
    return result


class _FFNClock:
    """Sums the wall time spent inside a model's MLP modules (forward pre/post hooks)."""

    def __init__(self, model: nn.Module) -> None:
        self.total = 0.0
        self._start = 0.0
        self._handles = []
        for mlp in layer_mlps(model):
            self._handles.append(mlp.register_forward_pre_hook(self._enter))
            self._handles.append(mlp.register_forward_hook(self._leave))

    def _enter(self, module, args) -> None:
        self._start = time.perf_counter()

    def _leave(self, module, args, output) -> None:
        self.total += time.perf_counter() - self._start

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


@torch.no_grad()
def time_side_by_side(dense: nn.Module, sparse: nn.Module, ids_BT: torch.Tensor,
                      repeats: int) -> dict[str, float]:  # fmt: skip
    """Median FFN time and forward time of both models on the same batch, run alternately
    (dense, sparse, dense, ...) after one warm-up each, so load on the machine hits both.

    Returns:
        ``dense_ffn_s``, ``sparse_ffn_s``, ``dense_forward_s``, ``sparse_forward_s``,
        ``ffn_time_ratio`` (sparse / dense), ``tokens_per_s_ratio`` (sparse / dense).
    """
    clocks = {"dense": _FFNClock(dense), "sparse": _FFNClock(sparse)}
    models = {"dense": dense, "sparse": sparse}
    samples: dict[str, list[tuple[float, float]]] = {"dense": [], "sparse": []}
    try:
        for repeat in range(repeats + 1):
            for name, model in models.items():
                clocks[name].total = 0.0
                start = time.perf_counter()
                model(input_ids=ids_BT, use_cache=False)
                elapsed = time.perf_counter() - start
                if repeat:  # the first pass warms up
                    samples[name].append((clocks[name].total, elapsed))
    finally:
        for clock in clocks.values():
            clock.close()
    med = {
        name: (statistics.median(s[0] for s in rows), statistics.median(s[1] for s in rows))
        for name, rows in samples.items()
    }
    return {
        "dense_ffn_s": med["dense"][0],
        "sparse_ffn_s": med["sparse"][0],
        "dense_forward_s": med["dense"][1],
        "sparse_forward_s": med["sparse"][1],
        "ffn_time_ratio": med["sparse"][0] / med["dense"][0],
        "tokens_per_s_ratio": med["dense"][1] / med["sparse"][1],
        "dense_tokens_per_s": ids_BT.numel() / med["dense"][1],
        "sparse_tokens_per_s": ids_BT.numel() / med["sparse"][1],
    }


__all__ = ["measure_quality", "time_side_by_side"]
