"""Files that survive crashes and say when they are damaged.

* :func:`atomic_write` writes bytes to a temporary file of our own naming (exclusive create, the
  umask's mode), fsyncs it, renames it over the target and fsyncs the directory: at every moment
  the target holds either its old content or its new content, never a mix.
* :func:`save_verified` / :func:`read_verified` put every tensor's dtype, shape and a CRC-32 of
  its bytes (and a CRC-32 of the metadata) into a safetensors file's metadata, and check them on
  load, naming the damaged tensor. The parser itself refuses a length that does not fit, and
  data offsets that do not tile the data exactly; an offset edited within those rules moves
  bytes from one tensor to another, which the CRC-32s catch.
* :func:`write_verified_json` / :func:`read_verified_json` do the same for a JSON record (one
  cell of a resumable grid) with a CRC-32 of its text.
* :func:`sweep_stale_temporaries` removes temporary files whose writer process is gone.
* :class:`DirectoryLock` gives one process at a time a directory (``flock``, released by the
  kernel when the holder dies, so a crash never leaves a stale lock).
* :func:`open_regular` opens a file in place (the lock, a log) without following a link, so a
  directory we write can never be used to write a file outside it.

Model directories written on top of these (staged, then put in place) are in
:mod:`xmoe.storage.model_dirs`.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import stat
import warnings
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as serialize_tensors

DIGESTS_KEY = "xmoe.crc32"
"""safetensors metadata key holding ``{tensor name: [crc32 hex, dtype, shape]}`` plus
``__metadata__`` (files written before dtype and shape were recorded hold ``{name: crc32 hex}``)."""

WRITE_CHUNK_BYTES = 8 << 20

_TEMP_PATTERN = re.compile(r"^\.(?P<target>.+)\.tmp-(?P<pid>\d+)(-[0-9a-f]+)?$")
_SAFETENSORS_TEMP_PATTERN = re.compile(r"^\.tmp[A-Za-z0-9_]{6,}$")  # left by save_file
_LOCK_CONTENT = re.compile(rb"(pid \d+ \(.*\)\n)?")  # DirectoryLock's file: empty or its holder


class DamagedFileError(RuntimeError):
    """A file whose bytes do not match the digests recorded when it was written, or that does
    not parse at all."""


class LockedError(RuntimeError):
    """Another live process holds a directory's lock."""


