"""xmoe inside transformers follows the conventions of the in-tree models (Llama, Mixtral):
output flags, tuples, inputs_embeds, caches, masks, attention implementations, the loss with
gradient accumulation, resizing, loading opt-outs, torch.export, generate() modes and Trainer."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    DynamicCache,
    StaticCache,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from xmoe import ConfigError
from xmoe.hf import XMoEConfig, XMoEForCausalLM
from xmoe.hf.modeling import XMoEEndTrainingStepCallback

VOCAB, D_MODEL, HEADS, EXPERTS = 60, 32, 2, 8
TIGHT = {"rtol": 1e-10, "atol": 1e-10}  # float64 models: the paths must agree to rounding


def _config(**overrides) -> XMoEConfig:
    values = {"vocab_size": VOCAB, "d_model": D_MODEL, "num_layers": 2, "num_heads": HEADS}
    values |= {"max_seq_len": 64, "d_ff": 64, "moe_every": 1}
    values["moe"] = {"d_model": D_MODEL, "num_experts": EXPERTS, "d_expert": 16}
    values |= overrides
    return XMoEConfig(**values)


def _model(dtype=torch.float64, seed: int = 0, **overrides) -> XMoEForCausalLM:
    """A small eval-mode model whose routers are peaked, so tokens use different expert counts."""
    torch.manual_seed(seed)
    model = XMoEForCausalLM(_config(**overrides)).to(dtype).eval()
    for layer in model.model.lm.moe_layers:
        torch.nn.init.normal_(layer.router.weight, std=1.0)
    return model


def _left_padded() -> tuple[torch.Tensor, torch.Tensor]:
    """(2, 9) ids, the first row left-padded by 4, and its (2, 9) padding mask."""
    ids = torch.randint(1, VOCAB, (2, 9))
    mask = (torch.arange(9) >= torch.tensor([[4], [0]])).long()
    return ids * mask, mask


# --- outputs ------------------------------------------------------------------------------


def test_hidden_states_are_the_block_inputs_then_the_normed_output():
    model = _model()
    ids = torch.randint(0, VOCAB, (2, 7))
    block_inputs = []
    hooks = [
        block.register_forward_pre_hook(lambda _, args: block_inputs.append(args[0]))
        for block in model.model.lm.blocks
    ]
    out = model(ids, output_hidden_states=True)
    for hook in hooks:
        hook.remove()
    assert len(out.hidden_states) == len(model.model.lm.blocks) + 1
    assert torch.equal(out.hidden_states[0], model.model.lm.embed(ids))
    for hidden, block_input in zip(out.hidden_states[:-1], block_inputs, strict=True):
        assert torch.equal(hidden, block_input)
    plain = model(ids)
    assert torch.equal(out.hidden_states[-1], model.model(ids).last_hidden_state)
    assert torch.equal(out.logits, plain.logits)
    assert plain.hidden_states is None
    model.config.output_hidden_states = True  # the config default, as transformers reads it
    assert len(model(ids).hidden_states) == 3


def test_return_dict_false_gives_the_output_tuple_in_field_order():
    model = _model()
    ids = torch.randint(0, VOCAB, (2, 6))
    out = model(ids, labels=ids, use_cache=False)
    as_tuple = model(ids, labels=ids, use_cache=False, return_dict=False)
    assert isinstance(as_tuple, tuple)
    # MoeCausalLMOutputWithPast's order with the None fields left out, then our extras
    names = ["loss", "aux_loss", "logits", "lm_loss", "experts_per_token"]
    assert list(out.keys()) == names and len(as_tuple) == len(names)
    for got, name in zip(as_tuple[:4], names, strict=False):
        assert torch.equal(got, out[name]), name
    assert all(map(torch.equal, as_tuple[4], out.experts_per_token))
    # no labels, eval mode: the logits come first, as Mixtral's
    assert torch.equal(model(ids, return_dict=False)[0], out.logits)
    assert torch.equal(model.model(ids, return_dict=False)[0], model.model(ids).last_hidden_state)
    model.config.return_dict = False
    assert isinstance(model(ids), tuple)


def test_router_logits_are_the_logits_behind_the_routers_probabilities():
    model = _model()
    ids = torch.randint(0, VOCAB, (3, 5))
    probs = []
    hooks = [
        layer.router.register_forward_hook(lambda _, __, out: probs.append(out.probs_SE))
        for layer in model.model.lm.moe_layers
    ]
    out = model(ids, output_router_logits=True)
    for hook in hooks:
        hook.remove()
    assert len(out.router_logits) == 2  # one per MoE block
    for logits_SE, probs_SE in zip(out.router_logits, probs, strict=True):
        assert logits_SE.shape == (3 * 5, EXPERTS)
        torch.testing.assert_close(logits_SE.softmax(-1), probs_SE, **TIGHT)
    assert out.aux_loss is not None  # asked for with the router logits, as Mixtral returns it
    assert model(ids).router_logits is None
    assert XMoEConfig().output_router_logits is False
    model.config.output_router_logits = True
    assert len(model(ids).router_logits) == 2


def test_unknown_forward_arguments_are_refused():
    with pytest.raises(TypeError, match="token_type_ids"):
        _model()(torch.zeros(1, 3, dtype=torch.long), token_type_ids=torch.zeros(1, 3))


# --- inputs_embeds, caches, masks ---------------------------------------------------------


def test_inputs_embeds_give_the_input_ids_path():
    model = _model()
    ids = torch.randint(1, VOCAB, (2, 6))
    embeds = model.get_input_embeddings()(ids)
    assert torch.equal(model(inputs_embeds=embeds).logits, model(ids).logits)
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model(ids, inputs_embeds=embeds)
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model()
    with pytest.raises(ValueError, match=r"inputs_embeds\.shape=\(2, 6, 5\) is invalid"):
        model(inputs_embeds=torch.zeros(2, 6, 5, dtype=torch.float64))
    common = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    from_embeds = model.generate(inputs_embeds=embeds, **common)
    assert torch.equal(from_embeds, model.generate(ids, **common)[:, 6:])


def test_continuing_from_returned_past_key_values_gives_the_full_pass_logits():
    model = _model()
    ids, mask = _left_padded()
    full = model(ids, attention_mask=mask).logits
    first = model(ids[:, :5], attention_mask=mask[:, :5])  # config.use_cache defaults to True
    assert isinstance(first.past_key_values, DynamicCache)
    cache = first.past_key_values
    second = model(ids[:, 5:7], attention_mask=mask[:, :7], past_key_values=cache)
    torch.testing.assert_close(second.logits, full[:, 5:7], **TIGHT)
    for t in (7, 8):  # then token by token
        step = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache)
        torch.testing.assert_close(step.logits, full[:, t : t + 1], **TIGHT)
    assert model(ids, use_cache=False).past_key_values is None
    model.config.use_cache = False
    assert model(ids).past_key_values is None


def test_static_cache_gives_the_dynamic_cache_results():
    model = _model()
    ids, mask = _left_padded()
    common = {"attention_mask": mask, "max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    dynamic = model.generate(ids, **common)
    assert torch.equal(model.generate(ids, cache_implementation="static", **common), dynamic)

    full = model(ids[1:]).logits
    cache = StaticCache(config=model.config, max_cache_len=16)
    model(ids[1:, :4], past_key_values=cache)
    for start, end in ((4, 6), (6, 7)):  # the key length is the cache's 16 slots throughout
        logits = model(ids[1:, start:end], past_key_values=cache).logits
        torch.testing.assert_close(logits, full[:, start:end], **TIGHT)


def test_four_d_masks_are_used_as_given_or_refused_by_shape():
    model = _model()
    ids, mask = _left_padded()
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    reference = model(ids, attention_mask=mask).logits
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    mask_B1TK = causal & mask.bool()[:, None, None, :]
    mask_B1TK |= torch.eye(9, dtype=torch.bool)  # a padding query sees itself, as 2-D masks do
    got = model(ids, attention_mask=mask_B1TK, position_ids=positions).logits
    torch.testing.assert_close(got, reference, **TIGHT)
    additive = torch.zeros(mask_B1TK.shape, dtype=torch.float64).masked_fill(~mask_B1TK, -1e9)
    got = model(ids, attention_mask=additive, position_ids=positions).logits
    torch.testing.assert_close(got, reference, **TIGHT)
    with pytest.raises(ValueError, match=r"attention_mask\.shape=\(2, 1, 9, 8\) is invalid"):
        model(ids, attention_mask=mask_B1TK[..., :8])
    with pytest.raises(ValueError, match=r"attention_mask\.shape=\(2, 9, 9\) is invalid"):
        model(ids, attention_mask=mask_B1TK[:, 0])
    with pytest.raises(ValueError, match="attention_mask has 8 positions"):
        model(ids, attention_mask=mask[:, 1:])


def test_eager_attention_matches_sdpa_and_returns_attention_probabilities():
    sdpa = _model()
    eager = copy.deepcopy(sdpa)
    eager.set_attn_implementation("eager")
    assert eager.config._attn_implementation == "eager"
    ids, mask = _left_padded()
    reference = sdpa(ids, attention_mask=mask).logits
    torch.testing.assert_close(eager(ids, attention_mask=mask).logits, reference, **TIGHT)

    out = sdpa(ids, attention_mask=mask, output_attentions=True)  # computed eagerly on request
    torch.testing.assert_close(out.logits, reference, **TIGHT)
    assert len(out.attentions) == 2
    for probs in out.attentions:
        assert probs.shape == (2, HEADS, 9, 9)
        torch.testing.assert_close(probs.sum(-1), torch.ones(2, HEADS, 9, dtype=probs.dtype))
        assert bool((probs.triu(1) == 0).all())  # causal
        assert bool((probs[0, :, 4:, :4] == 0).all())  # real tokens ignore the padding
    assert sdpa(ids).attentions is None


@pytest.mark.parametrize("name", ["flash_attention_2", "flex_attention"])
def test_unsupported_attention_implementations_are_refused(name):
    with pytest.raises(ValueError, match="does not support"):
        XMoEForCausalLM._from_config(_config(), attn_implementation=name)


def test_attention_backends_outside_sdpa_and_eager_fail_in_forward():
    model = _model()
    model.config._attn_implementation = "paged|sdpa"  # passes transformers' own check
    with pytest.raises(ValueError, match=r'attn_implementation="paged\|sdpa" is not supported'):
        model(torch.zeros(1, 3, dtype=torch.long))


# --- loss ---------------------------------------------------------------------------------


def test_loss_follows_num_items_in_batch_and_shift_labels():
    model = _model().train()  # the aux loss is zero in eval mode
    ids = torch.randint(0, VOCAB, (2, 8))
    labels = ids.clone()
    labels[0, :3] = -100
    out = model(ids, labels=labels)
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)
    # transformers' loss upcasts the logits to float32 (not wider): so does the reference
    ce = F.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    count = int((targets != -100).sum())
    torch.testing.assert_close(out.lm_loss, ce.sum() / count)
    assert float(out.aux_loss.detach()) > 0
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss, **TIGHT)

    total = 3 * count  # as if this were one of three accumulated micro-batches
    part = model(ids, labels=labels, num_items_in_batch=torch.tensor(total))
    torch.testing.assert_close(part.lm_loss, ce.sum() / total)
    torch.testing.assert_close(part.loss, part.lm_loss + out.aux_loss * count / total, **TIGHT)

    shifted = model(ids, shift_labels=targets)
    torch.testing.assert_close(shifted.loss, out.loss, **TIGHT)


# --- embeddings, config, loading ----------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False])
def test_resize_token_embeddings_tied_and_untied(tied, tmp_path):
    model = _model(tie_word_embeddings=tied)
    assert model.model.lm.config.tie_embeddings is tied
    assert (model.get_output_embeddings() is None) is tied
    ids = torch.randint(0, VOCAB, (2, 5))
    before = model(ids).logits
    model.resize_token_embeddings(VOCAB + 10)
    assert model.config.vocab_size == model.model.lm.config.vocab_size == VOCAB + 10
    if not tied:
        assert model.get_output_embeddings().weight.shape == (VOCAB + 10, D_MODEL)
    after = model(ids).logits
    assert after.shape == (2, 5, VOCAB + 10)
    torch.testing.assert_close(after[..., :VOCAB], before, **TIGHT)
    assert model(torch.tensor([[VOCAB + 9]])).logits.shape == (1, 1, VOCAB + 10)  # new ids work
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded(ids).logits, after, **TIGHT)


def test_tie_word_embeddings_sets_tie_embeddings():
    assert _config(tie_word_embeddings=False).to_model_config().tie_embeddings is False
    assert _config(tie_embeddings=False).tie_word_embeddings is False
    with pytest.raises(ConfigError, match="tie_word_embeddings=False is invalid"):
        _config(tie_embeddings=True, tie_word_embeddings=False)
    with pytest.raises(ValueError, match="no separate output embeddings"):
        _model().set_output_embeddings(torch.nn.Linear(D_MODEL, VOCAB, bias=False))


def test_from_pretrained_opt_outs_are_honoured(tmp_path):
    model = _model(dtype=torch.float32)
    model.save_pretrained(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    missing = next(k for k in weights if "router" in k)
    save_file(
        {k: v for k, v in weights.items() if k != missing}, str(tmp_path / "model.safetensors")
    )
    with pytest.warns(UserWarning, match="no digests"):
        _, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert set(info["missing_keys"]) == {missing}
    with pytest.warns(UserWarning, match="no digests"), pytest.raises(ValueError, match="missing"):
        AutoModelForCausalLM.from_pretrained(tmp_path)  # the default still refuses


def test_ignore_mismatched_sizes_reinitialises_only_the_mismatched_weights(tmp_path):
    model = _model(dtype=torch.float32, moe_every=2)  # block 0 dense
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["d_ff"] = 48  # block 0's dense FFN no longer fits
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # transformers' own
        AutoModelForCausalLM.from_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, ignore_mismatched_sizes=True)
    assert loaded.model.lm.blocks[0].ffn.fc.weight.shape == (48, D_MODEL)
    state = model.state_dict()
    for name, value in loaded.state_dict().items():
        if not name.startswith(("model.lm.blocks.0.ffn.fc.", "model.lm.blocks.0.ffn.proj.")):
            assert torch.equal(value, state[name]), name


# --- torch.export -------------------------------------------------------------------------


def test_torch_export_of_the_plain_forward():
    # a dense model: the MoE layer's grouped dispatch sizes its work on the host
    # (DispatchPlan.segments), which a traced graph cannot
    model = _model(dtype=torch.float32, moe=None)
    ids, mask = _left_padded()
    kwargs = {"attention_mask": mask, "use_cache": False}
    exported = torch.export.export(model, (ids,), kwargs)
    torch.testing.assert_close(exported.module()(ids, **kwargs).logits, model(ids, **kwargs).logits)


# --- generate() ---------------------------------------------------------------------------


def _greedy(model, prompt, **kwargs):
    common = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    return model.generate(prompt, **common, **kwargs)


@pytest.mark.parametrize(
    "mode", ["beam1", "assisted", "assisted_hidden_states", "prompt_lookup", "static"]
)
def test_generate_modes_equal_greedy(mode):
    model = _model()
    prompt = torch.tensor([[5, 6, 7, 5, 6, 7, 5, 6]])  # repeats: prompt lookup finds candidates
    greedy = _greedy(model, prompt)
    kwargs = {
        "beam1": {"num_beams": 1},
        "assisted": {"assistant_model": model},
        "assisted_hidden_states": {
            "assistant_model": model,
            "return_dict_in_generate": True,
            "output_hidden_states": True,
        },
        "prompt_lookup": {"prompt_lookup_num_tokens": 3},
        "static": {"cache_implementation": "static"},
    }[mode]
    out = _greedy(model, prompt, **kwargs)
    if mode == "assisted_hidden_states":
        # one entry per verification call, each (embeddings + 2 blocks) of (1, new, D)
        assert all(len(step) == 3 for step in out.hidden_states)
        assert sum(step[0].shape[1] for step in out.hidden_states) == greedy.shape[1] - 1
        out = out.sequences
    assert torch.equal(out, greedy)


def test_generate_returns_hidden_states_per_step():
    model = _model()
    prompt = torch.randint(1, VOCAB, (2, 5))
    out = _greedy(model, prompt, return_dict_in_generate=True, output_hidden_states=True)
    assert torch.equal(out.sequences, _greedy(model, prompt))
    assert len(out.hidden_states) == 8
    assert [h.shape for h in out.hidden_states[0]] == [(2, 5, D_MODEL)] * 3
    assert [h.shape for h in out.hidden_states[1]] == [(2, 1, D_MODEL)] * 3


def test_beam_search_reorders_the_cache():
    model = _model()
    prompt = torch.randint(1, VOCAB, (2, 5))
    cached = _greedy(model, prompt, num_beams=3)
    assert torch.equal(cached, _greedy(model, prompt, num_beams=3, use_cache=False))


# --- Trainer ------------------------------------------------------------------------------

LR, BETAS, EPS, WEIGHT_DECAY = 1e-2, (0.9, 0.95), 1e-8, 0.1
MICRO_BATCH, SEQ = 2, 8


def _optimizer(model: torch.nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, foreach=False
    )


def _reference_steps(model: XMoEForCausalLM, rows: list[torch.Tensor], accumulation: int):
    """The step of ``xmoe train`` (``TransformerLM`` loss + aux loss, each over the
    accumulation steps), then ``end_training_step()``. Returns per-step losses, gradients and
    parameters."""
    lm = model.model.lm.train()
    optimizer = _optimizer(model)
    losses, grads, params = [], [], []
    starts = range(0, len(rows), MICRO_BATCH)
    micro_batches = [torch.stack(rows[i : i + MICRO_BATCH]) for i in starts]
    for step in range(len(micro_batches) // accumulation):
        loss_sum = 0.0
        for ids in micro_batches[step * accumulation : (step + 1) * accumulation]:
            out = lm(ids, F.pad(ids[:, 1:], (0, 1), value=-100))
            loss = (out.loss + out.aux_loss) / accumulation
            loss.backward()
            loss_sum += float(loss.detach())
        losses.append(loss_sum)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.end_training_step()
        params.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return losses, grads, params


class _Record(TrainerCallback):
    """Gradients before and parameters after each optimizer step."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []
        self.params: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n: p.grad.clone() for n, p in model.named_parameters()})

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.params.append({n: p.detach().clone() for n, p in model.named_parameters()})


