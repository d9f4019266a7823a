"""The calibration windows of a run's corpus (compression/calibration.py): the mixed ones hold
every training domain in equal shares, a domain's own ones hold that domain alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xmoe.compression import CompressionError
from xmoe.compression.calibration import corpus_calibration

# token i sits at position i, so a window's tokens say where in the stream it came from; the
# domains lie one after another, as the corpus lays them out (every KJV book first)
TRAIN = np.arange(1000, dtype=np.uint16)
SPANS = {"kjv": (0, 700), "shakespeare": (700, 960), "tiny": (960, 1000)}


def _domain_of(window: torch.Tensor) -> str:
    (name,) = [n for n, (s, e) in SPANS.items() if s <= int(window.min()) and window.max() < e]
    return name


def test_mixed_windows_hold_an_equal_share_of_every_domain():
    calibration = corpus_calibration(TRAIN, SPANS, tokens=120, seq_len=20)  # 6 windows
    assert calibration.mixed.shape == (6, 20) and calibration.mixed.dtype == torch.int64
    domains = [_domain_of(window) for window in calibration.mixed]
    assert sorted(domains) == ["kjv", "kjv", "shakespeare", "shakespeare", "tiny", "tiny"]
    # a domain's share is spread over its span, not its first windows alone
    kjv = calibration.mixed[[d == "kjv" for d in domains]]
    assert int(kjv[0, 0]) == 0 and int(kjv[1, 0]) >= 340


def test_each_domain_windows_hold_only_that_domain():
    calibration = corpus_calibration(TRAIN, SPANS, tokens=120, seq_len=20)
    assert list(calibration.domains) == list(SPANS)
    for name, windows in calibration.domains.items():
        assert {_domain_of(window) for window in windows} == {name}
        assert len(torch.unique(windows[:, 0])) == len(windows)  # no window twice
    # a short domain gives what it holds: 40 tokens are 2 windows of 20
    assert [len(w) for w in calibration.domains.values()] == [6, 6, 2]


def test_without_spans_the_whole_stream_is_one_domain_and_too_short_data_is_named():
    calibration = corpus_calibration(TRAIN, None, tokens=100, seq_len=50)
    assert list(calibration.domains) == ["all"]
    assert torch.equal(calibration.mixed, calibration.domains["all"])
    assert int(calibration.mixed[-1, -1]) == 999  # spread to the end of the stream
    short = corpus_calibration(TRAIN, SPANS, tokens=100, seq_len=50)
    assert "tiny" not in short.domains  # 40 tokens hold no window of 50
    with pytest.raises(CompressionError, match="no training domain holds a window of seq_len=2000"):
        corpus_calibration(TRAIN, SPANS, tokens=4000, seq_len=2000)
