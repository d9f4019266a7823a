"""`xmoe compress-grid`: the compression table of issue 27. The LM reproduction's xmoe-64 and
top-2 models (2M tokens, seed 0), each compressed by every registered pass at 75%, 50% and 25%
of its expert bytes beside the naive baselines the papers beat, each cell measured: validation
perplexity per corpus domain, bytes on disk and resident (:mod:`xmoe.compression.size`) and
active MoE FLOPs per token (the routing statistics of the evaluation).

The passes come from :data:`xmoe.registry.PASSES` at run time: a pass joins the table through a
:data:`~xmoe.experiments.compression_methods.METHODS` entry (how a byte fraction maps to
its options); a registered pass without one,
or an entry whose pass or option is not registered, is skipped with a note in the report.

Resumable: every cell is one verified JSON file under ``<out>/cells/<model>/``, written when the
cell is complete; a finished cell is never recomputed, and a crash mid-cell loses that cell
alone. Models are reused from ``runs`` or trained into ``<out>/models/<model>/seed0`` by the
reproduction's own config (:func:`xmoe.experiments.grid.run_config`) and trainer, resuming from
their checkpoint. ``quick`` runs the whole pipeline on ``tiny``-sized models for the tests.
"""

from __future__ import annotations

import copy
import math
import re
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from xmoe.compression import CompressionError, compress, model_size, save_compressed
from xmoe.compression.base import moe_layers
from xmoe.compression.calibration import CALIBRATION_SCHEME, corpus_calibration, domain_parts
from xmoe.data import TokenData
from xmoe.experiments.compression_methods import METHODS, Experts
from xmoe.experiments.grid import FAMILY, ReproduceSettings, run_config
from xmoe.registry import PASSES
from xmoe.storage import DamagedFileError, read_verified_json, write_verified_json
from xmoe.training.config import TrainConfig
from xmoe.training.evaluate import evaluate
from xmoe.training.presets import preset, preset_moe
from xmoe.training.rundir import RunDir
from xmoe.training.trainer import load_token_data, train

SEED = 0
"""The seed of the compressed models (the LM reproduction's seed 0)."""

MODELS = tuple(name for name in FAMILY if name != "dense")
"""The presets the grid can compress (an MoE layer to compress)."""


REFERENCE = "uncompressed"
"""The row of each model as trained."""


@dataclass(frozen=True)
class CompressionGridSettings:
    """What ``xmoe compress-grid`` measures, and where it writes.

    Args:
        models: the LM reproduction's presets to compress.
        fractions: target shares of a model's expert bytes, each in (0, 1).
        methods: table rows to measure (METHODS names; none given: all).
        runs: trained run directories to reuse (their config's preset names the model);
            a model without one is trained into out/models/MODEL/seed0 (resumable).
        tokens: training tokens of a model trained here (the LM reproduction's budget).
        calibration_tokens: training tokens the passes calibrate on (windows of seq_len).
        eval_batches: validation batches per domain (batch_size x seq_len windows).
        device: auto, cpu or cuda.
        quick: tiny-sized models on synthetic data (checks the pipeline; numbers mean nothing).
        out: the grid's folder (cells, models trained here).
        docs: folder of compression.md and compression.png.
        command: the command line recorded in the report.
        progress: tqdm bars.
    """

    models: tuple[str, ...] = field(default=("xmoe-64", "top2"), metadata={"choices": MODELS})
    fractions: tuple[float, ...] = (0.75, 0.5, 0.25)
    methods: tuple[str, ...] = field(
        default=(), metadata={"choices": tuple(m.name for m in METHODS)}
    )
    runs: tuple[Path, ...] = ()
    tokens: int = 2_000_000
    calibration_tokens: int = 8192
    eval_batches: int = 16
    device: str = field(default="auto", metadata={"choices": ("auto", "cpu", "cuda")})
    quick: bool = False
    out: Path = Path("runs/compression-grid")
    docs: Path = Path("docs/results")
    command: str = "xmoe compress-grid"
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.models or not set(self.models) <= set(MODELS):
            raise ValueError(f"models={self.models!r} is invalid: choose from {MODELS}")
        if not self.fractions or not all(
            isinstance(f, int | float) and 0 < f < 1 for f in self.fractions
        ):
            raise ValueError(f"fractions={self.fractions!r} is invalid: give numbers in (0, 1)")
        names = tuple(m.name for m in METHODS)
        if not set(self.methods) <= set(names):
            raise ValueError(f"methods={self.methods!r} is invalid: choose from {names}")
        for name in ("tokens", "calibration_tokens", "eval_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid: must be an integer >= 1")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device={self.device!r} is invalid: choose from auto, cpu, cuda")


