"""Many adapters trained at once on one copy of the base (multi-PEFT training: mLoRA, Ye et al. 2023,
arXiv 2312.02515; ASPEN).

``train_jobs(config)`` loads the base once, places every job's adapter on it (each seeded as its job alone would
be), and then, step after step, builds one batch from the next batch of every unfinished job, runs one forward and
one backward through the frozen base in a training mixed batch (``peft.mixed_batch(names, train=True)``: row b
through the adapter of its job), and lets each job take its own optimizer step with its own learning-rate schedule
and gradient clipping. The loss is the sum over jobs of each job's mean loss,

    L = Σ_j (1 / U_j) Σ_{b ∈ rows(j)} ℓ_b      U_j: the loss units (examples or labelled tokens) of job j's batch

and a row's gradient reaches only its own adapter, so ∂L/∂θ_j is exactly job j's gradient alone: each job follows
the trajectory of the same job trained alone with ``unipeft train`` (same seed, data order, schedule), to the
rounding of the shared padding (tested). Jobs end at their own step counts; the others go on. Each job evaluates
every ``eval_every`` of its steps and at its end, checkpoints every ``save_every`` (resumable per job: a rerun
continues every unfinished job from its last checkpoint), and writes the same outputs as a single-job run under
``output_dir/name``. ``output_dir/multi.json`` records the run: the jobs, the steps, the time and the throughput.

``jobs_per_pass`` (default: all) splits a step's jobs into passes of that many jobs, each its own forward and
backward, before the optimizer steps: activation memory is then that of ``jobs_per_pass`` jobs' rows instead of all
of them, the base is still one copy, and every job's gradient is the same (a row's gradient only ever reached its
own adapter). One pass per step is the fastest where one job alone leaves the device idle (a GPU); smaller passes
trade that for memory.

Not in multi-job training: gradient accumulation, packing, compile and torchrun (refused); dropout in the adapters
(a mixed batch does not apply it per row; refused); forms that prepare on data or train with extra loss terms or
per-step schedules (FishMask, AdaLoRA; refused).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

import unipeft
from unipeft.core.delta import Form
from unipeft.data import IGNORE_INDEX, TaskSpec, collate, encode, load_rows
from unipeft.models import load_model
from unipeft.peft import Peft
from unipeft.train.checkpoint import ADAPTER_DIR, TrainState, has_checkpoint, restore_checkpoint, save_checkpoint
from unipeft.train.distributed import launched
from unipeft.train.evaluate import evaluate
from unipeft.train.generation import evaluate_generation
from unipeft.train.lm_loss import _plain_head, chunked_cross_entropy
from unipeft.train.loop import (TrainResult, checkpoint_to_resume, make_optimizer, model_kind, recipe_for,
                                seed_everything, write_outputs)
from unipeft.train.multi_config import Job, MultiTrainConfig
from unipeft.train.precision import DTYPES, autocast, keep_trainable_fp32, resolve_device, resolve_precision
from unipeft.train.report import peak_memory_mib, write_json
from unipeft.train.sampling import epoch_plan
from unipeft.train.schedule import lr_factor, warmup_steps
from unipeft.train.step import loss_units, to_device

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Run:
    """One job while the run goes on."""

    job: Job
    task: TaskSpec
    train_set: list[dict[str, Any]]
    eval_set: list[dict[str, Any]]
    eval_rows: list[dict[str, Any]]
    total: int
    warmup: int
    per_epoch: int
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    state: TrainState
    result: TrainResult | None = None
    last_eval: dict[str, float] = field(default_factory=dict)
    generations: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.job.name

    @property
    def out(self) -> Path:
        return Path(self.job.config.output_dir)

    def plan(self) -> list[Any]:
        c = self.job.config
        lengths = [len(e["input_ids"]) for e in self.train_set]
        return epoch_plan(lengths, c.batch_size, seed=c.seed, epoch=self.state.epoch, group_by_length=c.group_by_length)

    def next_batch(self) -> list[dict[str, Any]]:
        """The examples of this job's next step (its data order: the order of the job alone)."""
        plan = self.plan()
        if self.state.batch_in_epoch >= len(plan):
            self.state.epoch += 1
            self.state.batch_in_epoch = 0
            plan = self.plan()
        return [self.train_set[int(i)] for i in plan[self.state.batch_in_epoch]]


def adapter_parameters(peft: Peft, name: str) -> list[nn.Parameter]:
    """The tensors of adapter ``name`` (its deltas and head copy)."""
    return list(dict.fromkeys(p for _, placed in peft.delta_modules(name) for p in placed.parameters()))


