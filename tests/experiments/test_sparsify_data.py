"""The sparsify grid's token windows, on a made-up corpus (no download)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

import xmoe.data.corpus as corpus
from xmoe.experiments.sparsify_data import DOMAINS, corpus_data
from xmoe.experiments.sparsify_settings import EvalSettings

TOKEN = {"shakespeare": 1, "kjv": 2}  # every token of a domain's text is its id


def test_calibration_and_recovery_windows_alternate_between_both_domains(monkeypatch):
    docs = [
        SimpleNamespace(domain=domain, text=domain[0] * 4000, held_out=held_out)
        for domain in DOMAINS
        for held_out in (False, True)
    ]
    monkeypatch.setattr(corpus, "load_documents", lambda cache_dir: docs)
    monkeypatch.setattr(
        corpus, "split_documents",
        lambda d: ([x for x in d if not x.held_out], [x for x in d if x.held_out]),
    )  # fmt: skip

    def tokenizer(text, add_special_tokens):
        assert not add_special_tokens
        return {
            "input_ids": [TOKEN["shakespeare" if c == "s" else "kjv"] for c in text if c != "\n"]
        }

    settings = EvalSettings(calibration_tokens=512, seq_len=64, eval_tokens=128)
    data = corpus_data(tokenizer, settings)
    calibration = data["calibration"]
    assert calibration.shape == (8, 64)  # 256 tokens of each domain, alternating
    assert torch.equal(calibration[:, 0], torch.tensor([1, 2] * 4))
    assert all((window == window[0]).all() for window in calibration)  # one domain per window
    for domain in DOMAINS:
        assert (data[f"eval_{domain}"] == TOKEN[domain]).all()
    assert set(data["recovery"][:, 0].tolist()) == {1, 2}
