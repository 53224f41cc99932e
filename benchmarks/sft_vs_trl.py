"""End to end: instruction tuning SmolLM2-135M on the Alpaca sample with `unipeft train` and with TRL's `SFTTrainer`.

The same run is made twice, each side in a fresh child process, and timed to a fixed evaluation loss:

* ``unipeft``: ``unipeft train configs/alpaca_lora.yaml`` with the overrides below, called as the CLI calls it
  (:func:`unipeft.train.load_train_config` then :func:`unipeft.train.train`), with ``packing: true`` (a step's
  examples packed into rows, positions restarting per example) and the LM head only at labelled positions
  (``loss_chunk``, the default).
* ``trl``: TRL's ``SFTTrainer`` + HF peft, the pipeline most users run: a prompt-completion dataset (the same Alpaca
  prompt text and response), ``completion_only_loss=True``, ``peft_config=LoraConfig(...)``, configured as TRL's
  documentation recommends for speed on the hardware: TRL's ``chunked_nll`` loss (its default: the LM head on
  non-ignored tokens only), no gradient checkpointing (TRL's default trades ~20% of the speed for memory), bf16 only
  where the device has it natively, the length-grouped sampler (``train_sampling_strategy="group_by_length"``,
  transformers' advice against padding), ``dataloader_num_workers=0`` (two cores: a worker would take one from the
  model). Packing and padding-free batches are off: TRL documents both as supported only with FlashAttention, which
  a CPU does not have (``--trl-padding-free`` turns padding-free on anyway, as an experiment).

Both get the same model (``unipeft.models.load_model``), the same rows (the task's train rows and held-out eval rows,
read by ``unipeft.data.load_rows``), the same token sequences with the loss on the response and EOS only (checked:
TRL's tokenized training set is compared with unipeft's encoding, example by example), the same LoRA (r, alpha,
dropout, the modules unipeft wraps as peft's ``target_modules``), learning rate, warm-up, linear decay, batch size,
steps, gradient clipping and seed. The batches differ in order (each library draws its own length-grouped order).

Every ``--eval-every`` steps and at the end both models are scored by one function, ``unipeft.train.evaluate.evaluate``
(the mean cross-entropy per response token), on the same encoded evaluation examples: inside unipeft's loop through
its ``eval_every`` (the loop calls that function; the benchmark wraps it only to time it), and from a
``TrainerCallback`` on TRL's side. Evaluation time is excluded from every figure. Each side's clock starts after its
imports, so it covers loading the model, preparing the data, building the trainer and training. The target loss is
``--target``, or by default the worse of the two final losses; the time to the target is the clock at the first
evaluation whose loss is at or below it. Reported: both times to the target (end to end, and training only), the
final losses, and the ratio unipeft/TRL against the goal (≤ 0.8 on a CPU, ≤ 0.6 on a GPU).

    python benchmarks/sft_vs_trl.py --out sft_vs_trl.json          # 60 steps of batch 8, eval every 10 on 64 rows
    python benchmarks/sft_vs_trl.py --steps 4 --batch 2 --eval-every 2 --eval-limit 4 --train-limit 16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import environment, format_table, peak_rss_bytes, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "alpaca_lora.yaml"
SIDES = ("unipeft", "trl")
#: The issue's goals for unipeft's time to the target over TRL's.
GOALS = {"cpu": 0.8, "cuda": 0.6}


@dataclass(frozen=True, kw_only=True)
class Setup:
    """One comparison; everything else comes from ``config`` (configs/alpaca_lora.yaml: lr 1e-3, warm-up 6%, linear
    decay, LoRA r=8 alpha=16 on attn.q/attn.v, group_by_length).

    Attributes:
        config: the unipeft training config both sides start from.
        model: a model name or folder for ``unipeft.models.load_model``.
        steps: optimizer steps.
        batch: examples per step.
        max_length: tokens per example (longer ones truncated, the same way on both sides).
        eval_every: evaluate every this many steps (and at the end).
        eval_limit: evaluation examples (the first of the task's held-out rows).
        eval_batch: examples per evaluation forward.
        train_limit: use only the first N training rows (None: all).
        threads: torch threads on each side.
        device: ``cpu`` or ``cuda``.
        seed: the seed of both runs.
        target: the evaluation loss to reach (None: the worse of the two final losses).
        trl_padding_free: give TRL padding-free batches (flattened, position ids) although it documents them for
            FlashAttention only; then TRL cannot truncate, so it gets unipeft's truncated token ids.
    """

    config: str = str(CONFIG)
    model: str = "smollm2-135m"
    steps: int = 60
    batch: int = 8
    max_length: int = 256
    eval_every: int = 10
    eval_limit: int = 64
    eval_batch: int = 16
    train_limit: int | None = None
    threads: int = 2
    device: str = "cpu"
    seed: int = 0
    target: float | None = None
    trl_padding_free: bool = False


def train_config(setup: Setup, output_dir: str):
    """The unipeft :class:`~unipeft.train.TrainConfig` of the run: ``setup.config`` with the setup's overrides. TRL's
    side reads its hyperparameters from the same object."""
    from unipeft.train import load_train_config

    overrides = {"model": setup.model, "max_steps": setup.steps, "batch_size": setup.batch,
                 "max_length": setup.max_length, "eval_every": setup.eval_every, "eval_limit": setup.eval_limit,
                 "eval_batch_size": setup.eval_batch, "train_limit": setup.train_limit, "threads": setup.threads,
                 "device": setup.device, "precision": "auto", "seed": setup.seed, "packing": True,
                 "save_every": None, "resume": False, "progress": False, "output_dir": output_dir}
    return load_train_config(setup.config, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])


class Clock:
    """Seconds since the side started, with evaluation (measurement only) paused out."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.paused = 0.0
        self.evals: list[dict[str, float]] = []

    def now(self) -> float:
        return time.perf_counter() - self.start - self.paused

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self.paused += time.perf_counter() - began

    def evaluate(self, step: int, run) -> dict[str, float]:
        """Run ``run()`` (an evaluation) off the clock and record its loss at ``step``."""
        at = self.now()
        began = time.perf_counter()
        with self.pause():
            metrics = run()
        self.evals.append({"step": step, "loss": float(metrics["loss"]), "elapsed_s": at,
                           "eval_s": time.perf_counter() - began})
        return metrics


def _quiet() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("trl").setLevel(logging.ERROR)


def run_unipeft(setup: Setup, workdir: Path) -> dict[str, Any]:
    """``unipeft train`` in this process, its evaluations timed and taken off the clock."""
    import unipeft.train.loop as loop
    from unipeft.train import train

    clock = Clock()
    config = train_config(setup, str(workdir / "unipeft"))
    steps: list[dict[str, float]] = []
    original = loop.evaluate

    def timed_evaluate(*args: Any, **kwargs: Any) -> dict[str, float]:
        step = int(steps[-1]["step"]) if steps else 0
        return clock.evaluate(step, lambda: original(*args, **kwargs))

    loop.evaluate = timed_evaluate  # the same function, timed; unipeft's loop evaluates through it
    try:
        result = train(config, on_step=lambda step, loss: steps.append(
            {"step": step, "loss": loss, "elapsed_s": clock.now()}))
    finally:
        loop.evaluate = original
    end = clock.now()
    setup_s = steps[-1]["elapsed_s"] - result.train_time_s  # loading, encoding, building: before the first step
    return {"evals": clock.evals, "train_losses": [s["loss"] for s in steps], "steps": result.steps,
            "trainable_params": result.trainable_params, "setup_s": setup_s, "train_s": result.train_time_s,
            "total_s": end, "device": result.device, "precision": result.precision,
            "tokens_per_s": result.tokens_per_s, "config": config.to_dict()}


def _trl_dataset(rows: Sequence[dict[str, Any]], task, tokenizer, max_length: int, padding_free: bool):
    """TRL's training set: prompt-completion text (its tokenizer and truncation), or with padding-free batches
    (where TRL will not truncate) unipeft's truncated token ids."""
    from datasets import Dataset

    from unipeft.data import encode
    from unipeft.data.encode import prompt_text

    if padding_free:
        return Dataset.from_list([{"input_ids": e["input_ids"], "labels": e["labels"]}
                                  for e in encode(rows, task, tokenizer, max_length)])
    return Dataset.from_list([{"prompt": prompt_text(r, task, i), "completion": str(r[task.response_field])}
                              for i, r in enumerate(rows)])


def run_trl(setup: Setup, workdir: Path) -> dict[str, Any]:
    """TRL's SFTTrainer + HF peft in this process, evaluated by the shared function from a callback."""
    import torch
    import transformers
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from lora_step import lora_targets
    from unipeft.data import encode, load_rows
    from unipeft.models import load_model
    from unipeft.train.evaluate import evaluate
    from unipeft.train.loop import recipe_for
    from unipeft.train.precision import DTYPES, autocast, resolve_device, resolve_precision
    from unipeft.train.schedule import warmup_steps

    clock = Clock()
    config = train_config(setup, str(workdir / "unipeft-unused"))
    task = config.task_spec()
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)  # the capability decision unipeft makes
    torch.set_num_threads(setup.threads)
    transformers.set_seed(config.seed)
    model, tokenizer = load_model(config.model, kind="causal_lm", dtype=DTYPES[precision], seed=config.seed)
    rows = load_rows(task, "train", config.data_dir, config.train_limit)
    train_set = _trl_dataset(rows, task, tokenizer, config.max_length, setup.trl_padding_free)
    with clock.pause():  # measurement only: the evaluation set, encoded as unipeft encodes it
        eval_set = encode(load_rows(task, "eval", config.data_dir, config.eval_limit), task, tokenizer,
                          config.max_length)
    (delta,) = recipe_for(config, task).deltas
    form = delta.form
    lora = LoraConfig(r=form.r, lora_alpha=form.alpha, lora_dropout=form.dropout, use_rslora=form.rslora,
                      target_modules=lora_targets(model, delta.positions), task_type="CAUSAL_LM")
    args = SFTConfig(
        output_dir=str(workdir / "trl"), max_steps=config.max_steps, per_device_train_batch_size=config.batch_size,
        learning_rate=config.lr, lr_scheduler_type=config.scheduler,
        warmup_steps=warmup_steps(config.max_steps, config.warmup_ratio), weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm or 0.0, seed=config.seed, data_seed=config.seed,
        bf16=precision == "bf16", fp16=precision == "fp16", use_cpu=device.type == "cpu",
        gradient_checkpointing=False, max_length=None if setup.trl_padding_free else config.max_length,
        completion_only_loss=True, packing=False, padding_free=setup.trl_padding_free,
        train_sampling_strategy="group_by_length" if config.group_by_length else "random",
        dataloader_num_workers=0, dataloader_pin_memory=device.type == "cuda",
        save_strategy="no", eval_strategy="no", report_to="none", logging_steps=1, disable_tqdm=True)
    pad_id = tokenizer.pad_token_id

    def score(model: torch.nn.Module) -> dict[str, float]:
        with autocast(device, precision):
            return evaluate(model, task, eval_set, config.eval_batch_size, pad_token_id=pad_id)

    marks: dict[str, float] = {}

    class EvalEvery(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            marks["train_begin"] = clock.now()

        def on_step_end(self, args, state, control, model=None, **kwargs):
            marks["last_step"] = clock.now()
            step = state.global_step
            if step % config.eval_every == 0 or step == state.max_steps:
                clock.evaluate(step, lambda: score(model))

    trainer = SFTTrainer(model=model, args=args, train_dataset=train_set, processing_class=tokenizer,
                         peft_config=lora, callbacks=[EvalEvery()])
    with clock.pause():  # measurement only: does TRL train on unipeft's token sequences?
        check = _same_sequences(trainer.train_dataset, encode(rows, task, tokenizer, config.max_length))
    trainer.train()
    trainer.save_model(str(workdir / "trl" / "adapter"))
    end = clock.now()
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"evals": clock.evals, "train_losses": losses, "steps": trainer.state.global_step,
            "trainable_params": trainable, "setup_s": marks["train_begin"],
            "train_s": marks["last_step"] - marks["train_begin"], "total_s": end, "device": str(device),
            "precision": precision, "sequences": check,
            "trl_config": {k: v for k, v in args.to_dict().items() if k in _TRL_KEYS}}


