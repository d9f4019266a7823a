"""The cache of ``xmoe sparsify-grid``: :class:`Runner` measures one cell at a time and keeps
every result: cells as JSON beside the report (``EvalSettings.cells_dir``, committed), converted
models as verified safetensors and recovery fine-tunes as checkpoints under the run directory,
so a rerun skips what is done. A cell that could not be measured (a recovery the API refuses) is
stored with its reason and retried on the next run.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xmoe.conversion.architecture import layer_mlps
from xmoe.conversion.recovery import recover
from xmoe.conversion.sparse_mlp import SEPARATE_UP_KEY
from xmoe.conversion.sparsify import (
    _reconfigure,
    set_active_fraction,
    set_combine,
    set_threshold,
    sparse_mlps,
    sparsify,
)
from xmoe.experiments.sparsify_data import load_or_build_data, random_data
from xmoe.experiments.sparsify_metrics import measure_quality, time_side_by_side
from xmoe.experiments.sparsify_settings import NEURON_METHODS, EvalSettings
from xmoe.experts.ffn import separate_up_error
from xmoe.storage import atomic_write_text, read_verified, save_verified

QUICK_MODEL = {
    "vocab_size": 256,
    "hidden_size": 32,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
"""The quick mode's random Llama: an FFN width (128) that every default expert size divides."""


def quick_model(settings: EvalSettings) -> nn.Module:
    """The quick mode's dense model: a random Llama of :data:`QUICK_MODEL`, the same every run."""
    from transformers import LlamaConfig, LlamaForCausalLM

    positions = max(settings.seq_len, settings.recovery.seq_len)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(**QUICK_MODEL, max_position_embeddings=positions))


def _mlp_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if ".mlp." in k}


