"""Calibration of the ``neurons`` mode: a :class:`~xmoe.conversion.neuron_mlp.NeuronMLP`'s
score scales and per-site thresholds, from one layer's calibration MLP inputs.

A site's threshold is the quantile of its scores on the calibration inputs at the site's
sparsity (the fraction of entries it skips); the neuron sites' scores are taken on the inputs
already masked by the ``gate_up`` threshold, as the module sees them. The sparsities reach
``target_flops`` in every layer, measured on those inputs: the same at every site
(``uniform``), or raised one site at a time where the output error grows least per FLOP saved
(``greedy``, TEAL's allocation).

Shape legend: S tokens, D hidden size, I FFN width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from xmoe.conversion.calibration import spaced_rows
from xmoe.conversion.config import SITES, SparsifyConfig
from xmoe.conversion.families import DenseWeights
from xmoe.conversion.neuron_mlp import NeuronMLP

CALIBRATION_TOKENS = 4096
"""Calibration tokens per layer the thresholds and the greedy errors read (evenly spaced): the
greedy allocation runs the MLP a few times per step, and quantiles of 4096 tokens × the FFN
width are already fine-grained."""

GREEDY_STEP = 0.05
"""Sparsity a greedy step adds to one site (the last step is cut to land on the target)."""

BISECTION_STEPS = 20
"""Halvings of a sparsity interval when solving for the target (2⁻²⁰ ≈ 1e-6 of sparsity)."""

Levels = dict[str, float]
"""Sparsity per site: the fraction of that site's calibration entries below its threshold."""


def quantile_threshold(scores: torch.Tensor, level: float) -> torch.Tensor:
    """The threshold below which a fraction ``level`` of ``scores`` falls (0-dim, their dtype):
    0 at level 0 (keeps every entry, scores are >= 0), +inf at 1 (keeps none)."""
    flat = scores.flatten()
    skipped = round(level * flat.numel())
    if skipped == 0:
        return flat.new_zeros(())
    if skipped >= flat.numel():
        return flat.new_full((), math.inf)
    return flat.kthvalue(skipped + 1).values  # the smallest kept score


