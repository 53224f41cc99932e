"""Stacked groups: the deltas of many adapters at one site, computed for every row of a batch in one go.

A group holds the factors (see :mod:`unipeft.core.mixed.factors`) of every adapter whose delta at a site has the same
kind and placement, stacked along a new first axis with slot 0 the zero adapter (rows whose adapter has no such delta
here), zero-padded to a common rank / hidden size, with the composition's scale s folded into the output side. When
the batch starts, the factors are gathered once per row (one ``torch.stack`` of each row's adapter's tensors), so that
a forward is two batched matrix products with no indexing, e.g. for LoRA (Punica's BGMV)::

    A_rows: (B, r, d_in),  B_rows: (B, d_out, r)         row b: the A and B of row b's adapter
    Δ = bmm(bmm(z, A_rowsᵀ), B_rowsᵀ)                     z: (B, N, d_in) → (B, N, r) → (B, N, d_out)

If every row uses the same adapter, the group keeps that adapter's factors unstacked and runs two plain matmuls.
Zero padding is exact: padded rank columns, hidden units (act(0) = 0) and the zero slot contribute exact zeros.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from unipeft.core.mixed.factors import MLP, Affine, Factors, LowRank, Scale


def _gather_rows(tensors: Sequence[torch.Tensor | None], slots: list[int], shape: tuple[int, ...],
                 like: torch.Tensor, *, fill: float = 0.0, scales: Sequence[float] | None = None) -> torch.Tensor:
    """(B, *shape): row b holds ``tensors[slots[b] - 1]`` zero-padded up to ``shape`` and times ``scales[...]``, or
    ``fill`` everywhere for slot 0 (and for a None tensor). One allocation for all rows."""
    blank = torch.full(shape, fill, dtype=like.dtype, device=like.device)
    padded = [blank]
    for t in tensors:
        if t is None:
            padded.append(blank)
            continue
        t = t.detach().to(like.dtype)
        if tuple(t.shape) != shape:  # F.pad's widths run from the last dimension backwards
            widths = [w for have, want in zip(reversed(t.shape), reversed(shape)) for w in (0, want - have)]
            t = F.pad(t, widths, value=fill)
        padded.append(t)
    out = torch.stack([padded[slot] for slot in slots])
    if scales is not None and any(s != 1.0 for s in scales):
        row_scales = torch.tensor([1.0, *scales], dtype=like.dtype, device=like.device)[slots]
        out.mul_(row_scales.view(-1, *([1] * len(shape))))
    return out


def _stack(tensors: Sequence[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """The tensors (all of one shape) behind a slot-0 zero entry: (n + 1, *shape), in ``like``'s dtype."""
    rest = [t.detach().to(like.dtype) for t in tensors]
    return torch.stack([torch.zeros_like(rest[0]), *rest])


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(B, ..., d) → (B, N, d)."""
    return t.reshape(t.shape[0], -1, t.shape[-1])


def _per_row(vectors: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, d) row vectors shaped to broadcast against a (B, ..., d) tensor."""
    return vectors.view(vectors.shape[0], *([1] * (like.dim() - 2)), vectors.shape[-1])


class Group:
    """Deltas of several adapters of one kind at one site.

    Attributes:
        slots: (B,) the slot of each row (0: none of this group's adapters).
        uniform: the slot shared by every row, or None if the rows differ.
    """

    def __init__(self, slots: torch.Tensor) -> None:
        self.slots = slots
        self.slot_list: list[int] = slots.tolist()
        first = self.slot_list[0]
        self.uniform: int | None = first if all(s == first for s in self.slot_list) else None

    def delta(self, z: torch.Tensor) -> torch.Tensor:
        """Δ for every row of z (B, ..., d_in) → (B, ..., d_out)."""
        raise NotImplementedError


class LowRankGroup(Group):
    """Δ(z) = B_a A_a z (+ g_a ⊙ W z) with a = the row's adapter."""

    def __init__(self, factors: list[LowRank], scales: list[float], slots: torch.Tensor) -> None:
        super().__init__(slots)
        like = factors[0].B
        self.embedding = factors[0].embedding
        self.weight = factors[0].base_weight.detach() if factors[0].base_weight is not None else None
        gains = [f.base_gain for f in factors]
        with torch.no_grad():
            if self.uniform is not None:  # one adapter for every row: its own (unpadded) factors
                k = self.uniform - 1
                self.A, self.B = factors[k].A.detach(), factors[k].B.detach() * (factors[k].scale * scales[k])
                self.gain = gains[k].detach() * scales[k] if gains[k] is not None else None
                return
            r = max(f.A.shape[0] for f in factors)
            d_in, d_out = factors[0].A.shape[1], like.shape[0]
            a_rows = [f.A for f in factors]
            if self.embedding:  # keep the table per slot, (n+1, r, vocab), looked up by (slot, id)
                self.A = _stack([F.pad(a, (0, 0, 0, r - a.shape[0])) for a in a_rows], like)
            else:
                self.A = _gather_rows(a_rows, self.slot_list, (r, d_in), like)  # (B, r, d_in)
            self.B = _gather_rows([f.B for f in factors], self.slot_list, (d_out, r), like,
                                  scales=[f.scale * s for f, s in zip(factors, scales)])
            self.gain = (_gather_rows(gains, self.slot_list, (d_out,), like, scales=scales)
                         if self.weight is not None else None)  # (B, d_out)

    def delta(self, z: torch.Tensor) -> torch.Tensor:
        if self.uniform is not None:
            if self.embedding:
                out = F.embedding(z, self.A.T) @ self.B.T
            else:
                out = F.linear(F.linear(z.to(self.A.dtype), self.A), self.B)
            if self.gain is not None:
                out = out + self.gain * F.linear(z.to(self.weight.dtype), self.weight)
            return out
        if self.embedding:  # z: token ids (B, T); A[slot_b, :, id] for every token → (B, T, r)
            u = self.A[self.slots.view(-1, *([1] * (z.dim() - 1))), :, z]
            return torch.bmm(_rows(u), self.B.transpose(1, 2)).view(*z.shape, -1)
        zr = _rows(z.to(self.A.dtype))  # (B, N, d_in)
        u = torch.bmm(zr, self.A.transpose(1, 2))  # (B, N, r)
        out = torch.bmm(u, self.B.transpose(1, 2)).view(*z.shape[:-1], -1)  # (B, ..., d_out)
        if self.gain is not None:
            out = out + _per_row(self.gain, out) * F.linear(z.to(self.weight.dtype), self.weight)
        return out


