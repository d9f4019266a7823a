"""SparseMLP as an MoELayer: its output against a float64 per-token loop over the dense MLP's
weight slices (every rule, ties, one token, no tokens), the router's straight-through gradient
written out, every expert selected = the dense MLP, and state dicts of the layout before it was
an MoELayer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from xmoe.conversion import SparseMLP, SparsifyConfig
from xmoe.conversion.sparse_mlp import upgraded_name
from xmoe.layer import MoELayer

D, E, H = 12, 8, 4
TIED = (2, 5)  # experts whose router rows are equal: their learned scores tie exactly


def _dense(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random float64 dense SwiGLU weights: gate (I, D), up (I, D), down (D, I), I = E·H."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*shape, generator=g, dtype=torch.float64) for shape in
                 ((E * H, D), (E * H, D), (D, E * H)))  # fmt: skip


def _module(settings: SparsifyConfig, dense, router_std: float = 1.0) -> SparseMLP:
    """A SparseMLP whose expert e holds the dense neurons [e·H, (e+1)·H) and a random router
    with the :data:`TIED` rows equal."""
    gate, up, down = dense
    module = SparseMLP(D, settings, num_experts=E).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        module.w_gate.copy_(gate.view(E, H, D).transpose(1, 2))
        module.w_up.copy_(up.view(E, H, D).transpose(1, 2))
        module.w_down.copy_(down.T.reshape(E, H, D))
        weight = torch.randn(E, D, generator=g, dtype=torch.float64) * router_std
        weight[TIED[1]] = weight[TIED[0]]
        module.router.weight.copy_(weight)
    return module


def _expert_output(dense, e: int, x_D: torch.Tensor) -> torch.Tensor:
    """Expert e's output on one token, from the dense weights' neuron slice."""
    gate, up, down = dense
    neurons = slice(e * H, (e + 1) * H)
    return down[:, neurons] @ (F.silu(gate[neurons] @ x_D) * (up[neurons] @ x_D))


def _scores(settings: SparsifyConfig, dense, weight: torch.Tensor, x_D: torch.Tensor) -> list:
    if settings.router == "learned":
        return torch.softmax(weight @ x_D, dim=0).tolist()
    norms = [float(torch.linalg.vector_norm(_expert_output(dense, e, x_D))) for e in range(E)]
    total = sum(norms)
    return [n / total if total > 0 else 0.0 for n in norms]


def _chosen(settings: SparsifyConfig, scores: list) -> list[int]:
    """The rule on one token, written out: ranked by score, ties to the lower id."""
    ranked = sorted(range(E), key=lambda e: (-scores[e], e))
    if settings.active_fraction is not None:
        return ranked[: settings.top_k(E)]
    chosen, mass = [], 0.0
    for e in ranked:
        if chosen and mass >= settings.threshold:
            break
        chosen.append(e)
        mass += scores[e]
    return chosen


def _reference(module: SparseMLP, dense, x_SD: torch.Tensor):
    """(S, D) Σ over the chosen experts of weight · output, and each token's chosen experts."""
    settings, weight = module.settings, module.router.weight.detach()
    rows, chosen_S = [], []
    for x_D in x_SD:
        scores = _scores(settings, dense, weight, x_D)
        chosen = _chosen(settings, scores)
        factor = [E * scores[e] if settings.combine == "weighted" else 1.0 for e in chosen]
        terms = [f * _expert_output(dense, e, x_D) for f, e in zip(factor, chosen, strict=True)]
        rows.append(torch.stack(terms).sum(dim=0))
        chosen_S.append(chosen)
    return (torch.stack(rows) if rows else x_SD.new_zeros(0, D)), chosen_S


