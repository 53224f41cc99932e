"""Mixed batches (unipeft.mixed): one forward in which each row uses its own adapter.

The reference for every check is the model run on each row alone with only that row's adapter active (or none),
the semantics the mixed batch promises; HF peft's ``adapter_names=`` is an independent second reference for LoRA.
"""

from __future__ import annotations

import copy

import pytest
import torch

import unipeft
from unipeft.core.delta import form_config, form_names
from unipeft.mixed import SUPPORTED_FORMS, Batchable
from unipeft.core.recipe import Recipe

TOL = 1e-5

#: recipes whose every delta runs in a mixed batch (LoRA variants, DoRA, VeRA, (IA)3, BitFit, SSF, adapters)
RECIPES = ["lora", "rslora", "pissa", "olora", "dora", "vera", "ia3", "bitfit", "ssf", "houlsby", "pfeiffer",
           "parallel_adapter", "scaled_pa"]


def hidden(model, ids: torch.Tensor) -> torch.Tensor:
    """The last hidden state, plus the logits flattened behind it (both must agree row by row)."""
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    return torch.cat([out.hidden_states[-1].flatten(1), out.logits.flatten(1)], dim=1)


def per_row(peft, ids: torch.Tensor, names: list[str | None]) -> torch.Tensor:
    """Row b run alone with only ``names[b]`` active (the reference); restores the active adapters."""
    active = list(peft.active)
    rows = []
    for b, name in enumerate(names):
        peft.set_active(*([name] if name else []))
        rows.append(hidden(peft.model, ids[b:b + 1]))
    peft.set_active(*active)
    return torch.cat(rows)


def mixed(peft, ids: torch.Tensor, names: list[str | None]) -> torch.Tensor:
    with peft.mixed_batch(names):
        return hidden(peft.model, ids)


def adapted(tiny, randomize, family: str, recipes: dict[str, str | Recipe], **options) -> "unipeft.Peft":
    """A tiny model with these adapters (name -> recipe), each moved away from its init."""
    model = tiny.model(family)
    peft = None
    for seed, (name, recipe) in enumerate(recipes.items()):
        peft = unipeft.attach(model, recipe, name=name, **options)
        randomize(peft, name, std=0.1, seed=seed + 1)
    return peft


def assert_rows_match(peft, ids, names) -> torch.Tensor:
    expected = per_row(peft, ids, names)
    got = mixed(peft, ids, names)
    diff = (got - expected).abs().max().item()
    assert diff <= TOL, f"max abs difference {diff}"
    return got


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_rows_equal_running_each_row_alone(tiny, randomize, family, recipe):
    peft = adapted(tiny, randomize, family, {"a": recipe, "b": recipe})
    ids = tiny.batch(family, size=4)["input_ids"]
    names = ["a", None, "b", "a"]

    got = assert_rows_match(peft, ids, names)

    base = per_row(peft, ids, [None] * 4)
    assert (got[1] - base[1]).abs().max() <= TOL  # the None row is the base model
    assert (got[0] - base[0]).abs().max() > 1e-4  # and the adapters do change their rows
    assert (got[0] - got[3]).abs().max() <= TOL or not torch.equal(ids[0], ids[3])
    assert (per_row(peft, ids[:1], ["a"]) - per_row(peft, ids[:1], ["b"])).abs().max() > 1e-4  # a != b


def test_different_methods_and_ranks_in_one_batch(tiny, randomize):
    peft = adapted(tiny, randomize, "llama", {"r4": "lora", "r8": "lora", "ia3": "ia3", "houlsby": "houlsby",
                                              "bitfit": "bitfit", "dora": "dora"})
    peft.remove("r8")
    unipeft.attach(peft.model, "lora", name="r8", r=8, positions=["attn.q", "attn.k", "attn.v", "attn.o"])
    randomize(peft, "r8", seed=9)
    ids = tiny.batch("llama", size=8)["input_ids"]

    assert_rows_match(peft, ids, ["dora", "r4", None, "ia3", "houlsby", "r8", "bitfit", "r4"])


def test_one_adapter_for_every_row_takes_the_unstacked_path(tiny, randomize):
    peft = adapted(tiny, randomize, "llama", {"a": "lora", "b": "ia3"})
    ids = tiny.batch("llama", size=3)["input_ids"]

    assert_rows_match(peft, ids, ["a", "a", "a"])
    assert_rows_match(peft, ids, ["b", "b", "b"])
    assert_rows_match(peft, ids, [None, None, None])