_TRL_KEYS = ("max_steps", "per_device_train_batch_size", "learning_rate", "lr_scheduler_type", "warmup_steps",
             "weight_decay", "max_grad_norm", "seed", "bf16", "fp16", "use_cpu", "gradient_checkpointing", "max_length",
             "completion_only_loss", "packing", "padding_free", "train_sampling_strategy", "dataloader_num_workers",
             "loss_type", "optim")


def _same_sequences(trl_set, examples: Sequence[dict[str, Any]]) -> dict[str, int]:
    """How many of TRL's tokenized training examples equal unipeft's, in input ids and in labels."""
    ids, labels = trl_set["input_ids"], trl_set["labels"]
    same = sum(1 for i, e in enumerate(examples[:len(ids)]) if list(ids[i]) == e["input_ids"]
               and list(labels[i]) == e["labels"])
    return {"trl_examples": len(ids), "unipeft_examples": len(examples), "identical": same}


def child(side: str, setup: Setup, result_path: Path) -> None:
    """Run one side in this (fresh) process and write its result as JSON."""
    _quiet()
    import torch  # noqa: F401  (imported before the clock starts, like each side's libraries)
    import transformers  # noqa: F401
    import unipeft.train  # noqa: F401
    if side == "trl":
        import peft  # noqa: F401
        import trl  # noqa: F401

    with tempfile.TemporaryDirectory(prefix=f"sft_vs_trl_{side}_") as tmp:
        result = (run_unipeft if side == "unipeft" else run_trl)(setup, Path(tmp))
    result["peak_rss_mib"] = peak_rss_bytes() / 2**20
    result_path.write_text(json.dumps(result))


