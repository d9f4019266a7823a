"""Native kept-rows kernels for batch-1 decode, one C call each: the sum
``Σ_{j kept} a_j · rows[j, :]``, the dot products ``x · rows[i, :]`` of the kept rows i, and a
NeuronMLP's whole decode step built from them (:func:`native_neuron_decode`: masks, sums, silu
and dots; a layer's step is a few hundred µs, and the ~15 torch ops and two ctypes calls it
replaces cost ~100 of them). ``python -m benchmarks.sparsify_decode`` at F=0.5, MLPs alone
against dense, before and after the fused call: wina-greedy 1.56x → 1.88x, gate-first 1.14x →
1.59x.

:func:`~xmoe.conversion.sparse_decode.kept_rows_sum` calls the sum at one token. It measured
~1.5x faster than ``F.embedding_bag`` over SmolLM2-135M's 30 MLPs at 50% kept (fp32, 2 torch
threads, shared machine): it adds eight kept rows per pass over the output, so the output stays
in registers and L1 while eight row streams are read, where ``embedding_bag`` adds one row at a
time. :func:`~xmoe.conversion.sparse_decode.kept_rows_dot` calls the dot products (gate-first's
up projection, on the kept neurons only; torch has no op that reads only some rows of a GEMV
without copying them). Both run on the calling thread: splitting the columns over two OpenMP
threads (torch's runtime) measured up to 20x slower on the loaded machine, the second thread
waiting for a core.

The C source (``rows_kernel.c``) is compiled on first use with the system compiler (``$CC``,
else ``cc``; ``-O3 -march=native``) into ``<cache>/ops`` (``$XMOE_CACHE_DIR`` or
``~/.cache/xmoe``), named by a hash of the source, the compiler, its flags and the CPU, so a
change of any rebuilds; it is loaded through ctypes. Without a working compiler the callers fall
back to ``embedding_bag`` (and a dense GEMV for the dot products), and the reason is warned
once. ``XMOE_DECODE_KERNEL=embedding_bag`` (or :func:`using_kernel`) forces the fallback;
float64, non-CPU tensors, non-contiguous rows and inputs that autograd records always take it.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import torch

from xmoe.data.corpus import default_cache_dir
from xmoe.storage import temporary_name

KERNELS = ("native", "embedding_bag")
"""The kept-rows sums ``XMOE_DECODE_KERNEL`` chooses from (``native`` falls back when it
cannot be built)."""

SOURCE = Path(__file__).with_suffix(".c").read_text()
"""The kernels' C source (``rows_kernel.c`` beside this module)."""

FLAGS = ("-O3", "-march=native", "-shared", "-fPIC")
LIBRARIES = ("-lm",)
"""Linked after the source (``expf``, ``fabsf``)."""

_forced: list[str] = []
"""The kernel :func:`using_kernel` forces (innermost last); empty: ``XMOE_DECODE_KERNEL``."""


def native_kept_rows_sum(
    a_1N: torch.Tensor, keep_1N: torch.Tensor, rows_NR: torch.Tensor
) -> torch.Tensor | None:
    """``(a ⊙ keep) @ rows`` of one token, (1, R), from the kept rows only; None when the native
    kernel does not apply (another dtype or device, non-contiguous rows, autograd recording,
    ``embedding_bag`` chosen, or no compiler): the caller then sums them itself.

    Raises:
        ValueError: ``a`` or ``keep`` does not hold one entry per row of ``rows``.
    """
    library = _usable(a_1N, rows_NR)
    if library is None:
        return None
    _check("kept-rows sum", ("a", a_1N, rows_NR.shape[0]), keep_1N, rows_NR)
    status, out_1R = _rows_call(library.xmoe_kept_rows_sum_f32, a_1N, keep_1N, rows_NR, 1)
    if status != 0:
        raise MemoryError(f"kept-rows sum: no memory for the indices of {len(rows_NR)} rows")
    return out_1R


def native_kept_rows_dot(
    x_1R: torch.Tensor, keep_1N: torch.Tensor, rows_NR: torch.Tensor
) -> torch.Tensor | None:
    """``keep ⊙ (x @ rows^T)`` of one token, (1, N): the dot product of ``x`` with each kept
    row, 0 for the others, reading the kept rows only (gate-first's up projection: rows are
    ``up_proj.weight``'s neurons); None when the native kernel does not apply (as for
    :func:`native_kept_rows_sum`).

    Raises:
        ValueError: ``x`` does not hold one entry per column of ``rows``, or ``keep`` one per row.
    """
    library = _usable(x_1R, rows_NR)
    if library is None:
        return None
    _check("kept-rows dot", ("x", x_1R, rows_NR.shape[1]), keep_1N, rows_NR)
    return _rows_call(library.xmoe_kept_rows_dot_f32, x_1R, keep_1N, rows_NR, 0)[1]


