"""Resumable training checkpoints, written atomically, in safetensors and JSON only (nothing is pickled).

A checkpoint folder holds:

- ``adapter/``: the adapter being trained (:func:`unipeft.save_adapter`);
- ``optimizer.safetensors``: the optimizer's per-parameter tensors (``state.<index>.<name>``) and the torch RNG state
  (``rng.torch``), so that dropout continues exactly where it stopped;
- ``state.json``: the step, the position in the data (epoch and batches consumed in it), the accumulated training
  time, the history so far, the optimizer's parameter groups and the run's config.

The folder is written under a temporary name and renamed into place, so a crash leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

import unipeft
from unipeft.peft import Peft
from unipeft.util.atomic import atomic_write_dir

STATE_NAME = "state.json"
TENSORS_NAME = "optimizer.safetensors"
ADAPTER_DIR = "adapter"
FORMAT = "unipeft-train-checkpoint"

#: Config keys that must be equal to resume: they decide the model, the adapter and the data order. (The step
#: budget and the optimiser's hyperparameters may change: the schedule is recomputed from the step.)
RESUME_KEYS = ("model", "task", "jsonl", "method", "method_options", "batch_size", "max_length", "group_by_length",
               "seed", "train_limit", "quantization", "double_quant")


@dataclass(kw_only=True)
class TrainState:
    """Where a run is: what a checkpoint restores besides the adapter and the optimizer.

    Attributes:
        step: optimizer steps done.
        epoch: the current epoch.
        batch_in_epoch: batches of the current epoch already trained on.
        train_time_s: seconds spent in training steps so far (evaluation excluded).
        examples: training examples seen so far.
        tokens: non-padding training tokens seen so far.
        history: ``{"train": [{step, loss, lr}, ...], "eval": [{step, metric: value, ...}, ...]}``.
        scaler: fp16's gradient-scaler state (its scale and growth counter; empty when disabled).
    """

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    train_time_s: float = 0.0
    examples: int = 0
    tokens: int = 0
    history: dict[str, list[dict[str, float]]] = field(default_factory=lambda: {"train": [], "eval": []})
    scaler: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "train_time_s": self.train_time_s, "examples": self.examples, "tokens": self.tokens,
                "history": self.history, "scaler": self.scaler}


def has_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` holds a complete checkpoint."""
    return (folder / STATE_NAME).is_file() and (folder / TENSORS_NAME).is_file() and (folder / ADAPTER_DIR).is_dir()


def save_checkpoint(folder: Path, *, peft: Peft, optimizer: torch.optim.Optimizer, state: TrainState,
                    config: dict[str, Any], scaler: torch.amp.GradScaler | None = None,
                    name: str | None = None) -> None:
    """Write a checkpoint of the adapter ``name`` (default: the only active one), the optimizer (AdamW's or
    bitsandbytes' 8-bit state), the RNG, the gradient scaler and ``state`` to ``folder``, atomically."""
    if scaler is not None:
        state.scaler = {k: v for k, v in scaler.state_dict().items() if isinstance(v, (int, float, bool))}
    opt = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in opt["state"].items():
        for key, value in _flat(entry):
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value.detach().cpu().clone()  # own storage: no sharing
            else:
                scalars.setdefault(str(index), {})[key] = value
    meta = {"format": FORMAT, "unipeft_version": unipeft.__version__, **state.to_dict(),
            "param_groups": opt["param_groups"], "optimizer_scalars": scalars, "config": config}

    def write(tmp: Path) -> None:
        unipeft.save_adapter(peft, tmp / ADAPTER_DIR, name)
        save_file(tensors, str(tmp / TENSORS_NAME), metadata={"format": FORMAT})
        (tmp / STATE_NAME).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")

    atomic_write_dir(folder, write)


def _flat(entry: dict[str, Any]) -> list[tuple[str, Any]]:
    """An optimizer state entry's values with nested dicts flattened to ``outer/inner`` keys (bitsandbytes keeps its
    8-bit state under ``__bnb_optimizer_quant_state__``)."""
    out: list[tuple[str, Any]] = []
    for key, value in entry.items():
        if isinstance(value, dict):
            out += [(f"{key}/{k}", v) for k, v in value.items()]
        else:
            out.append((key, value))
    return out


def _nest(entry: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`_flat`."""
    out: dict[str, Any] = {}
    for key, value in entry.items():
        outer, sep, inner = key.partition("/")
        if sep:
            out.setdefault(outer, {})[inner] = value
        else:
            out[key] = value
    return out


def read_checkpoint_meta(folder: Path) -> dict[str, Any]:
    """The JSON part of a checkpoint.

    Raises:
        ValueError: if it is not a unipeft training checkpoint.
    """
    meta = json.loads((folder / STATE_NAME).read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT:
        raise ValueError(f"{folder / STATE_NAME} is not a unipeft training checkpoint")
    return meta


def resume_mismatches(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The :data:`RESUME_KEYS` whose values differ between a checkpoint's config and the current one."""
    return [f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}" for k in RESUME_KEYS
            if saved.get(k) != current.get(k)]


#: Optimizer state tensors shaped like their parameter (AdamW's moments, 8-bit AdamW's quantized moments); the
#: others (8-bit AdamW's quantization maps and block scales) have shapes of their own.
_PARAM_SHAPED = ("exp_avg", "exp_avg_sq", "state1", "state2")


def restore_checkpoint(folder: Path, meta: dict[str, Any], optimizer: torch.optim.Optimizer,
                       scaler: torch.amp.GradScaler | None = None) -> TrainState:
    """Load the optimizer state and the torch RNG state of a checkpoint; return its :class:`TrainState`.

    The adapter itself is loaded separately, with :func:`unipeft.load_adapter` on ``folder / "adapter"``, before the
    optimizer is built over its parameters.

    Raises:
        ValueError: if the saved optimizer state does not fit the optimizer's parameters.
    """
    tensors = load_file(str(folder / TENSORS_NAME))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        if key.startswith("state."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = tensor
    for index, values in meta.get("optimizer_scalars", {}).items():
        state.setdefault(int(index), {}).update(values)
    for index, values in state.items():
        if index >= len(params):
            raise ValueError(f"checkpoint has optimizer state for parameter {index}; the model has {len(params)}")
        for name, value in values.items():
            if name.rpartition("/")[2] in _PARAM_SHAPED and value.shape != params[index].shape:
                raise ValueError(f"checkpoint optimizer tensor {name} of parameter {index} has shape "
                                 f"{tuple(value.shape)}; the parameter has {tuple(params[index].shape)}")
    state = {index: _nest(values) for index, values in state.items()}
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    saved_scaler = meta.get("scaler") or {}
    if scaler is not None and scaler.is_enabled() and saved_scaler:
        scaler.load_state_dict(saved_scaler)
    return TrainState(step=meta["step"], epoch=meta["epoch"], batch_in_epoch=meta["batch_in_epoch"],
                      train_time_s=meta["train_time_s"], examples=meta["examples"], tokens=meta["tokens"],
                      history=meta["history"], scaler=saved_scaler)


__all__ = ["TrainState", "has_checkpoint", "save_checkpoint", "read_checkpoint_meta", "restore_checkpoint",
           "resume_mismatches", "RESUME_KEYS", "ADAPTER_DIR"]