def set_scales(mlp: NeuronMLP, x_SD: torch.Tensor, scoring: str) -> None:
    """The scores' per-entry scales: 1 (``teal``) or the norm of the weight column each entry
    multiplies (``wina``); the gate-first site also weighs neuron i by E|u_i| on ``x_SD``
    (CHESS)."""
    gate_ID, up_ID, down_DI = (p.weight for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    with torch.no_grad():
        mean_up_I = (x_SD @ up_ID.T).abs().mean(dim=0)
        if scoring == "wina":
            mlp.scale_gate_up.copy_(torch.linalg.vector_norm(torch.cat([gate_ID, up_ID]), dim=0))
            mlp.scale_down.copy_(torch.linalg.vector_norm(down_DI, dim=0))
        else:
            mlp.scale_gate_up.fill_(1)
            mlp.scale_down.fill_(1)
        mlp.scale_gate.copy_(mean_up_I * mlp.scale_down)


def set_thresholds(mlp: NeuronMLP, x_SD: torch.Tensor, levels: Levels) -> None:
    """Put the quantile thresholds of ``levels`` into ``mlp`` (sites not in ``levels`` keep all)."""
    with torch.no_grad():
        for site in SITES:
            getattr(mlp, f"threshold_{site}").zero_()
        if "gate_up" in levels:
            mlp.threshold_gate_up.copy_(
                quantile_threshold(mlp.score("gate_up", x_SD), levels["gate_up"])
            )
            x_SD = torch.where(mlp.keep("gate_up", x_SD), x_SD, 0)
        for site in {"down", "gate"} & levels.keys():
            activated = F.silu(mlp.gate_proj(x_SD))
            value = activated if site == "gate" else activated * mlp.up_proj(x_SD)
            threshold = quantile_threshold(mlp.score(site, value), levels[site])
            getattr(mlp, f"threshold_{site}").copy_(threshold)


class LayerCalibration:
    """One layer's calibration: its inputs, its dense output, and the measure of a choice of
    sparsities (the FFN-FLOP fraction and the output error they give on those inputs)."""

    def __init__(self, mlp: NeuronMLP, x_SD: torch.Tensor) -> None:
        self.mlp = mlp
        self.x_SD = x_SD
        self.sites = mlp.settings.sites
        set_thresholds(mlp, x_SD, {})
        with torch.no_grad():
            self.dense_SD = mlp(x_SD)
        self.dense_energy = float(self.dense_SD.double().square().sum()) or 1.0

    def measure(self, levels: Levels) -> tuple[float, float]:
        """(FFN-FLOP fraction, relative squared output error) with ``levels`` set in the MLP."""
        set_thresholds(self.mlp, self.x_SD, levels)
        with torch.no_grad():
            out_SD = self.mlp(self.x_SD)
        error = float((out_SD - self.dense_SD).double().square().sum()) / self.dense_energy
        return float(self.mlp.flops_fraction.mean()), error

    def solve(self, levels: Levels, sites: tuple[str, ...], target: float) -> Levels:
        """``levels`` with ``sites`` raised together, from where they are, just far enough that
        the fraction is at most ``target`` (bisection on the measured fraction)."""

        def raised(t: float) -> Levels:
            return levels | {s: levels[s] + t * (1 - levels[s]) for s in sites}

        low, high = 0.0, 1.0
        for _ in range(BISECTION_STEPS):
            middle = (low + high) / 2
            if self.measure(raised(middle))[0] <= target:
                high = middle
            else:
                low = middle
        return raised(high)


def uniform_levels(layer: LayerCalibration, target: float) -> Levels:
    """The same sparsity at every site, the least that reaches ``target``."""
    start = dict.fromkeys(layer.sites, 0.0)
    if layer.measure(start)[0] <= target:
        return start
    return layer.solve(start, layer.sites, target)


def greedy_levels(layer: LayerCalibration, target: float) -> Levels:
    """TEAL's greedy allocation within the layer: from no sparsity, raise by
    :data:`GREEDY_STEP` the site that adds the least output error per FLOP saved, until the
    fraction reaches ``target`` (a step that would pass it is cut to land on it)."""
    levels = dict.fromkeys(layer.sites, 0.0)
    fraction, error = layer.measure(levels)
    while fraction > target:
        best: tuple[float, Levels, float, float] | None = None
        for site in layer.sites:
            if levels[site] >= 1:
                continue
            trial = levels | {site: min(1.0, levels[site] + GREEDY_STEP)}
            trial_fraction, trial_error = layer.measure(trial)
            if trial_fraction < target:
                trial = layer.solve(levels, (site,), target)
                trial_fraction, trial_error = layer.measure(trial)
            saved = fraction - trial_fraction
            cost = (trial_error - error) / saved if saved > 0 else math.inf
            if best is None or cost < best[0]:
                best = (cost, trial, trial_fraction, trial_error)
        if best is None:  # every site skips all (the config refused an unreachable target)
            break
        _, levels, fraction, error = best
    return levels


def convert_layer(
    mlp: NeuronMLP, dense: DenseWeights, x_SD: torch.Tensor, settings: SparsifyConfig
) -> Levels:
    """Fill ``mlp`` from a dense MLP's weights and calibrate it on that layer's MLP inputs
    ``x_SD`` (S, D) (:attr:`~SparsifyConfig.scoring`, :attr:`~SparsifyConfig.allocation`,
    :attr:`~SparsifyConfig.target_flops`); returns the sparsity per site it chose."""
    gate_ID, up_ID, down_DI = dense
    with torch.no_grad():
        mlp.gate_proj.weight.copy_(gate_ID)
        mlp.up_proj.weight.copy_(up_ID)
        mlp.down_proj.weight.copy_(down_DI)
    x_SD = spaced_rows(x_SD.to(gate_ID.dtype), CALIBRATION_TOKENS)
    set_scales(mlp, x_SD, settings.scoring)
    layer = LayerCalibration(mlp, x_SD)
    allocate = greedy_levels if settings.allocation == "greedy" else uniform_levels
    levels = allocate(layer, settings.target_flops)
    set_thresholds(mlp, x_SD, levels)
    return levels
