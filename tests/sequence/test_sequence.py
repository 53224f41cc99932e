"""Sequence-level deltas (unipeft.sequence): the ``sequence`` insertion, prefixes through transformers' attention
interface, prompts through forward pre-hooks, and the shared invariants of every sequence recipe on every family.

The invariants here are those of tests/core/test_invariants.py adapted to forms that are not the identity at init:
(1) attaching changes the outputs and deactivating the adapter gives the base model's outputs bit for bit;
(2) merging is refused with a clear NotImplementedError; (3) detach restores the state dict, the module objects, the
attention implementation and removes every hook; (4) only delta parameters require grad; (5) save → load is exact;
(6) a few optimisation steps lower the loss.
"""

from __future__ import annotations

import pytest
import torch
import transformers

import unipeft
from unipeft.core.recipe import DeltaSpec, Recipe
from unipeft.sequence.attention import _BOUND as ATTENTION_BOUND
from unipeft.core.site import DeltaSite
from unipeft.methods.prefix import PrefixConfig
from unipeft.methods.prompt import PromptConfig

#: Every built-in recipe with a sequence-level delta (tests/core/test_invariants.py leaves exactly these to this file).
SEQUENCE_RECIPES = tuple(name for name in unipeft.builtin_recipe_names()
                         if any(d.resolved_insertion == "sequence" for d in unipeft.load_recipe(name).deltas))
FAMILIES = ("bert", "gpt2", "llama", "t5", "bart")


def _recipe(*deltas: DeltaSpec) -> Recipe:
    return Recipe(name="seq", family="additive", deltas=deltas)


def _prefix(length: int = 3, reparam: int | None = None, positions=("attn",), **placement) -> DeltaSpec:
    return DeltaSpec(form=PrefixConfig(length=length, reparam=reparam), positions=positions, **placement)


def _prompt(length: int = 4) -> DeltaSpec:
    return DeltaSpec(form=PromptConfig(length=length), positions=("embed",))


def _implementations(model: torch.nn.Module) -> list[str | None]:
    configs = {id(m.config): m.config for m in model.modules() if isinstance(getattr(m, "config", None),
                                                                                transformers.PretrainedConfig)}
    return sorted(str(c._attn_implementation) for c in configs.values())


