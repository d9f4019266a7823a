"""Fused expert FFNs by name (:data:`xmoe.registry.EXPERT_FFN`), as transformers'
``ExpertsInterface`` names its experts implementations.

An implementation computes ``Σ_{pairs of s} weight · FFN_e(x_s)`` over a dispatch plan in one
call: its own gathers, matmuls and scatter, forward and backward. ``"xmoe"`` is the fused
autograd function of :mod:`xmoe.experts.ffn_function` over a grouped-matmul engine. A new one
(a fused Triton kernel) is an :class:`ExpertFFN` subclass in a file of its own, registered with
``@EXPERT_FFN.register("name")`` and listed in :data:`xmoe.registry.EXPERT_FFN` for a lazy
import: that makes it an ``MoEConfig.expert_ffn`` choice and a subject of the conformance tests
in ``tests/experts/test_fused.py``. ``"auto"`` (the default) picks one per call
(:func:`choose_expert_ffn`): an implementation whose :attr:`ExpertFFN.auto_devices` hold the
device and that supports the call (the Triton kernels on CUDA), else ``"xmoe"``; and ``"xmoe"``
whenever ``backend`` names one of its engines.

Shape legend: S tokens, N kept pairs, D d_model, H d_expert.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from xmoe.dispatch.plan import DispatchPlan
from xmoe.experts.weights import ExpertWeights
from xmoe.registry import EXPERT_FFN


class ExpertFFN:
    """What :func:`expert_ffn` asks of every implementation; subclasses add :meth:`forward`.

    Attributes:
        requirement: what :meth:`supports` asks of the operands, for the error raised when a
            named implementation cannot run them.
        auto_devices: the device types on which ``"auto"`` takes it when it supports the call
            (none: only by name).
    """

    requirement: ClassVar[str] = ""
    auto_devices: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def supports(
        cls,
        dtype: torch.dtype,
        device: torch.device,
        num_pairs: int,
        d_model: int,
        d_expert: int,
    ) -> bool:
        """Whether it computes operands of this dtype and device, at these sizes."""
        return True

    @staticmethod
    def forward(
        x_SD: torch.Tensor,
        weights: ExpertWeights,
        plan: DispatchPlan,
        weight_N: torch.Tensor,
        backend: str,
    ) -> torch.Tensor:
        """(S, D) weighted sum of expert outputs per token; ``backend`` is
        ``MoEConfig.backend`` (an engine name or ``"auto"``), for implementations that take one."""
        raise NotImplementedError


AUTO = "auto"
"""The ``expert_ffn`` that picks an implementation per call (:func:`choose_expert_ffn`)."""

FALLBACK = "xmoe"
"""What ``"auto"`` runs where no other implementation is preferred: any dtype, any device."""


def choose_expert_ffn(
    dtype: torch.dtype, device: torch.device, num_pairs: int, d_model: int, d_expert: int
) -> str:
    """The implementation ``"auto"`` runs for these operands: the first registered one whose
    ``auto_devices`` hold ``device``'s type and that supports the call, else :data:`FALLBACK`."""
    for name in EXPERT_FFN:
        ffn = EXPERT_FFN[name]
        if device.type in ffn.auto_devices and ffn.supports(
            dtype, device, num_pairs, d_model, d_expert
        ):
            return name
    return FALLBACK


def expert_ffn(
    x_SD: torch.Tensor,
    weights: ExpertWeights,
    plan: DispatchPlan,
    weight_N: torch.Tensor,
    impl: str = AUTO,
    backend: str = "auto",
) -> torch.Tensor:
    """Weighted sum of expert FFN outputs per token, by the implementation named ``impl``.

    Args:
        x_SD: (S, D) tokens, in the dtype of ``weights``. weights: the experts.
        plan: the grouped rows (N pairs). weight_N: (N,) routing weight per grouped row.
        impl: a name in :data:`xmoe.registry.EXPERT_FFN`, or :data:`AUTO` (with an engine
            named in ``backend``, ``"xmoe"`` on that engine).
        backend: ``"auto"`` or an engine name, passed on to the implementation.

    Returns:
        (S, D) ``Σ_{pairs of s} weight · FFN_e(x_s)``; tokens with no pair get zeros.
    """
    d_expert, d_model = weights.w2.shape[1], weights.w2.shape[2]
    if impl == AUTO and backend == "auto":
        impl = choose_expert_ffn(x_SD.dtype, x_SD.device, plan.num_pairs, d_model, d_expert)
    elif impl == AUTO:  # an engine named: xmoe's path runs on it
        impl = FALLBACK
    ffn = EXPERT_FFN[impl]
    if not ffn.supports(x_SD.dtype, x_SD.device, plan.num_pairs, d_model, d_expert):
        raise ValueError(
            f"expert_ffn={impl!r} cannot run dtype={x_SD.dtype} on {x_SD.device.type} with "
            f"widths {(d_model, d_expert)}: {ffn.requirement}; use expert_ffn='xmoe'"
        )
    return ffn.forward(x_SD, weights, plan, weight_N, backend)
