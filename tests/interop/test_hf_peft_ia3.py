"""(IA)³ between HF peft's file format and unipeft, checked against HF peft itself."""

from __future__ import annotations

import pytest

from unipeft.core.recipe import DeltaSpec, Recipe
from unipeft.methods.ia3 import IA3Config

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("family, config", [
    ("bert", dict(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"])),
    ("llama", dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])),
    ("llama", dict(target_modules=r".*\.(k_proj|down_proj)", feedforward_modules=r".*down_proj",
                   modules_to_save=["lm_head"])),
    ("gpt2", dict(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"], fan_in_fan_out=True)),
    pytest.param("t5", dict(target_modules=["k", "v", "wo"], feedforward_modules=["wo"]), marks=pytest.mark.slow),
])
def test_hf_ia3_loads_with_the_same_outputs(hf_check, tiny, family, config):
    diff, handle = hf_check.hf_to_unipeft(tiny.model(family), peft.IA3Config(**config), tiny.batch(family))
    assert diff <= hf_check.tol
    insertions = {spec.resolved_insertion for spec in handle.recipes["default"].deltas if spec.form.type == "ia3"}
    assert insertions == {"multiplicative", "multiplicative_input"}


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2", pytest.param("t5", marks=pytest.mark.slow)])
def test_builtin_ia3_saves_for_hf_with_the_same_outputs(hf_check, tiny, family):
    diff, config = hf_check.unipeft_to_hf(tiny.model(family), "ia3", tiny.batch(family))
    assert diff <= hf_check.tol
    assert config["peft_type"] == "IA3" and config["feedforward_modules"]


def test_gpt2_key_and_value_slices_multiply_into_one_c_attn_vector(hf_check, tiny):
    recipe = Recipe(name="kv", family="additive", deltas=(
        DeltaSpec(form=IA3Config(), positions=("attn.k",), insertion="multiplicative"),
        DeltaSpec(form=IA3Config(), positions=("attn.v",), insertion="multiplicative"),
    ))
    diff, config = hf_check.unipeft_to_hf(tiny.model("gpt2"), recipe, tiny.batch("gpt2"))
    assert diff <= hf_check.tol
    assert config["target_modules"] == ["c_attn"] and config["feedforward_modules"] == []
