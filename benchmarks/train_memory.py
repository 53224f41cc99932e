"""Training memory of SmolLM2-135M with LoRA: fp32 against bf16, NF4, and NF4 + checkpointing + 8-bit AdamW.

Each configuration runs in a fresh child process (spawned, ``MALLOC_MMAP_THRESHOLD_=65536`` so freed tensors leave
the resident set at once). The child imports everything first (torch, transformers' LLaMA, bitsandbytes, unipeft)
and reads its resident set (``VmRSS``): that is the zero every figure is measured from. It then loads the base as the
configuration says, attaches LoRA (r=8, α=16 on q and v), builds one batch of ``--batch`` × ``--seq`` random tokens
whose second half is labelled (an instruction-tuning shape), resets the high-water mark (``/proc/self/clear_refs``)
and runs ``--warmup`` unmeasured and ``--steps`` timed steps of unipeft's trainer step
(:class:`unipeft.train.step.Stepper`: loss, backward, optimizer). Per configuration:

* ``model``: resident growth after loading and attaching (the base as it is held for training: what NF4 saves;
  every tensor left as a view of the checkpoint's memory-mapped file is first copied, see :func:`materialize`);
* ``load peak``: the high-water mark while loading (an NF4 load first reads the float32 weights it quantizes);
* ``step peak``: the high-water mark during the steps, model resident, from the same zero: the headline figure;
  the loading transient is not in it. The optimizer's state is allocated in the first step, so it is in it too.

The step time is the median of the timed steps. The peer is ``fp32 (full logits)``: the same model and adapter
with the plain HF loss (``model(**batch).loss``, the full (B, T, V) logits, as a Trainer computes it), measured in the
same run; ratios against ``fp32`` (the same fp32 step with unipeft's chunked, labelled-only LM head) are printed too.
The issue's goal is a configuration at ≤ 0.35x the fp32 LoRA step peak at ≤ 1.5x its step time; the report names
the smallest configuration that meets it.

bf16 (the base stored in bf16, the LoRA weights in float32, the step under autocast, as the trainer does it) is
measured only where this CPU multiplies bf16 natively (``unipeft.train.precision.native_bf16``); elsewhere it would
measure an emulation 23-31x slower than fp32, so it is reported as skipped with that reason. The benchmark runs on
the CPU only (its peaks are resident-set figures).

    python benchmarks/train_memory.py                         # 8 x 512, 1 warm-up + 2 timed steps
    python benchmarks/train_memory.py --batch 2 --seq 256 --steps 2 --out results.json
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import queue as queue_module
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import environment, format_table, peak_rss_bytes, reset_peak_rss, rss_bytes, write_json  # noqa: E402

#: The issue's goal: step peak and step time relative to the fp32 LoRA peer.
GOAL_PEAK, GOAL_TIME = 0.35, 1.5
PEER = "fp32 (full logits)"
MiB = 2**20


@dataclass(frozen=True, kw_only=True)
class Config:
    """One way of training the same LoRA.

    Attributes:
        precision: ``fp32`` or ``bf16`` (base stored in it, LoRA in fp32, autocast).
        quantization: ``nf4`` (bitsandbytes 4-bit base, double quantization) or None.
        checkpointing: gradient checkpointing of every decoder layer (non-reentrant).
        optimizer: ``adamw`` or ``adamw_8bit``.
        loss_chunk: vocabulary rows per chunk of unipeft's LM-head loss (None: the head over labelled positions
            at once).
        full_logits: use the plain HF loss over the full (B, T, V) logits instead (``loss_chunk`` is then unused).
    """

    precision: str = "fp32"
    quantization: str | None = None
    checkpointing: bool = False
    optimizer: str = "adamw"
    loss_chunk: int | None = 8192
    full_logits: bool = False


CONFIGS: dict[str, Config] = {
    PEER: Config(full_logits=True),
    "fp32": Config(),
    "fp32 + ckpt": Config(checkpointing=True),
    "bf16": Config(precision="bf16"),
    "nf4": Config(quantization="nf4"),
    "nf4 + ckpt + adamw_8bit": Config(quantization="nf4", checkpointing=True, optimizer="adamw_8bit"),
    "nf4 + ckpt + adamw_8bit, chunk 2048": Config(quantization="nf4", checkpointing=True, optimizer="adamw_8bit",
                                                  loss_chunk=2048),
}


def _tensor_bytes(module) -> dict[str, int]:
    """Bytes of the model's tensors: the input embedding (SmolLM2's is tied to the head), the rest of the frozen
    base (bitsandbytes' 4-bit weights with their quantization constants) and the trainable tensors."""
    import torch

    def quant_bytes(state) -> int:
        if state is None:
            return 0
        total = 0
        for value in vars(state).values():
            if isinstance(value, torch.Tensor):
                total += value.nbytes
            elif hasattr(value, "absmax"):  # double quantization's nested state
                total += quant_bytes(value)
        return total

    embedding = module.get_input_embeddings().weight
    seen: set[int] = set()
    frozen = trainable = 0
    for t in [*module.parameters(), *module.buffers()]:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        size = t.nbytes + quant_bytes(getattr(t, "quant_state", None))
        if t.requires_grad:
            trainable += size
        elif t.data_ptr() != embedding.data_ptr():
            frozen += size
    return {"embedding": embedding.nbytes, "frozen_other": frozen, "trainable": trainable}


def materialize(model) -> int:
    """Copy every floating-point tensor of ``model`` into memory of its own; returns how many were copied.

    ``from_pretrained`` leaves the tensors it did not convert as views of the checkpoint's memory-mapped file. In
    an fp32 load they are not resident until the first step touches them; in an NF4 load the whole float32 file was
    read to quantize it, and because the tied float32 embedding still points into the mapping, those ~400 MiB of
    file pages stay mapped and resident after loading. Copying the remaining tensors releases the mapping, so the
    model's figure is what the process holds for the base in every configuration (quantized weights are skipped).
    """
    seen: set[int] = set()
    for module in model.modules():
        tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        for _, t in tensors:
            if id(t) in seen or not t.is_floating_point():
                continue
            seen.add(id(t))
            t.data = t.data.clone()
    return len(seen)


def _optimizer_state_bytes(optimizer) -> int:
    import torch

    return sum(v.nbytes for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor))


