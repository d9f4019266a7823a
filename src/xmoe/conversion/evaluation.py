"""``xmoe sparsify --eval``: SmolLM2-135M made sparse, quality against compute.

A grid of expert size × partition × router × active fraction, each cell measured on held-out
Shakespeare and KJV windows (the LM corpus's fixed held-out works and books): perplexity, experts
per token, FFN FLOPs per token, and (for deployable routers) the FFN wall time and end-to-end
forward tokens/s against the dense model, timed side by side in this process. Plus the dense row
and the XMoE route (weighted combine trained at t=1, t lowered at inference).

The run is resumable: every finished cell is a JSON file under ``<out>/cells/``, every converted
model a verified safetensors file under ``<out>/models/``, every recovery fine-tune a checkpoint;
all written atomically. A rerun skips what is done and rewrites the report
(``<docs>/sparsify.md`` and ``sparsify.png``) after every cell, so an interrupted run still
leaves a report of what finished.

Shape legend: B windows, T tokens per window, S tokens, D hidden size, E experts, H neurons per
expert, I FFN width.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from xmoe import flops
from xmoe.conversion.recovery import RecoveryConfig, recover
from xmoe.conversion.report import write_report
from xmoe.conversion.sparsify import (
    _reconfigure,
    set_active_fraction,
    set_combine,
    set_threshold,
    sparse_mlps,
    sparsify,
)
from xmoe.routing.stats import layer_mean
from xmoe.storage import atomic_write_text, read_verified, save_verified

DOMAINS = ("shakespeare", "kjv")
ROUTER_ROWS = ("oracle", "trained", "recovered")
"""Router kinds of the report: the oracle (true output norms; computes every expert), the
trained linear router, and the trained router after a recovery fine-tune."""


def _positive_ints(name: str, values: tuple[int, ...]) -> None:
    if not values or not all(isinstance(v, int) and v >= 1 for v in values):
        raise ValueError(f"{name}={values!r} is invalid: give one or more ints >= 1")


@dataclass(frozen=True)
class EvalSettings:
    """What ``xmoe sparsify --eval`` measures, and where it writes.

    Args:
        out: run directory (cells, converted models, recovery checkpoints).
        docs: folder of the report ``sparsify.md`` and plot ``sparsify.png``.
        expert_sizes: neurons per expert, each dividing the FFN width (1536 for SmolLM2).
        fractions: top-k active fractions in (0, 1].
        partitions: ``clustered`` and/or ``contiguous``; the first one's groups run first.
        routers: ``oracle`` and/or ``trained``.
        recover: ``(expert_size, partition, fraction)`` configs to recovery-fine-tune at that
            fraction (then evaluated at every fraction).
        xmoe_route: expert size of the XMoE-route row (clustered partition), 0 for none.
        xmoe_thresholds: the thresholds t the XMoE route is evaluated at.
        xmoe_router_scale: the trained router's logits are scaled by this to start the XMoE
            route near the dense model (E·p ≈ 1).
        eval_tokens: held-out tokens per domain (windows of ``seq_len``, evenly spaced).
        seq_len: evaluation and calibration window length.
        calibration_tokens: Shakespeare training tokens the partition and routers learn from.
        router_steps: full-batch Adam steps per layer router.
        recovery: the recovery fine-tune settings (token budget, lr, ...).
        timing_tokens: tokens per timed forward (windows of ``seq_len``).
        timing_repeats: timed forwards per model (the median counts).
        eval_batch: windows per evaluation forward.
        cache_dir: corpus/model cache (None: ``$XMOE_CACHE_DIR`` or ``~/.cache/xmoe``).
        command: the command line recorded in the report.
        progress: tqdm bars.
    """

    out: Path = Path("runs/sparsify-eval")
    docs: Path = Path("docs/results")
    expert_sizes: tuple[int, ...] = (16, 64, 4)
    fractions: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    partitions: tuple[str, ...] = ("clustered", "contiguous")
    routers: tuple[str, ...] = ("trained", "oracle")
    recover: tuple[tuple[int, str, float], ...] = ((16, "clustered", 0.5),)
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
    command: str = "xmoe sparsify --eval"
    progress: bool = True

    def __post_init__(self) -> None:
        from xmoe.conversion.config import PARTITIONS

        _positive_ints("expert_sizes", self.expert_sizes)
        if not self.fractions or not all(
            isinstance(f, (int, float)) and 0 < f <= 1 for f in self.fractions
        ):
            raise ValueError(f"fractions={self.fractions!r} is invalid: give numbers in (0, 1]")
        if not self.partitions or not set(self.partitions) <= set(PARTITIONS):
            raise ValueError(f"partitions={self.partitions!r} is invalid: choose from {PARTITIONS}")
        if not self.routers or not set(self.routers) <= {"oracle", "trained"}:
            raise ValueError(
                f"routers={self.routers!r} is invalid: choose from ('oracle', 'trained')"
            )
        for size, partition, fraction in self.recover:
            if not (isinstance(size, int) and size >= 1 and partition in PARTITIONS):
                raise ValueError(f"recover entry {(size, partition, fraction)} is invalid")
            if not 0 < fraction <= 1:
                raise ValueError(f"recover fraction {fraction} is invalid: must be in (0, 1]")
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

    def measurement_key(self) -> dict[str, Any]:
        """The settings a cached cell depends on (a cell measured under others is redone)."""
        return {
            "eval_tokens": self.eval_tokens,
            "seq_len": self.seq_len,
            "calibration_tokens": self.calibration_tokens,
            "router_steps": self.router_steps,
            "timing_tokens": self.timing_tokens,
        }


# ---------------------------------------------------------------------------------------------
# data


def spaced_windows(ids: list[int], tokens: int, seq_len: int) -> torch.Tensor:
    """(tokens // seq_len, seq_len) int64 windows evenly spaced over ``ids`` (the first at the
    start, the last at the end), so a few thousand tokens sample a whole held-out split."""
    count = max(1, tokens // seq_len)
    if len(ids) < seq_len:
        raise ValueError(f"{len(ids)} tokens are fewer than one window of {seq_len}")
    starts = torch.linspace(0, len(ids) - seq_len, count).round().long().tolist()
    flat = torch.tensor(ids, dtype=torch.int64)
    return torch.stack([flat[s : s + seq_len] for s in starts])


def corpus_data(tokenizer, settings: EvalSettings) -> dict[str, torch.Tensor]:
    """Token windows, from the project's corpus and its fixed split (:mod:`xmoe.data.corpus`):
    ``calibration`` (Shakespeare training works), ``recovery`` (both training splits, windows
    alternating between the domains), and ``eval_<domain>`` (the held-out works / books)."""
    from xmoe.data.corpus import load_documents, split_documents

    train, val = split_documents(load_documents(settings.cache_dir))

    def ids(docs, domain: str) -> list[int]:
        text = "\n\n".join(doc.text for doc in docs if doc.domain == domain)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    data = {}
    for domain in DOMAINS:
        held_out = ids(val, domain)
        data[f"eval_{domain}"] = spaced_windows(held_out, settings.eval_tokens, settings.seq_len)
    train_ids = {domain: ids(train, domain) for domain in DOMAINS}
    data["calibration"] = spaced_windows(
        train_ids["shakespeare"], settings.calibration_tokens, settings.seq_len
    )
    rec = settings.recovery
    per_domain = math.ceil(rec.tokens / len(DOMAINS))
    parts = [spaced_windows(train_ids[d], per_domain, rec.seq_len) for d in DOMAINS]
    count = min(p.shape[0] for p in parts)
    data["recovery"] = torch.stack([p[:count] for p in parts], dim=1).reshape(-1, rec.seq_len)
    return data


def load_or_build_data(tokenizer, settings: EvalSettings, path: Path) -> dict[str, torch.Tensor]:
    """:func:`corpus_data`, cached in ``path`` (verified safetensors) for its settings."""
    key = json.dumps(
        settings.measurement_key() | {"recovery": settings.recovery.to_dict()}, sort_keys=True
    )
    if path.is_file():
        tensors, meta, _ = read_verified(path)
        if meta.get("key") == key:
            return tensors
    data = corpus_data(tokenizer, settings)
    save_verified(path, data, {"key": key})
    return data


# ---------------------------------------------------------------------------------------------
# measurements


def _mlps(model: nn.Module) -> list[nn.Module]:
    return [layer.mlp for layer in model.model.layers]


@torch.no_grad()
def measure_quality(model: nn.Module, data: dict[str, torch.Tensor], settings: EvalSettings,
                    desc: str) -> dict[str, Any]:  # fmt: skip
    """Perplexity per held-out domain, experts per token and FFN FLOPs per token.

    FFN FLOPs (:mod:`xmoe.flops`, SwiGLU): dense 6·D·I per layer; sparse 6·D·H per selected
    expert plus the router's 2·D·E (none for the oracle, which is not a deployable router: its
    ranking costs a dense FFN), per layer, averaged over the evaluated tokens.
    """
    config = model.config
    modules = sparse_mlps(model)
    selected = [0.0] * len(modules)
    tokens_seen = 0
    result: dict[str, Any] = {"ppl": {}, "nll": {}}
    batches = [(d, b) for d in DOMAINS for b in data[f"eval_{d}"].split(settings.eval_batch)]
    nll = dict.fromkeys(DOMAINS, 0.0)
    count = dict.fromkeys(DOMAINS, 0)
    for domain, ids_BT in tqdm(batches, desc=desc, disable=not settings.progress, leave=False):
        logits = model(input_ids=ids_BT, use_cache=False).logits[:, :-1].float()
        targets = ids_BT[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
        )
        nll[domain] += float(loss)
        count[domain] += targets.numel()
        for index, module in enumerate(modules):
            selected[index] += float(module.experts_per_token.double().sum())
        tokens_seen += ids_BT.numel()
    for domain in DOMAINS:
        result["nll"][domain] = nll[domain] / count[domain]
        result["ppl"][domain] = math.exp(result["nll"][domain])
    d_model = config.hidden_size
    dense_flops = flops.ffn_flops(d_model, config.intermediate_size, gated=True)
    if modules:
        per_layer = []
        for index, module in enumerate(modules):
            learned = module.settings.router == "learned"
            per_layer.append(
                flops.routed_flops_per_token(
                    selected[index],
                    tokens_seen,
                    flops.ffn_flops(d_model, module.expert_size, gated=True),
                    flops.router_flops(d_model, module.num_experts) if learned else 0,
                )
            )
        result["experts_per_token"] = layer_mean([s / tokens_seen for s in selected])
        result["active_share"] = result["experts_per_token"] / modules[0].num_experts
        result["ffn_flops"] = layer_mean(per_layer) * config.num_hidden_layers
    else:
        result["experts_per_token"] = None
        result["active_share"] = 1.0
        result["ffn_flops"] = float(dense_flops * config.num_hidden_layers)
    result["ffn_flops_share"] = result["ffn_flops"] / (dense_flops * config.num_hidden_layers)
    return result


class _FFNClock:
    """Sums the wall time spent inside a model's MLP modules (forward pre/post hooks)."""

    def __init__(self, model: nn.Module) -> None:
        self.total = 0.0
        self._start = 0.0
        self._handles = []
        for mlp in _mlps(model):
            self._handles.append(mlp.register_forward_pre_hook(self._enter))
            self._handles.append(mlp.register_forward_hook(self._leave))

    def _enter(self, module, args) -> None:
        self._start = time.perf_counter()

    def _leave(self, module, args, output) -> None:
        self.total += time.perf_counter() - self._start

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


