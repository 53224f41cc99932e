"""Insertion forms and compositions, pinned against hand-written formulas on a single nn.Linear (unipeft.core.site,
unipeft.core.compose), and the adapter lifecycle of the handle around them (add, set_active, merge, remove)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import unipeft
from unipeft import Recipe
from unipeft.core.compose import build_composition
from unipeft.core.delta import SiteShape, form_config
from unipeft.core.site import DeltaSite, Placed

D_IN, D_OUT = 8, 6


class Net(nn.Module):
    """One linear layer, the smallest model a recipe can target (``modules: [proj]``)."""

    def __init__(self, d_in: int = D_IN, d_out: int = D_OUT) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def one_delta(form: dict, **spec) -> Recipe:
    """A recipe with a single delta on ``proj``."""
    return Recipe.from_dict({"name": "t", "family": "additive", "deltas": [{"form": form, "modules": ["proj"], **spec}]})


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    return Net()


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(2, 3, D_IN, generator=torch.Generator().manual_seed(1))


def fill(module: nn.Module, seed: int = 2) -> None:
    """Give every parameter of ``module`` random values (so no delta is at its identity init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def placed_of(peft: unipeft.Peft, name: str = "default") -> Placed:
    ((_, placed),) = list(peft.delta_modules(name))
    return placed


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


# ------------------------------------------------------------------------------------------------ insertions
def test_parallel(net, x):
    """h' = W x + b + (α/r)·B A x: the low-rank delta reads the module's input."""
    W, b = net.proj.weight.clone(), net.proj.bias.clone()
    peft = unipeft.attach(net, one_delta({"type": "lora", "r": 2, "alpha": 3.0}))
    form = placed_of(peft).form
    fill(form)
    expected = x @ W.T + b + 1.5 * (x @ form.lora_A.T @ form.lora_B.T)
    torch.testing.assert_close(run(net, x), expected)


def test_sequential(net, x):
    """h' = h + Δ(h): the adapter reads the module's output."""
    h = run(net, x)
    peft = unipeft.attach(net, one_delta({"type": "bottleneck", "size": 3, "activation": "tanh"},
                                         insertion="sequential"))
    form = placed_of(peft).form
    fill(form)
    assert form.down.in_features == D_OUT  # reads h, of the output width
    expected = h + F.linear(torch.tanh(F.linear(h, form.down.weight, form.down.bias)), form.up.weight, form.up.bias)
    torch.testing.assert_close(run(net, x), expected)


def test_parallel_bottleneck_reads_the_input(net, x):
    h = run(net, x)
    peft = unipeft.attach(net, one_delta({"type": "bottleneck", "size": 3}, insertion="parallel"))
    form = placed_of(peft).form
    fill(form)
    assert form.down.in_features == D_IN
    torch.testing.assert_close(run(net, x), h + form.up(torch.relu(form.down(x))))


def test_scaled_fixed(net, x):
    """h' = h + s·Δ(x) with s a fixed buffer (not trained, not saved)."""
    h = run(net, x)
    peft = unipeft.attach(net, one_delta({"type": "lora", "r": 2, "alpha": 2.0}, composition="scaled", scale=4.0))
    placed = placed_of(peft)
    fill(placed.form)
    torch.testing.assert_close(run(net, x), h + 4.0 * placed.form(x))
    assert not list(placed.compose.parameters())
    assert not any("scale" in k for k in peft.adapter_state_dict("default"))


def test_scaled_learned(net, x):
    """h' = h + s·Δ(x) with s a trained scalar, starting at ``scale``."""
    h = run(net, x)
    peft = unipeft.attach(net, one_delta({"type": "bottleneck", "size": 3}, insertion="parallel",
                                         composition="scaled", scale=4.0, learn_scale=True))
    placed = placed_of(peft)
    fill(placed.form)
    assert placed.compose.scale.requires_grad and placed.compose.scale.item() == 4.0
    with torch.no_grad():
        placed.compose.scale.fill_(2.5)
    torch.testing.assert_close(run(net, x), h + 2.5 * placed.form(x))
    net(x).sum().backward()
    assert placed.compose.scale.grad is not None and placed.compose.scale.grad.abs() > 0
    assert any(k.endswith("compose.scale") for k in peft.adapter_state_dict("default"))


def test_gated(net, x):
    """h' = h + σ(z W_g + b_g)·Δ(z), a per-token gate computed from the delta's input z (UniPELT)."""
    h = run(net, x)
    peft = unipeft.attach(net, one_delta({"type": "lora", "r": 2, "alpha": 2.0}, composition="gated"))
    placed = placed_of(peft)
    fill(placed.form)
    fill(placed.compose, seed=3)
    gate = torch.sigmoid(x @ placed.compose.gate.weight.T + placed.compose.gate.bias)  # (B, T, 1)
    assert gate.shape == (2, 3, 1)
    torch.testing.assert_close(run(net, x), h + gate * placed.form(x))


def test_gated_sequential_gates_on_the_output(net, x):
    h = run(net, x)
    peft = unipeft.attach(net, one_delta({"type": "bottleneck", "size": 3}, insertion="sequential",
                                         composition="gated"))
    placed = placed_of(peft)
    fill(placed.form)
    fill(placed.compose, seed=3)
    gate = torch.sigmoid(h @ placed.compose.gate.weight.T + placed.compose.gate.bias)
    torch.testing.assert_close(run(net, x), h + gate * placed.form(h))


def test_multiplicative(net, x):
    """h' = h ⊙ l with l over the output features ((IA)³ on keys and values)."""
    h = run(net, x)
    peft = unipeft.attach(net, one_delta({"type": "ia3"}, insertion="multiplicative"))
    l = placed_of(peft).form.ia3_l
    assert l.shape == (D_OUT,)
    fill(placed_of(peft).form)
    torch.testing.assert_close(run(net, x), h * l)


def test_multiplicative_input(net, x):
    """h' = f(x ⊙ l) with l over the input features ((IA)³ on the FFN's inner activation)."""
    W, b = net.proj.weight.clone(), net.proj.bias.clone()
    peft = unipeft.attach(net, one_delta({"type": "ia3"}, insertion="multiplicative_input"))
    l = placed_of(peft).form.ia3_l
    assert l.shape == (D_IN,)
    fill(placed_of(peft).form)
    torch.testing.assert_close(run(net, x), (x * l) @ W.T + b)


def test_replace_runs_a_trainable_copy(net, x):
    """h' = f'(x) with f' a copy of f; the base stays untouched and frozen; merge swaps the weights in."""
    base = net.proj
    original = base.weight.clone()
    peft = unipeft.attach(net, one_delta({"type": "copy"}, insertion="replace"))
    copy = placed_of(peft).form.module
    assert copy is not base and all(p.requires_grad for p in copy.parameters())
    assert not base.weight.requires_grad
    fill(copy)
    torch.testing.assert_close(run(net, x), F.linear(x, copy.weight, copy.bias))
    assert torch.equal(base.weight, original)
    adapted = run(net, x)
    peft.merge()
    assert torch.equal(run(net, x), adapted)
    peft.unmerge()
    assert torch.equal(base.weight, original) and torch.equal(run(net, x), adapted)
    peft.detach()
    assert net.proj is base and torch.equal(base.weight, original)


def test_a_running_copy_is_registered_once(net):
    """The running copy is not a second submodule of the site: its tensors appear once in the state dict (twice
    broke transformers' save_pretrained, which refuses unexplained shared tensors)."""
    peft = unipeft.attach(net, one_delta({"type": "copy"}, insertion="replace"))
    keys = [k for k in net.state_dict() if k.startswith("proj.")]
    assert sorted(keys) == ["proj.adapters.default.0.form.module.bias", "proj.adapters.default.0.form.module.weight",
                            "proj.base.bias", "proj.base.weight"]
    assert placed_of(peft) in dict(net.named_modules()).values()


# ------------------------------------------------------------------------------------------------ slices
def _slice_site(insertion: str, form: dict, out_slice: tuple[int, int], composition: str = "add"):
    torch.manual_seed(0)
    base = nn.Linear(4, 9)
    d_in, d_out = (4, out_slice[1] - out_slice[0])
    if insertion == "sequential":
        d_in = d_out
    built = form_config(form).build(SiteShape(d_in=d_in, d_out=d_out, base=base))
    placed = Placed(built, build_composition(composition, scale=3.0, learn_scale=False, d_in=d_in),
                    insertion=insertion, source="module", out_slice=out_slice)
    fill(built)
    site = DeltaSite(base)
    site.add("a", placed)
    site.set_active(["a"])
    return base, site, placed


def test_parallel_on_a_slice():
    base, site, placed = _slice_site("parallel", {"type": "lora", "r": 2}, (3, 6), composition="scaled")
    x = torch.randn(5, 4)
    h = base(x)
    expected = torch.cat([h[:, :3], h[:, 3:6] + 3.0 * placed.form(x), h[:, 6:]], dim=-1)
    torch.testing.assert_close(site(x), expected)


def test_sequential_on_a_slice():
    base, site, placed = _slice_site("sequential", {"type": "bottleneck", "size": 2}, (6, 9))
    x = torch.randn(5, 4)
    h = base(x)
    expected = torch.cat([h[:, :6], h[:, 6:] + placed.form(h[:, 6:])], dim=-1)
    torch.testing.assert_close(site(x), expected)


def test_multiplicative_on_a_slice():
    base, site, placed = _slice_site("multiplicative", {"type": "ia3"}, (0, 3))
    x = torch.randn(5, 4)
    h = base(x)
    expected = torch.cat([h[:, :3] * placed.form(), h[:, 3:]], dim=-1)
    torch.testing.assert_close(site(x), expected)


def test_merging_a_slice_touches_only_its_rows():
    base, site, placed = _slice_site("parallel", {"type": "lora", "r": 2}, (3, 6))
    x = torch.randn(5, 4)
    weight, bias = base.weight.clone(), base.bias.clone()
    adapted = site(x).detach()
    site.merge("a")
    torch.testing.assert_close(site(x), adapted)
    delta = base.weight - weight
    torch.testing.assert_close(delta[3:6], placed.form.delta_weight())
    assert torch.equal(delta[:3], torch.zeros(3, 4)) and torch.equal(delta[6:], torch.zeros(3, 4))
    assert torch.equal(base.bias, bias)
    site.unmerge("a")
    torch.testing.assert_close(base.weight, weight)


def test_gpt2_lora_on_q_and_v_slices_merges_into_the_conv1d(tiny, randomize):
    """GPT-2's c_attn is a Conv1D with an (in, out) weight; q and v are its first and last thirds of columns."""
    model = tiny.model("gpt2")
    batch = tiny.batch("gpt2")
    d = tiny.width
    c_attn = model.transformer.h[0].attn.c_attn
    weight, bias = c_attn.weight.clone(), c_attn.bias.clone()
    peft = unipeft.attach(model, "lora")
    randomize(peft)
    (q, v) = [p.form for m, p in peft.delta_modules() if m == "transformer.h.0.attn.c_attn"]
    adapted = tiny.logits(model, batch)
    peft.merge()
    torch.testing.assert_close(tiny.logits(model, batch), adapted, atol=1e-5, rtol=0)
    change = c_attn.weight - weight  # (in, 3d)
    torch.testing.assert_close(change[:, :d], q.delta_weight().T)
    assert torch.equal(change[:, d:2 * d], torch.zeros(d, d))
    torch.testing.assert_close(change[:, 2 * d:], v.delta_weight().T)
    assert torch.equal(c_attn.bias, bias)
    peft.unmerge()
    torch.testing.assert_close(c_attn.weight, weight, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------ several adapters
def test_several_active_adapters_sum_their_deltas(net, x):
    h = run(net, x)
    peft = unipeft.attach(net, one_delta({"type": "lora", "r": 2}), name="a")
    peft.add(one_delta({"type": "bottleneck", "size": 3}, insertion="parallel"), name="b")
    fill(placed_of(peft, "a").form, seed=4)
    fill(placed_of(peft, "b").form, seed=5)
    da, db = placed_of(peft, "a").form(x), placed_of(peft, "b").form(x)
    assert peft.active == ["a"]  # add() does not activate
    torch.testing.assert_close(run(net, x), h + da)
    peft.set_active("a", "b")
    torch.testing.assert_close(run(net, x), h + da + db)
    peft.set_active("b")
    torch.testing.assert_close(run(net, x), h + db)
    peft.set_active()
    assert torch.equal(run(net, x), h)
    assert not peft.trainable_parameters()


def test_active_adapters_run_in_order(net, x):
    """A sequential delta after a parallel one reads the already-modified h."""
    h = run(net, x)
    peft = unipeft.attach(net, one_delta({"type": "lora", "r": 2}), name="a")
    peft.add(one_delta({"type": "bottleneck", "size": 3}, insertion="sequential"), name="b")
    fill(placed_of(peft, "a").form, seed=4)
    fill(placed_of(peft, "b").form, seed=5)
    peft.set_active("a", "b")
    h1 = h + placed_of(peft, "a").form(x)
    torch.testing.assert_close(run(net, x), h1 + placed_of(peft, "b").form(h1))


def test_only_active_adapters_train(net):
    peft = unipeft.attach(net, one_delta({"type": "lora", "r": 2}), name="a")
    peft.add(one_delta({"type": "lora", "r": 3}), name="b")
    a, b = placed_of(peft, "a"), placed_of(peft, "b")
    assert all(p.requires_grad for p in a.parameters()) and not any(p.requires_grad for p in b.parameters())
    peft.set_active("b")
    assert not any(p.requires_grad for p in a.parameters()) and all(p.requires_grad for p in b.parameters())
    with pytest.raises(ValueError, match="unknown adapter 'c'; existing adapters: a, b"):
        peft.set_active("c")


def test_remove(net, x):
    base = net.proj
    h = run(net, x)
    peft = unipeft.attach(net, one_delta({"type": "lora", "r": 2}), name="a")
    peft.add(one_delta({"type": "lora", "r": 2}), name="b")
    fill(placed_of(peft, "a").form, seed=4)
    fill(placed_of(peft, "b").form, seed=5)
    peft.set_active("a", "b")
    db = placed_of(peft, "b").form(x)
    peft.merge("a")
    peft.remove("a")  # unmerges first
    assert list(peft.recipes) == ["b"] and peft.active == ["b"]
    assert isinstance(net.proj, DeltaSite)
    torch.testing.assert_close(run(net, x), h + db)
    peft.remove("b")
    assert net.proj is base  # the last adapter gone: the original module is back
    torch.testing.assert_close(run(net, x), h)
    with pytest.raises(ValueError, match="unknown adapter 'b'; existing adapters: \\(none\\)"):
        peft.remove("b")


def test_merge_runs_the_delta_once(net, x):
    peft = unipeft.attach(net, one_delta({"type": "lora", "r": 2}))
    fill(placed_of(peft).form)
    adapted = run(net, x)
    peft.merge()
    assert peft.merged == ["default"]
    torch.testing.assert_close(run(net, x), adapted)
    peft.merge()  # merging twice is a no-op
    torch.testing.assert_close(run(net, x), adapted)
    peft.set_active("default")
    torch.testing.assert_close(run(net, x), adapted)
    peft.unmerge()
    torch.testing.assert_close(run(net, x), adapted)


def test_non_mergeable_placements_refuse(net):
    for spec in ({"form": {"type": "bottleneck", "size": 2}, "insertion": "sequential"},
                 {"form": {"type": "lora", "r": 2}, "composition": "gated"}):
        model = Net()
        peft = unipeft.attach(model, one_delta(**spec))
        weight = model.proj.base.weight.clone()
        with pytest.raises(NotImplementedError, match="adapter 'default' cannot be merged"):
            peft.merge()
        assert torch.equal(model.proj.base.weight, weight) and peft.merged == []


def test_names_and_handles(net):
    peft = unipeft.attach(net, one_delta({"type": "lora", "r": 2}))
    assert unipeft.handle(net) is peft
    with pytest.raises(ValueError, match="adapter 'default' already exists"):
        peft.add(one_delta({"type": "lora", "r": 2}))
    with pytest.raises(ValueError, match="invalid adapter name 'a b'"):
        peft.add(one_delta({"type": "lora", "r": 2}), name="a b")
    assert unipeft.attach(net, one_delta({"type": "ia3"}, insertion="multiplicative"), name="x") is peft
    assert peft.active == ["x"]
    with pytest.raises(ValueError, match="already has unipeft adapters"):
        unipeft.Peft(net)


def test_a_failed_first_attach_leaves_the_model_unchanged(tiny):
    model = tiny.model("bert")
    with pytest.raises(ValueError, match="unknown position 'attn.qq'"):
        unipeft.attach(model, "lora", positions=["attn.qq"])
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="no unipeft adapters"):
        unipeft.handle(model)
    # a failed add on an existing handle leaves the existing adapter as it was
    peft = unipeft.attach(model, "lora")
    with pytest.raises(ValueError, match="unknown position"):
        unipeft.attach(model, "lora", name="second", positions=["attn.qq"])
    assert list(peft.recipes) == ["default"] and peft.active == ["default"]


def test_site_exposes_the_base_weight(net):
    unipeft.attach(net, one_delta({"type": "lora", "r": 2}))
    assert isinstance(net.proj, DeltaSite)
    assert net.proj.weight is net.proj.base.weight and net.proj.bias is net.proj.base.bias


def test_embedding_site_and_gated_composition_need_an_input_dimension():
    with pytest.raises(ValueError, match="composition 'gated' needs a site with an input dimension"):
        build_composition("gated", scale=1.0, learn_scale=False, d_in=None)
    with pytest.raises(ValueError, match="unknown composition 'mul'"):
        build_composition("mul", scale=1.0, learn_scale=False, d_in=3)
    with pytest.raises(ValueError, match="unknown insertion 'diagonal'"):
        Placed(nn.Identity(), nn.Identity(), insertion="diagonal", source="module", out_slice=None)  # type: ignore


def test_a_detached_model_can_be_adapted_again(tiny):
    model = tiny.model("llama")
    first = unipeft.attach(model, "lora")
    first.detach()
    second = unipeft.attach(model, "houlsby")
    assert second is not first and unipeft.handle(model) is second
    assert list(second.recipes) == ["default"] and second.summary().trainable > 0


def test_a_learned_scale_merges_with_its_current_value(net, x):
    """h + s·(α/r)BAx is linear in W whether s is fixed or learned; mergeability must not depend on which adapter
    happens to be active (it once did, through the scale's requires_grad flag)."""
    peft = unipeft.attach(net, one_delta({"type": "lora", "r": 2}, composition="scaled", scale=2.0, learn_scale=True))
    placed = placed_of(peft)
    fill(placed.form)
    with torch.no_grad():
        placed.compose.scale.fill_(3.0)
    adapted = run(net, x)
    weight = net.proj.base.weight.clone()
    peft.merge()
    torch.testing.assert_close(net.proj.base.weight, weight + 3.0 * placed.form.delta_weight())
    torch.testing.assert_close(run(net, x), adapted)
    peft.unmerge()
    torch.testing.assert_close(net.proj.base.weight, weight)


def test_replace_copies_a_module_of_any_kind():
    """A trainable copy needs no feature widths: RoBERTa's classification head is a dense-tanh-dense block."""
    import transformers

    config = transformers.RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=64, max_position_embeddings=64, num_labels=3,
                                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=1)
    torch.manual_seed(0)
    model = transformers.RobertaForSequenceClassification(config).eval()
    head = model.classifier
    ids = torch.randint(3, 100, (2, 6))
    before = run(model, ids).logits
    recipe = Recipe.from_dict({"name": "head", "family": "selective",
                               "deltas": [{"form": {"type": "copy"}, "positions": ["head"], "insertion": "replace"}]})
    peft = unipeft.attach(model, recipe)
    (placed,) = [p for _, p in peft.delta_modules()]
    assert type(placed.form.module) is type(head) and placed.form.module is not head
    assert peft.summary().trainable == sum(p.numel() for p in head.parameters())
    assert torch.equal(run(model, ids).logits, before)
    peft.detach()
    assert model.classifier is head
