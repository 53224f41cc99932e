"""LoRA initialisations from the base weight: PiSSA (Meng et al. 2024, arXiv 2404.02948) and OLoRA (Büyükakyüz
2024, arXiv 2406.01775), plus :class:`SiteWeight`, the view of a site's base weight rows that they and DoRA read.

Both factor the frozen weight W ∈ R^{out×in} of the site, start LoRA from the leading rank-r part and leave the
residual in the base, so the adapted layer computes exactly W x at init (up to rounding):

    PiSSA:  W = U S Vᵀ,   B = U_r (S_r/s)^{1/2},   A = (S_r/s)^{1/2} V_rᵀ,   W_res = W − s·B A = W − U_r S_r V_rᵀ
    OLoRA:  W = Q R,      B = Q_r,                 A = R_r,                  W_res = W − s·B A

with s the LoRA scaling (α/r, or α/√r with rsLoRA), as HF peft's ``init_lora_weights="pissa"`` / ``"olora"``
(full SVD, computed in float32). The base is rewritten in the form's ``on_attach`` and restored in ``on_detach``: bit
for bit from a CPU copy of the original rows when the base still holds the residual written here, otherwise (another
adapter merged into or rewrote the same rows since) by adding s·B₀A₀ back, which keeps those other changes. An
adapter that is still merged at detach (``detach(keep_merged=True)``) leaves W_res + s·B A = W + s·(B A − B₀ A₀) in the
base: the adapted model, exported as HF peft's PiSSA/OLoRA conversion does. Both decompositions are deterministic, so
loading a saved adapter recomputes the same residual on the same machine; the saved file holds only the trained A, B.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import nn

from unipeft.core.delta import SiteShape
from unipeft.core.modules import is_conv1d
from unipeft.core.quant import quant_scheme
from unipeft.core.site import UNMERGED_WEIGHT

BaseInit = Literal["pissa", "olora"]
BASE_INITS: tuple[str, ...] = ("pissa", "olora")


@dataclass(frozen=True, eq=False)
class SiteWeight:
    """The rows of a base module's (out, in) weight that one site modifies: all of them, or a fused projection's slice.

    Attributes:
        base: the wrapped Linear or Conv1D module.
        rows: (start, stop) of the output rows, or None for all.
    """

    base: nn.Module
    rows: tuple[int, int] | None

    def tensor(self) -> torch.Tensor:
        """The weight rows as an (out, in) tensor that autograd sees (a view: transposed for Conv1D).

        While adapters are merged into a site holding base-reading deltas, this is the weight with nothing merged
        (W₀, kept by the site), so a stacked DoRA computes the same with its neighbours merged or not."""
        kept = self.base.__dict__.get(UNMERGED_WEIGHT)
        if kept is not None:
            weight = kept[0]  # already (out, in)
        else:
            weight = self.base.weight.T if is_conv1d(self.base) else self.base.weight
        return weight if self.rows is None else weight[self.rows[0]:self.rows[1]]

    def data(self) -> torch.Tensor:
        """The same rows on ``.data``, for in-place rewrites of the base."""
        return self.tensor().data


def site_weight(shape: SiteShape, method: str) -> SiteWeight:
    """The base weight rows of the site described by ``shape``, for a form that reads or rewrites them.

    Raises:
        ValueError: if the base is not a Linear/Conv1D or is quantized, or the site modifies a slice of a fused
            projection (GPT-2's ``attn.q``) and the core did not say which slice.
    """
    base = shape.base
    scheme = quant_scheme(base)
    if scheme is not None:
        raise ValueError(f"{method} reads the base weight, which is quantized here ({type(base).__name__}, "
                         f"{scheme.name}); use plain LoRA on a quantized base (QLoRA)")
    if not (isinstance(base, nn.Linear) or is_conv1d(base)) or shape.d_in is None:
        raise ValueError(f"{method} needs a linear base module (Linear or Conv1D), got {type(base).__name__}")
    weight = base.weight.T if is_conv1d(base) else base.weight
    out_features, in_features = weight.shape
    if shape.d_in != in_features:
        raise ValueError(f"{method} reads the module's input (insertion 'parallel'); this site's input has "
                         f"{shape.d_in} features but the weight of {type(base).__name__} takes {in_features}")
    rows = getattr(shape, "out_slice", None)  # set by the core for fused projections, when it passes it on
    if rows is None and shape.d_out != out_features:
        raise ValueError(f"{method} needs the base weight rows of its site, but this site modifies {shape.d_out} of "
                         f"the {out_features} output features of a fused projection (e.g. GPT-2's attn.q in c_attn) "
                         "and the slice is not known here; target the whole module instead "
                         "(position attn.qkv, or modules: [c_attn])")
    return SiteWeight(base=base, rows=tuple(rows) if rows is not None else None)


def pissa_factors(weight: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA's (A, B) from the principal r singular triplets of ``weight`` (out, in), float32: s·B A = U_r S_r V_rᵀ."""
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    root = torch.sqrt(s[:r] / scaling)
    return root[:, None] * vh[:r], u[:, :r] * root[None, :]  # A (r, in), B (out, r)


def olora_factors(weight: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """OLoRA's (A, B) from the QR decomposition of ``weight`` (out, in), float32: A = R_r, B = Q_r."""
    q, rr = torch.linalg.qr(weight)
    return rr[:r].contiguous(), q[:, :r].contiguous()  # A (r, in), B (out, r)


_FACTORS: dict[str, Callable[[torch.Tensor, int, float], tuple[torch.Tensor, torch.Tensor]]] = {
    "pissa": pissa_factors,
    "olora": olora_factors,
}


class BaseRewrite:
    """Starts LoRA's A and B from a decomposition of the site's weight and leaves W − s·B A in the base; undoes it.

    A plain object (not a module) held by the LoRA form: nothing here is a parameter or part of the state dict.
    """

    def __init__(self, method: str, site: SiteWeight, *, r: int, scaling: float) -> None:
        if method not in _FACTORS:
            raise ValueError(f"unknown base-weight init {method!r}; valid: {', '.join(_FACTORS)}")
        out_features, in_features = site.tensor().shape
        if r > min(out_features, in_features):
            raise ValueError(f"{method} needs r <= min(out, in) = {min(out_features, in_features)} for a "
                             f"{out_features}x{in_features} weight, got r={r}")
        self.method = method
        self.site = site
        self.r = r
        self.scaling = scaling
        self._original: torch.Tensor | None = None  # the original rows, on the CPU
        self._factors: tuple[torch.Tensor, torch.Tensor] | None = None  # float32 (A₀, B₀) subtracted from the base
        self.merged = False  # set by the LoRA form's merge_: a merged adapter's base is the export, kept on detach

    def _subtracted(self, device: torch.device) -> torch.Tensor:
        a0, b0 = self._factors
        return (self.scaling * b0.to(device)) @ a0.to(device)  # (out, in), float32, as HF peft

    def apply(self, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
        """Set ``lora_a`` (r, in) and ``lora_b`` (out, r) in place and rewrite the base rows to W − s·B A.

        Raises:
            RuntimeError: if this rewrite was already applied (and not restored).
        """
        if self._factors is not None:
            raise RuntimeError(f"the {self.method} init of this site was already applied")
        rows = self.site.data()
        if not rows.is_floating_point():
            raise TypeError(f"{self.method} needs a floating-point base weight, got {rows.dtype}")
        with torch.no_grad():
            weight = rows.float()
            a0, b0 = _FACTORS[self.method](weight, self.r, self.scaling)
            self._original = rows.detach().to("cpu", copy=True)
            self._factors = (a0, b0)
            rows.copy_((weight - self._subtracted(rows.device)).to(rows.dtype))
            lora_a.copy_(a0.to(lora_a.dtype))
            lora_b.copy_(b0.to(lora_b.dtype))

    def restore(self) -> None:
        """Give the base its original rows back: bit for bit if it still holds the residual, else W_now + s·B₀A₀.
        A merged adapter's rows W_res + s·B A are left as they are (the export of ``detach(keep_merged=True)``)."""
        if self._factors is None:
            return
        if not self.merged:
            rows = self.site.data()
            with torch.no_grad():
                subtracted = self._subtracted(rows.device)
                original = self._original.to(rows.device)
                if torch.equal(rows, (original.float() - subtracted).to(rows.dtype)):
                    rows.copy_(original)
                else:  # the rows changed since (another adapter merged or rewrote them): keep those changes
                    rows.copy_((rows.float() + subtracted).to(rows.dtype))
        self._original = None
        self._factors = None
        self.merged = False


__all__ = ["BASE_INITS", "BaseInit", "BaseRewrite", "SiteWeight", "olora_factors", "pissa_factors", "site_weight"]
