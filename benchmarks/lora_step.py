"""LoRA training-step benchmark: unipeft against HF peft and against the frozen base model (the floor).

One training step is ``zero_grad`` + forward + loss + backward + ``AdamW.step`` on the trainable parameters. Three
contenders train the same model with the same batch:

* ``unipeft``: ``unipeft.attach(model, "lora")``: r=8, α=16, dropout 0 on ``attn.q`` and ``attn.v``;
* ``peft``:    HF peft's ``get_peft_model`` with the same LoRA on the same modules, and unipeft's initial A/B copied
  in, so both compute the same function and their losses agree;
* ``floor``:   the frozen base, no adapter: forward + backward down to the input embeddings (whose output is made to
  require grad, so autograd runs the full backward through every layer as it must with adapters) and no optimizer.

``--precision`` (``fp32``, ``bf16``, ``fp16`` or ``auto``) applies to all three alike, as unipeft's trainer does it
(:mod:`unipeft.train.precision`): the base is stored in the low precision, the trainable LoRA tensors are kept in
float32 (``keep_trainable_fp32``), forward and loss run under ``torch.autocast`` and the backward after it, with
fp16's gradient scaler. ``auto`` resolves by capability (``resolve_precision``: bf16 only where the CPU multiplies
it natively, else fp32); the precision that ran is in the report's header and the JSON (``precision``).

Each contender has its own deep copy of the model. Time is measured in one process, the contenders alternating round
robin (the first one rotating each round) so that machine noise hits all of them alike; warm-up rounds are dropped.
Peak memory is measured in a fresh child process per contender (spawned, so nothing of the timing run is resident):
the child loads the model, builds its contender, resets the resident-set high-water mark and runs a few steps; the
peak is ``VmHWM`` after the steps minus ``VmRSS`` before them (see ``_common.py``). The child runs with
``MALLOC_MMAP_THRESHOLD_=65536`` so glibc returns every freed tensor of 64 KiB or more to the system at once and the
resident set follows the live tensors instead of the allocator's cache.

    python benchmarks/lora_step.py                              # both models, default shapes
    python benchmarks/lora_step.py --model minilm --steps 20 --out results.json
    python benchmarks/lora_step.py --model smollm2-135m --precision auto
"""

from __future__ import annotations

import argparse
import copy
import gc
import multiprocessing
import os
import statistics
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterator, Literal, Sequence

import torch
from torch import nn

from unipeft.train.precision import (DTYPES, PRECISIONS, autocast, grad_scaler, keep_trainable_fp32, native_bf16,
                                     resolve_precision)

from _common import environment, format_table, peak_rss_bytes, reset_peak_rss, rss_bytes, timing_stats, write_json

CONTENDERS: tuple[str, ...] = ("unipeft", "peft", "floor")
Kind = Literal["causal_lm", "classification"]

#: The real models this benchmark knows: short name -> (model kind, default batch, default sequence length).
MODELS: dict[str, tuple[Kind, int, int]] = {
    "smollm2-135m": ("causal_lm", 4, 64),
    "minilm": ("classification", 32, 128),
}