@dataclass
class Cell:
    """One measurement: ``passes`` applied to ``model``; ``fractions`` the targets it stands
    for (empty: the reference, or a pass that changes no bytes)."""

    model: str
    method: str
    passes: list[tuple[str, dict[str, Any]]]
    fractions: list[float]

    @property
    def name(self) -> str:
        """The cell's file name: method and options, readable and unique."""
        options = "-".join(f"{k}{v}" for _, opts in self.passes for k, v in sorted(opts.items()))
        return re.sub(r"[^A-Za-z0-9.=_-]+", "_", f"{self.method}-{options}".strip("-"))


def model_config(name: str, settings: CompressionGridSettings) -> TrainConfig:
    """The training config of model ``name``: the LM reproduction's at ``settings.tokens``
    (seed 0), or with ``quick`` the ``tiny`` preset's model, data and schedule with ``name``'s
    MoE layer."""
    if not settings.quick:
        reproduce = ReproduceSettings(
            presets=(name,), ablations=(), seeds=1, tokens=settings.tokens,
            eval_batches=settings.eval_batches, device=settings.device, progress=False,
        )  # fmt: skip
        return run_config(name, SEED, reproduce)
    tiny = preset("tiny")
    dims = {"d_model": tiny.model.d_model, "d_ff": tiny.model.d_ff}
    return replace(tiny, model=replace(tiny.model, moe=preset_moe(name, dims)), preset=name)


def given_runs(settings: CompressionGridSettings) -> dict[str, Path]:
    """``settings.runs`` by the preset each was trained as (its checkpoint's config); a run
    still training, a run of a model the grid does not compress, or a second run of one, is
    refused by name."""
    runs: dict[str, Path] = {}
    for path in settings.runs:
        meta = RunDir(path).load_checkpoint(parts=()).meta
        name, steps = meta["train_config"]["preset"], meta["train_config"]["max_steps"]
        if meta["step"] < steps:
            raise ValueError(
                f"runs: {path} is at step {meta['step']} of {steps}: finish its training first"
            )
        if name in runs:
            raise ValueError(f"runs: {runs[name]} and {path} are both runs of {name!r}: give one")
        if name not in settings.models:
            raise ValueError(
                f"runs: {path} is a run of {name!r}, not one of models={settings.models}"
            )
        runs[name] = Path(path)
    return runs


def trained_model(
    name: str, settings: CompressionGridSettings, data: TokenData
) -> tuple[nn.Module, TrainConfig, Path]:
    """``(model in eval mode, its config, its run directory)``: the run of ``settings.runs``
    trained as ``name``, else the one in ``<out>/models/<name>/seed0``, trained (or its
    training finished) first."""
    given = given_runs(settings).get(name)
    if given is not None:
        model, config, _ = RunDir(given).load_model()
        return model, config, given
    config = model_config(name, settings)
    run = RunDir(settings.out / "models" / name / f"seed{SEED}")
    done = run.has_checkpoint and run.load_checkpoint(parts=()).meta["step"] >= config.max_steps
    if not done:
        progress = settings.progress
        train(config, run.path, resume=run.has_checkpoint, data=data, progress=progress)
    model, config, _ = run.load_model()
    return model, config, run.path


def experts_of(model: nn.Module, domains: list[str]) -> Experts:
    """The :class:`Experts` of ``model``'s first MoE layer; ``reduce`` takes the KJV when the
    data has it (UNCURL reduces for one task), else the data's first domain."""
    layers = moe_layers(model)
    experts = layers[0].experts
    w1, w2 = experts.w1, experts.w2
    num_experts, rows1, cols1 = w1.shape
    _, rows2, cols2 = w2.shape
    return Experts(
        num_experts=num_experts,
        layers=len(layers),
        weights=rows1 * cols1 + rows2 * cols2,
        rank_cost=rows1 + cols1 + rows2 + cols2,
        element_bits=w1.element_size() * 8,
        domain="kjv" if "kjv" in domains else domains[0],
        kept=sum(b[0].numel() for b in (experts.b1, experts.b2) if b is not None),
    )


def plan_cells(
    model: str, experts: Experts, settings: CompressionGridSettings
) -> tuple[list[Cell], list[str]]:
    """The cells of ``model``: its reference, then every method at every fraction (cells with
    equal passes measured once); and a note per method or fraction skipped."""
    cells = {REFERENCE: Cell(model, REFERENCE, [], [])}
    notes = []
    registered = set(PASSES)
    for method in METHODS:
        if settings.methods and method.name not in settings.methods:
            continue
        if method.pass_name not in registered:
            notes.append(f"{method.name}: skipped (pass {method.pass_name!r} is not registered)")
            continue
        for fraction in settings.fractions if method.sized else [None]:
            options = method.options(experts, fraction)
            at = "" if fraction is None else f" at {fraction:.0%}"
            if options is None:
                notes.append(f"{model} {method.name}{at}: skipped (out of the pass's reach)")
                continue
            try:
                PASSES[method.pass_name].Options.parse(method.pass_name, dict(options))
            except CompressionError as error:  # an option the registered pass does not take
                notes.append(f"{model} {method.name}{at}: skipped ({error})")
                continue
            cell = Cell(model, method.name, [(method.pass_name, options)], [])
            cell = cells.setdefault(cell.name, cell)
            if fraction is not None:
                cell.fractions.append(fraction)
    unmapped = registered - {m.pass_name for m in METHODS}
    notes += [f"{name}: no row (no byte-fraction mapping in METHODS)" for name in sorted(unmapped)]
    return list(cells.values()), notes


