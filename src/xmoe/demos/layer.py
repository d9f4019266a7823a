"""A short demonstration of the XMoE layer against a top-2 layer with the same parameters.

Both layers fit the same teacher function on the same few hundred tokens; the demo prints how
many experts each token used, the drop rate under capacity, the MoE FLOPs per token actually
computed, and the held-out error, before and after a short fit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from xmoe.config import MoEConfig, _is_int, _require, _require_seed
from xmoe.layer import MoELayer


@dataclass
class DemoSettings:
    num_tokens: int = 512
    d_model: int = 64
    total_width: int = 1024  # summed expert hidden width, equal for both layers
    xmoe_experts: int = 32
    top2_experts: int = 8
    threshold: float = 0.9
    capacity_factor: float = 4.0
    steps: int = 400
    lr: float = 3e-3
    seed: int = 0

    def __post_init__(self) -> None:
        # bounded: a toy on one machine (and beyond 2**63 torch fails without naming the field)
        _require(
            _is_int(self.num_tokens) and 1 <= self.num_tokens <= 65536,
            "num_tokens (--tokens)",
            self.num_tokens,
            "an integer in [1, 65536]",
        )
        _require(
            _is_int(self.steps) and 1 <= self.steps <= 1_000_000,
            "steps",
            self.steps,
            "an integer in [1, 1000000]",
        )
        _require_seed("seed", self.seed)


def _teacher_data(settings: DemoSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens from a mixture of clusters, targets from a fixed random MLP teacher."""
    generator = torch.Generator().manual_seed(settings.seed)
    d = settings.d_model
    centers = torch.randn(16, d, generator=generator) * 2.0
    cluster = torch.randint(0, 16, (2 * settings.num_tokens,), generator=generator)
    x = centers[cluster] + 0.5 * torch.randn(2 * settings.num_tokens, d, generator=generator)
    teacher = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) / p.shape[-1] ** 0.5)
        y = teacher(x)
    return x, y


def _describe(name: str, layer: MoELayer, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Held-out statistics with the training capacity (what a training step computes)."""
    with torch.no_grad():
        out = layer(x)
    stats = out.routing.summary()
    stats["mse"] = float(nn.functional.mse_loss(out.hidden_states, y))
    stats["name"] = name
    return stats


def _print_table(rows: list[dict]) -> None:
    header = (
        f"{'layer':<28}{'experts/token':>14}{'wanted':>9}{'dropped':>9}"
        f"{'MoE MFLOP/token':>17}{'held-out MSE':>14}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['name']:<28}{r['experts_per_token']:>14.2f}{r['experts_wanted_per_token']:>9.2f}"
            f"{100 * r['drop_fraction']:>8.1f}%{r['flops_per_token'] / 1e6:>17.3f}{r['mse']:>14.4f}"
        )


def _per_token_line(layer: MoELayer, x: torch.Tensor, count: int = 24) -> str:
    with torch.no_grad():
        kept = layer(x[:count]).routing.kept_per_token.tolist()
    return " ".join(f"{k:>2d}" for k in kept)


def run_demo(settings: DemoSettings | None = None) -> dict[str, dict[str, float]]:
    """Fit both layers, print the comparison, and return the final statistics by layer name."""
    settings = settings or DemoSettings()
    torch.manual_seed(settings.seed)
    x, y = _teacher_data(settings)
    n = settings.num_tokens
    x_train, y_train, x_test, y_test = x[:n], y[:n], x[n:], y[n:]

    xmoe_width = settings.total_width // settings.xmoe_experts
    top2_width = settings.total_width // settings.top2_experts
    xmoe_config = MoEConfig(
        d_model=settings.d_model,
        num_experts=settings.xmoe_experts,
        d_expert=xmoe_width,
        router="threshold",
        threshold=settings.threshold,
        capacity_factor=settings.capacity_factor,
    )
    top2_config = MoEConfig(
        d_model=settings.d_model,
        num_experts=settings.top2_experts,
        d_expert=top2_width,
        router="topk",
        top_k=2,
        capacity_factor=2.0,
    )
    layers = {
        f"XMoE {settings.xmoe_experts}x{xmoe_width} t={settings.threshold}": MoELayer(xmoe_config),
        f"top-2 {settings.top2_experts}x{top2_width}": MoELayer(top2_config),
    }
    expert_params = {
        name: sum(p.numel() for p in layer.experts.parameters()) for name, layer in layers.items()
    }
    threads = torch.get_num_threads()
    print(f"xmoe demo: {n} training tokens, d_model={settings.d_model}, threads={threads}")
    for name, count in expert_params.items():
        print(f"  {name}: {count:,} expert parameters")

    print("\nBefore fitting (random init: the router is near-uniform, so XMoE wants most experts):")
    _print_table([_describe(name, layer, x_test, y_test) for name, layer in layers.items()])

    final = {}
    for name, layer in layers.items():
        optimizer = torch.optim.AdamW(layer.parameters(), lr=settings.lr, weight_decay=0.0)
        start = time.perf_counter()
        progress = tqdm(range(settings.steps), desc=f"fit {name}", leave=False)
        for _ in progress:
            out = layer(x_train)
            loss = nn.functional.mse_loss(out.hidden_states, y_train)
            optimizer.zero_grad(set_to_none=True)
            (loss + out.aux_loss).backward()
            optimizer.step()
            progress.set_postfix(
                mse=f"{loss.item():.4f}", experts=f"{out.routing.experts_per_token:.2f}"
            )
        final[name] = _describe(name, layer, x_test, y_test)
        final[name]["seconds"] = time.perf_counter() - start

    print(f"\nAfter {settings.steps} AdamW steps (held-out tokens):")
    _print_table(list(final.values()))
    xmoe_name, top2_name = list(layers)
    ratio = final[xmoe_name]["flops_per_token"] / final[top2_name]["flops_per_token"]
    print(f"\nXMoE / top-2 MoE FLOPs per token: {ratio:.2f}")
    print(f"experts per token of the first 24 held-out tokens ({xmoe_name}):")
    print("  " + _per_token_line(layers[xmoe_name], x_test))
    return final
