"""DDP and FSDP2 on CPU with gloo and 2 real processes: the same trajectory as one process on the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from unipeft.train import TrainConfig, train
from unipeft.train.distributed import Strategy


def run_config(tmp_path, tiny_llama_folder, data_dir, **changes) -> dict:
    return {**dict(model=tiny_llama_folder, task="alpaca", max_steps=4, max_length=64, train_limit=24, eval_limit=8,
                   batch_size=6, eval_batch_size=8, lr=5e-3, threads=1, progress=False, data_dir=str(data_dir),
                   output_dir=str(tmp_path)), **changes}


def adapter(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize("strategy,accum", [("ddp", 1), ("ddp", 2), ("fsdp", 2)])
def test_two_ranks_follow_one_process(tmp_path, tiny_llama_folder, data_dir, strategy, accum):
    """2 ranks at batch 6 (3 examples each) = 1 process at batch 6: losses and the final adapter agree to within
    float32 rounding (rtol 1e-4), with or without accumulation, under DDP (the base whole on each rank) and FSDP2
    (the base sharded over the ranks, evaluation through the sharded model); rank 0 alone writes the outputs."""
    single = train(TrainConfig(**run_config(tmp_path / "one", tiny_llama_folder, data_dir, grad_accum_steps=accum)))
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(run_config(tmp_path / "ddp", tiny_llama_folder, data_dir,
                                              grad_accum_steps=accum, strategy=strategy)))
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


def _shard_rank(rank: int, port: int, out: str) -> None:
    """Rank ``rank`` of 2: a tiny LLaMA with LoRA wrapped by FSDPStrategy; what each parameter became."""
    import transformers
    from torch.distributed.tensor import DTensor

    import unipeft
    from tests.conftest import tiny_config
    from unipeft.train.distributed import FSDPStrategy, LossModule

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_config("llama"))
    peft = unipeft.attach(model, "lora")
    full = {id(p): p.numel() for p in model.parameters()}
    ranks = FSDPStrategy()
    try:
        module = ranks.wrap(LossModule(model, lambda m, b, u: m(**b).loss))
        seen = {"base_full": 0, "base_local": 0, "trainable_dtensor": 0, "trainable": 0}
        for p in module.parameters():
            if p.requires_grad:
                seen["trainable"] += p.numel()
                seen["trainable_dtensor"] += isinstance(p, DTensor)
            else:
                seen["base_full"] += p.numel()
                seen["base_local"] += p.to_local().numel() if isinstance(p, DTensor) else p.numel()
        seen["trainable_expected"] = sum(p.numel() for p in peft.trainable_parameters())
        seen["all"] = sum(full.values())
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(seen))
    finally:
        ranks.close()


def test_fsdp_shards_the_frozen_base_and_keeps_the_adapter_whole(tmp_path):
    import socket
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_shard_rank, args=(port, str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert seen["trainable"] == seen["trainable_expected"] > 0 and seen["trainable_dtensor"] == 0
        assert seen["base_full"] + seen["trainable"] == seen["all"]
        assert seen["base_local"] <= 0.55 * seen["base_full"]  # half the base, give or take the padding of shards


def test_fsdp_refuses_a_quantized_base(tmp_path):
    with pytest.raises(ValueError, match="strategy fsdp cannot shard a quantized base.*strategy ddp"):
        TrainConfig(model="smollm2-135m", task="alpaca", quantization="nf4", strategy="fsdp")
    with pytest.raises(ValueError, match="unknown strategy 'zero3'; valid: ddp, fsdp"):
        TrainConfig(strategy="zero3")
