"""A compressed model's directory: its weights (packed codes included) in one verified
safetensors file, with the model config and the structure each pass left in every MoE layer,
from which :func:`load_compressed_lm` rebuilds the model before loading the weights. Given the
run's checkpoint record and tokenizer, it also carries them, so ``xmoe eval`` and ``xmoe
generate`` read it as they read the run (:func:`load_compressed_run`).

Written into a staging folder and put in place only when complete
(:func:`xmoe.storage.model_dirs.staged_model_directory`), like ``xmoe export`` and
``xmoe sparsify``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xmoe.compression.base import RouterWrapper, moe_layers
from xmoe.compression.dynamic_prune import DynamicPruneRouter
from xmoe.compression.merge import MergedExperts
from xmoe.compression.prune import PrunedRouter
from xmoe.compression.quantize import QuantizedExperts
from xmoe.compression.residual import ResidualExperts
from xmoe.config import MoEConfig
from xmoe.experts import ExpertKind, FFNExperts
from xmoe.models import ModelConfig, TransformerLM
from xmoe.storage import read_verified, save_verified
from xmoe.storage.model_dirs import check_model_target, staged_model_directory
from xmoe.training.config import TrainConfig
from xmoe.training.rundir import TOKENIZER_NAME

WEIGHTS_NAME = "model.compressed.safetensors"
"""The weights file of a compressed model's directory (a weight file to
:func:`xmoe.storage.model_dirs.is_weight_file`, so it is moved last into an existing directory)."""

RUN_META_KEY = "run_meta"
"""Metadata key of the checkpoint record (``train_config``, tokenizer digests, step) of the run
a compressed model came from."""


def experts_spec(experts: ExpertKind) -> dict[str, Any]:
    """What rebuilds ``experts`` (before its weights are loaded): kind and sizes."""
    if isinstance(experts, MergedExperts):
        return {"kind": "merged", "inner": experts_spec(experts.inner)}
    if isinstance(experts, QuantizedExperts):
        return {"kind": "quantized", "bits": experts.bits, "group_size": experts.group_size,
                "num_experts": experts.num_experts}  # fmt: skip
    if isinstance(experts, ResidualExperts):
        return {"kind": "residual", "num_experts": experts.num_experts, "method": experts.method,
                "sizes": experts.sizes, "barycentre": experts.barycentre}  # fmt: skip
    if type(experts) is FFNExperts:
        return {"kind": "ffn", "num_experts": experts.num_experts}
    raise ValueError(f"cannot save experts of kind {type(experts).__name__}")


def build_experts(config: MoEConfig, spec: dict[str, Any]) -> ExpertKind:
    """The (untrained) experts module ``spec`` describes (:func:`experts_spec`)."""
    kind = spec["kind"]
    if kind == "merged":
        return MergedExperts(config, build_experts(config, spec["inner"]))
    if kind == "quantized":
        return QuantizedExperts(config, spec["num_experts"], spec["bits"], spec["group_size"])
    if kind == "residual":
        return ResidualExperts(
            config, spec["num_experts"], spec["method"], spec["sizes"], spec["barycentre"]
        )
    if kind == "ffn":
        return FFNExperts(config, spec["num_experts"])
    raise ValueError(f"unknown compressed experts kind {kind!r}")


def router_spec(router: nn.Module) -> list[dict[str, Any]]:
    """The pass routers wrapped around a layer's router, innermost first."""
    chain = []
    while isinstance(router, RouterWrapper):
        if isinstance(router, DynamicPruneRouter):
            chain.append({"kind": "dynamic-prune", "beta": router.beta})
        elif isinstance(router, PrunedRouter):
            chain.append({"kind": "pruned"})
        else:
            raise ValueError(f"cannot save a router wrapped in {type(router).__name__}")
        router = router.inner
    return chain[::-1]


