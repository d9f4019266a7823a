"""sparsify: a dense causal LM of a registered family (``xmoe.registry.FAMILIES``: Llama,
Mistral, Qwen2, ...) -> the same model with neuron-group MoE MLPs, or (``mode="neurons"``) with
MLPs that skip input channels and neurons below calibrated thresholds.

Shape legend: I FFN width, D hidden size, E experts, H = expert_size, S calibration tokens.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from xmoe.conversion.architecture import layer_mlps, supported_mlps
from xmoe.conversion.calibration import collect_mlp_inputs, spaced_rows
from xmoe.conversion.config import SparsifyConfig
from xmoe.conversion.families import DenseWeights
from xmoe.conversion.modeling import SETTINGS_KEY, sparse_classes
from xmoe.conversion.neuron_mlp import neuron_mlps
from xmoe.conversion.neuron_thresholds import convert_layer, resolve_layer
from xmoe.conversion.partition import clustered_partition, contiguous_partition
from xmoe.conversion.router_training import train_router
from xmoe.conversion.sparse_mlp import SparseMLP
from xmoe.registry import FAMILIES
from xmoe.routing.expert_norms import expert_output_norms, norm_shares
from xmoe.routing.stats import layer_mean


def _expert_weights(
    dense: DenseWeights, perm_I: torch.Tensor, expert_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The dense MLP's weights, neurons permuted, as (E, D, H) gate and up, (E, H, D) down."""
    gate_ID, up_ID, down_DI = dense
    gate_ID, up_ID, down_DI = gate_ID[perm_I], up_ID[perm_I], down_DI[:, perm_I]
    d_model = gate_ID.shape[1]
    w_gate = gate_ID.view(-1, expert_size, d_model).transpose(1, 2).contiguous()
    w_up = up_ID.view(-1, expert_size, d_model).transpose(1, 2).contiguous()
    w_down = down_DI.T.reshape(-1, expert_size, d_model).contiguous()
    return w_gate, w_up, w_down