@pytest.mark.parametrize(
    ("accumulation", "accepts_loss_kwargs"), [(1, True), (4, True), (4, False)]
)
def test_trainer_matches_the_xmoe_training_step(tmp_path, accumulation, accepts_loss_kwargs):
    # a router with a controller, so the callback's end_training_step() matters too
    options = {"logit_scale": 1.0, "target_experts": 2.0}
    moe = {"d_model": D_MODEL, "num_experts": EXPERTS, "d_expert": 16, "router_options": options}
    model = _model(dtype=torch.float32, moe=moe)
    reference = copy.deepcopy(model)
    if not accepts_loss_kwargs:  # the Trainer then divides by the accumulation steps itself
        model.accepts_loss_kwargs = False
    steps = 3
    rows = list(torch.randint(0, VOCAB, (steps * accumulation * MICRO_BATCH, SEQ)))
    ref_losses, ref_grads, ref_params = _reference_steps(reference, rows, accumulation)

    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=MICRO_BATCH,
        gradient_accumulation_steps=accumulation,
        max_steps=steps,
        max_grad_norm=0.0,  # no clipping: the raw gradients are compared
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        train_sampling_strategy="sequential",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    optimizer = _optimizer(model)
    record = _Record()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=[{"input_ids": row, "labels": row} for row in rows],
        optimizers=(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)),
        callbacks=[record, XMoEEndTrainingStepCallback()],
    )
    assert trainer.model_accepts_loss_kwargs is accepts_loss_kwargs
    trainer.train()

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses))
    for got, want in zip(record.grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    for got, want in zip(record.params, ref_params, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # the controller moved, identically
    scales = [layer.router.logit_scale for layer in model.model.lm.moe_layers]
    ref_scales = [layer.router.logit_scale for layer in reference.model.lm.moe_layers]
    assert all(float(s) != 1.0 for s in scales)
    torch.testing.assert_close(scales, ref_scales)