@torch.no_grad()
def time_side_by_side(dense: nn.Module, sparse: nn.Module, ids_BT: torch.Tensor,
                      repeats: int) -> dict[str, float]:  # fmt: skip
    """Median FFN time and forward time of both models on the same batch, run alternately
    (dense, sparse, dense, ...) after one warm-up each, so load on the machine hits both.

    Returns:
        ``dense_ffn_s``, ``sparse_ffn_s``, ``dense_forward_s``, ``sparse_forward_s``,
        ``ffn_time_ratio`` (sparse / dense), ``tokens_per_s_ratio`` (sparse / dense).
    """
    clocks = {"dense": _FFNClock(dense), "sparse": _FFNClock(sparse)}
    models = {"dense": dense, "sparse": sparse}
    samples: dict[str, list[tuple[float, float]]] = {"dense": [], "sparse": []}
    try:
        for repeat in range(repeats + 1):
            for name, model in models.items():
                clocks[name].total = 0.0
                start = time.perf_counter()
                model(input_ids=ids_BT, use_cache=False)
                elapsed = time.perf_counter() - start
                if repeat:  # the first pass warms up
                    samples[name].append((clocks[name].total, elapsed))
    finally:
        for clock in clocks.values():
            clock.close()
    med = {
        name: (statistics.median(s[0] for s in rows), statistics.median(s[1] for s in rows))
        for name, rows in samples.items()
    }
    return {
        "dense_ffn_s": med["dense"][0],
        "sparse_ffn_s": med["sparse"][0],
        "dense_forward_s": med["dense"][1],
        "sparse_forward_s": med["sparse"][1],
        "ffn_time_ratio": med["sparse"][0] / med["dense"][0],
        "tokens_per_s_ratio": med["dense"][1] / med["sparse"][1],
        "dense_tokens_per_s": ids_BT.numel() / med["dense"][1],
        "sparse_tokens_per_s": ids_BT.numel() / med["sparse"][1],
    }


