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
from collections.abc import Callable

import torch

from xmoe.conversion.calibration import spaced_rows
from xmoe.conversion.config import SITES, SparsifyConfig, flops_fraction
from xmoe.conversion.families import DenseWeights
from xmoe.conversion.neuron_mlp import NeuronMLP

CALIBRATION_TOKENS = 2048
"""Calibration tokens per layer the thresholds and the greedy errors read (evenly spaced): the
greedy allocation runs the MLP a few times per step (20-30 s a layer of SmolLM2-135M's shape on
two busy cores; uniform, 1-8 s), and quantiles of 2048 tokens × the FFN width are already
fine-grained."""

GREEDY_STEP = 0.05
"""Sparsity a greedy step adds to one site (the last step is cut to land on the target)."""

BISECTION_STEPS = 16
"""Halvings of a sparsity interval when solving for the target (2⁻¹⁶ ≈ 2e-5 of sparsity)."""

Levels = dict[str, float]
"""Sparsity per site: the fraction of that site's calibration entries below its threshold."""


def quantile_threshold(scores: torch.Tensor, level: float) -> torch.Tensor:
    """The threshold below which ceil(``level`` · N) of the N ``scores`` fall (0-dim, their
    dtype), so at most 1 - ``level`` of them are kept (but for ties at the threshold, which are
    kept): 0 at level 0 (keeps every entry, scores are >= 0), +inf at 1 (keeps none)."""
    flat = scores.flatten()
    skipped = math.ceil(round(level * flat.numel(), 9))  # rounded first: 0.3·10 skips 3
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


class LayerCalibration:
    """One layer's calibration: its inputs, its dense output, and the measure of a choice of
    sparsities (the thresholds they give, set in the MLP, and the FFN-FLOP fraction and output
    error on those inputs). The gate and up outputs of the last few ``gate_up`` sparsities are
    kept: the greedy steps and the bisections revisit them."""

    cached_levels = 3
    """``gate_up`` sparsities whose gate and up outputs are kept (a greedy step compares two)."""

    def __init__(self, mlp: NeuronMLP, x_SD: torch.Tensor) -> None:
        self.mlp = mlp
        self.x_SD = x_SD
        self.sites = mlp.settings.sites
        self._gate_up: dict[float, tuple] = {}
        with torch.no_grad():
            for site in SITES:
                getattr(mlp, f"threshold_{site}").zero_()
            self.dense_SD = mlp(x_SD)
        self.dense_energy = float(self.dense_SD.double().square().sum()) or 1.0

    def gate_up(self, level: float) -> tuple:
        """``(threshold, kept_x, activated, up)`` of the ``gate_up`` site at sparsity ``level``."""
        if level not in self._gate_up:
            if len(self._gate_up) >= self.cached_levels:
                del self._gate_up[next(iter(self._gate_up))]  # the oldest
            threshold = quantile_threshold(self.mlp.score("gate_up", self.x_SD), level)
            self.mlp.threshold_gate_up.copy_(threshold)
            self._gate_up[level] = (threshold, *self.mlp.masked_gate_up(self.x_SD))
        return self._gate_up[level]

    def measure(self, levels: Levels, error: bool = True) -> tuple[float, float]:
        """Set the thresholds of ``levels`` (a site not in it keeps all) in the MLP; returns
        (FFN-FLOP fraction, relative squared output error, or NaN without ``error``)."""
        mlp = self.mlp
        with torch.no_grad():
            threshold, kept_x, activated, up = self.gate_up(levels.get("gate_up", 0.0))
            mlp.threshold_gate_up.copy_(threshold)
            for site in ("down", "gate"):
                buffer, level = getattr(mlp, f"threshold_{site}"), levels.get(site, 0.0)
                if level == 0:
                    buffer.zero_()  # keeps all, without scoring
                    continue
                value = activated if site == "gate" else activated * up
                buffer.copy_(quantile_threshold(mlp.score(site, value), level))
            kept_n, h = mlp.masked_neurons(activated, up)
            fraction = float(mlp.token_flops_fraction(kept_x, kept_n).mean())
            if not error:
                return fraction, math.nan
            difference = (mlp.down_proj(h) - self.dense_SD).double()
        return fraction, float(difference.square().sum()) / self.dense_energy

    def fraction(self, levels: Levels) -> float:
        """The FFN-FLOP fraction of ``levels`` on the calibration inputs. Gate-first, measured
        (its up runs on the kept neurons of the kept channels: a per-token product); otherwise
        the formula on 1 - level per site, which bounds the measure from above (each site keeps
        at most that much) and is within one entry of it."""
        if "gate" in self.sites:
            return self.measure(levels, error=False)[0]
        kept_x, kept_n = (1 - levels.get(site, 0.0) for site in ("gate_up", "down"))
        return flops_fraction(self.sites, kept_x, kept_n)

    def solve(self, levels: Levels, sites: tuple[str, ...], target: float) -> Levels:
        """``levels`` with ``sites`` raised together, from where they are, just far enough that
        the fraction is at most ``target`` (each site's kept share scaled by one factor)."""
        return self.bisect(
            lambda t: levels | {s: levels[s] + t * (1 - levels[s]) for s in sites}, target
        )

    def bisect(self, path: Callable[[float], Levels], target: float) -> Levels:
        """``path(t)`` at the least t in [0, 1] (0 exactly, else to 2⁻¹⁶) whose fraction is at
        most ``target``, for a ``path`` along which the fraction does not rise and ``path(1)``
        reaches it."""
        if self.fraction(path(0.0)) <= target:
            return path(0.0)
        low, high = 0.0, 1.0
        for _ in range(BISECTION_STEPS):
            middle = (low + high) / 2
            if self.fraction(path(middle)) <= target:
                high = middle
            else:
                low = middle
        return path(high)

    def levels_of(self, thresholds: dict[str, torch.Tensor]) -> Levels:
        """The sparsity per site that ``thresholds`` (0-dim, per site) give on the calibration
        inputs: the share of the site's scores below its threshold (the neuron sites' scores
        behind the ``gate_up`` mask those thresholds give). :meth:`measure` of the result sets
        thresholds that keep the same entries of these inputs."""
        mlp, levels = self.mlp, {}
        with torch.no_grad():
            if "gate_up" in self.sites:
                scores = mlp.score("gate_up", self.x_SD)
                levels["gate_up"] = _share_below(scores, thresholds["gate_up"])
            _, _, activated, up = self.gate_up(levels.get("gate_up", 0.0))
            for site in ("down", "gate"):
                if site in self.sites:
                    scores = mlp.score(site, activated if site == "gate" else activated * up)
                    levels[site] = _share_below(scores, thresholds[site])
        return levels


