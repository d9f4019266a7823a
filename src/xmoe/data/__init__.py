"""Data for language-model training: corpora, fixed split, BPE tokenizer, token arrays, batches.

Depends only on the standard library, numpy, torch, tqdm and (for the BPE tokenizer)
``tokenizers``; it imports no other xmoe module.

* :mod:`xmoe.data.corpus`: fetch and verify Shakespeare and the KJV, documents, the fixed split.
* :mod:`xmoe.data.tokenizer`: byte-level BPE trained on the train split, cached by content hash.
* :mod:`xmoe.data.tokens`: :func:`prepare_corpus`, :func:`synthetic_token_data`, batching.
* ``python -m xmoe.data.describe``: the corpus table of ``docs/data.md``.
"""

from xmoe.data.corpus import (
    VALIDATION_BOOKS,
    VALIDATION_WORKS,
    CorpusError,
    Document,
    default_cache_dir,
    fetch_kjv,
    fetch_shakespeare,
    load_documents,
    split_documents,
)
from xmoe.data.tokenizer import (
    EOT_ID,
    EOT_TOKEN,
    load_or_train_tokenizer,
    train_tokenizer,
)
from xmoe.data.tokens import (
    TokenData,
    eval_batches,
    num_eval_windows,
    prepare_corpus,
    random_batch,
    synthetic_token_data,
)

__all__ = [
    "EOT_ID",
    "EOT_TOKEN",
    "VALIDATION_BOOKS",
    "VALIDATION_WORKS",
    "CorpusError",
    "Document",
    "TokenData",
    "default_cache_dir",
    "eval_batches",
    "fetch_kjv",
    "fetch_shakespeare",
    "load_documents",
    "load_or_train_tokenizer",
    "num_eval_windows",
    "prepare_corpus",
    "random_batch",
    "split_documents",
    "synthetic_token_data",
    "train_tokenizer",
]