def _tail(logits: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The logits of the real tokens (a prompt adds virtual positions in front of a decoder's outputs)."""
    return logits[:, -like.shape[1]:] if logits.dim() == 3 else logits


# ------------------------------------------------------------------------------------------- shared invariants
def test_the_sequence_recipes():
    assert {"prefix", "ptuning_v2", "prompt", "mam", "mam_glue", "unipelt"} <= set(SEQUENCE_RECIPES)


@pytest.mark.parametrize("recipe", SEQUENCE_RECIPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_init_changes_outputs_and_deactivating_restores_them(tiny, family, recipe):
    model = tiny.model(family)
    batch = tiny.batch(family)
    before = tiny.logits(model, batch)
    peft = unipeft.attach(model, recipe)
    adapted = tiny.logits(model, batch)
    assert (_tail(adapted, before) - before).abs().max() > 1e-6
    peft.set_active()
    assert torch.equal(tiny.logits(model, batch), before)
    peft.set_active("default")
    assert torch.equal(tiny.logits(model, batch), adapted)


@pytest.mark.parametrize("recipe", SEQUENCE_RECIPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_merge_is_refused_and_changes_nothing(tiny, family, recipe):
    model = tiny.model(family)
    batch = tiny.batch(family)
    peft = unipeft.attach(model, recipe)
    adapted = tiny.logits(model, batch)
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        peft.merge()
    assert peft.merged == []
    assert torch.equal(tiny.logits(model, batch), adapted)


@pytest.mark.parametrize("recipe", SEQUENCE_RECIPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_detach_grads_save_load(tiny, randomize, tmp_path, family, recipe):
    """Detach restores everything; only deltas train; save → load is exact (all on one model build)."""
    model = tiny.model(family)
    batch = tiny.batch(family)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    implementations = _implementations(model)
    before = tiny.logits(model, batch)

    peft = unipeft.attach(model, recipe)
    delta = {id(p) for _, placed in peft.delta_modules() for p in placed.parameters()}
    assert {id(p) for p in model.parameters() if p.requires_grad} == delta
    assert not any(p.requires_grad for p in peft.base_parameters())
    randomize(peft)
    expected = tiny.logits(model, batch)
    folder = peft.save(str(tmp_path / "adapter"))
    fresh = tiny.model(family)
    unipeft.load_adapter(fresh, folder)
    assert torch.equal(tiny.logits(fresh, batch), expected)
    assert torch.equal(tiny.logits(model, batch), expected)  # saving (folding a reparameterisation) changes nothing

    tiny.loss(model, batch).backward()
    peft.detach()
    after = model.state_dict()
    assert list(after) == list(state)
    assert all(torch.equal(after[k], v) for k, v in state.items())
    assert all(module is modules[name] for name, module in model.named_modules())
    assert not any(isinstance(m, DeltaSite) for m in model.modules())
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert _implementations(model) == implementations
    assert torch.equal(tiny.logits(model, batch), before)


@pytest.mark.parametrize("recipe", SEQUENCE_RECIPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_training_lowers_the_loss(tiny, family, recipe):
    model = tiny.model(family)
    batch = tiny.batch(family)
    peft = unipeft.attach(model, recipe)
    model.train()
    optimizer = torch.optim.AdamW(peft.trainable_parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        loss = tiny.loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    losses.append(tiny.loss(model, batch).item())
    # strictly lower at every step (a random tiny BERT's logits are ~1e-2: some recipes move its loss by ~1e-4)
    assert losses == sorted(losses, reverse=True) and losses[-1] < losses[0], losses


# ------------------------------------------------------------------------------------------------ mechanism
def test_sequence_deltas_are_listed_not_run_at_their_site(tiny):
    model = tiny.model("llama")
    peft = unipeft.attach(model, _recipe(_prefix()))
    for module, placed in peft.delta_modules():
        site = peft._sites[module]
        assert placed.insertion == "sequence" and placed in site.sequence and placed not in site._post
    peft.set_active()
    assert all(not peft._sites[m].sequence for m, _ in peft.delta_modules())


def test_attention_implementation_is_switched_per_config_and_restored(tiny):
    model = tiny.model("t5")  # the encoder and the decoder have their own (copied) configs
    peft = unipeft.attach(model, _recipe(_prefix(stacks=("decoder",))))
    assert model.decoder.config._attn_implementation == "unipeft_prefix_sdpa"
    assert model.encoder.config._attn_implementation == "sdpa"
    peft.add(_recipe(_prefix()), "both")
    assert model.encoder.config._attn_implementation == "unipeft_prefix_sdpa"
    peft.remove("default")  # the decoder still has the second adapter's prefixes
    assert model.decoder.config._attn_implementation == "unipeft_prefix_sdpa"
    peft.remove("both")
    assert _implementations(model) == ["sdpa", "sdpa", "sdpa"]
    assert not any(m in ATTENTION_BOUND for m in model.modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_eager_and_sdpa_agree(tiny, family):
    outputs = []
    for implementation in ("sdpa", "eager"):
        config = tiny.config(family)
        config._attn_implementation = implementation
        model = type(tiny.model(family))(config).eval()
        model.load_state_dict(tiny.model(family).state_dict())
        torch.manual_seed(0)
        positions = ("attn", "xattn") if family in ("t5", "bart") else ("attn",)
        unipeft.attach(model, _recipe(_prefix(positions=positions)))
        batch = tiny.batch(family)
        mask = torch.ones_like(batch["input_ids"])
        mask[0, -2:] = 0
        outputs.append(tiny.logits(model, {**batch, "attention_mask": mask}))
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=0)


def test_unsupported_attention_implementation_is_refused_before_attaching(tiny):
    model = tiny.model("llama")
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="sdpa or eager"):
        unipeft.attach(model, _recipe(_prefix()))
    assert not any(isinstance(m, DeltaSite) for m in model.modules())


@pytest.mark.parametrize("spec, message", [
    (DeltaSpec(form=PrefixConfig(), positions=("ffn",)), "attention sub-layer"),
    (DeltaSpec(form=PrefixConfig(), positions=("attn",), composition="scaled"), "composition"),
    (DeltaSpec(form=PromptConfig(), positions=("attn.q",)), "position 'embed'"),
    (DeltaSpec(form=PromptConfig(), positions=("embed",), composition="gated"), "composition 'add'"),
])
def test_wrong_sites_and_compositions_are_refused(tiny, spec, message):
    model = tiny.model("bert")
    with pytest.raises(ValueError, match=message):
        unipeft.attach(model, _recipe(spec))
    assert not any(isinstance(m, DeltaSite) for m in model.modules())


def test_two_active_prefixes_are_concatenated(tiny):
    """Two prefix adapters active together act as one prefix of their concatenated rows."""
    batch = tiny.batch("llama")
    model = tiny.model("llama")
    peft = unipeft.attach(model, _recipe(_prefix(length=2)), "a")
    peft.add(_recipe(_prefix(length=3)), "b")
    peft.set_active("a", "b")
    both = tiny.logits(model, batch)
    joined_model = tiny.model("llama")
    joined = unipeft.attach(joined_model, _recipe(_prefix(length=5)))
    with torch.no_grad():
        for (_, a), (_, b), (_, j) in zip(peft.delta_modules("a"), peft.delta_modules("b"), joined.delta_modules()):
            j.form.key.copy_(torch.cat([a.form.key, b.form.key]))
            j.form.value.copy_(torch.cat([a.form.value, b.form.value]))
    torch.testing.assert_close(tiny.logits(joined_model, batch), both, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["bert", "llama", "t5"])
def test_padding_is_masked_with_a_prefix(tiny, family):
    """Right padding does not change the real tokens' outputs: the prefix columns extend the padding mask."""
    model = tiny.model(family)
    positions = ("attn", "xattn") if family == "t5" else ("attn",)
    unipeft.attach(model, _recipe(_prefix(positions=positions)))
    ids = tiny.batch(family, size=1, length=5)["input_ids"]
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=ids.dtype)], dim=1)
    mask = torch.cat([torch.ones(1, 5), torch.zeros(1, 3)], dim=1).long()
    extra = {"decoder_input_ids": ids[:, :4]} if family == "t5" else {}
    short = tiny.logits(model, {"input_ids": ids, **extra})
    long = tiny.logits(model, {"input_ids": padded, "attention_mask": mask, **extra})
    if family == "llama":
        long = long[:, :5]
    torch.testing.assert_close(long, short, atol=1e-5, rtol=0)


def test_gate_capture_hook_lives_only_with_a_gated_prefix(tiny):
    model = tiny.model("bert")
    peft = unipeft.attach(model, _recipe(_prefix()))
    attention = model.bert.encoder.layer[0].attention.self
    assert not attention._forward_pre_hooks
    peft.add(_recipe(_prefix(composition="gated")), "gated")
    assert len(attention._forward_pre_hooks) == 1
    peft.remove("gated")
    assert not attention._forward_pre_hooks


# --------------------------------------------------------------------------------------------------- prompts
def test_prompt_hook_extends_mask_labels_and_token_types(tiny):
    model = tiny.model("llama")
    peft = unipeft.attach(model, _recipe(_prompt(length=4)))
    seen = {}
    handle = model.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(kwargs), with_kwargs=True)
    batch = tiny.batch("llama")
    out = model(**batch, attention_mask=torch.ones_like(batch["input_ids"]))
    handle.remove()
    assert out.logits.shape[1] == 4 + batch["input_ids"].shape[1]
    assert seen["inputs_embeds"].shape[1] == 4 + batch["input_ids"].shape[1]
    assert seen["attention_mask"].shape[1] == 4 + batch["input_ids"].shape[1]
    prompt = next(p for _, p in peft.delta_modules()).form.prompt
    assert torch.equal(seen["inputs_embeds"][0, :4], prompt)
    # labels: -100 on the virtual tokens, so the loss is over the real tokens, the first predicted by the last
    # virtual position (as HF peft)
    logits = out.logits[:, 3:-1]
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1))
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=0)


def test_prompt_goes_in_front_of_the_encoder_in_t5(tiny):
    model = tiny.model("t5")
    unipeft.attach(model, _recipe(_prompt(length=4)))
    batch = tiny.batch("t5")
    with torch.no_grad():
        encoded = model.get_encoder()(input_ids=batch["input_ids"])
        out = model(**batch, attention_mask=torch.ones_like(batch["input_ids"]))
    assert encoded.last_hidden_state.shape[1] == 4 + batch["input_ids"].shape[1]
    assert out.logits.shape[1] == batch["labels"].shape[1]  # the decoder side is unchanged


def test_prompt_with_bert_token_types(tiny):
    model = tiny.model("bert")
    unipeft.attach(model, _recipe(_prompt(length=4)))
    batch = tiny.batch("bert")
    types = torch.ones_like(batch["input_ids"])
    out = model(**batch, token_type_ids=types)
    assert out.logits.shape == (2, 3)
