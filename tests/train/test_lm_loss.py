"""The causal-LM loss: the chunked head equals the full cross-entropy (value and gradients), and the model's loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import unipeft
from unipeft.models import load_model
from unipeft.train.lm_loss import causal_lm_loss_sum, chunked_cross_entropy, label_count


@pytest.mark.parametrize("chunk", [1, 7, 101, 1000])
def test_chunked_cross_entropy_equals_the_full_one(chunk):
    torch.manual_seed(0)
    h = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(101, 16, dtype=torch.float64, requires_grad=True)
    b = torch.randn(101, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 101, (37,))
    got = chunked_cross_entropy(h, w, t, bias=b, chunk=chunk)
    grads = torch.autograd.grad(got, (h, w, b))
    want = F.cross_entropy(h @ w.t() + b, t, reduction="sum")
    expected = torch.autograd.grad(want, (h, w, b))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-10)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


def test_frozen_head_gets_no_gradient_and_bad_inputs_are_refused():
    h = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(10, 8)
    chunked_cross_entropy(h, w, torch.tensor([0, 3, 9, 2]), chunk=4).backward()
    assert h.grad is not None and w.grad is None
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        chunked_cross_entropy(h, w, torch.tensor([0, 1, 2, 3]), chunk=0)
    with pytest.raises(ValueError, match="expected hidden"):
        chunked_cross_entropy(h, w, torch.tensor([0, 1]))


def test_the_loss_on_labelled_positions_equals_the_models_own(tiny_llama_folder):
    model, _ = load_model(tiny_llama_folder, kind="causal_lm")
    peft = unipeft.attach(model, "lora")
    torch.manual_seed(1)
    ids = torch.randint(5, 1000, (3, 12))
    labels = ids.clone()
    labels[:, :5] = -100  # the prompt
    labels[2, 9:] = -100  # padding
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    reference = model(**batch).loss * label_count(labels)
    for chunk in (None, 64, 8192):
        torch.testing.assert_close(causal_lm_loss_sum(model, batch, chunk=chunk), reference, rtol=1e-5, atol=1e-5)
    # the gradient reaches the adapter the same way
    got = torch.autograd.grad(causal_lm_loss_sum(model, batch, chunk=64), peft.trainable_parameters())
    want = torch.autograd.grad(model(**batch).loss * label_count(labels), peft.trainable_parameters())
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


def test_a_wrapped_model_whose_body_holds_the_head_gets_the_full_logits_path(tiny_llama_folder):
    """HF peft's PeftModel forwards attribute lookups, so its ``base_model_prefix`` body is the whole causal LM
    (head included): the loss must then run the model whole, and still equal the model's own loss."""
    peft_lib = pytest.importorskip("peft")
    model, _ = load_model(tiny_llama_folder, kind="causal_lm")
    wrapped = peft_lib.get_peft_model(model, peft_lib.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(2)
    ids = torch.randint(5, 1000, (2, 10))
    labels = ids.clone()
    labels[:, :4] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    reference = wrapped(**batch).loss * label_count(labels)
    torch.testing.assert_close(causal_lm_loss_sum(wrapped, batch, chunk=64), reference, rtol=1e-5, atol=1e-5)
