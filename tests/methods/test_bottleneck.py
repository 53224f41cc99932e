"""Bottleneck adapters (unipeft.methods.bottleneck): Houlsby, Pfeiffer, the (scaled) parallel adapter of He et al.

    Δh = f(z W_down + b_down) W_up + b_up
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import unipeft
from unipeft.core.delta import SiteShape
from unipeft.core.site import DeltaSite
from unipeft.methods.bottleneck import Bottleneck, BottleneckConfig


def build(config: BottleneckConfig, d: int = 32) -> Bottleneck:
    return config.build(SiteShape(d_in=d, d_out=d, base=nn.Linear(d, d)))


@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh", "silu", "identity"])
def test_formula(activation):
    torch.manual_seed(0)
    adapter = build(BottleneckConfig(size=5, activation=activation, init="bert"))
    with torch.no_grad():
        adapter.down.bias.normal_()
        adapter.up.bias.normal_()
    f = {"relu": torch.relu, "gelu": nn.functional.gelu, "tanh": torch.tanh, "silu": nn.functional.silu,
         "identity": lambda t: t}[activation]
    z = torch.randn(2, 4, 32)
    expected = f(z @ adapter.down.weight.T + adapter.down.bias) @ adapter.up.weight.T + adapter.up.bias
    torch.testing.assert_close(adapter(z), expected)
    assert adapter.down.weight.shape == (5, 32) and adapter.up.weight.shape == (32, 5)


def test_lora_init_is_the_identity():
    """W_up = 0 and zero biases: Δ = 0 exactly (He et al.'s code)."""
    adapter = build(BottleneckConfig(size=8))
    assert torch.equal(adapter.up.weight, torch.zeros(32, 8))
    assert torch.equal(adapter.up.bias, torch.zeros(32)) and torch.equal(adapter.down.bias, torch.zeros(8))
    assert adapter.down.weight.abs().max() > 0
    assert torch.equal(adapter(torch.randn(3, 32)), torch.zeros(3, 32))


def test_bert_init_is_near_identity():
    """Houlsby et al.: both projections from N(0, 0.02²)."""
    torch.manual_seed(0)
    adapter = build(BottleneckConfig(size=64, init="bert"), d=512)
    for weight in (adapter.down.weight, adapter.up.weight):
        assert weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert adapter(torch.randn(4, 512)).std() < 0.1  # small next to the unit-scale input


def test_reduction_factor_and_bias():
    assert BottleneckConfig(size=None, reduction_factor=16).bottleneck(768) == 48
    assert BottleneckConfig(size=None, reduction_factor=16).bottleneck(8) == 1  # at least one unit
    assert BottleneckConfig(size=7).bottleneck(768) == 7
    adapter = build(BottleneckConfig(size=None, reduction_factor=4, bias=False))
    assert adapter.down.out_features == 8 and adapter.down.bias is None and adapter.up.bias is None
    assert sum(p.numel() for p in adapter.parameters()) == 2 * 32 * 8


def test_validation():
    with pytest.raises(ValueError, match="exactly one of bottleneck 'size' and 'reduction_factor'"):
        BottleneckConfig(size=None)
    with pytest.raises(ValueError, match="size must be >= 1, got 0"):
        BottleneckConfig(size=0)
    with pytest.raises(ValueError, match="unknown adapter init 'xavier'; valid: lora, bert"):
        BottleneckConfig(init="xavier")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs a hidden-state site, not an embedding"):
        BottleneckConfig().build(SiteShape(d_in=None, d_out=8, base=nn.Embedding(10, 8)))


def test_not_mergeable(tiny):
    peft = unipeft.attach(tiny.model("bert"), "houlsby")
    assert not any(p.mergeable for _, p in peft.delta_modules())
    with pytest.raises(NotImplementedError, match="Bottleneck .* not linear in the base weight"):
        peft.merge()


# ------------------------------------------------------------------------------------------------ placements
def _capture(model: nn.Module, names: dict[str, str]) -> tuple[dict, list]:
    """Forward hooks recording, per key, the input (``in:``) or output (``out:``) of a module."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for key, name in names.items():
        module = model.get_submodule(name)
        if key.startswith("in:"):
            handles.append(module.register_forward_pre_hook(
                lambda m, args, kwargs, key=key: seen.__setitem__(key, args[0] if args else kwargs["hidden_states"]),
                with_kwargs=True))
        else:
            handles.append(module.register_forward_hook(lambda m, a, out, key=key: seen.__setitem__(key, out)))
    return seen, handles


def test_houlsby_is_sequential_after_attention_and_ffn(tiny, randomize):
    """BERT: adapters right after attention.output.dense and output.dense (before the residual and LayerNorm),
    reading those projections' outputs, with a SiLU bottleneck of d/16."""
    model = tiny.model("bert")
    peft = unipeft.attach(model, "houlsby")
    randomize(peft)
    sites = [m for m, _ in peft.delta_modules()]
    assert sites == [f"bert.encoder.layer.{i}.{p}" for p in ("attention.output.dense", "output.dense")
                     for i in range(2)]
    name = "bert.encoder.layer.1.output.dense"
    site = model.get_submodule(name)
    assert isinstance(site, DeltaSite)
    (placed,) = site.adapters["default"]
    assert placed.form.down.out_features == 2 and isinstance(placed.form.act, nn.SiLU)
    seen, _ = _capture(model, {"out:site": name, "out:base": name + ".base"})
    tiny.logits(model, tiny.batch("bert"))
    h = seen["out:base"]
    torch.testing.assert_close(seen["out:site"], h + placed.form(h))


@pytest.mark.parametrize(
    ("family", "entry", "exit_"),
    [("bert", "bert.encoder.layer.0.intermediate", "bert.encoder.layer.0.output.dense"),
     ("gpt2", "transformer.h.0.mlp", "transformer.h.0.mlp.c_proj"),
     ("llama", "model.layers.0.mlp", "model.layers.0.mlp.down_proj"),
     ("t5", "decoder.block.0.layer.2.DenseReluDense", "decoder.block.0.layer.2.DenseReluDense.wo")],
)
def test_scaled_parallel_adapter_reads_the_ffn_input(tiny, randomize, family, entry, exit_):
    """He et al.'s scaled PA: h' = h + 4·Δ(x) with x the FFN sub-layer's input and h its last projection's output."""
    model = tiny.model(family)
    peft = unipeft.attach(model, "scaled_pa")
    randomize(peft)
    (placed,) = model.get_submodule(exit_).adapters["default"]
    assert placed.source == "sublayer" and placed.form.down.in_features == tiny.width
    seen, _ = _capture(model, {"in:x": entry, "out:site": exit_, "out:base": exit_ + ".base"})
    tiny.logits(model, tiny.batch(family))
    torch.testing.assert_close(seen["out:site"], seen["out:base"] + 4.0 * placed.form(seen["in:x"]))


@pytest.mark.parametrize(
    ("family", "entry", "exit_"),
    [("bert", "bert.encoder.layer.1.attention.self", "bert.encoder.layer.1.attention.output.dense"),
     ("gpt2", "transformer.h.1.attn", "transformer.h.1.attn.c_proj"),
     ("llama", "model.layers.1.self_attn", "model.layers.1.self_attn.o_proj"),
     ("t5", "decoder.block.1.layer.1.EncDecAttention", "decoder.block.1.layer.1.EncDecAttention.o"),
     ("bart", "model.decoder.layers.1.encoder_attn", "model.decoder.layers.1.encoder_attn.out_proj")],
)
def test_parallel_adapter_at_attention_reads_the_attention_input(tiny, randomize, family, entry, exit_):
    """Parallel at ``attn``/``xattn``: the sub-layer input is caught at its entry, positional or keyword."""
    model = tiny.model(family)
    position = "xattn" if "Dec" in exit_ or "encoder_attn" in exit_ else "attn"
    peft = unipeft.attach(model, "parallel_adapter", positions=[position], size=4)
    randomize(peft)
    (placed,) = model.get_submodule(exit_).adapters["default"]
    seen, _ = _capture(model, {"in:x": entry, "out:site": exit_, "out:base": exit_ + ".base"})
    tiny.logits(model, tiny.batch(family))
    torch.testing.assert_close(seen["out:site"], seen["out:base"] + placed.form(seen["in:x"]))


def test_pfeiffer_only_after_the_ffn(tiny):
    peft = unipeft.attach(tiny.model("llama"), "pfeiffer")
    assert [m for m, _ in peft.delta_modules()] == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    assert all(p.insertion == "sequential" and p.form.down.out_features == 2 for _, p in peft.delta_modules())
