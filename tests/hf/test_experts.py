"""xmoe as transformers' ``experts_implementation="xmoe"``: equal to eager (outputs and
gradients) for Mixtral, Qwen3-MoE and OLMoE, every weight layout and the fallback path; the
threshold knob against a per-token reference; validation; the benchmark's quick mode."""

from __future__ import annotations

import copy
import math
import types
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from transformers import (
    AutoModelForCausalLM,
    GptOssConfig,
    MixtralConfig,
    OlmoeConfig,
    Qwen3MoeConfig,
)
from transformers.activations import ACT2FN
from transformers.integrations.moe import (
    ALL_EXPERTS_FUNCTIONS,
    batched_mm_experts_forward,
    use_experts_implementation,
)

from xmoe.hf.experts import (
    KEPT_ATTR,
    ExpertCounter,
    register_experts_implementation,
    set_expert_threshold,
    threshold_mask,
    xmoe_experts_forward,
)

register_experts_implementation()

VOCAB, TOP_K = 64, 4
SHARED = {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2}
SHARED |= {"num_attention_heads": 4, "num_key_value_heads": 2, "initializer_range": 0.1}
FAMILIES = {
    "mixtral": lambda **kw: MixtralConfig(
        **SHARED, intermediate_size=16, num_local_experts=8, num_experts_per_tok=TOP_K, **kw
    ),
    # raw (un-normalised) top-k softmax weights: the threshold normalises them itself
    "qwen3_moe": lambda **kw: Qwen3MoeConfig(
        **SHARED,
        intermediate_size=32,
        moe_intermediate_size=16,
        head_dim=8,
        num_experts=8,
        num_experts_per_tok=TOP_K,
        norm_topk_prob=False,
        **kw,
    ),
    "olmoe": lambda **kw: OlmoeConfig(
        **SHARED, intermediate_size=16, num_experts=8, num_experts_per_tok=TOP_K, **kw
    ),
}
FALLBACK_FAMILIES = {
    "gpt_oss": lambda **kw: GptOssConfig(
        **SHARED,
        intermediate_size=16,
        head_dim=8,
        num_local_experts=8,
        num_experts_per_tok=TOP_K,
        layer_types=["full_attention"] * 2,
        **kw,
    ),
}


def _models(family: str, implementations: tuple[str, ...], dtype=torch.float64, **overrides):
    """One seeded model per implementation, all with the same weights (each its own config:
    ``from_config`` writes the implementation into the config it is given)."""
    config = (FAMILIES | FALLBACK_FAMILIES)[family](**overrides)
    models = []
    for implementation in implementations:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(
            copy.deepcopy(config), experts_implementation=implementation
        )
        if models:
            model.load_state_dict(models[0].state_dict())
        models.append(model.to(dtype))
    return models


def _run(model, seed: int = 1):
    """Logits and parameter gradients of ``<logits, fixed cotangent>`` on fixed input ids."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 12), generator=generator)
    model.zero_grad(set_to_none=True)
    logits = model(ids).logits
    cotangent = torch.randn(logits.shape, generator=generator, dtype=logits.dtype)
    (logits * cotangent).sum().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters()}


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float, name: str = ""):
    """max |actual - expected| <= rel · max |expected| (elementwise rtol fails near zero)."""
    error = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert error <= rel * scale, f"{name}: max error {error:.3g} vs scale {scale:.3g}"


def _assert_runs_equal(run, expected, rel: float) -> None:
    (logits, grads), (ref_logits, ref_grads) = run, expected
    _assert_close(logits, ref_logits, rel, "logits")
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert grad is not None, name
        _assert_close(grad, ref_grads[name], rel, name)


def _expert(module: nn.Module, expert: int, x_D: torch.Tensor) -> torch.Tensor:
    """One expert on one token, from transformers' weight conventions."""
    up = module.gate_up_proj if module.has_gate else module.up_proj
    h = x_D @ up[expert] if module.is_transposed else up[expert] @ x_D
    if module.has_bias:
        h = h + (module.gate_up_proj_bias if module.has_gate else module.up_proj_bias)[expert]
    h = module._apply_gate(h) if module.has_gate else module.act_fn(h)
    down = module.down_proj[expert]
    y = h @ down if module.is_transposed else down @ h
    return y + module.down_proj_bias[expert] if module.has_bias else y


