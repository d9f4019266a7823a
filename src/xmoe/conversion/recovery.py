"""Recovery fine-tune of a sparsified model: routers (and experts), or in the neurons mode the
MLP weights under their fixed masks, trained end to end on text.

After conversion every layer's top-k (or threshold) selection drops some of the dense FFN; a
short fine-tune lets the remaining experts and the routers compensate. The loss is the KL
divergence to the dense teacher's next-token distribution (distillation, ``distill=1``), the
language-model cross-entropy (``distill=0``), or a mix. Only the SparseMLP parameters train
(routers, plus the experts unless ``train_experts=False``); attention, norms and embeddings stay
frozen. The router learns through the combine weights (see
:meth:`~xmoe.routing.dense_split.DenseSplitRouter.combine_weights`). A neurons-mode model
(:class:`~xmoe.conversion.NeuronMLP`) trains its gate, up and down weights with its calibrated
masks in the forward pass and the straight-through estimator in the backward pass; its thresholds
and scales are buffers and stay as calibrated.

Checkpoints reuse xmoe's verified, atomic format (:mod:`xmoe.training.checkpoint`): the
trainable tensors, the AdamW state, the step and the RNG state, written every
``checkpoint_every`` steps and at the end; ``recover(..., checkpoint=path)`` resumes from it and
gives the same losses, bit for bit, as an uninterrupted run (batches are a pure function of the
step).

Shape legend: B windows per step, T tokens per window, V vocabulary.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from xmoe.config import DictConfig, _is_int, _is_number, _require, _require_seed
from xmoe.conversion.neuron_mlp import neuron_mlps
from xmoe.conversion.sparse_mlp import upgraded_name
from xmoe.conversion.sparsify import sparse_mlps
from xmoe.training.step import StepLoss, train_step

CHECKPOINT_KIND = "xmoe-sparsify-recovery"


@dataclass(frozen=True)
class RecoveryConfig(DictConfig):
    """Settings of a recovery fine-tune.

    Args:
        tokens: the token budget, at least one step's ``batch_size · seq_len``; the run takes
            ``ceil(tokens / (batch_size · seq_len))`` steps.
        batch_size, seq_len: windows per step and tokens per window.
        lr: AdamW learning rate of the experts (the neurons mode's MLP weights).
        router_lr: AdamW learning rate of the routers.
        train_experts: train the experts too (else routers only; the neurons mode, which has
            no routers, needs it).
        distill: weight of the distillation loss (KL to the teacher); ``1 - distill`` weighs the
            LM cross-entropy. Needs a teacher when > 0.
        checkpoint_every: steps between checkpoints (when a checkpoint path is given).
        seed: orders the training windows.
    """

    tokens: int = 16384
    batch_size: int = 4
    seq_len: int = 128
    lr: float = 1e-4
    router_lr: float = 1e-3
    train_experts: bool = True
    distill: float = 1.0
    checkpoint_every: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("tokens", "batch_size", "seq_len", "checkpoint_every"):
            value = getattr(self, name)
            _require(_is_int(value) and value >= 1, name, value, "an int >= 1")
        for name in ("lr", "router_lr"):
            value = getattr(self, name)
            _require(_is_number(value) and value > 0, name, value, "a number > 0")
        _require(
            _is_number(self.distill) and 0 <= self.distill <= 1,
            "distill",
            self.distill,
            "a number in [0, 1]",
        )
        _require(
            isinstance(self.train_experts, bool),
            "train_experts",
            self.train_experts,
            "a bool",
        )
        _require_seed("seed", self.seed)
        step_tokens = self.batch_size * self.seq_len
        _require(
            self.tokens >= step_tokens,
            "tokens",
            self.tokens,
            f"at least one step of batch_size·seq_len = {step_tokens} tokens",
        )

    @property
    def steps(self) -> int:
        return math.ceil(self.tokens / (self.batch_size * self.seq_len))


@dataclass
class RecoveryResult:
    """``losses``: the training loss of every step (resumed steps included, read back from the
    checkpoint); ``steps``: steps run in all; ``resumed_from``: the step a checkpoint gave."""

    losses: list[float] = field(default_factory=list)
    steps: int = 0
    resumed_from: int = 0


def trainable_parameters(model: nn.Module, train_experts: bool) -> dict[str, nn.Parameter]:
    """The parameters a recovery trains, by name: the SparseMLPs' routers (and experts with
    ``train_experts``), or the NeuronMLPs' gate, up and down weights; every other parameter of
    ``model`` gets ``requires_grad=False``.

    Raises:
        ValueError: ``model`` has neither kind of MLP, or is in the neurons mode without
            ``train_experts`` (it has no routers to train alone).
    """
    wanted = {id(p) for p in _sparse_parameters(model, train_experts)}
    chosen = {}
    for name, parameter in model.named_parameters():
        keep = id(parameter) in wanted
        parameter.requires_grad_(keep)
        if keep:
            chosen[name] = parameter
    return chosen


def _sparse_parameters(model: nn.Module, train_experts: bool) -> list[nn.Parameter]:
    """The sparse MLPs' parameters a recovery trains (see :func:`trainable_parameters`)."""
    neurons = neuron_mlps(model)
    if neurons:
        if not train_experts:
            raise ValueError(
                "train_experts=False is invalid for a neurons-mode model: it has no routers; "
                "its recovery trains the MLP weights"
            )
        return [
            p for m in neurons for p in (m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight)
        ]
    modules = sparse_mlps(model)
    if not modules:
        raise ValueError(
            f"{type(model).__name__} has no SparseMLP or NeuronMLP: convert it with sparsify()"
        )
    if not train_experts:
        return [m.router.weight for m in modules]
    return [p for m in modules for p in (m.router.weight, m.w_gate_up, m.w_down)]


