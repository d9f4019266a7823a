"""Validated configuration dataclasses shared by the Python API, the CLI and the HF integration."""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator, Mapping
from dataclasses import MISSING, asdict, dataclass, fields, replace
from typing import Any

from xmoe import flops
from xmoe.registry import ENGINES, EXPERT_FFN, EXPERT_KINDS, ROUTERS

ACTIVATIONS = ("gelu", "relu", "silu", "swiglu")
"""Expert activations. ``gelu`` is the exact (erf) GELU; ``swiglu`` is the gated expert
``silu(x·gate) * (x·up)``, then ``·w2``, with gate and up stored side by side in ``w1``."""

GATED_ACTIVATIONS = ("swiglu",)

INITS = ("independent", "identical")
"""``independent``: every expert drawn on its own. ``identical``: every expert of a layer is a copy
of expert 0, as in the XMoE reference code (the router then breaks the symmetry)."""


class _AutoOr(Collection[str]):
    """``auto`` and the names in ``registry``, read on each use: registering an engine (or an
    expert FFN) is all it takes to make it a valid ``backend`` (``expert_ffn``)."""

    def __init__(self, registry: Mapping[str, Any]) -> None:
        self._registry = registry

    def __contains__(self, name: object) -> bool:
        return name == "auto" or name in self._registry

    def __iter__(self) -> Iterator[str]:
        return iter(("auto", *self._registry))

    def __len__(self) -> int:
        return 1 + len(self._registry)


BACKENDS: Collection[str] = _AutoOr(ENGINES)
"""How the kept (token, expert) pairs are multiplied: ``grouped`` uses ``F.grouped_mm``, ``loop``
is a per-expert ``torch.mm`` loop with a hand-written backward (any dtype, any size), ``batched``
gathers one weight copy per pair (fast for a handful of tokens), any other registered engine by
its name, and ``auto`` picks per call."""

EXPERT_FFNS: Collection[str] = _AutoOr(EXPERT_FFN)
"""The fused expert FFNs by name (:data:`xmoe.registry.EXPERT_FFN`), and ``auto``: the Triton
kernels on CUDA where triton is installed, ``xmoe`` elsewhere
(:func:`xmoe.experts.fused.choose_expert_ffn`)."""


class ConfigError(ValueError):
    """A configuration value outside its allowed range; the message names the parameter."""


def _require(condition: bool, name: str, value: Any, allowed: str) -> None:
    if not condition:
        raise ConfigError(f"{name}={value!r} is invalid: {name} must be {allowed}")


