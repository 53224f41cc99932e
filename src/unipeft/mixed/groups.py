"""Stacked groups: the deltas of many adapters at one site, computed for every row of a batch in one go.

A group holds the factors (see :mod:`unipeft.core.factors`) of every adapter whose delta at a site has the same
kind and placement, stacked along a new first axis with slot 0 the zero adapter (rows whose adapter has no such delta
here), zero-padded to a common rank / hidden size, with the scalings (the form's, the composition's s) folded into the
output side. The stacks are built once and kept while the adapters do not change. When a batch starts,
:meth:`Group.bind` gathers them per row (one ``index_select`` by the row's slot per stacked tensor), so that a forward
is two batched matrix products with no indexing, e.g. for LoRA (Punica's BGMV)::

    A_rows: (B, r, d_in),  B_rows: (B, d_out, r)         row b: the A and B of row b's adapter
    Δ = bmm(bmm(z, A_rowsᵀ), B_rowsᵀ)                     z: (B, N, d_in) → (B, N, r) → (B, N, d_out)

If every row uses the same adapter, the bound group takes that adapter's slice and runs two plain matmuls. Zero
padding is exact: padded rank columns, hidden units (act(0) = 0) and the zero slot contribute exact zeros.

For inference the stacks are detached copies. Built inside :func:`differentiable` (a mixed batch for training), they
are differentiable functions of the adapters' tensors instead: a row's loss reaches only the slot it gathered, so
its gradient reaches only its own adapter (mLoRA / ASPEN's multi-adapter training on one base).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from unipeft.core.factors import MLP, Affine, Factors, LowRank, Scale

Rows = dict[str, torch.Tensor]

_DIFFERENTIABLE: contextvars.ContextVar[bool] = contextvars.ContextVar("unipeft_mixed_differentiable", default=False)


@contextlib.contextmanager
def differentiable() -> Iterator[None]:
    """Groups built inside stack the adapters' tensors differentiably (for training), not as detached copies."""
    token = _DIFFERENTIABLE.set(True)
    try:
        yield
    finally:
        _DIFFERENTIABLE.reset(token)


def _stacking() -> contextlib.AbstractContextManager:
    """Where the stacks are built: without autograd for inference, with it inside :func:`differentiable`."""
    return contextlib.nullcontext() if _DIFFERENTIABLE.get() else torch.no_grad()


def _stack(tensors: Sequence[torch.Tensor | None], shape: tuple[int, ...], like: torch.Tensor, *,
           fill: float = 0.0, scales: Sequence[float] | None = None) -> torch.Tensor:
    """(n + 1, *shape): slot k + 1 holds ``tensors[k] * scales[k]`` zero-padded up to ``shape``; slot 0 (and a None
    tensor) is ``fill`` everywhere."""
    out = torch.full((len(tensors) + 1, *shape), fill, dtype=like.dtype, device=like.device)
    for slot, t in enumerate(tensors, start=1):
        if t is not None:
            scale = 1.0 if scales is None else scales[slot - 1]
            t = t if _DIFFERENTIABLE.get() else t.detach()
            out[(slot, *(slice(0, n) for n in t.shape))] = t * scale if scale != 1.0 else t
    return out


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(B, ..., d) → (B, N, d)."""
    return t.reshape(t.shape[0], -1, t.shape[-1])


def _per_row(vectors: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, d) row vectors shaped to broadcast against a (B, ..., d) tensor; a (d,) vector as it is."""
    if vectors.dim() == 1:
        return vectors
    return vectors.view(vectors.shape[0], *([1] * (like.dim() - 2)), vectors.shape[-1])


class Group:
    """Stacked deltas of several adapters of one kind at one site.

    Attributes:
        stacks: name → (n + 1, ...) stacked tensor, slot 0 the zero adapter.
    """

    #: stacks that bind() leaves whole (looked up per token instead of gathered per row)
    keep_whole: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.stacks: dict[str, torch.Tensor] = {}

    @property
    def device(self) -> torch.device:
        """Where the stacks are."""
        return next(iter(self.stacks.values())).device

    def bind(self, slots: Sequence[int], index: torch.Tensor | None = None) -> "Bound":
        """The stacks gathered for a batch whose row b uses slot ``slots[b]``; ``index`` is ``slots`` as a tensor on
        the stacks' device, if the caller has it (one host-to-device copy for many groups)."""
        first = slots[0]
        uniform = first if all(s == first for s in slots) else None
        if index is None:
            index = torch.tensor(list(slots), dtype=torch.long, device=self.device)
        rows: Rows = {}
        for name, stack in self.stacks.items():
            if name in self.keep_whole and uniform is None:
                rows[name] = stack
            elif uniform is not None:  # one adapter for every row: its slice, run as a plain matmul
                rows[name] = stack[uniform]
            else:
                rows[name] = stack.index_select(0, index)
        return Bound(self, rows, index, uniform is not None)

    def delta(self, rows: Rows, slots: torch.Tensor, uniform: bool, z: torch.Tensor) -> torch.Tensor:
        """Δ for every row of z (B, ..., d_in) → (B, ..., d_out)."""
        raise NotImplementedError