def test_several_deltas_of_one_adapter_at_one_site_keep_their_order(tiny, randomize):
    # LoRA, then SSF (sequential: reads h with the LoRA added), then BitFit, all on the query projection
    recipe = Recipe.from_dict({"name": "stacked", "family": "hybrid", "deltas": [
        {"form": {"type": "lora", "r": 2}, "positions": ["attn.q"]},
        {"form": {"type": "ssf"}, "positions": ["attn.q"], "insertion": "sequential"},
        {"form": {"type": "bias"}, "positions": ["attn.q"], "composition": "scaled", "scale": 2.0},
    ]})
    peft = adapted(tiny, randomize, "llama", {"stacked": recipe, "plain": "lora"})
    ids = tiny.batch("llama", size=3)["input_ids"]

    assert_rows_match(peft, ids, ["stacked", "plain", None])


def test_lora_on_the_embedding(tiny, randomize):
    peft = adapted(tiny, randomize, "llama", {"a": "lora", "b": "lora"}, positions=["embed", "attn.q"])
    ids = tiny.batch("llama", size=3)["input_ids"]

    assert_rows_match(peft, ids, ["b", "a", None])


def test_slices_of_gpt2_fused_attention(tiny, randomize):
    peft = adapted(tiny, randomize, "gpt2", {"a": "lora", "b": "dora"}, positions=["attn.q", "attn.v"])
    ids = tiny.batch("gpt2", size=3)["input_ids"]

    assert_rows_match(peft, ids, ["a", None, "b"])


def test_per_adapter_classification_heads(tiny, randomize):
    with_head = Recipe.from_dict({"name": "lora_head", "family": "reparameterized", "deltas": [
        {"form": {"type": "lora"}, "positions": ["attn.q", "attn.v"]},
        {"form": {"type": "copy"}, "positions": ["head"]},
    ]})
    peft = adapted(tiny, randomize, "bert", {"x": with_head, "y": with_head, "z": "lora"})
    ids = tiny.batch("bert", size=5)["input_ids"]

    assert_rows_match(peft, ids, ["x", "y", None, "z", "x"])
    assert_rows_match(peft, ids, ["x", "y", "x", "y", "y"])  # every row replaced: the base head never runs


