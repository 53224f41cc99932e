"""Stacked groups: the deltas of many adapters at one site, computed for every row of a batch in one go.

A group holds the factors (see :mod:`unipeft.core.mixed.factors`) of every adapter whose delta at a site has the same
kind and placement, stacked along a new first axis with slot 0 the zero adapter (rows whose adapter has no such delta
here), zero-padded to a common rank / hidden size, with the composition's scale s folded into the output side. When
the batch starts, the stacks are gathered once per row (``index_select`` by the row's slot), so that a forward is two
batched matrix products with no indexing, e.g. for LoRA (Punica's BGMV)::

    A_rows: (B, d_in, r),  B_rows: (B, r, d_out)
    Δ = bmm(bmm(z, A_rows), B_rows)                       z: (B, N, d_in) → (B, N, r) → (B, N, d_out)

If every row uses the same adapter, the group keeps that adapter's factors unstacked and runs two plain matmuls.
Zero padding is exact: padded rank columns, hidden units (act(0) = 0) and the zero slot contribute exact zeros.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from unipeft.core.mixed.factors import MLP, Affine, Factors, LowRank, Scale


def _stack(tensors: Sequence[torch.Tensor | None], shape: tuple[int, ...], like: torch.Tensor,
           fill: float = 0.0) -> torch.Tensor:
    """Stack ``tensors`` (None: all ``fill``) behind a slot-0 ``fill`` entry, each zero-padded up to ``shape``."""
    out = torch.full((len(tensors) + 1, *shape), fill, dtype=like.dtype, device=like.device)
    for slot, t in enumerate(tensors, start=1):
        if t is not None:
            out[(slot, *(slice(0, n) for n in t.shape))] = t.detach()
    return out


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
        first = int(slots[0])
        self.uniform: int | None = first if bool((slots == first).all()) else None

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
        with torch.no_grad():
            b_scaled = [f.B * s for f, s in zip(factors, scales)]
            gains = [f.base_gain * s if f.base_gain is not None else None for f, s in zip(factors, scales)]
            if self.uniform is not None:  # one adapter for every row: its own (unpadded) factors
                k = self.uniform - 1
                self.A, self.B = factors[k].A.detach(), b_scaled[k]
                self.gain = gains[k]
                return
            r = max(f.A.shape[0] for f in factors)
            a_stack = _stack([f.A for f in factors], (r, factors[0].A.shape[1]), like)  # (n+1, r, d_in)
            b_stack = _stack(b_scaled, (like.shape[0], r), like)  # (n+1, d_out, r)
            if self.embedding:  # keep the table per slot: (n+1, vocab, r), looked up by (slot, id)
                self.A = a_stack.transpose(1, 2).contiguous()
            else:
                self.A = a_stack.index_select(0, slots).transpose(1, 2).contiguous()  # (B, d_in, r)
            self.B = b_stack.index_select(0, slots).transpose(1, 2).contiguous()  # (B, r, d_out)
            self.gain = (_stack(gains, (like.shape[0],), like).index_select(0, slots)
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
        if self.embedding:  # z: token ids (B, T)
            u = self.A[self.slots.view(-1, *([1] * (z.dim() - 1))), z]  # (B, T, r)
            return torch.bmm(_rows(u), self.B).view(*z.shape, -1)
        zr = _rows(z.to(self.A.dtype))  # (B, N, d_in)
        out = torch.bmm(torch.bmm(zr, self.A), self.B).view(*z.shape[:-1], -1)  # (B, ..., d_out)
        if self.gain is not None:
            out = out + _per_row(self.gain, out) * F.linear(z.to(self.weight.dtype), self.weight)
        return out


class AffineGroup(Group):
    """Δ(z) = g_a ⊙ z + b_a."""

    def __init__(self, factors: list[Affine], scales: list[float], slots: torch.Tensor) -> None:
        super().__init__(slots)
        like = next(t for f in factors for t in (f.gain, f.shift) if t is not None)
        with torch.no_grad():
            gains = [f.gain * s if f.gain is not None else None for f, s in zip(factors, scales)]
            shifts = [f.shift * s if f.shift is not None else None for f, s in zip(factors, scales)]
            self.gain = (_stack(gains, (like.shape[0],), like).index_select(0, slots)
                         if any(g is not None for g in gains) else None)  # (B, d)
            self.shift = (_stack(shifts, (like.shape[0],), like).index_select(0, slots)
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
            self.vectors = _stack([f.vector for f in factors], (like.shape[0],), like, fill=1.0).index_select(0, slots)

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
        with torch.no_grad():
            ups = [f.up_weight * s for f, s in zip(factors, scales)]
            up_biases = [f.up_bias * s if f.up_bias is not None else None for f, s in zip(factors, scales)]
            down = _stack([f.down_weight for f in factors], (m, d_in), like).index_select(0, slots)
            self.down = down.transpose(1, 2).contiguous()  # (B, d_in, m)
            self.down_bias = _stack([f.down_bias for f in factors], (m,), like).index_select(0, slots)  # (B, m)
            self.up = _stack(ups, (d_out, m), like).index_select(0, slots).transpose(1, 2).contiguous()  # (B, m, d_out)
            self.up_bias = _stack(up_biases, (d_out,), like).index_select(0, slots)  # (B, d_out)

    def delta(self, z: torch.Tensor) -> torch.Tensor:
        zr = _rows(z.to(self.down.dtype))  # (B, N, d_in)
        hidden = self.act(torch.baddbmm(self.down_bias[:, None, :], zr, self.down))  # (B, N, m)
        out = torch.baddbmm(self.up_bias[:, None, :], hidden, self.up)  # (B, N, d_out)
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
