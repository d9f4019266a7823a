"""Start N processes on this machine, each in an initialised process group, and collect results.

``launch(fn, nproc, *args)`` runs ``fn(*args)`` on ranks 0..N-1 (new processes, see
:func:`_context`), in a
process group rendezvousing through a file in a fresh temporary directory (``file://``: no TCP
port to pick, so no port race), with gloo on CPU and NCCL when CUDA is present (one GPU per
rank). It returns the ranks' results in rank order, or raises :class:`DistributedError` with the
cause once every rank has stopped: a rank that died without reporting (named, with its signal or
exit code; the others' lost connections follow from it) or stayed stopped (SIGSTOP) for
``stall_s``, which stops the others at once; else the first error reported, after which the
others get a grace period to report theirs; or the ranks still running at ``deadline_s``.

Ranks die with their launcher, however it exits (SIGKILL included): each watches a pipe whose
only write end the launcher holds, and kills itself at its end-of-file; the fork server exits
once its ranks are gone. Ranks the launcher stops (Ctrl-C, SIGTERM, a failure elsewhere) get
SIGTERM, which they handle as Ctrl-C (they unwind: files closed, the run's lock released), and
SIGKILL if they are still there ``_EXIT_GRACE_S`` (15 s) later.

Under ``torchrun`` (``RANK``/``WORLD_SIZE`` set), :func:`init_from_env` joins the group instead.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import queue
import shutil
import signal
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from xmoe.distributed.groups import DistributedError

DEFAULT_TIMEOUT_S = 1800.0
DEFAULT_STALL_S = 60.0
_REPORT_GRACE_S = 30.0  # after a reported failure, the others get this long to report theirs
_EXIT_GRACE_S = 15.0  # a rank's time to exit on its own (or unwind on SIGTERM) before SIGKILL


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


def _die_with_launcher(lifeline) -> None:
    """Kill this rank when the launcher is gone: the launcher holds the only write end of the
    ``lifeline`` pipe, so reading it ends exactly when the launcher exits, however it exits.
    (PR_SET_PDEATHSIG would not do: a rank's parent is the fork server, not the launcher.)"""

    def watch() -> None:
        with contextlib.suppress(EOFError, OSError):
            lifeline.recv_bytes()  # nothing is ever sent: this returns only at end-of-file
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="xmoe-lifeline", daemon=True).start()


def _worker(
    rank, world, init_method, backend, timeout_s, threads, lifeline, results, fn, args
) -> None:
    _die_with_launcher(lifeline)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # the launcher's stop: as Ctrl-C
    if threads:
        torch.set_num_threads(threads)
    try:
        _init(rank, world, init_method, backend, timeout_s)
        value = fn(*args)
        results.put((rank, True, value))
    except BaseException as error:  # reported to the parent, which raises it
        results.put((rank, False, (type(error).__name__, str(error), traceback.format_exc())))
    finally:  # reported: a stop now would only print a traceback on the way out
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
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
    stall_s: float = DEFAULT_STALL_S,
) -> list[Any]:
    """Run ``fn(*args)`` on ``nproc`` ranks (see the module docstring); ``fn`` and ``args`` must
    be picklable (a module-level function).

    ``timeout_s``: how long a collective may wait for the other ranks before it fails (the
    process group's timeout). ``deadline_s``: stop every rank and raise once the whole run has
    taken this long (None: no limit; tests set one). ``threads``: torch intra-op threads per
    rank (default: the CPU count shared out, at least 1). ``stall_s``: how long a rank may stay
    stopped (SIGSTOP; the others wait for it in silence) before the run is stopped, naming it."""
    if not (isinstance(nproc, int) and nproc >= 1):
        raise ValueError(f"nproc={nproc!r} is invalid: nproc must be an integer >= 1")
    if not stall_s > 0:
        raise ValueError(f"stall_s={stall_s!r} is invalid: stall_s must be > 0 seconds")
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
    watched, lifeline = context.Pipe(duplex=False)  # the ranks read, only this process writes
    setup = (nproc, init_method, backend, timeout_s, threads, watched, results, fn, args)
    processes = [
        context.Process(target=_worker, args=(rank, *setup), daemon=False) for rank in range(nproc)
    ]
    reports: dict[int, tuple[bool, Any]] = {}
    try:
        for process in processes:
            process.start()
        found = _collect(processes, results, reports, deadline_s, stall_s)
    finally:
        try:
            _stop(processes, reported=set(reports))
        finally:
            lifeline.close()  # a rank still there now kills itself (_die_with_launcher)
            watched.close()
            shutil.rmtree(directory, ignore_errors=True)
    error = _failure(reports, found, nproc)
    if error is not None:
        raise error
    return [reports[rank][1] for rank in range(nproc)]


