"""The training loop (nanoGPT-shaped): AdamW, warmup + cosine, clipping, accumulation,
periodic eval, atomic checkpoints and exact resume, JSONL metrics."""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from xmoe.data import TokenData, prepare_corpus, random_batch, synthetic_token_data
from xmoe.models import TransformerLM
from xmoe.routing import RoutingStats
from xmoe.training.checkpoint import Checkpoint, CheckpointError
from xmoe.training.config import TrainConfig
from xmoe.training.evaluate import EvalResult, autocast_context, evaluate
from xmoe.training.memory import check_run_memory
from xmoe.training.rundir import RunDir, tokenizer_file_sha256
from xmoe.training.step import DivergenceError, SingleProcess, StepLoss, lm_step_loss, train_step


@dataclass
class TrainResult:
    """Summary of a finished run: final validation metrics, throughput, where it was saved."""

    out_dir: Path
    steps: int
    final_eval: EvalResult
    train_tokens_per_second: float
    train_loss: float


def load_token_data(config: TrainConfig, progress: bool = True) -> TokenData:
    """The token arrays a config trains on (fetching and tokenizing the corpus once)."""
    if config.data == "synthetic":
        return synthetic_token_data(vocab_size=config.model.vocab_size)
    return prepare_corpus(vocab_size=config.model.vocab_size, progress=progress)


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at ``max_steps``."""
    warmup = round(config.warmup_fraction * config.max_steps)
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, config.max_steps - warmup)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * cosine


def build_optimizer(model: TransformerLM, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW that decays matrices and expert weights, not norms, biases, embeddings or router
    weights (for every router: decay flattens a router, and so raises experts per token)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        is_router = ".router." in f".{name}"  # decay would pull routers back toward uniform
        is_matrix = param.dim() >= 2 and not name.startswith("embed.") and not is_router
        (decay if is_matrix else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2))


def training_loss(
    model: TransformerLM,
    config: TrainConfig,
    device: torch.device,
    batch: tuple[torch.Tensor, torch.Tensor],
) -> StepLoss:
    """The training loss of one ``(inputs_BT, targets_BT)`` batch under the run's precision
    (bf16 autocast or fp32): what every training step of ``config`` computes."""
    with autocast_context(config.precision, device):
        return lm_step_loss(model, *batch)


def comparable_config(config_dict: dict) -> dict:
    """A config as compared on resume and for reuse: where it runs does not change the run,
    nor does the expert FFN implementation, which follows from it (``"auto"`` picks per device;
    runs written before ``"auto"`` became the default hold ``"xmoe"``)."""
    comparable = {k: v for k, v in config_dict.items() if k != "device"}
    moe = comparable["model"].get("moe")
    if moe is not None:
        moe = {k: v for k, v in moe.items() if k != "expert_ffn"}
        comparable["model"] = {**comparable["model"], "moe": moe}
    return comparable


def _routing_summary(routing: list[RoutingStats]) -> dict[str, float]:
    return RoutingStats.mean(routing).summary() if routing else {}


def train(
    config: TrainConfig,
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    data: TokenData | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    parallel: SingleProcess | None = None,
    fresh_optimizer: bool = False,
) -> TrainResult:
    """Train (or resume) a run into ``out_dir``, holding the run's lock throughout.

    Args:
        config: the run. out_dir: where checkpoint, config, tokenizer and log live.
        resume: continue from ``out_dir``'s checkpoint (its config must match ``config``);
            without it, an existing checkpoint is an error rather than silently overwritten.
        data: token arrays to use instead of :func:`load_token_data` (tests).
        progress: show a tqdm bar (on stderr).
        stop_after: stop (after checkpointing) once this many steps are done, as if the
            process had been interrupted there; the schedule still targets ``max_steps``.
        parallel: the hooks of one rank of an expert-parallel run
            (:class:`xmoe.distributed.training.ExpertParallelTraining`, what ``xmoe train --nproc``
            and :func:`xmoe.distributed.training.train_distributed` pass); None for one process.
            Rank 0 holds the lock and writes the run's files.
        fresh_optimizer: with ``resume``, restore the model, RNG states and step but start the
            optimizer state afresh (for a checkpoint whose optimizer state is damaged); the run
            then differs from one never interrupted.

    Raises:
        LockedError: another process is writing ``out_dir``.
        DivergenceError: a non-finite loss or gradient norm; the last checkpoint is kept.
    """
    par = parallel if parallel is not None else SingleProcess()
    run = RunDir(out_dir)
    with contextlib.ExitStack() as stack:

        def start() -> None:
            par.check_config(config)
            check_run_memory(config, par.world_size)  # before any size reaches an allocator
            if par.is_main:  # rank 0 writes the run; the others only read its checkpoint
                stack.enter_context(run.lock("xmoe train"))
            if run.has_checkpoint and not resume:
                raise FileExistsError(
                    f"{run.checkpoint_path} exists: pass resume=True (--resume) to continue it "
                    "or pick another out"
                )

        par.agree(start)

        def resume_state() -> Checkpoint | None:
            return _resume_state(run, config, par, fresh_optimizer) if resume else None

        # rank 0 first: it may move a damaged checkpoint aside, which the others then skip
        resume_from = par.agree(lambda: resume_state() if par.is_main else None, "resuming")
        if not par.is_main:
            resume_from = resume_state()
        result = _train_locked(config, run, resume_from, data, progress, stop_after, par)
    return result


def _resume_state(
    run: RunDir, config: TrainConfig, par: SingleProcess, fresh_optimizer: bool
) -> Checkpoint | None:
    """The checkpoint to resume from (None: start at step 0), its config checked against
    ``config``. Without a checkpoint, a run whose log shows that it had one is refused."""
    if not run.has_checkpoint:
        _check_no_checkpoint_was_lost(run, config)
        return None
    if fresh_optimizer:
        state = run.load_checkpoint(("model", "rng"), writer=par.is_main)
        warnings.warn(
            f"resuming step {state.meta['step']} with a fresh optimizer state (as asked): the "
            "run is no longer identical to one never interrupted",
            stacklevel=3,
        )
    else:
        state = _load_full_state(run, par)
    if comparable_config(state.meta["train_config"]) != comparable_config(config.to_dict()):
        raise CheckpointError(
            f"{run.checkpoint_path} was written by a different config; resume with the "
            "same settings"
        )
    threads = state.meta.get("threads")
    if threads is not None and threads != torch.get_num_threads():
        warnings.warn(
            f"this run was trained at thread count {threads} and resumes at "
            f"{torch.get_num_threads()}: the results will differ slightly from an uninterrupted "
            f"run (bit-identical resume needs the same count: --threads {threads})",
            stacklevel=3,
        )
    return state


def _load_full_state(run: RunDir, par: SingleProcess) -> Checkpoint:
    """The whole checkpoint; when only its optimizer state fails to verify, an error that says
    how to continue."""
    try:
        return run.load_checkpoint(writer=par.is_main)
    except CheckpointError as error:
        with warnings.catch_warnings():  # a probe: its fallback warnings are not news
            warnings.simplefilter("ignore")
            try:
                usable = run.load_checkpoint(("model", "rng"))
            except CheckpointError:
                raise error from None
        raise CheckpointError(
            f"{error}. Only the optimizer state is damaged: the model and RNG states of step "
            f"{usable.meta['step']} verify; resume from them with a fresh optimizer state with "
            "--fresh-optimizer (fresh_optimizer=True)"
        ) from None


def _check_no_checkpoint_was_lost(run: RunDir, config: TrainConfig) -> None:
    """``--resume`` finds no checkpoint: refuse when the log shows one was written (the log
    records steps past the first checkpoint), say so when only the run's other files are there
    (killed before the first checkpoint), and start quietly in a new directory."""
    reached = max((int(record["step"]) for record in run.read_log()), default=0)
    first = min(config.checkpoint_interval, config.max_steps)
    if reached > first:  # a step's record follows the checkpoints of all earlier steps
        raise CheckpointError(
            f"cannot resume {run.path}: its checkpoints are gone ({run.checkpoint_path.name} "
            f"and {run.previous_checkpoint_path.name}) but its log reaches step {reached}, past "
            f"the first checkpoint (step {first}); restore them, or train without --resume to "
            "start again from step 0"
        )
    if reached or run.config_path.exists():
        warnings.warn(
            f"{run.path} has no checkpoint to resume (killed before the first one?): "
            "starting from step 0",
            stacklevel=4,
        )


def _train_locked(
    config: TrainConfig,
    run: RunDir,
    resume_from: Checkpoint | None,
    data: TokenData | None,
    progress: bool,
    stop_after: int | None,
    par: SingleProcess,
) -> TrainResult:
    if data is None:  # rank 0 first: it fetches and caches the corpus the others then read
        data = par.agree(lambda: load_token_data(config, progress) if par.is_main else None)
        data = data if data is not None else load_token_data(config, progress=False)
    if data.vocab_size != config.model.vocab_size:
        raise ValueError(
            f"data has vocab_size={data.vocab_size}, model.vocab_size={config.model.vocab_size}"
        )

    device = config.resolve_device()
    torch.manual_seed(config.seed)
    model = TransformerLM(config.model).to(device)
    par.prepare(model)  # expert parallelism: keep this rank's experts (same init as one process)
    optimizer = build_optimizer(model, config)
    data_rng = torch.Generator().manual_seed(config.seed + 1)
    step = 0
    state = resume_from
    if state is not None:
        par.load_model_state(model, state.model_state)
        if state.optimizer_state is not None:  # None: a fresh optimizer state, as asked
            par.load_optimizer_state(optimizer, model, state.optimizer_state)
        torch.set_rng_state(state.rng_state["torch"])
        data_rng.set_state(state.rng_state["data"])
        if device.type == "cuda" and "cuda" in state.rng_state:
            torch.cuda.set_rng_state(state.rng_state["cuda"])
        step = int(state.meta["step"])
    meta_extra = {"threads": torch.get_num_threads()}  # bit-identical resume needs the same
    if data.tokenizer is not None:
        meta_extra["tokenizer_file_sha256"] = tokenizer_file_sha256(data.tokenizer)

    def write_run_files() -> None:
        if not par.is_main:
            return
        run.truncate_log(step)  # lines past the checkpoint (or all, without one) are redone
        run.write_config(config.to_dict())
        if data.tokenizer is not None:
            run.save_tokenizer(data.tokenizer)

    par.agree(write_run_files)

    def checkpoint(at_step: int) -> None:
        bad = par.nonfinite_parameters(model)
        if bad:
            raise DivergenceError(
                f"step {at_step}: non-finite values in {bad[:3]}{'...' if len(bad) > 3 else ''}; "
                "the last checkpoint was kept"
            )
        meta = {"step": at_step, "train_config": config.to_dict(), **meta_extra}
        rng = {"torch": torch.get_rng_state(), "data": data_rng.get_state()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state()
        model_state, optimizer_state = par.full_state(model, optimizer)  # gathered on rank 0
        if par.is_main:
            par.agree(
                lambda: run.save_checkpoint(Checkpoint(model_state, optimizer_state, rng, meta)),
                "saving the checkpoint",
            )
        else:
            par.agree(lambda: None, "saving the checkpoint")

    def run_eval() -> EvalResult:
        return evaluate(
            model, data.val, config.batch_size, config.seq_len, config.eval_batches,
            config.precision,
        )  # fmt: skip

    def micro_batches():
        for index in range(config.grad_accum_steps):
            x_BT, y_BT = random_batch(data.train, config.batch_size, config.seq_len, data_rng)
            if par.owns_micro_batch(index, config.grad_accum_steps):  # every rank draws all,
                yield x_BT.to(device), y_BT.to(device)  # so the generators agree

    loss_of = partial(training_loss, model, config, device)
    last_step = config.max_steps if stop_after is None else min(config.max_steps, stop_after)
    model.train()
    log = run.open_log() if par.is_main else _NoLog()
    bar = tqdm(total=config.max_steps, initial=step, desc=config.preset, disable=not progress)
    train_seconds = train_tokens = 0.0
    loss_value = float("nan")
    final_eval = None
    try:
        while step < last_step:
            started = time.perf_counter()
            lr = learning_rate(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            stats = train_step(
                model, optimizer, micro_batches(), loss_of, accumulation=config.grad_accum_steps,
                max_norm=config.clip_norm,
                parallel=par, what=f"step {step + 1}",
            )  # fmt: skip
            loss_sum, aux_sum, grad_norm = stats.loss, stats.aux_loss, stats.grad_norm
            par.end_training_step(model)
            step += 1
            elapsed = time.perf_counter() - started
            train_seconds += elapsed
            train_tokens += config.tokens_per_step
            loss_value = loss_sum
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{config.tokens_per_step / elapsed:.0f}")
            if step % config.log_interval == 0 or step == last_step:
                record = {"step": step, "loss": loss_sum, "aux_loss": aux_sum, "lr": lr}
                record |= {
                    "grad_norm": grad_norm,
                    "tokens_per_second": train_tokens / train_seconds,
                }
                record |= {f"aux_{name}": value for name, value in stats.aux_losses.items()}
                record |= par.from_last_micro_batch(
                    _routing_summary(stats.routing), config.grad_accum_steps
                )
                scales = [float(m.router.logit_scale) for m in model.moe_layers
                          if hasattr(m.router, "logit_scale")]  # fmt: skip
                if scales:
                    record["logit_scale"] = sum(scales) / len(scales)
                log.append(record)
            if step % config.eval_interval == 0 or step == config.max_steps:
                final_eval = run_eval()
                log.append({"step": step, "eval": final_eval.to_dict()})
                bar.set_postfix(loss=f"{loss_sum:.3f}", val_ppl=f"{final_eval.perplexity:.2f}")
            if step % config.checkpoint_interval == 0 or step == last_step:
                log.sync()  # the log reaches the disk before the checkpoint that covers it
                checkpoint(step)
    finally:
        bar.close()
        log.close()
    if final_eval is None:
        final_eval = run_eval()
    tokens_per_second = train_tokens / train_seconds if train_seconds else float("nan")
    return TrainResult(run.path, step, final_eval, tokens_per_second, loss_value)


class _NoLog:
    """The log of ranks other than 0: they write nothing."""

    def append(self, record) -> None:
        pass

    def sync(self) -> None:
        pass

    def close(self) -> None:
        pass


def load_model(path: str | os.PathLike) -> tuple[TransformerLM, TrainConfig, dict]:
    """A trained model (eval mode) from a run directory or checkpoint file, its config and
    checkpoint metadata (see :meth:`RunDir.load_model`)."""
    return RunDir(path).load_model()
