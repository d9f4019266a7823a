"""One optimizer step, shared by the trainer and the sparsify recovery fine-tune: the losses of
the micro-batches, backward, the parallel reductions, clipping, the divergence check, the update."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import nn

from xmoe.models.loss import paired_cross_entropy_and_kl
from xmoe.routing import RoutingStats

Batch = TypeVar("Batch")


class DivergenceError(RuntimeError):
    """The loss or the gradient norm became NaN or inf; nothing was saved from that step on."""


class SingleProcess:
    """The trainer's parallel hooks for one process: every hook is the plain single-process
    operation. :class:`xmoe.distributed.training.ExpertParallelTraining` is the N-rank version."""

    is_main = True
    world_size = 1

    def agree(self, step, what: str = "setup"):
        return step()

    def check_config(self, config) -> None:
        pass

    def prepare(self, model: nn.Module) -> None:
        pass

    def owns_micro_batch(self, index: int, total: int) -> bool:
        return True

    def load_model_state(self, model, state) -> None:
        model.load_state_dict(state)

    def load_optimizer_state(self, optimizer, model, state) -> None:
        optimizer.load_state_dict(state)

    def reduce_gradients(self, model) -> None:
        pass

    def clip_grad_norm(self, model, max_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))

    def sum_values(self, values: list[float]) -> list[float]:
        return values

    def from_last_micro_batch(self, value, total: int):
        return value

    def nonfinite_parameters(self, model) -> list[str]:
        return [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]

    def full_state(self, model, optimizer):
        return model.state_dict(), optimizer.state_dict()

    def end_training_step(self, model) -> None:
        model.end_training_step()


@dataclass
class StepLoss:
    """What a loss function gives for one micro-batch: the objective ``loss``, an optional
    ``aux_loss`` added to it for backward (router losses), its named parts, and the routing
    statistics of the forward (for the log)."""

    loss: torch.Tensor
    aux_loss: torch.Tensor | None = None
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    routing: list[RoutingStats] = field(default_factory=list)


def lm_step_loss(model: nn.Module, input_ids: torch.Tensor, targets: torch.Tensor) -> StepLoss:
    """The :class:`StepLoss` of a language model (:class:`xmoe.models.TransformerLM`) on one
    micro-batch: its cross-entropy, router losses and routing statistics.

    When the routers ask for a consistency loss (``Router.consistency_coef`` α > 0, THOR), the
    micro-batch runs twice (each pass draws its own random experts) and the loss is half of
    THOR's objective ``CE₁ + CE₂ + α · ½[KL(p₁‖p₂) + KL(p₂‖p₁)]``: the mean of the two
    cross-entropies (so the logged loss stays one cross-entropy) plus the ``consistency`` aux
    loss ``α/2 · ½[KL + KL]``. Routing statistics are the first pass's. Neither path
    materialises the (B, T, V) logits (:mod:`xmoe.models.loss`)."""
    coef = max((layer.router.consistency_coef() for layer in model.moe_layers), default=0.0)
    if coef == 0:
        out = model(input_ids, targets, return_logits=False)
        return StepLoss(out.loss, out.aux_loss, out.aux_losses, out.routing)
    out, second = model.run_backbone(input_ids), model.run_backbone(input_ids)
    hidden = (o.last_hidden_state.flatten(0, 1) for o in (out, second))
    ce_a, ce_b, kl = paired_cross_entropy_and_kl(*hidden, model.output_weight(), targets.flatten())
    consistency = 0.5 * coef * kl
    aux_losses = {
        name: (out.aux_losses[name] + value) / 2 for name, value in second.aux_losses.items()
    }
    aux_losses["consistency"] = consistency
    aux_loss = (out.aux_loss + second.aux_loss) / 2 + consistency
    return StepLoss((ce_a + ce_b) / 2, aux_loss, aux_losses, out.routing)


@dataclass
class StepStats:
    """One step's metrics, as floats summed over the micro-batches (and the ranks), each
    micro-batch weighted ``1 / accumulation``; ``routing`` is the last micro-batch's."""

    loss: float
    aux_loss: float
    aux_losses: dict[str, float]
    grad_norm: float
    routing: list[RoutingStats]


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Iterable[Batch],
    loss_of: Callable[[Batch], StepLoss],
    *,
    accumulation: int = 1,
    max_norm: float = math.inf,
    parallel: SingleProcess | None = None,
    what: str = "step",
) -> StepStats:
    """Accumulate the gradients of ``loss_of(batch) / accumulation`` over ``micro_batches``,
    reduce them over the ranks of ``parallel``, clip them to ``max_norm`` (inf: only measure the
    norm) and update ``model`` with ``optimizer``.

    ``accumulation`` is the number of micro-batches of the whole step, over all ranks (a rank
    gives only its own in ``micro_batches``). ``what`` names the step in the error.

    Raises:
        DivergenceError: a non-finite loss, aux loss or gradient norm, before the update.
    """
    par = parallel if parallel is not None else SingleProcess()
    optimizer.zero_grad(set_to_none=True)
    loss_sum = aux_sum = 0.0
    named_aux: dict[str, float] = {}
    routing: list[RoutingStats] = []
    for batch in micro_batches:
        parts = loss_of(batch)
        total = parts.loss if parts.aux_loss is None else parts.loss + parts.aux_loss
        (total / accumulation).backward()
        loss_sum += parts.loss.item() / accumulation
        if parts.aux_loss is not None:
            aux_sum += parts.aux_loss.item() / accumulation
        for name, value in parts.aux_losses.items():
            named_aux[name] = named_aux.get(name, 0.0) + value.item() / accumulation
        routing = parts.routing
    if par.world_size > 1:  # step totals over the ranks (in a fixed key order)
        names = sorted(named_aux)
        loss_sum, aux_sum, *named = par.sum_values(
            [loss_sum, aux_sum, *(named_aux[n] for n in names)]
        )
        named_aux = dict(zip(names, named, strict=True))
        par.reduce_gradients(model)
    grad_norm = par.clip_grad_norm(model, max_norm)
    if not all(map(math.isfinite, (loss_sum, aux_sum, grad_norm))):
        raise DivergenceError(
            f"{what}: loss {loss_sum}, aux loss {aux_sum}, gradient norm {grad_norm}; stopped "
            "before the update, nothing saved past the last checkpoint (lower lr, or check the "
            "data and init)"
        )
    optimizer.step()
    return StepStats(loss_sum, aux_sum, named_aux, grad_norm, routing)
