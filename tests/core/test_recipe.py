"""Recipes: YAML/JSON round trips, user-written recipes, ``with_options`` and validation (unipeft.core.recipe)."""

from __future__ import annotations

import json

import pytest
import yaml

import unipeft
from unipeft import DeltaSpec, Recipe, builtin_recipe_names, load_recipe
from unipeft.core.delta import form_config, form_names
from unipeft.methods.bottleneck import BottleneckConfig
from unipeft.methods.lora import LoRAConfig

MAM = """
name: mam
family: hybrid
paper: He et al. 2022 (arXiv 2110.04366)
description: a user-written point of the design space
deltas:
  - form: {type: lora, r: 4, alpha: 8}
    positions: [attn.q, attn.v]
    layers: [-1, -2]
    stacks: [decoder]
  - form: {type: bottleneck, size: 16, activation: gelu}
    positions: [ffn]
    insertion: parallel
    composition: scaled
    scale: 4.0
    learn_scale: true
  - form: {type: bottleneck, size: 8}
    modules: '.*\\.attn\\.c_proj'
    insertion: sequential
    composition: gated
  - form: {type: ia3}
    modules: [c_fc]
    insertion: multiplicative
"""


@pytest.mark.parametrize("name", builtin_recipe_names())
def test_builtin_recipe_round_trips(tmp_path, name):
    recipe = load_recipe(name)
    assert recipe.name == name
    assert Recipe.from_dict(yaml.safe_load(recipe.to_yaml())) == recipe
    assert Recipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe
    (tmp_path / "r.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
    (tmp_path / "r.json").write_text(json.dumps(recipe.to_dict()), encoding="utf-8")
    assert load_recipe(tmp_path / "r.yaml") == recipe
    assert load_recipe(str(tmp_path / "r.json")) == recipe
    assert load_recipe(recipe) is recipe
    assert load_recipe(recipe.to_dict()) == recipe
    # printing is stable: the YAML of the reloaded recipe is the same text
    assert load_recipe(tmp_path / "r.yaml").to_yaml() == recipe.to_yaml()


def test_builtin_recipes_include_the_survey_methods():
    names = set(builtin_recipe_names())
    assert {"lora", "houlsby", "pfeiffer", "parallel_adapter", "scaled_pa", "ia3", "bitfit", "full"} <= names


def test_scaled_pa_is_he_et_al():
    (spec,) = load_recipe("scaled_pa").deltas
    assert spec.positions == ("ffn",)
    assert (spec.resolved_insertion, spec.composition, spec.scale) == ("parallel", "scaled", 4.0)
    assert spec.form == BottleneckConfig(size=64, activation="relu")


def test_user_recipe_from_yaml(tmp_path):
    path = tmp_path / "mam.yaml"
    path.write_text(MAM, encoding="utf-8")
    recipe = load_recipe(str(path))
    lora, pa, gated, ia3 = recipe.deltas
    assert lora.form == LoRAConfig(r=4, alpha=8)
    assert (lora.layers, lora.stacks, lora.positions) == ((-1, -2), ("decoder",), ("attn.q", "attn.v"))
    assert (pa.composition, pa.scale, pa.learn_scale) == ("scaled", 4.0, True)
    assert gated.modules == r".*\.attn\.c_proj" and gated.composition == "gated"
    assert ia3.modules == ("c_fc",) and ia3.resolved_insertion == "multiplicative"
    assert Recipe.from_dict(yaml.safe_load(recipe.to_yaml())) == recipe
    assert recipe.to_dict()["deltas"][2]["modules"] == r".*\.attn\.c_proj"  # a regex stays a string
    assert recipe.to_dict()["deltas"][3]["modules"] == ["c_fc"]  # a list stays a list


def test_user_recipe_attaches(tiny):
    recipe = Recipe.from_dict(yaml.safe_load(MAM))
    model = tiny.model("gpt2")
    batch = tiny.batch("gpt2")
    before = tiny.logits(model, batch)
    peft = unipeft.attach(model, recipe)
    sites = [(m, type(p.form).__name__, p.insertion) for m, p in peft.delta_modules()]
    assert ("transformer.h.1.attn.c_attn", "LoRA", "parallel") in sites
    assert ("transformer.h.0.mlp.c_proj", "Bottleneck", "parallel") in sites
    assert ("transformer.h.0.attn.c_proj", "Bottleneck", "sequential") in sites
    assert ("transformer.h.1.mlp.c_fc", "IA3", "multiplicative") in sites
    # the gated adapter's gate makes h + σ(·)·0 = h at init too
    assert (tiny.logits(model, batch) - before).abs().max() < 1e-5


def test_defaults_are_omitted_when_printing():
    recipe = load_recipe("lora")
    (delta,) = recipe.to_dict()["deltas"]
    assert set(delta) == {"form", "positions"}
    assert delta["form"]["type"] == "lora"


# ------------------------------------------------------------------------------------------------ with_options
def test_with_options_sets_form_hyperparameters():
    recipe = load_recipe("lora").with_options(r=16, alpha=32.0)
    assert recipe.deltas[0].form == LoRAConfig(r=16, alpha=32.0, dropout=0.0)
    assert load_recipe("lora").deltas[0].form.r == 8  # the built-in is untouched (frozen dataclasses)
    assert load_recipe("lora").with_options() == load_recipe("lora")


def test_with_options_sets_placement():
    recipe = load_recipe("lora").with_options(positions=["attn.k"], layers=[-1], composition="scaled", scale=2.0)
    (spec,) = recipe.deltas
    assert (spec.positions, spec.layers, spec.composition, spec.scale) == (("attn.k",), (-1,), "scaled", 2.0)
    recipe = load_recipe("lora").with_options(positions=[], modules=["query"])
    assert recipe.deltas[0].positions == () and recipe.deltas[0].modules == ("query",)


def test_with_options_applies_to_every_delta_that_has_the_option():
    recipe = Recipe.from_dict(yaml.safe_load(MAM)).with_options(size=32)
    assert [getattr(d.form, "size", None) for d in recipe.deltas] == [None, 32, 32, None]


def test_with_options_errors():
    with pytest.raises(ValueError, match=r"option\(s\) rank do not apply to recipe 'lora'; valid: .*\br\b"):
        load_recipe("lora").with_options(rank=4)
    with pytest.raises(ValueError, match="rank r must be >= 1"):
        load_recipe("lora").with_options(r=0)
    with pytest.raises(ValueError, match="does not support insertion 'sequential'"):
        load_recipe("lora").with_options(insertion="sequential")
    with pytest.raises(ValueError, match="unknown composition 'mul'"):
        load_recipe("lora").with_options(composition="mul")
    with pytest.raises(ValueError, match=r"option\(s\) r do not apply"):
        unipeft.attach(__import__("torch").nn.Linear(2, 2), "houlsby", r=4)


# ------------------------------------------------------------------------------------------------- validation
def _lora_delta(**extra) -> dict:
    return {"form": {"type": "lora", "r": 4}, "positions": ["attn.q"], **extra}


def _recipe(*deltas: dict, **extra) -> dict:
    return {"name": "user", "family": "reparameterized", "deltas": list(deltas), **extra}


def test_unknown_form_lists_the_forms():
    with pytest.raises(ValueError) as err:
        Recipe.from_dict(_recipe({"form": {"type": "loraa"}, "positions": ["attn.q"]}))
    assert "unknown delta form 'loraa'; valid forms: " in str(err.value)
    for form in ("lora", "bottleneck", "ia3", "bias", "copy"):
        assert form in str(err.value)
        assert form in form_names()


def test_unknown_form_option_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown option\(s\) rank for form 'lora'; valid: .*alpha.*\br\b"):
        form_config({"type": "lora", "rank": 4})
    with pytest.raises(ValueError, match=r"unknown option\(s\) size for form 'ia3'"):
        Recipe.from_dict(_recipe({"form": {"type": "ia3", "size": 4}, "positions": ["attn.k"]}))


@pytest.mark.parametrize(
    ("form", "insertion", "valid"),
    [
        ({"type": "lora"}, "sequential", "parallel"),
        ({"type": "ia3"}, "parallel", "multiplicative, multiplicative_input"),
        ({"type": "bottleneck"}, "multiplicative", "sequential, parallel"),
        ({"type": "copy"}, "parallel", "replace"),
    ],
)
def test_bad_insertion_for_a_form(form, insertion, valid):
    with pytest.raises(ValueError, match=f"form '{form['type']}' does not support insertion '{insertion}'; "
                                         f"valid: {valid}"):
        Recipe.from_dict(_recipe({"form": form, "positions": ["attn.q"], "insertion": insertion}))


def test_unknown_insertion():
    with pytest.raises(ValueError, match="does not support insertion 'diagonal'"):
        Recipe.from_dict(_recipe(_lora_delta(insertion="diagonal")))


def test_unknown_composition():
    with pytest.raises(ValueError, match="unknown composition 'multiply'; valid: add, scaled, gated"):
        Recipe.from_dict(_recipe(_lora_delta(composition="multiply")))


def test_structural_errors():
    with pytest.raises(ValueError, match=r"unknown delta key\(s\) position; valid: "):
        Recipe.from_dict(_recipe({"form": {"type": "lora"}, "position": ["attn.q"]}))
    with pytest.raises(ValueError, match="a delta needs a 'form'"):
        Recipe.from_dict(_recipe({"positions": ["attn.q"]}))
    with pytest.raises(ValueError, match="needs positions .* or modules patterns"):
        Recipe.from_dict(_recipe({"form": {"type": "lora"}}))
    with pytest.raises(ValueError, match=r"unknown recipe key\(s\) method"):
        Recipe.from_dict(_recipe(_lora_delta(), method="x"))
    with pytest.raises(ValueError, match="unknown family 'magic'"):
        Recipe.from_dict(_recipe(_lora_delta(), family="magic"))
    with pytest.raises(ValueError, match="nothing would train"):
        Recipe.from_dict(_recipe())
    assert Recipe.from_dict(_recipe(family="full", train_base=True)).train_base


def test_form_hyperparameter_validation():
    with pytest.raises(ValueError, match="exactly one of bottleneck 'size' and 'reduction_factor'"):
        BottleneckConfig(size=8, reduction_factor=4)
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        form_config({"type": "bottleneck", "activation": "swish"})
    with pytest.raises(ValueError, match="dropout must be in"):
        LoRAConfig(dropout=1.0)
    with pytest.raises(ValueError, match="unknown LoRA init 'xavier'"):
        LoRAConfig(init="xavier")


def test_load_recipe_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown method 'lorra'; built-in recipes: .*lora"):
        load_recipe("lorra")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_recipe(str(tmp_path / "missing.yaml"))


def test_specs_are_frozen_and_hashable_data():
    spec = DeltaSpec(form=LoRAConfig(), positions=("attn.q",))
    with pytest.raises(AttributeError):
        spec.scale = 2.0  # type: ignore[misc]
    assert spec == DeltaSpec.from_dict({"form": {"type": "lora"}, "positions": ["attn.q"]})


@pytest.mark.parametrize("insertion", ["multiplicative", "multiplicative_input"])
@pytest.mark.parametrize("composition", ["scaled", "gated"])
def test_a_multiplicative_delta_refuses_a_composition(insertion, composition):
    """h' = h ⊙ l has no Δh to scale or gate: before this was refused, ``scaled`` ×4 and ×2 trained the same model."""
    with pytest.raises(ValueError, match=f"composition '{composition}' of form 'ia3' at insertion '{insertion}'.*"
                                         "use composition 'add'"):
        Recipe.from_dict(_recipe({"form": {"type": "ia3"}, "positions": ["attn.k"], "insertion": insertion,
                                  "composition": composition, "scale": 4.0}))
    Recipe.from_dict(_recipe({"form": {"type": "ia3"}, "positions": ["attn.k"], "insertion": insertion}))