def _run_side(side: str, setup: Setup, log) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="sft_vs_trl_") as tmp:
        path = Path(tmp) / "result.json"
        command = [sys.executable, __file__, "--child", side, "--setup", json.dumps(asdict(setup)),
                   "--result", str(path)]
        began = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if done.returncode != 0 or not path.exists():
            raise RuntimeError(f"the {side} side failed (exit {done.returncode}):\n{done.stdout[-6000:]}")
        result = json.loads(path.read_text())
    result["process_s"] = time.perf_counter() - began
    log(f"{side}: {result['steps']} steps, final eval loss {result['evals'][-1]['loss']:.4f}, "
        f"{result['total_s']:.1f} s (process {result['process_s']:.1f} s)")
    return result


def time_to(target: float, side: dict[str, Any]) -> dict[str, Any] | None:
    """The first evaluation of ``side`` at or below ``target``: its step, end-to-end and training-only seconds."""
    for entry in side["evals"]:
        if entry["loss"] <= target + 1e-12:
            return {"step": entry["step"], "elapsed_s": entry["elapsed_s"],
                    "train_s": entry["elapsed_s"] - side["setup_s"]}
    return None


def compare(setup: Setup, sides: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Target, times to it, ratios and the goal from the two sides' results."""
    finals = {name: side["evals"][-1]["loss"] for name, side in sides.items()}
    target = setup.target if setup.target is not None else max(finals.values())
    reached = {name: time_to(target, side) for name, side in sides.items()}
    uni, trl = reached["unipeft"], reached["trl"]
    ratios = None
    if uni is not None and trl is not None:
        ratios = {"elapsed": uni["elapsed_s"] / trl["elapsed_s"], "train": uni["train_s"] / trl["train_s"]}
    goal = GOALS["cuda" if setup.device.startswith("cuda") else "cpu"]
    return {"target_loss": target, "target_source": "given" if setup.target is not None else "worse final loss",
            "final_loss": finals, "reached": reached, "ratio_unipeft_over_trl": ratios, "goal": goal,
            "goal_met": bool(ratios is not None and ratios["elapsed"] <= goal
                             and finals["unipeft"] <= finals["trl"] + 1e-12),
            "final_loss_unipeft_minus_trl": finals["unipeft"] - finals["trl"]}


def run_benchmark(setup: Setup, log=print) -> dict[str, Any]:
    """Both sides, one after the other, each in a fresh process; the comparison."""
    sides = {side: _run_side(side, setup, log) for side in SIDES}
    from unipeft.bench.env import version_of

    env = environment()
    env["versions"].update({name: version_of(name) for name in ("trl", "accelerate", "datasets")})
    return {"setup": asdict(setup), "sides": sides, "comparison": compare(setup, sides), "environment": env}


def report(result: dict[str, Any]) -> str:
    """The table of the two sides and the verdict."""
    cmp_, sides = result["comparison"], result["sides"]
    rows = []
    for name in SIDES:
        side, hit = sides[name], cmp_["reached"][name]
        rows.append([name, side["precision"], f"{side['trainable_params']:,}", side["steps"],
                     f"{cmp_['final_loss'][name]:.4f}", f"{side['setup_s']:.1f}", f"{side['train_s']:.1f}",
                     hit["step"] if hit else "-", f"{hit['elapsed_s']:.1f}" if hit else "not reached",
                     f"{hit['train_s']:.1f}" if hit else "-", f"{side['peak_rss_mib']:,.0f}"])
    table = format_table(["side", "precision", "trainable", "steps", "final eval loss", "setup s", "train s",
                          "target at step", "to target s", "to target (train) s", "peak RSS MiB"], rows)
    lines = [table, "", f"target eval loss {cmp_['target_loss']:.4f} ({cmp_['target_source']}); "
                        f"final loss unipeft - trl = {cmp_['final_loss_unipeft_minus_trl']:+.4f}"]
    ratios = cmp_["ratio_unipeft_over_trl"]
    if ratios is None:
        lines.append("one side did not reach the target: no ratio")
    else:
        lines.append(f"unipeft/trl time to target: {ratios['elapsed']:.3f} end to end, {ratios['train']:.3f} "
                     f"training only; goal <= {cmp_['goal']} at equal or better loss: "
                     f"{'met' if cmp_['goal_met'] else 'NOT met'}")
    seq = sides["trl"].get("sequences")
    if seq:
        lines.append(f"token sequences: {seq['identical']} of {seq['unipeft_examples']} unipeft examples identical "
                     f"in TRL's training set ({seq['trl_examples']} examples)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: see the module docstring."""
    defaults = Setup()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=defaults.config, help="unipeft config both sides start from")
    parser.add_argument("--model", default=defaults.model)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--max-length", type=int, default=defaults.max_length)
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every)
    parser.add_argument("--eval-limit", type=int, default=defaults.eval_limit)
    parser.add_argument("--eval-batch", type=int, default=defaults.eval_batch)
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--target", type=float, default=None, help="eval loss to reach (default: the worse final)")
    parser.add_argument("--trl-padding-free", action="store_true", help="TRL with padding-free batches (see above)")
    parser.add_argument("--out", default=None, help="write every figure to this JSON file")
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--setup", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, Setup(**json.loads(args.setup)), Path(args.result))
        return 0
    for name in ("steps", "batch", "max_length", "eval_every", "eval_limit", "eval_batch", "threads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    setup = Setup(config=args.config, model=args.model, steps=args.steps, batch=args.batch,
                  max_length=args.max_length, eval_every=args.eval_every, eval_limit=args.eval_limit,
                  eval_batch=args.eval_batch, train_limit=args.train_limit, threads=args.threads, device=device,
                  seed=args.seed, target=args.target, trl_padding_free=args.trl_padding_free)
    result = run_benchmark(setup)
    print(report(result))
    if args.out:
        write_json(args.out, result)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
