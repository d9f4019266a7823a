"""transformers model classes around the one xmoe :class:`~xmoe.models.TransformerLM`.

``XMoEModel`` holds the language model under ``lm`` and returns hidden states;
``XMoEForCausalLM`` holds an ``XMoEModel`` under ``model`` and returns logits, so checkpoints of
either load into the other the usual transformers way. Attention reads and extends a
transformers ``Cache`` (a ``DynamicCache`` by default, or a ``StaticCache``) through the same
``update`` call the training code's own cache answers.

Conventions followed as Llama / Mixtral do: ``input_ids`` or ``inputs_embeds``,
``output_hidden_states`` / ``output_attentions`` / ``output_router_logits``, ``return_dict=False``
tuples, ``use_cache``, transformers' causal-LM loss with ``num_items_in_batch`` and
``shift_labels``. What is not supported is refused with an error, never ignored: flash and flex
attention and other attention back-ends (class flags below; only ``"sdpa"`` and ``"eager"``),
and any keyword forward does not name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, GenerationMixin, PreTrainedModel, TrainerCallback
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast

from xmoe.experts.ffn import SEPARATE_UP_KEY
from xmoe.hf.configuration import XMoEConfig
from xmoe.hf.verified import VerifiedWeightsMixin
from xmoe.models.attention import check_padding_mask
from xmoe.models.transformer import TransformerLM


@dataclass
class XMoEModelOutput(MoeModelOutputWithPast):
    """``MoeModelOutputWithPast`` plus the MoE extras.

    last_hidden_state: (B, T, D) after the final norm. hidden_states: with
    ``output_hidden_states``, the embedding output and every block's output (the last after the
    final norm), each (B, T, D). attentions: with ``output_attentions``, (B, H, T, K) per block.
    router_logits: with ``output_router_logits``, (B·T, E) per MoE block (the router's logits,
    before its softmax). aux_loss: scalar sum of the MoE layers' router losses, already scaled
    by their coefficients (zero in eval mode). experts_per_token: one (B, T) tensor per MoE layer
    with the experts each token used.
    """

    aux_loss: torch.Tensor | None = None
    experts_per_token: tuple[torch.Tensor, ...] | None = None


@dataclass
class XMoECausalLMOutput(MoeCausalLMOutputWithPast):
    """``MoeCausalLMOutputWithPast`` plus the MoE extras.

    ``loss`` is ``lm_loss + w · aux_loss`` (as Mixtral adds its router loss; ours is already
    scaled by ``moe.aux_loss_coef``): w = 1, or with ``num_items_in_batch`` (gradient
    accumulation) this micro-batch's share of the counted targets, so that the summed
    micro-batches give the token-weighted mean of their aux losses (the mean, for equal
    micro-batches: what ``xmoe train`` adds). ``lm_loss`` is the cross-entropy term as it enters
    ``loss`` (the mean per target without ``num_items_in_batch``: use it for perplexity).
    ``aux_loss`` is None in eval mode without labels or ``output_router_logits`` (it is zero
    there), so that ``return_dict=False`` tuples start with the logits, as Mixtral's do.
    experts_per_token: one (B, T) tensor per MoE layer. Other fields as in
    :class:`XMoEModelOutput`; logits (B, T, V).
    """

    lm_loss: torch.Tensor | None = None
    experts_per_token: tuple[torch.Tensor, ...] | None = None


class XMoEPreTrainedModel(VerifiedWeightsMixin, PreTrainedModel):
    """Weights and config verified on load (:class:`~xmoe.hf.verified.VerifiedWeightsMixin`)."""

    config_class = XMoEConfig
    base_model_prefix = "model"
    _no_split_modules: ClassVar[list[str]] = ["Block"]
    _skip_keys_device_placement: ClassVar[list[str]] = ["past_key_values"]
    # attention: SDPA (default) or eager (which can return the attention probabilities)
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = False  # no transformers attention-interface functions
    # the MoE layer sizes its work from the routing (a host sync per layer): no full graph
    _can_compile_fullgraph = False
    # Trainer then passes num_items_in_batch and leaves the normalisation over accumulated
    # micro-batches to forward (set False and the Trainer divides by the accumulation steps)
    accepts_loss_kwargs = True
    # config.json fields that decide how the saved weights are read: a file that changed one
    # since it was saved is refused; other changes (threshold, top_k, capacity, max_seq_len,
    # dropout, ...: settings of how the model runs) load with a warning naming them
    weight_config_fields: ClassVar[frozenset[str]] = frozenset(
        {"model_type", "vocab_size", "d_model", "num_layers", "num_heads", "d_ff"}
        | {"dense_activation", "moe_every", "rope_theta", "norm_eps", "tie_word_embeddings"}
        | {"moe.d_model", "moe.num_experts", "moe.d_expert"}
        | {"moe.router", "moe.router_options", "moe.activation", "moe.bias"}
    )
    separate_up_key = SEPARATE_UP_KEY

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save with ``config.moe`` taken from what the MoE layers hold now (a threshold set
        since loading is saved and reloads as it runs), not from the config they were built
        from; likewise ``tie_word_embeddings`` from whether the model has its own output
        projection."""
        lm = next(m for m in self.modules() if isinstance(m, TransformerLM))
        moe = lm.live_config().moe  # raises ConfigError if the layers disagree
        self.config.moe = None if moe is None else moe.to_dict()
        self.config.tie_word_embeddings = lm.lm_head is None
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, TransformerLM):
            # transformers guards torch.nn.init while loading, so only missing weights change
            module.reset_parameters()

    def _attn_implementation_name(self) -> str:
        """The attention the config asks for (None before transformers resolves it: SDPA)."""
        name = self.config._attn_implementation or "sdpa"
        if name not in ("sdpa", "eager"):
            raise ValueError(
                f'attn_implementation="{name}" is not supported by {type(self).__name__}: use '
                '"sdpa" or "eager"'
            )
        return name


