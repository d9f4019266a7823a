"""Grouped-matmul engines: how each expert's segment of rows meets that expert's matrix.

Every engine offers the two products an expert FFN needs, forward and backward:

* ``mm(a_NK, b_EKM, plan) -> (N, M)``: row n of ``a`` times ``b[expert(n)]``;
* ``wgrad(a_NK, g_NM, plan, out_EKM=None) -> (E, K, M)``: ``Σ_{n in e} a_nᵀ g_n`` per expert
  (zeros if empty), written into ``out_EKM`` when given (a slice of a full gradient, so chunked
  backwards need no second copy).

Engines never index a stacked weight under autograd: they are called from inside the expert
FFN's hand-written ``autograd.Function``.

A new engine is an :class:`Engine` subclass in a file of its own, registered with
``@ENGINES.register("name")`` (and listed in :data:`xmoe.registry.ENGINES` for a lazy import):
that makes it a ``MoEConfig.backend`` choice, a candidate for ``auto``, and a subject of the
conformance tests in ``tests/dispatch/test_engines.py``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from xmoe.dispatch.plan import DispatchPlan
from xmoe.registry import ENGINES

BATCHED_MAX_WEIGHT_ELEMENTS = 1 << 19
"""While pairs x d_model x d_expert stays within this, gathering one weight copy per pair and a
``bmm`` beats walking all E groups (perf_notes §2.2: decode-sized batches). Measured on 2 CPU
threads at d_model=512, d_expert=128: batched wins up to 8 pairs, grouped from 16."""


def batched_max_pairs(d_model: int, d_expert: int) -> int:
    """The most pairs for which ``auto`` picks :class:`BatchedEngine` (and for which the layer
    leaves pairs unsorted, since that engine needs no grouping)."""
    return BATCHED_MAX_WEIGHT_ELEMENTS // (d_model * d_expert)


class Engine:
    """What ``choose_engine`` asks of every engine; subclasses add ``mm`` and ``wgrad``.

    Attributes:
        priority: ``auto`` takes the highest-priority engine that supports the call.
        runs_unsorted: whether it runs a plan whose rows are not sorted by expert.
        requirement: what :meth:`runs` asks of the operands, for the error an explicit backend
            that cannot run them raises.
    """

    priority: ClassVar[int] = 0
    runs_unsorted: ClassVar[bool] = False
    requirement: ClassVar[str] = ""

    @classmethod
    def runs(cls, dtype: torch.dtype, device: torch.device, d_model: int, d_expert: int) -> bool:
        """Whether it computes operands of this dtype and device, with these widths, at all."""
        return True

    @classmethod
    def supports(
        cls,
        dtype: torch.dtype,
        device: torch.device,
        num_pairs: int,
        d_model: int,
        d_expert: int,
    ) -> bool:
        """Whether ``auto`` may choose it for this call: it :meth:`runs` the operands and is
        worth choosing at this size."""
        return cls.runs(dtype, device, d_model, d_expert)


@ENGINES.register("loop")
class LoopEngine(Engine):
    """One ``torch.mm`` per non-empty expert. Any dtype and size; the readable reference, and
    ``auto``'s last resort."""

    @staticmethod
    def mm(a_NK: torch.Tensor, b_EKM: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        out_NM = a_NK.new_empty(a_NK.shape[0], b_EKM.shape[2])
        for expert, start, end in plan.segments:
            torch.mm(a_NK[start:end], b_EKM[expert], out=out_NM[start:end])
        return out_NM

    @staticmethod
    def wgrad(
        a_NK: torch.Tensor,
        g_NM: torch.Tensor,
        plan: DispatchPlan,
        out_EKM: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if out_EKM is None:
            out_EKM = a_NK.new_empty(plan.num_experts, a_NK.shape[1], g_NM.shape[1])
        empty = set(range(plan.num_experts))
        for expert, start, end in plan.segments:
            torch.mm(a_NK[start:end].t(), g_NM[start:end], out=out_EKM[expert])
            empty.discard(expert)
        for expert in empty:
            out_EKM[expert].zero_()
        return out_EKM


@ENGINES.register("grouped")
class GroupedEngine(Engine):
    """``torch.nn.functional.grouped_mm`` (a C++ loop on CPU, CUTLASS on SM90 GPUs)."""

    priority = 10
    requirement = (
        "grouped_mm needs fp32/bf16/fp16 (bf16 on CUDA) and widths whose rows are a multiple "
        "of 16 bytes"
    )

    @classmethod
    def runs(cls, dtype: torch.dtype, device: torch.device, d_model: int, d_expert: int) -> bool:
        return grouped_supported(dtype, device, d_model, d_expert)

    @staticmethod
    def mm(a_NK: torch.Tensor, b_EKM: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        return F.grouped_mm(a_NK, b_EKM, offs=plan.offsets_E)

    @staticmethod
    def wgrad(
        a_NK: torch.Tensor,
        g_NM: torch.Tensor,
        plan: DispatchPlan,
        out_EKM: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if out_EKM is not None and plan.host_segments:
            # the same per-expert products grouped_mm runs on CPU, written in place
            return LoopEngine.wgrad(a_NK, g_NM, plan, out_EKM)
        return _into(F.grouped_mm(a_NK.t(), g_NM, offs=plan.offsets_E), out_EKM)


@ENGINES.register("batched")
class BatchedEngine(Engine):
    """Per-pair weight gather plus ``bmm``: cheapest for a handful of pairs (decode). The only
    engine that runs a plan not sorted by expert. Any dtype; ``auto`` takes it up to
    :func:`batched_max_pairs`, whatever the dtype and device.

    Its weight gradient sums per-pair outer products into the experts: (N, K, M) elements, no
    more than the forward's weight gather, and no host read of the plan."""

    priority = 20
    runs_unsorted = True

    @classmethod
    def supports(
        cls,
        dtype: torch.dtype,
        device: torch.device,
        num_pairs: int,
        d_model: int,
        d_expert: int,
    ) -> bool:
        return num_pairs <= batched_max_pairs(d_model, d_expert)

    @staticmethod
    def mm(a_NK: torch.Tensor, b_EKM: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        b_NKM = b_EKM.index_select(0, plan.expert_idx_N)
        return torch.bmm(a_NK.unsqueeze(1), b_NKM).squeeze(1)

    @staticmethod
    def wgrad(
        a_NK: torch.Tensor,
        g_NM: torch.Tensor,
        plan: DispatchPlan,
        out_EKM: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # products and sums in fp32 or wider, as a matmul accumulates, not in bf16
        dtype = torch.promote_types(a_NK.dtype, torch.float32)
        outer_NKM = a_NK.to(dtype).unsqueeze(2) * g_NM.to(dtype).unsqueeze(1)
        sum_EKM = outer_NKM.new_zeros(plan.num_experts, a_NK.shape[1], g_NM.shape[1])
        sum_EKM.index_add_(0, plan.expert_idx_N, outer_NKM)
        return _into(sum_EKM.to(a_NK.dtype), out_EKM)


def _into(result: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    return result if out is None else out.copy_(result)


_GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def grouped_supported(dtype: torch.dtype, device: torch.device, *dims: int) -> bool:
    """Whether ``F.grouped_mm`` accepts these operands: fp32/bf16/fp16, 16-byte row strides,
    and on CUDA only bf16 (its documented fast path)."""
    if dtype not in _GROUPED_DTYPES:
        return False
    if device.type == "cuda" and dtype != torch.bfloat16:
        return False
    return all(dim * dtype.itemsize % 16 == 0 for dim in dims)


def choose_engine(
    backend: str,
    dtype: torch.dtype,
    device: torch.device,
    num_pairs: int,
    d_model: int,
    d_expert: int,
) -> type[Engine]:
    """The engine for one call.

    Args:
        backend: ``"auto"`` (the highest-priority registered engine that supports the call), or
            a name in :data:`ENGINES`: an engine that cannot run the operands raises instead of
            silently running something else.
        dtype, device: of the operands.
        num_pairs: N, the kept pairs of this call.
        d_model, d_expert: the matrix widths.
    """
    if backend == "auto":
        # highest priority first; sorted() is stable, so a tie goes to the name first in order
        engines = sorted((ENGINES[name] for name in ENGINES), key=lambda e: -e.priority)
        return next(e for e in engines if e.supports(dtype, device, num_pairs, d_model, d_expert))
    engine = ENGINES[backend]
    if not engine.runs(dtype, device, d_model, d_expert):
        raise ValueError(
            f"backend={backend!r} cannot run dtype={dtype} on {device.type} with widths "
            f"{(d_model, d_expert)}: {engine.requirement}; use backend='auto' or 'loop'"
        )
    return engine
