"""TrainConfig: one training run (model, data, optimizer, schedule, logging), validated."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from xmoe.config import (
    ConfigError,
    DictConfig,
    _is_int,
    _is_number,
    _require,
    _require_choice,
    _require_seed,
)
from xmoe.models.config import ModelConfig
from xmoe.registry import EXPERT_KINDS, ROUTERS

DATA_SOURCES = ("corpus", "synthetic")
"""``corpus``: Shakespeare + King James Bible with a BPE tokenizer (``xmoe.data``);
``synthetic``: a small learnable Markov stream, no download (tests, the ``tiny`` preset)."""

PRECISIONS = ("fp32", "bf16")

DEVICES = ("auto", "cpu", "cuda")
"""Where training runs: ``auto`` is CUDA when a GPU is present, else the CPU."""

MAX_GRAD_ACCUM_STEPS = 4096
"""Micro-batches per optimizer step at most: the progress bar moves once per step, so a larger
count (a typo of an extra zero or three) would run for hours without a word."""


@dataclass(frozen=True)
class TrainConfig(DictConfig):
    """Everything a run needs besides its output directory.

    Frozen like :class:`~xmoe.MoEConfig`: change it with ``dataclasses.replace`` (or
    :func:`apply_overrides`), which validates the result.

    Args:
        model: the :class:`~xmoe.models.ModelConfig`.
        data: one of :data:`DATA_SOURCES`; for ``corpus``, ``model.vocab_size`` is the BPE size.
        batch_size: sequences per micro-batch. seq_len: tokens per sequence (≤ max_seq_len).
        grad_accum_steps: micro-batches per optimizer step, at most :data:`MAX_GRAD_ACCUM_STEPS`.
        max_steps: optimizer steps; the cosine schedule ends here.
        lr: peak learning rate; min_lr_ratio: final lr / peak lr.
        warmup_fraction: share of max_steps with a linear warmup.
        weight_decay: AdamW decay of matrices (norms, biases and embeddings are not decayed).
        beta1, beta2: AdamW betas. grad_clip: max global gradient norm (0 disables clipping).
        precision: ``fp32``, or ``bf16`` autocast.
        device: one of :data:`DEVICES`. Checkpoints hold CPU tensors, so a run trained on one
            device resumes and evaluates on another (the field is not compared on resume).
        eval_interval: steps between evaluations (and at the end); eval_batches: batches of
            validation windows per evaluation (0 = the whole validation split).
        checkpoint_interval: steps between checkpoints (and at the end).
        log_interval: steps between training-metric log lines.
        seed: seeds initialisation (torch) and the batch order (a separate generator).
        preset: the name of the preset the run came from (a label; ``custom`` otherwise).
    """

    model: ModelConfig
    data: str = "corpus"
    batch_size: int = 32
    seq_len: int = 128
    grad_accum_steps: int = 1
    max_steps: int = 1000
    lr: float = 2e-3
    min_lr_ratio: float = 0.01
    warmup_fraction: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    precision: str = "fp32"
    device: str = "auto"
    eval_interval: int = 200
    eval_batches: int = 0
    checkpoint_interval: int = 200
    log_interval: int = 10
    seed: int = 0
    preset: str = "custom"

    def __post_init__(self) -> None:
        if isinstance(self.model, Mapping):
            object.__setattr__(self, "model", ModelConfig.from_dict(self.model))  # frozen
        _require(
            isinstance(self.model, ModelConfig),
            "model",
            self.model,
            "a ModelConfig or a dict of ModelConfig fields",
        )
        _require_choice("data", self.data, DATA_SOURCES)
        for name in ("batch_size", "seq_len", "max_steps"):
            value = getattr(self, name)
            _require(_is_int(value) and value > 0, name, value, "a positive integer")
        _require(
            _is_int(self.grad_accum_steps) and 1 <= self.grad_accum_steps <= MAX_GRAD_ACCUM_STEPS,
            "grad_accum_steps",
            self.grad_accum_steps,
            f"an integer in [1, {MAX_GRAD_ACCUM_STEPS}]",
        )
        for name in ("eval_interval", "checkpoint_interval", "log_interval"):
            value = getattr(self, name)
            _require(_is_int(value) and value > 0, name, value, "a positive integer")
        _require(
            _is_int(self.eval_batches) and self.eval_batches >= 0,
            "eval_batches",
            self.eval_batches,
            "an integer >= 0",
        )
        _require(
            self.seq_len <= self.model.max_seq_len,
            "seq_len",
            self.seq_len,
            f"at most model.max_seq_len={self.model.max_seq_len}",
        )
        _require_seed("seed", self.seed)
        _require(_is_number(self.lr) and self.lr > 0, "lr", self.lr, "a finite number > 0")
        _require(
            _is_number(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1,
            "min_lr_ratio",
            self.min_lr_ratio,
            "a number in [0, 1]",
        )
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            _require(_is_number(value) and 0 <= value < 1, name, value, "a number in [0, 1)")
        _require(
            _is_number(self.warmup_fraction) and 0 <= self.warmup_fraction < 1,
            "warmup_fraction",
            self.warmup_fraction,
            "a number in [0, 1)",
        )
        for name in ("weight_decay", "grad_clip"):
            value = getattr(self, name)
            _require(_is_number(value) and value >= 0, name, value, "a finite number >= 0")
        _require_choice("precision", self.precision, PRECISIONS)
        _require_choice("device", self.device, DEVICES)
        _require(isinstance(self.preset, str), "preset", self.preset, "a str")

    @property
    def clip_norm(self) -> float:
        """The ``max_norm`` a training step clips the gradient to: ``grad_clip``, or infinity
        (measure the norm, clip nothing) when ``grad_clip`` is 0."""
        return self.grad_clip if self.grad_clip > 0 else float("inf")

    def resolve_device(self):
        """The ``torch.device`` this config trains on; ``cuda`` without a GPU is an error."""
        import torch

        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device='cuda' is invalid here: no CUDA device is available")
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.grad_accum_steps


def _parse_value(text: str, current: Any) -> Any:
    lowered = text.strip().lower()
    if lowered in ("none", "null"):
        return None
    if isinstance(current, bool):
        if lowered not in ("true", "false", "1", "0"):
            raise ConfigError(f"expected true or false, got {text!r}")
        return lowered in ("true", "1")
    if isinstance(current, int):
        return int(text)
    if isinstance(current, float) or current is None:
        try:
            return int(text) if lowered.lstrip("-").isdigit() else float(text)
        except ValueError:
            return text
    return text


def apply_overrides(config: TrainConfig, overrides: list[str]) -> TrainConfig:
    """A validated copy of ``config`` with ``key=value`` overrides applied.

    Keys name TrainConfig fields (``lr=1e-3``), model fields (``model.d_model=256``), MoE
    fields (``moe.threshold=0.8``, short for ``model.moe.threshold``) or router options
    (``moe.router_options.logit_scale=3.7``). Values are parsed to the type of the field they
    replace; ``none`` gives None. Changing ``moe.router`` resets the router options to the new
    router's defaults, and ``moe.experts`` the expert options to the new kind's.
    """
    values = config.to_dict()
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is invalid: expected KEY=VALUE")
        path = key.strip().split(".")
        if path[0] == "moe":
            path = ["model", *path]
        target = values
        for part in path[:-1]:
            if not isinstance(target.get(part), dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a config section here")
            target = target[part]
        leaf = path[-1]
        if leaf not in target:
            raise ConfigError(
                f"override {item!r}: unknown field {leaf!r}; known fields: {sorted(target)}"
            )
        try:
            target[leaf] = _parse_value(text, target[leaf])
        except ValueError as error:
            raise ConfigError(f"override {item!r}: {error}") from None
        if path[-2:] == ["moe", "router"] and target[leaf] in ROUTERS:
            # another router has other options: start from its defaults (later keys may set them)
            target["router_options"] = ROUTERS[target[leaf]].Options().to_dict()
        if path[-2:] == ["moe", "experts"] and target[leaf] in EXPERT_KINDS:
            target["expert_options"] = EXPERT_KINDS[target[leaf]].Options().to_dict()
    return TrainConfig.from_dict(values)