def _positions_from_mask(
    attention_mask: torch.Tensor, num_new: int, past_len: int | torch.Tensor
) -> torch.Tensor:
    """(B, T) rotary positions that skip left padding: each new token's index among the real
    tokens of the (B, L) padding mask. Indexed on the device, so a static cache's tensor count
    costs no sync."""
    positions_BL = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    index_T = torch.arange(num_new, device=attention_mask.device) + past_len
    return positions_BL.index_select(1, index_T)


class XMoEModel(XMoEPreTrainedModel):
    """The decoder without its output projection: (B, T, D) final hidden states."""

    def __init__(self, config: XMoEConfig) -> None:
        super().__init__(config)
        self.lm = TransformerLM(config.to_model_config())
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.lm.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        """Install a (V', D) embedding; the vocabulary the ids are checked against follows."""
        self.lm.embed = value
        if value.num_embeddings != self.lm.config.vocab_size:  # resize_token_embeddings
            self.lm.config = dataclasses.replace(self.lm.config, vocab_size=value.num_embeddings)

    def set_threshold(self, threshold: float) -> None:
        """Change t of the threshold-routed MoE layers (``save_pretrained`` records it).

        An invalid t raises :class:`xmoe.ConfigError` before any layer changes.
        """
        self.lm.set_threshold(threshold)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        *,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> XMoEModelOutput | tuple:
        """Args:
        input_ids: (B, T) token ids, or None with ``inputs_embeds`` (exactly one of the two).
        attention_mask: (B, past + T) 1 for real tokens and 0 for padding (positions then skip
            the padding; other values, or a row without a 1, are refused), or a prepared 4-D
            (B, 1, T, K) mask: bool (True = attend) or additive float.
        position_ids: (B, T) rotary positions; default from the mask, else ``past + arange(T)``.
        past_key_values: a transformers ``Cache`` (dynamic or static) to read and extend.
        inputs_embeds: (B, T, D) embeddings in place of the token embedding lookup.
        use_cache: return the cache (one is made if none is given); default ``config.use_cache``.
        output_router_logits / output_attentions / output_hidden_states: also return those;
            defaults from the config. ``output_attentions`` computes attention eagerly.
        return_dict: False returns ``to_tuple()`` of the output; default ``config.return_dict``.
        """
        config = self.config
        use_cache = config.use_cache if use_cache is None else use_cache
        if output_router_logits is None:
            output_router_logits = config.output_router_logits
        if output_attentions is None:
            output_attentions = config.output_attentions
        if output_hidden_states is None:
            output_hidden_states = config.output_hidden_states
        return_dict = config.return_dict if return_dict is None else return_dict
        attn_implementation = self._attn_implementation_name()

        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=config)
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        if attention_mask is not None:
            num_new = (input_ids if input_ids is not None else inputs_embeds).shape[1]
            check_padding_mask(attention_mask, num_new, past_len)  # before positions use it
            if position_ids is None and attention_mask.dim() == 2:
                position_ids = _positions_from_mask(attention_mask, num_new, past_len)
        out = self.lm.run_backbone(
            input_ids,
            inputs_embeds=inputs_embeds,
            position_ids=position_ids,
            attention_mask=attention_mask,
            cache=past_key_values,
            attn_implementation=attn_implementation,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            output_router_logits=output_router_logits,
        )
        batch_shape = out.last_hidden_state.shape[:2]
        output = XMoEModelOutput(
            last_hidden_state=out.last_hidden_state,
            past_key_values=past_key_values,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            router_logits=out.router_logits,
            aux_loss=out.aux_loss,
            experts_per_token=tuple(s.kept_per_token.reshape(batch_shape) for s in out.routing),
        )
        return output if return_dict else output.to_tuple()


