"""The design space (unipeft.inspection.design_space): He et al.'s Table 1 rows as design points, recipes from points,
and the table in docs/design-space.md."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import unipeft
from unipeft.core.compose import Gated
from unipeft.inspection.design_space import ROWS, TABLE_1, DesignPoint, Method, method, table_markdown, to_recipe
from unipeft.core.recipe import Recipe, load_recipe

DOC = Path(__file__).resolve().parents[2] / "docs" / "design-space.md"


def _point(delta):
    return delta.form, delta.positions, delta.resolved_insertion, delta.composition, delta.scale


def test_table_has_he_et_al_rows_and_mam():
    assert [row.name for row in TABLE_1] == ["Prefix tuning", "Adapter", "LoRA", "Parallel adapter",
                                            "Multi-head PA", "Scaled PA", "MAM adapter"]


@pytest.mark.parametrize("row", TABLE_1, ids=lambda r: r.name)
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_every_row_attaches_and_trains(tiny, row, family):
    model = tiny.model(family)
    peft = unipeft.attach(model, row.to_recipe())
    assert len(peft.recipes["default"].deltas) == len(row.points)
    loss = tiny.loss(model, tiny.batch(family))
    loss.backward()
    assert any(p.grad is not None for p in peft.trainable_parameters())


@pytest.mark.parametrize("row, dimensions", [
    ("Prefix tuning", [("prefix", ("attn",), "sequence", "add", 1.0)]),
    ("Adapter", [("bottleneck", ("attn", "ffn"), "sequential", "add", 1.0)]),
    ("LoRA", [("lora", ("attn.q", "attn.v"), "parallel", "add", 1.0)]),
    ("Parallel adapter", [("bottleneck", ("ffn",), "parallel", "add", 1.0)]),
    ("Multi-head PA", [("mh_adapter", ("attn",), "parallel", "add", 1.0)]),
    ("Scaled PA", [("bottleneck", ("ffn",), "parallel", "scaled", 4.0)]),
    ("MAM adapter", [("prefix", ("attn", "xattn?"), "sequence", "add", 1.0),
                     ("bottleneck", ("ffn",), "parallel", "scaled", 4.0)]),
])
def test_rows_sit_where_he_et_al_put_them(row, dimensions):
    """Each row is read from its shipped recipe; the recipe must be the paper's point along the four dimensions
    (functional form, modified representation, insertion, composition and its scale)."""
    built = method(row).to_recipe()
    assert [(d.form.type, d.positions, d.resolved_insertion, d.composition, d.scale) for d in built.deltas] == \
        dimensions
    recipe = dict((name, r) for name, r, _ in ROWS)[row]
    assert [_point(d) for d in built.deltas] == [_point(d) for d in load_recipe(recipe).deltas]


def test_a_new_point_gated_parallel_adapter_at_attn_o(tiny):
    point = DesignPoint(form={"type": "bottleneck", "size": 8}, positions=("attn.o",), insertion="parallel",
                        composition="gated")
    recipe = to_recipe(point, name="gated_pa_attn_o")
    assert isinstance(recipe, Recipe) and recipe.family == "unified"
    assert recipe == unipeft.Recipe.from_dict(recipe.to_dict())
    model = tiny.model("llama")
    batch = tiny.batch("llama")
    before = tiny.logits(model, batch)
    peft = unipeft.attach(model, recipe)
    sites = [r.site for r in peft.records["default"]]
    assert [s.position for s in sites] == ["attn.o", "attn.o"] and all(s.module.endswith("o_proj") for s in sites)
    assert all(isinstance(p.compose, Gated) for _, p in peft.delta_modules())
    torch.testing.assert_close(tiny.logits(model, batch), before, atol=1e-6, rtol=0)  # W_up = 0: identity at init


def test_points_and_methods_combine():
    prefix = method("Prefix tuning").points[0]
    recipe = to_recipe(method("LoRA"), prefix, name="lora_plus_prefix", family="hybrid")
    assert [d.form.type for d in recipe.deltas] == ["lora", "prefix"]
    row = Method(name="LoRA plus prefix", paper="", family="hybrid", points=(*method("LoRA").points, prefix))
    assert row.to_recipe().deltas == recipe.deltas


def test_describe_uses_he_et_al_columns():
    prefix = method("Prefix tuning").points[0].describe()
    assert prefix["functional form"] == "softmax(x W_q P_kᵀ) P_v"
    assert prefix["composition"] == "(1 − λ)h + λΔh"
    scaled = method("Scaled PA").points[0].describe()
    assert (scaled["insertion"], scaled["modified representation"], scaled["composition"]) == \
        ("parallel", "ffn", "h + 4·Δh")


@pytest.mark.parametrize("kwargs, message", [
    ({"form": {"type": "bottleneck"}, "positions": ("ffn",), "composition": "mixed"}, "unknown composition"),
    ({"form": {"type": "lora"}, "positions": ("attn.q",), "insertion": "sequence"}, "does not support insertion"),
    ({"form": {"type": "nope"}, "positions": ("ffn",)}, "unknown delta form"),
])
def test_invalid_points_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DesignPoint(**kwargs)


def test_to_recipe_needs_points_and_a_known_family():
    with pytest.raises(ValueError, match="at least one"):
        to_recipe()
    with pytest.raises(ValueError, match="unknown family"):
        to_recipe(method("LoRA"), family="magic")
    with pytest.raises(ValueError, match="TABLE_1 has"):
        method("BitFit")


def test_docs_show_the_same_table():
    assert table_markdown() in DOC.read_text(encoding="utf-8")
