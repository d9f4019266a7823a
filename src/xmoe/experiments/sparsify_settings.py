"""The settings of ``xmoe sparsify-grid``: :class:`EvalSettings` (the grid, the budgets, where
it writes), validated on construction, the router kinds and the neurons-mode methods the grid
measures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xmoe.conversion.config import PARTITIONS
from xmoe.conversion.recovery import RecoveryConfig

DOMAINS = ("shakespeare", "kjv")
"""The corpus's domains: every model is measured on each one's held-out works / books, and
calibrated and recovered on windows of both training splits."""
DOMAIN_NAMES = {"shakespeare": "Shakespeare", "kjv": "KJV"}
"""Each domain as the report and its figure name it."""

GRID_MODES = ("neurons", "experts")
"""The conversions a grid measures: ``neurons`` (the neurons mode's cells and their recoveries)
and ``experts`` (the expert groups, their recoveries and the XMoE route)."""

GRID_ROUTERS = ("trained", "oracle")
"""``trained``: the learned router fit on calibration states. ``oracle``: the true expert output
norms (no router)."""


NEURON_METHODS: dict[str, dict[str, Any]] = {
    "teal": {"scoring": "teal", "allocation": "uniform", "sites": ("gate_up", "down")},
    "wina": {"scoring": "wina", "allocation": "uniform", "sites": ("gate_up", "down")},
    "wina-greedy": {"scoring": "wina", "allocation": "greedy", "sites": ("gate_up", "down")},
    "gate-first": {"scoring": "wina", "allocation": "greedy", "sites": ("gate_up", "gate")},
}
"""The neurons-mode cells, each a ``sparsify(mode="neurons")`` setting, each adding one step to
the one before: ``teal`` (TEAL uniform: |x| thresholds on the channels entering gate/up and the
neurons entering down, the same sparsity at both), ``wina`` (+WINA: scores times the weight
column norms), ``wina-greedy`` (+TEAL's greedy per-layer allocation), ``gate-first`` (CHESS:
neurons kept by their gate before up and down run, with WINA scores and the greedy
allocation)."""
METHOD_LABELS = {
    "teal": "TEAL uniform",
    "wina": "TEAL + WINA",
    "wina-greedy": "TEAL + WINA + greedy",
    "gate-first": "gate-first (CHESS) + WINA + greedy",
}
"""Each of :data:`NEURON_METHODS` as the report and its figure name it."""


def _positive_ints(name: str, values: tuple[int, ...]) -> None:
    if not values or not all(isinstance(v, int) and v >= 1 for v in values):
        raise ValueError(f"{name}={values!r} is invalid: give one or more ints >= 1")


@dataclass(frozen=True)
class EvalSettings:
    """What ``xmoe sparsify-grid`` measures, and where it writes.

    Args:
        out: run directory (token windows, converted models, recovery checkpoints: large,
            never committed, rebuilt by a rerun).
        docs: folder of the report ``sparsify.md``, its plot ``sparsify.png`` and the measured
            cells it is written from (``sparsify_cells/``, a small JSON file each, committed
            beside the report: a lost run directory loses no measurement).
        modes: the modes whose cells the grid measures (:data:`GRID_MODES`; the dense row is
            always measured).
        expert_sizes: neurons per expert, each dividing the FFN width (1536 for SmolLM2).
        fractions: top-k active fractions in (0, 1].
        partitions: ``clustered`` and/or ``contiguous``; the first one's groups run first.
        routers: ``oracle`` and/or ``trained``.
        recover: ``(expert_size, partition, fraction)`` configs to recovery-fine-tune at that
            fraction (then evaluated at every fraction).
        neuron_oracle: kept-neuron fractions of the per-neuron oracle (H=1: each token keeps the
            neurons with the largest true output norms, ranked on the dense FFN; a bound).
        neuron_methods: the neurons-mode methods measured (:data:`NEURON_METHODS`).
        target_flops: the FFN-FLOP fractions F each neurons-mode method is calibrated to (0.67:
            the training-free target's bound, measured, not interpolated).
        recovery_budgets: token budgets of the recovery cells: the best training-free
            neurons-mode method at ``recovery_flops`` fine-tuned by distillation with each.
        recovery_flops: the F (one of ``target_flops``) whose best method is recovered.
        xmoe_route: expert size of the XMoE-route row (clustered partition), 0 for none.
        xmoe_thresholds: the thresholds t the XMoE route is evaluated at.
        xmoe_router_scale: the trained router's logits are scaled by this to start the XMoE
            route near the dense model (E·p ≈ 1).
        eval_tokens: held-out tokens per domain (windows of ``seq_len``, evenly spaced).
        seq_len: evaluation and calibration window length.
        calibration_tokens: training tokens, half from each domain, the partition, the routers
            and the neurons mode's thresholds are calibrated on.
        router_steps: full-batch Adam steps per layer router.
        recovery: the recovery fine-tune settings (token budget, lr, ...).
        timing_tokens: tokens per timed forward (windows of ``seq_len``).
        timing_repeats: timed forwards per model (the median counts).
        eval_batch: windows per evaluation forward.
        cache_dir: corpus/model cache (None: ``$XMOE_CACHE_DIR`` or ``~/.cache/xmoe``).
        command: the command line recorded in the report.
        progress: tqdm bars.
        report_only: rewrite the report from the cells cached under ``out`` (measured under
            these settings), measuring nothing and loading no model.
        quick: a tiny random Llama and random tokens instead of SmolLM2-135M and the corpus:
            nothing downloaded, checks the pipeline (its numbers mean nothing; with small token
            budgets it takes a minute or two); the report goes to ``out``, never to ``docs``.
    """

    out: Path = Path("runs/sparsify-eval")
    docs: Path = Path("docs/results")
    modes: tuple[str, ...] = field(default=GRID_MODES, metadata={"choices": GRID_MODES})
    expert_sizes: tuple[int, ...] = (16, 64, 4)
    fractions: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    partitions: tuple[str, ...] = field(
        default=("clustered", "contiguous"), metadata={"choices": PARTITIONS}
    )
    routers: tuple[str, ...] = field(default=GRID_ROUTERS, metadata={"choices": GRID_ROUTERS})
    recover: tuple[tuple[int, str, float], ...] = ((16, "clustered", 0.5),)
    neuron_oracle: tuple[float, ...] = (0.4, 0.5, 0.6, 0.7)
    neuron_methods: tuple[str, ...] = field(
        default=tuple(NEURON_METHODS), metadata={"choices": tuple(NEURON_METHODS)}
    )
    target_flops: tuple[float, ...] = (0.75, 0.67, 0.6, 0.5, 0.35)
    recovery_budgets: tuple[int, ...] = (250_000, 1_000_000, 2_000_000)
    recovery_flops: float = 0.5
    xmoe_route: int = 16
    xmoe_thresholds: tuple[float, ...] = (0.9, 0.75, 0.5, 0.25)
    xmoe_router_scale: float = 0.1
    eval_tokens: int = 2048
    seq_len: int = 256
    calibration_tokens: int = 4096
    router_steps: int = 100
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    timing_tokens: int = 512
    timing_repeats: int = 3
    eval_batch: int = 4
    cache_dir: Path | None = None
    command: str = "xmoe sparsify-grid"
    progress: bool = True
    report_only: bool = False
    quick: bool = False

    def __post_init__(self) -> None:
        if not self.modes or not set(self.modes) <= set(GRID_MODES):
            raise ValueError(f"modes={self.modes!r} is invalid: choose from {GRID_MODES}")
        _positive_ints("expert_sizes", self.expert_sizes)
        if not self.fractions or not all(
            isinstance(f, (int, float)) and 0 < f <= 1 for f in self.fractions
        ):
            raise ValueError(f"fractions={self.fractions!r} is invalid: give numbers in (0, 1]")
        if not self.partitions or not set(self.partitions) <= set(PARTITIONS):
            raise ValueError(f"partitions={self.partitions!r} is invalid: choose from {PARTITIONS}")
        if not self.routers or not set(self.routers) <= set(GRID_ROUTERS):
            raise ValueError(f"routers={self.routers!r} is invalid: choose from {GRID_ROUTERS}")
        for size, partition, fraction in self.recover:
            if not (isinstance(size, int) and size >= 1 and partition in PARTITIONS):
                raise ValueError(f"recover entry {(size, partition, fraction)} is invalid")
            if not 0 < fraction <= 1:
                raise ValueError(f"recover fraction {fraction} is invalid: must be in (0, 1]")
        self._check_neurons()
        if not (isinstance(self.xmoe_route, int) and self.xmoe_route >= 0):
            raise ValueError(f"xmoe_route={self.xmoe_route!r} is invalid: an int >= 0")
        if not self.xmoe_thresholds or not all(0 < t <= 1 for t in self.xmoe_thresholds):
            raise ValueError(f"xmoe_thresholds={self.xmoe_thresholds!r}: give numbers in (0, 1]")
        if not self.xmoe_router_scale > 0:
            raise ValueError(f"xmoe_router_scale={self.xmoe_router_scale} must be > 0")
        for name in (
            "eval_tokens",
            "seq_len",
            "calibration_tokens",
            "router_steps",
            "timing_tokens",
            "timing_repeats",
            "eval_batch",
        ):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name}={value!r} is invalid: must be an int >= 1")
        for name in ("eval_tokens", "calibration_tokens", "timing_tokens"):
            if getattr(self, name) < self.seq_len:
                raise ValueError(
                    f"{name}={getattr(self, name)} is invalid: at least one window of "
                    f"seq_len={self.seq_len} tokens"
                )

    def _check_neurons(self) -> None:
        """The neurons-mode cells' settings (empty tuples leave those cells out)."""
        for name in ("neuron_oracle", "target_flops"):
            values = getattr(self, name)
            if not all(isinstance(v, (int, float)) and 0 < v <= 1 for v in values):
                raise ValueError(f"{name}={values!r} is invalid: give numbers in (0, 1]")
        if not set(self.neuron_methods) <= set(NEURON_METHODS):
            raise ValueError(
                f"neuron_methods={self.neuron_methods!r} is invalid: choose from "
                f"{tuple(NEURON_METHODS)}"
            )
        if self.recovery_budgets:
            _positive_ints("recovery_budgets", self.recovery_budgets)
            step = self.recovery.batch_size * self.recovery.seq_len
            if min(self.recovery_budgets) < step:  # named now, not hours into the grid
                raise ValueError(
                    f"recovery_budgets={self.recovery_budgets!r} is invalid: each must be at "
                    f"least one recovery step of batch_size·seq_len = {step} tokens"
                )
        if (
            self.recovery_budgets
            and self.neuron_methods
            and self.recovery_flops not in (self.target_flops)
        ):
            raise ValueError(
                f"recovery_flops={self.recovery_flops!r} is invalid: the recovered cell starts "
                f"from a measured one, so it must be one of target_flops={self.target_flops!r}"
            )

    @property
    def report_dir(self) -> Path:
        """Where the report goes: ``docs``, or ``out`` in the quick mode (whose numbers must
        never replace the real ones)."""
        return Path(self.out) if self.quick else Path(self.docs)

    @property
    def cells_dir(self) -> Path:
        """Where the measured cells are stored: ``sparsify_cells/`` beside the report (so the
        quick mode's stay under ``out`` too)."""
        return self.report_dir / "sparsify_cells"

    def recovery_tokens(self) -> int:
        """Training tokens the windows of the budgeted recoveries hold: the largest budget."""
        return max((self.recovery.tokens, *self.recovery_budgets))

    def measurement_key(self) -> dict[str, Any]:
        """The settings a cached cell depends on (a cell measured under others is redone)."""
        key = {
            "eval_tokens": self.eval_tokens,
            "seq_len": self.seq_len,
            "calibration_tokens": self.calibration_tokens,
            "calibration_domains": list(DOMAINS),
            "router_steps": self.router_steps,
            "timing_tokens": self.timing_tokens,
        }
        return key | {"quick": True} if self.quick else key  # the real run's cells stay valid


__all__ = [
    "DOMAINS",
    "DOMAIN_NAMES",
    "GRID_MODES",
    "GRID_ROUTERS",
    "METHOD_LABELS",
    "NEURON_METHODS",
    "EvalSettings",
]
