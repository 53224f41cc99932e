"""Helpers for the HF peft interop tests: HF peft (installed as an independent reference) on one side, unipeft on
the other, the same base weights on both, and the largest output difference between them.

    def test_x(hf_check, tiny):
        hf_check.hf_to_unipeft(tiny.model("llama"), peft.LoraConfig(...), tiny.batch("llama"))   # returns the diff
        hf_check.unipeft_to_hf(tiny.model("llama"), recipe, tiny.batch("llama"))
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import unipeft
from unipeft.interop import load_hf_adapter, save_hf_adapter

peft = pytest.importorskip("peft")

TOL = 1e-5  # float32


def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The no-grad logits and last hidden states of ``model`` on ``batch``, flattened (labels dropped, except as
    decoder inputs of encoder-decoders)."""
    config = getattr(model, "config", None)
    keep_labels = bool(getattr(config, "is_encoder_decoder", False))
    inputs = {k: v for k, v in batch.items() if k != "labels" or keep_labels}
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    hidden = getattr(out, "decoder_hidden_states", None) or out.hidden_states
    return torch.cat([out.logits.flatten(), hidden[-1].flatten()])  # a tiny BERT's logits alone are ~1e-2


def randomize_hf(model: nn.Module, seed: int = 0, std: float = 0.2) -> None:
    """Move every trainable parameter of an HF PeftModel away from its init (lora_B = 0, ia3_l = 1, ...) so the
    adapter changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * std)


def randomize_unipeft(handle: unipeft.Peft, seed: int = 1, std: float = 0.2) -> None:
    """The same for every delta of a unipeft adapter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, placed in handle.delta_modules():
            for p in placed.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * std)


class HFCheck:
    """Round trips between HF peft and unipeft on the same base weights (see the module docstring)."""

    tol = TOL

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.count = 0

    def _dir(self, tag: str) -> Path:
        self.count += 1
        return self.folder / f"{tag}{self.count}"

    def hf_to_unipeft(self, base: nn.Module, config: Any, batch: dict[str, torch.Tensor],
                      seed: int = 0) -> tuple[float, unipeft.Peft]:
        """Create and randomise an adapter with HF peft, save it, load it with unipeft on a copy of the same base
        (and check that both train the same number of parameters).

        Returns:
            (max abs logit difference HF vs unipeft, the unipeft handle).
        """
        untouched = copy.deepcopy(base)
        hf_model = peft.get_peft_model(copy.deepcopy(base), config)
        randomize_hf(hf_model, seed)
        hf_model.eval()
        want = logits(hf_model, batch)
        assert (want - logits(untouched, batch)).abs().max() > 1e-2, "the HF adapter does not change the outputs"
        folder = self._dir("hf")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf_model.save_pretrained(folder)
        handle = load_hf_adapter(base, folder)
        trainable = sum(p.numel() for p in handle.trainable_parameters())
        assert trainable == hf_model.get_nb_trainable_parameters()[0], "trainable parameter counts differ"
        return float((logits(base, batch) - want).abs().max()), handle

    def unipeft_to_hf(self, base: nn.Module, recipe: Any, batch: dict[str, torch.Tensor], seed: int = 1,
                      **options: Any) -> tuple[float, dict[str, Any]]:
        """Attach and randomise a unipeft adapter, save it in HF's format, load that with ``PeftModel.from_pretrained``
        on a copy of the same base.

        Returns:
            (max abs logit difference unipeft vs HF, the written adapter_config.json as a dict).
        """
        import json

        untouched = copy.deepcopy(base)
        handle = unipeft.attach(base, recipe, **options)
        randomize_unipeft(handle, seed)
        want = logits(base, batch)
        assert (want - logits(untouched, batch)).abs().max() > 1e-2, "the unipeft adapter does not change the outputs"
        folder = self._dir("unipeft")
        save_hf_adapter(handle, folder)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf_model = peft.PeftModel.from_pretrained(untouched, folder).eval()
        config = json.loads((folder / "adapter_config.json").read_text())
        return float((logits(hf_model, batch) - want).abs().max()), config


@pytest.fixture
def hf_check(tmp_path: Path) -> HFCheck:
    """Round-trip helpers between HF peft and unipeft (see :class:`HFCheck`)."""
    return HFCheck(tmp_path)
