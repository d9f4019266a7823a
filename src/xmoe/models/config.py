"""ModelConfig: the decoder-only language model, validated like :class:`xmoe.MoEConfig`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from xmoe import flops
from xmoe.config import (
    ConfigError,
    DictConfig,
    MoEConfig,
    _is_int,
    _is_number,
    _require,
    _require_bool,
    _require_choice,
)
from xmoe.registry import ROUTERS

DENSE_ACTIVATIONS = ("gelu", "relu", "silu")


@dataclass(frozen=True)
class ModelConfig(DictConfig):
    """A pre-norm decoder-only transformer whose FFN is an MoE layer in some blocks.

    Frozen like :class:`~xmoe.MoEConfig`: change it with ``dataclasses.replace``, which
    validates the result.

    Args:
        vocab_size: number of token ids.
        d_model: residual width.
        num_layers: transformer blocks.
        num_heads: attention heads; ``d_model`` must be divisible by it.
        max_seq_len: longest sequence (positions are rotary, so this only bounds inputs).
        d_ff: hidden width of the dense FFN in blocks without an MoE layer.
        dense_activation: activation of the dense FFN, one of :data:`DENSE_ACTIVATIONS`.
        moe: the MoE layer of MoE blocks (an :class:`~xmoe.MoEConfig` or a dict of its fields),
            or None for a dense model. ``moe.d_model`` must equal ``d_model``.
        moe_every: block ``i`` (0-based) is an MoE block iff ``(i + 1) % moe_every == 0``:
            1 = every block, 2 = every second block (blocks 2, 4, ... as in the paper).
        rope_theta: base of the rotary position frequencies.
        norm_eps: epsilon of the RMSNorms.
        dropout: dropout on attention probabilities and residual branches, in [0, 1).
        tie_embeddings: use the token embedding as the output projection.
        init_std: standard deviation of the normal init of dense weights; residual output
            projections use ``init_std / sqrt(2 * num_layers)``.
    """

    vocab_size: int
    d_model: int = 128
    num_layers: int = 4
    num_heads: int = 4
    max_seq_len: int = 256
    d_ff: int = 512
    dense_activation: str = "gelu"
    moe: MoEConfig | None = None
    moe_every: int = 2
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0
    tie_embeddings: bool = True
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if isinstance(self.moe, Mapping):
            object.__setattr__(self, "moe", MoEConfig.from_dict(self.moe))  # frozen: no plain set
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "max_seq_len", "d_ff"):
            value = getattr(self, name)
            _require(_is_int(value) and value > 0, name, value, "a positive integer")
        _require(
            self.d_model % self.num_heads == 0 and (self.d_model // self.num_heads) % 2 == 0,
            "num_heads",
            self.num_heads,
            f"a divisor of d_model={self.d_model} leaving an even head width",
        )
        _require_choice("dense_activation", self.dense_activation, DENSE_ACTIVATIONS)
        _require(
            self.moe is None or isinstance(self.moe, MoEConfig),
            "moe",
            self.moe,
            "None, an MoEConfig or a dict of MoEConfig fields",
        )
        if self.moe is not None and self.moe.d_model != self.d_model:
            raise ConfigError(
                f"moe.d_model={self.moe.d_model} is invalid: it must equal d_model={self.d_model}"
            )
        _require(
            _is_int(self.moe_every) and 1 <= self.moe_every <= self.num_layers,
            "moe_every",
            self.moe_every,
            f"an integer in [1, num_layers={self.num_layers}]",
        )
        for name in ("rope_theta", "norm_eps", "init_std"):
            value = getattr(self, name)
            _require(_is_number(value) and value > 0, name, value, "a finite number > 0")
        _require(
            _is_number(self.dropout) and 0.0 <= self.dropout < 1.0,
            "dropout",
            self.dropout,
            "a number in [0, 1)",
        )
        _require_bool("tie_embeddings", self.tie_embeddings)

    def is_moe_block(self, index: int) -> bool:
        """Whether block ``index`` (0-based) holds an MoE layer."""
        return self.moe is not None and (index + 1) % self.moe_every == 0

    @property
    def num_moe_blocks(self) -> int:
        """Blocks at MoE positions (counted for dense models too, for FLOP comparisons)."""
        return self.num_layers // self.moe_every

    @property
    def matrix_params(self) -> int:
        """Parameters in the weight matrices (embedding, attention, FFNs, routers, experts and an
        untied output): all but biases and norms, so a lower bound of the model's size that is
        known without building it (sizes too large to allocate are refused with it)."""
        d, num_moe = self.d_model, self.num_moe_blocks if self.moe is not None else 0
        moe_ffn = 0
        if self.moe is not None:  # the router's (logits, d) matrix and each expert's matrices
            expert = flops.ffn_params(d, self.moe.d_expert, self.moe.gated)
            router = ROUTERS[self.moe.router]
            rows = router.num_logits(self.moe) if router.has_weight else 0  # THOR has none
            moe_ffn = self.moe.num_experts * expert + rows * d
        dense_ffn = flops.ffn_params(d, self.d_ff, gated=False)
        ffns = num_moe * moe_ffn + (self.num_layers - num_moe) * dense_ffn
        embeddings = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return embeddings + self.num_layers * 4 * d * d + ffns

    @property
    def dense_ffn_flops(self) -> int:
        """Forward FLOPs per token of one dense FFN (:func:`xmoe.flops.ffn_flops`; not gated)."""
        return flops.ffn_flops(self.d_model, self.d_ff, gated=False)