#: Environment of the memory-measuring child: glibc then mmaps (and on free unmaps) every block of 64 KiB or more.
_MEMORY_CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """Which model to benchmark; picklable, so a child process can load the same one.

    Attributes:
        name: a short name of :func:`unipeft.models.load_model` (``minilm``, ``smollm2-135m``), or a label when
            ``config`` is given.
        kind: ``causal_lm`` (loss on labels = input ids) or ``classification`` (2 labels, cross-entropy).
        config: keyword arguments of ``AutoConfig.for_model`` (with ``model_type``) for a randomly initialised
            model instead of a real one (used by the tests).
        seed: seeds the weights the checkpoint lacks (a new classification head) or, with ``config``, all of them.
    """

    name: str
    kind: Kind
    config: dict[str, Any] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("causal_lm", "classification"):
            raise ValueError(f"unknown model kind {self.kind!r}; valid: causal_lm, classification")

    def load(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        """Load (or build) the model in ``dtype``, in eval mode with every parameter trainable, as from
        ``from_pretrained``."""
        num_labels = 2 if self.kind == "classification" else None
        if self.config is None:
            from unipeft.models import load_model

            model, _ = load_model(self.name, kind=self.kind, num_labels=num_labels, seed=self.seed, dtype=dtype)
            return model
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

        extra = {"num_labels": num_labels} if num_labels else {}
        config = AutoConfig.for_model(**self.config, **extra)
        auto = AutoModelForCausalLM if self.kind == "causal_lm" else AutoModelForSequenceClassification
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = auto.from_config(config)
        return model.to(dtype).eval()


@dataclass(frozen=True, kw_only=True)
class Setup:
    """Everything that defines one benchmark run of one model.

    Attributes:
        model: the model.
        batch: sequences per batch.
        seq: tokens per sequence.
        steps: measured rounds (each contender runs one step per round).
        warmup: rounds run first and not measured.
        memory_steps: steps run in each memory-measuring child (the first allocates the optimizer state).
        r, alpha, dropout, positions: the LoRA (unipeft positions; HF peft targets the same modules by name).
        lr: AdamW's learning rate.
        seed: seeds the batch, unipeft's initial A, and the RNG before every step (dropout masks agree).
        threads: ``torch.set_num_threads``.
        precision: ``fp32``, ``bf16`` or ``fp16`` (already resolved from ``auto``): the base's dtype and autocast's.
    """

    model: ModelSpec
    batch: int
    seq: int
    steps: int = 10
    warmup: int = 2
    memory_steps: int = 3
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    positions: tuple[str, ...] = ("attn.q", "attn.v")
    lr: float = 1e-3
    seed: int = 0
    threads: int = 2
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.precision not in DTYPES:
            raise ValueError(f"unknown precision {self.precision!r}; valid: {', '.join(DTYPES)} "
                             "(resolve 'auto' with unipeft.train.precision.resolve_precision first)")
        for name in ("batch", "seq", "steps", "memory_steps", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")


@dataclass(eq=False)
class Contender:
    """A model prepared for one way of training, with its optimizer (None for the floor), in one precision: forward
    and loss under autocast, the backward after it, fp16's loss scaled (as :class:`unipeft.train.step.Stepper`)."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    trainable: int = field(default=0)
    precision: str = "fp32"

    def __post_init__(self) -> None:
        self.device = next(self.model.parameters()).device
        self.scaler = grad_scaler(self.device, self.precision)

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        """One training step on ``batch``; returns the loss."""
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.precision):
            loss = self.model(**batch).loss
        self.scaler.scale(loss).backward()
        if self.optimizer is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        return loss.item()


# ------------------------------------------------------------------------------------------------------ building
def lora_targets(model: nn.Module, positions: Sequence[str]) -> list[str]:
    """Full names of the modules unipeft wraps for ``positions`` (HF peft gets these as ``target_modules``).

    Raises:
        ValueError: if a position is a slice of a fused projection, which HF peft cannot target alone.
    """
    from unipeft.core.positions import resolve_positions

    sites = resolve_positions(model, positions)
    fused = [s.module for s in sites if s.out_slice is not None]
    if fused:
        raise ValueError(f"positions {list(positions)} are slices of fused projections ({fused[0]}, ...); "
                         "HF peft cannot target a slice, so the two would not compute the same thing")
    return [s.module for s in sites]


def _require_grad(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
    output.requires_grad_(True)  # the embedding output becomes a leaf that autograd must reach


def build_contender(name: str, base: nn.Module, setup: Setup, *, copy_base: bool = True,
                    init_from: nn.Module | None = None) -> Contender:
    """Prepare ``base`` (or a deep copy of it) for contender ``name``, in train mode, its trainable tensors in
    float32 whatever the base's dtype.

    Args:
        name: ``unipeft``, ``peft`` or ``floor``.
        base: the loaded model; untouched when ``copy_base``.
        setup: LoRA hyperparameters, learning rate and seed.
        copy_base: work on a deep copy (each contender needs its own model).
        init_from: for ``peft``, a unipeft-adapted model whose initial A and B are copied into peft's.

    Raises:
        ValueError: for an unknown contender name, or if HF peft does not target exactly unipeft's modules.
    """
    model = copy.deepcopy(base) if copy_base else base
    if name == "unipeft":
        import unipeft

        torch.manual_seed(setup.seed)
        handle = unipeft.attach(model, "lora", r=setup.r, alpha=setup.alpha, dropout=setup.dropout,
                                positions=setup.positions)
        params = handle.trainable_parameters()
    elif name == "peft":
        from peft import LoraConfig, get_peft_model

        targets = lora_targets(model, setup.positions)
        torch.manual_seed(setup.seed)
        config = LoraConfig(r=setup.r, lora_alpha=setup.alpha, lora_dropout=setup.dropout, target_modules=targets)
        model = get_peft_model(model, config)
        if sorted(model.targeted_module_names) != sorted(targets):
            raise ValueError(f"HF peft targeted {sorted(model.targeted_module_names)}, expected {sorted(targets)}")
        if init_from is not None:
            copy_lora_weights(init_from, model)
        params = [p for p in model.parameters() if p.requires_grad]
    elif name == "floor":
        for p in model.parameters():
            p.requires_grad_(False)
        model.get_input_embeddings().register_forward_hook(_require_grad)
        params = []
    else:
        raise ValueError(f"unknown contender {name!r}; valid: {', '.join(CONTENDERS)}")
    keep_trainable_fp32(params)
    model.train()
    optimizer = torch.optim.AdamW(params, lr=setup.lr) if params else None
    return Contender(name=name, model=model, optimizer=optimizer, trainable=sum(p.numel() for p in params),
                     precision=setup.precision)


def copy_lora_weights(source: nn.Module, peft_model: nn.Module) -> int:
    """Copy the A and B of every unipeft LoRA in ``source`` into the matching HF peft layer; returns how many.

    Raises:
        ValueError: if a module has no HF peft LoRA, or the two scalings differ.
    """
    import unipeft

    inner = peft_model.base_model.model
    copied = 0
    for module, placed in unipeft.handle(source).delta_modules():
        layer = inner.get_submodule(module)
        if not hasattr(layer, "lora_A"):
            raise ValueError(f"HF peft has no LoRA at {module}")
        if layer.scaling["default"] != placed.form.scaling:
            raise ValueError(f"scaling differs at {module}: peft {layer.scaling['default']}, "
                             f"unipeft {placed.form.scaling}")
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(placed.form.lora_A)
            layer.lora_B["default"].weight.copy_(placed.form.lora_B)
        copied += 1
    return copied


def make_batch(model: nn.Module, setup: Setup) -> dict[str, torch.Tensor]:
    """Random token ids (B, T), an all-ones attention mask and labels (the ids, or one of 2 classes per sequence)."""
    generator = torch.Generator().manual_seed(setup.seed)
    ids = torch.randint(0, model.config.vocab_size, (setup.batch, setup.seq), generator=generator)  # (B, T)
    if setup.model.kind == "causal_lm":
        labels = ids.clone()
    else:
        labels = torch.randint(0, 2, (setup.batch,), generator=generator)  # (B,)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


# ----------------------------------------------------------------------------------------------------- measuring
def time_round_robin(contenders: Sequence[Contender], batch: dict[str, torch.Tensor], setup: Setup,
                     log: Callable[[str], None] = lambda message: None) -> dict[str, dict[str, list[float]]]:
    """Run ``warmup + steps`` rounds, one step of every contender per round, the first contender rotating.

    Returns:
        By contender name: ``times_s`` (wall-clock seconds of the measured steps), ``cpu_s`` (CPU seconds of this
        process, all threads, over the same steps) and ``losses`` (every step, warm-up included).
    """
    logs = {c.name: {"times_s": [], "cpu_s": [], "losses": []} for c in contenders}
    rounds = setup.warmup + setup.steps
    gc.collect()
    gc.freeze()  # what exists now is never garbage: the collections between steps need not scan it
    try:
        for round_ in range(rounds):
            first = round_ % len(contenders)
            for contender in [*contenders[first:], *contenders[:first]]:
                gc.collect()  # outside the timed region, so no contender pays for another's garbage
                torch.manual_seed(setup.seed)  # the same dropout masks for every contender and every round
                cpu, start = time.process_time(), time.perf_counter()
                loss = contender.step(batch)
                elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
                record = logs[contender.name]
                record["losses"].append(loss)
                if round_ >= setup.warmup:
                    record["times_s"].append(elapsed)
                    record["cpu_s"].append(cpu)
            times = ", ".join(f"{n} {r['times_s'][-1] * 1e3:.0f} ms" for n, r in logs.items() if r["times_s"])
            log(f"round {round_ + 1}/{rounds}: {times or 'warm-up'}")
    finally:
        gc.unfreeze()
    return logs


def measure_memory(setup: Setup, name: str) -> dict[str, Any]:
    """Peak resident-memory growth of ``memory_steps`` training steps of contender ``name``, in this process.

    Meant to run in a fresh child process (see :func:`measure_memory_isolated`); the model is loaded here.
    """
    _quiet_transformers()
    torch.set_num_threads(setup.threads)
    base = setup.model.load(DTYPES[setup.precision])
    contender = build_contender(name, base, setup, copy_base=False)
    del base
    batch = make_batch(contender.model, setup)
    gc.collect()
    exact = reset_peak_rss()
    before = rss_bytes()
    for _ in range(setup.memory_steps):
        torch.manual_seed(setup.seed)
        contender.step(batch)
    peak = peak_rss_bytes()
    method = ("VmHWM after the steps minus VmRSS before them (high-water mark reset through /proc/self/clear_refs)"
              if exact else "ru_maxrss after the steps minus VmRSS before them (could not reset the peak; the "
              "load's own peak may hide the steps')")
    return {"rss_before_bytes": before, "peak_rss_bytes": peak, "peak_delta_bytes": peak - before,
            "steps": setup.memory_steps, "method": method,
            "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_")}


@contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def measure_memory_isolated(setup: Setup, name: str) -> dict[str, Any]:
    """:func:`measure_memory` in a freshly spawned child process with the glibc setting of the module docstring."""
    context = multiprocessing.get_context("spawn")
    with _environ(_MEMORY_CHILD_ENV), context.Pool(processes=1) as pool:
        return pool.apply(measure_memory, (setup, name))


def run_benchmark(setup: Setup, *, memory: Literal["subprocess", "inprocess", "none"] = "subprocess",
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure step time (and peak memory) of the three contenders on one model.

    Args:
        setup: the model, shapes and hyperparameters.
        memory: ``subprocess`` (one spawned child per contender, the real measurement), ``inprocess`` (in this
            process, one contender after another: a smoke test of the probe, not a fair comparison) or ``none``.
        log: called with progress messages.

    Returns:
        A JSON-ready dict: the setup, per contender the time statistics, all step times and losses, trainable
        parameter count and memory, plus the ratios and the loss-agreement check.
    """
    torch.set_num_threads(setup.threads)
    log(f"[{setup.model.name}] loading in {setup.precision}")
    base = setup.model.load(DTYPES[setup.precision])
    contenders: list[Contender] = []
    for name in CONTENDERS:  # unipeft first: peft copies its initial A and B
        init_from = contenders[0].model if name == "peft" else None
        contenders.append(build_contender(name, base, setup, init_from=init_from))
    batch = make_batch(base, setup)
    del base
    log(f"[{setup.model.name}] timing {setup.warmup} warm-up + {setup.steps} rounds of "
        f"{', '.join(CONTENDERS)} on a {setup.batch}x{setup.seq} batch")
    logs = time_round_robin(contenders, batch, setup, lambda message: log(f"[{setup.model.name}] {message}"))
    results: dict[str, dict[str, Any]] = {}
    for c in contenders:
        record = logs[c.name]
        results[c.name] = {"time": timing_stats(record["times_s"]), "cpu_time": timing_stats(record["cpu_s"]),
                           **record, "trainable_params": c.trainable, "memory": None}
    contenders.clear()
    gc.collect()
    if memory != "none":
        for name in CONTENDERS:
            log(f"[{setup.model.name}] peak memory of {name} ({memory})")
            probe = measure_memory_isolated if memory == "subprocess" else measure_memory
            results[name]["memory"] = probe(setup, name)
    return {"model": setup.model.name, "kind": setup.model.kind, "precision": setup.precision,
            "setup": _setup_dict(setup),
            "tokens_per_step": setup.batch * setup.seq, "memory_method": memory, "contenders": results,
            "ratios": ratios(results),
            "loss_check": loss_check({n: r["losses"] for n, r in results.items()})}


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """unipeft/peft and unipeft/floor: ratio of the median step times, median of the per-round ratios, and ratio of
    the median CPU times; the peak-memory differences; whether the issue's targets are met (by the medians)."""
    out: dict[str, Any] = {}
    uni = results["unipeft"]
    for other in ("peft", "floor"):
        them = results[other]
        paired = [a / b for a, b in zip(uni["times_s"], them["times_s"])]
        out[f"unipeft/{other}"] = {"of_medians": uni["time"]["median_s"] / them["time"]["median_s"],
                                   "median_paired": statistics.median(paired),
                                   "cpu_of_medians": uni["cpu_time"]["median_s"] / them["cpu_time"]["median_s"]}
    memory = {n: r["memory"]["peak_delta_bytes"] for n, r in results.items() if r["memory"] is not None}
    measured = len(memory) == len(results)
    if measured:
        out["peak_memory_diff_bytes"] = {f"unipeft-{other}": memory["unipeft"] - memory[other]
                                         for other in ("peft", "floor")}
    out["targets"] = {
        "no_slower_than_peft": out["unipeft/peft"]["of_medians"] <= 1.0,
        "within_5pct_of_floor": out["unipeft/floor"]["of_medians"] <= 1.05,
        "within_3pct_of_floor": out["unipeft/floor"]["of_medians"] <= 1.03,
        "no_more_memory_than_peft": memory["unipeft"] <= memory["peft"] if measured else None,
    }
    return out


def loss_check(losses: dict[str, list[float]]) -> dict[str, float]:
    """How far apart the losses are: unipeft vs peft at every step, and all three at the first step (B = 0)."""
    first = [losses[n][0] for n in CONTENDERS]
    return {"max_abs_diff_unipeft_peft": max(abs(a - b) for a, b in zip(losses["unipeft"], losses["peft"])),
            "first_step_spread": max(first) - min(first)}


def _setup_dict(setup: Setup) -> dict[str, Any]:
    out = asdict(setup)
    out["positions"] = list(setup.positions)
    return out


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    # HF peft 0.21 still calls the deprecated ``is_gradient_checkpointing`` of transformers 5
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


# ------------------------------------------------------------------------------------------------------- report
def report(result: dict[str, Any]) -> str:
    """A table of one model's result with the ratios under it."""
    s = result["setup"]
    rows = []
    for name, r in result["contenders"].items():
        t, m = r["time"], r["memory"]
        mem = f"{m['peak_delta_bytes'] / 2**20:.1f}" if m else "-"
        rows.append([name, f"{t['median_s'] * 1e3:.1f}", f"{t['p25_s'] * 1e3:.1f}-{t['p75_s'] * 1e3:.1f}",
                     f"{t['min_s'] * 1e3:.1f}", f"{r['cpu_time']['median_s'] * 1e3:.1f}", mem,
                     f"{r['trainable_params']:,}", f"{r['losses'][0]:.6f}", f"{r['losses'][-1]:.6f}"])
    table = format_table(["contender", "median step (ms)", "IQR (ms)", "min (ms)", "median CPU (ms)",
                          "peak mem Δ (MiB)", "trainable", "first loss", "last loss"], rows)
    q = result["ratios"]
    lines = [f"## {result['model']} ({result['kind']}), {result['precision']}, batch {s['batch']}x{s['seq']}, "
             f"{s['steps']} rounds after {s['warmup']} warm-up, {s['threads']} threads", "", table, "",
             *(f"{key:<13} = {q[key]['of_medians']:.3f} (median of per-round ratios {q[key]['median_paired']:.3f}, "
               f"of CPU times {q[key]['cpu_of_medians']:.3f}); target <= {target}"
               for key, target in (("unipeft/peft", "1.00"), ("unipeft/floor", "1.03")))]
    if "peak_memory_diff_bytes" in q:
        diff = q["peak_memory_diff_bytes"]
        lines.append(f"peak memory unipeft - peft = {diff['unipeft-peft'] / 2**20:+.2f} MiB; "
                     f"unipeft - floor = {diff['unipeft-floor'] / 2**20:+.2f} MiB")
    check = result["loss_check"]
    lines.append(f"losses: max |unipeft - peft| over all steps = {check['max_abs_diff_unipeft_peft']:.2e}, "
                 f"spread of the three first-step losses = {check['first_step_spread']:.2e}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", choices=sorted(MODELS), default=["smollm2-135m", "minilm"],
                        help="models to benchmark (default: both)")
    parser.add_argument("--batch", type=int, help="sequences per batch (default: smollm2-135m 4, minilm 32)")
    parser.add_argument("--seq", type=int, help="tokens per sequence (default: smollm2-135m 64, minilm 128)")
    parser.add_argument("--steps", type=int, default=10, help="measured rounds (default: 10)")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured rounds first (default: 2)")
    parser.add_argument("--memory", choices=["subprocess", "none"], default="subprocess",
                        help="peak-memory measurement (default: one spawned child per contender)")
    parser.add_argument("--memory-steps", type=int, default=3, help="steps in each memory child (default: 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", choices=list(PRECISIONS), default="fp32",
                        help="the base's dtype and autocast's, for all three contenders (default: fp32; auto: bf16 "
                             "where the CPU multiplies it natively, else fp32)")
    parser.add_argument("--out", help="write all numbers to this JSON file")
    args = parser.parse_args(argv)
    precision = resolve_precision(args.precision, torch.device("cpu"))
    if precision == "bf16" and not native_bf16(torch.device("cpu")):
        print("note: this CPU has no native bf16; bf16 runs emulated (much slower than fp32)", file=sys.stderr)

    _quiet_transformers()
    torch.set_num_threads(args.threads)
    started, load_before = datetime.now(timezone.utc), os.getloadavg()
    env = environment(sys.argv if argv is None else [sys.argv[0], *argv])
    results = []
    for name in args.model:
        kind, batch, seq = MODELS[name]
        setup = Setup(model=ModelSpec(name=name, kind=kind), batch=args.batch or batch, seq=args.seq or seq,
                      steps=args.steps, warmup=args.warmup, memory_steps=args.memory_steps, seed=args.seed,
                      threads=args.threads, precision=precision)
        results.append(run_benchmark(setup, memory=args.memory, log=lambda m: print(m, file=sys.stderr, flush=True)))
        print(report(results[-1]) + "\n", flush=True)
        if args.out:  # after every model, so a run cut short keeps what it measured
            data = {"benchmark": "lora_step", "precision": precision, "precision_requested": args.precision,
                    "started": started.isoformat(timespec="seconds"),
                    "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "load_average": {"start": load_before, "end": os.getloadavg()}, **env, "results": results}
            write_json(args.out, data)
    print(f"{env['command']}\n{env['versions']}\n{env['machine']}\n"
          f"load average (1, 5, 15 min) at start {load_before}, at end {os.getloadavg()}")
    if args.out:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
