"""Positions, architecture tables, structure detection and raw module patterns (unipeft.core.positions, archmaps,
detect)."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

import unipeft
from unipeft.core.archmaps import arch_map_for
from unipeft.core.detect import detect_arch_map
from unipeft.core.positions import available_positions, model_arch_map, resolve_patterns, resolve_positions


def modules_at(model: nn.Module, position: str, **kw) -> list[str]:
    return [s.module for s in resolve_positions(model, [position], **kw)]


# ------------------------------------------------------------------------------------------------ position tables
@pytest.mark.parametrize(
    ("family", "position", "expected"),
    [
        ("bert", "attn.q", "bert.encoder.layer.0.attention.self.query"),
        ("bert", "attn.k", "bert.encoder.layer.0.attention.self.key"),
        ("bert", "attn.v", "bert.encoder.layer.0.attention.self.value"),
        ("bert", "attn.o", "bert.encoder.layer.0.attention.output.dense"),
        ("bert", "ffn.up", "bert.encoder.layer.0.intermediate.dense"),
        ("bert", "ffn.down", "bert.encoder.layer.0.output.dense"),
        ("gpt2", "attn.o", "transformer.h.0.attn.c_proj"),
        ("gpt2", "ffn.up", "transformer.h.0.mlp.c_fc"),
        ("gpt2", "ffn.down", "transformer.h.0.mlp.c_proj"),
        ("llama", "attn.q", "model.layers.0.self_attn.q_proj"),
        ("llama", "attn.k", "model.layers.0.self_attn.k_proj"),
        ("llama", "attn.v", "model.layers.0.self_attn.v_proj"),
        ("llama", "attn.o", "model.layers.0.self_attn.o_proj"),
        ("llama", "ffn.gate", "model.layers.0.mlp.gate_proj"),
        ("llama", "ffn.up", "model.layers.0.mlp.up_proj"),
        ("llama", "ffn.down", "model.layers.0.mlp.down_proj"),
        ("bart", "attn.o", "model.encoder.layers.0.self_attn.out_proj"),
        ("bart", "ffn.up", "model.encoder.layers.0.fc1"),
    ],
)
def test_projection_positions(tiny, family, position, expected):
    model = tiny.model(family)
    assert modules_at(model, position, layers=[0])[0] == expected
    assert len(modules_at(model, position)) == tiny.layers * (2 if family in ("t5", "bart") else 1)


def test_model_level_positions(tiny):
    expected = {
        "bert": ("bert.embeddings.word_embeddings", "classifier"),
        "gpt2": ("transformer.wte", "lm_head"),
        "llama": ("model.embed_tokens", "lm_head"),
        "t5": ("shared", "lm_head"),
        "bart": ("model.shared", "lm_head"),
    }
    for family, (embed, head) in expected.items():
        model = tiny.model(family)
        assert modules_at(model, "embed") == [embed]
        assert modules_at(model, "head") == [head]


@pytest.mark.parametrize(
    ("family", "attn", "ffn"),
    [
        ("bert", ("attention.self", "attention.output.dense"), ("intermediate", "output.dense")),
        ("gpt2", ("attn", "attn.c_proj"), ("mlp", "mlp.c_proj")),
        ("llama", ("self_attn", "self_attn.o_proj"), ("mlp", "mlp.down_proj")),
        ("bart", ("self_attn", "self_attn.out_proj"), ("fc1", "fc2")),
    ],
)
def test_sublayer_positions_have_an_entry_and_an_exit(tiny, family, attn, ffn):
    """``attn``/``ffn`` wrap the sub-layer's last projection and read the sub-layer's input at its entry."""
    model = tiny.model(family)
    prefix = {"bert": "bert.encoder.layer.1.", "gpt2": "transformer.h.1.", "llama": "model.layers.1.",
              "bart": "model.encoder.layers.1."}[family]
    for position, (entry, exit_) in (("attn", attn), ("ffn", ffn)):
        (site, *_) = resolve_positions(model, [position], layers=[1])
        assert (site.entry, site.module) == (prefix + entry, prefix + exit_)
        assert site.position == position and site.layer == 1 and site.out_slice is None


def test_gpt2_fused_qkv_slices(tiny):
    model = tiny.model("gpt2")
    d = tiny.width
    for position, out_slice in (("attn.q", (0, d)), ("attn.k", (d, 2 * d)), ("attn.v", (2 * d, 3 * d))):
        sites = resolve_positions(model, [position])
        assert [s.module for s in sites] == [f"transformer.h.{i}.attn.c_attn" for i in range(tiny.layers)]
        assert all(s.out_slice == out_slice for s in sites)
    (whole,) = resolve_positions(model, ["attn.qkv"], layers=[0])
    assert whole.module == "transformer.h.0.attn.c_attn" and whole.out_slice is None


def test_t5_encoder_and_decoder_stacks(tiny):
    model = tiny.model("t5")
    assert modules_at(model, "attn.q", layers=[0]) == [
        "encoder.block.0.layer.0.SelfAttention.q", "decoder.block.0.layer.0.SelfAttention.q"]
    assert modules_at(model, "ffn.down", layers=[1]) == [
        "encoder.block.1.layer.1.DenseReluDense.wo", "decoder.block.1.layer.2.DenseReluDense.wo"]
    assert modules_at(model, "xattn.k") == [f"decoder.block.{i}.layer.1.EncDecAttention.k" for i in range(2)]
    (xattn,) = resolve_positions(model, ["xattn"], layers=[0])
    assert (xattn.entry, xattn.module) == ("decoder.block.0.layer.1.EncDecAttention",
                                           "decoder.block.0.layer.1.EncDecAttention.o")
    assert modules_at(model, "attn.v", stacks=["decoder"]) == [
        f"decoder.block.{i}.layer.0.SelfAttention.v" for i in range(2)]
    assert modules_at(model, "attn.v", stacks=["encoder"], layers=[-1]) == ["encoder.block.1.layer.0.SelfAttention.v"]
    assert [s.stack for s in resolve_positions(model, ["attn.o"])] == ["encoder"] * 2 + ["decoder"] * 2
    assert set(modules_at(model, "norm", layers=[0], stacks=["decoder"])) == {
        f"decoder.block.0.layer.{i}.layer_norm" for i in range(3)}


def test_t5_gated_ffn(tiny):
    """T5 v1.1 (gated FFN) has wi_0 / wi_1 instead of wi: the table's alternatives resolve to what exists."""
    config = tiny.config("t5")
    config.feed_forward_proj, config.is_gated_act, config.dense_act_fn = "gated-gelu", True, "gelu_new"
    model = transformers.T5ForConditionalGeneration(config)
    assert modules_at(model, "ffn.up", stacks=["encoder"], layers=[0]) == ["encoder.block.0.layer.1.DenseReluDense.wi_1"]
    assert modules_at(model, "ffn.gate", stacks=["encoder"], layers=[0]) == [
        "encoder.block.0.layer.1.DenseReluDense.wi_0"]
    assert "ffn.gate" not in available_positions(tiny.model("t5"))  # v1.0 has no gate