def cached_cells(settings: EvalSettings) -> list[dict[str, Any]]:
    """Every cell stored in ``settings.cells_dir`` that was measured under these settings' key
    (skipped ones included, with their reason), in name order."""
    key = settings.measurement_key()
    cells = []
    for path in sorted(settings.cells_dir.glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue
        if record.get("key") == key:
            cells.append(record)
    return cells


class Runner:
    """Runs the grid cell by cell; every cell is stored in ``settings.cells_dir``, every model
    and checkpoint under ``settings.out``."""

    def __init__(self, settings: EvalSettings) -> None:
        from xmoe.conversion.real_model import load_real_model

        self.settings = settings
        self.out = Path(settings.out)
        settings.cells_dir.mkdir(parents=True, exist_ok=True)
        (self.out / "models").mkdir(parents=True, exist_ok=True)
        if settings.quick:
            self.dense = quick_model(settings).eval()
            self.data = random_data(settings, self.dense.config.vocab_size)
        else:
            self.dense, tokenizer, _ = load_real_model(settings.cache_dir)
            self.data = load_or_build_data(tokenizer, settings, self.out / "data.safetensors")
        self._mlp_inputs: list[torch.Tensor] | None = None
        self._last_neuron_model: tuple[tuple[str, float], nn.Module] | None = None
        self.key = settings.measurement_key()
        self.after_cell: Callable[[], Any] | None = None
        """Called after every stored cell (``run_eval`` rewrites the report there)."""

    # -- cells ---------------------------------------------------------------------------------
    def cell_path(self, name: str) -> Path:
        return self.settings.cells_dir / f"{name}.json"

    def cached(self, name: str, holds: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """Cell ``name``'s record when it was measured under this key (not skipped) and holds
        the items of ``holds`` (a cell whose definition changed is measured again); else None."""
        path = self.cell_path(name)
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError:
            return None
        done = record.get("key") == self.key and "skipped" not in record  # a skip is retried
        done = done and all(record.get(k) == v for k, v in (holds or {}).items())
        return record if done else None

    def store(self, name: str, record: dict[str, Any]) -> None:
        record = record | {"key": self.key, "name": name}
        atomic_write_text(self.cell_path(name), json.dumps(record, indent=1, sort_keys=True))
        if self.after_cell is not None:
            self.after_cell()

    def skip(self, name: str, meta: dict[str, Any], reason: str) -> None:
        """Store that cell ``name`` could not be measured, and why (the report says so; the
        next run tries it again)."""
        self.store(name, meta | {"skipped": reason})

    def all_cells(self) -> list[dict[str, Any]]:
        return cached_cells(self.settings)

    # -- models --------------------------------------------------------------------------------
    def mlp_inputs(self) -> list[torch.Tensor]:
        if self._mlp_inputs is None:
            from xmoe.conversion.calibration import collect_mlp_inputs

            self._mlp_inputs = collect_mlp_inputs(
                self.dense,
                layer_mlps(self.dense),
                self.data["calibration"],
                batch_size=self.settings.eval_batch,
                progress=self.settings.progress,
            )
        return self._mlp_inputs

    def converted(self, size: int, partition: str) -> nn.Module:
        """The dense model converted with this expert size and partition, learned router
        trained (cached in ``models/<partition>-H<size>.safetensors``)."""
        path = self.out / "models" / f"{partition}-H{size}.safetensors"
        tag = json.dumps(self.key, sort_keys=True)
        if path.is_file():
            tensors, meta, _ = read_verified(path)
            # a cache of the pre-0.1.0 layout is rebuilt: loaded, its up projections would be
            # skipped (strict=False) and the model silently wrong
            stale = separate_up_error(tensors, path, SEPARATE_UP_KEY) is not None
            if meta.get("key") == tag and not stale:
                model = sparsify(self.dense, size, "contiguous", router="oracle")
                model.load_state_dict(tensors, strict=False)
                _reconfigure(model, partition=partition, router="learned")
                return model
        model = sparsify(
            self.dense,
            size,
            partition,
            router="learned",
            mlp_inputs=self.mlp_inputs(),
            router_steps=self.settings.router_steps,
            cluster_tokens=self.settings.calibration_tokens,
            progress=self.settings.progress,
        )
        save_verified(path, _mlp_state(model), {"key": tag})
        return model

    def recovered(self, size: int, partition: str, fraction: float) -> nn.Module:
        model = self.converted(size, partition)
        set_active_fraction(model, fraction)
        checkpoint = self.out / "models" / f"recovered-{partition}-H{size}-f{fraction}.ckpt"
        recover(
            model,
            self.data["recovery"],
            self.settings.recovery,
            teacher=self.dense,
            checkpoint=checkpoint,
            progress=self.settings.progress,
            desc=f"recovery {partition} H={size} f={fraction}",
        )
        return model

    def neuron_model(self, method: str, target_flops: float) -> nn.Module:
        """The dense model in the neurons mode with ``method``'s settings
        (:data:`~xmoe.experiments.sparsify_settings.NEURON_METHODS`) at ``target_flops``,
        calibrated on the grid's calibration MLP inputs (converted again when needed: a
        threshold calibration is deterministic). The last conversion is kept and a copy of it
        returned, since the recovery budgets all start from the same one (minutes each on
        SmolLM2) and train their copy in place."""
        key = (method, target_flops)
        if self._last_neuron_model is None or self._last_neuron_model[0] != key:
            model = sparsify(
                self.dense,
                mode="neurons",
                target_flops=target_flops,
                mlp_inputs=self.mlp_inputs(),
                progress=self.settings.progress,
                **NEURON_METHODS[method],
            )
            self._last_neuron_model = (key, model)
        return copy.deepcopy(self._last_neuron_model[1])

    def xmoe_model(self, size: int) -> nn.Module:
        model = self.converted(size, "clustered")
        with torch.no_grad():
            for module in sparse_mlps(model):
                module.router.weight.mul_(self.settings.xmoe_router_scale)
        set_combine(model, "weighted")
        set_threshold(model, 1.0)
        recover(
            model,
            self.data["recovery"],
            self.settings.recovery,
            teacher=self.dense,
            checkpoint=self.out / "models" / f"xmoe-H{size}.ckpt",
            progress=self.settings.progress,
            desc=f"recovery xmoe H={size} t=1",
        )
        return model

    # -- one cell ------------------------------------------------------------------------------
    def measure(self, name: str, model: nn.Module, meta: dict[str, Any], timed: bool) -> None:
        record = dict(meta)
        record |= measure_quality(model, self.data, self.settings, desc=name)
        if timed:
            ids = self.data["eval_shakespeare"]
            windows = max(1, self.settings.timing_tokens // self.settings.seq_len)
            ids = ids[:windows] if ids.shape[0] >= windows else ids
            record["timing"] = time_side_by_side(
                self.dense, model, ids, self.settings.timing_repeats
            )
        else:
            record["timing"] = None
        self.store(name, record)


__all__ = ["Runner"]
