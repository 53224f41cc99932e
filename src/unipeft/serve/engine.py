"""The serving engine: continuous (iteration-level) batching of many adapters on one base, on one thread.

Between two decoding steps, waiting requests join the running batch (those that arrive together are prefilled
together, in one left-padded forward of up to ``prefill_tokens`` prompt tokens, each row with its own adapter, into a
fresh KV cache, which is then left-padded into the batch's cache) and finished or cancelled ones leave it (their rows
are dropped and the columns that only padding holds are cut). Every decoding step is one forward of the whole batch,
every row with its own adapter, through the public mixed-batch API (``peft.mixed_batch(names)``, Punica's BGMV
gather), one block re-entered step after step while the rows stay the same, so the rows' factors are gathered when
the batch changes, not at every step. How rows of different lengths share a step: **left padding with per-row positions** — the batch cache is
(B, H, T, d) with a 0/1 mask over its T columns, and row b's new token gets position ``len_b`` (its own count of real
tokens), so each row computes what it would alone. We chose this over a ragged token layout (Punica's SGMV) because
transformers' attention takes a padded cache and a 2-D mask as they are, and over transformers 5's own continuous
batching (``generate_batch`` / the paged cache), which serves one set of weights per call and has no per-row adapter
hook; the padding costs what docs/serving.md measures.

With ``mixed=False`` a step runs only the rows of one adapter (groups in turn): what a server that switches
``set_active`` between batches does — the benchmark's baseline.
"""

from __future__ import annotations

