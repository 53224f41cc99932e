"""Many processes: DistributedDataParallel around the one trainer (Li et al., VLDB 2020, "PyTorch Distributed").

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) every rank loads the same base and adapter (same seed),
wraps the loss in ``DistributedDataParallel`` over the trainable tensors only (frozen base weights have no gradient
and no hooks, so an inactive adapter's frozen tensors cannot cause "unused parameters" failures), and takes its
contiguous share of the *same* global batch a single process would take. Each rank's summed loss is divided by the
global batch's loss units and multiplied by the world size, so DDP's gradient average is exactly the single-process
gradient of the global batch's mean loss: N ranks at ``batch_size`` B follow the one-process trajectory at B (to
rounding). Micro-batches before the last skip the all-reduce (``no_sync``). Rank 0 writes checkpoints and outputs;
checkpoints hold only world-independent state, so a run resumes on any number of ranks.

The backend is NCCL on CUDA devices (each rank on ``cuda:LOCAL_RANK``) and gloo on CPUs.

``strategy: fsdp`` shards the frozen base instead (FSDP2, ``torch.distributed.fsdp.fully_shard``; Zhao et al., VLDB
2023, "PyTorch FSDP"): each transformer block (the model's ``_no_split_modules``) is one FSDP unit and the rest of
the model (embeddings, final norm, head) the root unit, so a rank holds 1/N of the base and gathers one block at a
time. The adapters were placed before sharding (placing them after makes every rank train its own copy) and are
left out of the sharding (``ignored_params``): every rank holds them whole, their gradients are averaged with one
all-reduce after the backward, as DDP would, and the optimizer, the checkpoints and the saved adapter are exactly
those of one process. A quantized base cannot be sharded (bitsandbytes' packed 4-bit and 8-bit weights are not
DTensors): use DDP with it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")


def launched() -> bool:
    """Whether this process is one of several started by ``torchrun``."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


class Strategy:
    """One process: nothing to wrap, nothing to reduce."""

    rank = 0
    world_size = 1

    @property
    def is_main(self) -> bool:
        """Whether this rank writes checkpoints and outputs."""
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """The device this rank trains on, given the configured one."""
        return device

    def wrap(self, module: nn.Module) -> nn.Module:
        """The module to run the loss through."""
        return module

    def share(self, items: Sequence[T]) -> tuple[list[T], float]:
        """This rank's part of a global batch, and the weight of its loss (0 for a stand-in row)."""
        return list(items), 1.0

    def no_sync(self, module: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        """Skip the gradient all-reduce unless this is the step's last micro-batch."""
        return contextlib.nullcontext()

    def reduce_gradients(self, params: Sequence[nn.Parameter]) -> None:
        """Average the gradients of ``params`` over ranks, where the wrapper did not already."""

    def sum(self, value: float) -> float:
        """``value`` summed over ranks."""
        return value

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        return value

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank."""
        return [value]

    def evaluating(self, module: nn.Module) -> contextlib.AbstractContextManager:
        """Around an evaluation that calls the model directly (not through ``module``, the wrapped loss)."""
        return contextlib.nullcontext()

    def barrier(self) -> None:
        """Wait for every rank."""

    def close(self) -> None:
        """Leave the process group."""


class DDPStrategy(Strategy):
    """DistributedDataParallel over ``WORLD_SIZE`` ranks (see the module docstring)."""

    def __init__(self) -> None:
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available()
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def device(self, device: torch.device) -> torch.device:
        if device.type == "cuda":
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return device

    def wrap(self, module: nn.Module) -> nn.Module:
        device_ids = [self.local_rank] if next(module.parameters()).device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=False)

    def share(self, items: Sequence[T]) -> tuple[list[T], float]:
        parts = np.array_split(np.arange(len(items)), self.world_size)
        mine = [items[int(i)] for i in parts[self.rank]]
        if not mine:  # fewer examples than ranks: a stand-in row with weight 0 keeps the collectives in step
            return [items[0]], 0.0
        return mine, float(self.world_size)

    def no_sync(self, module: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if last else module.no_sync()  # type: ignore[operator]

    def sum(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t)

    def broadcast(self, value: Any) -> Any:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        box: list[Any] = [None] * self.world_size
        dist.all_gather_object(box, value)
        return box

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.barrier()  # a rank that leaves first can make the others abort at exit
            dist.destroy_process_group()


class FSDPStrategy(DDPStrategy):
    """FSDP2 over ``WORLD_SIZE`` ranks: the frozen base sharded, the adapters whole (see the module docstring)."""

    def wrap(self, module: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import fully_shard

        quantized = sorted({type(p).__name__ for p in module.parameters()} & {"Params4bit", "Int8Params"})
        if quantized:
            raise ValueError(f"strategy fsdp cannot shard a quantized base ({', '.join(quantized)} weights); "
                             "use strategy ddp with quantization")
        trainable = {p for p in module.parameters() if p.requires_grad}
        blocks = set(getattr(getattr(module, "model", module), "_no_split_modules", None) or ())
        units = [m for m in module.modules() if type(m).__name__ in blocks]
        if not units:
            raise ValueError(f"strategy fsdp: {type(getattr(module, 'model', module)).__name__} names no transformer "
                             "blocks (_no_split_modules) to shard")
        for unit in units:
            fully_shard(unit, ignored_params=trainable)
        fully_shard(module, ignored_params=trainable)
        return module

    def no_sync(self, module: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # the frozen base has no gradients to reduce-scatter

    def reduce_gradients(self, params: Sequence[nn.Parameter]) -> None:
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    @contextlib.contextmanager
    def evaluating(self, module: nn.Module) -> Iterator[None]:
        """The root unit's weights (embeddings, head) gathered while the evaluation calls the model past the root's
        hooks; the blocks gather their own."""
        module.unshard()  # type: ignore[operator]
        try:
            yield
        finally:
            module.reshard()  # type: ignore[operator]


#: Multi-process strategies by config name.
STRATEGIES: dict[str, type[DDPStrategy]] = {"ddp": DDPStrategy, "fsdp": FSDPStrategy}


def check_strategy(name: str) -> None:
    """Raise ValueError unless ``name`` is a multi-process strategy."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; valid: {', '.join(STRATEGIES)}")


def strategy(name: str = "ddp") -> Strategy:
    """``name``'s strategy under ``torchrun``, else one process."""
    check_strategy(name)
    return STRATEGIES[name]() if launched() else Strategy()


class LossModule(nn.Module):
    """The model and the step's loss as one module, so that DDP sees the whole forward (the causal-LM loss runs the
    body and the head separately). ``forward(batch, units)`` returns the summed loss of ``batch``."""

    def __init__(self, model: nn.Module, loss_sum: Any) -> None:
        super().__init__()
        self.model = model
        self._loss_sum = loss_sum

    def forward(self, batch: dict[str, torch.Tensor], units: int) -> torch.Tensor:
        return self._loss_sum(self.model, batch, units)


@contextlib.contextmanager
def closing(s: Strategy) -> Iterator[Strategy]:
    """``s``, closed on the way out."""
    try:
        yield s
    finally:
        s.close()


__all__ = ["Strategy", "DDPStrategy", "FSDPStrategy", "STRATEGIES", "check_strategy", "strategy",
           "launched", "LossModule", "closing"]