# ---------------------------------------------------------------------------------------------
# converted models, cached


def _mlp_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if ".mlp." in k}


class Runner:
    """Runs the grid cell by cell; every result is cached under ``settings.out``."""

    def __init__(self, settings: EvalSettings) -> None:
        from xmoe.conversion.real_model import load_real_model

        self.settings = settings
        self.out = Path(settings.out)
        (self.out / "cells").mkdir(parents=True, exist_ok=True)
        (self.out / "models").mkdir(parents=True, exist_ok=True)
        self.dense, self.tokenizer, self.model_dir = load_real_model(settings.cache_dir)
        self.data = load_or_build_data(self.tokenizer, settings, self.out / "data.safetensors")
        self._mlp_inputs: list[torch.Tensor] | None = None
        self.key = settings.measurement_key()
        self.after_cell: Callable[[], Any] | None = None
        """Called after every stored cell (``run_eval`` rewrites the report there)."""

    # -- cells ---------------------------------------------------------------------------------
    def cell_path(self, name: str) -> Path:
        return self.out / "cells" / f"{name}.json"

    def cached(self, name: str) -> dict[str, Any] | None:
        path = self.cell_path(name)
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError:
            return None
        return record if record.get("key") == self.key else None

    def store(self, name: str, record: dict[str, Any]) -> None:
        record = record | {"key": self.key, "name": name}
        atomic_write_text(self.cell_path(name), json.dumps(record, indent=1, sort_keys=True))
        if self.after_cell is not None:
            self.after_cell()

    def all_cells(self) -> list[dict[str, Any]]:
        cells = []
        for path in sorted((self.out / "cells").glob("*.json")):
            try:
                record = json.loads(path.read_text())
            except json.JSONDecodeError:
                continue
            if record.get("key") == self.key:
                cells.append(record)
        return cells

    # -- models --------------------------------------------------------------------------------
    def mlp_inputs(self) -> list[torch.Tensor]:
        if self._mlp_inputs is None:
            from xmoe.conversion.calibration import collect_mlp_inputs

            self._mlp_inputs = collect_mlp_inputs(
                self.dense,
                _mlps(self.dense),
                self.data["calibration"],
                batch_size=self.settings.eval_batch,
                progress=self.settings.progress,
            )
        return self._mlp_inputs

    def converted(self, size: int, partition: str) -> nn.Module:
        """The dense model converted with this expert size and partition, learned router
        trained (cached in ``models/<partition>-H<size>.safetensors``)."""
        path = self.out / "models" / f"{partition}-H{size}.safetensors"
        tag = json.dumps(self.key, sort_keys=True)
        if path.is_file():
            tensors, meta, _ = read_verified(path)
            if meta.get("key") == tag:
                model = sparsify(self.dense, size, "contiguous", router="oracle")
                model.load_state_dict(tensors, strict=False)
                _reconfigure(model, partition=partition, router="learned")
                return model
        model = sparsify(
            self.dense,
            size,
            partition,
            router="learned",
            mlp_inputs=self.mlp_inputs(),
            router_steps=self.settings.router_steps,
            cluster_tokens=self.settings.calibration_tokens,
            progress=self.settings.progress,
        )
        save_verified(path, _mlp_state(model), {"key": tag})
        return model

    def recovered(self, size: int, partition: str, fraction: float) -> nn.Module:
        model = self.converted(size, partition)
        set_active_fraction(model, fraction)
        checkpoint = self.out / "models" / f"recovered-{partition}-H{size}-f{fraction}.ckpt"
        recover(
            model,
            self.data["recovery"],
            self.settings.recovery,
            teacher=self.dense,
            checkpoint=checkpoint,
            progress=self.settings.progress,
            desc=f"recovery {partition} H={size} f={fraction}",
        )
        return model

    def xmoe_model(self, size: int) -> nn.Module:
        model = self.converted(size, "clustered")
        with torch.no_grad():
            for module in sparse_mlps(model):
                module.router.weight.mul_(self.settings.xmoe_router_scale)
        set_combine(model, "weighted")
        set_threshold(model, 1.0)
        recover(
            model,
            self.data["recovery"],
            self.settings.recovery,
            teacher=self.dense,
            checkpoint=self.out / "models" / f"xmoe-H{size}.ckpt",
            progress=self.settings.progress,
            desc=f"recovery xmoe H={size} t=1",
        )
        return model

    # -- one cell ------------------------------------------------------------------------------
    def measure(self, name: str, model: nn.Module, meta: dict[str, Any], timed: bool) -> None:
        record = dict(meta)
        record |= measure_quality(model, self.data, self.settings, desc=name)
        if timed:
            ids = self.data["eval_shakespeare"]
            windows = max(1, self.settings.timing_tokens // self.settings.seq_len)
            ids = ids[:windows] if ids.shape[0] >= windows else ids
            record["timing"] = time_side_by_side(
                self.dense, model, ids, self.settings.timing_repeats
            )
        else:
            record["timing"] = None
        self.store(name, record)


def cell_name(partition: str, size: int, router: str, fraction: float) -> str:
    return f"{partition}-H{size}-{router}-f{fraction:g}"


Job = tuple[list[str], Callable[[Runner], None]]


def plan(settings: EvalSettings) -> list[Job]:
    """The cells in the order they run: dense; the first partition's expert sizes, each followed
    by the recoveries (and the XMoE route) that start from it; then the other partitions. Each
    entry is ``(cell names, job)``; a job measures one conversion's cells, skipping cached ones."""
    jobs: list[Job] = []

    def dense_job(runner: Runner) -> None:
        if runner.cached("dense") is None:
            meta = {"kind": "dense", "router": "dense", "partition": None, "expert_size": None,
                    "fraction": 1.0}  # fmt: skip
            runner.measure("dense", runner.dense, meta, timed=False)

    jobs.append((["dense"], dense_job))

    def group(size: int, partition: str, full: bool) -> Job:
        names = []
        cells = []
        for router in settings.routers:
            for fraction in settings.fractions:
                if fraction == 1.0 and (router == "oracle" or not full):
                    continue  # every expert: the same model under any router
                names.append(cell_name(partition, size, router, fraction))
                cells.append((router, fraction))

        def job(runner: Runner) -> None:
            todo = [(n, c) for n, c in zip(names, cells, strict=True) if runner.cached(n) is None]
            if not todo:
                return
            model = runner.converted(size, partition)
            for name, (router, fraction) in todo:
                _reconfigure(model, router="learned" if router == "trained" else "oracle")
                set_active_fraction(model, fraction)
                meta = {"kind": "sparse", "router": router, "partition": partition,
                        "expert_size": size, "num_experts": sparse_mlps(model)[0].num_experts,
                        "fraction": fraction}  # fmt: skip
                runner.measure(name, model, meta, timed=router == "trained")

        return names, job

    first, *rest = settings.partitions
    extra: list[tuple[tuple[int, str], Job]] = []  # (the conversion it starts from, job)
    for size, partition, trained_at in settings.recover:
        names = [cell_name(partition, size, "recovered", f) for f in settings.fractions if f < 1]

        def recovery_job(runner: Runner, size=size, partition=partition, at=trained_at,
                         names=names) -> None:  # fmt: skip
            fractions = [f for f in settings.fractions if f < 1]
            if all(runner.cached(n) is not None for n in names):
                return
            model = runner.recovered(size, partition, at)
            for name, fraction in zip(names, fractions, strict=True):
                if runner.cached(name) is not None:
                    continue
                set_active_fraction(model, fraction)
                meta = {"kind": "sparse", "router": "recovered", "partition": partition,
                        "expert_size": size, "num_experts": sparse_mlps(model)[0].num_experts,
                        "fraction": fraction, "recovered_at": at,
                        "recovery": settings.recovery.to_dict()}  # fmt: skip
                runner.measure(name, model, meta, timed=True)

        extra.append(((size, partition), (names, recovery_job)))

    if settings.xmoe_route:
        size = settings.xmoe_route
        names = [f"xmoe-H{size}-t{t:g}" for t in settings.xmoe_thresholds]

        def xmoe_job(runner: Runner, size=size, names=names) -> None:
            if all(runner.cached(n) is not None for n in names):
                return
            model = runner.xmoe_model(size)
            for name, threshold in zip(names, settings.xmoe_thresholds, strict=True):
                if runner.cached(name) is not None:
                    continue
                set_threshold(model, threshold)
                meta = {"kind": "xmoe", "router": "xmoe", "partition": "clustered",
                        "expert_size": size, "num_experts": sparse_mlps(model)[0].num_experts,
                        "fraction": None, "threshold": threshold,
                        "router_scale": settings.xmoe_router_scale,
                        "recovery": settings.recovery.to_dict()}  # fmt: skip
                runner.measure(name, model, meta, timed=True)

        extra.append(((size, "clustered"), (names, xmoe_job)))

    # each recovery / XMoE job right after the measurements of the conversion it starts from
    for size in settings.expert_sizes:
        jobs.append(group(size, first, full=True))
        jobs.extend(job for source, job in extra if source == (size, first))
    jobs.extend(
        job for source, job in extra if source not in {(s, first) for s in settings.expert_sizes}
    )
    for partition in rest:
        for size in settings.expert_sizes:
            jobs.append(group(size, partition, full=False))
    return jobs


def run_eval(settings: EvalSettings) -> Path:
    """Run (or resume) the grid and write the report; returns the report's path."""
    runner = Runner(settings)
    jobs = plan(settings)
    expected = list(iter_names(settings))
    runner.after_cell = lambda: write_report(runner.all_cells(), settings, expected)
    bar = tqdm(total=len(expected), desc="sparsify eval cells", disable=not settings.progress)
    report = write_report(runner.all_cells(), settings, expected)
    for names, job in jobs:
        job(runner)
        bar.update(len(names))
    bar.close()
    report = write_report(runner.all_cells(), settings, expected)
    return report


def iter_names(settings: EvalSettings) -> Iterator[str]:
    """Every cell name the grid holds, in run order."""
    for names, _ in plan(settings):
        yield from names


__all__ = ["EvalSettings", "iter_names", "plan", "run_eval"]
