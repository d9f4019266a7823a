"""The sigmoid, smoe_dropout and thor routers through the trainer (``train``: its logged
losses) and the transformers classes (save, load, generate)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.training.test_rundir import tiny_config
from xmoe.training.rundir import RunDir
from xmoe.training.trainer import train

ROUTERS = ["sigmoid", "smoe_dropout", "thor"]
LOSSES = {"sigmoid": {"balance", "sparsity"}, "smoe_dropout": {"balance"}, "thor": {"consistency"}}


@pytest.mark.parametrize("router", ROUTERS)
def test_trainer_logs_the_routers_losses(tmp_path, router):
    dropless = {"moe.capacity_factor": "none"} if router == "thor" else {}
    config = tiny_config(
        **{"moe.router": router, "max_steps": 2, "log_interval": 1, "eval_interval": 2},
        **{"checkpoint_interval": 2},
        **dropless,
    )
    result = train(config, tmp_path, progress=False)
    assert result.steps == 2
    records = [json.loads(line) for line in RunDir(tmp_path).log_path.read_text().splitlines()]
    steps = [r for r in records if "loss" in r and "aux_loss" in r]
    assert {k[4:] for k in steps[-1] if k.startswith("aux_")} - {"loss"} == LOSSES[router]


@pytest.mark.parametrize("router", ROUTERS)
def test_hf_save_load_generate(tmp_path, router):
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    from xmoe.hf import XMoEConfig, XMoEForCausalLM

    values = {"vocab_size": 60, "d_model": 32, "num_layers": 2, "num_heads": 2}
    values |= {"max_seq_len": 64, "d_ff": 64}
    values["moe"] = {"d_model": 32, "num_experts": 8, "d_expert": 16, "router": router}
    if router == "thor":  # deterministic inference, so that logits can be compared
        values["moe"]["router_options"] = {"inference": "ensemble"}
    torch.manual_seed(0)
    model = XMoEForCausalLM(XMoEConfig(**values)).eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 60, (2, 9))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    with torch.no_grad():
        cached = loaded.generate(ids, max_new_tokens=4, do_sample=False)
        uncached = loaded.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
