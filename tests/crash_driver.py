"""A process that crashes on cue, for the crash-safety tests.

Run as ``python tests/crash_driver.py``; it imports torch and xmoe once, then reads one JSON
command per line on stdin and answers one JSON line on stdout. Each job runs in a forked child
that SIGKILLs itself at its ``kill_at``-th *crash point* (0: never), so every test is
deterministic: no timer decides where a process dies.

Crash points are counted on entry to every file-system call that xmoe makes through ``os``
(open, write, fsync, link, replace, unlink, ftruncate), to the safetensors serialiser, to each
log append and to each optimizer step.

Commands:
    {"job": "save", "path": P, "value": V, "kill_at": K, "chunk_bytes": N}
        save_checkpoint(P, a checkpoint whose tensor "w" is full of V, step V)
    {"job": "resume-save", "path": D, "value": V, "kill_at": K}
        what a resume does in run directory D: lock it, load its checkpoint as a writer
        (falling back and moving a damaged latest aside), then save a checkpoint of step V
    {"job": "train", "argv": [...], "kill_at": K}
        xmoe.cli.main.main(argv)
    {"job": "train", "argv": [...], "pause_after_steps": S, "paused": F, "release": R,
     "wait": false}
        run the CLI, but after S optimizer steps create file F and wait until file R exists;
        with "wait": false the answer comes at once and {"job": "wait"} collects the result.
Answers: {"killed": bool, "exit": code or null, "points": crash points passed, "pid": pid}.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import torch

import xmoe.storage
from xmoe.cli.main import main as cli_main
from xmoe.training import rundir
from xmoe.training.checkpoint import Checkpoint, save_checkpoint

torch.set_num_threads(1)  # no thread pool before fork()

_OS_CALLS = ("open", "write", "fsync", "link", "replace", "unlink", "ftruncate")


def _install_crash_points(kill_at: int, on_step=None) -> list[int]:
    """Wrap every crash point; SIGKILL this process when the ``kill_at``-th is reached."""
    passed = [0]

    def point() -> None:
        passed[0] += 1
        if passed[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def wrap(owner, name, after=None):
        original = getattr(owner, name)

        def wrapped(*args, **kwargs):
            point()
            result = original(*args, **kwargs)
            if after is not None:
                after()
            return result

        setattr(owner, name, wrapped)

    for name in _OS_CALLS:
        wrap(os, name)
    wrap(xmoe.storage, "serialize_tensors")
    wrap(rundir.RunLog, "append")
    wrap(torch.optim.AdamW, "step", after=on_step)
    return passed


def _pause(after_steps: int, paused: str, release: str):
    steps = [0]

    def on_step() -> None:
        steps[0] += 1
        if steps[0] == after_steps:
            with open(paused, "w") as handle:
                handle.write(str(os.getpid()))
            while not os.path.exists(release):
                time.sleep(0.05)

    return on_step


def _child(command: dict, report_fd: int) -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    on_step = None
    if "pause_after_steps" in command:
        on_step = _pause(command["pause_after_steps"], command["paused"], command["release"])
    write = os.write
    passed = _install_crash_points(command.get("kill_at", 0), on_step)
    code = 0
    if command["job"] == "save":
        xmoe.storage.WRITE_CHUNK_BYTES = command.get("chunk_bytes", 1 << 20)
        value = float(command["value"])
        model = {"w": torch.full((1024, 1024), value)}
        save_checkpoint(command["path"], Checkpoint(model, None, {}, {"step": int(value)}))
    elif command["job"] == "resume-save":
        run = rundir.RunDir(command["path"])
        with run.lock():
            run.load_checkpoint(writer=True)
            value = float(command["value"])
            model = {"w": torch.full((64, 64), value)}
            run.save_checkpoint(Checkpoint(model, None, {}, {"step": int(value)}))
    else:
        code = cli_main(command["argv"])
    write(report_fd, json.dumps({"points": passed[0]}).encode())
    os._exit(code)


def _run(command: dict) -> dict | tuple:
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        try:
            _child(command, write_fd)
        finally:
            os._exit(99)
    os.close(write_fd)
    return pid, read_fd


def _collect(pid: int, read_fd: int) -> dict:
    report = b""
    while chunk := os.read(read_fd, 4096):
        report += chunk
    os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    answer = {"killed": killed, "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}
    answer |= {"pid": pid, "points": json.loads(report)["points"] if report else None}
    return answer


def serve() -> None:
    print(json.dumps({"ready": True}), flush=True)
    pending = None
    for line in sys.stdin:
        command = json.loads(line)
        if command["job"] == "wait":
            answer = _collect(*pending)
            pending = None
        else:
            started = _run(command)
            if command.get("wait", True):
                answer = _collect(*started)
            else:
                pending = started
                answer = {"pid": started[0]}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    serve()
