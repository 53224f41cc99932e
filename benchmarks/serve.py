"""Serving many adapters: ``unipeft serve`` against its own one-adapter-per-step mode and HF peft's static batches.

A load generator sends R requests at once (mixed output lengths, greedy) to a running ``unipeft serve`` over K distinct
LoRA adapters drawn by one of Punica's popularity mixes — ``distinct`` (request i uses adapter i mod K), ``uniform``
(random), ``skewed`` (Zipf-like, a few adapters get most requests), ``identical`` (all use one) — and measures
throughput (requests/s, output tokens/s) and streaming latencies (time to first token, time per output token; p50,
p99). In the same run, the baselines:

* the same server started with ``--no-mixed`` (each step decodes the rows of one adapter, groups in turn: a server
  that switches ``set_active`` between batches);
* HF peft + transformers ``generate(adapter_names=...)`` with static batches of the same size in arrival order (each
  batch runs until its longest request ends).

    python benchmarks/serve.py --adapters 32 --requests 48 --out results/serve.json
    python benchmarks/serve.py --dtype bfloat16        # every contender in bf16 (default auto: the servers' rule)

``--dtype`` applies to all three contenders (HF peft's model and adapters are cast to it after loading, as the
servers load theirs in the base's dtype); ``auto`` is resolved once, by the servers' capability rule.

Prints one table and the ratios; docs/serving.md records the figures with the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from unipeft.serve import resolve_dtype
from unipeft.serve.config import SERVE_DTYPES
from unipeft.serve.engine import _contiguous_head

ROOT = Path(__file__).resolve().parents[1]

PROMPTS = ["The capital of France is", "Once upon a time", "def add(a, b):", "My favourite colour is",
           "The best way to learn is", "In 1969, the first", "Water boils at", "A good breakfast has"]
MIXES = ("distinct", "uniform", "skewed", "identical")
MODES = ("mixed", "one adapter per step", "hf peft static")


def make_adapters(folder: Path, count: int) -> None:
    """``count`` LoRA adapters (r=8 at q, v; random B) on SmolLM2, in HF peft's format (both servers read it)."""
    import unipeft
    from unipeft.interop import save_hf_adapter
    from unipeft.models import load_model

    model, _ = load_model("smollm2-135m", kind="causal_lm")
    peft = unipeft.attach(model, "lora", name="a0")
    g = torch.Generator().manual_seed(0)
    for i in range(count):
        if i:
            peft.add("lora", f"a{i}")
        with torch.no_grad():
            for _, placed in peft.delta_modules(f"a{i}"):
                placed.form.lora_B.normal_(0.0, 0.1, generator=g)
        save_hf_adapter(peft, folder / f"a{i}", f"a{i}")


def workload(mix: str, adapters: int, requests: int, seed: int = 0) -> list[tuple[str, str, int]]:
    """(adapter, prompt, max_tokens) per request; output lengths 8..32."""
    rng = random.Random(seed)
    weights = [1.0 / (k + 1) ** 1.5 for k in range(adapters)]
    out = []
    for i in range(requests):
        if mix == "distinct":
            k = i % adapters
        elif mix == "uniform":
            k = rng.randrange(adapters)
        elif mix == "skewed":
            k = rng.choices(range(adapters), weights)[0]
        else:
            k = 0
        out.append((f"a{k}", PROMPTS[i % len(PROMPTS)], rng.choice((8, 16, 24, 32))))
    return out


async def _drive(url: str, jobs: list[tuple[str, str, int]]) -> dict:
    async with httpx.AsyncClient(timeout=600) as client:
        async def one(adapter: str, prompt: str, tokens: int) -> tuple[float, list[float], int]:
            start = time.perf_counter()
            stamps: list[float] = []
            async with client.stream("POST", f"{url}/v1/completions", json={
                    "model": adapter, "prompt": prompt, "max_tokens": tokens, "temperature": 0,
                    "stream": True}) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if line.startswith("data: {") and '"text"' in line and json.loads(line[6:])["choices"]:
                        stamps.append(time.perf_counter())
            return start, stamps, tokens

        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(*job) for job in jobs))
        wall = time.perf_counter() - t0
    ttft = [s[0] - start for start, s, _ in results if s]
    tpot = [b - a for _, s, _ in results for a, b in zip(s, s[1:])]
    tokens = sum(t for *_, t in results)
    return {"wall_s": wall, "requests_per_s": len(jobs) / wall, "tokens_per_s": tokens / wall,
            "ttft_p50_s": _q(ttft, 0.5), "ttft_p99_s": _q(ttft, 0.99), "tpot_p50_s": _q(tpot, 0.5),
            "tpot_p99_s": _q(tpot, 0.99)}


