"""DDP on CPU with gloo and 2 real processes: the same trajectory as one process on the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from unipeft.train import TrainConfig, train
from unipeft.train.distributed import Strategy


def run_config(tmp_path, tiny_llama_folder, data_dir, **changes) -> dict:
    return dict(model=tiny_llama_folder, task="alpaca", max_steps=4, max_length=64, train_limit=24, eval_limit=8,
                batch_size=6, eval_batch_size=8, lr=5e-3, threads=1, progress=False, data_dir=str(data_dir),
                output_dir=str(tmp_path), **changes)


def adapter(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize("accum", [1, 2])
def test_ddp_on_two_ranks_follows_one_process(tmp_path, tiny_llama_folder, data_dir, accum):
    """2 ranks at batch 6 (3 examples each) = 1 process at batch 6: losses and the final adapter agree to within
    float32 rounding (rtol 1e-4), with or without accumulation; rank 0 alone writes the outputs."""
    single = train(TrainConfig(**run_config(tmp_path / "one", tiny_llama_folder, data_dir, grad_accum_steps=accum)))
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(run_config(tmp_path / "ddp", tiny_llama_folder, data_dir,
                                              grad_accum_steps=accum)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "unipeft", "train", str(path), "--nproc", "2"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 4
    one = json.loads((tmp_path / "one" / "history.json").read_text())["train"]
    two = json.loads((tmp_path / "ddp" / "history.json").read_text())["train"]
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-4)
    a, b = adapter(tmp_path / "one"), adapter(tmp_path / "ddp")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)
    assert metrics["metrics"]["loss"] == pytest.approx(single.metrics["loss"], rel=1e-4)


def test_single_process_strategy_is_a_no_op():
    s = Strategy()
    assert s.share([1, 2, 3]) == ([1, 2, 3], 1.0) and s.sum(2.5) == 2.5 and s.broadcast("x") == "x" and s.is_main