class CompressionGrid:
    """Measures the cells of one model, each cached as ``<out>/cells/<model>/<cell>.json``."""

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        data: TokenData,
        settings: CompressionGridSettings,
    ) -> None:
        self.model, self.config, self.settings = model, config, settings
        seq, count = config.seq_len, settings.calibration_tokens
        calibration = corpus_calibration(data.train, data.train_domains, count, seq)
        self.calibration, self.domains = calibration.mixed, calibration.domains
        self.validation = domain_parts(data.val, data.val_domains)
        self.key = {
            "train_config": config.to_dict(),
            "calibration_tokens": count,
            "calibration": CALIBRATION_SCHEME,
            "eval_batches": settings.eval_batches,
        }
        """What a cached cell was measured under: a cell measured under another is redone."""

    def folder(self) -> Path:
        return self.settings.out / "cells" / self.config.preset

    def cached(self, cell: Cell) -> dict[str, Any] | None:
        """The finished record of ``cell``, or None (missing, damaged or measured otherwise)."""
        path = self.folder() / f"{cell.name}.json"
        try:
            record = read_verified_json(path)
        except (FileNotFoundError, DamagedFileError):  # a damaged cell is measured again
            return None
        return record if record.get("key") == self.key else None

    def measure(self, cell: Cell) -> dict[str, Any]:
        """``cell``'s record: from the cache, or measured now and written (atomically, once
        complete)."""
        record = self.cached(cell)
        if record is not None:
            return record | {"fractions": cell.fractions}
        started = time.perf_counter()
        model = self.compressed(cell)
        scratch = self.settings.out / "scratch" / cell.model / cell.name
        shutil.rmtree(scratch, ignore_errors=True)  # a crashed cell's save
        try:
            save_compressed(model, scratch, passes=cell.passes)
            size = model_size(model, scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)  # the bytes are measured; no need to keep
        record = {
            "model": cell.model,
            "method": cell.method,
            "passes": cell.passes,
            "eval": self.quality(model),
            "disk_bytes": size.disk_bytes,
            "resident_bytes": size.resident_bytes,
            "expert_bytes": size.expert_bytes,
            "seconds": time.perf_counter() - started,
            "key": self.key,
        }
        write_verified_json(self.folder() / f"{cell.name}.json", record)
        return record | {"fractions": cell.fractions}

    def compressed(self, cell: Cell) -> nn.Module:
        """A copy of the trained model with ``cell``'s passes applied."""
        model = copy.deepcopy(self.model)
        reduce_domains = {"domains": self.domains} if _wants_domain(cell) else {}
        return compress(model, cell.passes, self.calibration, **reduce_domains)

    def quality(self, model: nn.Module) -> dict[str, dict[str, float]]:
        """Per validation domain and over all of them (token-weighted): perplexity, loss,
        experts and MoE FLOPs per token."""
        c, batches = self.config, self.settings.eval_batches
        parts = {
            name: evaluate(model, tokens, c.batch_size, c.seq_len, batches).to_dict()
            for name, tokens in self.validation.items()
        }
        tokens = sum(p["tokens"] for p in parts.values())
        overall = {
            key: sum(p[key] * p["tokens"] for p in parts.values()) / tokens
            for key in ("loss", "experts_per_token", "moe_flops_per_token")
        }
        overall["perplexity"] = math.exp(overall["loss"])
        return parts | {"all": overall | {"tokens": tokens}}


def _wants_domain(cell: Cell) -> bool:
    """Whether a pass of ``cell`` calibrates on one domain's windows (a ``domain`` option)."""
    return any("domain" in options for _, options in cell.passes)


def run_grid(settings: CompressionGridSettings) -> tuple[list[dict[str, Any]], list[str], dict]:
    """Every cell of every model: ``(records, notes, the models' train configs)``."""
    records, notes, configs = [], [], {}
    # every model trains on the same data (the corpus; synthetic tokens with quick)
    data = load_token_data(model_config(settings.models[0], settings), settings.progress)
    for name in settings.models:
        model, config, _ = trained_model(name, settings, data)
        model.to(config.resolve_device())
        configs[name] = config.to_dict()
        experts = experts_of(model, list(domain_parts(data.val, data.val_domains)))
        cells, skipped = plan_cells(name, experts, settings)
        notes += skipped
        grid = CompressionGrid(model, config, data, settings)
        for cell in tqdm(cells, desc=f"compress-grid {name}", disable=not settings.progress):
            records.append(grid.measure(cell))
    return records, notes, configs