import inspect
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from unipeft.serve.registry import AdapterError, AdapterRegistry

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The waiting queue is at its bound (answer 503 with Retry-After)."""


class Draining(RuntimeError):
    """The server is shutting down and takes no new work."""


@dataclass
class GenRequest:
    """One generation: the prompt's token ids, the adapter (None: the base) and the sampling settings.

    ``emit(event)`` is called on the engine thread with ``("token", id)``, ``("done", finish_reason)`` or
    ``("error", AdapterError)``; ``cancel()`` may be called from any thread.
    """

    prompt: list[int]
    adapter: str | None
    max_tokens: int
    emit: Callable[[tuple[str, Any]], None]
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()
    stop_check: Callable[[list[int]], bool] | None = None
    submitted: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class _Row:
    req: GenRequest
    generator: torch.Generator | None
    length: int  # real tokens in the cache
    last: int  # the token to feed next
    produced: list[int] = field(default_factory=list)


class Engine:
    """Continuous batching over a model with an :class:`AdapterRegistry` (see the module docstring)."""

    def __init__(self, registry: AdapterRegistry, *, max_batch: int, queue_size: int, max_context: int,
                 mixed: bool = True, on_step: Callable[[int], None] | None = None,
                 on_prefill: Callable[[int], None] | None = None, prefill_tokens: int = 4096) -> None:
        self.registry = registry
        self.peft = registry.peft
        self.model = registry.peft.model
        self.max_batch = max_batch
        self.max_context = max_context
        self.mixed = mixed
        self.on_step = on_step  # called with the rows of each decoding step
        self.on_prefill = on_prefill  # called with the rows of each prefill forward
        self.device = next(self.model.parameters()).device
        self.prefill_tokens = prefill_tokens
        # the prefill needs the logits of each prompt's last position only: (B, T, V) logits are most of its memory
        accepts = inspect.signature(self.model.forward).parameters
        self._last_only = {"logits_to_keep": 1} if "logits_to_keep" in accepts else {}
        self._waiting: queue.Queue[GenRequest] = queue.Queue(maxsize=queue_size)
        self._commands: queue.Queue[tuple[Callable[[], Any], Callable[[Any, BaseException | None], None]]] = \
            queue.Queue()
        self._rows: list[_Row] = []
        self._keys: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []
        self._mask: torch.Tensor | None = None
        self._batch: Any = None  # the decoding steps' mixed batch, re-entered while the rows stay the same
        self._stop = threading.Event()
        self.draining = False
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="unipeft-engine", daemon=True)

    # ------------------------------------------------------------------------------------------------ control
    def start(self) -> None:
        self._thread.start()

    def stop(self, drain_s: float = 30.0) -> None:
        """Refuse new work, let the running and waiting requests finish (up to ``drain_s``), then stop."""
        self.draining = True
        deadline = time.monotonic() + drain_s
        while (self._rows or not self._waiting.empty()) and time.monotonic() < deadline:
            time.sleep(0.02)
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)

    @property
    def queue_depth(self) -> int:
        return self._waiting.qsize()

    @property
    def batch_size(self) -> int:
        return len(self._rows)

    def submit(self, req: GenRequest) -> None:
        """Queue a request (it joins the batch at the next step).

        Raises:
            QueueFull: when the waiting queue is full; Draining: while shutting down.
        """
        if self.draining:
            raise Draining("the server is shutting down")
        try:
            self._waiting.put_nowait(req)
        except queue.Full:
            raise QueueFull(f"the queue is full ({self._waiting.maxsize} waiting requests)") from None
        self._wake.set()

    def call(self, fn: Callable[[], Any], timeout: float = 120.0) -> Any:
        """Run ``fn`` on the engine thread between two steps (loading/unloading adapters) and return its result."""
        done = threading.Event()
        box: list[Any] = [None, None]

        def finish(result: Any, error: BaseException | None) -> None:
            box[0], box[1] = result, error
            done.set()

        self._commands.put((fn, finish))
        self._wake.set()
        if not done.wait(timeout):
            raise TimeoutError("the engine did not answer in time")
        if box[1] is not None:
            raise box[1]
        return box[0]

    # ------------------------------------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        with torch.no_grad():  # not inference_mode: adapters loaded here must stay ordinary tensors
            while not self._stop.is_set():
                try:
                    self._run_commands()
                    self._drop_finished()
                    self._admit()
                    if self._rows:
                        self._step()
                    else:
                        self._wake.wait(0.05)
                        self._wake.clear()
                except Exception:  # never let one bad step kill the server: fail the running rows, go on
                    log.exception("engine step failed")
                    for row in self._rows:
                        row.req.emit(("error", AdapterError("internal error in the decoding step", 500, None)))
                        self.registry.release(row.req.adapter)
                    self._rows, self._keys, self._values, self._mask, self._batch = [], [], [], None, None

    def _run_commands(self) -> None:
        while True:
            try:
                fn, finish = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                finish(fn(), None)
            except BaseException as err:  # handed to the caller's thread
                finish(None, err)

    def _admit(self) -> None:
        """Take waiting requests while the batch has room and prefill them together (see :meth:`_prefill`)."""
        group: list[GenRequest] = []
        while len(self._rows) + len(group) < self.max_batch:
            try:
                req = self._waiting.get_nowait()
            except queue.Empty:
                break
            if req.cancelled.is_set():
                continue
            try:
                self.registry.acquire(req.adapter)
            except AdapterError as err:
                req.emit(("error", err))
                continue
            group.append(req)
        for chunk in _prefill_chunks(group, self.prefill_tokens):
            try:
                self._prefill(chunk)
            except Exception as err:
                log.exception("prefill failed")
                for req in chunk:
                    self.registry.release(req.adapter)
                    req.emit(("error", AdapterError(f"prefill failed: {err}", 500, None)))

    def _prefill(self, reqs: list[GenRequest]) -> None:
        """One forward over the prompts of ``reqs`` (left-padded, per-row positions, each row its own adapter) into
        a fresh cache, which then joins the batch's; each row's first token is sampled from its last position."""
        width = max(len(r.prompt) for r in reqs)
        pads = [width - len(r.prompt) for r in reqs]
        ids = torch.tensor([[0] * pad + r.prompt for pad, r in zip(pads, reqs)], device=self.device)
        mask = torch.tensor([[0] * pad + [1] * len(r.prompt) for pad, r in zip(pads, reqs)], device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        with self.peft.mixed_batch([r.adapter for r in reqs]), _contiguous_head(self.model):
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                                use_cache=True, **self._last_only).logits[:, -1]
        rows = []
        for req in reqs:
            generator = None
            if req.temperature > 0:
                generator = torch.Generator(device=self.device)
                generator.manual_seed(req.seed if req.seed is not None else int(time.time_ns() % (2 ** 63)))
            rows.append(_Row(req=req, generator=generator, length=len(req.prompt), last=0))
        keys = [layer.keys for layer in cache.layers]
        values = [layer.values for layer in cache.layers]
        self._join(rows, keys, values, mask)
        if self.on_prefill is not None:
            self.on_prefill(len(rows))
        for j, row in enumerate(rows):
            self._accept(row, self._sample(row, logits[j]))

    def _join(self, rows: list[_Row], keys: list[torch.Tensor], values: list[torch.Tensor],
              mask: torch.Tensor) -> None:
        if not self._rows:
            self._keys, self._values, self._mask = keys, values, mask
        else:
            width = max(self._mask.shape[1], mask.shape[1])
            self._keys = [torch.cat([_left_pad(a, width), _left_pad(b, width)]) for a, b in zip(self._keys, keys)]
            self._values = [torch.cat([_left_pad(a, width), _left_pad(b, width)])
                            for a, b in zip(self._values, values)]
            self._mask = torch.cat([_left_pad_mask(self._mask, width), _left_pad_mask(mask, width)])
        self._rows.extend(rows)

    def _step(self) -> None:
        rows = list(range(len(self._rows)))
        if not self.mixed:  # one adapter per step, groups in turn (the baseline)
            turn = self._rows[0].req.adapter
            rows = [i for i, r in enumerate(self._rows) if r.req.adapter == turn]
        index = torch.tensor(rows, device=self.device)
        sub = len(rows) != len(self._rows)
        keys = [k.index_select(0, index) if sub else k for k in self._keys]
        values = [v.index_select(0, index) if sub else v for v in self._values]
        mask = self._mask.index_select(0, index) if sub else self._mask
        cache = DynamicCache(ddp_cache_data=list(zip(keys, values)))
        last = torch.tensor([[self._rows[i].last] for i in rows], device=self.device)
        positions = torch.tensor([[self._rows[i].length] for i in rows], device=self.device)
        mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=mask.dtype, device=self.device)], dim=1)
        names = [self._rows[i].req.adapter for i in rows]
        if self._batch is None or self._batch.names != names:  # rows joined or left: gather the stacks anew
            self._batch = self.peft.mixed_batch(names)
        with self._batch:
            logits = self.model(input_ids=last, attention_mask=mask, position_ids=positions, past_key_values=cache,
                                use_cache=True).logits[:, -1]
        new_keys = [layer.keys for layer in cache.layers]
        new_values = [layer.values for layer in cache.layers]
        if sub:  # the other rows get a padding column so that the batch stays one tensor
            full = [torch.cat([k, k.new_zeros(*k.shape[:2], 1, k.shape[3])], dim=2) for k in self._keys]
            fullv = [torch.cat([v, v.new_zeros(*v.shape[:2], 1, v.shape[3])], dim=2) for v in self._values]
            for f, n in zip(full, new_keys):
                f[index] = n
            for f, n in zip(fullv, new_values):
                f[index] = n
            self._keys, self._values = full, fullv
            grown = torch.cat([self._mask, self._mask.new_zeros(len(self._rows), 1)], dim=1)
            grown[index, -1] = 1
            self._mask = grown
        else:
            self._keys, self._values, self._mask = new_keys, new_values, mask
        for j, i in enumerate(rows):
            row = self._rows[i]
            row.length += 1
            self._accept(row, self._sample(row, logits[j]))
        if self.on_step is not None:
            self.on_step(len(rows))

    def _accept(self, row: _Row, token: int) -> None:
        req = row.req
        if req.cancelled.is_set():
            return
        if token in req.stop_ids:
            self._finish(row, "stop")
            return
        row.produced.append(token)
        row.last = token
        req.emit(("token", token))
        if req.stop_check is not None and req.stop_check(row.produced):
            self._finish(row, "stop")
        elif len(row.produced) >= req.max_tokens or row.length + 1 >= self.max_context:
            self._finish(row, "length")

    def _finish(self, row: _Row, reason: str) -> None:
        row.req.emit(("done", reason))
        row.req.cancel()  # marks the row for removal before the next step

    def _drop_finished(self) -> None:
        keep = [i for i, r in enumerate(self._rows) if not r.req.cancelled.is_set()]
        if len(keep) == len(self._rows):
            return
        for i, r in enumerate(self._rows):
            if i not in keep:
                self.registry.release(r.req.adapter)
        self._batch = None
        if not keep:
            self._rows, self._keys, self._values, self._mask = [], [], [], None
            return
        index = torch.tensor(keep, device=self.device)
        self._rows = [self._rows[i] for i in keep]
        self._keys = [k.index_select(0, index) for k in self._keys]
        self._values = [v.index_select(0, index) for v in self._values]
        self._mask = self._mask.index_select(0, index)
        first = int(self._mask.any(dim=0).float().argmax())  # columns only padding holds are cut
        if first:
            self._keys = [k[:, :, first:] for k in self._keys]
            self._values = [v[:, :, first:] for v in self._values]
            self._mask = self._mask[:, first:]

    def _sample(self, row: _Row, logits: torch.Tensor) -> int:
        req = row.req
        if req.temperature <= 0:
            return int(logits.argmax())
        probs = torch.softmax(logits.float() / req.temperature, dim=-1)
        if req.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(0) - sorted_probs < req.top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=row.generator))


@contextmanager
def _contiguous_head(model: torch.nn.Module) -> Iterator[None]:
    """While the block runs, the output head gets a contiguous input.

    With ``logits_to_keep=1`` the head's input is ``hidden[:, -1:, :]``, a strided view. torch's matmul folds a 3-D
    input into one 2-D matmul only when its strides allow it or the weight requires grad; the base is frozen, so it
    runs a batched matmul over the (V, d) weight expanded per row instead. fp32 on CPU shrugs that off; bf16 does not:
    a 16-row, 40-token SmolLM2 prefill with 16 LoRA adapters took 1.9 s, 0.5 s with the input made contiguous (fp32:
    1.1 s either way; docs/serving.md). HF peft's ``generate`` has the same defect (its frozen base, same slice).
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        yield
        return
    handle = head.register_forward_pre_hook(lambda _module, args: (args[0].contiguous(), *args[1:]))
    try:
        yield
    finally:
        handle.remove()


def _prefill_chunks(reqs: list[GenRequest], tokens: int) -> list[list[GenRequest]]:
    """``reqs`` sorted by prompt length and cut into groups whose padded size (rows x longest prompt) stays within
    ``tokens`` (a longer prompt goes alone): one prefill forward per group."""
    chunks: list[list[GenRequest]] = []
    for req in sorted(reqs, key=lambda r: len(r.prompt)):
        if chunks and (len(chunks[-1]) + 1) * len(req.prompt) <= tokens:
            chunks[-1].append(req)
        else:
            chunks.append([req])
    return chunks


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - t.shape[2]
    if missing == 0:
        return t
    return torch.cat([t.new_zeros(t.shape[0], t.shape[1], missing, t.shape[3]), t], dim=2)


def _left_pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - mask.shape[1]
    return mask if missing == 0 else torch.cat([mask.new_zeros(mask.shape[0], missing), mask], dim=1)


__all__ = ["Engine", "GenRequest", "QueueFull", "Draining"]