def test_bart_cross_attention(tiny):
    model = tiny.model("bart")
    assert modules_at(model, "xattn.q") == [f"model.decoder.layers.{i}.encoder_attn.q_proj" for i in range(2)]
    with pytest.raises(ValueError, match="unknown position 'xattn.q'"):
        resolve_positions(tiny.model("llama"), ["xattn.q"])


def test_layer_selection(tiny):
    model = tiny.model("llama")
    assert modules_at(model, "attn.q", layers=[-1]) == ["model.layers.1.self_attn.q_proj"]
    assert modules_at(model, "attn.q", layers=[-2]) == ["model.layers.0.self_attn.q_proj"]
    assert modules_at(model, "attn.q", layers=[1, 0, -1]) == [f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)]
    with pytest.raises(ValueError, match=r"layer 2 is out of range .* 2 layers \(valid: -2\.\.1\)"):
        resolve_positions(model, ["attn.q"], layers=[2])
    with pytest.raises(ValueError, match="layer -3 is out of range"):
        resolve_positions(model, ["attn.q"], layers=[-3])


def test_layer_selection_through_attach(tiny):
    model = tiny.model("bert")
    peft = unipeft.attach(model, "lora", layers=[-1])
    assert [m for m, _ in peft.delta_modules()] == [
        "bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.1.attention.self.value"]
    assert [r.site.layer for r in peft.records["default"]] == [1, 1]


