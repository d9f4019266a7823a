"""DeepSeekMoE (routing/deepseek.py): shared + fine-grained routed experts, its expert- and
device-level balance losses, and the segmentation helper that keeps parameters equal."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from xmoe import MoEConfig, MoELayer, flops
from xmoe.config import ConfigError
from xmoe.models import TransformerLM
from xmoe.registry import ENGINES
from xmoe.routing.deepseek import device_balance_loss, expert_balance_loss, expert_fraction
from xmoe.routing.selection import Selection
from xmoe.training.config import apply_overrides
from xmoe.training.presets import fine_grained_shared, preset

from helpers import assert_close_grads, make_layer, run_both, use_host_reads
from reference import layer_params, reference_forward

BASE = {"d_model": 8, "num_experts": 8, "d_expert": 6}


@pytest.mark.parametrize("router", ["deepseek", "deepseek_threshold"])
@pytest.mark.parametrize("num_tokens", [1, 13])
@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"num_shared_experts": 2, "router_options": {"device_groups": 4}},
        {"num_shared_experts": 1, "capacity_factor": 0.5, "min_capacity": 1},
    ],
)
def test_matches_per_token_reference(router, num_tokens, extra):
    """Output, DeepSeekMoE's losses (as its paper writes them), gradients and FLOPs against the
    float64 per-token loop, with a tie (a zero token: uniform probabilities), overflowing
    capacity and, with one token, experts that get no token."""
    config = MoEConfig(**BASE, router=router, top_k=3, threshold=0.6, **extra)
    layer = make_layer(config)
    layer.train()
    x = torch.randn(num_tokens, BASE["d_model"], dtype=torch.float64)
    x[0] = 0.0
    out, ref, grads, ref_grads = run_both(layer, x)
    torch.testing.assert_close(out.hidden_states.double(), ref.hidden_states)
    torch.testing.assert_close(out.aux_loss.double(), ref.aux_loss)
    assert_close_grads(grads, ref_grads, rtol=1e-7, atol=1e-9)
    assert float(out.routing.flops_per_token) == pytest.approx(ref.flops_per_token)
    assert set(out.aux_losses) == (
        {"balance", "device_balance"} if "router_options" in extra else {"balance"}
    )


@pytest.mark.parametrize("host_reads", [True, False], ids=["host", "sync_free"])
@pytest.mark.parametrize("backend", sorted(ENGINES))
def test_every_engine_matches_reference_in_fp32(monkeypatch, backend, host_reads):
    """Training (capacity, both losses, shared experts) on each engine, then inference on one
    token (the decode path) and on a batch, against the reference."""
    use_host_reads(monkeypatch, host_reads)
    config = MoEConfig(
        d_model=16, num_experts=12, d_expert=8, router="deepseek", top_k=3, backend=backend,
        capacity_factor=1.5, min_capacity=1, num_shared_experts=1,
        router_options={"device_groups": 3},
    )  # fmt: skip
    layer = make_layer(config, dtype=torch.float32, seed=7)
    x = torch.randn(12, 16)
    out, ref, grads, ref_grads = run_both(layer, x)
    assert float(out.routing.drop_fraction) > 0  # capacity overflowed
    torch.testing.assert_close(out.hidden_states.double(), ref.hidden_states, rtol=1e-4, atol=1e-5)
    assert_close_grads(grads, ref_grads, rtol=1e-4, atol=1e-5)
    layer.eval()  # dropless
    params, dropless = layer_params(layer), dataclasses.replace(config, capacity_factor=None)
    for tokens in (x[:1], x):
        with torch.no_grad():
            got = layer(tokens).hidden_states.double()
        expected = reference_forward(dropless, params, tokens.double()).hidden_states
        torch.testing.assert_close(got, expected.detach(), rtol=1e-4, atol=1e-5)


def _uniform_selection(num_tokens: int, num_experts: int, k: int) -> Selection:
    """Token t wants experts t, t+1, ..., t+k-1 (mod E): every expert equally often."""
    expert_idx_SK = (torch.arange(num_tokens)[:, None] + torch.arange(k)) % num_experts
    wanted_SK = torch.ones_like(expert_idx_SK, dtype=torch.bool)
    probs_SK = torch.full(expert_idx_SK.shape, 1.0 / num_experts)
    return Selection(expert_idx_SK, probs_SK, wanted_SK, probs_SK)


def test_losses_are_one_when_balanced_and_device_groups_of_one_are_the_expert_loss():
    """With f_i = N'/(K'T)·count_i both losses equal 1 at perfect balance (their minimum for
    uniform P); groups of one expert make the device-level loss the expert-level one."""
    probs_SE = torch.softmax(torch.randn(16, 8, dtype=torch.float64), dim=-1)
    balanced = _uniform_selection(16, 8, 3)
    fraction_E = expert_fraction(balanced, 8, torch.float64)
    torch.testing.assert_close(fraction_E, torch.ones(8, dtype=torch.float64))
    uniform_SE = torch.full((16, 8), 1 / 8, dtype=torch.float64)
    assert float(expert_balance_loss(uniform_SE, fraction_E)) == pytest.approx(1.0)
    assert float(device_balance_loss(uniform_SE, fraction_E, 4)) == pytest.approx(1.0)
    skewed = Selection(
        torch.zeros(16, 1, dtype=torch.int64), probs_SE[:, :1], torch.ones(16, 1, dtype=bool),
        probs_SE[:, :1],
    )  # fmt: skip
    fraction_E = expert_fraction(skewed, 8, torch.float64)
    assert fraction_E.tolist() == [8.0] + [0.0] * 7  # N'/(K'T) · T for expert 0
    torch.testing.assert_close(
        device_balance_loss(probs_SE, fraction_E, 8), expert_balance_loss(probs_SE, fraction_E)
    )


def test_device_loss_sees_groups_not_experts():
    """Moving load between experts of one group leaves the device-level loss unchanged."""
    probs_SE = torch.softmax(torch.randn(16, 8, dtype=torch.float64), dim=-1)
    a = expert_fraction(_uniform_selection(16, 8, 2), 8, torch.float64)
    b = a.clone()
    b[0], b[1] = a[0] + 0.5, a[1] - 0.5  # experts 0 and 1 share group 0 of 4
    torch.testing.assert_close(
        device_balance_loss(probs_SE, a, 4), device_balance_loss(probs_SE, b, 4)
    )
    assert float(expert_balance_loss(probs_SE, a)) != float(expert_balance_loss(probs_SE, b))


def _matrix_params(layer: MoELayer) -> int:
    """Weight matrices of the routed and shared experts (what xmoe.flops counts)."""
    return sum(p.numel() for n, p in layer.named_parameters() if n.endswith((".w1", ".w2")))


@pytest.mark.parametrize("router", ["deepseek", "deepseek_threshold"])
def test_fine_grained_shared_keeps_total_and_active_parameters_of_top2(router):
    """The corpus top-2 layer (16 experts of 256, k=2) segmented m=4 with one shared expert is
    DeepSeekMoE's 2B layout (1 shared + 63 routed of 64, 7 active): total expert weights are
    equal exactly, and with top-k the FLOPs meter counts exactly the same active expert
    FLOPs per token."""
    top2 = preset("top2").model.moe
    config = fine_grained_shared(top2, split=4, shared=1, router=router)
    assert (config.num_experts, config.d_expert, config.top_k) == (63, 64, 7)
    assert (config.num_shared_experts, config.capacity_factor) == (1, 8.0)
    base, segmented = MoELayer(top2).eval(), MoELayer(config).eval()
    total = flops.ffn_params(top2.d_model, top2.d_expert, top2.gated) * top2.num_experts
    assert _matrix_params(base) == _matrix_params(segmented) == total
    if router == "deepseek":
        x = torch.randn(5, top2.d_model)
        moe = [base(x).routing.flops_per_token, segmented(x).routing.flops_per_token]
        expert_flops = [float(f) for f in moe]
        expert_flops[0] -= top2.router_flops
        expert_flops[1] -= config.router_flops
        assert expert_flops[0] == expert_flops[1] == 2 * top2.expert_flops


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"split": 3, "shared": 1}, "split=3 is invalid: split must be a positive divisor"),
        ({"split": 4, "shared": 8}, r"shared=8 is invalid: .* \[0, split \* top_k - 1 = 7\]"),
        ({"split": 4, "shared": -1}, "shared=-1 is invalid"),
    ],
)
def test_bad_segmentation_is_named(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment):
        fine_grained_shared(preset("top2").model.moe, **kwargs)


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"device_groups": 0}, r"router_options.device_groups=0 is invalid: .* integer >= 1"),
        ({"device_groups": 3}, r"device_groups=3 is invalid: .* divisor of num_experts=8"),
        ({"device_balance_coef": -1.0}, r"router_options.device_balance_coef=-1.0 is invalid"),
        ({"logit_scale": 0.0}, r"router_options.logit_scale=0.0 is invalid"),
    ],
)
def test_bad_options_are_named(options, fragment):
    router = "deepseek_threshold" if "logit_scale" in options else "deepseek"
    with pytest.raises(ConfigError, match=fragment):
        MoEConfig(**BASE, router=router, router_options=options)


def test_trains_in_a_model_with_shared_experts():
    """Two optimizer steps of the tiny model with a shared expert and both losses: the
    losses are reported by name and finite, and every router and shared expert learns."""
    config = apply_overrides(
        preset("tiny"),
        ["moe.router=deepseek", "moe.num_shared_experts=1", "moe.router_options.device_groups=2"],
    )
    torch.manual_seed(0)
    model = TransformerLM(config.model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, config.model.vocab_size, (1, 8))
    for _ in range(2):
        out = model(ids, ids)
        assert set(out.aux_losses) == {"balance", "device_balance"}
        loss = out.loss + out.aux_loss
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert any("router" in n for n in moved) and any("shared_experts" in n for n in moved)


def test_hf_save_load_and_generate_round_trip(tmp_path):
    """The HF classes save and load the router's options and the shared experts (identical
    logits), and generate the same with and without the KV cache (decode path)."""
    pytest.importorskip("transformers")
    from xmoe.hf import XMoEConfig, XMoEForCausalLM

    moe = {"d_model": 32, "num_experts": 8, "d_expert": 16, "router": "deepseek_threshold"}
    moe |= {"num_shared_experts": 1, "router_options": {"device_groups": 2, "logit_scale": 3.0}}
    config = XMoEConfig(
        vocab_size=60, d_model=32, num_layers=2, num_heads=2, max_seq_len=64, d_ff=64, moe=moe
    )
    torch.manual_seed(0)
    model = XMoEForCausalLM(config).eval()
    model.save_pretrained(tmp_path)
    loaded = XMoEForCausalLM.from_pretrained(tmp_path).eval()
    layer = loaded.model.lm.moe_layers[0]
    assert layer.router.options.device_groups == 2 and layer.shared_experts is not None
    ids = torch.randint(1, 60, (2, 5))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    common = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    cached = loaded.generate(ids, use_cache=True, **common)
    assert torch.equal(cached, loaded.generate(ids, use_cache=False, **common))