def _is_int(value: Any) -> bool:
    """An integer, and not a bool (``True`` is an ``int`` to Python, never a size to us)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A finite int or float, and not a bool: the test every float field goes through."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    # an int is finite (and may be too large for math.isfinite, which converts to float)
    return isinstance(value, int) or math.isfinite(value)


def _require_bool(name: str, value: Any) -> None:
    _require(isinstance(value, bool), name, value, "a bool (True or False)")


SEED_MAX = 2**63 - 1
"""Largest seed: torch takes 64-bit seeds, and the trainer seeds its batch order with seed + 1."""


def _require_seed(name: str, value: Any) -> None:
    """``value`` is a seed torch accepts (a larger one fails inside torch without a name)."""
    _require(_is_int(value) and 0 <= value <= SEED_MAX, name, value, "an integer in [0, 2**63 - 1]")


def _require_choice(name: str, value: Any, choices: Collection[str]) -> None:
    """``value`` is a str among ``choices`` (checked as a str first: a list is not hashable)."""
    allowed = sorted(choices) if isinstance(choices, Mapping) else tuple(choices)
    _require(isinstance(value, str) and value in choices, name, value, f"one of {allowed}")


def require_threshold(value: Any) -> None:
    """``value`` is a routing mass threshold t (or top-p's p): a number in (0, 1]."""
    _require(_is_number(value) and 0.0 < value <= 1.0, "threshold", value, "a number in (0, 1]")


def require_top_k(value: Any, num_experts: int) -> None:
    """``value`` is a k the top-k router can keep: an integer in [1, num_experts]."""
    _require(
        _is_int(value) and 1 <= value <= num_experts,
        "top_k",
        value,
        f"an integer in [1, num_experts={num_experts}]",
    )


class DictConfig:
    """``to_dict`` / ``from_dict`` for the config dataclasses; unknown or missing keys, and
    anything but a dict, are a :class:`ConfigError`."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]):
        if not isinstance(values, Mapping):
            raise ConfigError(
                f"{cls.__name__} must be given as a dict of its fields, got "
                f"{type(values).__name__} {values!r}"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known, key=str)
        if unknown:
            raise ConfigError(
                f"unknown {cls.__name__} field(s) {unknown}; known fields: {sorted(known)}"
            )
        required = [
            f.name
            for f in fields(cls)
            if f.init and f.default is MISSING and f.default_factory is MISSING
        ]
        missing = [name for name in required if name not in values]
        if missing:
            raise ConfigError(
                f"missing {cls.__name__} field(s) {missing}: {cls.__name__} requires {required}"
            )
        return cls(**values)

    @classmethod
    def coerce(cls, value: Any, name: str):
        """``value`` as an instance of this class: None gives the defaults, a dict its fields."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            return cls.from_dict(value)
        raise ConfigError(
            f"{name}={value!r} is invalid: {name} must be None, a dict of {cls.__name__} fields "
            f"or a {cls.__name__}"
        )


@dataclass(frozen=True)
class RouterOptions(DictConfig):
    """Options every router has; a router's ``Options`` class extends this one.

    Args:
        init: ``"normal"`` (std ``MoEConfig.init_std``) or ``"linear"`` (``nn.Linear``'s default,
            U(-1/sqrt(d_model), 1/sqrt(d_model)), as the XMoE reference code's router).
        entropy_coef: β of the router-entropy loss ``β · mean_s H(p_s)`` (Dynamic-MoE's
            "dynamic loss"), which sharpens the router; 0 disables it.
        z_loss_coef: coefficient of ST-MoE's router z-loss ``coef · mean_s logsumexp(z_s)²`` on
            the logits z that enter the softmax, which keeps them small (fp32-safe); 0 disables
            it.
    """

    init: str = "normal"
    entropy_coef: float = 0.0
    z_loss_coef: float = 0.0

    def __post_init__(self) -> None:
        _require_choice("router_options.init", self.init, ROUTER_INITS)
        _require(
            _is_number(self.entropy_coef) and self.entropy_coef >= 0,
            "router_options.entropy_coef",
            self.entropy_coef,
            "a finite number >= 0",
        )
        _require(
            _is_number(self.z_loss_coef) and self.z_loss_coef >= 0,
            "router_options.z_loss_coef",
            self.z_loss_coef,
            "a finite number >= 0",
        )

    def check_for(self, config: MoEConfig) -> None:
        """Checks that need the layer's config (e.g. bounds set by num_experts)."""


ROUTER_INITS = ("normal", "linear")


@dataclass(frozen=True)
class ExpertOptions(DictConfig):
    """Options of an expert kind (none for FFN experts); a kind's ``Options`` class extends
    this one (``MoEConfig.expert_options``)."""

    def check_for(self, config: MoEConfig) -> None:
        """Checks that need the layer's config (e.g. bounds set by num_experts)."""

    def roles(self, num_experts: int) -> tuple[str, ...]:
        """What each of the pool's experts computes, for routers whose rule depends on it
        (MoE++'s zero experts and heterogeneous balance loss): ``"ffn"`` for every expert
        here; a heterogeneous pool names its others (``"zero"``, ``"copy"``, ...)."""
        return ("ffn",) * num_experts


@dataclass(frozen=True)
class MoEConfig(DictConfig):
    """Configuration of one :class:`xmoe.MoELayer`.

    A recipe: the layer is built from it and never re-reads it for its tunables. The router
    holds ``threshold`` / ``top_k`` from then on (``router.set_threshold``, ``set_top_k``) and
    the layer ``capacity_at_eval``; :meth:`xmoe.models.TransformerLM.live_config` reports what
    the modules hold. Frozen: every value is checked at construction (``dataclasses.replace``
    checks the result again).

    Args:
        d_model: width of the tokens entering and leaving the layer.
        num_experts: number of experts E.
        d_expert: hidden width of each expert FFN.
        router: selection rule, a name in :data:`xmoe.registry.ROUTERS` (``"threshold"``,
            ``"topk"``, ``"topp"``; ``docs/routing.md`` explains each).
        router_options: the router's own options, a dict (or its ``Options`` dataclass) of the
            fields of ``ROUTERS[router].Options``, validated by it; {} or None for its defaults.
        threshold: the mass threshold of the ``threshold`` (t, XMoE) and ``topp`` (p,
            Dynamic-MoE) routers, in (0, 1]: each token keeps the smallest prefix of its experts,
            sorted by probability, whose mass reaches t (exceeds p).
        top_k: k of the top-k router, in [1, num_experts].
        capacity_factor: None for dropless routing, or γ > 0 for a per-expert capacity
            ``C = min(max(ceil(S / E · γ), min_capacity), S)`` over the S tokens of a call.
        min_capacity: lower bound of C (≥ 1).
        capacity_at_eval: also apply the capacity in eval mode. Off by default: inference is
            dropless, so a token's output never depends on the other tokens of the batch.
        activation: one of :data:`ACTIVATIONS`.
        bias: whether the experts carry biases ``b1``, ``b2``.
        aux_loss_coef: coefficient of the Switch balance loss on the top-1 choice (≥ 0).
        renormalize: divide each token's kept weights by their sum (after capacity drops).
        init: one of :data:`INITS`.
        init_std: standard deviation of the normal init of router and expert weights (> 0).
        backend: one of :data:`BACKENDS`.
        expert_ffn: the fused expert FFN that computes FFN experts over the kept pairs, one of
            :data:`EXPERT_FFNS` (``"xmoe"``: xmoe's autograd function over the ``backend``
            engine; ``"auto"``: the Triton kernels on CUDA with triton installed, else ``"xmoe"``,
            and ``"xmoe"`` whenever ``backend`` names an engine).
        check_finite: raise on NaN/inf in the layer's input (costs a reduction per call).
        experts: the kind of the routed experts, a name in :data:`xmoe.registry.EXPERT_KINDS`
            (``"ffn"``: the FFN experts above).
        num_shared_experts: always-on FFN experts (``d_expert`` wide, the same activation and
            bias) that every token passes through besides its routed ones, unweighted, as
            DeepSeekMoE's shared experts; 0 for none.
        expert_options: the expert kind's own options, a dict (or its ``Options`` dataclass)
            of the fields of ``EXPERT_KINDS[experts].Options``; {} or None for its defaults.
    """

    d_model: int
    num_experts: int
    d_expert: int
    router: str = "threshold"
    router_options: Any = None
    threshold: float = 0.9
    top_k: int = 2
    capacity_factor: float | None = None
    min_capacity: int = 4
    capacity_at_eval: bool = False
    activation: str = "gelu"
    bias: bool = True
    aux_loss_coef: float = 0.01
    renormalize: bool = False
    init: str = "independent"
    init_std: float = 0.02
    backend: str = "auto"
    expert_ffn: str = "auto"
    check_finite: bool = False
    experts: str = "ffn"
    num_shared_experts: int = 0
    expert_options: Any = None

    def __post_init__(self) -> None:
        for name in ("d_model", "num_experts", "d_expert"):
            value = getattr(self, name)
            _require(_is_int(value) and value > 0, name, value, "a positive integer")
        _require_choice("router", self.router, ROUTERS)
        options = ROUTERS[self.router].Options.coerce(self.router_options, "router_options")
        object.__setattr__(self, "router_options", options)
        options.check_for(self)
        require_threshold(self.threshold)
        # the upper bound is the top-k router's check (Options.check_for): others ignore top_k
        _require(
            _is_int(self.top_k) and self.top_k >= 1,
            "top_k",
            self.top_k,
            f"an integer in [1, num_experts={self.num_experts}]",
        )
        _require(
            self.capacity_factor is None
            or (_is_number(self.capacity_factor) and self.capacity_factor > 0),
            "capacity_factor",
            self.capacity_factor,
            "None (dropless) or a finite number > 0",
        )
        _require(
            _is_int(self.min_capacity) and self.min_capacity >= 1,
            "min_capacity",
            self.min_capacity,
            "an integer >= 1",
        )
        _require_bool("capacity_at_eval", self.capacity_at_eval)
        _require_choice("activation", self.activation, ACTIVATIONS)
        _require_bool("bias", self.bias)
        _require(
            _is_number(self.aux_loss_coef) and self.aux_loss_coef >= 0,
            "aux_loss_coef",
            self.aux_loss_coef,
            "a finite number >= 0",
        )
        _require_bool("renormalize", self.renormalize)
        _require_choice("init", self.init, INITS)
        _require(
            _is_number(self.init_std) and self.init_std > 0,
            "init_std",
            self.init_std,
            "a finite number > 0",
        )
        _require_choice("backend", self.backend, BACKENDS)
        _require_choice("expert_ffn", self.expert_ffn, EXPERT_FFNS)
        _require_bool("check_finite", self.check_finite)
        _require_choice("experts", self.experts, EXPERT_KINDS)
        kind_options = EXPERT_KINDS[self.experts].Options
        kind_options = kind_options.coerce(self.expert_options, "expert_options")
        object.__setattr__(self, "expert_options", kind_options)
        _require(
            _is_int(self.num_shared_experts) and self.num_shared_experts >= 0,
            "num_shared_experts",
            self.num_shared_experts,
            "an integer >= 0",
        )
        kind_options.check_for(self)

    def tunable(self, name: str) -> Any:
        """The recipe's value of the tunable ``name`` (a router's or the layer's, as in
        ``Router.tunable_names``): this config's field of that name, else its router's
        Options field (a router may keep a knob of its own there)."""
        return getattr(self if self._owns(name) else self.router_options, name)

    def with_tunables(self, held: Mapping[str, Any]) -> MoEConfig:
        """This recipe with the tunable values a built layer holds (``MoELayer.tunables``)
        recorded where :meth:`tunable` reads them: in this config's own fields or in
        ``router_options``; both check the values again."""
        own = {name: value for name, value in held.items() if self._owns(name)}
        options = {name: value for name, value in held.items() if not self._owns(name)}
        if options:
            own["router_options"] = replace(self.router_options, **options)
        return replace(self, **own)

    def _owns(self, name: str) -> bool:
        """Whether the tunable ``name`` is a field of this config rather than of its router's
        Options (a name in neither is a :class:`ConfigError`)."""
        if name != "router_options" and name in {f.name for f in fields(self)}:
            return True
        _require(
            name in {f.name for f in fields(self.router_options)},
            "tunable",
            name,
            f"a field of MoEConfig or of {type(self.router_options).__name__}",
        )
        return False

    @property
    def gated(self) -> bool:
        """Whether the experts are gated (``w1`` holds a gate and an up projection)."""
        return self.activation in GATED_ACTIVATIONS

    @property
    def expert_flops(self) -> int:
        """Forward FLOPs of one expert on one token (:func:`xmoe.flops.ffn_flops`)."""
        return flops.ffn_flops(self.d_model, self.d_expert, self.gated)

    @property
    def router_flops(self) -> int:
        """Forward FLOPs of the router on one token (:func:`xmoe.flops.router_flops`) over the
        logits its rule ranks (``Router.num_logits``); 0 for a rule with no router to compute
        (``has_weight`` False, THOR)."""
        router = ROUTERS[self.router]
        if not router.has_weight:
            return 0
        return flops.router_flops(self.d_model, router.num_logits(self))

    @property
    def dense_flops(self) -> int:
        """Forward FLOPs every token costs whatever its routing: the router and the shared
        experts."""
        return self.router_flops + self.num_shared_experts * self.expert_flops

    def capacity(self, num_tokens: int) -> int | None:
        """Per-expert capacity C for a call over ``num_tokens`` tokens, or None when dropless."""
        if self.capacity_factor is None:
            return None
        raw = math.ceil(num_tokens / self.num_experts * self.capacity_factor)
        return min(max(raw, self.min_capacity), num_tokens)
