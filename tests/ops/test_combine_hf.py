"""unipeft's adapter combination against Hugging Face peft's ``add_weighted_adapter`` (an independent reference):
the same four LoRA adapters of a tiny LLaMA, made and randomised in HF peft and loaded into unipeft through
unipeft.interop, combined by both with every combination type; the new adapters' ΔW must agree to 1e-5.

DARE draws random masks: both libraries call ``torch.bernoulli`` once per tensor, module by module (in the model's
order), A before B, adapter by adapter, so with ``torch.bernoulli`` replaced by the same seeded stream for each call the
masks are the same and the results must agree exactly as well. Last, a combined adapter exports to HF's format."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch

import unipeft
from unipeft.interop import load_hf_adapter

peft = pytest.importorskip("peft")

PREFIX = "base_model.model."
#: name → (r, alpha, targets): equal ranks for the factor methods (t1-t3); t4 has rank 2 for cat and svd;
#: t3 also adapts up_proj, where only it is present. (HF warns about names that are substrings of "lora_".)
ADAPTERS = {"t1": (4, 8, ["q_proj", "v_proj"]), "t2": (4, 16, ["q_proj", "v_proj"]),
            "t3": (4, 4, ["q_proj", "v_proj", "up_proj"]), "t4": (2, 4, ["q_proj", "v_proj"])}
ABC, ABD = ["t1", "t2", "t3"], ["t1", "t2", "t4"]


@pytest.fixture(scope="module")
def pair(tiny, tmp_path_factory):
    """(HF PeftModel with adapters t1-t4, unipeft handle with the same adapters loaded from HF's files)."""
    base = tiny.model("llama")
    hf = None
    g = torch.Generator().manual_seed(0)
    for name, (r, alpha, targets) in ADAPTERS.items():
        config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets)
        if hf is None:
            hf = peft.get_peft_model(copy.deepcopy(base), config, adapter_name=name)
        else:
            hf.add_adapter(name, config)
    with torch.no_grad():
        for key, p in hf.named_parameters():
            if "lora_" in key:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    folder: Path = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(str(folder), selected_adapters=list(ADAPTERS))
    model = copy.deepcopy(base)
    for name in ADAPTERS:
        handle = load_hf_adapter(model, folder / name, name)
    return hf, handle


def bernoulli_stream(seed: int):
    """A stand-in for ``torch.bernoulli`` that draws from its own seeded generator, whatever generator it is given."""
    g = torch.Generator().manual_seed(seed)

    def bernoulli(p: torch.Tensor, *args, generator: torch.Generator | None = None, **kwargs) -> torch.Tensor:
        return (torch.rand(p.shape, generator=g) < p).to(p.dtype)

    return bernoulli


@pytest.mark.parametrize("method, adapters, options", [
    ("linear", ABC, {}),
    ("cat", ABD, {}),
    ("svd", ABD, {}),
    ("svd", ABD, {"svd_rank": 3}),
    ("svd", ABD, {"svd_rank": 5, "svd_clamp": 0.9}),
    ("ties", ABC, {"density": 0.5}),
    ("ties", ABC, {"density": 0.6, "majority_sign": "frequency"}),
    ("ties_svd", ABD, {"density": 0.5}),
    ("magnitude_prune", ABC, {"density": 0.4}),
    ("magnitude_prune_svd", ABD, {"density": 0.4, "svd_rank": 4}),
    ("dare_linear", ABC, {"density": 0.5}),
    ("dare_ties", ABC, {"density": 0.7}),
    ("dare_linear_svd", ABD, {"density": 0.5}),
    ("dare_ties_svd", ABD, {"density": 0.3, "majority_sign": "frequency"}),
])
def test_same_delta_weights_as_hf_peft(pair, monkeypatch, method, adapters, options):
    hf, handle = pair
    name = f"{method}_{len(handle.recipes)}"
    weights = [0.6, -0.4, 1.2]
    hf_options = {("majority_sign_method" if k == "majority_sign" else k): v for k, v in options.items()}
    monkeypatch.setattr(torch, "bernoulli", bernoulli_stream(7))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf.add_weighted_adapter(adapters, weights, name, combination_type=method, **hf_options)
    monkeypatch.setattr(torch, "bernoulli", bernoulli_stream(7))
    handle.combine(adapters, weights, method=method, new_name=name, **options)
    ours = {module: placed.form.delta_weight().detach() for module, placed in handle.delta_modules(name)}
    theirs = {key[len(PREFIX):]: module.get_delta_weight(name).detach() for key, module in hf.named_modules()
              if isinstance(module, peft.tuners.lora.LoraLayer) and name in module.lora_A}
    assert ours.keys() == theirs.keys()
    assert {m: ours[m].shape for m in ours} == {m: theirs[m].shape for m in theirs}
    diff = max((ours[m] - theirs[m]).abs().max().item() for m in ours)
    assert diff <= 1e-5, f"{method}: max |ΔW unipeft - ΔW HF| = {diff:.2e}"
    assert max(theirs[m].abs().max().item() for m in theirs) > 1e-2  # a real, non-zero delta was compared


def test_combined_adapter_exports_to_hf(tiny, randomize, tmp_path):
    """A combined adapter with per-site ranks (cat of r=8 at attn.q/attn.v and r=4 at attn.v/ffn.up) saves in HF's
    format (as a rank_pattern) and HF peft computes the same logits from it."""
    from unipeft.interop import save_hf_adapter

    base = tiny.model("llama")
    batch = {"input_ids": tiny.batch("llama")["input_ids"]}
    handle = unipeft.attach(copy.deepcopy(base), "lora", name="a")
    handle.add("lora", "b", r=4, positions=["attn.v", "ffn.up"])
    randomize(handle)
    handle.combine(["a", "b"], [0.5, -1.5], method="cat", new_name="m")
    handle.set_active("m")
    save_hf_adapter(handle, tmp_path / "m", "m")
    hf = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "m"))
    ranks = {n.split(".")[-1]: m.r["default"] for n, m in hf.named_modules()
             if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert ranks == {"q_proj": 8, "v_proj": 12, "up_proj": 4}  # cat: the sum of the ranks present at each site
    assert torch.allclose(tiny.logits(hf, batch), tiny.logits(handle.model, batch), atol=1e-5)
