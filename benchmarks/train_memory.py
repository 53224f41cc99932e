"""Training memory of SmolLM2-135M with LoRA: fp32 against bf16, NF4, and NF4 + checkpointing + 8-bit AdamW.

Each configuration runs in a fresh child process (spawned, ``MALLOC_MMAP_THRESHOLD_=65536`` so freed tensors leave
the resident set at once): it loads the base as the configuration says, attaches LoRA (r=8, α=16 on q and v), builds
one batch of ``--batch`` × ``--seq`` random tokens whose second half is labelled (an instruction-tuning shape), runs
one warm-up step and then ``--steps`` timed steps of unipeft's trainer step (:class:`unipeft.train.step.Stepper`:
loss, backward, optimizer). The peak is ``VmHWM`` over the whole child (model included: what a user's process holds)
and the step time is the median of the timed steps. The peer is ``fp32 (full logits)``: the same model and adapter
with the plain HF loss (``model(**batch).loss``, the full (B, T, V) logits, as a Trainer computes it), measured in the
same run.

bf16 is measured only where the CPU multiplies bf16 natively (``unipeft.train.precision.native_bf16``) or on a GPU;
elsewhere it would measure an emulation 23-31x slower than fp32, so it is reported as skipped.

    python benchmarks/train_memory.py                         # 8 x 512, 3 timed steps
    python benchmarks/train_memory.py --batch 2 --seq 256 --steps 2 --out results.json
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

from _common import environment, format_table, peak_rss_bytes, write_json  # noqa: E402

CONFIGS = {
    "fp32 (full logits)": dict(precision="fp32", quantization=None, checkpointing=False, optimizer="adamw", full=True),
    "fp32": dict(precision="fp32", quantization=None, checkpointing=False, optimizer="adamw", full=False),
    "bf16": dict(precision="bf16", quantization=None, checkpointing=False, optimizer="adamw", full=False),
    "nf4": dict(precision="fp32", quantization="nf4", checkpointing=False, optimizer="adamw", full=False),
    "nf4 + ckpt + adamw_8bit": dict(precision="fp32", quantization="nf4", checkpointing=True,
                                    optimizer="adamw_8bit", full=False),
}


def child(name: str, batch: int, seq: int, steps: int, threads: int, queue) -> None:
    import torch

    import unipeft
    from unipeft.models import load_model
    from unipeft.train.optim import make_optimizer
    from unipeft.train.precision import DTYPES, keep_trainable_fp32
    from unipeft.train.step import Stepper

    torch.set_num_threads(threads)
    c = CONFIGS[name]
    model, tok = load_model("smollm2-135m", kind="causal_lm", dtype=DTYPES[c["precision"]],
                            quantization=c["quantization"], double_quant=True)
    peft = unipeft.attach(model, "lora", r=8, alpha=16, positions=["attn.q", "attn.v"])
    keep_trainable_fp32(peft.trainable_parameters())
    if c["checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    g = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(batch):
        ids = torch.randint(0, model.config.vocab_size, (seq,), generator=g).tolist()
        examples.append({"input_ids": ids, "attention_mask": [1] * seq, "labels": [-100] * (seq // 2) + ids[seq // 2:]})
    cpu = torch.device("cpu")
    stepper = Stepper(peft=peft, device=cpu, precision=c["precision"], causal=True, pad_id=tok.pad_token_id)
    if c["full"]:
        stepper.loss_sum = lambda m, b, n: m(**b).loss * n  # the plain HF loss over full logits
        stepper.rewrap()
    opt = make_optimizer(peft.trainable_parameters(), c["optimizer"], lr=1e-4, weight_decay=0.0, device=cpu)
    times, losses = [], []
    for step in range(steps + 1):
        start = time.perf_counter()
        loss, _ = stepper.step(examples, opt, step + 1, steps + 1)
        if step:
            times.append(time.perf_counter() - start)
        losses.append(loss)
    queue.put({"config": name, "peak_mib": peak_rss_bytes() / 2**20, "step_s": statistics.median(times),
               "loss_first": losses[0]})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import torch

    from unipeft.train.precision import native_bf16

    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    ctx = multiprocessing.get_context("spawn")
    rows = []
    for name in args.configs:
        if CONFIGS[name]["precision"] == "bf16" and not native_bf16(torch.device("cpu")):
            rows.append({"config": name, "skipped": "this CPU has no native bf16"})
            continue
        queue = ctx.Queue()
        p = ctx.Process(target=child, args=(name, args.batch, args.seq, args.steps, args.threads, queue))
        p.start()
        rows.append(queue.get())
        p.join()
    base = next(r for r in rows if r["config"] == "fp32 (full logits)" and "peak_mib" in r) \
        if any(r["config"] == "fp32 (full logits)" for r in rows) else None
    table = []
    for r in rows:
        if "skipped" in r:
            table.append([r["config"], "-", "-", "-", "-", r["skipped"]])
            continue
        table.append([r["config"], f"{r['peak_mib']:,.0f}", f"{r['step_s']:.2f}",
                      f"{r['peak_mib'] / base['peak_mib']:.2f}" if base else "-",
                      f"{r['step_s'] / base['step_s']:.2f}" if base else "-", f"loss {r['loss_first']:.4f}"])
    print(f"SmolLM2-135M, LoRA r=8 on q/v, batch {args.batch} x {args.seq}, {args.threads} threads")
    print(format_table(["config", "peak MiB", "step s", "peak / fp32 full", "step / fp32 full", "note"], table))
    if args.out:
        write_json(args.out, {"environment": environment(), "args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
