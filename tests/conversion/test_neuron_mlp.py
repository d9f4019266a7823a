"""NeuronMLP's batch-1 decode path (xmoe.conversion.neuron_mlp): one token without gradients
reads only the kept rows of a row-major weight copy; it must equal the dense masked
computation on random, empty and full masks, and prefill, batches and training stay dense."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from tests.conversion.test_neuron_mode import neurons
from tests.conversion.test_sparsify import tiny_llama, token_ids
from xmoe.conversion import NeuronMLP, SparsifyConfig, rows_kernel
from xmoe.conversion.rows_kernel import KERNELS, using_kernel
from xmoe.conversion.sparse_decode import keeping_threshold

HIDDEN, FFN = 13, 29  # odd sizes: no power-of-two row lengths
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}
SITE_CHOICES = [("gate_up", "down"), ("gate_up", "gate"), ("down",), ("gate_up",), ("gate",)]


def random_mlp(sites, dtype=torch.float64, seed: int = 0) -> NeuronMLP:
    """A NeuronMLP of random weights and random score scales, thresholds 0 (keeps all)."""
    generator = torch.Generator().manual_seed(seed)
    mlp = NeuronMLP(HIDDEN, FFN, SparsifyConfig(mode="neurons", sites=sites, target_flops=1.0)).to(
        dtype
    )
    with torch.no_grad():
        for tensor in [*mlp.parameters(), mlp.scale_gate_up, mlp.scale_down, mlp.scale_gate]:
            tensor.copy_(torch.rand(tensor.shape, generator=generator, dtype=dtype) + 0.1)
            tensor.mul_(torch.randn(tensor.shape, generator=generator, dtype=dtype).sign())
            tensor.abs_() if tensor.dim() == 1 else None
    return mlp.requires_grad_(False)


def masked_dense(mlp: NeuronMLP, x_SD: torch.Tensor) -> torch.Tensor:
    """The masked MLP from the nn.Linear weights, by hand: an entry is kept when its score
    reaches its site's threshold, a dropped one is zeroed."""
    sites = mlp.settings.sites
    if "gate_up" in sites:
        x_SD = torch.where(x_SD.abs() * mlp.scale_gate_up >= mlp.threshold_gate_up, x_SD, 0)
    activated = F.silu(x_SD @ mlp.gate_proj.weight.T)
    h = activated * (x_SD @ mlp.up_proj.weight.T)
    if "gate" in sites:
        h = torch.where(activated.abs() * mlp.scale_gate >= mlp.threshold_gate, h, 0)
    if "down" in sites:
        h = torch.where(h.abs() * mlp.scale_down >= mlp.threshold_down, h, 0)
    return h @ mlp.down_proj.weight.T


def keep_fraction(mlp: NeuronMLP, x_1D: torch.Tensor, kept: float) -> None:
    """Each site's threshold keeping ``kept`` of this token's entries there (0: none), halfway
    between two scores, so float32 rounding cannot flip a mask."""
    with torch.no_grad():
        mlp.threshold_gate_up.fill_(keeping_threshold(mlp.score("gate_up", x_1D), kept))
        x_1D = torch.where(mlp.keep("gate_up", x_1D), x_1D, 0)
        activated = F.silu(x_1D @ mlp.gate_proj.weight.T)
        h = activated * (x_1D @ mlp.up_proj.weight.T)
        mlp.threshold_gate.fill_(keeping_threshold(mlp.score("gate", activated), kept))
        mlp.threshold_down.fill_(keeping_threshold(mlp.score("down", h), kept))


def rows_used_only(mlp: NeuronMLP, x_1D: torch.Tensor) -> None:
    """Poison (NaN) the weights of the inputs ``x_1D`` drops: channels at gate/up, neurons at
    down; gate-first: channels at gate, neurons at up (whose kept rows it reads whole) and
    down. Reading any of them makes the output NaN."""
    sites = mlp.settings.sites
    with torch.no_grad():
        dropped_x = ~mlp.keep("gate_up", x_1D)[0] if "gate_up" in sites else None
        x_1D = torch.where(mlp.keep("gate_up", x_1D), x_1D, 0) if dropped_x is not None else x_1D
        activated = F.silu(x_1D @ mlp.gate_proj.weight.T)
        h = activated * (x_1D @ mlp.up_proj.weight.T)
        if "down" in sites:
            mlp.down_proj.weight[:, ~mlp.keep("down", h)[0]] = float("nan")
        if "gate" in sites:
            dropped_n = ~mlp.keep("gate", activated)[0]
            mlp.down_proj.weight[:, dropped_n] = float("nan")
            mlp.up_proj.weight[dropped_n] = float("nan")
        if dropped_x is not None:
            mlp.gate_proj.weight[:, dropped_x] = float("nan")
            if "gate" not in sites:
                mlp.up_proj.weight[:, dropped_x] = float("nan")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kept", [0.0, 0.3, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("sites", SITE_CHOICES)
