"""A rank killed with SIGKILL mid-run fails the 2-process job at once (no hang, no outputs), and rerunning the same
command resumes from the last checkpoint on the uninterrupted trajectory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
import yaml

from unipeft.train import TrainConfig, train
from unipeft.train.checkpoint import has_checkpoint

from tests.train.test_distributed import adapter, run_config

STEPS = 40


def rank_process(launcher: psutil.Process, rank: int) -> psutil.Process | None:
    """The worker of ``rank`` among the launcher's descendants (torchrun's children), if it has started."""
    for child in launcher.children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "torch.distributed.run" not in " ".join(child.cmdline()):
                return child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def test_killing_a_rank_fails_the_job_and_a_rerun_resumes_on_the_same_trajectory(tmp_path, tiny_llama_folder,
                                                                                    data_dir):
    changes = dict(max_steps=STEPS, save_every=5, eval_limit=4)
    single = train(TrainConfig(**run_config(tmp_path / "one", tiny_llama_folder, data_dir, **changes)))
    out = tmp_path / "ddp"
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(run_config(out, tiny_llama_folder, data_dir, **changes)))
    command = [sys.executable, "-m", "unipeft", "train", "--nproc", "2", str(path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    job = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    launcher = psutil.Process(job.pid)
    deadline = time.monotonic() + 120
    while not has_checkpoint(out / "checkpoint"):
        assert job.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.01)
    victim = rank_process(launcher, 1)
    assert victim is not None
    workers = launcher.children(recursive=True)
    victim.send_signal(signal.SIGKILL)
    started = time.monotonic()
    log, _ = job.communicate(timeout=120)
    assert job.returncode != 0, log[-3000:]
    assert time.monotonic() - started < 60  # the survivor is stopped, not left waiting in a collective
    assert "exitcode  : -9" in log or "Signal 9" in log or "SIGKILL" in log, log[-3000:]
    assert not (out / "metrics.json").exists() and has_checkpoint(out / "checkpoint")
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive  # torchrun and the surviving rank are gone too

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    resumed_at = [int(line.split(" at step ")[1].split()[0]) for line in rerun.stderr.splitlines()
                  if "resumed from" in line]
    assert resumed_at and 0 < resumed_at[0] < STEPS, rerun.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "history.json").read_text())["train"]
    two = json.loads((out / "history.json").read_text())["train"]
    assert [r["step"] for r in two] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-4)
    a, b = adapter(tmp_path / "one"), adapter(out)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)
    assert json.loads((out / "metrics.json").read_text())["metrics"]["loss"] == pytest.approx(single.metrics["loss"],
                                                                                            rel=1e-4)