def _share_below(scores: torch.Tensor, threshold: torch.Tensor) -> float:
    """The share of ``scores`` below ``threshold``, compared in the scores' dtype as
    :meth:`NeuronMLP.keep` compares them."""
    return float((scores < threshold.to(scores.dtype)).double().mean())


def uniform_levels(layer: LayerCalibration, target: float) -> Levels:
    """The same sparsity at every site, the least that reaches ``target``."""
    start = dict.fromkeys(layer.sites, 0.0)
    if layer.fraction(start) <= target:
        return start
    return layer.solve(start, layer.sites, target)


def greedy_levels(layer: LayerCalibration, target: float) -> Levels:
    """TEAL's greedy allocation within the layer: from no sparsity, raise by
    :data:`GREEDY_STEP` the site that adds the least output error per FLOP saved, until the
    fraction reaches ``target`` (a step that would pass it is cut to land on it). The cut lands
    by :meth:`LayerCalibration.fraction`, while the loop reads :meth:`LayerCalibration.measure`,
    a float32 mean over tokens that can sit a hair above it (0.6000005 for 0.6, seen on
    SmolLM2 at two threads): when no site's step saves FLOPs any more, the layer is on its
    target and the allocation ends (else the same cut step would repeat forever)."""
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
        if best is None or best[0] == math.inf:  # every site skips all, or no step saves
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
    layer.measure(levels, error=False)  # its thresholds in the MLP
    return levels


def resolve_layer(mlp: NeuronMLP, x_SD: torch.Tensor, target: float) -> Levels:
    """Re-solve ``mlp``'s thresholds on its current weights so that it computes ``target`` of
    its dense FFN FLOPs on ``x_SD`` (S, D), its MLP inputs; returns the sparsity per site.

    After the weights change (recovery), fixed thresholds keep another share of the entries.
    The scales stay as they are, and so does the allocation's shape: the sparsities that the
    current thresholds give on ``x_SD`` move together along one path, the kept shares of the
    sites the allocation sparsified scaled by one factor when the layer computes too much, the
    sparsities of every site scaled by one factor when it computes too little. A site the
    allocation left dense stays dense (but for a layer left wholly dense, whose every site
    rises together, as ``uniform`` would)."""
    x_SD = spaced_rows(x_SD.to(mlp.gate_proj.weight.dtype), CALIBRATION_TOKENS)
    thresholds = {site: getattr(mlp, f"threshold_{site}").clone() for site in SITES}
    layer = LayerCalibration(mlp, x_SD)
    levels = layer.levels_of(thresholds)
    if layer.fraction(levels) > target:
        sparsified = tuple(site for site in layer.sites if levels[site] > 0)
        levels = layer.solve(levels, sparsified or layer.sites, target)
    else:
        levels = layer.bisect(lambda t: {s: t * level for s, level in levels.items()}, target)
    layer.measure(levels, error=False)  # its thresholds in the MLP
    return levels
