"""unipeft's own loop keeps the forms' training contract: FishMask chooses by Fisher information before the
optimizer exists, diff pruning prunes at prune_at and trains the kept entries, AdaLoRA ends at its rank budget."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import unipeft
from unipeft.methods.adalora import AdaLoRA
from unipeft.methods.sparse import FishMaskConfig, SparseDelta
from unipeft.train import TrainConfig, train


@pytest.mark.parametrize("method, options", [
    ("fishmask", {}),                    # chooses its entries on training batches before the optimizer exists
    ("diff_pruning", {"prune_at": 0.5}),  # prunes at step 2 of 4; the optimizer is rebuilt over the kept entries
    ("adalora", {"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 1, "deltaT": 1}),  # orth loss + on_step
])
def test_methods_with_a_training_contract(tmp_path, tiny_llama_folder, method, options):
    config = TrainConfig(model=tiny_llama_folder, task="alpaca", method=method, method_options=options, max_steps=4,
                         batch_size=4, max_length=96, train_limit=16, eval_limit=4, threads=1, progress=False,
                         output_dir=str(tmp_path))
    result = train(config)
    losses = [r["loss"] for r in json.loads((tmp_path / "history.json").read_text())["train"]]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert math.isfinite(result.metrics["loss"]) and result.trainable_params > 0

    peft = unipeft.load_adapter(AutoModelForCausalLM.from_pretrained(tiny_llama_folder), str(tmp_path / "adapter"))
    forms = [p.form for _, p in peft.delta_modules()]
    if method == "adalora":
        sites = [f for f in forms if isinstance(f, AdaLoRA)]
        assert sum(site.rank for site in sites) == 2 * len(sites)  # the final budget, target_r x sites
    else:
        sparse = [f for f in forms if isinstance(f, SparseDelta)]
        assert sparse and all(f.indices is not None for f in sparse)
        assert any(f.values.abs().sum() > 0 for f in sparse)  # the kept entries trained
    if method == "fishmask":  # not the random placeholder each site starts with
        placeholders = [FishMaskConfig().build(_shape(f)).indices for f in sparse]
        assert any(not torch.equal(f.indices, r) for f, r in zip(sparse, placeholders))


def _shape(form: SparseDelta):
    from unipeft.core.delta import SiteShape

    return SiteShape(d_in=form.d_in, d_out=form.d_out, base=torch.nn.Linear(form.d_in, form.d_out))
