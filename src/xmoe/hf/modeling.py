"""transformers model classes around the one xmoe :class:`~xmoe.models.TransformerLM`.

``XMoEModel`` holds the language model under ``lm`` and returns hidden states;
``XMoEForCausalLM`` holds an ``XMoEModel`` under ``model`` and returns logits, so checkpoints of
either load into the other the usual transformers way. Attention reads and extends a
transformers ``Cache`` (a ``DynamicCache`` by default) through the same ``update`` call the
training code's own cache answers.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from xmoe.hf.configuration import XMoEConfig
from xmoe.models.transformer import TransformerLM
from xmoe.storage import read_verified, save_verified


@dataclass
class XMoEModelOutput(BaseModelOutputWithPast):
    """Hidden states plus the MoE extras.

    aux_loss: scalar sum of the layers' balance losses. experts_per_token: one (B, T) tensor per
    MoE layer with the experts each token used.
    """

    aux_loss: torch.Tensor | None = None
    experts_per_token: tuple[torch.Tensor, ...] | None = None


@dataclass
class XMoECausalLMOutput(CausalLMOutputWithPast):
    """Logits plus the MoE extras. ``loss`` is ``lm_loss + aux_loss`` (as Mixtral adds its router
    loss); ``lm_loss`` is the cross-entropy alone (use it for perplexity)."""

    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    experts_per_token: tuple[torch.Tensor, ...] | None = None


class XMoEPreTrainedModel(PreTrainedModel):
    config_class = XMoEConfig
    base_model_prefix = "model"
    _no_split_modules: ClassVar[list[str]] = ["Block"]
    _supports_sdpa = True

    def _init_weights(self, module) -> None:
        if isinstance(module, TransformerLM):
            module.reset_parameters()

    def save_pretrained(self, save_directory, *args, **kwargs):
        """``PreTrainedModel.save_pretrained``, then a CRC-32 of every tensor recorded in each
        ``.safetensors`` file written, which :meth:`from_pretrained` verifies."""
        result = super().save_pretrained(save_directory, *args, **kwargs)
        for path in Path(save_directory).glob("*.safetensors"):
            tensors, metadata, _ = read_verified(path, require_digests=False)
            save_verified(path, tensors, metadata)
        return result

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """``PreTrainedModel.from_pretrained`` that verifies the weight files' digests (naming a
        damaged tensor) and refuses, rather than randomly initialises, a checkpoint with
        missing, unexpected or mis-shaped weights."""
        source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        if source is not None and Path(source).is_dir():
            for path in sorted(Path(source).glob("*.safetensors")):
                _, _, verified = read_verified(path, require_digests=False)
                if not verified:
                    warnings.warn(f"{path} carries no digests: loaded unverified", stacklevel=2)
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        problems = {
            key: sorted(info.get(key) or [])
            for key in ("missing_keys", "unexpected_keys", "mismatched_keys")
            if info.get(key)
        }
        if problems:
            raise ValueError(f"checkpoint does not match {cls.__name__}: {problems}")
        return (model, info) if want_info else model


def _positions_from_mask(
    attention_mask: torch.Tensor | None, num_new: int, past_len: int, device: torch.device
) -> torch.Tensor | None:
    """Rotary positions that skip left padding: each token's index among real tokens."""
    if attention_mask is None:
        return None
    positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    return positions[:, past_len : past_len + num_new].to(device)


class XMoEModel(XMoEPreTrainedModel):
    """The decoder without its output projection: (B, T, D) final hidden states."""

    def __init__(self, config: XMoEConfig) -> None:
        super().__init__(config)
        self.lm = TransformerLM(config.to_model_config())
        self.post_init()

    def get_input_embeddings(self):
        return self.lm.embed

    def set_input_embeddings(self, value) -> None:
        self.lm.embed = value

    def set_threshold(self, threshold: float) -> None:
        """Change t of the threshold-routed MoE layers, in the model and in its config.

        An invalid t raises :class:`xmoe.ConfigError` before anything (model or config) changes.
        """
        self.lm.set_threshold(threshold)  # validates first
        self.config.moe = dict(self.config.moe, threshold=threshold)

    def _run(self, input_ids, attention_mask, position_ids, past_key_values, use_cache):
        self.lm.check_input_ids(input_ids)  # before input_ids.shape[1] below
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = _positions_from_mask(
                attention_mask, input_ids.shape[1], past_len, input_ids.device
            )
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding: plain causal attention
        hidden, aux_loss, routing, _ = self.lm.backbone(
            input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            cache=past_key_values,
        )
        experts = tuple(s.kept_per_token.reshape(input_ids.shape) for s in routing)
        return hidden, aux_loss, experts, past_key_values

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> XMoEModelOutput:
        hidden, aux_loss, experts, cache = self._run(
            input_ids, attention_mask, position_ids, past_key_values, use_cache
        )
        return XMoEModelOutput(
            last_hidden_state=hidden,
            past_key_values=cache if use_cache else None,
            aux_loss=aux_loss,
            experts_per_token=experts,
        )


class XMoEForCausalLM(XMoEPreTrainedModel, GenerationMixin):
    """Causal LM head over :class:`XMoEModel`; works with ``generate()`` and its KV cache."""

    def __init__(self, config: XMoEConfig) -> None:
        super().__init__(config)
        self.model = XMoEModel(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.model.lm.lm_head  # None when tied: the embedding matrix is used directly

    def set_threshold(self, threshold: float) -> None:
        """Change t of the threshold-routed MoE layers without reloading."""
        self.model.set_threshold(threshold)

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        use_cache: bool | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> XMoECausalLMOutput:
        """``labels`` (B, T) are the inputs themselves, shifted inside as transformers does."""
        hidden, aux_loss, experts, cache = self.model._run(
            input_ids, attention_mask, position_ids, past_key_values, use_cache
        )
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = F.linear(hidden, self.model.lm.output_weight())
        lm_loss = loss = None
        if labels is not None:
            targets = F.pad(labels[:, 1:], (0, 1), value=-100)
            lm_loss = F.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100
            )
            loss = lm_loss + aux_loss
        return XMoECausalLMOutput(
            loss=loss,
            logits=logits,
            past_key_values=cache if use_cache else None,
            lm_loss=lm_loss,
            aux_loss=aux_loss,
            experts_per_token=experts,
        )