def test_generate_with_a_mixed_batch_equals_per_row_generate(tiny, randomize):
    peft = adapted(tiny, randomize, "llama", {"a": "lora", "b": "houlsby"})
    model = peft.model
    ids = tiny.batch("llama", size=3, length=5)["input_ids"]
    names = ["a", None, "b"]
    options = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = []
    for b, name in enumerate(names):
        peft.set_active(*([name] if name else []))
        expected.append(model.generate(input_ids=ids[b:b + 1], **options))
    peft.set_active("a")

    with peft.mixed_batch(names):
        got = model.generate(input_ids=ids, **options)

    assert torch.equal(got, torch.cat(expected))
    assert not torch.equal(expected[0][:, 5:], expected[1][:, 5:]) or not torch.equal(ids[0], ids[1])


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # HF peft 0.21 on transformers 5
def test_matches_hf_peft_adapter_names(tiny, randomize):
    peft_lib = pytest.importorskip("peft")
    peft = adapted(tiny, randomize, "llama", {"one": "lora", "two": "lora"})
    twin = tiny.model("llama")
    theirs = peft_lib.get_peft_model(twin, peft_lib.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
                                     adapter_name="one")
    theirs.add_adapter("two", peft_lib.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    inner = theirs.base_model.model
    with torch.no_grad():
        for name in ("one", "two"):
            for module, placed in peft.delta_modules(name):
                layer = inner.get_submodule(module)
                layer.lora_A[name].weight.copy_(placed.form.lora_A)
                layer.lora_B[name].weight.copy_(placed.form.lora_B)
    theirs.eval()
    ids = tiny.batch("llama", size=4)["input_ids"]
    names = ["two", "one", None, "two"]

    with torch.no_grad():
        reference = theirs(input_ids=ids, adapter_names=[n or "__base__" for n in names]).logits
        with peft.mixed_batch(names):
            got = peft.model(input_ids=ids).logits

    assert (got - reference).abs().max().item() <= TOL


def test_active_adapters_are_off_inside_and_back_after(tiny, randomize):
    peft = adapted(tiny, randomize, "llama", {"p": "prefix", "a": "lora"})
    peft.set_active("p", "a")
    ids = tiny.batch("llama", size=2)["input_ids"]
    before = hidden(peft.model, ids)

    assert_rows_match(peft, ids, ["a", None])  # the active prefix does not run for these rows

    assert peft.active == ["p", "a"]
    assert torch.equal(hidden(peft.model, ids), before)


def test_stacks_follow_weight_changes_between_blocks(tiny, randomize):
    peft = adapted(tiny, randomize, "llama", {"a": "lora", "b": "lora"})
    ids = tiny.batch("llama", size=2)["input_ids"]
    first = mixed(peft, ids, ["a", "b"])

    randomize(peft, "b", seed=42)  # trained further, or hot-swapped

    second = assert_rows_match(peft, ids, ["a", "b"])
    assert (second[0] - first[0]).abs().max() <= TOL
    assert (second[1] - first[1]).abs().max() > 1e-4


def test_stacks_are_reused_until_the_adapters_change(tiny, randomize):
    from unipeft.mixed.stacks import site_stacks

    peft = adapted(tiny, randomize, "llama", {"a": "lora", "b": "lora"})
    site = next(iter(peft._sites.values()))
    ids = tiny.batch("llama", size=3)["input_ids"]
    first = site_stacks(site)
    mixed(peft, ids, ["b", "a", None])
    assert site_stacks(site) is first  # another mix of the same adapters: no rebuild

    handle = peft.mixed_batch(["a", "b", "a"])
    randomize(peft, "a", seed=7)  # changed after the handle was made, before the block: rebuilt on entering
    with handle:
        got = hidden(peft.model, ids)
    assert (got - per_row(peft, ids, ["a", "b", "a"])).abs().max() <= TOL
    assert site_stacks(site) is not first

    peft.remove("b")
    unipeft.attach(peft.model, "ia3", name="b")  # the same name, another adapter
    randomize(peft, "b", seed=8)
    assert_rows_match(peft, ids, ["b", "a", None])

    peft.model.double()  # new storage for every tensor
    expected = per_row(peft, ids, ["a", "b", None])
    got = mixed(peft, ids, ["a", "b", None])
    assert got.dtype == torch.float64 and (got - expected).abs().max() <= 1e-10


def test_reentering_a_block_reuses_its_rows_and_follows_weight_changes(tiny, randomize):
    """A server's decoding steps re-enter one block while the rows stay the same: the second entry gathers nothing
    again (the same plans) and gives the same outputs; a weight changed in place between two entries is seen."""
    peft = adapted(tiny, randomize, "llama", {"a": "lora", "b": "lora"})
    ids = tiny.batch("llama", size=3)["input_ids"]
    names = ["b", "a", None]
    handle = peft.mixed_batch(names)
    with handle:
        first = hidden(peft.model, ids)
    plans = dict(handle._plans)
    assert plans
    with handle:
        again = hidden(peft.model, ids)
    assert torch.equal(again, first)
    assert all(handle._plans[module] is plan for module, plan in plans.items())

    randomize(peft, "a", seed=9)  # trained further or hot-swapped between two steps
    with handle:
        got = hidden(peft.model, ids)
    assert (got - per_row(peft, ids, names)).abs().max() <= TOL
    assert (got[1] - first[1]).abs().max() > 1e-4 and (got[0] - first[0]).abs().max() <= TOL
    assert all(handle._plans[module] is not plan for module, plan in plans.items())  # every site holds 'a'


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda(tiny, randomize):
    model = tiny.model("llama")
    peft = None
    for seed, (name, recipe) in enumerate({"a": "lora", "b": "dora", "c": "ia3", "d": "houlsby"}.items()):
        peft = unipeft.attach(model, recipe, name=name)
        randomize(peft, name, seed=seed + 1)
    model.to("cuda")
    ids = tiny.batch("llama", size=5)["input_ids"].to("cuda")
    names = ["a", "b", None, "c", "d"]

    got = assert_rows_match(peft, ids, names)
    assert got.is_cuda
    with peft.mixed_batch(names):
        tokens = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert tokens.shape == (5, ids.shape[1] + 3)


# ------------------------------------------------------------------------------------------------------- refusals
def test_unknown_name_lists_the_loaded_adapters(tiny, randomize):
    peft = adapted(tiny, randomize, "llama", {"a": "lora", "b": "lora"})
    with pytest.raises(ValueError, match=r"unknown adapter 'c'.*loaded adapters: a, b"):
        peft.mixed_batch(["a", "c"])
    with pytest.raises(ValueError, match="empty list"):
        peft.mixed_batch([])


def test_batch_size_must_match_the_names(tiny, randomize):
    peft = adapted(tiny, randomize, "llama", {"a": "lora"})
    ids = tiny.batch("llama", size=3)["input_ids"]
    with peft.mixed_batch(["a", None]), pytest.raises(ValueError, match="2 adapter names but .* batch of 3 rows"):
        hidden(peft.model, ids)


def test_merged_adapters_and_training_mode_are_refused(tiny, randomize):
    peft = adapted(tiny, randomize, "llama", {"a": "lora", "b": "lora"})
    peft.merge("a")
    with pytest.raises(ValueError, match="'?a'? are merged|adapters a are merged"):
        peft.mixed_batch(["a", "b"])
    peft.unmerge()
    peft.model.train()
    with pytest.raises(ValueError, match="inference"):
        with peft.mixed_batch(["a", "b"]):
            pass
    peft.model.eval()
    with peft.mixed_batch(["a", "b"]):
        with pytest.raises(RuntimeError, match="do not nest"):
            with peft.mixed_batch(["b", "a"]):
                pass


@pytest.mark.parametrize("recipe, form", [("prefix", "PrefixForm|Prefix"), ("prompt", "Prompt"), ("loha", "LoHa"),
                                          ("unipelt", "LoRA|Prefix")])
def test_unsupported_deltas_are_refused_by_name(tiny, randomize, recipe, form):
    peft = adapted(tiny, randomize, "llama", {"x": recipe, "a": "lora"})
    with pytest.raises(ValueError, match=rf"({form}).*of 'x' at .*Supported forms: adalora, bias, bottleneck, copy, dora"):
        peft.mixed_batch(["a", "x"])
    peft.mixed_batch(["a", None])  # an unsupported adapter that is not in the batch is no obstacle


def test_supported_forms_are_exactly_the_batchable_ones(tiny):
    model = tiny.model("llama")
    site = dict(model.named_modules())["model.layers.0.self_attn.q_proj"]
    from unipeft.core.delta import SiteShape

    shape = SiteShape(d_in=site.in_features, d_out=site.out_features, base=site)
    checked = 0
    for name in form_names():
        config = form_config({"type": name})
        if config.insertions == ("sequence",) or name in ("adalora", "compacter", "fishmask"):
            continue  # built through their attach hooks; adalora is checked below, the others are refused
        form = config.build(shape)
        assert isinstance(form, Batchable) == (name in SUPPORTED_FORMS and name != "copy"), name
        checked += 1
    assert checked >= 8
    assert set(SUPPORTED_FORMS) == {"lora", "dora", "vera", "adalora", "ia3", "bias", "ssf", "bottleneck", "copy"}
    peft = unipeft.attach(model, "adalora")
    assert all(isinstance(p.form, Batchable) for _, p in peft.delta_modules())


def test_real_minilm(minilm_folder, randomize):
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(minilm_folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(minilm_folder)
    peft = unipeft.attach(model, "lora", name="a")
    unipeft.attach(model, "houlsby", name="b")
    randomize(peft, std=0.05)
    batch = tokenizer(["a short one", "another short one", "and a third"], return_tensors="pt", padding=True)
    names = ["a", None, "b"]
    expected = []
    for b, name in enumerate(names):
        peft.set_active(*([name] if name else []))
        with torch.no_grad():
            expected.append(model(**{k: v[b:b + 1] for k, v in batch.items()}).last_hidden_state)
    with torch.no_grad(), peft.mixed_batch(names):
        got = model(**batch).last_hidden_state
    for b in range(3):
        length = int(batch["attention_mask"][b].sum())
        assert (got[b, :length] - expected[b][0, :length]).abs().max() <= TOL


@pytest.mark.slow
def test_real_smollm2_mixed_generate(randomize):
    from unipeft.models import load_model

    model, tokenizer = load_model("smollm2-135m", kind="causal_lm")
    peft = unipeft.attach(model, "lora", name="a")
    unipeft.attach(model, "ia3", name="b")
    randomize(peft, std=0.02)
    ids = tokenizer(["The capital of France is"], return_tensors="pt")["input_ids"].repeat(3, 1)
    names = ["a", None, "b"]

    assert_rows_match(peft, ids, names)
    options = dict(max_new_tokens=4, do_sample=False)
    expected = []
    for b, name in enumerate(names):
        peft.set_active(*([name] if name else []))
        expected.append(model.generate(input_ids=ids[b:b + 1], **options))
    with peft.mixed_batch(names):
        assert torch.equal(model.generate(input_ids=ids, **options), torch.cat(expected))
