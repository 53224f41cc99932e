"""evaluate(): metrics in any batch order, equal to a plain loop; causal LM loss over response tokens only."""

from __future__ import annotations

import numpy as np
import torch

from unipeft.data import IGNORE_INDEX, TaskSpec, accuracy, collate
from unipeft.train.evaluate import evaluate

CLS = TaskSpec(name="toy", kind="classification", train_path="a", eval_path="b", text_fields=("t",),
               label_field="l", num_labels=3, metrics=("accuracy",), main_metric="accuracy")
LM = TaskSpec(name="toy_lm", kind="causal_lm", train_path="a", eval_path="b", prompt_field="p",
              response_field="r", metrics=("perplexity",), main_metric="perplexity")


def examples(n: int, seed: int, lm: bool = False) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(3, 12))
        ids = rng.integers(3, 100, size=length).tolist()
        if lm:
            cut = int(rng.integers(1, length))
            out.append({"input_ids": ids, "attention_mask": [1] * length,
                        "labels": [IGNORE_INDEX] * cut + ids[cut:]})
        else:
            out.append({"input_ids": ids, "attention_mask": [1] * length, "labels": int(rng.integers(0, 3))})
    return out


def test_classification_matches_a_plain_loop(tiny):
    model = tiny.model("bert")
    model.train()
    data = examples(13, seed=0)
    metrics = evaluate(model, CLS, data, batch_size=4)
    assert model.training  # put back in training mode
    with torch.no_grad():
        model.eval()
        predictions = [int(model(**collate([e], 0)).logits.argmax(-1)) for e in data]
    assert metrics["accuracy"] == accuracy(predictions, [e["labels"] for e in data])
    assert set(metrics) == {"accuracy", "loss"}


def test_causal_lm_mean_loss_over_response_tokens(tiny):
    model = tiny.model("llama")
    data = examples(7, seed=1, lm=True)
    metrics = evaluate(model, LM, data, batch_size=3)
    total, count = 0.0, 0
    with torch.no_grad():
        for e in data:  # the model's own loss is the mean over the example's response tokens
            n = sum(label != IGNORE_INDEX for label in e["labels"][1:])
            total += float(model(**collate([e], 0)).loss) * n
            count += n
    assert abs(metrics["loss"] - total / count) < 1e-5
    assert abs(metrics["perplexity"] - float(np.exp(total / count))) < 1e-3


def test_causal_lm_evaluation_never_builds_the_full_logits(tiny):
    """The loss is computed as training computes it: the head's weight at labelled positions only, chunked over the
    vocabulary, so the LM head module never runs over a (B, T, V) batch; the value is the model's own loss."""
    model = tiny.model("llama")
    calls = []
    model.get_output_embeddings().register_forward_hook(lambda module, args, out: calls.append(out.shape))
    data = examples(5, seed=2, lm=True)
    metrics = evaluate(model, LM, data, batch_size=5)
    assert calls == []
    with torch.no_grad():
        n = [sum(label != IGNORE_INDEX for label in e["labels"][1:]) for e in data]
        reference = sum(float(model(**collate([e], 0)).loss) * k for e, k in zip(data, n)) / sum(n)
    assert len(calls) == len(data)  # the reference did run the head, once per example
    assert abs(metrics["loss"] - reference) < 1e-5