def wrap_router(router: nn.Module, chain: list[dict[str, Any]], num_experts: int) -> nn.Module:
    """``router`` wrapped as :func:`router_spec`'s ``chain`` records."""
    for entry in chain:
        if entry["kind"] == "dynamic-prune":
            router = DynamicPruneRouter(router, entry["beta"])
        else:
            router = PrunedRouter(router, num_experts)
    return router


def structure(model: nn.Module) -> list[dict[str, Any]]:
    """Per MoE layer, what the passes left: its experts' and its router's specs."""
    return [
        {"experts": experts_spec(layer.experts), "router": router_spec(layer.router)}
        for layer in moe_layers(model)
    ]


def rebuild(model: nn.Module, layout: list[dict[str, Any]]) -> nn.Module:
    """``model`` (as built from its config) given the :func:`structure` ``layout``."""
    layers = moe_layers(model)
    if len(layers) != len(layout):
        raise ValueError(
            f"the structure records {len(layout)} MoE layers; the model has {len(layers)}"
        )
    for layer, entry in zip(layers, layout, strict=True):
        layer.experts = build_experts(layer.config, entry["experts"])
        layer.router = wrap_router(layer.router, entry["router"], layer.config.num_experts)
    return model


def save_compressed_lm(
    model: TransformerLM,
    out: str | os.PathLike,
    *,
    passes: list,
    force: bool = False,
    run_meta: dict[str, Any] | None = None,
    tokenizer_file: Path | None = None,
) -> Path:
    """Write ``model`` as a compressed model directory ``out`` (staged, then put in place);
    ``passes`` (the ``(name, options)`` applied) are recorded, and so are the checkpoint record
    ``run_meta`` of the run it came from and a copy of its ``tokenizer_file``, if given.
    Returns the directory."""
    out = Path(out)
    check_model_target(out, force=force, what="compress target")
    metadata = {
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "model_config": json.dumps(model.live_config().to_dict()),
        "structure": json.dumps(structure(model)),
        "passes": json.dumps([[name, dict(options)] for name, options in passes]),
    }
    if run_meta is not None:
        metadata[RUN_META_KEY] = json.dumps(run_meta)
    tensors = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    with staged_model_directory(out, "xmoe compress") as staging:
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, staging / TOKENIZER_NAME)  # staged: no partial file
        save_verified(staging / WEIGHTS_NAME, tensors, metadata)
    return out


def _read(path: str | os.PathLike) -> tuple[TransformerLM, dict[str, str]]:
    tensors, metadata, _ = read_verified(Path(path) / WEIGHTS_NAME)
    config = ModelConfig.from_dict(json.loads(metadata["model_config"]))
    model = rebuild(TransformerLM(config), json.loads(metadata["structure"]))
    model.to(getattr(torch, metadata["dtype"]))  # the floating tensors; packed codes stay uint8
    model.load_state_dict(tensors)
    return model.eval(), metadata


def load_compressed_lm(path: str | os.PathLike) -> tuple[TransformerLM, list]:
    """``(model in eval mode, passes recorded)`` of a directory :func:`save_compressed_lm`
    wrote; its weights are verified."""
    model, metadata = _read(path)
    return model, json.loads(metadata["passes"])


def is_compressed_run(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory :func:`save_compressed_lm` wrote."""
    return (Path(path) / WEIGHTS_NAME).is_file()


def load_compressed_run(path: str | os.PathLike) -> tuple[TransformerLM, TrainConfig, dict]:
    """``(model in eval mode, TrainConfig, checkpoint record)`` of a compressed run directory,
    as :meth:`~xmoe.training.rundir.RunDir.load_model` gives them for a run (its tokenizer, if
    the run had one, is beside the weights).

    Raises:
        ValueError: the directory was written without the run's record (``run_meta``).
    """
    model, metadata = _read(path)
    if RUN_META_KEY not in metadata:
        raise ValueError(
            f"{path} was compressed without its run's record: it cannot be evaluated as a run "
            "(load it with xmoe.compression.load_compressed)"
        )
    meta = json.loads(metadata[RUN_META_KEY])
    return model, TrainConfig.from_dict(meta["train_config"]), meta
