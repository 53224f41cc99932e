"""Greedy generation and generation-task scoring, on a tiny random LLaMA with MiniLM's tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

from unipeft.data import jsonl_task, load_rows, text_metrics
from unipeft.models import load_model
from unipeft.train.generation import evaluate_generation, first_line, generate, prompt_groups


@pytest.fixture
def tiny(tiny_llama_folder):
    torch.set_num_threads(1)
    return load_model(tiny_llama_folder, kind="causal_lm")


def test_batched_left_padded_generation_equals_one_at_a_time(tiny):
    model, tokenizer = tiny
    prompts = ["translate : hello world", "a", "the quick brown fox jumps over"]
    batched = generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    single = [generate(model, tokenizer, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert batched == single
    assert all(isinstance(t, str) for t in batched) and any(batched)
    assert not model.training


def test_first_line():
    assert first_line("  The pub.\nSecond line") == "The pub."
    assert first_line("\n") == ""


def test_evaluate_generation_groups_references_by_prompt(tiny, tmp_path):
    model, tokenizer = tiny
    rows = [{"mr": "name[A]", "text": "A is a pub."}, {"mr": "name[A]", "text": "There is A."},
            {"mr": "name[B]", "text": "B is cheap."}]
    path = tmp_path / "e2e.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    task = jsonl_task(train_path=path, eval_path=path, kind="generation", prompt_template="mr: {mr}\ntext:\n",
                      response_field="text", max_new_tokens=5)
    groups = prompt_groups(load_rows(task, "eval"), task)
    assert groups == [("mr: name[A]\ntext:\n", ["A is a pub.", "There is A."]), ("mr: name[B]\ntext:\n", ["B is cheap."])]
    metrics, generations = evaluate_generation(model, tokenizer, task, rows, batch_size=2)
    assert set(metrics) == {"bleu", "rouge_l"}
    outputs = [g["output"] for g in generations]
    assert outputs == [first_line(t) for t in generate(model, tokenizer, [p for p, _ in groups], max_new_tokens=5,
                                                      batch_size=1)]
    assert metrics == text_metrics(["bleu", "rouge_l"], outputs, [refs for _, refs in groups])