def test_one_token_decode_equals_the_dense_masked_computation(sites, kept, dtype, kernel):
    """float32 with the native kernels: one fused C call (where a compiler builds it); else,
    and with ``embedding_bag``, the torch path."""
    mlp = random_mlp(sites, dtype)
    x = torch.randn(1, 1, HIDDEN, generator=torch.Generator().manual_seed(1), dtype=dtype)
    keep_fraction(mlp, x[0], kept)
    expected = masked_dense(mlp, x)
    with torch.no_grad(), using_kernel(kernel):
        fused = mlp.fused_decode(x[0], *mlp.row_major())
        got = mlp(x)
    native = kernel == "native" and dtype == torch.float32 and rows_kernel._library() is not None
    assert (fused is not None) == native
    assert mlp.decodes(x) and got.shape == x.shape
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)
    assert bool(got.any()) == (kept > 0)  # every site choice drops all at kept 0
    fraction = mlp.flops_fraction
    with torch.no_grad():  # the dense path's fraction: the same masks
        mlp(x.expand(2, 1, HIDDEN))
    torch.testing.assert_close(fraction, mlp.flops_fraction[:1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("sites", SITE_CHOICES)
def test_decode_reads_only_the_kept_rows(sites, dtype, kernel):
    """The dropped inputs' weights are NaN: the dense path's output is NaN, the decode path's
    is the masked computation on the clean weights (float32: by the native kernels where they
    build; float64: the fallbacks, whose GEMV for gate-first's up reads every row and zeroes
    the dropped neurons' dots)."""
    mlp = random_mlp(sites, dtype, seed=2)
    x = torch.randn(1, HIDDEN, generator=torch.Generator().manual_seed(3), dtype=dtype)
    keep_fraction(mlp, x, 0.5)
    expected = masked_dense(mlp, x)
    rows_used_only(mlp, x)
    with torch.no_grad(), using_kernel(kernel):
        got = mlp(x)
        assert mlp(x.expand(2, HIDDEN)).isnan().any()
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)


def test_prefill_batches_and_training_take_the_dense_path():
    mlp = random_mlp(("gate_up", "down"))
    one = torch.zeros(1, 1, HIDDEN, dtype=torch.float64)
    assert mlp.decodes(one)
    assert not mlp.decodes(torch.zeros(1, 2, HIDDEN, dtype=torch.float64))  # prefill
    assert not mlp.decodes(torch.zeros(2, 1, HIDDEN, dtype=torch.float64))  # a batch
    assert not mlp.decodes(one.clone().requires_grad_())  # a gradient to the input
    mlp.requires_grad_(True)
    assert not mlp.decodes(one)  # gradients to the weights
    with torch.no_grad():
        assert mlp.decodes(one)
    mlp(one).sum().backward()  # gradients reach the weights through the dense path
    assert mlp.gate_proj.weight.grad is not None


def test_the_row_major_copy_follows_weight_changes():
    mlp = random_mlp(("gate_up", "down"))
    x = torch.randn(1, HIDDEN, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with torch.no_grad():
        before = mlp(x)
        mlp.up_proj.weight.mul_(2)  # in place: the version counter moves
        torch.testing.assert_close(mlp(x), masked_dense(mlp, x), rtol=0, atol=1e-12)
        mlp.down_proj.weight = torch.nn.Parameter(mlp.down_proj.weight * 3)  # replaced
        torch.testing.assert_close(mlp(x), masked_dense(mlp, x), rtol=0, atol=1e-12)
    assert not torch.equal(before, mlp(x))
    assert "_row_major" not in "".join(mlp.state_dict())  # derived, never saved


@pytest.mark.parametrize("sites", [("gate_up", "down"), ("gate_up", "gate")])
def test_a_sparsified_llama_decodes_token_by_token_as_its_prefill(sites):
    """Generation's decode steps (one token each, with the KV cache) take the decode path and
    give the logits the dense prefill gives at the same positions."""
    sparse = neurons(
        tiny_llama(), token_ids(seed=2), target_flops=0.6, sites=sites, allocation="uniform"
    )
    ids = token_ids(batch=1, length=8, seed=3)
    with torch.no_grad():
        prefill = sparse(input_ids=ids).logits
        steps = sparse(input_ids=ids[:, :4], use_cache=True)
        logits, cache = [steps.logits], steps.past_key_values
        for position in range(4, 8):
            step = sparse(input_ids=ids[:, position : position + 1], past_key_values=cache)
            logits.append(step.logits)
            cache = step.past_key_values
    torch.testing.assert_close(torch.cat(logits, dim=1), prefill, rtol=0, atol=1e-12)
    assert all(mlp._row_major is not None for mlp in sparse.modules() if isinstance(mlp, NeuronMLP))


@pytest.mark.parametrize("sites", SITE_CHOICES)
def test_flops_fraction_read_late_is_the_last_forwards(sites):
    """The fraction is computed when read, from the last forward's masks: read after two
    decode steps in inference mode (outside it), it equals the dense path's on that token."""
    mlp = random_mlp(sites, seed=5)
    first, last = torch.randn(2, 1, HIDDEN, generator=torch.Generator().manual_seed(6)).double()
    keep_fraction(mlp, first, 0.5)
    assert mlp.flops_fraction is None  # before any forward
    with torch.inference_mode():
        mlp(first)
        mlp(last)
    decoded = mlp.flops_fraction
    with torch.no_grad():
        mlp(last.expand(2, HIDDEN))  # the dense path on the same token
    assert mlp.flops_fraction.dtype == torch.float64 and decoded.shape == (1,)
    torch.testing.assert_close(decoded, mlp.flops_fraction[:1], rtol=0, atol=1e-12)
    mlp(first)
    assert not torch.equal(mlp.flops_fraction, decoded)  # a later forward's masks
