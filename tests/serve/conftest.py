"""A real ``unipeft serve`` for the tests: SmolLM2-135M with three adapters (LoRA in unipeft's format, (IA)³ in HF peft's,
and a second LoRA found on demand under the adapter folder), started as a subprocess on a free loopback port and
stopped by the fixture; plus the offline greedy outputs each adapter gives alone, the reference for every check."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

import unipeft

PROMPTS = ["The capital of France is", "Once upon a time", "def add(a, b):", "My favourite colour is"]
TOKENS = 10
ADMIN_KEY = "admin-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _randomize(peft: unipeft.Peft, name: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, placed in peft.delta_modules(name):
            for key, p in placed.named_parameters():
                if "lora_B" in key:
                    p.normal_(0.0, 0.15, generator=g)
                elif "ia3" in key:
                    p.add_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.fixture(scope="session")
def served(tmp_path_factory) -> dict[str, Any]:
    """Adapters on disk and their offline greedy continuations of PROMPTS (token ids), by adapter (None: the base)."""
    from unipeft.interop import save_hf_adapter
    from unipeft.models import load_model

    folder = tmp_path_factory.mktemp("adapters")
    model, tokenizer = load_model("smollm2-135m", kind="causal_lm")
    model.eval()
    peft = unipeft.attach(model, "lora", name="a")
    peft.add("ia3", "b")
    peft.add("lora", "c", r=4)
    for seed, name in enumerate(("a", "b", "c")):
        _randomize(peft, name, seed)
    peft.save(str(folder / "a"), "a")
    save_hf_adapter(peft, folder / "b", "b")
    peft.save(str(folder / "c"), "c")
    (folder / "outside").mkdir()
    reference: dict[Any, list[list[int]]] = {}
    for name in (None, "a", "b", "c"):
        peft.set_active(*([name] if name else []))
        outs = []
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt")
            with torch.no_grad():
                out = model.generate(**ids, max_new_tokens=TOKENS, do_sample=False)
            outs.append(out[0, ids["input_ids"].shape[1]:].tolist())
        reference[name] = outs
    assert len({str(v) for v in reference.values()}) == 4, "each adapter must change the greedy output"
    return {"dir": folder, "reference": reference, "tokenizer": tokenizer}


def start_server(adapter_dir: Path, *extra: str, pinned: tuple[str, ...] = ("a", "b")) -> tuple[subprocess.Popen, str]:
    """``unipeft serve`` on a free loopback port with the ``pinned`` adapters of ``adapter_dir`` (and the folder for
    the others), in float32 like the offline references; returns the process and the URL once /health answers."""
    port = free_port()
    command = [str(Path(sys.executable).with_name("unipeft")), "serve", "--model", "smollm2-135m",
               *[x for name in pinned for x in ("--adapter", f"{name}={adapter_dir / name}")],
               "--adapter-dir", str(adapter_dir), "--port", str(port), "--device", "cpu", "--dtype", "float32", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="2")
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"unipeft serve exited: {process.stdout.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError("unipeft serve did not come up")


def stop_server(process: subprocess.Popen) -> str:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.stdout.read() if process.stdout else ""


@pytest.fixture(scope="session")
def server(served) -> Any:
    """The running server's URL (max 4 rows per step, 8 waiting, 3 resident adapters, admin key for loading)."""
    process, url = start_server(served["dir"], "--max-batch", "4", "--queue-size", "8", "--max-resident", "3",
                                "--max-tokens", "16", "--admin-key", ADMIN_KEY)
    yield url
    stop_server(process)
