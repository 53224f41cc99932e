"""The largest base: a QLoRA training step on LLaMA-7B and larger LLaMA shapes, built quantized (never in float32).

Each shape runs in a fresh child process (spawned, ``MALLOC_MMAP_THRESHOLD_=65536`` so freed tensors leave the
resident set at once). The child builds the model with :func:`unipeft.models.build_quantized_model` (random weights,
every linear layer of the body NF4 with double quantization, drawn and quantized a 1 MiB slice at a time; embeddings,
norms and ``lm_head`` in the compute dtype), attaches LoRA (r=16, α=32 on ``attn.q`` and ``attn.v`` by default,
float32 factors), enables non-reentrant gradient checkpointing and runs training steps (forward with
``labels = input_ids``, backward through the 4-bit base to the LoRA factors, AdamW) on ``--batch`` × ``--seq`` random
tokens: ``--warmup`` unmeasured steps (at ``--warmup-seq`` tokens: the first step pays one-time costs that do not
depend on the sequence), then ``--steps`` measured ones.

The compute dtype is chosen by capability: bf16 where the CPU multiplies it natively
(``unipeft.train.precision.native_bf16``), float32 elsewhere. The peer is the model's own full-precision size (its
parameter count × 4 bytes): what building in float32 and quantizing afterwards would hold at least, and what the
peak is reported against. A shape whose NF4 base alone is estimated above the memory available is reported as not
fitting, without running.

    python benchmarks/big_base.py                                   # llama-7b llama-33b llama-65b, 1 x 128
    python benchmarks/big_base.py --models llama-7b --seq 256 --out big.json
    python benchmarks/big_base.py --models llama-7b --layers 2      # a quick estimate on 2 of the 32 layers
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import environment, format_table, peak_rss_bytes, reset_peak_rss, rss_bytes, write_json  # noqa: E402

GIB = 2**30


def _config(name: str, layers: int | None):
    from unipeft.models import known_config

    config = known_config(name)
    if layers is not None:
        config.num_hidden_layers = layers
    return config


def counts(name: str, layers: int | None = None) -> dict[str, int]:
    """Parameters of the shape (on the meta device): all of them, and those in the body's linear layers."""
    from torch import nn

    from unipeft.models import build_meta_model

    model = build_meta_model(_config(name, layers), "causal_lm")
    total = sum(p.numel() for p in model.parameters())
    linear = sum(m.weight.numel() for n, m in model.named_modules() if type(m) is nn.Linear and "lm_head" not in n)
    return {"params": total, "linear_params": linear}


