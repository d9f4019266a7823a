"""The life of a multi-process run: ranks die with their launcher, SIGTERM stops a run as Ctrl-C
does, a dead or stopped rank is named at once, and a run ends without a leaked semaphore.

The CLI runs here are real ``xmoe train`` processes (the tiny preset); a test acts only once the
run has written its first log line, and waits for outcomes by polling with generous deadlines, so
a loaded machine makes a test slower, never wrong. Process trees are read from ``/proc`` (Linux).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch.distributed as dist

import xmoe
from xmoe.distributed import DistributedError, launch
from xmoe.training.rundir import RunDir

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")

DEADLINE_S = 120.0  # for anything to happen; healthy runs take seconds
SRC = str(Path(xmoe.__file__).parents[1])


def _wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"still not {what} after {DEADLINE_S:.0f} s")
        time.sleep(0.1)


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state, ppid, ...); None when gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None


def _alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"  # a zombie has exited, only not yet reaped


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        fields = _stat(int(entry)) if entry.isdigit() else None
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _train(run: Path, nproc: int, *overrides: str) -> subprocess.Popen:
    argv = ["train", "--preset", "tiny", "--nproc", str(nproc), "--out", str(run)]
    argv += ["--no-progress", f"grad_accum_steps={nproc}", "log_interval=1", *overrides]
    path = os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")]))
    return subprocess.Popen(
        [sys.executable, "-m", "xmoe.cli.main", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": path},
    )


def _has_lines(path: Path) -> bool:
    return path.exists() and path.stat().st_size > 0


@pytest.fixture
def training(tmp_path):
    """Start a run that trains until stopped: ``training(nproc)`` returns the launcher once the
    run has logged a step, and its processes then (with 2 ranks: the fork server, the resource
    tracker and the ranks). Whatever of them a failed test leaves is killed afterwards."""
    started: list[int] = []

    def start(nproc: int) -> tuple[subprocess.Popen, set[int]]:
        launcher = _train(tmp_path / "run", nproc, "max_steps=1000000")
        started.append(launcher.pid)
        log = tmp_path / "run" / "log.jsonl"
        _wait_until(lambda: launcher.poll() is not None or _has_lines(log), "logging steps")
        assert launcher.poll() is None, launcher.communicate()
        processes = _descendants(launcher.pid)
        started.extend(processes)
        assert len(processes) >= (4 if nproc > 1 else 0)
        return launcher, processes

    yield start
    for pid in filter(_alive, started):
        os.kill(pid, signal.SIGKILL)


def _assert_all_gone_and_unlocked(processes: set[int], run: Path) -> None:
    _wait_until(lambda: not any(map(_alive, processes)), "all processes of the run gone")
    with RunDir(run).lock("the next launch"):  # a new run here is not refused as "in use"
        pass


@pytest.mark.slow
def test_the_ranks_die_with_their_launcher(training, tmp_path):
    launcher, processes = training(2)
    launcher.kill()
    launcher.communicate(timeout=DEADLINE_S)  # the pipes close when the run's last process exits
    _assert_all_gone_and_unlocked(processes, tmp_path / "run")


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_sigterm_stops_a_run_like_ctrl_c(training, tmp_path, nproc):
    launcher, processes = training(nproc)
    launcher.send_signal(signal.SIGTERM)
    _, err = launcher.communicate(timeout=DEADLINE_S)
    assert launcher.returncode == 143, err
    assert err.strip().splitlines() == ["xmoe: terminated (SIGTERM)"]
    _assert_all_gone_and_unlocked(processes, tmp_path / "run")


@pytest.mark.slow
def test_a_two_rank_run_ends_without_a_leaked_semaphore(tmp_path):
    launcher = _train(tmp_path / "run", 2, "max_steps=1", "eval_batches=1")
    out, err = launcher.communicate(timeout=DEADLINE_S)
    assert launcher.returncode == 0, err
    assert "tiny: 1 steps" in out
    assert "leaked semaphore" not in err


# --- launch(): a rank that dies or stops ------------------------------------------------------


def _rank_1_stops(how: str, pids: str) -> None:
    """Both ranks note their pid; then rank 1 is killed or stopped (``how``: a signal name)
    while rank 0 waits for it in a collective."""
    Path(pids, str(dist.get_rank())).write_text(str(os.getpid()))
    dist.barrier()
    if dist.get_rank() == 1:
        os.kill(os.getpid(), signal.Signals[how])
    dist.barrier()


@pytest.mark.parametrize(
    ("how", "options", "reported"),
    [
        ("SIGKILL", {}, "rank 1 of 2 died (killed by SIGKILL) without reporting"),
        ("SIGSTOP", {"stall_s": 1}, "rank 1 of 2 (pid {pid}) was stopped (SIGSTOP) for 1 s"),
    ],
)
def test_a_dead_or_stopped_rank_is_named_and_every_rank_stopped(tmp_path, how, options, reported):
    with pytest.raises(DistributedError) as raised:
        launch(_rank_1_stops, 2, how, str(tmp_path), deadline_s=DEADLINE_S, threads=1, **options)
    pids = {int(path.name): int(path.read_text()) for path in tmp_path.iterdir()}
    assert str(raised.value).startswith(reported.format(pid=pids[1]))
    assert not any(map(_alive, pids.values()))  # launch() returns once every rank is gone


def test_launch_checks_stall_s():
    with pytest.raises(ValueError, match=r"stall_s=0 is invalid: stall_s must be > 0"):
        launch(print, 2, stall_s=0)
