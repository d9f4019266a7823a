"""Calibration: the MLP inputs of every decoder layer of the dense model.

Shape legend: B sequences, T tokens per sequence, S = B·T tokens, D hidden size.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm


def collect_mlp_inputs(
    model: nn.Module,
    mlps: list[nn.Module],
    input_ids_BT: torch.Tensor,
    batch_size: int = 8,
    progress: bool = False,
) -> list[torch.Tensor]:
    """Run the dense model on calibration sequences and keep what each MLP receives.

    The inputs come from the dense model throughout (as in MoEfication), so every layer's
    router learns from the hidden states it would see if the layers before it were exact.

    Args:
        model: the dense causal LM. mlps: its MLP modules, one per layer.
        input_ids_BT: (B, T) int64 calibration token ids (full windows, no padding).
        batch_size: sequences per forward pass.

    Returns:
        one (S, D) tensor per layer, in the model's dtype, on the model's device.
    """
    if input_ids_BT.dim() != 2 or input_ids_BT.dtype != torch.int64:
        raise ValueError(
            f"calibration must be (B, T) int64 token ids, got {tuple(input_ids_BT.shape)} "
            f"{input_ids_BT.dtype}"
        )
    captured: list[list[torch.Tensor]] = [[] for _ in mlps]

    def hook(index: int):
        def record(module, args) -> None:
            x = args[0]
            captured[index].append(x.detach().reshape(-1, x.shape[-1]))

        return record

    handles = [mlp.register_forward_pre_hook(hook(i)) for i, mlp in enumerate(mlps)]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            batches = input_ids_BT.split(batch_size)
            for batch in tqdm(batches, desc="calibration", disable=not progress):
                model(input_ids=batch.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return [torch.cat(chunks) for chunks in captured]


def spaced_rows(x_SD: torch.Tensor, count: int) -> torch.Tensor:
    """At most ``count`` evenly spaced rows of ``x_SD`` (deterministic subsample)."""
    if x_SD.shape[0] <= count:
        return x_SD
    return x_SD[torch.linspace(0, x_SD.shape[0] - 1, count).long()]