def child(name: str, config: Config, model_name: str, batch: int, seq: int, warmup: int, steps: int, threads: int,
          queue) -> None:
    """Measure one configuration in this (fresh) process and put its row on ``queue``."""
    import gc
    import warnings

    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401  (imported before the zero, like the rest)
    from transformers.utils import logging as hf_logging

    import unipeft
    from unipeft.models import load_model
    from unipeft.train.optim import make_optimizer
    from unipeft.train.precision import DTYPES, keep_trainable_fp32
    from unipeft.train.step import Stepper

    if config.quantization or config.optimizer != "adamw":
        import bitsandbytes  # noqa: F401
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing_enable.*", category=FutureWarning)
    torch.set_num_threads(threads)
    gc.collect()
    zero = rss_bytes()
    exact = reset_peak_rss()
    model, tok = load_model(model_name, kind="causal_lm", dtype=DTYPES[config.precision],
                            quantization=config.quantization, double_quant=True)
    materialize(model)
    peft = unipeft.attach(model, "lora", r=8, alpha=16, positions=["attn.q", "attn.v"])
    keep_trainable_fp32(peft.trainable_parameters())
    if config.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    g = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(batch):
        ids = torch.randint(0, model.config.vocab_size, (seq,), generator=g).tolist()
        examples.append({"input_ids": ids, "attention_mask": [1] * seq, "labels": [-100] * (seq // 2) + ids[seq // 2:]})
    cpu = torch.device("cpu")
    stepper = Stepper(peft=peft, device=cpu, precision=config.precision, causal=True, pad_id=tok.pad_token_id,
                      loss_chunk=config.loss_chunk)
    if config.full_logits:
        stepper.loss_sum = lambda m, b, n: m(**b).loss * n  # the plain HF loss over full logits
        stepper.rewrap()
    opt = make_optimizer(peft.trainable_parameters(), config.optimizer, lr=1e-4, weight_decay=0.0, device=cpu)
    gc.collect()
    load_peak, resident = peak_rss_bytes(), rss_bytes()
    exact = reset_peak_rss() and exact
    times, losses = [], []
    for step in range(warmup + steps):
        start = time.perf_counter()
        loss, _ = stepper.step(examples, opt, step + 1, warmup + steps)
        if step >= warmup:
            times.append(time.perf_counter() - start)
        losses.append(loss)
    step_peak = peak_rss_bytes()
    queue.put({"config": name, **asdict(config), "zero_rss_mib": zero / MiB, "model_mib": (resident - zero) / MiB,
               "load_peak_mib": (load_peak - zero) / MiB, "step_peak_mib": (step_peak - zero) / MiB,
               "peak_exact": exact, "tensors_mib": {k: v / MiB for k, v in _tensor_bytes(model).items()},
               "optimizer_state_mib": _optimizer_state_bytes(opt) / MiB,
               "step_s": statistics.median(times), "times_s": times, "losses": losses})


def _run_child(ctx, name: str, args: argparse.Namespace) -> dict[str, Any]:
    q = ctx.Queue()
    p = ctx.Process(target=child, args=(name, CONFIGS[name], args.model, args.batch, args.seq, args.warmup,
                                        args.steps, args.threads, q))
    p.start()
    while True:
        try:
            row = q.get(timeout=1.0)
            break
        except queue_module.Empty:
            if not p.is_alive():
                raise RuntimeError(f"the child measuring {name!r} exited with code {p.exitcode} and no result")
    p.join()
    return row


def _ratios(rows: list[dict[str, Any]]) -> None:
    """Add peak and time ratios against the peer and against chunked fp32, and whether the goal is met."""
    peers = {r["config"]: r for r in rows if "step_peak_mib" in r}
    for r in rows:
        if "step_peak_mib" not in r:
            continue
        for key, peer in (("full", peers.get(PEER)), ("fp32", peers.get("fp32"))):
            if peer is not None:
                r[f"peak_vs_{key}"] = r["step_peak_mib"] / peer["step_peak_mib"]
                r[f"time_vs_{key}"] = r["step_s"] / peer["step_s"]
        if "peak_vs_full" in r:
            r["meets_goal"] = r["peak_vs_full"] <= GOAL_PEAK and r["time_vs_full"] <= GOAL_TIME


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """The table, the tensor breakdown and the goal's verdict."""
    def f(r: dict[str, Any], key: str, fmt: str) -> str:
        return format(r[key], fmt) if key in r else "-"

    table, parts = [], []
    for r in rows:
        if "skipped" in r:
            table.append([r["config"], *["-"] * 9, r["skipped"]])
            continue
        table.append([r["config"], f"{r['model_mib']:,.0f}", f"{r['load_peak_mib']:,.0f}",
                      f"{r['step_peak_mib']:,.0f}", f"{r['step_s']:.2f}", f(r, "peak_vs_full", ".2f"),
                      f(r, "time_vs_full", ".2f"), f(r, "peak_vs_fp32", ".2f"), f(r, "time_vs_fp32", ".2f"),
                      {True: "yes", False: "no"}.get(r.get("meets_goal"), "-"),
                      f"loss {r['losses'][0]:.4f}"])
        t = r["tensors_mib"]
        parts.append([r["config"], f"{t['embedding']:.1f}", f"{t['frozen_other']:.1f}", f"{t['trainable']:.2f}",
                      f"{r['optimizer_state_mib']:.2f}"])
    lines = [f"{args.model}, LoRA r=8 on q/v, batch {args.batch} x {args.seq}, {args.warmup} warm-up + {args.steps} "
             f"timed steps, {args.threads} threads; MiB above the child's resident set before loading",
             format_table(["config", "model MiB", "load peak MiB", "step peak MiB", "step s", "peak / full",
                           "step / full", "peak / fp32", "step / fp32", f"goal ({GOAL_PEAK}x, {GOAL_TIME}x)", "note"],
                          table), "",
             format_table(["config", "embedding MiB", "other frozen MiB", "trainable MiB", "optimizer state MiB"],
                          parts)]
    meeting = [r for r in rows if r.get("meets_goal")]
    if meeting:
        best = min(meeting, key=lambda r: r["step_peak_mib"])
        lines.append(f"goal met: smallest is {best['config']!r} at {best['peak_vs_full']:.2f}x the peak of "
                     f"{PEER!r}, {best['time_vs_full']:.2f}x its step time")
    elif any("meets_goal" in r for r in rows):
        lines.append(f"goal not met: no configuration is at <= {GOAL_PEAK}x the peak of {PEER!r} at <= "
                     f"{GOAL_TIME}x its step time")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="a name or folder of unipeft.models.load_model")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps first (default 1)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps (default 2)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), metavar="CONFIG",
                        help=f"default: all of {', '.join(map(repr, CONFIGS))}")
    parser.add_argument("--out", default=None, help="write every figure to this JSON file")
    args = parser.parse_args(argv)
    for key in ("batch", "steps", "threads"):
        if getattr(args, key) < 1:
            raise ValueError(f"--{key} must be >= 1, got {getattr(args, key)}")
    if args.seq < 4 or args.warmup < 0:
        raise ValueError(f"--seq must be >= 4 and --warmup >= 0, got {args.seq} and {args.warmup}")

    import torch

    from unipeft.train.precision import native_bf16

    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # inherited by the spawned children
    ctx = multiprocessing.get_context("spawn")
    rows: list[dict[str, Any]] = []
    for name in args.configs:
        if CONFIGS[name].precision == "bf16" and not native_bf16(torch.device("cpu")):
            rows.append({"config": name, **asdict(CONFIGS[name]),
                         "skipped": "this CPU has no native bf16 (an emulation 23-31x slower than fp32)"})
            continue
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        rows.append(_run_child(ctx, name, args))
    _ratios(rows)
    print(report(rows, args))
    if args.out:
        write_json(args.out, {"benchmark": "train_memory", **environment(sys.argv if argv is None else
                                                                         [sys.argv[0], *argv]),
                              "args": vars(args), "goal": {"peak": GOAL_PEAK, "time": GOAL_TIME, "peer": PEER},
                              "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