def _q(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def hf_model(folder: Path, adapters: int, dtype: torch.dtype) -> tuple[Any, Any]:
    """HF peft's model on SmolLM2 with every adapter loaded, cast to ``dtype``, and its left-padding tokenizer."""
    from peft import PeftModel

    from unipeft.models import load_model

    model, tokenizer = load_model("smollm2-135m", kind="causal_lm")
    model = PeftModel.from_pretrained(model, str(folder / "a0"), adapter_name="a0")
    for i in range(1, adapters):
        model.load_adapter(str(folder / f"a{i}"), adapter_name=f"a{i}")
    model.to(dtype).eval()
    tokenizer.padding_side = "left"
    return model, tokenizer


def hf_static(model: Any, tokenizer: Any, jobs: list[tuple[str, str, int]], batch: int) -> dict:
    """Static batches of ``batch`` in arrival order, each until its longest request ends, ``adapter_names=`` per
    row."""
    start = time.perf_counter()
    tokens = 0
    for at in range(0, len(jobs), batch):
        chunk = jobs[at:at + batch]
        inputs = tokenizer([p for _, p, _ in chunk], return_tensors="pt", padding=True)
        # the engine's bf16 prefill fix given to the peer too: generate() also slices the last position for a frozen
        # head, and on CPU in bf16 that alone made its 16-row prefill 3x slower; with it the ratio measures the
        # batching, not a torch quirk one side works around
        with torch.no_grad(), _contiguous_head(model):
            model.generate(**inputs, adapter_names=[a for a, _, _ in chunk], do_sample=False,
                           max_new_tokens=max(t for *_, t in chunk), pad_token_id=tokenizer.pad_token_id)
        tokens += sum(t for *_, t in chunk)
    wall = time.perf_counter() - start
    return {"wall_s": wall, "requests_per_s": len(jobs) / wall, "tokens_per_s": tokens / wall}


def median_run(rounds: list[dict]) -> dict:
    """Each figure's median over the rounds, and every round's tokens/s."""
    out = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    out["rounds_tokens_per_s"] = [r["tokens_per_s"] for r in rounds]
    return out


def _server_helpers() -> Any:
    """tests/serve/conftest.py, by its path (the tests' way to start and stop a real ``unipeft serve``)."""
    spec = importlib.util.spec_from_file_location("unipeft_serve_helpers", ROOT / "tests" / "serve" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--mixes", nargs="+", default=list(MIXES), choices=MIXES)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES,
                        help="the contenders (default all; the ratios need mixed and the peer they divide by)")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds; each figure is the rounds' median")
    parser.add_argument("--dtype", default="auto", choices=SERVE_DTYPES,
                        help="every contender's dtype (auto: bfloat16 where the CPU multiplies it natively, else float32)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    helpers = _server_helpers()
    start_server, stop_server = helpers.start_server, helpers.stop_server

    dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    dtype_name = str(dtype).removeprefix("torch.")
    print(f"dtype: {dtype_name} (asked: {args.dtype})", flush=True)
    results: dict = {"setup": {**vars(args), "dtype_used": dtype_name}}
    modes = tuple(m for m in MODES if m in args.modes)
    rounds: dict[str, list[dict]] = {f"{mode} / {mix}": [] for mode in modes for mix in args.mixes}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_adapters(folder, args.adapters)
        servers = {}
        try:
            for mode, extra in (("mixed", ()), ("one adapter per step", ("--no-mixed",))):
                if mode not in modes:
                    continue
                servers[mode] = start_server(folder, *extra, "--dtype", dtype_name, "--max-batch", str(args.batch),
                                             "--queue-size", "1024", "--max-resident", str(args.adapters + 2),
                                             "--max-tokens", "32", pinned=())
            contenders = {mode: (lambda jobs, url=url: asyncio.run(_drive(url, jobs)))
                          for mode, (_, url) in servers.items()}
            if "hf peft static" in modes:
                model, tokenizer = hf_model(folder, args.adapters, dtype)
                contenders["hf peft static"] = lambda jobs: hf_static(model, tokenizer, jobs, args.batch)
            for run in contenders.values():  # loads every adapter, then one unmeasured pass at the measured size
                run(workload("distinct", args.adapters, args.adapters))
                run(workload("distinct", args.adapters, args.requests, seed=1))
            for r in range(args.rounds):  # every contender in every round, the order rotating: drift hits all
                order = list(modes[r % len(modes):] + modes[:r % len(modes)])
                for mix in args.mixes:
                    jobs = workload(mix, args.adapters, args.requests)
                    for mode in order:
                        rounds[f"{mode} / {mix}"].append(contenders[mode](jobs))
                        print(f"round {r} {mode} / {mix}: {rounds[f'{mode} / {mix}'][-1]['tokens_per_s']:.1f} tok/s",
                              flush=True)
        finally:
            for process, _ in servers.values():
                stop_server(process)
    results.update({key: median_run(runs) for key, runs in rounds.items()})
    peers = {"mixed/hf_static": "hf peft static", "mixed/one_per_step": "one adapter per step",
             "mixed/mixed_identical": "mixed"}
    ratios = {}
    for mix in args.mixes:
        ratios[mix] = {}
        for name, peer in peers.items():
            against = f"{peer} / {'identical' if peer == 'mixed' else mix}"
            if "mixed" in modes and against in results:
                ratios[mix][name] = results[f"mixed / {mix}"]["tokens_per_s"] / results[against]["tokens_per_s"]
            else:
                ratios[mix][name] = None
    results["ratios"] = ratios
    print(f"\n{'run':<34} {'req/s':>7} {'tok/s':>7} {'TTFT p50':>9} {'p99':>7} {'TPOT p50':>9} {'p99':>7}")
    for key, r in results.items():
        if key in ("setup", "ratios"):
            continue
        print(f"{key:<34} {r['requests_per_s']:7.2f} {r['tokens_per_s']:7.1f} {r.get('ttft_p50_s', float('nan')):9.3f} "
              f"{r.get('ttft_p99_s', float('nan')):7.3f} {r.get('tpot_p50_s', float('nan')):9.3f} "
              f"{r.get('tpot_p99_s', float('nan')):7.3f}")
    for mix, r in ratios.items():
        print(f"{mix:<10} " + "  ".join(f"{k} = {v:.2f}" for k, v in r.items() if v is not None))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