class AffineGroup(Group):
    """Δ(z) = g_a ⊙ z + b_a."""

    def __init__(self, factors: list[Affine], scales: list[float], slots: torch.Tensor) -> None:
        super().__init__(slots)
        like = next(t for f in factors for t in (f.gain, f.shift) if t is not None)
        gains, shifts = [f.gain for f in factors], [f.shift for f in factors]
        with torch.no_grad():
            self.gain = (_gather_rows(gains, self.slot_list, (like.shape[0],), like, scales=scales)
                         if any(g is not None for g in gains) else None)  # (B, d)
            self.shift = (_gather_rows(shifts, self.slot_list, (like.shape[0],), like, scales=scales)
                          if any(b is not None for b in shifts) else None)  # (B, d_out)

    def delta(self, z: torch.Tensor) -> torch.Tensor:
        out = _per_row(self.gain, z) * z if self.gain is not None else None
        if self.shift is not None:
            shift = _per_row(self.shift, z)
            out = shift if out is None else out + shift
        return out


class ScaleGroup(Group):
    """h' = h ⊙ l_a (or x' = x ⊙ l_a before the module); slot 0 is l = 1."""

    def __init__(self, factors: list[Scale], slots: torch.Tensor) -> None:
        super().__init__(slots)
        like = factors[0].vector
        with torch.no_grad():
            self.vectors = _gather_rows([f.vector for f in factors], self.slot_list, (like.shape[0],), like, fill=1.0)

    def scale(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (B, ..., d) times each row's vector."""
        return t * _per_row(self.vectors, t)


class MLPGroup(Group):
    """Δ(z) = act(z W_down,aᵀ + b_down,a) W_up,aᵀ + b_up,a."""

    def __init__(self, factors: list[MLP], scales: list[float], slots: torch.Tensor) -> None:
        super().__init__(slots)
        self.act: nn.Module = factors[0].activation
        like = factors[0].down_weight
        m = max(f.down_weight.shape[0] for f in factors)
        d_in, d_out = like.shape[1], factors[0].up_weight.shape[0]
        rows = self.slot_list
        with torch.no_grad():
            self.down = _gather_rows([f.down_weight for f in factors], rows, (m, d_in), like)  # (B, m, d_in)
            self.down_bias = _gather_rows([f.down_bias for f in factors], rows, (m,), like)  # (B, m)
            self.up = _gather_rows([f.up_weight for f in factors], rows, (d_out, m), like, scales=scales)
            self.up_bias = _gather_rows([f.up_bias for f in factors], rows, (d_out,), like, scales=scales)

    def delta(self, z: torch.Tensor) -> torch.Tensor:
        zr = _rows(z.to(self.down.dtype))  # (B, N, d_in)
        hidden = self.act(torch.baddbmm(self.down_bias[:, None, :], zr, self.down.transpose(1, 2)))  # (B, N, m)
        out = torch.baddbmm(self.up_bias[:, None, :], hidden, self.up.transpose(1, 2))  # (B, N, d_out)
        return out.view(*z.shape[:-1], -1)


def build_group(factors: list[Factors], scales: list[float], slots: torch.Tensor) -> Group:
    """The group for ``factors`` (all of one kind; slot k+1 is ``factors[k]``) with composition scales ``scales``."""
    kind = type(factors[0])
    builders: dict[type, Callable[[], Group]] = {
        LowRank: lambda: LowRankGroup(factors, scales, slots),  # type: ignore[arg-type]
        Affine: lambda: AffineGroup(factors, scales, slots),  # type: ignore[arg-type]
        Scale: lambda: ScaleGroup(factors, slots),  # type: ignore[arg-type]
        MLP: lambda: MLPGroup(factors, scales, slots),  # type: ignore[arg-type]
    }
    return builders[kind]()
