"""The rows of `xmoe reproduce --suite routers`: every router at its paper's default, on the LM
table's model size, corpus, trainer and token budget, with equal total expert parameters.

A row is a name and a function of the base model's (d_model, d_ff) giving the MoE layer; the
routers come from :data:`xmoe.registry.ROUTERS` at run time, so a router joins the suite by
being registered, and a row whose router (or option) is not there is skipped with a note. Every
row but the threshold ones keeps top-2's shape (16 experts of d_ff/2; null experts, zero-FLOP
experts and frozen or recurrent routers add no expert weights); the threshold rows keep
xmoe-32's (32 of d_ff/4); DeepSeekMoE segments top-2 (``fine_grained_shared``). ``top2`` and
``xmoe-32`` are the LM table's presets, rerun here as the reference rows. A registered router
that no row names gets a row of its own, by its name, at top-2's shape and its option defaults.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from xmoe.config import ConfigError, MoEConfig
from xmoe.registry import ROUTERS
from xmoe.training.config import TrainConfig
from xmoe.training.presets import LOGIT_SCALE, fine_grained_shared, preset, preset_moe

Model = dict[str, int]
"""The base model's ``d_model`` and ``d_ff``."""


def _top2(model: Model) -> MoEConfig:
    return preset_moe("top2", model)


def _xmoe32(model: Model) -> MoEConfig:
    return preset_moe("xmoe-32", model)


def _routed(base: Callable[[Model], MoEConfig], router: str, **fields) -> Callable:
    """A row: ``base``'s shape routed by ``router`` (its own option defaults unless given)."""

    def build(model: Model) -> MoEConfig:
        return replace(base(model), router=router, **{"router_options": {}, **fields})

    return build


ROWS: dict[str, Callable[[Model], MoEConfig]] = {
    "top2": _top2,
    "xmoe-32": _xmoe32,
    "topp": lambda model: preset_moe("topp-32", model),
    "deepseek": lambda model: fine_grained_shared(_top2(model), split=4, shared=1),
    "null": _routed(_top2, "null_topk", top_k=3, router_options={"num_null": 8}),
    "expert_choice": _routed(_top2, "expert_choice"),
    "sigmoid": _routed(_xmoe32, "sigmoid"),
    # SMoE-Dropout computes every expert it selects: top-2's capacity (sized for k = 2) dropped
    # 70% of the pairs once k had grown (a measured train drop rate of 0.695)
    "smoe_dropout": _routed(_top2, "smoe_dropout", capacity_factor=None),
    "thor": _routed(_top2, "thor", capacity_factor=None),  # one expert per batch: no drops
    "moepp": lambda model: replace(
        _routed(_top2, "moepp")(model),
        experts="moepp",
        num_experts=_top2(model).num_experts + 4,
        expert_options={},
        renormalize=True,  # MoE++ always renormalises its top-k weights
    ),
    "recurrent": _routed(_top2, "recurrent"),
    "recurrent_threshold": _routed(
        _xmoe32, "recurrent_threshold", router_options={"logit_scale": LOGIT_SCALE}
    ),
    "threshold+shared": lambda model: fine_grained_shared(
        _top2(model), 2, 1, "deepseek_threshold", {"logit_scale": LOGIT_SCALE}
    ),
    "threshold+null": _routed(
        _xmoe32, "null_threshold", router_options={"num_null": 16, "logit_scale": LOGIT_SCALE}
    ),
}
"""Row name -> its MoE layer at a paper's default (AdaMoE: k raised to 3 with m = n/2 null
experts; MoE++: top-2's 16 FFN experts plus its 7B model's 2 constant, 1 copy and 1 zero
expert, top-k weights renormalised as MoE++ does; THOR: dropless, as one expert takes a whole
batch; SMoE-Dropout: dropless, as k grows from 2 to 8 over the suite's 489 steps; expert
choice: top-2's capacity factor 2, so C = 2S/E; the rest their options' defaults)."""

COMBINATIONS = ("threshold+shared", "threshold+null")
"""Rows no paper ran: XMoE's threshold rule with shared experts, and with null experts."""


def row_config(name: str, base_preset: str = "top2") -> TrainConfig:
    """Row ``name``'s training config: ``base_preset``'s model, data and training with the
    row's MoE layer (a registered router's name with no row: top-2's shape, its defaults).

    Raises:
        ConfigError: ``name`` is neither a row nor a router, or its router or options are not
            registered.
    """
    if name not in ROWS and name not in ROUTERS:
        raise ConfigError(f"row={name!r} is invalid: row must be one of {tuple(ROWS)}")
    build = ROWS.get(name) or _routed(_top2, name)
    base = preset(base_preset)
    model = {"d_model": base.model.d_model, "d_ff": base.model.d_ff}
    return replace(base, model=replace(base.model, moe=build(model)), preset=name)


def available_rows(base_preset: str = "top2") -> tuple[list[str], list[str]]:
    """The rows whose routers are registered now (then a row for each registered router no
    row uses), and a note for each skipped row."""
    names, notes, used = [], [], set()
    for name in ROWS:
        try:
            config = row_config(name, base_preset)
        except (ConfigError, KeyError) as error:  # a router or option not (yet) registered
            notes.append(f"{name}: skipped ({error})")
        else:
            names.append(name)
            used.add(config.model.moe.router)
    for router in ROUTERS:
        if router not in used and router not in ROWS:
            try:
                row_config(router, base_preset)
            except ConfigError as error:  # its defaults need a shape top-2's is not
                notes.append(f"{router}: no row ({error})")
            else:
                names.append(router)
    return names, notes
