"""``AdapterTrainer``: transformers' ``Trainer`` whose checkpoints and ``save_model`` hold the adapters only.

A plain ``Trainer`` trains a unipeft-adapted model as it is (only the adapters require grad, so only they are in the
optimizer), but saves it through ``model.save_pretrained``: the whole model, base weights included, under the wrapped
module names (``...q_proj.base.weight``, ``...q_proj.adapters.default.0.form.lora_A``). That file resumes the same
adapted model, but is the size of the base model and does not load into a plain one. ``AdapterTrainer`` instead writes
``Peft.save_pretrained(output_dir)`` (a few MB; loads with :func:`unipeft.from_pretrained`) plus the tokenizer and
training arguments, and resumes (``resume_from_checkpoint``, ``load_best_model_at_end``) by hot-swapping the saved
adapter weights into the live adapters, so the optimizer's references stay valid.

It also keeps the forms' training contract (:class:`unipeft.core.delta.Form`), which a plain ``Trainer`` would skip:

- ``train()`` first lets forms that need data see the first :data:`~unipeft.core.delta.PREPARE_BATCHES` training
  batches (FishMask chooses its entries there), before the optimizer is built;
- ``compute_loss`` adds ``peft.loss_term()`` in training (AdaLoRA's orthogonality regulariser), once per optimizer
  step whatever the gradient accumulation;
- after every ``optimizer.step()``, with the gradients still present, a callback calls
  ``peft.on_step(global_step + 1, max_steps)`` (AdaLoRA reallocates its budget, diff pruning prunes); when the
  trainable tensors were replaced, the optimizer's parameter groups get the new tensors (their state starts afresh).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer import TRAINING_ARGS_NAME

from unipeft.core.adapted import handle
from unipeft.peft import Peft
from unipeft.core.delta import PREPARE_BATCHES
from unipeft.persist.names import CONFIG_NAME, INDEX_NAME

log = logging.getLogger(__name__)
_PEFT_FLAG = "_hf_peft_config_loaded"


@contextmanager
def _adapters_count_as_trainable(model: nn.Module | None) -> Iterator[None]:
    """``Trainer.__init__`` refuses a quantized model unless HF peft adapters are loaded (it reads
    ``model._hf_peft_config_loaded``); unipeft's adapters are the trainable part here, so the flag is raised for the
    duration of the check only."""
    raise_flag = model is not None and getattr(model, "is_quantized", False) and not getattr(model, _PEFT_FLAG, False)
    previous = model.__dict__.get(_PEFT_FLAG) if raise_flag else None
    if raise_flag:
        model.__dict__[_PEFT_FLAG] = True
    try:
        yield
    finally:
        if raise_flag:
            if previous is None:
                model.__dict__.pop(_PEFT_FLAG, None)
            else:
                model.__dict__[_PEFT_FLAG] = previous


def load_checkpoint_adapters(peft: Peft, folder: str | os.PathLike) -> list[str]:
    """Copy the adapter weights saved in ``folder`` (by :meth:`Peft.save_pretrained`, unipeft format) into the
    adapters of the same names, in place.

    Returns:
        The names of the adapters updated.

    Raises:
        FileNotFoundError: if ``folder`` holds no unipeft adapter.
        ValueError: if a saved adapter does not match the live one (see :meth:`Peft.swap`).
    """
    folder = Path(folder)
    if (folder / CONFIG_NAME).is_file():
        name = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8")).get("adapter_name")
        if name not in peft.recipes:
            raise ValueError(f"{folder} holds adapter {name!r}, which this model does not have "
                             f"(it has: {', '.join(peft.recipes) or '-'})")
        peft.swap(name, str(folder))
        return [name]
    if (folder / INDEX_NAME).is_file():
        names = json.loads((folder / INDEX_NAME).read_text(encoding="utf-8"))["adapters"]
        for name in names:
            peft.swap(name, str(folder / name))
        return list(names)
    raise FileNotFoundError(f"{folder} holds no unipeft adapter checkpoint ({CONFIG_NAME} or {INDEX_NAME})")


class AdapterTrainer(Trainer):
    """A ``transformers.Trainer`` for a model with unipeft adapters: checkpoints hold the adapters only.

        peft = unipeft.attach(model, "lora")
        trainer = AdapterTrainer(model=model, args=TrainingArguments(...), train_dataset=...)
        trainer.train()                      # checkpoint-*/ hold adapter_config.json + adapter_model.safetensors
        trainer.save_model("out/")           # the same; load with unipeft.from_pretrained(base_model, "out/")

    It also trains a quantized (bitsandbytes) base with unipeft adapters (QLoRA), which a plain ``Trainer`` refuses
    because it only recognises HF peft's adapters.

    Raises:
        ValueError: if the model has no unipeft adapters.
    """

    def __init__(self, model: nn.Module | None = None, *args: Any, **kwargs: Any) -> None:
        if model is not None:
            handle(model)  # fail early, with unipeft's message, for a model without adapters
        with _adapters_count_as_trainable(model):
            super().__init__(model, *args, **kwargs)

        self.add_callback(_FormSteps(self))

    # ------------------------------------------------------------------------------------ the training contract
    def train(self, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``, after the forms that need data have seen the first training batches (FishMask)."""
        peft = self._peft()
        if peft.needs_prepare() and kwargs.get("resume_from_checkpoint", args[0] if args else None) in (None, False):
            batches = []
            for batch in self.get_train_dataloader():
                batches.append(self._prepare_inputs(batch))
                if len(batches) == PREPARE_BATCHES:
                    break
            before = _trainable(peft)
            if peft.prepare(batches):
                self._give_optimizer(before)
            log.info("prepared the adapters on %d training batches", len(batches))
        return super().train(*args, **kwargs)

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """The model's loss plus the forms' regularisers (in training), counted once per optimizer step."""
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        if not model.training:
            return result
        term = self._peft(model).loss_term()
        if self._loss_scaled_for_accumulation(num_items_in_batch):  # Trainer will not divide this loss by the steps
            term = term / max(getattr(self, "current_gradient_accumulation_steps", 1), 1)
        if return_outputs:
            loss, outputs = result
            return loss + term.to(loss.dtype), outputs
        return result + term.to(result.dtype)

    def _loss_scaled_for_accumulation(self, num_items_in_batch: Any) -> bool:
        """Whether ``training_step`` leaves the loss undivided by the accumulation steps (as ``Trainer`` decides)."""
        fixed = getattr(self, "loss_is_scaled_for_ga", None)
        if fixed is not None:
            return bool(fixed)
        return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None)
                    or self.compute_loss_func is not None)

    def _give_optimizer(self, before: dict[str, nn.Parameter]) -> None:
        """Put the tensors that replaced trainable ones (same names) into the optimizer's groups; drop the old state."""
        if self.optimizer is None:
            return
        now = _trainable(self._peft())
        swap = {id(old): now[name] for name, old in before.items() if name in now and now[name] is not old}
        if not swap:
            return
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate wraps it
        for group in optimizer.param_groups:
            for i, param in enumerate(group["params"]):
                if id(param) in swap:
                    optimizer.state.pop(param, None)
                    group["params"][i] = swap[id(param)]
        log.info("gave the optimizer %d replaced trainable tensors", len(swap))

    def _peft(self, model: nn.Module | None = None) -> Peft:
        return handle(self.accelerator.unwrap_model(model or self.model, keep_torch_compile=False))

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        peft = self._peft()
        peft.save_pretrained(output_dir, peft.active or None)
        log.info("saved adapters %s to %s", ", ".join(peft.active), output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))  # as Trainer does; never read back here

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        names = load_checkpoint_adapters(self._peft(model), resume_from_checkpoint)
        log.info("resumed adapters %s from %s", ", ".join(names), resume_from_checkpoint)

    def _load_best_model(self) -> None:
        names = load_checkpoint_adapters(self._peft(), self.state.best_model_checkpoint)
        log.info("loaded the best adapters %s from %s (score %s)", ", ".join(names),
                 self.state.best_model_checkpoint, self.state.best_metric)


def _trainable(peft: Peft) -> dict[str, nn.Parameter]:
    return {name: p for name, p in peft.model.named_parameters() if p.requires_grad}


class _FormSteps(TrainerCallback):
    """Calls ``peft.on_step`` right after each optimizer step (before ``zero_grad``: AdaLoRA reads the gradients)."""

    def __init__(self, trainer: AdapterTrainer) -> None:
        self.trainer = trainer

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        peft = self.trainer._peft()
        before = _trainable(peft)
        if peft.on_step(state.global_step + 1, state.max_steps):
            self.trainer._give_optimizer(before)


__all__ = ["AdapterTrainer", "load_checkpoint_adapters"]