def reference_experts(module, hidden_states, top_k_index, top_k_weights, t: float = 1.0):
    """The threshold rule token by token: rank by weight (ties: lower expert id), keep experts
    while the normalised mass before them is below t, sum them with their raw weights."""
    rows = []
    for s in range(hidden_states.shape[0]):
        slots = [
            (float(w), int(e), k)
            for k, (w, e) in enumerate(zip(top_k_weights[s].detach(), top_k_index[s], strict=True))
        ]
        total = sum(w for w, _, _ in slots)
        row, mass = torch.zeros_like(hidden_states[s]), 0.0
        for rank, (w, expert, k) in enumerate(sorted(slots, key=lambda v: (-v[0], v[1]))):
            if rank and t < 1 and mass >= t:
                break
            mass += w / total
            if expert < module.num_experts:  # expert-parallel sentinels are never computed
                row = row + top_k_weights[s, k] * _expert(module, expert, hidden_states[s])
        rows.append(row)
    return torch.stack(rows)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize(("dtype", "rel"), [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_xmoe_equals_eager_logits_and_gradients(family, dtype, rel):
    eager, xmoe = _models(family, ("eager", "xmoe"), dtype)
    assert xmoe.config._experts_implementation == "xmoe"
    assert eager.config._experts_implementation == "eager"
    _assert_runs_equal(_run(xmoe), _run(eager), rel)


def test_register_is_idempotent_and_visible_to_transformers():
    register_experts_implementation()
    register_experts_implementation()
    assert ALL_EXPERTS_FUNCTIONS.get_interface("xmoe", None) is xmoe_experts_forward
    (model,) = _models("mixtral", ("eager",))
    model.set_experts_implementation("xmoe")
    assert model.config._experts_implementation == "xmoe"


def test_threshold_one_changes_nothing():
    plain, knob = _models("mixtral", ("xmoe", "xmoe"))
    set_expert_threshold(knob, 1.0)
    (logits, grads), (ref_logits, ref_grads) = _run(knob), _run(plain)
    assert torch.equal(logits, ref_logits)
    assert all(torch.equal(grads[n], ref_grads[n]) for n in grads)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("t", [0.8, 0.5])
def test_threshold_equals_per_token_reference(family, t):
    reference, xmoe = _models(family, ("eager", "xmoe"))
    for module in reference.modules():  # eager's experts output replaced by the reference's
        if hasattr(module, "gate_up_proj"):
            module.register_forward_hook(lambda m, inputs, _: reference_experts(m, *inputs, t))
    set_expert_threshold(xmoe, t)
    with ExpertCounter(xmoe) as counter:
        run = _run(xmoe)
    _assert_runs_equal(run, _run(reference), 1e-10)
    assert len(counter.per_layer) == 2
    assert 1 <= counter.experts_per_token < TOP_K


def test_threshold_mask_rule():
    # unsorted, un-normalised weights with a tie: ranks are 3 and 7 (0.4 each, lower id first),
    # then 1 and 5 (0.1 each); normalised masses before each rank: 0, .4, .8, .9
    index = torch.tensor([[5, 3, 7, 1]])
    weights = torch.tensor([[0.1, 0.4, 0.4, 0.1]]) * 3
    expected = {
        0.3: [0, 1, 0, 0],
        0.4: [0, 1, 0, 0],  # mass .4 after the first rank reaches t=.4
        0.5: [0, 1, 1, 0],
        0.85: [0, 1, 1, 1],  # the tied 0.1s: expert 1 before expert 5
        0.95: [1, 1, 1, 1],
        1.0: [1, 1, 1, 1],
    }
    for t, keep in expected.items():
        assert threshold_mask(index, weights, t).int().tolist() == [keep], t


@pytest.mark.parametrize("t", [0, -0.1, 1.5, math.nan, math.inf, True, "0.5", None])
def test_invalid_threshold_raises(t):
    (model,) = _models("mixtral", ("xmoe",))
    with pytest.raises(ValueError, match=r"t must be a number in \(0, 1\]"):
        set_expert_threshold(model, t)


def test_threshold_on_a_model_without_xmoe_raises():
    (model,) = _models("mixtral", ("eager",))
    with pytest.raises(ValueError, match=r"experts_implementation='xmoe'.*found: \['eager'\]"):
        set_expert_threshold(model, 0.5)
    with pytest.raises(ValueError, match="no transformers experts modules"):
        set_expert_threshold(nn.Linear(2, 2), 0.5)


@pytest.mark.parametrize(
    ("family", "overrides", "reason"),
    [
        ("mixtral", {"hidden_act": "gelu_pytorch_tanh"}, "GELUTanh.*SwiGLU"),
        # transposed, interleaved gate/up with biases and a clamped gate of its own
        ("gpt_oss", {}, "GptOssExperts.*own _apply_gate"),
    ],
)
def test_unfusable_experts_fall_back_to_the_same_result(family, overrides, reason):
    eager, xmoe = _models(family, ("eager", "xmoe"), **overrides)
    with pytest.warns(UserWarning, match=reason):
        run = _run(xmoe)
    _assert_runs_equal(run, _run(eager), 1e-10)


def _experts_class(has_gate: bool, has_bias: bool, is_transposed: bool, act: str):
    """A transformers-style experts module with the given layout (E=6, D=16, H=8)."""

    @use_experts_implementation(has_gate=has_gate, has_bias=has_bias, is_transposed=is_transposed)
    class Experts(nn.Module):
        def __init__(self, config) -> None:
            super().__init__()
            self.num_experts, d_model, d_expert = 6, 16, 8
            width = 2 * d_expert if has_gate else d_expert
            up_shape = (d_model, width) if is_transposed else (width, d_model)
            down_shape = (d_expert, d_model) if is_transposed else (d_model, d_expert)
            up = nn.Parameter(torch.randn(self.num_experts, *up_shape) / 4)
            setattr(self, "gate_up_proj" if has_gate else "up_proj", up)
            self.down_proj = nn.Parameter(torch.randn(self.num_experts, *down_shape) / 4)
            if has_bias:
                bias = nn.Parameter(torch.randn(self.num_experts, width) / 4)
                setattr(self, "gate_up_proj_bias" if has_gate else "up_proj_bias", bias)
                self.down_proj_bias = nn.Parameter(torch.randn(self.num_experts, d_model) / 4)
            self.act_fn = ACT2FN[act]

        def forward(self, hidden_states, top_k_index, top_k_weights):
            return reference_experts(self, hidden_states, top_k_index, top_k_weights)

    return Experts


def _layout_inputs(num_experts: int, sentinels: bool = False):
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(20, 16, generator=generator, dtype=torch.float64)
    index = torch.stack([torch.randperm(num_experts, generator=generator)[:3] for _ in range(20)])
    weights = torch.rand(20, 3, generator=generator, dtype=torch.float64)
    if sentinels:  # as expert parallelism marks pairs owned by another rank: id E, weight 0
        index[::3, 1] = num_experts
        weights[::3, 1] = 0.0
    return x.requires_grad_(True), index, weights.requires_grad_(True)


def _grads(module, function, inputs, t: float = 1.0):
    """Output and gradients (x, weights, then the module's parameters) of a fixed cotangent."""
    x, index, weights = inputs
    tensors = (x, weights, *module.parameters())
    for tensor in tensors:
        tensor.grad = None
    out = function(module, x, index, weights, t) if t < 1 else function(module, x, index, weights)
    out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape))
    return [out.detach(), *(tensor.grad for tensor in tensors)]


