"""Every test here runs the tiny models single-threaded (see ``single_thread`` in tests/conftest.py)."""

import pytest


@pytest.fixture(autouse=True)
def _single_thread(single_thread: None) -> None:
    """Apply the shared ``single_thread`` fixture to every test of this folder."""


def _sst2_rows(n: int) -> list[dict]:
    """The first ``n`` rows of the real SST-2 training split (skips the test when the data directory lacks it)."""
    import gzip
    import json

    from unipeft.data import resolve_data_dir

    try:
        path = resolve_data_dir() / "glue" / "sst2" / "train.jsonl.gz"
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return [json.loads(next(f)) for _ in range(n)]
    except FileNotFoundError as e:
        pytest.skip(f"SST-2 is not available: {e}")


@pytest.fixture
def sst2_rows():
    """``sst2_rows(n)``: the first ``n`` rows of the real SST-2 training split."""
    return _sst2_rows


@pytest.fixture
def minilm_sst2(minilm_folder: str):
    """``minilm_sst2(n=4)``: the real MiniLM as a 2-class classifier (its new head seeded with 0) and one padded
    batch (with labels) of the first ``n`` SST-2 training sentences."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    def make(n: int = 4):
        rows = _sst2_rows(n)
        batch = dict(AutoTokenizer.from_pretrained(minilm_folder)([r["sentence"] for r in rows], padding=True,
                                                                  return_tensors="pt"))
        batch["labels"] = torch.tensor([r["label"] for r in rows])
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(minilm_folder, num_labels=2), batch

    return make


def _loss_change(model, peft, batch, steps: int = 3, lr: float = 1e-2) -> float:
    """Train ``steps`` AdamW steps on ``batch`` (dropout off, so that the losses compare); the last loss minus the
    first."""
    import torch

    model.eval()
    optimizer = torch.optim.AdamW(peft.trainable_parameters(), lr=lr)
    first = None
    for _ in range(steps):
        loss = model(**batch).loss
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return model(**batch).loss.item() - first


@pytest.fixture
def loss_change():
    """``loss_change(model, peft, batch, steps=3, lr=1e-2)``: the loss after a few AdamW steps on ``batch`` minus the
    loss before (dropout off); negative when the adapter learns."""
    return _loss_change