def test_unknown_stack_lists_the_stacks(tiny):
    with pytest.raises(ValueError, match=r"unknown stack\(s\) 'decodr'; this model \(t5\) has: encoder, decoder"):
        resolve_positions(tiny.model("t5"), ["attn.q"], stacks=["decodr"])


def test_unknown_position_lists_the_valid_ones(tiny):
    model = tiny.model("bert")
    with pytest.raises(ValueError) as err:
        resolve_positions(model, ["attn.qq"])
    message = str(err.value)
    assert message.startswith("unknown position 'attn.qq'; this model (bert) has: ")
    for position in ("attn.q", "attn.k", "attn.v", "attn.o", "attn", "ffn.up", "ffn.down", "ffn", "norm", "embed",
                     "head"):
        assert position in message.split("has: ")[1].split(", ")
    with pytest.raises(ValueError, match="unknown position 'ffn.gate'"):  # BERT has no gate
        unipeft.attach(model, "lora", positions=["ffn.gate"])


def test_available_positions_per_family(tiny):
    common = {"attn.q", "attn.k", "attn.v", "attn.o", "attn", "ffn.up", "ffn.down", "ffn", "norm", "layer", "embed",
              "head"}
    assert set(available_positions(tiny.model("bert"))) == common
    assert set(available_positions(tiny.model("gpt2"))) == common | {"attn.qkv"}
    assert set(available_positions(tiny.model("llama"))) == common | {"ffn.gate"}
    cross = {"xattn.q", "xattn.k", "xattn.v", "xattn.o", "xattn"}
    assert set(available_positions(tiny.model("t5"))) == common | cross
    assert set(available_positions(tiny.model("bart"))) == common | cross


def test_family_tables_by_model_type():
    assert arch_map_for("roberta").family == "bert"
    assert arch_map_for("mistral").family == "llama"
    assert arch_map_for("mt5").family == "t5"
    assert arch_map_for("opt") is None


# --------------------------------------------------------------------------------------------------- patterns
def test_patterns_list_is_exact_names_or_suffixes(tiny):
    model = tiny.model("bert")
    assert [s.module for s in resolve_patterns(model, ["query", "value"])] == [
        f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "value")]
    assert [s.module for s in resolve_patterns(model, ["bert.encoder.layer.1.attention.self.key"])] == [
        "bert.encoder.layer.1.attention.self.key"]
    assert [s.module for s in resolve_patterns(model, ["self.key"])] == [
        f"bert.encoder.layer.{i}.attention.self.key" for i in range(2)]
    # a suffix is whole name components: "uery" is not a suffix of "...query"
    with pytest.raises(ValueError, match="matches no module"):
        resolve_patterns(model, ["uery"])
    assert all(s.position == "module" and s.out_slice is None for s in resolve_patterns(model, ["dense"]))


def test_patterns_string_is_a_full_match_regex(tiny):
    model = tiny.model("bert")
    sites = resolve_patterns(model, r".*\.0\.attention\.self\.(query|key)")
    assert [s.module for s in sites] == ["bert.encoder.layer.0.attention.self.query",
                                         "bert.encoder.layer.0.attention.self.key"]
    with pytest.raises(ValueError, match="matches no module"):
        resolve_patterns(model, "query")  # a regex string must match the whole name


def test_patterns_matching_nothing_list_the_module_names(tiny):
    with pytest.raises(ValueError) as err:
        resolve_patterns(tiny.model("llama"), ["q_projj"])
    message = str(err.value)
    assert "module pattern ['q_projj'] matches no module" in message
    for leaf in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"):
        assert leaf in message


def test_patterns_through_attach_match_hf_peft(tiny):
    """A list of suffixes wraps exactly the modules HF peft's target_modules wraps."""
    peft_lib = pytest.importorskip("peft")
    model = tiny.model("llama")
    targets = ["q_proj", "v_proj", "up_proj"]
    ours = sorted(m for m, _ in unipeft.attach(model, "lora", positions=[], modules=targets).delta_modules())
    theirs = peft_lib.get_peft_model(tiny.model("llama"), peft_lib.LoraConfig(r=8, target_modules=targets))
    wrapped = sorted(n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                     if isinstance(m, peft_lib.tuners.lora.LoraLayer))
    assert ours == wrapped