def _assert_all_close(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
        _assert_close(a, e, 1e-10, f"output/gradient {index}")


@pytest.mark.filterwarnings("ignore:Experts runs experts_implementation='xmoe' through a")
@pytest.mark.parametrize(
    ("has_gate", "has_bias", "is_transposed", "act", "fused"),
    [
        (True, False, True, "silu", True),  # gated, transposed (in, out) storage
        (False, True, False, "gelu", True),
        (False, True, True, "relu", True),
        (False, False, False, "silu", True),
        (True, True, False, "silu", True),  # gated with bias on both halves of gate_up
        (True, False, False, "gelu", False),  # gated GELU: xmoe's gated experts are SwiGLU
        (False, False, False, "relu2", False),
    ],
)
def test_weight_layouts_equal_batched_mm(has_gate, has_bias, is_transposed, act, fused):
    config = types.SimpleNamespace(_experts_implementation="xmoe")
    torch.manual_seed(0)
    module = _experts_class(has_gate, has_bias, is_transposed, act)(config).double()
    inputs = _layout_inputs(module.num_experts)
    expected = _grads(module, batched_mm_experts_forward, inputs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        actual = _grads(module, lambda m, *a: m(*a), inputs)
    assert [("per-expert loop" in str(w.message)) for w in caught] == ([] if fused else [True])
    _assert_all_close(actual, expected)
    module.xmoe_threshold = 0.6
    thresholded = _grads(module, xmoe_experts_forward, inputs)
    assert getattr(module, KEPT_ATTR).float().mean() < 3
    _assert_all_close(thresholded, _grads(module, reference_experts, inputs, t=0.6))


def test_expert_parallel_sentinels_are_skipped():
    config = types.SimpleNamespace(_experts_implementation="xmoe")
    torch.manual_seed(0)
    module = _experts_class(True, False, False, "silu")(config).double()
    module._is_expert_parallel = True
    inputs = _layout_inputs(module.num_experts, sentinels=True)
    actual = _grads(module, xmoe_experts_forward, inputs)
    _assert_all_close(actual, _grads(module, batched_mm_experts_forward, inputs))
    assert getattr(module, KEPT_ATTR)[::3].eq(2).all()
