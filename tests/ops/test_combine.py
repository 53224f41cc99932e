"""Combining adapters into a new LoRA (unipeft.ops.combine): hand-worked 2×2 cases for each formula, exactness of
``cat`` (and full-rank ``svd``) against the weighted sum of deltas added to the weights by hand, round trips, seeds,
refusals, and the real MiniLM."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import unipeft
from unipeft.core.recipe import DeltaSpec, Recipe
from unipeft.methods.lora import LoRAConfig

S2 = math.sqrt(2.0)


def _recipe(*deltas: DeltaSpec) -> Recipe:
    return Recipe(name="test", family="reparameterized", deltas=deltas)


@pytest.fixture
def pair() -> unipeft.Peft:
    """A bias-free 2×2 linear layer with two rank-1 LoRAs: a = 1·[3, 0]ᵀ[1, 0] (α/r = 1), b = 2·[0, 1]ᵀ[0, 1] (α/r = 2),
    so ΔW_a = diag(3, 0) and ΔW_b = diag(0, 2)."""
    model = nn.Sequential(nn.Linear(2, 2, bias=False))
    peft = unipeft.attach(model, _recipe(DeltaSpec(form=LoRAConfig(r=1, alpha=1.0), modules=["0"])), name="a")
    peft.add(_recipe(DeltaSpec(form=LoRAConfig(r=1, alpha=2.0), modules=["0"])), "b")
    with torch.no_grad():
        for name, a, b in (("a", [[1.0, 0.0]], [[3.0], [0.0]]), ("b", [[0.0, 1.0]], [[0.0], [1.0]])):
            (_, placed), = peft.delta_modules(name)
            placed.form.lora_A.copy_(torch.tensor(a))
            placed.form.lora_B.copy_(torch.tensor(b))
    return peft


def delta(peft: unipeft.Peft, name: str) -> torch.Tensor:
    (_, placed), = peft.delta_modules(name)
    return placed.form.delta_weight().detach()


@pytest.mark.parametrize("method, weights, options, expected", [
    ("cat", [1, 1], {}, [[3, 0], [0, 2]]),  # exact: ΔW_a + ΔW_b
    ("cat", [2, -1], {}, [[6, 0], [0, -2]]),
    ("cat", None, {}, [[1.5, 0], [0, 1]]),  # the average
    # c = (1, 2): A = A_a + √2 A_b = [1, √2], B = B_a + √2 B_b = [3, √2]ᵀ; B A has the cross terms
    ("linear", [1, 1], {}, [[3, 3 * S2], [S2, 2]]),
    ("linear", [-1, 0], {}, [[-3, 0], [0, 0]]),  # the sign goes on A only: -ΔW_a
    ("ties", [1, 1], {"density": 1.0}, [[3, 3 * S2], [S2, 2]]),  # disjoint supports: TIES = linear here
    ("dare_linear", [1, 1], {"density": 1.0}, [[3, 3 * S2], [S2, 2]]),
    ("svd", [1, 1], {"svd_rank": 1}, [[3, 0], [0, 0]]),  # best rank-1 approximation of diag(3, 2)
    ("svd", [1, 1], {}, [[3, 0], [0, 0]]),  # default rank: the largest input rank, 1
    ("svd", [1, 1], {"svd_rank": 2}, [[3, 0], [0, 2]]),
    ("svd", [1, 2], {"svd_rank": 1}, [[0, 0], [0, 4]]),  # diag(3, 4) → keeps the 4
    ("ties_svd", [1, 1], {"density": 0.5, "svd_rank": 2}, [[3, 0], [0, 2]]),  # trimming keeps each diagonal entry
])
def test_hand_cases(pair, method, weights, options, expected):
    pair.combine(["a", "b"], weights, method=method, new_name="m", **options)
    assert torch.allclose(delta(pair, "m"), torch.tensor(expected, dtype=torch.float32), atol=1e-6)
    x = torch.tensor([[1.0, -2.0]])
    pair.set_active("m")
    base = pair.model[0].base.weight.detach()
    assert torch.allclose(pair.model(x), x @ (base + torch.tensor(expected)).T, atol=1e-5)
    info = {i.name: i for i in pair.adapters()}["m"]
    assert info.method == f"combined-{method}" and info.forms == ("lora",)


# ------------------------------------------------------------------------------------------- on a transformer
def _by_hand(base: nn.Module, peft: unipeft.Peft, weights: dict[str, float]) -> nn.Module:
    """A copy of ``base`` with Σ_a w_a·s·ΔW_a added to each adapted weight."""
    model = copy.deepcopy(base)
    with torch.no_grad():
        for name, w in weights.items():
            for module, placed in peft.delta_modules(name):
                scale = float(getattr(placed.compose, "scale", 1.0))
                model.get_submodule(module).weight += w * scale * placed.form.delta_weight()
    return model


@pytest.fixture
def mixed(tiny, randomize):
    """(base, handle): the tiny LLaMA with LoRA 'a' (r=8 at attn.q, attn.v) and an rsLoRA 'b' (r=4 at attn.v and
    ffn.up, composition scaled by 0.5): different ranks, scalings and sites."""
    base = tiny.model("llama")
    peft = unipeft.attach(copy.deepcopy(base), "lora", name="a")
    peft.add(_recipe(DeltaSpec(form=LoRAConfig(r=4, alpha=8.0, rslora=True), positions=("attn.v", "ffn.up"),
                               composition="scaled", scale=0.5)), "b")
    randomize(peft, "a", seed=1)
    randomize(peft, "b", seed=2)
    return base, peft


@pytest.mark.parametrize("method, options", [("cat", {}), ("svd", {"svd_rank": 12})])
def test_exact_weighted_sum(mixed, tiny, tmp_path, method, options):
    base, peft = mixed
    batch = tiny.batch("llama")
    peft.combine(["a", "b"], [0.5, -1.5], method=method, new_name="m", **options)
    assert peft.active == ["a"] and "m" in peft.recipes  # added inactive
    peft.set_active("m")
    expected = tiny.logits(_by_hand(base, peft, {"a": 0.5, "b": -1.5}), batch)
    got = tiny.logits(peft.model, batch)
    assert torch.allclose(got, expected, atol=1e-5)
    sites = sorted(r.site.module for r in peft.records["m"])  # the union of both adapters' sites
    assert sites == sorted({r.site.module for n in ("a", "b") for r in peft.records[n]})
    fresh = unipeft.load_adapter(tiny.model("llama"), peft.save(str(tmp_path / "m"), "m"))
    assert torch.allclose(tiny.logits(fresh.model, batch), got, atol=1e-6)


def test_dare_seeds_and_statistics(tiny, randomize):
    peft = unipeft.attach(tiny.model("llama"), "lora", name="a")
    peft.add("lora", "b")
    randomize(peft, std=1.0)
    for name, seed in (("s1", 5), ("s1b", 5), ("s2", 6)):
        peft.combine(["a", "b"], [1.0, 1.0], method="dare_linear", density=0.3, seed=seed, new_name=name)
    a = {n: torch.cat([p.form.lora_A.flatten() for _, p in peft.delta_modules(n)]) for n in ("s1", "s1b", "s2")}
    assert torch.equal(a["s1"], a["s1b"]) and not torch.equal(a["s1"], a["s2"])
    zeros = (a["s1"] == 0).float().mean().item()  # an entry is 0 iff both adapters dropped it: (1 - ρ)² = 0.49
    assert abs(zeros - 0.49) < 0.05, zeros
    peft.combine(["a", "b"], [1.0, 0.5], method="dare_ties", density=1.0, new_name="d1")
    peft.combine(["a", "b"], [1.0, 0.5], method="ties", density=1.0, new_name="t1")
    assert all(torch.equal(x.form.delta_weight(), y.form.delta_weight())
               for (_, x), (_, y) in zip(peft.delta_modules("d1"), peft.delta_modules("t1")))


def test_other_forms_combine_by_svd_only(tiny, randomize):
    base = tiny.model("llama")
    peft = unipeft.attach(copy.deepcopy(base), "loha", name="h")
    peft.add("lora", "l")
    randomize(peft)
    with pytest.raises(ValueError, match=r"cannot combine adapter 'h' with method 'cat': its LoHa at "
                                         r"model\.layers\.0\.self_attn\.q_proj has no low-rank factors A, B .*; factor methods"):
        peft.combine(["h", "l"], method="cat")
    batch = tiny.batch("llama")
    # rank 32 ≥ min(d_out, d_in) at every site: the truncated SVD reproduces h + 2·l exactly
    peft.combine(["h", "l"], [1.0, 2.0], method="svd", svd_rank=32, new_name="full")
    peft.set_active("full")
    expected = tiny.logits(_by_hand(base, peft, {"h": 1.0, "l": 2.0}), batch)
    assert torch.allclose(tiny.logits(peft.model, batch), expected, atol=1e-5)


@pytest.mark.parametrize("recipe, method, options, message", [
    ("ia3", "svd", {}, r"its IA3 at .* is inserted 'multiplicative'.*; factor methods .* svd and the \*_svd"),
    ("pissa", "cat", {}, r"its LoRA at .* rewrites the base weight \(PiSSA/OLoRA init\)"),
    ("lora", "ties", {}, r"method 'ties' needs a density in \(0, 1\]"),
    ("lora", "dare_linear", {"density": 0.0}, r"density must be in \(0, 1\], got 0.0"),
    ("lora", "mean", {}, r"unknown combination method 'mean'; valid: linear, cat, ties"),
    ("lora", "cat", {"svd_rank": 4}, r"svd_rank and svd_clamp apply to the SVD methods"),
    ("lora", "svd", {"density": 0.5}, r"density applies to ties, dare_linear, .*, not to 'svd'"),
    ("lora", "ties", {"density": 0.5, "majority_sign": "max"}, r"unknown majority_sign 'max'; valid: total, frequency"),
])
def test_refusals(tiny, recipe, method, options, message):
    peft = unipeft.attach(tiny.model("llama"), recipe, name="x")
    peft.add("lora", "y")
    with pytest.raises(ValueError, match=message):
        peft.combine(["x", "y"], method=method, **options)
    assert list(peft.recipes) == ["x", "y"]  # nothing was added


def test_argument_errors(tiny):
    peft = unipeft.attach(tiny.model("llama"), "lora", name="x")
    peft.add("lora", "y", r=4)
    with pytest.raises(ValueError, match=r"needs equal LoRA ranks at each site; at model\.layers\.0\.self_attn\.q_proj "
                                         r"adapters \['x', 'y'\] have ranks \[8, 4\]"):
        peft.combine(["x", "y"], method="linear")
    with pytest.raises(ValueError, match=r"distinct existing ones, got \['x', 'z'\]; existing adapters: x, y"):
        peft.combine(["x", "z"])
    with pytest.raises(ValueError, match="got 1 weights for 2 adapters"):
        peft.combine(["x", "y"], [1.0])
    with pytest.raises(ValueError, match="adapter 'y' already exists"):
        peft.combine(["x", "y"], new_name="y")
    assert list(peft.recipes) == ["x", "y"]


def test_minilm_cat_equals_the_weighted_sum(minilm_folder):
    """The real all-MiniLM-L6-v2: a combined ``cat`` adapter computes the same hidden states as the base with
    0.7·ΔW_a + 0.3·ΔW_b added to its weights."""
    from transformers import AutoModel, AutoTokenizer

    base = AutoModel.from_pretrained(minilm_folder).eval()
    batch = dict(AutoTokenizer.from_pretrained(minilm_folder)(["a gripping, beautifully acted film"],
                                                              return_tensors="pt"))
    peft = unipeft.attach(copy.deepcopy(base), "lora", name="a")
    peft.add("lora", "b", r=4, positions=["attn.v", "ffn.up"])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, placed in peft.delta_modules():
            placed.form.lora_B.normal_(0.0, 0.05, generator=g)
    peft.combine(["a", "b"], [0.7, 0.3], method="cat", new_name="ab")
    peft.set_active("ab")
    with torch.no_grad():
        got = peft.model(**batch).last_hidden_state
        expected = _by_hand(base, peft, {"a": 0.7, "b": 0.3})(**batch).last_hidden_state
        plain = base(**batch).last_hidden_state
    assert (got - plain).abs().max() > 1e-2  # the adapters do change the outputs
    assert torch.allclose(got, expected, atol=1e-4)


# ------------------------------------------------------------------------------------------- module copies
@pytest.fixture
def heads(tiny, randomize):
    """(base, handle): the tiny BERT classifier with two adapters as ``unipeft train`` makes them: LoRA plus a
    trainable copy of the classification head, each trained (randomised) differently."""
    from unipeft.core.recipe import load_recipe
    from unipeft.train.loop import with_head

    base = tiny.model("bert")
    recipe = with_head(load_recipe("lora"), "classification")
    peft = unipeft.attach(copy.deepcopy(base), recipe, name="a")
    peft.add(recipe, "b")
    randomize(peft, "a", seed=1)
    randomize(peft, "b", seed=2)
    return base, peft


def _head(peft: unipeft.Peft, name: str) -> dict[str, torch.Tensor]:
    from unipeft.methods.module_copy import ModuleCopy

    (form,) = [p.form for _, p in peft.delta_modules(name) if isinstance(p.form, ModuleCopy)]
    return {k: v.detach().clone() for k, v in form.module.state_dict().items()}


def test_adapters_with_head_copies_are_refused_by_default_naming_the_choices(heads):
    _, peft = heads
    with pytest.raises(ValueError) as err:
        peft.combine(["a", "b"], method="cat")
    assert all(w in str(err.value) for w in ("module copies", "classifier", "'average'", "'first'"))
    with pytest.raises(ValueError, match="copies must be one of refuse, average, first or one of the adapters"):
        peft.combine(["a", "b"], method="cat", copies="mean")


@pytest.mark.parametrize("copies", ["average", "first", "b"])
def test_adapters_with_head_copies_combine_deltas_and_choose_the_head(heads, tiny, tmp_path, copies):
    base, peft = heads
    batch = tiny.batch("bert")
    weights = {"a": 0.75, "b": 0.25}
    want_head = {"average": {k: 0.75 * v + 0.25 * _head(peft, "b")[k] for k, v in _head(peft, "a").items()},
                 "first": _head(peft, "a"), "b": _head(peft, "b")}[copies]
    reference = _by_hand(base, _without_copies(peft), weights)  # the deltas summed into the weights by hand
    with torch.no_grad():
        for key, value in want_head.items():
            reference.get_submodule("classifier").state_dict()[key].copy_(value)
    peft.combine(["a", "b"], list(weights.values()), method="cat", new_name="m", copies=copies)
    for key, value in _head(peft, "m").items():
        torch.testing.assert_close(value, want_head[key], rtol=0, atol=1e-7)
    peft.set_active("m")
    torch.testing.assert_close(tiny.logits(peft.model, batch), tiny.logits(reference, batch), rtol=0, atol=1e-5)
    folder = peft.save(str(tmp_path / "m"), "m")
    again = unipeft.load_adapter(copy.deepcopy(base), folder)
    torch.testing.assert_close(tiny.logits(again.model, batch), tiny.logits(reference, batch), rtol=0, atol=1e-5)


def _without_copies(peft: unipeft.Peft):
    """A view of ``peft`` whose delta_modules leave the head copies out (for :func:`_by_hand`)."""
    from unipeft.methods.module_copy import ModuleCopy

    class View:
        def delta_modules(self, name):
            return [(m, p) for m, p in peft.delta_modules(name) if not isinstance(p.form, ModuleCopy)]

    return View()


def test_average_of_copies_needs_positive_weights(heads):
    _, peft = heads
    with pytest.raises(ValueError, match="sum to 0 over a, b"):
        peft.combine(["a", "b"], [1.0, -1.0], method="cat", copies="average")
    peft.combine(["a", "b"], [1.0, -1.0], method="cat", copies="a", new_name="diff")  # task negation, a's head


@pytest.mark.parametrize("other", ["adalora", "vera"])
def test_low_rank_forms_combine_by_the_factor_methods(tiny, randomize, other):
    """AdaLoRA (P·diag(E)·Q) and VeRA ((diag(b)B)(diag(d)A)) give their Δ as LowRank factors, so ``cat`` combines
    them with LoRA exactly, by the same code."""
    base = tiny.model("llama")
    peft = unipeft.attach(copy.deepcopy(base), other, name="o")
    peft.add("lora", "l")
    randomize(peft)
    batch = tiny.batch("llama")
    peft.combine(["o", "l"], [0.5, 2.0], method="cat", new_name="m")
    peft.set_active("m")
    expected = tiny.logits(_by_hand(base, peft, {"o": 0.5, "l": 2.0}), batch)
    torch.testing.assert_close(tiny.logits(peft.model, batch), expected, atol=1e-5, rtol=0)
