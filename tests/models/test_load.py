"""Loading models and tokenizers, including GGUF files through the cache (unipeft.models.load)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, LlamaConfig

from unipeft.models import gguf as gguf_module
from unipeft.models import load_config, load_model
from unipeft.models.cache import MANIFEST, cache_problem

from .conftest import write_tiny_gguf

SENTENCE = "A gripping, beautifully acted film that stays with you."


class ConvertSpy:
    """Wraps ``convert_gguf`` to count conversions and keep the model read from the GGUF file."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.real = gguf_module.convert_gguf
        self.models: list[torch.nn.Module] = []
        monkeypatch.setattr(gguf_module, "convert_gguf", self)

    def __call__(self, gguf_path: Path, out_dir: Path):  # noqa: ANN204 - same as convert_gguf
        model, tokenizer = self.real(gguf_path, out_dir)
        self.models.append(model)
        return model, tokenizer


# --- MiniLM (a real BERT checkpoint) ------------------------------------------------------------


def test_minilm_classification_gives_finite_logits(minilm_path: Path) -> None:
    model, tokenizer = load_model("minilm", kind="classification", num_labels=2)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert not model.training
    assert model.config.num_labels == 2
    assert tokenizer.pad_token == "[PAD]" and model.config.pad_token_id == tokenizer.pad_token_id
    batch = tokenizer([SENTENCE, "Dull."], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits  # (2, 2)
    assert logits.shape == (2, 2)
    assert torch.isfinite(logits).all()


def test_head_init_is_reproducible_by_seed(minilm_path: Path) -> None:
    rng_before = torch.get_rng_state()
    first, _ = load_model("minilm", kind="classification", num_labels=3, seed=7)
    again, _ = load_model("minilm", kind="classification", num_labels=3, seed=7)
    other, _ = load_model("minilm", kind="classification", num_labels=3, seed=8)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is left alone
    assert first.classifier.weight.shape == (3, 384)
    assert torch.equal(first.classifier.weight, again.classifier.weight)
    assert not torch.equal(first.classifier.weight, other.classifier.weight)
    # The pretrained encoder does not depend on the seed.
    assert torch.equal(first.bert.embeddings.word_embeddings.weight, other.bert.embeddings.word_embeddings.weight)


def test_minilm_regression_and_base(minilm_path: Path) -> None:
    regressor, tokenizer = load_model("minilm", kind="regression")
    assert regressor.config.num_labels == 1 and regressor.config.problem_type == "regression"
    batch = tokenizer([SENTENCE], return_tensors="pt")
    with torch.no_grad():
        assert regressor(**batch).logits.shape == (1, 1)
    base, _ = load_model(minilm_path, kind="base", dtype=torch.bfloat16)
    assert type(base).__name__ == "BertModel"
    assert {p.dtype for p in base.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert base(**batch).last_hidden_state.shape[-1] == 384


def test_minilm_config_without_weights(minilm_path: Path) -> None:
    config = load_config("minilm")
    assert isinstance(config, BertConfig)
    assert (config.hidden_size, config.num_hidden_layers) == (384, 6)


@pytest.mark.parametrize(
    ("kind", "num_labels", "message"),
    [
        ("regression", 3, "one output"),
        ("classification", 1, "num_labels >= 2"),
        ("causal_lm", 2, "only for classification/regression"),
        ("lm", None, r"unknown model kind 'lm'; expected one of: classification, regression"),
    ],
)
def test_bad_arguments(kind: str, num_labels: int | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_model("minilm", kind=kind, num_labels=num_labels)  # type: ignore[arg-type]


def test_config_only_model_has_no_weights() -> None:
    with pytest.raises(ValueError, match="config-only"):
        load_model("llama-7b", kind="causal_lm")


# --- GGUF through the cache, on a tiny file written by the test ---------------------------------


def test_gguf_is_converted_once_and_cached(
    tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = ConvertSpy(monkeypatch)
    monkeypatch.setenv("UNIPEFT_CACHE", str(tmp_path / "cache"))
    model, tokenizer = load_model(str(tiny_gguf), kind="causal_lm")
    assert len(spy.models) == 1
    (entry,) = (tmp_path / "cache").iterdir()  # one entry, no temporary folders left
    assert entry.name.startswith("tiny-") and cache_problem(entry, tiny_gguf) is None
    assert {"config.json", "model.safetensors", "tokenizer.json", MANIFEST} <= {p.name for p in entry.iterdir()}
    assert "quantization_config" not in json.loads((entry / "config.json").read_text())

    # The tokenizer had no pad token: EOS stands in, and the model config agrees.
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert model.config.pad_token_id == tokenizer.pad_token_id == 2
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "the"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    assert tokenizer.decode(prompt["input_ids"][0]).endswith("<|im_start|>assistant\n")

    # The cached float32 copy computes exactly what the dequantized GGUF model computes.
    with torch.no_grad():
        from_gguf = spy.models[0](**prompt).logits
        from_cache = model(**prompt).logits
    assert torch.equal(from_gguf, from_cache)

    again, _ = load_model(str(tiny_gguf), kind="causal_lm")
    assert len(spy.models) == 1  # read from the cache
    with torch.no_grad():
        assert torch.equal(again(**prompt).logits, from_cache)
    assert isinstance(load_config(tiny_gguf), LlamaConfig)


def test_changed_gguf_invalidates_cache(tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = ConvertSpy(monkeypatch)
    cache_dir = tmp_path / "cache"
    ids = torch.tensor([[5, 6, 7, 8]])
    first, _ = load_model(tiny_gguf, kind="causal_lm", cache_dir=cache_dir)
    write_tiny_gguf(tiny_gguf, seed=1)  # new weights in the same file
    second, _ = load_model(tiny_gguf, kind="causal_lm", cache_dir=cache_dir)
    assert len(spy.models) == 2
    with torch.no_grad():
        assert not torch.equal(first(ids).logits, second(ids).logits)
    assert len(list(cache_dir.iterdir())) == 1


def test_gguf_as_classifier_and_config(tiny_gguf: Path, tmp_path: Path) -> None:
    config = load_config(tiny_gguf, cache_dir=tmp_path / "cache")  # from the file: nothing cached yet
    assert isinstance(config, LlamaConfig) and config.num_hidden_layers == 2
    assert not (tmp_path / "cache").exists()
    model, tokenizer = load_model(tiny_gguf, kind="classification", num_labels=3, cache_dir=tmp_path / "cache")
    assert type(model).__name__ == "LlamaForSequenceClassification"
    batch = tokenizer(["the the", "the"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits  # (2, 3): pooled at each row's last non-pad token
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()


# --- SmolLM2-135M-Instruct from its real GGUF file ----------------------------------------------


@pytest.mark.slow
def test_smollm2_gguf_cache_round_trip_and_answer(
    smollm2_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = ConvertSpy(monkeypatch)
    monkeypatch.setenv("UNIPEFT_CACHE", str(tmp_path / "cache"))
    start = time.perf_counter()
    model, tokenizer = load_model("smollm2-135m", kind="causal_lm")
    first_load = time.perf_counter() - start
    assert len(spy.models) == 1
    assert (tmp_path / "cache" / "smollm2-135m" / MANIFEST).is_file()

    start = time.perf_counter()
    cached, cached_tokenizer = load_model("smollm2-135m", kind="causal_lm")
    cached_load = time.perf_counter() - start
    assert len(spy.models) == 1
    assert cached_load < first_load / 5, (first_load, cached_load)

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = cached_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    assert torch.equal(prompt["input_ids"], tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"])
    with torch.no_grad():
        from_gguf = spy.models[0](**prompt).logits
        assert torch.equal(model(**prompt).logits, from_gguf)
        assert torch.equal(cached(**prompt).logits, from_gguf)
        output = cached.generate(**prompt, max_new_tokens=20, do_sample=False)
    answer = cached_tokenizer.decode(output[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