def sparsify(
    model: nn.Module,
    expert_size: int | None = None,
    partition: str = "contiguous",
    calibration: torch.Tensor | None = None,
    router: str = "learned",
    active_fraction: float | None = None,
    threshold: float | None = None,
    batch_size: int = 8,
    progress: bool = False,
    mlp_inputs: list[torch.Tensor] | None = None,
    **options: Any,
) -> nn.Module:
    """Convert a dense causal LM into one whose MLPs are unweighted neuron-group
    MoEs (MoEfication / XMoE-on-dense), or with ``mode="neurons"`` threshold-sparse MLPs
    (:class:`~xmoe.conversion.neuron_mlp.NeuronMLP`: TEAL / WINA / CHESS, no router). The input
    model is left unchanged.

    Per decoder layer: partition the I neurons into E = I / H experts of H neurons
    (``contiguous`` slices or ``clustered`` co-activation groups), bake the permutation into the
    weights, and (``router="learned"``) fit a linear router to each expert's share of the true
    output norm on the calibration MLP inputs (:mod:`xmoe.conversion.router_training`).

    Neurons mode, per decoder layer: copy the dense weights, then calibrate each site's
    threshold on the calibration MLP inputs so that the layer computes ``target_flops`` of its
    dense FFN FLOPs (:mod:`xmoe.conversion.neuron_thresholds`).

    Args:
        model: a causal LM of a family in ``xmoe.registry.FAMILIES`` (transformers'
            ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``) with SwiGLU MLPs.
        expert_size: H, neurons per expert; must divide ``intermediate_size`` (experts mode,
            where it is required).
        partition: ``"contiguous"`` or ``"clustered"``.
        calibration: (B, T) int64 token ids; needed by the clustered partition and the learned
            router.
        router: ``"learned"`` or ``"oracle"``.
        active_fraction: top-k with k = ceil(f·E) (0.5 when neither rule is given).
        threshold: t for the cumulative-mass rule instead (give one of the two).
        batch_size: calibration sequences per forward pass.
        progress: tqdm bars on calibration, layers and router training.
        mlp_inputs: the calibration MLP inputs, one (S, D) tensor per layer, as
            :func:`~xmoe.conversion.calibration.collect_mlp_inputs` returns them; given instead
            of ``calibration`` to convert one model several ways without re-running it.
        options: other :class:`SparsifyConfig` fields (``router_steps``, ``router_lr``,
            ``cluster_iters``, ``cluster_tokens``, ``seed``; ``mode``, and the neurons mode's
            ``target_flops``, ``scoring``, ``allocation``, ``sites``).

    Returns:
        the family's sparse class (``SparseLlamaForCausalLM`` for a Llama, see
        :func:`~xmoe.conversion.modeling.sparse_classes`) in ``eval`` mode, on the input's device
        and dtype; ``model.config.xmoe_sparsify`` records the settings it was built with
        (``save_pretrained`` writes the ones its SparseMLPs hold then).

    Raises:
        UnsupportedModelError: the model is not a supported architecture.
        ConfigError: a bad setting (``expert_size`` not dividing the FFN width, a fraction
            outside (0, 1], an unknown site or scoring, ...).
        ValueError: calibration missing where needed.
    """
    settings = SparsifyConfig(
        expert_size=expert_size,
        partition=partition,
        router=router,
        active_fraction=active_fraction,
        threshold=threshold,
        **options,
    )
    name, mlps = supported_mlps(model)
    family = FAMILIES[name]
    if settings.mode == "experts":
        settings.num_experts(model.config.intermediate_size)  # fail before calibrating
    needs_data = settings.needs_calibration
    if needs_data and calibration is None and mlp_inputs is None:
        what = (
            "mode='neurons'"
            if settings.mode == "neurons"
            else f"partition={settings.partition!r} with router={settings.router!r}"
        )
        raise ValueError(f"{what} needs calibration token ids (B, T)")
    if mlp_inputs is not None and len(mlp_inputs) != len(mlps):
        raise ValueError(f"mlp_inputs holds {len(mlp_inputs)} layers, the model {len(mlps)}")
    inputs = mlp_inputs
    if needs_data and inputs is None:
        inputs = collect_mlp_inputs(model, mlps, calibration, batch_size, progress)

    config_cls, model_cls = sparse_classes(name)
    values = model.config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", SETTINGS_KEY):
        values.pop(key, None)
    config = config_cls(**values, **{SETTINGS_KEY: settings.to_dict()})
    parameter = next(model.parameters())
    sparse = model_cls(config).to(device=parameter.device, dtype=parameter.dtype)
    # every weight but the MLPs' (found where the family puts them), which are converted below
    names = {id(module): prefix for prefix, module in model.named_modules()}
    mlp_prefixes = tuple(f"{names[id(mlp)]}." for mlp in mlps)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(mlp_prefixes)}
    missing, unexpected = sparse.load_state_dict(state, strict=False)
    if unexpected or not all(key.startswith(mlp_prefixes) for key in missing):
        raise RuntimeError(f"state mismatch: missing {missing}, unexpected {unexpected}")
    sparse.generation_config = copy.deepcopy(model.generation_config)

    layers = tqdm(mlps, desc="layers", disable=not progress)
    if settings.mode == "neurons":
        for index, (dense_mlp, mlp) in enumerate(zip(layers, family.mlps(sparse), strict=True)):
            convert_layer(mlp, family.dense_weights(dense_mlp), inputs[index], settings)
        return sparse.eval()
    for index, (dense_mlp, sparse_mlp) in enumerate(zip(layers, family.mlps(sparse), strict=True)):
        dense = family.dense_weights(dense_mlp)  # (gate_ID, up_ID, down_DI)
        if settings.partition == "clustered":
            perm_I = clustered_partition(
                spaced_rows(inputs[index], settings.cluster_tokens),
                *dense[:2],
                settings.expert_size,
                settings.cluster_iters,
                settings.seed,
            ).to(parameter.device)
        else:
            perm_I = contiguous_partition(model.config.intermediate_size).to(parameter.device)
        w_gate, w_up, w_down = _expert_weights(dense, perm_I, settings.expert_size)
        with torch.no_grad():
            sparse_mlp.w_gate.copy_(w_gate)
            sparse_mlp.w_up.copy_(w_up)
            sparse_mlp.w_down.copy_(w_down)
        if settings.router == "learned":
            x_SD = inputs[index]
            with torch.no_grad():
                target_SE = norm_shares(expert_output_norms(x_SD, w_gate, w_up, w_down))
            train_router(
                sparse_mlp.router,
                x_SD,
                target_SE,
                settings.router_steps,
                settings.router_lr,
                progress,
                desc=f"router {index}",
            )
    return sparse.eval()