def _rows_call(
    function, vector: torch.Tensor, keep: torch.Tensor, rows_NR: torch.Tensor, out_dim: int
) -> tuple[int | None, torch.Tensor]:
    """Call a kept-rows kernel ``(vector, keep, n, rows, r, out)``; ``out`` is (1, R) for
    ``out_dim`` 1 (a sum of rows), (1, N) for 0 (a value per row). Returns (status, out)."""
    vector, keep = vector.reshape(-1).contiguous(), keep.reshape(-1).contiguous()
    rows, width = rows_NR.shape
    out = torch.empty(1, rows_NR.shape[out_dim], dtype=torch.float32)
    pointers = (vector.data_ptr(), keep.data_ptr(), rows_NR.data_ptr(), out.data_ptr())
    return function(pointers[0], pointers[1], rows, pointers[2], width, pointers[3]), out


SITE_BITS = {"gate_up": 1, "down": 2, "gate": 4}
"""The fused decode's ``sites`` flags (``rows_kernel.c``)."""


def native_neuron_decode(
    x_1D: torch.Tensor,
    sites: tuple[str, ...],
    channels: tuple[torch.Tensor, torch.Tensor],
    neurons: tuple[torch.Tensor, torch.Tensor],
    tables: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """One token through a :class:`~xmoe.conversion.neuron_mlp.NeuronMLP`'s decode in one C
    call: ``(out (1, D), kept channels (1, D), kept neurons (1, I))`` (bool masks, all kept
    where ``sites`` masks nothing there), or None when the native kernels do not apply (as for
    :func:`native_kept_rows_sum`, for any operand).

    Args:
        sites: the sites applied (:data:`SITE_BITS`; ``gate`` and ``down`` not both).
        channels: ``(scale (D,), threshold (0-dim))`` of the ``gate_up`` site.
        neurons: ``(scale (I,), threshold (0-dim))`` of the neuron site (``gate`` or ``down``).
        tables: ``(first, up, down_ID)``: ``gate_up_DJ`` and None, or gate-first's ``gate_DI``
            and ``up_proj.weight`` (I, D) (:func:`~xmoe.conversion.sparse_decode.row_major`).
    """
    first, up, down_ID = tables
    gate_first = "gate" in sites
    operands = [x_1D, first, down_ID, channels[0], neurons[0], *([up] if gate_first else [])]
    if not all(_applies(x_1D, t.reshape(1, -1) if t.dim() == 1 else t) for t in operands[1:]):
        return None
    library = _usable(x_1D, first)
    if library is None:
        return None
    width, ffn = down_ID.shape[1], down_ID.shape[0]
    if x_1D.numel() != width or first.shape != (width, ffn if gate_first else 2 * ffn):
        raise ValueError(
            f"neuron decode: x {tuple(x_1D.shape)} and first table {tuple(first.shape)} do not "
            f"fit down {tuple(down_ID.shape)}"
        )
    x_D = x_1D.reshape(-1).contiguous()
    out_1D = torch.empty(1, width, dtype=torch.float32)
    kept_x, kept_n = torch.empty(1, width, dtype=torch.bool), torch.empty(1, ffn, dtype=torch.bool)
    work = torch.empty(2 * ffn + width, dtype=torch.float32)
    status = library.xmoe_neuron_mlp_decode_f32(
        x_D.data_ptr(), width, ffn, sum(SITE_BITS[s] for s in sites),
        channels[0].data_ptr(), float(channels[1]), first.data_ptr(),
        up.data_ptr() if gate_first else None, neurons[0].data_ptr(), float(neurons[1]),
        down_ID.data_ptr(), out_1D.data_ptr(), kept_x.data_ptr(), kept_n.data_ptr(),
        work.data_ptr(),
    )  # fmt: skip
    if status != 0:
        raise MemoryError(f"neuron decode: no memory for the indices of {ffn} rows")
    return out_1D, kept_x, kept_n


def _usable(a: torch.Tensor, rows: torch.Tensor) -> ctypes.CDLL | None:
    """The loaded library when the native kernels compute on these operands, else None."""
    if not _applies(a, rows) or decode_kernel() != "native":
        return None
    return _library()


def _check(
    what: str, operand: tuple[str, torch.Tensor, int], keep: torch.Tensor, rows: torch.Tensor
) -> None:
    """Refuse an ``operand`` (name, tensor, the entries it needs) or a ``keep`` mask that does
    not fit ``rows``: the C code would read past them."""
    name, tensor, entries = operand
    if tensor.numel() != entries or keep.numel() != rows.shape[0] or keep.dtype != torch.bool:
        raise ValueError(
            f"{what}: {name} {tuple(tensor.shape)} and keep {tuple(keep.shape)} ({keep.dtype}) "
            f"need {entries} entries and one bool per row of rows {tuple(rows.shape)}"
        )


def _applies(a: torch.Tensor, rows: torch.Tensor) -> bool:
    """Whether the C kernel computes this sum: fp32 CPU tensors, contiguous rows (a copy would
    cost more than the sum), and nothing for autograd to record (the kernel has no backward)."""
    return (
        a.dtype == rows.dtype == torch.float32
        and a.device.type == rows.device.type == "cpu"
        and rows.dim() == 2
        and rows.is_contiguous()
        and not (torch.is_grad_enabled() and (a.requires_grad or rows.requires_grad))
    )


def decode_kernel() -> str:
    """The chosen kept-rows sum: the innermost :func:`using_kernel`, else
    ``$XMOE_DECODE_KERNEL``, else ``native``.

    Raises:
        ValueError: ``XMOE_DECODE_KERNEL`` names no kernel of :data:`KERNELS`.
    """
    if _forced:
        return _forced[-1]
    return _checked_kernel("XMOE_DECODE_KERNEL", os.environ.get("XMOE_DECODE_KERNEL", "native"))


@contextmanager
def using_kernel(name: str) -> Iterator[None]:
    """Sum the kept rows with ``name`` (one of :data:`KERNELS`) inside the block."""
    _forced.append(_checked_kernel("kernel", name))
    try:
        yield
    finally:
        _forced.pop()


def _checked_kernel(what: str, name: str) -> str:
    if name not in KERNELS:
        raise ValueError(f"{what}={name!r}: must be one of {', '.join(KERNELS)}")
    return name


@cache
def _library() -> ctypes.CDLL | None:
    """The loaded kernels, built first if its cache file is missing or does not load (a damaged
    file is rebuilt once); None, with the reason warned once per process, when that fails."""
    compiler = os.environ.get("CC") or "cc"
    target = default_cache_dir() / "ops" / f"kept_rows_sum-{_build_key(compiler)}.so"
    try:
        if target.is_file():
            try:
                return _load(target)
            except OSError:
                pass  # damaged or built for another system: rebuild it
        _build(compiler, target)
        return _load(target)
    except (OSError, subprocess.SubprocessError) as error:
        warnings.warn(
            f"the native kept-rows sum is unavailable ({error}); batch-1 decode sums the "
            "kept rows with embedding_bag (slower)",
            stacklevel=4,
        )
        return None


def _build_key(compiler: str) -> str:
    """A hash of everything the built file depends on: source, compiler, flags and the CPU
    (``-march=native`` code may not run on another)."""
    try:
        cpu = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        cpu = platform.processor()
    parts = (
        SOURCE,
        shutil.which(compiler) or compiler,
        *FLAGS,
        *LIBRARIES,
        platform.machine(),
        cpu,
    )
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _build(compiler: str, target: Path) -> None:
    """Compile :data:`SOURCE` into ``target`` through a temporary file beside it (a
    concurrent build or an interrupted one never leaves a partial library under the name)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = temporary_name(target)
    try:
        done = subprocess.run(
            [compiler, *FLAGS, "-x", "c", "-", "-o", str(partial), *LIBRARIES],
            input=SOURCE, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no message"])[-1]
            raise OSError(f"{compiler} exited with {done.returncode}: {last}")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def _load(path: Path) -> ctypes.CDLL:
    library = ctypes.CDLL(str(path))
    pointer, size, flt = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    rows = [pointer, pointer, size, pointer, size, pointer]
    mlp = [pointer, size, size, ctypes.c_int, pointer, flt, pointer, pointer, pointer, flt]
    for name, arguments, result in (
        ("xmoe_kept_rows_sum_f32", rows, ctypes.c_int),
        ("xmoe_kept_rows_dot_f32", rows, None),
        ("xmoe_neuron_mlp_decode_f32", [*mlp, pointer, pointer, pointer, pointer, pointer],
         ctypes.c_int),
    ):  # fmt: skip
        function = getattr(library, name)
        function.argtypes = arguments
        function.restype = result
    return library
