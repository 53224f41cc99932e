"""Methods that need the training loop's help (FishMask, diff pruning, AdaLoRA) train through train()."""

from __future__ import annotations

import json
import math

import pytest

from unipeft.train import TrainConfig, train


@pytest.mark.parametrize("method, options", [
    ("fishmask", {}),                    # chooses its entries on training batches before the optimizer exists
    ("diff_pruning", {"prune_at": 0.5}),  # prunes at step 2 of 4; the optimizer is rebuilt over the kept entries
    ("adalora", {"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 1, "deltaT": 1}),  # orth loss + on_step
])
def test_methods_with_trainer_hooks(tmp_path, tiny_llama_folder, method, options):
    config = TrainConfig(model=tiny_llama_folder, task="alpaca", method=method, method_options=options, max_steps=4,
                         batch_size=4, max_length=96, train_limit=16, eval_limit=4, threads=1, progress=False,
                         output_dir=str(tmp_path))
    result = train(config)
    losses = [r["loss"] for r in json.loads((tmp_path / "history.json").read_text())["train"]]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert math.isfinite(result.metrics["loss"]) and result.trainable_params > 0
