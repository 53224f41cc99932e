"""The search space (unipeft.search.space): parsing, and errors that name the bad value and the valid choices."""

from __future__ import annotations

import pytest

from unipeft.search.space import SEARCHABLE_FORMS, space_from_dict


def test_a_space_parses_with_per_form_overrides():
    space = space_from_dict({
        "forms": {"lora": {"r": [2, 8], "lr": [1e-3, "2e-3"]},
                  "bottleneck": {"size": 8, "positions": [["ffn"]], "insertions": ["parallel"]}},
        "positions": [["attn.q", "attn.v"], "ffn"], "layers": [None, [1]], "compositions": ["add", "scaled"],
        "scales": [4.0], "recipes": {"lora": 2e-3}})
    lora, adapter = space.form("lora"), space.form("bottleneck")
    assert lora.options == (("r", (2, 8)),) and lora.lrs == (1e-3, 2e-3)
    assert lora.positions == (("attn.q", "attn.v"), ("ffn",)) and lora.layers == (None, (1,))
    assert lora.insertions == ("parallel",)  # the space-wide default: every insertion the form supports
    assert adapter.positions == (("ffn",),) and adapter.options == (("size", (8,)),)
    assert adapter.insertions == ("parallel",) and adapter.compositions == ("add", "scaled")
    assert space.points == ("form:lora", "form:bottleneck", "recipe:lora") and space.recipe_lr("lora") == 2e-3


def test_insertions_are_kept_per_form():
    space = space_from_dict({"forms": {"lora": None, "ia3": None, "bottleneck": None}, "positions": [["ffn"]],
                             "insertions": ["parallel", "multiplicative"]})
    assert space.form("lora").insertions == ("parallel",)
    assert space.form("ia3").insertions == ("multiplicative",)
    assert space.form("bottleneck").insertions == ("parallel",)


@pytest.mark.parametrize("data, match", [
    ({"forms": {"prefix": {}}, "positions": [["attn"]]}, r"unknown or unsearchable form 'prefix'; valid: .*lora"),
    ({"forms": {"lora": {"rank": [4]}}, "positions": [["attn.q"]]}, r"unknown key\(s\) rank; valid: r, alpha"),
    ({"forms": {"lora": {"r": [0]}}, "positions": [["attn.q"]]}, r"space.forms.lora.r: bad choice 0"),
    ({"forms": {"lora": {"dropout": [0.1]}}, "positions": [["attn.q"]]}, r"dropout: must be 0"),
    ({"forms": {"lora": {}}}, r"space.forms.lora: no positions"),
    ({"forms": {"lora": {}}, "positions": [[]]}, r"each choice is a list of positions"),
    ({"forms": {"lora": {}}, "positions": [["attn.q"]], "layers": ["top"]}, r"null \(every layer\) or a list"),
    ({"forms": {"lora": {}}, "positions": [["attn.q"]], "compositions": ["gated"]},
     r"unknown value 'gated'; valid: add, scaled"),
    ({"forms": {"lora": {}}, "positions": [["attn.q"]], "insertions": ["sideways"]}, r"unknown value 'sideways'"),
    ({"forms": {"lora": {}}, "positions": [["attn.q"]], "insertions": ["sequential"]},
     r"none of the insertions \['sequential'\] is supported by form 'lora'; it supports: parallel"),
    ({"forms": {"lora": {"lr": [-1]}}, "positions": [["attn.q"]]}, r"choices must be > 0"),
    ({"recipes": ["lorra"]}, r"unknown recipe 'lorra'; shipped recipes: .*lora"),
    ({"recipes": ["mam"]}, r"recipe 'mam' uses prefix .* searchable forms"),
    ({"recipes": ["prefix"]}, r"recipe 'prefix' uses prefix"),
    ({}, r"the search space is empty"),
    ({"form": {}}, r"space: unknown key\(s\) form; valid: forms"),
])
def test_bad_spaces_name_the_value_and_the_choices(data, match):
    with pytest.raises(ValueError, match=match):
        space_from_dict(data)


def test_searchable_forms_are_the_mixed_batch_forms_that_multi_job_training_runs():
    assert {"lora", "dora", "vera", "ia3", "bias", "ssf", "bottleneck"} <= set(SEARCHABLE_FORMS)
    assert "adalora" not in SEARCHABLE_FORMS and "prefix" not in SEARCHABLE_FORMS
