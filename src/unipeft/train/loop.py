"""The training loop: fine-tune a model on a task with a PEFT recipe, evaluate, checkpoint, and report.

``train(config)`` seeds everything, loads the model with the head the task needs, attaches the recipe (plus a
trainable copy of the classification head, as HF peft's ``modules_to_save``), and runs AdamW over the trainable
parameters with linear warm-up and decay, on dynamically padded batches. It evaluates every ``eval_every`` steps and
at the end, checkpoints every ``save_every`` steps (and resumes from the checkpoint after a crash, reproducing the
uninterrupted run exactly), and writes into ``output_dir``:

- ``adapter/``: the trained adapter (:func:`unipeft.load_adapter` reads it);
- ``metrics.json``: final metrics, parameter counts, time, throughput, peak memory and the config;
- ``generations.json`` (generation tasks): the final greedy outputs with their references;
- ``history.json`` and ``curves.png``: training loss and evaluation metrics against the step.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

import unipeft
from unipeft.peft import Peft
from unipeft.core.delta import PREPARE_BATCHES
from unipeft.core.recipe import DeltaSpec, Recipe, load_recipe
from unipeft.data import TaskSpec, collate, encode, load_rows
from unipeft.models import load_model
from unipeft.train.checkpoint import (
    ADAPTER_DIR,
    TrainState,
    has_checkpoint,
    read_checkpoint_meta,
    restore_checkpoint,
    resume_mismatches,
    save_checkpoint,
)
from unipeft.train.config import TrainConfig
from unipeft.train.distributed import Strategy, closing, launched, strategy
from unipeft.train.evaluate import evaluate
from unipeft.train.generation import evaluate_generation
from unipeft.train.optim import make_optimizer as build_optimizer
from unipeft.train.precision import DTYPES, autocast, keep_trainable_fp32, resolve_device, resolve_precision
from unipeft.train.report import peak_memory_mib, plot_curves, write_json
from unipeft.train.sampling import epoch_plan
from unipeft.train.schedule import lr_factor, warmup_steps
from unipeft.train.step import Stepper, to_device

log = logging.getLogger(__name__)

ADAPTER_NAME = "default"


@dataclass(frozen=True, kw_only=True)
class TrainResult:
    """What a finished run produced.

    Attributes:
        metrics: the final evaluation metrics (the task's metrics and ``loss``).
        main_metric: the task's main metric name.
        steps: optimizer steps done.
        trainable_params: parameters trained.
        total_params: parameters of the adapted model.
        trainable_percent: 100 · trainable / total.
        train_time_s: seconds in training steps (evaluation and loading excluded), over all resumed parts.
        wall_time_s: seconds of this call of :func:`train`, loading and evaluation included.
        peak_rss_mib: the process's peak resident memory.
        peak_device_mib: the peak memory allocated on the CUDA device (None on a CPU).
        tokens_per_s: training tokens (padding excluded) per second of training steps, over all ranks.
        device: where it trained.
        precision: the precision it trained in (``auto`` resolved).
        output_dir: the run's folder.
        adapter_dir: the saved adapter.
    """

    metrics: dict[str, float]
    main_metric: str
    steps: int
    trainable_params: int
    total_params: int
    trainable_percent: float
    train_time_s: float
    wall_time_s: float
    peak_rss_mib: float
    peak_device_mib: float | None
    tokens_per_s: float
    device: str
    precision: str
    output_dir: Path
    adapter_dir: Path


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def with_head(recipe: Recipe, kind: str) -> Recipe:
    """``recipe`` plus a trainable copy of the head (HF peft's ``modules_to_save``) when ``kind`` is
    classification or regression, since the new head must train; unchanged if the recipe trains the whole base or
    already places a delta at the head."""
    at_head = any("head" in spec.positions for spec in recipe.deltas)
    if kind not in ("classification", "regression") or recipe.train_base or at_head:
        return recipe
    head = DeltaSpec.from_dict({"form": {"type": "copy"}, "positions": ["head"]})
    return dataclasses.replace(recipe, deltas=recipe.deltas + (head,))


def recipe_for(config: TrainConfig, task: TaskSpec) -> Recipe:
    """The recipe to attach: the method with its options, plus the head copy for a labelled task (:func:`with_head`)."""
    return with_head(load_recipe(config.method).with_options(**config.method_options), task.kind)


def model_kind(task: TaskSpec) -> tuple[str, int | None]:
    """The model kind and ``num_labels`` that :func:`unipeft.models.load_model` needs for ``task``."""
    kind = "causal_lm" if task.kind == "generation" else task.kind
    return kind, (task.num_labels if task.kind == "classification" else None)


def make_optimizer(peft: Peft, config: TrainConfig, device: torch.device,
                   params: list[torch.nn.Parameter] | None = None) -> torch.optim.Optimizer:
    """The config's optimizer over ``params`` (default: the trainable parameters), without weight decay on biases and
    norm weights."""
    return build_optimizer(peft.trainable_parameters() if params is None else params, config.optimizer, lr=config.lr,
                           weight_decay=config.weight_decay, device=device)


def checkpoint_to_resume(ckpt: Path, config: TrainConfig) -> dict[str, Any] | None:
    """The checkpoint's metadata if the run resumes from it, else None.

    Raises:
        ValueError: if it was written by a run with a different model, task, method or data order.
    """
    if not has_checkpoint(ckpt):
        return None
    if not config.resume:
        log.warning("ignoring the checkpoint in %s (resume=false); it will be replaced", ckpt)
        return None
    meta = read_checkpoint_meta(ckpt)
    problems = resume_mismatches(meta["config"], config.to_dict())
    if problems:
        raise ValueError(f"cannot resume from {ckpt}: the config changed ({'; '.join(problems)}); "
                         "set resume=false to start over, or use another output_dir")
    return meta


def train(config: TrainConfig, *, on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Run the training described by ``config``; see the module docstring for what it writes.

    Args:
        config: the run.
        on_step: called after every optimizer step with ``(step, loss)``; an exception it raises stops the run
            as a crash would (the last checkpoint stays, to resume from).

    Raises:
        ValueError: for a bad model, task, method or option, or a checkpoint from a different run.
        FileNotFoundError: for missing data or model files.
    """
    threads = torch.get_num_threads()
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if launched() else 1
    torch.set_num_threads(config.threads or max(1, len(os.sched_getaffinity(0)) // per_node))
    try:
        with closing(strategy(config.strategy)) as strat:
            return _train(config, on_step, strat)
    finally:
        torch.set_num_threads(threads)


def _train(config: TrainConfig, on_step: Callable[[int, float], None] | None, strat: Strategy) -> TrainResult:
    started = time.perf_counter()
    task = config.task_spec()
    out = Path(config.output_dir)
    ckpt = out / "checkpoint"
    plain_config = config.to_dict()
    meta = checkpoint_to_resume(ckpt, config)

    seed_everything(config.seed)
    device = strat.device(resolve_device(config.device))
    precision = resolve_precision(config.precision, device)
    kind, num_labels = model_kind(task)
    model, tokenizer = load_model(config.model, kind=kind, num_labels=num_labels, seed=config.seed,  # type: ignore
                                  dtype=DTYPES[precision], quantization=config.quantization,
                                  double_quant=config.double_quant)
    if config.quantization is None:
        model.to(device)
    recipe = recipe_for(config, task)
    if meta is not None:
        peft = unipeft.load_adapter(model, ckpt / ADAPTER_DIR, name=ADAPTER_NAME)
    else:
        peft = unipeft.attach(model, recipe, name=ADAPTER_NAME)
    keep_trainable_fp32(peft.trainable_parameters())
    if config.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ValueError(f"gradient_checkpointing: {type(model).__name__} does not support it")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    summary = peft.summary()
    log.info("%s on %s with %s\n%s", config.model, task.name, recipe.name, summary)

    train_set = encode(load_rows(task, "train", config.data_dir, config.train_limit), task, tokenizer,
                       config.max_length)
    eval_rows = load_rows(task, "eval", config.data_dir, config.eval_limit)
    eval_set = encode(eval_rows, task, tokenizer, config.max_length)
    if not train_set:
        raise ValueError(f"task {task.name!r} has no training examples (train_limit={config.train_limit})")
    lengths = [len(e["input_ids"]) for e in train_set]
    plan_for = lambda epoch: epoch_plan(lengths, config.batch_size, seed=config.seed, epoch=epoch,  # noqa: E731
                                        group_by_length=config.group_by_length)
    per_epoch = len(plan_for(0))
    total = config.max_steps or config.epochs * per_epoch
    warmup = warmup_steps(total, config.warmup_ratio)

    pad_id = tokenizer.pad_token_id
    if meta is None and peft.needs_prepare():  # FishMask chooses its entries on the first training batches
        peft.prepare(to_device(collate([train_set[int(i)] for i in b], pad_id), device)
                     for b in plan_for(0)[:PREPARE_BATCHES])
    optimizer = make_optimizer(peft, config, device)
    stepper = Stepper(peft=peft, device=device, precision=precision, causal=task.kind in ("causal_lm", "generation"),
                      pad_id=pad_id, grad_accum_steps=config.grad_accum_steps, packing=config.packing,
                      capacity=config.max_length, loss_chunk=config.loss_chunk, max_grad_norm=config.max_grad_norm,
                      strategy=strat, compile=config.compile)
    state = TrainState()
    if meta is not None:
        state = restore_checkpoint(ckpt, meta, optimizer, stepper.scaler)
        optimizer.param_groups[0]["weight_decay"] = config.weight_decay
        log.info("resumed from %s at step %d (epoch %d, batch %d)", ckpt, state.step, state.epoch,
                 state.batch_in_epoch)
    main = task.main_metric
    last_eval: dict[str, float] = {}
    generations: list[dict[str, Any]] = []

    def run_eval() -> dict[str, float]:
        """Every rank evaluates its share of the evaluation set; every rank gets the metrics of the whole set."""
        with autocast(device, precision), strat.evaluating(stepper.module):
            metrics = evaluate(model, task, eval_set, config.eval_batch_size, pad_token_id=pad_id, ranks=strat)
            if task.kind == "generation":
                scores, generations[:] = evaluate_generation(model, tokenizer, task, eval_rows,
                                                             config.eval_batch_size, ranks=strat)
                metrics = {**scores, **metrics}
        state.history["eval"].append({"step": state.step, **metrics})
        log.info("step %d: %s", state.step, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        return metrics

    log.info("training %d steps (%d batches per epoch of %d examples, warm-up %d) on %s in %s, %d threads", total,
             per_epoch, len(train_set), warmup, device, precision, torch.get_num_threads())
    log_every = max(1, total // 20)  # without a progress bar, log the loss 20 times per run
    model.train()
    bar = tqdm(total=total, initial=state.step, desc=f"{task.name}/{recipe.name}", unit="step",
               disable=not config.progress or not strat.is_main, dynamic_ncols=True, mininterval=1.0)
    try:
        while state.step < total:
            plan = plan_for(state.epoch)
            while state.batch_in_epoch < len(plan) and state.step < total:
                indices = plan[state.batch_in_epoch]
                examples = [train_set[int(i)] for i in indices]
                lr = config.lr * lr_factor(state.step, total_steps=total, warmup=warmup, scheduler=config.scheduler)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                start = time.perf_counter()
                value, replaced = stepper.step(examples, optimizer, state.step + 1, total)
                if replaced:
                    optimizer = make_optimizer(peft, config, device)
                    stepper.rewrap()
                state.train_time_s += time.perf_counter() - start
                state.step += 1
                state.batch_in_epoch += 1
                state.examples += len(indices)
                state.tokens += sum(len(e["input_ids"]) for e in examples)
                state.history["train"].append({"step": state.step, "loss": value, "lr": lr})
                if on_step is not None:
                    on_step(state.step, value)
                if config.eval_every and state.step % config.eval_every == 0 and state.step < total:
                    last_eval = run_eval()
                if config.save_every and state.step % config.save_every == 0 and state.step < total:
                    if strat.is_main:
                        save_checkpoint(ckpt, peft=peft, optimizer=optimizer, state=state, config=plain_config,
                                        scaler=stepper.scaler)
                        log.info("checkpoint at step %d -> %s", state.step, ckpt)
                    strat.barrier()
                if not config.progress and state.step % log_every == 0:
                    log.info("step %d/%d: loss %.4f, lr %.2e, %.2f s/step", state.step, total, value, lr,
                             state.train_time_s / state.step)
                postfix = {"loss": f"{value:.4f}", "lr": f"{lr:.2e}",
                           "tok/s": f"{state.tokens / max(state.train_time_s, 1e-9):,.0f}",
                           "mem": f"{peak_memory_mib(device):,.0f}MiB"}
                if main in last_eval:
                    postfix[main] = f"{last_eval[main]:.4f}"
                bar.set_postfix(postfix, refresh=False)
                bar.update(1)
            if state.batch_in_epoch >= len(plan):
                state.epoch += 1
                state.batch_in_epoch = 0
    finally:
        bar.close()

    final = run_eval()
    adapter_dir = out / "adapter"
    if strat.is_main:
        peft.save(adapter_dir, ADAPTER_NAME)
    summary = peft.summary()  # after training: sparse methods may have pruned to their budget
    result = TrainResult(metrics=final, main_metric=main, steps=state.step, trainable_params=summary.trainable,
                         total_params=summary.total, trainable_percent=summary.percent,
                         train_time_s=state.train_time_s, wall_time_s=time.perf_counter() - started,
                         peak_rss_mib=peak_memory_mib(torch.device("cpu")),
                         peak_device_mib=peak_memory_mib(device) if device.type == "cuda" else None,
                         tokens_per_s=state.tokens / max(state.train_time_s, 1e-9),
                         device=str(device), precision=precision, output_dir=out, adapter_dir=adapter_dir)
    if strat.is_main:
        write_outputs(result, state, config, task, recipe, per_epoch, strat.world_size)
        if generations:
            write_json(out / "generations.json", generations)
        if has_checkpoint(ckpt):
            shutil.rmtree(ckpt, ignore_errors=True)  # the run is complete; its outputs replace the checkpoint
    strat.barrier()
    return result


def write_outputs(result: TrainResult, state: TrainState, config: TrainConfig, task: TaskSpec,
                   recipe: Recipe, per_epoch: int, world_size: int) -> None:
    seconds = max(state.train_time_s, 1e-9)
    metrics: dict[str, Any] = {
        "model": config.model, "task": task.name, "method": recipe.name, "main_metric": result.main_metric,
        "metrics": result.metrics, "steps": result.steps, "epochs": state.epoch + state.batch_in_epoch / per_epoch,
        "trainable_params": result.trainable_params, "total_params": result.total_params,
        "trainable_percent": result.trainable_percent, "train_time_s": state.train_time_s,
        "wall_time_s": result.wall_time_s,
        "throughput": {"steps_per_s": state.step / seconds, "examples_per_s": state.examples / seconds,
                       "tokens_per_s": state.tokens / seconds},
        "peak_rss_mib": result.peak_rss_mib, "peak_device_mib": result.peak_device_mib, "device": result.device,
        "precision": result.precision, "world_size": world_size, "threads": torch.get_num_threads(),
        "adapter_dir": str(result.adapter_dir), "recipe": recipe.to_dict(), "config": config.to_dict(),
    }
    write_json(result.output_dir / "metrics.json", metrics)
    write_json(result.output_dir / "history.json", state.history)
    plot_curves(result.output_dir / "curves.png", state.history, result.main_metric,
                f"{config.model} · {task.name} · {recipe.name}")


__all__ = ["train", "TrainResult", "recipe_for", "with_head", "model_kind", "seed_everything"]
