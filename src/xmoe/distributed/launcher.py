"""Start N processes on this machine, each in an initialised process group, and collect results.

``launch(fn, nproc, *args)`` runs ``fn(*args)`` on ranks 0..N-1 (new processes, see
:func:`_context`), in a
process group rendezvousing through a file in a fresh temporary directory (``file://``: no TCP
port to pick, so no port race), with gloo on CPU and NCCL when CUDA is present (one GPU per
rank). It returns the ranks' results in rank order, or raises :class:`DistributedError` with the
first error reported (the cause; the others' lost connections come later) once every rank has
stopped; a rank that
dies without reporting, or a run past its ``deadline_s``, stops the others.

Under ``torchrun`` (``RANK``/``WORLD_SIZE`` set), :func:`init_from_env` joins the group instead.
"""

from __future__ import annotations

import datetime
import math
import os
import queue
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from xmoe.distributed.groups import DistributedError

DEFAULT_TIMEOUT_S = 1800.0


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def _init(rank: int, world: int, init_method: str, backend: str, timeout_s: float) -> None:
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(
        backend,
        init_method=init_method,
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def init_from_env(timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Join the process group torchrun describes (``env://``); False when not under torchrun
    or with a world of one."""
    if dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = default_backend()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def _worker(rank, world, init_method, backend, timeout_s, threads, results, fn, args) -> None:
    if threads:
        torch.set_num_threads(threads)
    try:
        _init(rank, world, init_method, backend, timeout_s)
        value = fn(*args)
        results.put((rank, True, value))
    except BaseException as error:  # reported to the parent, which raises it
        results.put((rank, False, (type(error).__name__, str(error), traceback.format_exc())))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(
    fn: Callable[..., Any],
    nproc: int,
    *args: Any,
    backend: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    deadline_s: float | None = None,
    threads: int | None = None,
) -> list[Any]:
    """Run ``fn(*args)`` on ``nproc`` ranks (see the module docstring); ``fn`` and ``args`` must
    be picklable (a module-level function).

    ``timeout_s``: how long a collective may wait for the other ranks before it fails (the
    process group's timeout). ``deadline_s``: stop every rank and raise once the whole run has
    taken this long (None: no limit; tests set one). ``threads``: torch intra-op threads per
    rank (default: the CPU count shared out, at least 1)."""
    if not (isinstance(nproc, int) and nproc >= 1):
        raise ValueError(f"nproc={nproc!r} is invalid: nproc must be an integer >= 1")
    backend = backend or default_backend()
    if backend == "nccl" and torch.cuda.device_count() < nproc:
        raise ValueError(
            f"nproc={nproc} is invalid with NCCL: only {torch.cuda.device_count()} GPUs"
        )
    threads = threads or max(1, (os.cpu_count() or 1) // nproc)
    directory = tempfile.mkdtemp(prefix="xmoe-rendezvous-")
    init_method = f"file://{os.path.join(directory, 'store')}"
    context = _context()
    results = context.Queue()
    processes = [
        context.Process(
            target=_worker,
            args=(rank, nproc, init_method, backend, timeout_s, threads, results, fn, args),
            daemon=False,
        )
        for rank in range(nproc)
    ]
    try:
        for process in processes:
            process.start()
        reports = _collect(processes, results, deadline_s)
    finally:
        try:
            for process in processes:
                if process.pid is None:  # never started
                    continue
                if process.is_alive():
                    process.terminate()
                process.join(timeout=10)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
    # in arrival order: the first error is the cause (a peer's lost connection comes after)
    failures = [(rank, report) for rank, (ok, report) in reports.items() if not ok]
    if failures:
        rank, (name, message, trace) = failures[0]
        error = DistributedError(f"rank {rank} of {nproc}: {name}: {message}")
        error.remote_traceback = trace  # type: ignore[attr-defined]
        raise error
    return [reports[rank][1] for rank in range(nproc)]


_PRELOAD = ["torch", "torch._dynamo", "xmoe", "xmoe.distributed.training", "xmoe.training"]
"""Imported once by the fork server: torch.optim's constructors import torch._dynamo (seconds)."""


def _context():
    """``forkserver`` where there is one (Linux): a server process imports torch and xmoe once,
    and every rank after that is a fork of it (no re-import, no threads or CUDA state inherited
    from the caller); ``spawn`` elsewhere."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)
    return context


def _collect(processes, results, deadline_s: float | None) -> dict[int, tuple[bool, Any]]:
    """Reports by rank; stops waiting (and fills in a report) for ranks that died silently,
    that outlive the first failure by a grace period, or when ``deadline_s`` passes."""
    reports: dict[int, tuple[bool, Any]] = {}
    deadline = math.inf if deadline_s is None else time.monotonic() + deadline_s
    grace_until = None  # after a failure, the others get this long to report their own errors
    while len(reports) < len(processes):
        try:
            rank, ok, value = results.get(timeout=0.2)
            reports[rank] = (ok, value)
            if not ok and grace_until is None:
                grace_until = time.monotonic() + 30.0
            continue
        except queue.Empty:
            pass
        now = time.monotonic()
        for rank, process in enumerate(processes):
            if rank not in reports and not process.is_alive() and process.exitcode is not None:
                _drain(results, reports)
                if rank not in reports:
                    why = f"exited with code {process.exitcode} without reporting"
                    reports[rank] = (False, ("ProcessExited", why, ""))
                    grace_until = grace_until or now + 30.0
        if now > deadline or (grace_until is not None and now > grace_until):
            for rank in range(len(processes)):
                if rank not in reports:
                    why = "timed out" if now > deadline else "stopped after another rank failed"
                    reports[rank] = (False, ("DistributedError", why, ""))
            break
    return reports


def _drain(results, reports) -> None:
    while True:
        try:
            rank, ok, value = results.get(timeout=0.5)
        except queue.Empty:
            return
        reports[rank] = (ok, value)