def test_positions_resolve_the_same_with_adapters_attached(tiny):
    """Adding a second adapter finds the original module names, not the wrappers."""
    model = tiny.model("gpt2")
    peft = unipeft.attach(model, "lora")
    peft.add("lora", name="second", positions=["attn.k"])
    assert modules_at(model, "attn.q", layers=[0]) == ["transformer.h.0.attn.c_attn"]
    assert [s.out_slice for s in resolve_positions(model, ["attn.k"], layers=[0])] == [(32, 64)]
    assert "attn.q" in available_positions(model)
    assert len(resolve_patterns(model, ["c_attn"])) == 2


# -------------------------------------------------------------------------------------------------- detection
class Attention(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        return self.o_proj(weights @ v)


class MLP(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.up_proj, self.down_proj = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(torch.relu(self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.attn_norm, self.attn, self.mlp_norm, self.mlp = nn.LayerNorm(d), Attention(d), nn.LayerNorm(d), MLP(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class Stack(nn.Module):
    """A small transformer with no config and no table: positions come from structure detection."""

    def __init__(self, d: int = 16, layers: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.head = nn.Linear(d, 50)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def test_detection_on_a_custom_stack():
    model = Stack()
    arch = model_arch_map(model)
    assert arch.family == "detected:Stack"
    assert set(available_positions(model)) == {"attn.q", "attn.k", "attn.v", "attn.o", "attn", "ffn.up",
                                               "ffn.down", "ffn", "norm", "layer"}
    assert modules_at(model, "attn.q", layers=[-1]) == ["blocks.2.attn.q_proj"]
    assert modules_at(model, "ffn.down") == [f"blocks.{i}.mlp.down_proj" for i in range(3)]
    (attn,) = resolve_positions(model, ["attn"], layers=[0])
    assert (attn.entry, attn.module) == ("blocks.0.attn", "blocks.0.attn.o_proj")
    (ffn,) = resolve_positions(model, ["ffn"], layers=[0])
    assert (ffn.entry, ffn.module) == ("blocks.0.mlp.up_proj", "blocks.0.mlp.down_proj")
    assert set(modules_at(model, "norm", layers=[0])) == {"blocks.0.attn_norm", "blocks.0.mlp_norm"}


def test_recipes_run_on_a_detected_stack():
    torch.manual_seed(0)
    model = Stack().eval()
    ids = torch.randint(0, 50, (2, 5))
    with torch.no_grad():
        before = model(ids)
    peft = unipeft.attach(model, "lora")
    peft.add("houlsby", name="adapters")
    peft.set_active("default", "adapters")
    with torch.no_grad():
        assert torch.equal(model(ids), before)
    assert len(list(peft.delta_modules("default"))) == 6
    peft.detach()


def test_detection_of_a_transformers_family_without_a_table():
    """OPT has no table; its q_proj / out_proj / fc1 / fc2 names are found by the synonyms."""
    config = transformers.OPTConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                    num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32)
    model = transformers.OPTForCausalLM(config).eval()
    assert arch_map_for(config.model_type) is None
    arch = detect_arch_map(model)
    assert arch.family == "detected:opt"
    assert modules_at(model, "attn.q", layers=[0]) == ["model.decoder.layers.0.self_attn.q_proj"]
    assert modules_at(model, "attn.o", layers=[0]) == ["model.decoder.layers.0.self_attn.out_proj"]
    assert modules_at(model, "ffn.up", layers=[1]) == ["model.decoder.layers.1.fc1"]
    assert modules_at(model, "ffn.down", layers=[1]) == ["model.decoder.layers.1.fc2"]
    ids = torch.randint(3, 100, (2, 6))
    with torch.no_grad():
        before = model(ids).logits
    peft = unipeft.attach(model, "lora")
    with torch.no_grad():
        torch.nn.init.normal_(next(p for _, d in peft.delta_modules() for n, p in d.named_parameters()
                                   if n.endswith("lora_B")))
        assert not torch.allclose(model(ids).logits, before)


def test_a_model_without_layers_needs_module_patterns():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"cannot find a stack of transformer layers in Sequential.*modules"):
        unipeft.attach(model, "lora")
    peft = unipeft.attach(model, "lora", positions=[], modules=["0", "2"])
    assert [m for m, _ in peft.delta_modules()] == ["0", "2"]
