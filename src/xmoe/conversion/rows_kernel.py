"""Native kept-rows kernels for batch-1 decode, one C call each: the sum
``Σ_{j kept} a_j · rows[j, :]`` and the dot products ``x · rows[i, :]`` of the kept rows i.

:func:`~xmoe.conversion.sparse_decode.kept_rows_sum` calls the sum at one token. It measured
~1.5x faster than ``F.embedding_bag`` over SmolLM2-135M's 30 MLPs at 50% kept (fp32, 2 torch
threads, shared machine): it adds eight kept rows per pass over the output, so the output stays
in registers and L1 while eight row streams are read, where ``embedding_bag`` adds one row at a
time. :func:`~xmoe.conversion.sparse_decode.kept_rows_dot` calls the dot products (gate-first's
up projection, on the kept neurons only; torch has no op that reads only some rows of a GEMV
without copying them). Both run on the calling thread: splitting the columns over two OpenMP
threads (torch's runtime) measured up to 20x slower on the loaded machine, the second thread
waiting for a core.

The C source below is compiled on first use with the system compiler (``$CC``, else ``cc``;
``-O3 -march=native``) into ``<cache>/ops`` (``$XMOE_CACHE_DIR`` or ``~/.cache/xmoe``), named
by a hash of the source, the compiler, its flags and the CPU, so a change of any rebuilds; it
is loaded through ctypes. Without a working compiler the callers fall back to
``embedding_bag`` (and a dense GEMV for the dot products), and the reason is warned once.
``XMOE_DECODE_KERNEL=embedding_bag`` (or :func:`using_kernel`) forces the fallback; float64,
non-CPU tensors, non-contiguous rows and inputs that autograd records always take it.
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

SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>

/* out[0, r) = sum over i < n with keep[i] of a[i] * rows[i, :]; rows row-major (n, r).
   Returns -1 when the index buffers cannot be allocated, else 0. */
int xmoe_kept_rows_sum_f32(const float *a, const uint8_t *keep, int64_t n, const float *rows,
                           int64_t r, float *out) {
    int64_t *idx = malloc((n + 1) * sizeof *idx);
    float *w = malloc((n + 1) * sizeof *w);
    if (!idx || !w) { free(idx); free(w); return -1; }
    int64_t count = 0;
    for (int64_t i = 0; i < n; ++i)
        if (keep[i]) { idx[count] = i; w[count] = a[i]; ++count; }
    for (int64_t c = 0; c < r; ++c) out[c] = 0;
    int64_t k = 0;
    for (; k + 8 <= count; k += 8) {  /* eight rows per pass: out is read and written once */
        const float *p[8];
        float v[8];
        for (int j = 0; j < 8; ++j) { p[j] = rows + idx[k + j] * r; v[j] = w[k + j]; }
        for (int64_t c = 0; c < r; ++c)
            out[c] += v[0] * p[0][c] + v[1] * p[1][c] + v[2] * p[2][c] + v[3] * p[3][c]
                    + v[4] * p[4][c] + v[5] * p[5][c] + v[6] * p[6][c] + v[7] * p[7][c];
    }
    for (; k < count; ++k) {
        const float v = w[k], *p = rows + idx[k] * r;
        for (int64_t c = 0; c < r; ++c) out[c] += v * p[c];
    }
    free(idx);
    free(w);
    return 0;
}

/* out[i] = keep[i] ? dot(rows[i, :], x) : 0 for i < n; rows row-major (n, r). Sixteen partial
   sums (two vector registers) per row: the compiler may not reassociate one sum. */
void xmoe_kept_rows_dot_f32(const float *x, const uint8_t *keep, int64_t n, const float *rows,
                            int64_t r, float *out) {
    for (int64_t i = 0; i < n; ++i) {
        if (!keep[i]) { out[i] = 0; continue; }
        const float *p = rows + i * r;
        float acc[16] = {0};
        int64_t c = 0;
        for (; c + 16 <= r; c += 16)
            for (int j = 0; j < 16; ++j) acc[j] += p[c + j] * x[c + j];
        float sum = 0;
        for (int j = 0; j < 16; ++j) sum += acc[j];
        for (; c < r; ++c) sum += p[c] * x[c];
        out[i] = sum;
    }
}
"""

FLAGS = ("-O3", "-march=native", "-shared", "-fPIC")

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
    rows, width = rows_NR.shape
    _check("kept-rows sum", ("a", a_1N, rows), keep_1N, rows_NR)
    a_N, keep_N = a_1N.reshape(-1).contiguous(), keep_1N.reshape(-1).contiguous()
    out_1R = torch.empty(1, width, dtype=torch.float32)
    status = library.xmoe_kept_rows_sum_f32(
        a_N.data_ptr(), keep_N.data_ptr(), rows, rows_NR.data_ptr(), width, out_1R.data_ptr()
    )
    if status != 0:
        raise MemoryError(f"kept-rows sum: no memory for the indices of {rows} rows")
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
    rows, width = rows_NR.shape
    _check("kept-rows dot", ("x", x_1R, width), keep_1N, rows_NR)
    x_R, keep_N = x_1R.reshape(-1).contiguous(), keep_1N.reshape(-1).contiguous()
    out_1N = torch.empty(1, rows, dtype=torch.float32)
    library.xmoe_kept_rows_dot_f32(
        x_R.data_ptr(), keep_N.data_ptr(), rows, rows_NR.data_ptr(), width, out_1N.data_ptr()
    )
    return out_1N


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
    parts = (SOURCE, shutil.which(compiler) or compiler, *FLAGS, platform.machine(), cpu)
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _build(compiler: str, target: Path) -> None:
    """Compile :data:`SOURCE` into ``target`` through a temporary file beside it (a
    concurrent build or an interrupted one never leaves a partial library under the name)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = temporary_name(target)
    try:
        done = subprocess.run(
            [compiler, *FLAGS, "-x", "c", "-", "-o", str(partial)],
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
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    for name, result in (
        ("xmoe_kept_rows_sum_f32", ctypes.c_int),
        ("xmoe_kept_rows_dot_f32", None),
    ):
        function = getattr(library, name)
        function.argtypes = [pointer, pointer, size, pointer, size, pointer]
        function.restype = result
    return library