def _refuse_forms(peft: Peft, name: str) -> None:
    """Raise for forms that multi-job training cannot run as their job alone would (see the module docstring)."""
    for _, placed in peft.delta_modules(name):
        form = placed.form
        if not isinstance(form, Form):
            continue
        kind = type(form)
        if kind.on_step is not Form.on_step or kind.loss_term is not Form.loss_term or kind.prepare is not Form.prepare:
            raise ValueError(f"job {name!r}: {kind.__name__} has per-step schedules, extra loss terms or data-driven "
                             "preparation, which multi-job training does not run; train this job alone")


def row_losses(model: nn.Module, batch: dict[str, torch.Tensor], kind: str, groups: list[torch.Tensor],
               chunk: int | None) -> list[torch.Tensor]:
    """The summed loss of each group of rows (``groups``: row indices per job) from one forward of ``batch``.

    Causal LMs: next-token cross-entropy over the labelled positions, the head only there (chunked over the
    vocabulary, as :func:`unipeft.train.lm_loss.causal_lm_loss_sum`); labelled tasks: the per-example cross-entropy
    (classification) or squared error (regression) of the model's head."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if kind in ("causal_lm", "generation"):
        inputs["use_cache"] = False
        shifted = labels[:, 1:]
        head = _plain_head(model)
        sums = []
        if head is None:
            logits = model(**inputs).logits[:, :-1]
            for rows in groups:
                keep = shifted[rows] != IGNORE_INDEX
                sums.append(F.cross_entropy(logits[rows][keep].float(), shifted[rows][keep], reduction="sum"))
            return sums
        hidden = getattr(model, model.base_model_prefix)(**inputs)[0][:, :-1]  # (B, T-1, d)
        for rows in groups:
            keep = shifted[rows] != IGNORE_INDEX
            h, targets = hidden[rows][keep], shifted[rows][keep]
            if chunk is None:
                sums.append(F.cross_entropy(head(h).float(), targets, reduction="sum"))
            else:
                sums.append(chunked_cross_entropy(h, head.weight, targets, bias=head.bias, chunk=chunk))
        return sums
    logits = model(**inputs).logits
    if kind == "regression":
        each = F.mse_loss(logits.squeeze(-1).float(), labels.float(), reduction="none")
    else:
        each = F.cross_entropy(logits.float(), labels, reduction="none")
    return [each[rows].sum() for rows in groups]


def _forward_backward(peft: Peft, model: nn.Module, runs: list[_Run], batches: list[list[dict[str, Any]]], kind: str,
                      pad_id: int | None, device: torch.device, precision: str,
                      loss_chunk: int | None) -> list[torch.Tensor]:
    """One mixed-batch forward and backward over ``runs``' rows (``batches[i]`` is run i's); returns each run's mean
    loss (the backward has run: each run's gradient sits on its own adapter)."""
    examples = [e for b in batches for e in b]
    row_names = [r.name for r, b in zip(runs, batches) for _ in b]
    groups, start = [], 0
    for b in batches:
        groups.append(torch.arange(start, start + len(b), device=device))
        start += len(b)
    batch = to_device(collate(examples, pad_id), device)
    units = [max(1, sum(loss_units(e) for e in b)) for b in batches]
    with peft.mixed_batch(row_names, train=True):  # the backward too: checkpointing recomputes through it
        with autocast(device, precision):
            sums = row_losses(model, batch, kind, groups, loss_chunk)
        means = [s / u for s, u in zip(sums, units)]
        torch.stack(means).sum().backward()
    return means


def train_jobs(config: MultiTrainConfig, *,
               on_step: Callable[[str, int, float], None] | None = None,
               on_eval: Callable[[str, int, dict[str, float]], bool] | None = None) -> dict[str, TrainResult]:
    """Train every job of ``config`` at once on one base; see the module docstring.

    Args:
        config: the jobs.
        on_step: called after every job's optimizer step with ``(job, step, loss)``; an exception it raises stops
            the run as a crash would (each job's last checkpoint stays, to resume from).
        on_eval: called after every intermediate evaluation (every ``eval_every`` steps, not the final one) with
            ``(job, step, metrics)``; returning True stops that job there (an early-stopping pruner): it trains no
            more, writes no final outputs, and its checkpoint is removed; the other jobs go on.

    Returns:
        Each job's result, by name; jobs stopped by ``on_eval`` are left out.

    Raises:
        ValueError: for jobs that cannot share one base (different model kinds or label counts), a refused form or
            option, a checkpoint from a different run, or a run under torchrun.
    """
    if launched():
        raise ValueError("multi-job training runs in one process (its jobs share one base); run it without "
                         "torchrun / --nproc")
    first = config.jobs[0].config
    threads = torch.get_num_threads()
    torch.set_num_threads(first.threads or max(1, len(os.sched_getaffinity(0))))
    try:
        return _train_jobs(config, on_step, on_eval)
    finally:
        torch.set_num_threads(threads)


def _train_jobs(config: MultiTrainConfig, on_step: Callable[[str, int, float], None] | None,
                on_eval: Callable[[str, int, dict[str, float]], bool] | None) -> dict[str, TrainResult]:
    started = time.perf_counter()
    first = config.jobs[0].config
    tasks = {job.name: job.config.task_spec() for job in config.jobs}
    kinds = {name: model_kind(task) for name, task in tasks.items()}
    if len(set(kinds.values())) > 1:
        described = ", ".join(f"{n}: {k}" + (f" ({labels} labels)" if labels else "")
                              for n, (k, labels) in kinds.items())
        raise ValueError(f"the jobs share one base, so they need the same model kind and label count; got {described}")
    kind, num_labels = kinds[config.jobs[0].name]
    device = resolve_device(first.device)
    precision = resolve_precision(first.precision, device)
    model, tokenizer = load_model(first.model, kind=kind, num_labels=num_labels, seed=first.seed,  # type: ignore
                                  dtype=DTYPES[precision], quantization=first.quantization,
                                  double_quant=first.double_quant)
    if first.quantization is None:
        model.to(device)

    metas = {job.name: checkpoint_to_resume(Path(job.config.output_dir) / "checkpoint", job.config)
             for job in config.jobs}
    peft: Peft | None = None
    for job in config.jobs:  # each adapter seeded as its job alone seeds it
        if (Path(job.config.output_dir) / "metrics.json").is_file() and metas[job.name] is None:
            log.info("job %s: finished before (its metrics.json exists); training it again", job.name)
        seed_everything(job.config.seed)
        meta = metas[job.name]
        if meta is not None:
            peft = unipeft.load_adapter(model, Path(job.config.output_dir) / "checkpoint" / ADAPTER_DIR,
                                        name=job.name)
        else:
            peft = unipeft.attach(model, recipe_for(job.config, tasks[job.name]), name=job.name)
    assert peft is not None
    names = [job.name for job in config.jobs]

    def all_training() -> None:
        """Every job's adapter trainable; none active (the mixed batch routes each row to its own; two head copies
        could not be active at once)."""
        peft.set_active()
        for name in names:
            for p in adapter_parameters(peft, name):
                p.requires_grad_(True)

    all_training()
    for name in names:
        _refuse_forms(peft, name)
    keep_trainable_fp32(peft.trainable_parameters())
    if first.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ValueError(f"gradient_checkpointing: {type(model).__name__} does not support it")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    runs: list[_Run] = []
    for job in config.jobs:
        c, task = job.config, tasks[job.name]
        train_set = encode(load_rows(task, "train", c.data_dir, c.train_limit), task, tokenizer, c.max_length)
        if not train_set:
            raise ValueError(f"job {job.name!r}: task {task.name!r} has no training examples")
        eval_rows = load_rows(task, "eval", c.data_dir, c.eval_limit)
        params = adapter_parameters(peft, job.name)
        run = _Run(job=job, task=task, train_set=train_set, eval_set=encode(eval_rows, task, tokenizer, c.max_length),
                   eval_rows=eval_rows, total=0, warmup=0, per_epoch=0, params=params,
                   optimizer=make_optimizer(peft, c, device, params), state=TrainState())
        run.per_epoch = len(run.plan())
        run.total = c.max_steps or c.epochs * run.per_epoch
        run.warmup = warmup_steps(run.total, c.warmup_ratio)
        meta = metas[job.name]
        if meta is not None:
            run.state = restore_checkpoint(run.out / "checkpoint", meta, run.optimizer, None)
            run.optimizer.param_groups[0]["weight_decay"] = c.weight_decay
            log.info("job %s: resumed from its checkpoint at step %d", job.name, run.state.step)
        runs.append(run)

    def run_eval(run: _Run) -> dict[str, float]:
        peft.set_active(run.name)
        try:
            with autocast(device, precision):
                metrics = evaluate(model, run.task, run.eval_set, run.job.config.eval_batch_size,
                                   pad_token_id=tokenizer.pad_token_id)
                if run.task.kind == "generation":
                    scores, run.generations[:] = evaluate_generation(model, tokenizer, run.task, run.eval_rows,
                                                                     run.job.config.eval_batch_size)
                    metrics = {**scores, **metrics}
        finally:
            all_training()
        run.state.history["eval"].append({"step": run.state.step, **metrics})
        log.info("job %s, step %d: %s", run.name, run.state.step, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        return metrics

    def finish(run: _Run) -> None:
        metrics = run_eval(run)
        c = run.job.config
        adapter_dir = run.out / "adapter"
        peft.save(str(adapter_dir), run.name)
        params = sum(p.numel() for p in run.params)
        total_params = sum(p.numel() for p in model.parameters()) - sum(
            p.numel() for other in runs if other is not run for p in other.params)
        run.result = TrainResult(
            metrics=metrics, main_metric=run.task.main_metric, steps=run.state.step, trainable_params=params,
            total_params=total_params, trainable_percent=100.0 * params / total_params,
            train_time_s=run.state.train_time_s, wall_time_s=time.perf_counter() - started,
            peak_rss_mib=peak_memory_mib(torch.device("cpu")),
            peak_device_mib=peak_memory_mib(device) if device.type == "cuda" else None,
            tokens_per_s=run.state.tokens / max(run.state.train_time_s, 1e-9), device=str(device),
            precision=precision, output_dir=run.out, adapter_dir=adapter_dir)
        write_outputs(run.result, run.state, c, run.task, peft.recipes[run.name], run.per_epoch, 1)
        if run.generations:
            write_json(run.out / "generations.json", run.generations)
        shutil.rmtree(run.out / "checkpoint", ignore_errors=True)
        log.info("job %s finished at step %d", run.name, run.state.step)

    pad_id = tokenizer.pad_token_id
    causal = kind == "causal_lm"
    steps_done = 0
    step_time = 0.0
    tokens = 0
    model.train()
    todo = [r for r in runs if r.state.step < r.total]
    for run in runs:
        if run.state.step >= run.total:
            finish(run)
    bar = tqdm(total=sum(r.total for r in runs), initial=sum(r.state.step for r in runs), unit="step",
               desc=f"{len(runs)} jobs", disable=not first.progress, dynamic_ncols=True, mininterval=1.0)
    try:
        while todo:
            batches = [r.next_batch() for r in todo]
            for r in todo:
                lr = r.job.config.lr * lr_factor(r.state.step, total_steps=r.total, warmup=r.warmup,
                                                 scheduler=r.job.config.scheduler)
                for group in r.optimizer.param_groups:
                    group["lr"] = lr
            began = time.perf_counter()
            means = []
            per_pass = config.jobs_per_pass or len(todo)
            for at in range(0, len(todo), per_pass):  # one forward and backward per pass of jobs_per_pass jobs
                means += _forward_backward(peft, model, todo[at:at + per_pass], batches[at:at + per_pass],
                                           "causal_lm" if causal else kind, pad_id, device, precision,
                                           first.loss_chunk)
            for r in todo:
                c = r.job.config
                if c.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(r.params, c.max_grad_norm)
                r.optimizer.step()
                r.optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - began
            step_time += elapsed
            steps_done += 1
            finished, stopped = [], []
            for r, b, mean in zip(todo, batches, means):
                value = float(mean.detach())
                r.state.train_time_s += elapsed
                r.state.step += 1
                r.state.batch_in_epoch += 1
                r.state.examples += len(b)
                r.state.tokens += sum(len(e["input_ids"]) for e in b)
                tokens += sum(len(e["input_ids"]) for e in b)
                r.state.history["train"].append({"step": r.state.step, "loss": value,
                                                 "lr": r.optimizer.param_groups[0]["lr"]})
                if on_step is not None:
                    on_step(r.name, r.state.step, value)
                c = r.job.config
                if r.state.step >= r.total:
                    finished.append(r)
                    continue
                if c.eval_every and r.state.step % c.eval_every == 0:
                    r.last_eval = run_eval(r)
                    if on_eval is not None and on_eval(r.name, r.state.step, r.last_eval):
                        stopped.append(r)
                        continue
                if c.save_every and r.state.step % c.save_every == 0:
                    save_checkpoint(r.out / "checkpoint", peft=peft, optimizer=r.optimizer, state=r.state,
                                    config=c.to_dict(), name=r.name)
            for r in finished:
                finish(r)
                todo.remove(r)
            for r in stopped:
                log.info("job %s stopped at step %d (on_eval)", r.name, r.state.step)
                shutil.rmtree(r.out / "checkpoint", ignore_errors=True)
                bar.total -= r.total - r.state.step
                todo.remove(r)
            bar.set_postfix({"jobs": len(todo), "tok/s": f"{tokens / max(step_time, 1e-9):,.0f}",
                             "mem": f"{peak_memory_mib(device):,.0f}MiB"}, refresh=False)
            bar.update(len(batches))
    finally:
        bar.close()

    results = {r.name: r.result for r in runs if r.result is not None}
    write_json(Path(config.output_dir) / "multi.json", {
        **config.to_dict(), "steps": steps_done, "train_time_s": step_time,
        "wall_time_s": time.perf_counter() - started,
        "tokens_per_s": tokens / max(step_time, 1e-9), "peak_rss_mib": peak_memory_mib(torch.device("cpu")),
        "device": str(device), "precision": precision,
        "jobs_metrics": {r.name: (r.result.metrics if r.result else None) for r in runs}})
    return results  # type: ignore[return-value]


__all__ = ["train_jobs", "row_losses", "adapter_parameters"]
