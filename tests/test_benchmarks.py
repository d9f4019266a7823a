"""The layer benchmark runs end to end at tiny sizes and writes its table and plot."""

from __future__ import annotations

import pytest

from benchmarks.layer import main


@pytest.mark.slow
def test_layer_benchmark_quick(tmp_path, monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "0")  # as the harness would set; avoids a re-exec
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", str(1 << 40))
    main(
        [
            "--quick",
            "--device",
            "cpu",
            "--rounds",
            "1",
            "--warmup",
            "0",
            "--no-memory",
            "--out",
            str(tmp_path),
        ]
    )
    table = (tmp_path / "layer_cpu-quick.md").read_text()
    assert "### Targets" in table and "HF grouped_mm" in table and "capacity padding" in table
    assert (tmp_path / "layer_sweep_cpu-quick.png").stat().st_size > 1000
