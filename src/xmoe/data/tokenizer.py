"""Byte-level BPE tokenizer trained on the training split (``tokenizers`` library).

The tokenizer has no normaliser, the GPT-2 byte-level pre-tokeniser (regex split, no added prefix
space) and the byte-level decoder, so ``decode(encode(text)) == text`` for any Unicode text. Its
only special token is :data:`EOT_TOKEN` with id 0, which separates documents. Ids are below
``vocab_size`` ≤ 65535, so token arrays fit ``uint16``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from xmoe.data.corpus import resolve_cache_dir
from xmoe.storage import atomic_write_text

if TYPE_CHECKING:
    from tokenizers import Tokenizer

EOT_TOKEN = "<|endoftext|>"
EOT_ID = 0
MIN_VOCAB_SIZE = 258
"""256 byte tokens, the EOT token and at least one merge."""
MAX_VOCAB_SIZE = 65535
"""Largest vocabulary whose ids fit ``uint16``."""

_CACHE_FORMAT = "xmoe-bpe-v1"


def _import_tokenizers() -> ModuleType:
    try:
        import tokenizers
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the BPE tokenizer needs the `tokenizers` package: pip install 'xmoe[hf]' "
            "(or tokenizers==0.23.2)"
        ) from exc
    return tokenizers


def check_vocab_size(vocab_size: int) -> None:
    """Raise ValueError unless ``vocab_size`` is an int in [MIN_VOCAB_SIZE, MAX_VOCAB_SIZE]."""
    if (
        not isinstance(vocab_size, int)
        or isinstance(vocab_size, bool)
        or not MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE
    ):
        raise ValueError(
            f"vocab_size={vocab_size!r} is invalid: vocab_size must be an int in "
            f"[{MIN_VOCAB_SIZE}, {MAX_VOCAB_SIZE}] (256 bytes + {EOT_TOKEN} + merges; ids fit "
            f"uint16)"
        )


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8192) -> Tokenizer:
    """Train a byte-level BPE tokenizer on ``texts``.

    Args:
        texts: the training documents.
        vocab_size: target vocabulary size in [258, 65535], the EOT token and 256 bytes included.
            A small corpus may stop with fewer merges, so read the result's ``get_vocab_size()``.

    Returns:
        a ``tokenizers.Tokenizer`` with ``<|endoftext|>`` at id 0; training is deterministic.
    """
    check_vocab_size(vocab_size)
    tk = _import_tokenizers()
    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT_TOKEN],
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    eot = tokenizer.token_to_id(EOT_TOKEN)
    if eot != EOT_ID:  # pragma: no cover - guaranteed by the trainer
        raise RuntimeError(f"{EOT_TOKEN} got id {eot}, expected {EOT_ID}")
    return tokenizer


def tokenizer_key(texts: Sequence[str], vocab_size: int) -> str:
    """16 hex digits of sha256 over the texts, ``vocab_size`` and the ``tokenizers`` version."""
    tk = _import_tokenizers()
    digest = hashlib.sha256(f"{_CACHE_FORMAT}|{tk.__version__}|{vocab_size}|".encode())
    for text in texts:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()[:16]


def tokenizer_path(key: str, vocab_size: int, cache_dir: str | os.PathLike[str] | None) -> Path:
    """``<cache_dir>/tokenizers/bpe-{vocab_size}-{key}.json``."""
    return resolve_cache_dir(cache_dir) / "tokenizers" / f"bpe-{vocab_size}-{key}.json"


def load_or_train_tokenizer(
    train_texts: Sequence[str],
    vocab_size: int = 8192,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Tokenizer:
    """The tokenizer of :func:`train_tokenizer`, cached by a hash of its inputs.

    The file is ``<cache_dir>/tokenizers/bpe-{vocab_size}-{key}.json`` with ``key`` from
    :func:`tokenizer_key`; it is written atomically, so a crash never leaves half a file.
    """
    return load_or_train_tokenizer_with_key(train_texts, vocab_size, cache_dir)[0]


def load_or_train_tokenizer_with_key(
    train_texts: Sequence[str],
    vocab_size: int = 8192,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[Tokenizer, str]:
    """:func:`load_or_train_tokenizer`, also returning the cache key (16 hex digits)."""
    check_vocab_size(vocab_size)
    train_texts = list(train_texts)
    key = tokenizer_key(train_texts, vocab_size)
    path = tokenizer_path(key, vocab_size, cache_dir)
    tk = _import_tokenizers()
    if path.is_file():
        return tk.Tokenizer.from_file(str(path)), key
    tokenizer = train_tokenizer(train_texts, vocab_size)
    atomic_write_text(path, tokenizer.to_str())
    return tokenizer, key