def sparse_mlps(model: nn.Module) -> list[SparseMLP]:
    """The :class:`SparseMLP` modules of ``model``, in order."""
    return [m for m in model.modules() if isinstance(m, SparseMLP)]


def _reconfigure(model: nn.Module, **changes: Any) -> None:
    modules = sparse_mlps(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no SparseMLP: convert it with sparsify()")
    settings = dataclasses.replace(modules[0].settings, **changes)  # validates
    for module in modules:  # save_pretrained records the modules' settings
        module.configure(settings)


def set_active_fraction(model: nn.Module, fraction: float) -> None:
    """Select the top ceil(f·E) experts per token in every SparseMLP of ``model``
    (``save_pretrained`` records it).

    Raises:
        ConfigError: ``fraction`` is not a number in (0, 1] (nothing changes then).
        ValueError: the model has no SparseMLP.
    """
    _reconfigure(model, active_fraction=fraction, threshold=None)


def set_threshold(model: nn.Module, threshold: float) -> None:
    """Select, per token, the smallest set of experts whose router probability mass reaches t
    (XMoE's rule) in every SparseMLP of ``model``.

    Raises:
        ConfigError: ``threshold`` is not a number in (0, 1].
        ValueError: the model has no SparseMLP.
    """
    _reconfigure(model, active_fraction=None, threshold=threshold)


def set_combine(model: nn.Module, combine: str) -> None:
    """Switch every SparseMLP of ``model`` between the ``unweighted`` (MoEfication) and
    ``weighted`` (E · router probability, the XMoE route) combine."""
    _reconfigure(model, combine=combine)


def set_router(model: nn.Module, router: str) -> None:
    """Switch every SparseMLP of ``model`` between the ``learned`` and ``oracle`` routers."""
    _reconfigure(model, router=router)


def set_target_flops(
    model: nn.Module,
    target_flops: float,
    calibration: torch.Tensor,
    batch_size: int = 8,
    progress: bool = False,
) -> None:
    """Re-solve the thresholds of every NeuronMLP of ``model`` (the ``neurons`` mode) on its
    current weights, so that each layer computes ``target_flops`` of its dense FFN FLOPs on
    ``calibration`` (``save_pretrained`` records the new target). For a model whose weights
    changed since they were calibrated (after ``recover``, whose masks are the fixed thresholds
    and which moves the scores across them), or to move a converted model to another F.

    Each layer's scales and allocation stay as they are; its sites' sparsities move together
    (:func:`~xmoe.conversion.neuron_thresholds.resolve_layer`). The MLP inputs come from one
    pass of ``model`` as it is before the re-solve (not of the dense model, as in
    ``sparsify``: its weights may have moved away from the dense model's).

    Args:
        target_flops: F in (0, 1].
        calibration: (B, T) int64 token ids. batch_size: sequences per forward pass.
        progress: tqdm bars on calibration and layers.

    Raises:
        ConfigError: ``target_flops`` outside (0, 1] or below what the model's sites can reach
            (nothing changes then).
        ValueError: the model has no NeuronMLP; ``calibration`` is not (B, T) int64.
    """
    modules = neuron_mlps(model)
    if not modules:
        raise ValueError(
            f"{type(model).__name__} has no NeuronMLP: convert it with sparsify(mode='neurons')"
        )
    settings = dataclasses.replace(modules[0].settings, target_flops=target_flops)  # validates
    was_training = model.training
    model.eval()
    try:
        inputs = collect_mlp_inputs(model, layer_mlps(model), calibration, batch_size, progress)
        for module, x_SD in zip(
            tqdm(modules, desc="layers", disable=not progress), inputs, strict=True
        ):
            resolve_layer(module, x_SD, target_flops)
            module.settings = settings  # save_pretrained records the modules' settings
    finally:
        model.train(was_training)


def experts_per_token(model: nn.Module) -> float:
    """Mean selected experts per token over the SparseMLPs of ``model``'s last forward."""
    counts = [m.experts_per_token for m in sparse_mlps(model) if m.experts_per_token is not None]
    if not counts:
        return 0.0
    return layer_mean([float(c.double().mean()) for c in counts])
