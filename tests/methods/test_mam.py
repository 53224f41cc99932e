"""The MAM adapter (He et al. 2022): the recipes, their place in the design space, and exact parameter counts of
He et al.'s settings on configs alone (meta device, no weights).

The shared invariants run over the ``mam`` and ``mam_glue`` recipes on every family in tests/core/test_sequence.py.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import unipeft
from unipeft.inspection.design_space import method
from unipeft.core.recipe import load_recipe
from unipeft.methods.bottleneck import BottleneckConfig
from unipeft.methods.prefix import PrefixConfig
from unipeft.models.configs import build_meta_model, known_config


@pytest.mark.parametrize("name, length, size", [("mam", 30, 512), ("mam_glue", 16, 16)])
def test_recipe_is_prefix_plus_scaled_parallel_adapter(name, length, size):
    recipe = load_recipe(name)
    assert recipe.family == "hybrid"
    prefix, adapter = recipe.deltas
    assert prefix.form == PrefixConfig(length=length, reparam=800)
    assert prefix.positions == (("attn", "xattn?") if name == "mam" else ("attn",))
    assert prefix.resolved_insertion == "sequence"
    assert adapter.form == BottleneckConfig(size=size, activation="relu")
    assert adapter.positions == ("ffn",) and adapter.resolved_insertion == "parallel"
    assert (adapter.composition, adapter.scale) == ("scaled", 4.0)


def test_design_space_row_is_the_recipe():
    assert method("MAM adapter").to_recipe().deltas == load_recipe("mam").deltas


def _he_et_al_seq2seq(**options) -> unipeft.Recipe:
    """He et al.'s placement in an encoder-decoder model: prefixes at encoder self-, decoder self- and
    cross-attention — the shipped ``mam`` itself (its ``xattn?`` resolves where the model has cross-attention)."""
    return load_recipe("mam").with_options(**options)


def test_mam_on_an_encoder_only_model_skips_the_missing_cross_attention():
    model = build_meta_model(known_config("roberta-base"), "base")
    peft = unipeft.attach(model, "mam")
    assert sorted({r.site.position for r in peft.records["default"]}) == ["attn", "ffn"]
    peft.detach()


def test_an_optional_position_is_still_checked_where_it_is_required():
    model = build_meta_model(known_config("roberta-base"), "base")
    with pytest.raises(ValueError, match="unknown position 'xattn'"):
        unipeft.attach(model, _prefix_at(("xattn",)))


def _prefix_at(positions: tuple[str, ...]) -> unipeft.Recipe:
    recipe = load_recipe("mam")
    prefix, adapter = recipe.deltas
    return replace(recipe, deltas=(replace(prefix, positions=positions), adapter))


@pytest.fixture(scope="module")
def bart_large() -> torch.nn.Module:
    return build_meta_model(known_config("bart-large"), "seq2seq_lm")


def test_bart_large_counts(bart_large):
    """36 prefixes of 30 x 1024 keys and values + 24 parallel adapters of r = 512 (He et al.'s XSum setting)."""
    peft = unipeft.attach(bart_large, _he_et_al_seq2seq(bias=False))
    summary = peft.summary()
    assert sorted({r.site.position for r in peft.records["default"]}) == ["attn", "ffn", "xattn"]
    assert summary.per_form == {"Prefix": 36 * 2 * 30 * 1024, "Bottleneck": 24 * 2 * 1024 * 512}
    assert summary.per_adapter["default"] == 27_377_664
    assert summary.training_only > 0  # the reparameterising MLP, not saved
    assert summary.trainable == 27_377_664 + summary.training_only
    peft.detach()

    peft = unipeft.attach(bart_large, _he_et_al_seq2seq())  # with the adapters' biases
    assert peft.summary().per_adapter["default"] == 27_414_528
    peft.detach()

    peft = unipeft.attach(bart_large, _he_et_al_seq2seq(bias=False, reparam=None))  # nothing training-only
    assert peft.summary().trainable == peft.summary().per_adapter["default"] == 27_377_664
    peft.detach()


def test_roberta_base_glue_counts():
    """He et al.'s GLUE setting: prefix l = 16 + scaled PA r = 16 at each of RoBERTa-base's 12 layers."""
    model = build_meta_model(known_config("roberta-base"), "classification")
    peft = unipeft.attach(model, "mam_glue", bias=False)
    assert peft.summary().per_adapter["default"] == 589_824
    peft.detach()
    peft = unipeft.attach(model, "mam_glue")
    assert peft.summary().per_adapter["default"] == 599_232
    peft.detach()
    peft = unipeft.attach(model, "mam_glue", reparam=None)
    assert peft.summary().trainable == 599_232


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_he_et_al_placement_generates_the_same_with_and_without_a_cache(tiny, family):
    model = tiny.model(family)
    unipeft.attach(model, _he_et_al_seq2seq(length=3, size=8, reparam=16))
    ids = tiny.batch(family)["input_ids"]
    runs = []
    for use_cache in (True, False):
        with torch.no_grad():
            runs.append(model.generate(input_ids=ids, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                                       use_cache=use_cache))
    assert torch.equal(runs[0], runs[1])