def _failure(reports, found: dict[int, str], nproc: int) -> DistributedError | None:
    """The error to raise, None when every rank succeeded. What the launcher found (a rank that
    died or stayed stopped) is the cause: the others' errors (lost connections) follow from it.
    Otherwise the first error reported, in arrival order (a peer's lost connection comes after
    the cause)."""
    failed = [(rank, value) for rank, (ok, value) in reports.items() if not ok]
    if not (found or failed):
        return None
    first = trace = ""
    if failed:
        rank, (name, message, trace) = failed[0]
        first = f"rank {rank} of {nproc}: {name}: {message}"
    if found:
        rank, why = next(iter(found.items()))
        cause = f"rank {rank} of {nproc} {why}"
        error = DistributedError(f"{cause}; then {first}" if first else cause)
    else:
        error = DistributedError(first)
    error.remote_traceback = trace  # type: ignore[attr-defined]
    return error


def _stop(processes, reported: set[int]) -> None:
    """Stop the ranks that have not reported as Ctrl-C would (SIGTERM, see :func:`_worker`;
    SIGCONT wakes a stopped one), give every rank ``_EXIT_GRACE_S`` to exit (one that reported
    is finishing: killed there, it would leave its named semaphores to the resource tracker,
    which warns of them), then SIGKILL those still there."""
    started = [(rank, process) for rank, process in enumerate(processes) if process.pid]
    for rank, process in started:
        if rank not in reported and process.exitcode is None:
            process.terminate()
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGCONT)
    until = time.monotonic() + _EXIT_GRACE_S
    for _, process in started:
        process.join(max(0.0, until - time.monotonic()))
    for _, process in started:
        if process.exitcode is None:
            process.kill()
            process.join()


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


def _collect(
    processes, results, reports, deadline_s: float | None, stall_s: float
) -> dict[int, str]:
    """Fill ``reports`` (rank -> (ok, value), in arrival order) until every rank has reported;
    returns what the launcher found itself, by rank: a rank that died without reporting or
    stayed stopped for ``stall_s`` (waiting stops at once: the others can only wait for it or
    fail on its lost connection), or ranks still running at ``deadline_s``. After the first
    reported failure, the others get ``_REPORT_GRACE_S`` to report theirs."""
    found: dict[int, str] = {}
    deadline = math.inf if deadline_s is None else time.monotonic() + deadline_s
    grace_until = math.inf
    stopped_since: dict[int, float] = {}
    while len(reports) < len(processes):
        try:
            rank, ok, value = results.get(timeout=0.2)
            reports[rank] = (ok, value)
            if not ok:
                grace_until = min(grace_until, time.monotonic() + _REPORT_GRACE_S)
            continue
        except queue.Empty:
            pass
        now = time.monotonic()
        for rank, process in enumerate(processes):
            if rank in reports:
                continue
            if process.exitcode is not None:
                _drain(results, reports)  # its report may still be in the pipe
                if rank not in reports:
                    found[rank] = f"died ({_exit_text(process.exitcode)}) without reporting"
            elif _is_stopped(process.pid):
                since = stopped_since.setdefault(rank, now)
                if now - since >= stall_s:
                    found[rank] = (
                        f"(pid {process.pid}) was stopped (SIGSTOP) for {stall_s:g} s while "
                        "the other ranks waited for it"
                    )
            else:
                stopped_since.pop(rank, None)
        if not found and now > deadline:
            late = [rank for rank in range(len(processes)) if rank not in reports]
            found = dict.fromkeys(late, f"did not finish within deadline_s={deadline_s:g} s")
        if found or now > grace_until:
            break
    return found


def _exit_text(exitcode: int) -> str:
    """``-9`` -> "killed by SIGKILL", ``3`` -> "exit code 3"."""
    if exitcode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-exitcode).name}"
    return f"exit code {exitcode}"


def _is_stopped(pid: int) -> bool:
    """Whether process ``pid`` is stopped by a signal (state T in ``/proc/<pid>/stat``; False
    where that cannot be read, as off Linux)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rpartition(b")")[2].split()
    except OSError:
        return False
    return fields[:1] == [b"T"]


def _drain(results, reports) -> None:
    while True:
        try:
            rank, ok, value = results.get(timeout=0.5)
        except queue.Empty:
            return
        reports[rank] = (ok, value)