def recovery_loss(
    logits_BTV: torch.Tensor,
    ids_BT: torch.Tensor,
    teacher_logits_BTV: torch.Tensor | None,
    distill: float,
) -> torch.Tensor:
    """``distill · KL(teacher ‖ student) + (1 - distill) · CE`` per predicted token (the last
    position of each window predicts nothing)."""
    student = logits_BTV[:, :-1].float().reshape(-1, logits_BTV.shape[-1])
    loss = student.new_zeros(())
    if distill < 1:
        loss = loss + (1 - distill) * F.cross_entropy(student, ids_BT[:, 1:].reshape(-1))
    if distill > 0:
        if teacher_logits_BTV is None:
            raise ValueError(f"distill={distill} needs a teacher model")
        teacher = teacher_logits_BTV[:, :-1].float().reshape(-1, logits_BTV.shape[-1])
        kl = F.kl_div(
            F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True,
            reduction="batchmean",
        )  # fmt: skip
        loss = loss + distill * kl
    return loss


def _step_loss(
    model: nn.Module, teacher: nn.Module | None, distill: float, ids_BT: torch.Tensor
) -> StepLoss:
    """The recovery loss of one batch, the teacher's logits taken without gradients."""
    teacher_logits = None
    if distill > 0:
        with torch.no_grad():
            teacher_logits = teacher(input_ids=ids_BT, use_cache=False).logits
    logits = model(input_ids=ids_BT, use_cache=False).logits
    return StepLoss(recovery_loss(logits, ids_BT, teacher_logits, distill))


def window_order(num_windows: int, seed: int) -> torch.Tensor:
    """(num_windows,) the fixed order the run reads the training windows in."""
    return torch.randperm(num_windows, generator=torch.Generator().manual_seed(seed))


def _batch(windows_BT: torch.Tensor, order: torch.Tensor, step: int, size: int) -> torch.Tensor:
    """The windows of ``step``: the next ``size`` of ``order``, wrapping around."""
    start = step * size
    index = order[torch.arange(start, start + size) % order.numel()]
    return windows_BT[index]


