"""Generation tasks: prompt templates, evaluation rows grouped by prompt, encoding with the loss on the target."""

from __future__ import annotations

import json

import pytest

from unipeft.data import IGNORE_INDEX, TaskSpec, encode, get_task, jsonl_task, load_rows, prompt_text


def test_e2e_eval_limit_counts_meaning_representations(data_dir):
    task = get_task("e2e")
    rows = load_rows(task, "eval", data_dir, limit=3)
    mrs = list(dict.fromkeys(r["meaning_representation"] for r in rows))
    assert len(mrs) == 3
    every = load_rows(task, "eval", data_dir)
    assert rows == [r for r in every if r["meaning_representation"] in mrs]  # all references of each kept MR
    assert len(rows) > 3
    assert prompt_text(rows[0], task) == ("Describe the restaurant in one sentence.\nAttributes: "
                                          f"{rows[0]['meaning_representation']}\nDescription:\n")


def test_ro_en_trains_on_mlqe_and_scores_on_newstest2016(data_dir):
    task = get_task("ro_en")
    train = load_rows(task, "train", data_dir, limit=2)
    test = load_rows(task, "eval", data_dir, limit=2)
    assert set(train[0]) >= {"ro", "en", "hter"}  # MLQE-PE rows
    assert test[0]["en"] == "UN Chief Says There Is No Military Solution in Syria"  # newstest2016's first line
    assert task.main_metric == "bleu" and task.greater_is_better


def test_encoding_puts_the_loss_on_the_target_only(minilm_tokenizer, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"src": "bună ziua", "tgt": "good day"}) + "\n", encoding="utf-8")
    task = jsonl_task(train_path=path, eval_path=path, kind="generation", prompt_template="ro: {src}\nen:\n",
                      response_field="tgt")
    assert task.metrics == ("bleu", "rouge_l", "perplexity") and task.main_metric == "bleu"
    (example,) = encode(load_rows(task, "train"), task, minilm_tokenizer, 64)
    target = [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
    assert minilm_tokenizer.decode(target[:-1]) == "good day"  # then the end token ([SEP] for this tokenizer)
    assert target[-1] == minilm_tokenizer.sep_token_id


@pytest.mark.parametrize("changes, message", [
    ({"prompt_template": None}, "generation needs prompt_template and response_field"),
    ({"prompt_template": "no field here"}, "names no field"),
    ({"prompt_template": "{src!r}"}, "only plain {field} placeholders"),
    ({"prompt_template": "{src", }, "bad prompt_template"),
    ({"text_fields": ("src",)}, "generation uses prompt_template/response_field only"),
    ({"metrics": ("accuracy",), "main_metric": "accuracy"}, "does not fit kind 'generation'"),
    ({"max_new_tokens": 0}, "max_new_tokens must be a positive integer"),
])
def test_generation_task_validation(changes, message):
    base = dict(name="t", kind="generation", train_path="a", eval_path="b", prompt_template="x {src}",
                response_field="tgt", metrics=("bleu",), main_metric="bleu")
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("(", r"\(")):
        TaskSpec(**{**base, **changes})


def test_a_missing_template_field_names_the_row_fields():
    task = TaskSpec(name="t", kind="generation", train_path="a", eval_path="b", prompt_template="x {src}",
                    response_field="tgt", metrics=("bleu",), main_metric="bleu")
    with pytest.raises(ValueError, match="row 4 has no field 'src'.*its fields: source, tgt"):
        task.format_prompt({"source": "s", "tgt": "t"}, 4)