def nf4_estimate_bytes(params: int, linear_params: int, float_bytes: int = 4) -> int:
    """The base's size in NF4 with double quantization: 4 bits a weight, an 8-bit scale per 64 weights and a float32
    one per 256 scales, plus the rest (embeddings, norms, head) in the compute dtype."""
    return int(linear_params * (0.5 + 1 / 64 + 4 / (64 * 256)) + (params - linear_params) * float_bytes)


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def child(name: str, args: argparse.Namespace, queue) -> None:
    """Build, attach, and time the steps of one shape in this fresh process; put its row on ``queue``."""
    import gc
    import warnings

    import bitsandbytes  # noqa: F401  (imported before the zero, like torch)
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401

    import unipeft
    from unipeft.models import build_quantized_model
    from unipeft.train.optim import make_optimizer
    from unipeft.train.precision import keep_trainable_fp32, native_bf16

    warnings.filterwarnings("ignore", message=".*gradient_checkpointing_enable.*", category=FutureWarning)
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if native_bf16(torch.device("cpu")) else torch.float32
    config = _config(name, args.layers)
    gc.collect()
    zero = rss_bytes()
    reset_peak_rss()
    start = time.perf_counter()
    model = build_quantized_model(config, quantization="nf4", double_quant=True, compute_dtype=dtype, seed=0)
    build_s = time.perf_counter() - start
    build_peak = peak_rss_bytes()
    peft = unipeft.attach(model, "lora", r=args.r, alpha=2 * args.r, positions=args.positions)
    keep_trainable_fp32(peft.trainable_parameters())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    opt = make_optimizer(peft.trainable_parameters(), "adamw", lr=1e-4, weight_decay=0.0, device=torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    warm_ids = torch.randint(0, config.vocab_size, (args.batch, args.warmup_seq), generator=g)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=g)
    gc.collect()
    resident = rss_bytes()
    reset_peak_rss()

    trainable = peft.trainable_parameters()
    reached: list[int] = []  # LoRA tensors a gradient reached, per step

    def step(batch: torch.Tensor) -> float:
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        reached.append(sum(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in trainable))
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    warm_s = []
    for _ in range(args.warmup):
        t = time.perf_counter()
        step(warm_ids)
        warm_s.append(time.perf_counter() - t)
    times, losses = [], []
    for _ in range(args.steps):
        t = time.perf_counter()
        losses.append(step(ids))
        times.append(time.perf_counter() - t)
    step_peak = peak_rss_bytes()
    queue.put({
        "model": name, "layers": config.num_hidden_layers, "dtype": str(dtype).removeprefix("torch."),
        "trainable": sum(p.numel() for p in trainable), "zero_bytes": zero,
        "build_s": build_s, "build_peak_bytes": build_peak, "model_resident_bytes": resident - zero,
        "step_peak_bytes": step_peak, "process_peak_bytes": max(build_peak, step_peak),
        "warmup_s": warm_s, "step_s": times, "step_median_s": statistics.median(times), "losses": losses,
        "grads_reached": reached[-1], "lora_tensors": len(trainable),
    })


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["llama-7b", "llama-33b", "llama-65b"])
    parser.add_argument("--layers", type=int, default=None, help="override the layer count (quick estimates)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--warmup-seq", type=int, default=16)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--positions", nargs="+", default=["attn.q", "attn.v"])
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    ctx = multiprocessing.get_context("spawn")
    rows = []
    for name in args.models:
        c = counts(name, args.layers)
        fp32 = 4 * c["params"]
        estimate = nf4_estimate_bytes(c["params"], c["linear_params"])
        free = available_bytes()
        row = {"model": name, **c, "fp32_bytes": fp32, "nf4_estimate_bytes": estimate, "available_bytes": free}
        if free and estimate > 0.9 * free:
            row["skipped"] = (f"does not fit: NF4 base alone ~{estimate / GIB:.1f} GiB, "
                              f"{free / GIB:.1f} GiB available")
            print(f"{name}: {row['skipped']}", flush=True)
            rows.append(row)
            continue
        print(f"{name}: {c['params'] / 1e9:.2f}B params, fp32 {fp32 / GIB:.1f} GiB, NF4 estimate "
              f"{estimate / GIB:.1f} GiB, {free / GIB:.1f} GiB available", flush=True)
        queue = ctx.Queue()
        p = ctx.Process(target=child, args=(name, args, queue))
        p.start()
        p.join()
        if p.exitcode != 0:
            row["skipped"] = f"child failed (exit code {p.exitcode}: killed for memory if -9)"
            rows.append(row)
            continue
        row.update(queue.get())
        rows.append(row)
        print(f"  built in {row['build_s']:.0f} s, step {row['step_median_s']:.1f} s, "
              f"peak {row['process_peak_bytes'] / GIB:.2f} GiB", flush=True)

    table = []
    for r in rows:
        if "skipped" in r:
            table.append([r["model"], f"{r['params'] / 1e9:.2f}", f"{r['fp32_bytes'] / GIB:.1f}", "-", "-", "-", "-",
                          "-", r["skipped"]])
            continue
        table.append([r["model"] + ("" if args.layers is None else f" ({r['layers']} layers)"),
                      f"{r['params'] / 1e9:.2f}", f"{r['fp32_bytes'] / GIB:.1f}",
                      f"{r['model_resident_bytes'] / GIB:.2f}", f"{r['build_s']:.0f}",
                      f"{r['step_median_s']:.1f}", f"{r['process_peak_bytes'] / GIB:.2f}",
                      f"{r['process_peak_bytes'] / r['fp32_bytes']:.3f}", f"loss {r['losses'][0]:.4f}"])
    print(f"NF4 + double quant base, LoRA r={args.r} on {' '.join(args.positions)}, checkpointing, AdamW, "
          f"batch {args.batch} x {args.seq}, {args.threads} threads")
    print(format_table(["model", "params B", "fp32 GiB", "model GiB", "build s", "step s", "peak GiB",
                        "peak / fp32", "note"], table))
    if args.out:
        write_json(args.out, {"args": vars(args), "rows": rows, **environment()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