RULES = {
    "topk": {"active_fraction": 0.5},
    "threshold": {"threshold": 0.6},
    "oracle_topk": {"active_fraction": 0.375, "router": "oracle"},
    "oracle_threshold": {"threshold": 0.7, "router": "oracle"},
    "weighted": {"threshold": 0.8, "combine": "weighted"},
}


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("num_tokens", [40, 1, 0])
def test_it_equals_the_per_token_reference(rule, num_tokens):
    dense = _dense()
    module = _module(SparsifyConfig(expert_size=H, **RULES[rule]), dense).eval()
    assert isinstance(module, MoELayer)
    x = torch.randn(num_tokens, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = module(x.view(num_tokens, 1, D))  # any leading shape
    expected, chosen = _reference(module, dense, x)
    assert out.shape == (num_tokens, 1, D)
    torch.testing.assert_close(out.view(-1, D), expected, rtol=1e-12, atol=1e-12)
    assert module.experts_per_token.tolist() == [len(c) for c in chosen]
    if module.settings.router == "oracle" or num_tokens == 0:
        assert float(module.aux_loss) == 0.0
    else:
        assert float(module.aux_loss) > 0  # the Switch loss of the learned softmax, in eval too
    if num_tokens == 40 and module.settings.router == "learned":
        # the equal scores of the tied experts are ranked lower id first, on both sides of a cut
        straddles = [c for c in chosen if (TIED[0] in c) != (TIED[1] in c)]
        assert straddles and all(TIED[0] in c for c in straddles)


def test_a_token_no_expert_contributes_to_gets_every_expert_under_the_oracles_mass_rule():
    """All shares 0: the mass of the better ranks never reaches t, so the rule keeps them all
    (as the written-out rule does), and the output is 0."""
    dense = _dense()
    module = _module(SparsifyConfig(expert_size=H, threshold=0.5, router="oracle"), dense)
    x = torch.zeros(2, D, dtype=torch.float64)
    with torch.no_grad():
        out = module(x)
    assert module.experts_per_token.tolist() == [len(c) for c in _reference(module, dense, x)[1]]
    assert module.experts_per_token.tolist() == [E, E]
    assert torch.equal(out, torch.zeros(2, D, dtype=torch.float64))


def test_the_straight_through_combine_gives_the_router_the_written_out_gradient():
    """Unweighted combine while autograd records: 1 in value, and dL/dz_j =
    Σ_{e chosen} ⟨∂L/∂y, f_e(x)⟩ · (δ_ej - p_j) for the logits z = W x (∂ log p_e / ∂z)."""
    dense = _dense()
    module = _module(SparsifyConfig(expert_size=H, threshold=0.6), dense, router_std=0.5).train()
    x = torch.randn(9, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    cotangent = torch.randn(9, D, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    out = module(x)
    expected, chosen = _reference(module, dense, x)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)  # still 1 in value
    (out * cotangent).sum().backward()
    weight = module.router.weight.detach()
    grad = torch.zeros_like(weight)
    for s, x_D in enumerate(x):
        p = torch.softmax(weight @ x_D, dim=0)
        dz = torch.zeros(E, dtype=torch.float64)
        for e in chosen[s]:
            dz += torch.dot(cotangent[s], _expert_output(dense, e, x_D)) * (F.one_hot(
                torch.tensor(e), E).double() - p)  # fmt: skip
        grad += torch.outer(dz, x_D)
    torch.testing.assert_close(module.router.weight.grad, grad, rtol=1e-10, atol=1e-12)
    assert module.aux_loss.requires_grad  # the balance loss reaches the router too


@pytest.mark.parametrize("rule", [{"active_fraction": 1.0}, {"threshold": 1.0}])
@pytest.mark.parametrize("router", ["learned", "oracle"])
def test_every_expert_selected_is_the_dense_mlp(rule, router):
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    dense_mlp = LlamaMLP(
        LlamaConfig(hidden_size=D, intermediate_size=E * H, num_attention_heads=2)
    ).double()
    dense = (dense_mlp.gate_proj.weight, dense_mlp.up_proj.weight, dense_mlp.down_proj.weight)
    module = _module(SparsifyConfig(expert_size=H, router=router, **rule), dense)
    x = torch.randn(3, 5, D, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(module(x), dense_mlp(x), rtol=0, atol=1e-12)
    assert module.experts_per_token.tolist() == [E] * 15


def test_a_state_dict_of_the_earlier_layout_loads():
    """``w_gate_up`` / ``w_down`` (the names before SparseMLP was an MoELayer) load as
    ``experts.w1`` / ``experts.w2``; ``router.weight`` kept its name."""
    settings = SparsifyConfig(expert_size=H, threshold=0.6)
    source = _module(settings, _dense())
    earlier = {
        "w_gate_up": source.w_gate_up.detach().clone(),
        "w_down": source.w_down.detach().clone(),
        "router.weight": source.router.weight.detach().clone(),
    }
    assert set(source.state_dict()) == {"experts.w1", "experts.w2", "router.weight"}
    module = SparseMLP(D, settings, num_experts=E).double()
    module.load_state_dict(earlier)
    for name, tensor in source.state_dict().items():
        assert torch.equal(module.state_dict()[name], tensor), name
    assert upgraded_name("model.layers.3.mlp.w_gate_up") == "model.layers.3.mlp.experts.w1"
    assert upgraded_name("model.layers.3.mlp.router.weight") == "model.layers.3.mlp.router.weight"