def fsync_directory(directory: Path) -> None:
    """Make a rename or create inside ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_name(target: Path) -> Path:
    """A fresh temporary path beside ``target`` that names its writer's pid."""
    return target.with_name(f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def name_the_file(error: BaseException, path: str | os.PathLike) -> None:
    """Give an ``OSError`` from a call on a file descriptor (``write``, ``fsync``: disk full,
    I/O error) the path it was about, so the message says which file could not be written."""
    if isinstance(error, OSError) and error.filename is None and error.errno is not None:
        error.filename = str(path)


def open_regular(path: str | os.PathLike, flags: int, mode: int = 0o666) -> int:
    """``os.open`` of a file that must be a regular file of its own: a symbolic link (dangling
    or not) is refused by name rather than followed (``O_NOFOLLOW``), and so is anything else
    (a FIFO, a device) and, when opening to write, a file with other hard links. A directory
    we write therefore never becomes a way to write (or truncate) a file outside it."""
    try:  # O_NONBLOCK: a FIFO planted there must be refused, not wait for a reader
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as error:
        if error.errno == errno.ELOOP and os.path.islink(path):
            raise OSError(
                f"{path} is a symbolic link: refusing to follow it (xmoe never writes through a "
                "link in its directories); remove the link"
            ) from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        problem = "is not a regular file"
    elif flags & (os.O_WRONLY | os.O_RDWR) and info.st_nlink > 1:
        problem = "has other hard links (writing it would change a file outside this directory)"
    else:
        return fd
    os.close(fd)
    raise OSError(f"{path} {problem}: refusing to open it; remove it")


def atomic_write(target: str | os.PathLike, data: bytes | bytearray | memoryview) -> Path:
    """Replace ``target`` with ``data`` atomically and durably; returns the target path.

    The temporary file is created exclusively with mode 0o666 minus the umask (as ``open``
    would), so the result has ordinary permissions. A failed write (disk full) removes the
    temporary file and raises an ``OSError`` naming ``target``.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(target)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        view = memoryview(data).cast("B")
        for start in range(0, len(view), WRITE_CHUNK_BYTES):
            chunk = view[start : start + WRITE_CHUNK_BYTES]
            while chunk:
                chunk = chunk[os.write(fd, chunk) :]
        os.fsync(fd)
    except BaseException as error:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        name_the_file(error, target)
        raise
    os.close(fd)
    try:
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(target.parent)
    return target


def atomic_write_text(target: str | os.PathLike, text: str) -> Path:
    return atomic_write(target, text.encode("utf-8"))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_temporaries(directory: str | os.PathLike, *, exclusive: bool = False) -> list[Path]:
    """Delete the temporary files (and staging folders) in ``directory`` whose writer is gone;
    returns them.

    Our temporaries carry their writer's pid, so one of a live process is left alone. With
    ``exclusive`` (the caller holds the directory's lock, so no other writer can exist) the
    pid-less temporaries that ``safetensors.torch.save_file`` leaves when killed go too.
    """
    removed = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for path in directory.iterdir():
        match = _TEMP_PATTERN.match(path.name)
        if match:
            pid = int(match["pid"])
            stale = not _pid_alive(pid) or (exclusive and pid != os.getpid())
        else:
            stale = exclusive and _SAFETENSORS_TEMP_PATTERN.match(path.name) is not None
        if stale:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def is_own_leftover(path: Path) -> bool:
    """Whether ``path`` is something xmoe's writers leave in a directory (a temporary of
    :func:`temporary_name`'s naming, a :class:`DirectoryLock` file) rather than a user's file."""
    return _TEMP_PATTERN.match(path.name) is not None or DirectoryLock.is_lock_file(path)


def tensor_crc32(tensor: torch.Tensor) -> str:
    """CRC-32 (hex) of a tensor's bytes in row-major order."""
    flat = tensor.detach().contiguous().reshape(-1).cpu()
    return f"{zlib.crc32(flat.view(torch.uint8).numpy()):08x}"


def _tensor_digest(tensor: torch.Tensor) -> list:
    """What the digests record of a tensor: the CRC-32 of its bytes, its dtype and its shape (a
    header edit that keeps the byte size, such as F32 -> I32, changes no byte of the data)."""
    return [tensor_crc32(tensor), str(tensor.dtype).removeprefix("torch."), list(tensor.shape)]


def _text_crc32(text: str) -> str:
    return f"{zlib.crc32(text.encode('utf-8')):08x}"


def serialize_verified(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes of ``tensors`` whose metadata also records every tensor's CRC-32 and
    one of the other metadata entries."""
    if DIGESTS_KEY in metadata:
        raise ValueError(f"metadata key {DIGESTS_KEY!r} is reserved")
    digests: dict[str, object] = {name: _tensor_digest(t) for name, t in tensors.items()}
    digests["__metadata__"] = _text_crc32(json.dumps(metadata, sort_keys=True))
    return serialize_tensors(tensors, metadata={**metadata, DIGESTS_KEY: json.dumps(digests)})


def save_verified(
    target: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> Path:
    """:func:`serialize_verified`, written with :func:`atomic_write`."""
    return atomic_write(target, serialize_verified(tensors, metadata))


def read_verified(
    path: str | os.PathLike,
    *,
    require_digests: bool = True,
    select: Callable[[str], bool] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str], bool]:
    """The tensors and the metadata (digests removed) of a safetensors file, checked; the last
    item says whether the file carried digests (False only without ``require_digests``).

    With ``select``, only the tensors whose name it accepts are read and verified (a reader that
    needs part of a file is not refused for damage in the rest); the set of names is still
    checked against the record.

    Raises :class:`DamagedFileError` naming the file and what is wrong: unparsable (truncated,
    zero-filled, header damage), a tensor whose bytes, dtype or shape changed, tensors added or
    missing, edited metadata, or (with ``require_digests``) no digests at all. A file written
    before dtype and shape were recorded (its digests are bare CRC-32s) is verified for its
    bytes only, with a warning. An
    ``OSError`` with the real cause (permission denied) when the file cannot be opened.
    """
    path = Path(path)
    os.close(os.open(path, os.O_RDONLY))  # safetensors calls every open error "No such file"
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            names = set(handle.keys())
            wanted = sorted(n for n in names if select is None or select(n))
            tensors = {name: handle.get_tensor(name) for name in wanted}
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise DamagedFileError(f"{path} is not a readable safetensors file: {error}") from None
    recorded = metadata.pop(DIGESTS_KEY, None)
    if recorded is None:
        if require_digests:
            raise DamagedFileError(f"{path} carries no digests ({DIGESTS_KEY}); cannot verify it")
        return tensors, metadata, False
    try:
        digests = json.loads(recorded)
    except json.JSONDecodeError:
        raise DamagedFileError(f"{path}: its digest record is damaged") from None
    if digests.pop("__metadata__", None) != _text_crc32(json.dumps(metadata, sort_keys=True)):
        raise DamagedFileError(f"{path}: its metadata is damaged (does not match its digest)")
    if set(digests) != names:
        missing, extra = sorted(set(digests) - names), sorted(names - set(digests))
        raise DamagedFileError(f"{path}: tensors missing {missing}, unexpected {extra}")
    _check_tensors(path, tensors, digests)
    return tensors, metadata, True


def write_verified_json(target: str | os.PathLike, record: dict) -> Path:
    """``record`` as JSON with a CRC-32 of its text, written with :func:`atomic_write`."""
    text = json.dumps(record, indent=1, sort_keys=True)
    return atomic_write_text(target, json.dumps({"crc32": _text_crc32(text), "record": text}))


def read_verified_json(path: str | os.PathLike) -> dict:
    """The record :func:`write_verified_json` wrote; :class:`DamagedFileError` when the file
    does not parse or its text does not match its CRC-32 (``FileNotFoundError`` when absent)."""
    try:
        stored = json.loads(Path(path).read_text())
        text = stored["record"]
        if stored["crc32"] != _text_crc32(text):
            raise ValueError("the CRC-32 recorded when it was written does not match")
        return json.loads(text)
    except (ValueError, KeyError, TypeError) as error:  # JSONDecodeError is a ValueError
        raise DamagedFileError(f"{path} is damaged ({error})") from None


def _check_tensors(path: Path, tensors: dict[str, torch.Tensor], digests: dict) -> None:
    """Each tensor against its record: a bare CRC-32 (the older layout, with a warning), or
    CRC-32, dtype and shape."""
    for name in tensors:
        entry = digests[name]
        if not (isinstance(entry, str) or (isinstance(entry, list) and len(entry) == 3)):
            raise DamagedFileError(f"{path}: its digest record is damaged (entry of {name!r})")
    older = [name for name in tensors if isinstance(digests[name], str)]
    if older:
        warnings.warn(
            f"{path} predates dtype and shape digests: its tensors' bytes are verified, their "
            "dtypes and shapes are not (save it again to record them)",
            stacklevel=3,
        )
    for name, tensor in tensors.items():
        actual = _tensor_digest(tensor)
        expected = digests[name] if name not in older else [digests[name], *actual[1:]]
        if actual[1:] != expected[1:]:
            raise DamagedFileError(
                f"{path}: tensor {name!r} is damaged (the header gives it dtype {actual[1]}, "
                f"shape {actual[2]}; it was written as {expected[1]}, shape {expected[2]})"
            )
        if actual[0] != expected[0]:
            raise DamagedFileError(
                f"{path}: tensor {name!r} is damaged (its bytes do not match the CRC-32 "
                "recorded when the file was written)"
            )


class DirectoryLock:
    """An exclusive, non-blocking lock on a directory for the life of this object's ``hold``.

    The lock is ``flock`` on ``<directory>/.lock``, whose content names the holder's pid. A
    second holder, in this process or another, fails at once with :class:`LockedError`.
    """

    NAME = ".lock"

    def __init__(self, directory: str | os.PathLike, purpose: str = "writing") -> None:
        self.directory = Path(directory)
        self.purpose = purpose
        self._fd: int | None = None

    @property
    def path(self) -> Path:
        return self.directory / self.NAME

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = open_regular(self.path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "an unknown process"
            os.close(fd)
            if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise LockedError(
                f"{self.directory} is in use by {holder}; wait for it to finish or stop it "
                "(one writer per run directory)"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} ({self.purpose})\n".encode())
        except BaseException as error:
            os.close(fd)
            name_the_file(error, self.path)
            raise
        self._fd = fd

    @classmethod
    def is_lock_file(cls, path: Path) -> bool:
        """Whether ``path`` is a lock file of ours left in its directory: empty once released,
        naming its holder if the holder was killed."""
        if path.name != cls.NAME or path.is_symlink() or not path.is_file():
            return False
        return path.stat().st_size < 256 and _LOCK_CONTENT.fullmatch(path.read_bytes()) is not None

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    @contextmanager
    def hold(self) -> Iterator[DirectoryLock]:
        self.acquire()
        try:
            yield self
        finally:
            self.release()


@contextmanager
def hold_for_writing(lock: DirectoryLock) -> Iterator[DirectoryLock]:
    """Hold ``lock`` and clear the temporaries that earlier (dead) writers left in its directory:
    while it is held no other writer can exist, so pid-less leftovers go too."""
    with lock.hold():
        sweep_stale_temporaries(lock.directory, exclusive=True)
        yield lock