class Bound:
    """A group bound to the rows of one batch: ``delta(z)`` / ``scale(t)`` for every row."""

    def __init__(self, group: Group, rows: Rows, slots: torch.Tensor, uniform: bool) -> None:
        self.group, self.rows, self.slots, self.uniform = group, rows, slots, uniform

    def delta(self, z: torch.Tensor) -> torch.Tensor:
        """Δ of each row's adapter."""
        return self.group.delta(self.rows, self.slots, self.uniform, z)

    def scale(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (B, ..., d) times each row's scaling vector."""
        return t * _per_row(self.rows["vector"], t)


class LowRankGroup(Group):
    """Δ(z) = B_a A_a z (+ g_a ⊙ W z) with a = the row's adapter."""

    keep_whole = ("A_table",)

    def __init__(self, factors: list[LowRank], scales: list[float]) -> None:
        super().__init__()
        like = factors[0].B
        r = max(f.A.shape[0] for f in factors)
        d_in, d_out = factors[0].A.shape[1], like.shape[0]
        self.weight = factors[0].base_weight.detach() if factors[0].base_weight is not None else None
        with _stacking():
            a = _stack([f.A for f in factors], (r, d_in), like)  # (n+1, r, d_in); d_in = vocab for an embedding
            self.stacks["A_table" if factors[0].embedding else "A"] = a
            self.stacks["B"] = _stack([f.B for f in factors], (d_out, r), like,
                                      scales=[f.scale * s for f, s in zip(factors, scales)])  # (n+1, d_out, r)
            if self.weight is not None:
                self.stacks["gain"] = _stack([f.base_gain for f in factors], (d_out,), like, scales=scales)

    def delta(self, rows: Rows, slots: torch.Tensor, uniform: bool, z: torch.Tensor) -> torch.Tensor:
        B, gain = rows["B"], rows.get("gain")
        if "A_table" in rows:  # an embedding: z are token ids (B, T)
            table = rows["A_table"]
            if uniform:
                return F.embedding(z, table.T) @ B.T
            u = table[slots.view(-1, *([1] * (z.dim() - 1))), :, z]  # A[slot_b, :, id] → (B, T, r)
            return torch.bmm(_rows(u), B.transpose(1, 2)).view(*z.shape, -1)
        A = rows["A"]
        if uniform:
            out = F.linear(F.linear(z.to(A.dtype), A), B)
        else:
            u = torch.bmm(_rows(z.to(A.dtype)), A.transpose(1, 2))  # (B, N, r)
            out = torch.bmm(u, B.transpose(1, 2)).view(*z.shape[:-1], -1)  # (B, ..., d_out)
        if gain is not None:
            out = out + _per_row(gain, out) * F.linear(z.to(self.weight.dtype), self.weight)
        return out


class AffineGroup(Group):
    """Δ(z) = g_a ⊙ z + b_a."""

    def __init__(self, factors: list[Affine], scales: list[float]) -> None:
        super().__init__()
        like = next(t for f in factors for t in (f.gain, f.shift) if t is not None)
        gains, shifts = [f.gain for f in factors], [f.shift for f in factors]
        with _stacking():
            if any(g is not None for g in gains):
                self.stacks["gain"] = _stack(gains, (like.shape[0],), like, scales=scales)  # (n+1, d)
            if any(b is not None for b in shifts):
                self.stacks["shift"] = _stack(shifts, (like.shape[0],), like, scales=scales)  # (n+1, d_out)

    def delta(self, rows: Rows, slots: torch.Tensor, uniform: bool, z: torch.Tensor) -> torch.Tensor:
        out = _per_row(rows["gain"], z) * z if "gain" in rows else None
        if "shift" in rows:
            shift = _per_row(rows["shift"], z)
            out = shift if out is None else out + shift
        return out


class ScaleGroup(Group):
    """h' = h ⊙ l_a (or x' = x ⊙ l_a before the module); slot 0 is l = 1."""

    def __init__(self, factors: list[Scale]) -> None:
        super().__init__()
        like = factors[0].vector
        with _stacking():
            self.stacks["vector"] = _stack([f.vector for f in factors], (like.shape[0],), like, fill=1.0)


class MLPGroup(Group):
    """Δ(z) = act(z W_down,aᵀ + b_down,a) W_up,aᵀ + b_up,a."""

    def __init__(self, factors: list[MLP], scales: list[float]) -> None:
        super().__init__()
        self.act: nn.Module = factors[0].activation
        like = factors[0].down_weight
        m = max(f.down_weight.shape[0] for f in factors)
        d_in, d_out = like.shape[1], factors[0].up_weight.shape[0]
        with _stacking():
            self.stacks["down"] = _stack([f.down_weight for f in factors], (m, d_in), like)  # (n+1, m, d_in)
            self.stacks["down_bias"] = _stack([f.down_bias for f in factors], (m,), like)
            self.stacks["up"] = _stack([f.up_weight for f in factors], (d_out, m), like, scales=scales)
            self.stacks["up_bias"] = _stack([f.up_bias for f in factors], (d_out,), like, scales=scales)

    def delta(self, rows: Rows, slots: torch.Tensor, uniform: bool, z: torch.Tensor) -> torch.Tensor:
        down, up = rows["down"], rows["up"]
        if uniform:
            return F.linear(self.act(F.linear(z.to(down.dtype), down, rows["down_bias"])), up, rows["up_bias"])
        zr = _rows(z.to(down.dtype))  # (B, N, d_in)
        hidden = self.act(torch.baddbmm(rows["down_bias"][:, None, :], zr, down.transpose(1, 2)))  # (B, N, m)
        out = torch.baddbmm(rows["up_bias"][:, None, :], hidden, up.transpose(1, 2))  # (B, N, d_out)
        return out.view(*z.shape[:-1], -1)


def build_group(factors: list[Factors], scales: list[float]) -> Group:
    """The group for ``factors`` (all of one kind; slot k+1 is ``factors[k]``) with composition scales ``scales``."""
    if isinstance(factors[0], LowRank):
        return LowRankGroup(factors, scales)  # type: ignore[arg-type]
    if isinstance(factors[0], Affine):
        return AffineGroup(factors, scales)  # type: ignore[arg-type]
    if isinstance(factors[0], Scale):
        return ScaleGroup(factors)  # type: ignore[arg-type]
    return MLPGroup(factors, scales)  # type: ignore[arg-type]
