"""Tokenisation, causal-LM label masking, collation and deterministic batching."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from unipeft.data import (
    IGNORE_INDEX,
    PROMPT_NO_INPUT,
    PROMPT_WITH_INPUT,
    TaskSpec,
    batch_order,
    batches,
    collate,
    encode,
    encode_causal_lm,
    encode_classification,
    end_token_id,
    format_alpaca_prompt,
    get_task,
    load_rows,
    num_batches,
)

CLS, SEP, PAD = 101, 102, 0  # MiniLM (BERT uncased) special ids


class CharTokenizer:
    """A tokenizer-free stand-in: one id per character (ord + 10), BOS 1 prepended by default."""

    def __init__(self, *, bos: int | None = 1, eos: int | None = 2, sep: int | None = None) -> None:
        self.bos_token_id, self.eos_token_id, self.sep_token_id = bos, eos, sep

    def _one(self, text: str, add_special_tokens: bool) -> list[int]:
        ids = [ord(c) + 10 for c in text]
        return ([self.bos_token_id] if add_special_tokens and self.bos_token_id is not None else []) + ids

    def __call__(self, text: str | list[str], add_special_tokens: bool = True) -> dict[str, Any]:
        if isinstance(text, str):
            return {"input_ids": self._one(text, add_special_tokens)}
        return {"input_ids": [self._one(t, add_special_tokens) for t in text]}


def _lm_spec() -> TaskSpec:
    return TaskSpec(name="lm", kind="causal_lm", folder="x", prompt_field="instruction", input_field="input",
                    response_field="output", metrics=("perplexity",), main_metric="perplexity")


# ---------------------------------------------------------------- classification


def test_single_sentence_matches_tokenizer(data_dir: Path, minilm_tokenizer: Any) -> None:
    spec = get_task("sst2")
    rows = load_rows(spec, "eval", data_dir, limit=40)
    examples = encode_classification(rows, spec, minilm_tokenizer, max_length=128)
    assert len(examples) == 40
    for row, ex in zip(rows, examples):
        assert set(ex) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
        assert ex["input_ids"] == minilm_tokenizer(row["sentence"])["input_ids"]
        assert ex["input_ids"][0] == CLS and ex["input_ids"][-1] == SEP
        assert ex["attention_mask"] == [1] * len(ex["input_ids"])  # no padding at encode time
        assert ex["labels"] == row["label"] and isinstance(ex["labels"], int)
    assert len({len(ex["input_ids"]) for ex in examples}) > 1


def test_sentence_pair_uses_pair_encoding(data_dir: Path, minilm_tokenizer: Any) -> None:
    spec = get_task("rte")
    rows = load_rows(spec, "eval", data_dir, limit=10)
    examples = encode(rows, spec, minilm_tokenizer, max_length=512)
    for row, ex in zip(rows, examples):
        assert ex["input_ids"] == minilm_tokenizer(row["sentence1"], row["sentence2"])["input_ids"]
        assert ex["input_ids"].count(SEP) == 2
        first_sep = ex["input_ids"].index(SEP)
        assert ex["token_type_ids"] == [0] * (first_sep + 1) + [1] * (len(ex["input_ids"]) - first_sep - 1)


def test_truncation_to_max_length(data_dir: Path, minilm_tokenizer: Any) -> None:
    spec = get_task("mrpc")
    examples = encode(load_rows(spec, "eval", data_dir, limit=30), spec, minilm_tokenizer, max_length=16)
    lengths = [len(ex["input_ids"]) for ex in examples]
    assert max(lengths) == 16 and all(len(ex["token_type_ids"]) == n for ex, n in zip(examples, lengths))
    assert all(ex["input_ids"].count(SEP) == 2 for ex in examples)  # both segments survive


def test_regression_labels_are_floats(data_dir: Path, minilm_tokenizer: Any) -> None:
    spec = get_task("stsb")
    rows = load_rows(spec, "eval", data_dir, limit=8)
    examples = encode(rows, spec, minilm_tokenizer, max_length=64)
    assert [ex["labels"] for ex in examples] == [float(r["label"]) for r in rows]
    batch = collate(examples, PAD)
    assert batch["labels"].dtype == torch.float32 and batch["labels"].shape == (8,)


def test_string_labels_and_bad_rows(minilm_tokenizer: Any) -> None:
    spec = TaskSpec(name="spam", kind="classification", folder="x", text_fields=("q",), label_field="y",
                    num_labels=2, label_names=("ham", "spam"), metrics=("accuracy",), main_metric="accuracy")
    examples = encode_classification([{"q": "buy now", "y": "spam"}, {"q": "hi", "y": 0}], spec,
                                     minilm_tokenizer, 32)
    assert [ex["labels"] for ex in examples] == [1, 0]
    with pytest.raises(ValueError, match="row 0: label 'eggs' is not one of ham, spam"):
        encode_classification([{"q": "a", "y": "eggs"}], spec, minilm_tokenizer, 32)
    with pytest.raises(ValueError, match="row 1: label 2 is not a class id in 0..1"):
        encode_classification([{"q": "a", "y": 1}, {"q": "b", "y": 2}], spec, minilm_tokenizer, 32)
    with pytest.raises(ValueError, match="row 0 has no field 'q'; its fields: text, y"):
        encode_classification([{"text": "a", "y": 1}], spec, minilm_tokenizer, 32)
    with pytest.raises(ValueError, match="needs a classification or regression task, got 'causal_lm'"):
        encode_classification([], _lm_spec(), minilm_tokenizer, 32)
    with pytest.raises(ValueError, match="needs a causal_lm or generation task, got 'classification'"):
        encode_causal_lm([], spec, minilm_tokenizer, 32)


# ---------------------------------------------------------------- causal LM


def test_alpaca_templates() -> None:
    no_input = format_alpaca_prompt("Name a colour.")
    assert no_input == PROMPT_NO_INPUT.format(instruction="Name a colour.")
    assert no_input.startswith("Below is an instruction that describes a task. Write a response")
    assert no_input.endswith("### Instruction:\nName a colour.\n\n### Response:\n")
    assert "### Input:" not in no_input
    with_input = format_alpaca_prompt("Translate.", "bonjour")
    assert with_input == PROMPT_WITH_INPUT.format(instruction="Translate.", input="bonjour")
    assert "paired with an input that provides further context" in with_input
    assert with_input.endswith("### Instruction:\nTranslate.\n\n### Input:\nbonjour\n\n### Response:\n")


def test_causal_lm_exact_ids_and_mask() -> None:
    tok = CharTokenizer()
    row = {"instruction": "Hi", "input": "", "output": "Yo"}
    (ex,) = encode_causal_lm([row], _lm_spec(), tok, max_length=1000)
    prompt = [ord(c) + 10 for c in format_alpaca_prompt("Hi")]
    response = [ord("Y") + 10, ord("o") + 10]
    assert ex["input_ids"] == [1] + prompt + response + [2]
    assert ex["labels"] == [IGNORE_INDEX] * (1 + len(prompt)) + response + [2]
    assert ex["attention_mask"] == [1] * len(ex["input_ids"])


def test_causal_lm_truncation_and_dropping(caplog: pytest.LogCaptureFixture) -> None:
    tok = CharTokenizer()
    rows = [{"instruction": "Hi", "input": "", "output": "Yo there"}]
    n_prompt = 1 + len(format_alpaca_prompt("Hi"))
    (ex,) = encode_causal_lm(rows, _lm_spec(), tok, max_length=n_prompt + 3)
    assert len(ex["input_ids"]) == len(ex["labels"]) == n_prompt + 3
    assert ex["labels"][-3:] == ex["input_ids"][-3:] == [ord(c) + 10 for c in "Yo "]
    with caplog.at_level(logging.WARNING, logger="unipeft.data.encode"):
        assert encode_causal_lm(rows, _lm_spec(), tok, max_length=n_prompt) == []
    assert "dropped 1 of 1" in caplog.text


def test_end_token_fallbacks() -> None:
    assert end_token_id(CharTokenizer(eos=2, sep=3)) == 2
    assert end_token_id(CharTokenizer(eos=None, sep=3)) == 3
    assert end_token_id(CharTokenizer(eos=None, sep=None)) is None
    (ex,) = encode_causal_lm([{"instruction": "a", "output": "b"}], _lm_spec(),
                             CharTokenizer(bos=None, eos=None), 1000)
    assert ex["input_ids"][-1] == ord("b") + 10 and ex["labels"][-1] == ord("b") + 10
    assert ex["input_ids"][0] == ord("B") + 10  # no BOS: starts with the prompt text


def test_alpaca_masking_with_minilm(data_dir: Path, minilm_tokenizer: Any) -> None:
    spec = get_task("alpaca")
    rows = load_rows(spec, "eval", data_dir, limit=30)
    assert any(r["input"] for r in rows) and any(not r["input"] for r in rows)
    examples = encode_causal_lm(rows, spec, minilm_tokenizer, max_length=512)
    assert len(examples) == 30
    for row, ex in zip(rows, examples):
        ids, labels = ex["input_ids"], ex["labels"]
        prompt = format_alpaca_prompt(row["instruction"], row["input"])
        n_prompt = 1 + len(minilm_tokenizer(prompt, add_special_tokens=False)["input_ids"])  # [CLS] + prompt
        assert ids[0] == CLS and ids[-1] == SEP  # MiniLM has no EOS: SEP ends the response
        assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert labels[n_prompt:] == ids[n_prompt:]
        response = minilm_tokenizer(row["output"], add_special_tokens=False)["input_ids"]
        assert labels[n_prompt:] == response + [SEP]
    assert get_task("alpaca").kind == "causal_lm"


def test_alpaca_truncated_to_max_length(data_dir: Path, minilm_tokenizer: Any) -> None:
    spec = get_task("alpaca")
    examples = encode(load_rows(spec, "eval", data_dir, limit=50), spec, minilm_tokenizer, max_length=80)
    assert examples and all(len(ex["input_ids"]) <= 80 for ex in examples)
    assert all(any(label != IGNORE_INDEX for label in ex["labels"]) for ex in examples)


# ---------------------------------------------------------------- collate and batches


def test_collate_right_pads_classification() -> None:
    batch = collate([
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "token_type_ids": [0, 0, 1], "labels": 1},
        {"input_ids": [8], "attention_mask": [1], "token_type_ids": [0], "labels": 0},
    ], pad_token_id=9)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 1], [0, 0, 0]]
    assert batch["labels"].tolist() == [1, 0] and batch["labels"].dtype == torch.long
    assert batch["input_ids"].dtype == torch.long


def test_collate_pads_lm_labels_with_ignore_index() -> None:
    tok = CharTokenizer()
    rows = [{"instruction": "a", "output": "bcd"}, {"instruction": "a", "output": "b"}]
    examples = encode_causal_lm(rows, _lm_spec(), tok, 1000)
    batch = collate(examples, pad_token_id=0)
    short = len(examples[1]["input_ids"])
    assert batch["input_ids"].shape == batch["labels"].shape == (2, short + 2)
    assert batch["input_ids"][1, short:].tolist() == [0, 0]
    assert batch["labels"][1, short:].tolist() == [IGNORE_INDEX, IGNORE_INDEX]
    assert batch["attention_mask"].sum(dim=1).tolist() == [short + 2, short]


def test_collate_errors() -> None:
    with pytest.raises(ValueError, match="empty batch"):
        collate([], 0)
    with pytest.raises(ValueError, match="example 1 has keys"):
        collate([{"input_ids": [1], "labels": 0}, {"input_ids": [1]}], 0)
    with pytest.raises(ValueError, match="pad_token_id is None"):
        collate([{"input_ids": [1]}], None)  # type: ignore[arg-type]


def _indexed(n: int) -> list[dict[str, Any]]:
    return [{"input_ids": [10 + i] * (1 + i % 3), "attention_mask": [1] * (1 + i % 3), "labels": i} for i in range(n)]


def _order(examples: list[dict[str, Any]], **kwargs: Any) -> list[int]:
    return [i for b in batches(examples, 4, pad_token_id=0, **kwargs) for i in b["labels"].tolist()]


def test_batches_deterministic_and_complete() -> None:
    examples = _indexed(10)
    assert _order(examples) == list(range(10))
    first = _order(examples, shuffle=True, seed=7, epoch=0)
    assert first == _order(examples, shuffle=True, seed=7, epoch=0)
    assert sorted(first) == list(range(10)) and first != list(range(10))
    assert first != _order(examples, shuffle=True, seed=7, epoch=1)
    assert first != _order(examples, shuffle=True, seed=8, epoch=0)
    assert batch_order(10, shuffle=True, seed=7, epoch=0).tolist() == first


def test_batches_sizes_and_drop_last() -> None:
    examples = _indexed(10)
    sizes = [b["input_ids"].shape[0] for b in batches(examples, 4, pad_token_id=0)]
    assert sizes == [4, 4, 2] and num_batches(10, 4) == 3
    sizes = [b["input_ids"].shape[0] for b in batches(examples, 4, pad_token_id=0, drop_last=True)]
    assert sizes == [4, 4] and num_batches(10, 4, drop_last=True) == 2
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        next(batches(examples, 0, pad_token_id=0))