def _save(
    path: Path,
    params: dict[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
    step: int,
    losses: list[float],
    config: RecoveryConfig,
    key: dict | None,
) -> None:
    from xmoe.training.checkpoint import Checkpoint, save_checkpoint

    meta = {"kind": CHECKPOINT_KIND, "step": step, "losses": losses, "config": config.to_dict()}
    if key is not None:
        meta["key"] = key
    state = {name: p.detach() for name, p in params.items()}
    rng = {"torch": torch.get_rng_state()}
    save_checkpoint(path, Checkpoint(state, optimizer.state_dict(), rng, meta))


def _load(
    path: Path,
    params: dict[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
    config: RecoveryConfig,
    key: dict | None,
    shorter: bool = False,
) -> tuple[int, list[float]]:
    """Load the checkpoint at ``path`` into ``params`` and ``optimizer``; returns its step and
    losses. ``shorter``: it may come from a run with a smaller token budget, equal otherwise."""
    from xmoe.training.checkpoint import CheckpointError, load_checkpoint

    checkpoint = load_checkpoint(path)
    meta = checkpoint.meta
    if meta.get("kind") != CHECKPOINT_KIND:
        raise CheckpointError(f"{path} is not a recovery checkpoint (kind={meta.get('kind')!r})")
    theirs, ours = dict(meta.get("config") or {}), config.to_dict()
    if shorter and theirs.get("tokens", math.inf) <= ours["tokens"]:
        theirs["tokens"] = ours["tokens"]  # a prefix of this run
    if theirs != ours:
        raise CheckpointError(
            f"{path} was written with another recovery config {meta.get('config')}; "
            f"this run has {config.to_dict()} (delete it to start over)"
        )
    if meta.get("key") != key:
        raise CheckpointError(
            f"{path} was written for another conversion {meta.get('key')}; this run is "
            f"{key} (delete it to start over)"
        )
    # a checkpoint written before SparseMLP was an MoELayer names its experts the old way
    state = {upgraded_name(name): tensor for name, tensor in checkpoint.model_state.items()}
    if set(state) != set(params):
        raise CheckpointError(f"{path} holds other tensors than this model's trainable ones")
    with torch.no_grad():
        for name, parameter in params.items():
            parameter.copy_(state[name])
    optimizer.load_state_dict(checkpoint.optimizer_state)
    torch.set_rng_state(checkpoint.rng_state["torch"])
    return int(meta["step"]), list(meta["losses"])


def recover(
    model: nn.Module,
    windows_BT: torch.Tensor,
    config: RecoveryConfig,
    teacher: nn.Module | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    progress: bool = True,
    desc: str = "recovery",
    stop_after: int | None = None,
    key: dict | None = None,
    extends: str | os.PathLike[str] | None = None,
) -> RecoveryResult:
    """Fine-tune ``model``'s SparseMLPs (or NeuronMLPs) in place; leaves it in ``eval`` mode.

    Args:
        model: a sparsified causal LM (its selection rule during training is its current one;
            a neurons-mode model's masks are its calibrated thresholds, fixed).
        windows_BT: (B, T≥seq_len) int64 training token ids; each step reads ``batch_size`` of
            them (the first ``seq_len`` tokens), in a fixed order seeded by ``config.seed``.
        teacher: the dense model (needed when ``config.distill > 0``), frozen: the model
            ``sparsify`` converted (its weights, unlike the student's, stay as they were).
        checkpoint: a file to write checkpoints to and resume from (None: none).
        stop_after: end (with a checkpoint) once this many steps are done in all, before the
            budget; a later call resumes (for time-sliced runs).
        key: JSON values naming what the checkpoint belongs to beyond ``config`` (the model and
            conversion it trains), saved with it; a checkpoint of another key is refused.
        extends: a checkpoint of this same run under a smaller token budget (its config equal
            but for ``tokens``), the start when ``checkpoint`` holds none yet. It is exact: the
            learning rate is constant and the windows come in one seeded order, so a shorter
            budget's run is the first steps of a longer one's. It is only read.

    Raises:
        DivergenceError: a non-finite loss or gradient norm (before the update that would
            spread it).
        CheckpointError: the checkpoint is damaged beyond its fallback or from another config.
    """
    if windows_BT.dim() != 2 or windows_BT.shape[1] < config.seq_len:
        raise ValueError(
            f"recovery windows must be (B, T>={config.seq_len}), got {tuple(windows_BT.shape)}"
        )
    if config.distill > 0 and teacher is None:
        raise ValueError(f"distill={config.distill} needs the dense teacher model")
    params = trainable_parameters(model, config.train_experts)
    routers = [p for name, p in params.items() if name.endswith("router.weight")]
    experts = [p for name, p in params.items() if not name.endswith("router.weight")]
    groups = [{"params": routers, "lr": config.router_lr}, {"params": experts, "lr": config.lr}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.0)
    path = Path(checkpoint) if checkpoint is not None else None
    start, losses = 0, []
    if path is not None and path.is_file():
        start, losses = _load(path, params, optimizer, config, key)
    elif extends is not None:
        start, losses = _load(Path(extends), params, optimizer, config, key, shorter=True)
    result = RecoveryResult(losses, start, start)
    order = window_order(windows_BT.shape[0], config.seed)
    device = next(model.parameters()).device
    if teacher is not None:
        teacher.eval()
    model.train()
    bar = tqdm(
        range(start, config.steps), desc=desc, disable=not progress, initial=start,
        total=config.steps,
    )  # fmt: skip
    try:
        for step in bar:
            ids_BT = _batch(windows_BT, order, step, config.batch_size)[:, : config.seq_len]
            ids_BT = ids_BT.to(device)
            stats = train_step(
                model, optimizer, [ids_BT], partial(_step_loss, model, teacher, config.distill),
                what=f"recovery step {step}",
            )  # fmt: skip
            losses.append(stats.loss)
            result.steps = step + 1
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            done = step + 1 == config.steps or step + 1 == stop_after
            if path is not None and ((step + 1) % config.checkpoint_every == 0 or done):
                _save(path, params, optimizer, step + 1, losses, config, key)
            if done:
                break
    finally:
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(True)
    result.losses = losses
    return result