class XMoEForCausalLM(XMoEPreTrainedModel, GenerationMixin):
    """Causal LM head over :class:`XMoEModel`; works with ``generate()`` (greedy, sampling,
    beam search, assisted and prompt-lookup decoding; dynamic or static cache) and with
    transformers' ``Trainer`` (see :class:`XMoEEndTrainingStepCallback` for adaptive routers)."""

    def __init__(self, config: XMoEConfig) -> None:
        super().__init__(config)
        self.model = XMoEModel(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Linear | None:
        return self.model.lm.lm_head  # None when tied: the embedding matrix is used directly

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        """Install a (D -> V') output projection; only untied models have one."""
        if self.model.lm.lm_head is None:
            raise ValueError(
                "this model ties its output projection to the input embeddings "
                "(tie_embeddings=True): it has no separate output embeddings to set; use "
                "set_input_embeddings"
            )
        self.model.lm.lm_head = new_embeddings

    def set_threshold(self, threshold: float) -> None:
        """Change t of the threshold-routed MoE layers without reloading."""
        self.model.set_threshold(threshold)

    def _validate_generated_length(
        self, generation_config, input_ids_length: int, has_default_max_length: bool
    ) -> None:
        """transformers' checks of ``generate``'s lengths, and a total past ``max_seq_len``
        refused before the first token (the forward would refuse only on reaching it)."""
        super()._validate_generated_length(
            generation_config, input_ids_length, has_default_max_length
        )
        limit, total = self.config.max_seq_len, generation_config.max_length
        if total > limit:
            raise ValueError(
                f"input ({input_ids_length} tokens) + {total - input_ids_length} new tokens = "
                f"{total} exceeds the model's max_seq_len={limit} (max_position_embeddings); "
                f"ask for at most {max(limit - input_ids_length, 0)} new tokens"
            )

    def end_training_step(self) -> None:
        """Let the routers adapt between optimizer steps, as ``xmoe train`` does after each
        ``optimizer.step()`` (a no-op for routers without a controller)."""
        self.model.lm.end_training_step()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        *,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        shift_labels: torch.LongTensor | None = None,
    ) -> XMoECausalLMOutput | tuple:
        """Arguments as :meth:`XMoEModel.forward`, and:

        labels: (B, T) the inputs themselves (shifted inside, as transformers does), -100 where
            ignored.
        shift_labels: (B, T) targets already shifted (position i predicts shift_labels[i]),
            used instead of shifting ``labels``.
        num_items_in_batch: the targets counted over all accumulated micro-batches (the
            ``Trainer`` passes it): the loss is then this micro-batch's share of their sum
            (see :class:`XMoECausalLMOutput` for the aux loss).
        logits_to_keep: int k keeps the last k positions' logits (0 = all), or a 1-D tensor of
            the positions to keep.
        """
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        base = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden = base.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = F.linear(hidden[:, keep], self.model.lm.output_weight())

        lm_loss = loss = None
        if labels is not None or shift_labels is not None:
            lm_loss = self.loss_function(
                logits,
                labels,
                vocab_size=logits.shape[-1],
                num_items_in_batch=num_items_in_batch,
                shift_labels=shift_labels,
            )
            aux_loss = base.aux_loss.to(lm_loss.device)
            if num_items_in_batch is not None:
                aux_loss = self._share_of_items(aux_loss, labels, shift_labels, num_items_in_batch)
            loss = lm_loss + aux_loss
        show_aux = loss is not None or output_router_logits or self.training
        output = XMoECausalLMOutput(
            loss=loss,
            aux_loss=base.aux_loss if show_aux else None,
            logits=logits,
            past_key_values=base.past_key_values,
            hidden_states=base.hidden_states,
            attentions=base.attentions,
            router_logits=base.router_logits,
            lm_loss=lm_loss,
            experts_per_token=base.experts_per_token,
        )
        return output if return_dict else output.to_tuple()

    @staticmethod
    def _share_of_items(
        aux_loss: torch.Tensor,
        labels: torch.Tensor | None,
        shift_labels: torch.Tensor | None,
        num_items_in_batch: int | torch.Tensor,
    ) -> torch.Tensor:
        """``aux_loss`` times this micro-batch's counted targets over ``num_items_in_batch``.

        With ``num_items_in_batch`` the Trainer sums the micro-batch losses instead of
        averaging them, so an unweighted aux loss would count once per micro-batch (N times
        under N-step accumulation). Counted on the device (no sync) as the loss counts them,
        and multiplied before dividing, in the aux loss's dtype.
        """
        targets = shift_labels if shift_labels is not None else labels[..., 1:]
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(aux_loss.device)
        return aux_loss * targets.ne(-100).sum().to(aux_loss.device) / num_items_in_batch


class XMoEEndTrainingStepCallback(TrainerCallback):
    """A ``Trainer`` callback that calls ``model.end_training_step()`` after every optimizer
    step, as ``xmoe train`` does: routers with a controller (``router_options.target_experts``)
    adapt between steps. Other routers need no callback."""

    def on_optimizer_step(self, args, state, control, model=None, **kwargs) -> None:
        while hasattr(model, "module") and not hasattr(model, "end_training_step"):
            model = model.module  # DistributedDataParallel and similar wrappers
        model.end_training_step()
