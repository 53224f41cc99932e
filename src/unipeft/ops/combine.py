"""Combining adapters into a new named LoRA adapter (Hugging Face peft's ``add_weighted_adapter``, same semantics).

At every site, adapter i contributes ΔW_i = s_i B_i A_i (LoRA, s_i = α_i/r_i or α_i/√r_i, times a ``scaled``
composition's s) with weight w_i. The new adapter is a plain LoRA with α = r, so its scaling is 1 and ΔW = B A:

* ``cat``:     A = [w_1 s_1 A_1; …; w_n s_n A_n] (rows),  B = [B_1 … B_n] (columns)
               ⇒ B A = Σ_i w_i s_i B_i A_i exactly; rank Σ_i r_i.
* ``linear``:  A = Σ_i sgn(c_i)·√|c_i|·A_i,  B = Σ_i √|c_i|·B_i  with c_i = w_i s_i (equal ranks r)
               ⇒ B A = Σ_i c_i B_i A_i + cross terms √|c_i c_j| B_i A_j: a cheap approximation, exact for one adapter.
* ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: as ``linear``, with the sum over A_i and over B_i
  replaced by TIES / DARE / magnitude pruning (:mod:`unipeft.ops.combine_ops`) of the factors, weights √|c_i| as
  above — the factors, not ΔW, are trimmed, dropped and sign-elected.
* ``svd``:     τ = Σ_i w_i ΔW_i; B = U_r diag(S_r), A = V_rᵀ from the truncated SVD of τ (the best rank-r
               approximation, Eckart–Young); r = ``svd_rank`` or the largest input rank.
* ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``: τ = TIES / DARE / pruning of the full
  ΔW_i with weights w_i, then the truncated SVD.

Module copies (a ``copy`` delta: the trainable classification head that ``unipeft train`` adds, ``ln_tuning``'s
norms, ``last_k``'s layers) hold whole modules, not a weight delta. ``copies`` says what the new adapter gets at each
copied module: ``average`` (the weighted mean θ = Σ_i w_i θ_i / Σ_i w_i over the adapters that copy it: a model soup
of, e.g., two heads of the same task), ``first`` (the copy of the first adapter in ``adapters`` that has one), an
adapter's name (that adapter's copy), or ``refuse`` (the default: an error naming these choices, as HF peft, which
refuses adapters that hold ``modules_to_save`` of the same module). The new adapter then holds a ``copy`` delta there
next to its LoRA.

Papers: task arithmetic (Ilharco et al. 2023, arXiv 2212.04089), TIES-merging (Yadav et al. 2023, arXiv 2306.01708),
DARE (Yu et al. 2023, arXiv 2311.03099). Factor methods take every delta whose form gives its Δ as a pure low-rank
product (:class:`~unipeft.core.factors.LowRank` from ``mixed_factors()``: LoRA, rsLoRA, AdaLoRA's P·diag(E)Q, VeRA's
(diag(b)B)(diag(d)A)) — the same vocabulary mixed batches read, so no method is named here; the SVD methods take any
delta exposing ``delta_weight()`` (also DoRA at the current base, LoHa, LoKr, sparse deltas). Weights may be
negative (subtracting a task); ``weights=None`` averages (w_i = 1/n). See docs/combining.md.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from unipeft.core.adapted import Handle
from unipeft.core.transaction import adding
from unipeft.ops.combine_ops import SignMethod, merge_tensors, svd_factors
from unipeft.core.recipe import DeltaSpec, Recipe
from unipeft.core.site import Placed, base_named_modules
from unipeft.core.delta import Form, form_config
from unipeft.core.factors import LowRank

log = logging.getLogger(__name__)

Method = Literal["linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
                 "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd"]
FACTOR_METHODS: tuple[str, ...] = ("linear", "cat", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_METHODS: tuple[str, ...] = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
METHODS: tuple[str, ...] = FACTOR_METHODS + SVD_METHODS
DENSITY_METHODS: tuple[str, ...] = tuple(m for m in METHODS if m not in ("linear", "cat", "svd"))
SUPPORTED = ("factor methods (linear, cat, ties, dare_linear, dare_ties, magnitude_prune) take low-rank deltas (LoRA, "
             "rsLoRA, AdaLoRA, VeRA); svd and the *_svd methods also take any delta with a weight delta (AdaLoRA, DoRA, LoHa, LoKr, "
             "VeRA, sparse); all must be inserted in parallel on a module with composition add or scaled")
Key = tuple[str, "tuple[int, int] | None"]  # (site module, output slice)
COPY_CHOICES = ("refuse", "average", "first")


@dataclass(frozen=True, kw_only=True)
class CombineConfig:
    """How to combine adapters.

    Attributes:
        method: one of :data:`METHODS` (see the module docstring).
        density: ρ ∈ (0, 1], the fraction of entries kept by the TIES, DARE and magnitude-pruning methods.
        svd_rank: rank of the result of the SVD methods (default: the largest input rank).
        svd_clamp: q ∈ (0, 1]: clamp the SVD factors to their q-quantile magnitude (None: no clamping).
        majority_sign: TIES's sign election, by ``total`` mass or by ``frequency``.
        seed: seed of DARE's random masks (None: torch's global generator).
    """

    method: Method = "cat"
    density: float | None = None
    svd_rank: int | None = None
    svd_clamp: float | None = None
    majority_sign: SignMethod = "total"
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown combination method {self.method!r}; valid: {', '.join(METHODS)}")
        if self.method in DENSITY_METHODS and self.density is None:
            raise ValueError(f"method '{self.method}' needs a density in (0, 1] (the fraction of entries kept)")
        if self.density is not None and self.method not in DENSITY_METHODS:
            raise ValueError(f"density applies to {', '.join(DENSITY_METHODS)}, not to '{self.method}'")
        if self.density is not None and not 0.0 < self.density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        if (self.svd_rank is not None or self.svd_clamp is not None) and self.method not in SVD_METHODS:
            raise ValueError(f"svd_rank and svd_clamp apply to the SVD methods ({', '.join(SVD_METHODS)}), "
                             f"not to '{self.method}'")
        if self.svd_rank is not None and self.svd_rank < 1:
            raise ValueError(f"svd_rank must be >= 1, got {self.svd_rank}")
        if self.svd_clamp is not None and not 0.0 < self.svd_clamp <= 1.0:
            raise ValueError(f"svd_clamp must be a quantile in (0, 1], got {self.svd_clamp}")
        if self.majority_sign not in ("total", "frequency"):
            raise ValueError(f"unknown majority_sign {self.majority_sign!r}; valid: total, frequency")


def combine(peft: Handle, adapters: Sequence[str], weights: Sequence[float] | None = None, *,
            method: Method = "cat", new_name: str = "combined", density: float | None = None,
            svd_rank: int | None = None, svd_clamp: float | None = None, majority_sign: SignMethod = "total",
            seed: int | None = None, generator: torch.Generator | None = None, copies: str = "refuse") -> Handle:
    """Add adapter ``new_name``, a LoRA combining ``adapters`` with ``weights`` (inactive, like :meth:`Peft.add`).

    Args:
        peft: the model's handle.
        adapters: names of the adapters to combine (at least one).
        weights: one weight per adapter, may be negative; None for the average (1/n each).
        method, density, svd_rank, svd_clamp, majority_sign, seed: see :class:`CombineConfig`.
        generator: the generator of DARE's masks (overrides ``seed``).
        copies: what the new adapter gets where the adapters hold module copies (classification heads):
            ``refuse``, ``average``, ``first`` or one of ``adapters`` (see the module docstring).

    Returns:
        ``peft``, with the new adapter.

    Raises:
        ValueError: for an unknown or repeated adapter, an existing ``new_name``, a weight count that differs, bad
            options, a delta this method cannot take (the message names it and what is supported), or factor
            methods other than ``cat`` on adapters of different ranks at a site.
    """
    config = CombineConfig(method=method, density=density, svd_rank=svd_rank, svd_clamp=svd_clamp,
                           majority_sign=majority_sign, seed=seed)
    adapters = list(adapters)
    unknown = [a for a in adapters if a not in peft.recipes]
    if not adapters or unknown or len(set(adapters)) != len(adapters):
        raise ValueError(f"adapters to combine must be distinct existing ones, got {adapters}; existing adapters: "
                         f"{', '.join(peft.recipes) or '(none)'}")
    if new_name in peft.recipes:
        raise ValueError(f"adapter '{new_name}' already exists; choose another new_name")
    weights = [1.0 / len(adapters)] * len(adapters) if weights is None else [float(w) for w in weights]
    if len(weights) != len(adapters):
        raise ValueError(f"got {len(weights)} weights for {len(adapters)} adapters")
    if copies not in COPY_CHOICES and copies not in adapters:
        raise ValueError(f"copies must be one of {', '.join(COPY_CHOICES)} or one of the adapters "
                         f"({', '.join(adapters)}), got {copies!r}")
    held = _copies(peft, adapters)
    if held and copies == "refuse":
        where = "; ".join(f"{module} ({', '.join(by)})" for module, by in held.items())
        raise ValueError(f"adapters {adapters} hold module copies, which are whole modules, not weight deltas: "
                         f"{where}. Choose copies='average' (their weighted mean), 'first', or an adapter's name "
                         f"(take its copy); the CLI's --copies")
    copied = {module: _combine_copy(by, dict(zip(adapters, weights)), copies) for module, by in held.items()}
    sites = _collect(peft, adapters, config.method, skip=set(held))
    if generator is None and config.seed is not None and sites:
        device = next(p for entries in sites.values() for e in entries.values() for p in e[0].parameters()).device
        generator = torch.Generator(device=device).manual_seed(config.seed)
    rank = _svd_rank(sites, config) if config.method in SVD_METHODS and sites else 0
    factors = {key: _combine_site(entries, dict(zip(adapters, weights)), config, rank, generator)
               for key, entries in sites.items()}
    with adding(peft.model):
        peft.add(_recipe(peft, sites, factors, adapters, weights, config, copied), new_name)
        _write(peft, new_name, factors, copied)
    log.info("combined %s with weights %s by '%s' into adapter '%s'", adapters, weights, config.method, new_name)
    return peft


def _is_copy(placed: Placed) -> bool:
    """A module copy: a form that replaces the module it sits on (insertion ``replace``)."""
    return placed.insertion == "replace"


def _copies(peft: Handle, adapters: list[str]) -> dict[str, dict[str, Form]]:
    """Copied module → adapter → its copy there, in the model's module order."""
    held: dict[str, dict[str, Form]] = {}
    for adapter in adapters:
        for module, placed in peft.delta_modules(adapter):
            if _is_copy(placed):
                held.setdefault(module, {})[adapter] = placed.form
    order = {name: i for i, (name, _) in enumerate(base_named_modules(peft.model))}
    return dict(sorted(held.items(), key=lambda kv: order.get(kv[0], len(order))))


def _combine_copy(by: dict[str, Form], weights: dict[str, float], copies: str) -> dict[str, torch.Tensor]:
    """The state of the new adapter's copy of one module, from the adapters' copies ``by`` (see ``copies``)."""
    states = {a: {k: v.detach() for k, v in form.state_dict().items()} for a, form in by.items()}
    if copies == "first":
        return dict(states[next(iter(by))])
    if copies != "average":
        if copies not in by:
            raise ValueError(f"copies={copies!r}: adapter {copies!r} holds no copy of a module that "
                             f"{', '.join(by)} copy; choose one of those, 'first' or 'average'")
        return dict(states[copies])
    total = sum(weights[a] for a in by)
    if total <= 0:
        raise ValueError(f"copies='average' weighs the copies by the adapters' weights, which sum to {total:g} "
                         f"over {', '.join(by)}: give positive weights, or take one copy (copies='first' or a name)")
    first = states[next(iter(by))]
    mean = {}
    for key, tensor in first.items():
        if tensor.is_floating_point():
            mean[key] = sum(states[a][key].float() * (weights[a] / total) for a in by).to(tensor.dtype)
        else:  # integer buffers (position ids, counters) are the same in every copy of one base module
            mean[key] = tensor
    return mean


def _collect(peft: Handle, adapters: list[str], method: str,
             skip: set[str]) -> dict[Key, dict[str, list[Placed]]]:
    """Site → adapter → its deltas there, checked for ``method``; sites in the model's module order. Deltas at the
    ``skip`` modules (module copies) are left to the copies' rule; a weight delta there is refused."""
    order = {name: i for i, (name, _) in enumerate(base_named_modules(peft.model))}
    merged = set(peft.merged)
    sites: dict[Key, dict[str, list[Placed]]] = {}
    for adapter in adapters:
        for placed in peft.records[adapter]:
            module = placed.site.module
            if module in skip:
                if not _is_copy(placed):
                    raise ValueError(f"cannot combine adapter '{adapter}': its {type(placed.form).__name__} at "
                                     f"{module} sits on a module that an adapter copies whole")
                continue
            problem = _problem(placed, method, merged=adapter in merged)
            if problem:
                raise ValueError(f"cannot combine adapter '{adapter}' with method '{method}': its "
                                 f"{type(placed.form).__name__} at {module} {problem}; {SUPPORTED}")
            key = (module, placed.site.out_slice)
            sites.setdefault(key, {}).setdefault(adapter, []).append(placed)
            if method in FACTOR_METHODS and len(sites[key][adapter]) > 1:
                raise ValueError(f"cannot combine adapter '{adapter}' with method '{method}': it places several "
                                 f"deltas at {module}; use an SVD method, which sums them")
    return dict(sorted(sites.items(), key=lambda kv: (order.get(kv[0][0], len(order)), kv[0][1] or (0, 0))))


def _problem(placed: Placed, method: str, *, merged: bool) -> str | None:
    """Why ``method`` cannot take this delta (None if it can)."""
    if placed.insertion != "parallel" or placed.source != "module":
        return f"is inserted '{placed.insertion}' on its {placed.source}, not as a parallel weight delta"
    if type(placed.compose).__name__ not in ("Add", "Scaled"):
        return f"has composition '{type(placed.compose).__name__.lower()}', whose input-dependent gate has no weight"
    form = placed.form
    if form.rewrites_base:
        return "rewrites the base weight (PiSSA/OLoRA init), so its factors are not its delta"
    if method in FACTOR_METHODS and _low_rank(form) is None:
        return "has no low-rank factors A, B (its Δ is not a pure product B A)"
    if not callable(getattr(form, "delta_weight", None)):
        return "exposes no delta weight"
    if merged and form.reads_base_weight:
        return "is merged (its delta weight is read at the unmerged base); unmerge it first"
    return None


def _low_rank(form: Form) -> LowRank | None:
    """The form's Δ as a pure low-rank product c·B A (no base term), or None."""
    factors = form.mixed_factors() if callable(getattr(form, "mixed_factors", None)) else None
    if isinstance(factors, LowRank) and factors.base_gain is None:
        return factors
    return None


def _scale(placed: Placed) -> float:
    """The composition's scale s (1 for ``add``)."""
    return float(getattr(placed.compose, "scale", 1.0))


def _svd_rank(sites: dict[Key, dict[str, list[Placed]]], config: CombineConfig) -> int:
    if config.svd_rank is not None:
        return config.svd_rank
    ranks = [f.A.shape[0] for entries in sites.values() for e in entries.values() for p in e
             if (f := _low_rank(p.form)) is not None]
    if not ranks:
        raise ValueError(f"method '{config.method}' needs svd_rank: none of these deltas has a LoRA rank to default to")
    return max(ranks)


def _combine_site(entries: dict[str, list[Placed]], weights: dict[str, float],
                  config: CombineConfig, rank: int, generator: torch.Generator | None) -> tuple[torch.Tensor,
                                                                                             torch.Tensor]:
    """(B, A) of the combined LoRA at one site (scaling 1)."""
    names = list(entries)
    placed = {a: list(entries[a]) for a in names}
    options = dict(density=config.density or 1.0, majority_sign=config.majority_sign, generator=generator)
    if config.method in SVD_METHODS:
        deltas = [sum(_scale(p) * p.form.delta_weight().detach().float() for p in placed[a]) for a in names]
        task = "linear" if config.method == "svd" else config.method[: -len("_svd")]
        total = merge_tensors(task, deltas, [weights[a] for a in names], **options)
        return svd_factors(total, rank, clamp=config.svd_clamp)
    forms = [placed[a][0].form for a in names]
    factors = [_low_rank(f) for f in forms]
    coefs = [weights[a] * _scale(placed[a][0]) * f.scale for a, f in zip(names, factors)]
    a_list = [f.A.detach().float() for f in factors]
    b_list = [f.B.detach().float() for f in factors]
    if config.method == "cat":
        return torch.cat(b_list, dim=1), torch.cat([c * a for c, a in zip(coefs, a_list)], dim=0)
    ranks = sorted({a.shape[0] for a in a_list})
    if len(ranks) > 1:
        module = entries[names[0]][0].site.module
        raise ValueError(f"method '{config.method}' needs equal LoRA ranks at each site; at {module} adapters "
                         f"{names} have ranks {[a.shape[0] for a in a_list]} (use 'cat' or an SVD method)")
    roots = [math.sqrt(abs(c)) for c in coefs]
    a_new = merge_tensors(config.method, a_list, [math.copysign(r, c) for r, c in zip(roots, coefs)], **options)
    b_new = merge_tensors(config.method, b_list, roots, **options)
    return b_new, a_new


def _recipe(peft: Handle, sites: dict[Key, dict[str, list[Placed]]],
            factors: dict[Key, tuple[torch.Tensor, torch.Tensor]], adapters: list[str], weights: list[float],
            config: CombineConfig, copied: dict[str, dict[str, torch.Tensor]]) -> Recipe:
    """A LoRA recipe (α = r) placing one delta at exactly these sites: grouped by position, stack, rank, dropout;
    and a ``copy`` delta at each copied module."""
    groups: dict[tuple, list[Placed]] = {}
    for key, entries in sites.items():
        record = next(iter(entries.values()))[0]
        dropout = float(getattr(record.spec.form, "dropout", 0.0))
        rank = factors[key][1].shape[0]
        groups.setdefault((record.site.position, record.site.stack, rank, dropout), []).append(record)
    deltas = []
    for (position, stack, rank, dropout), records in groups.items():
        form = form_config({"type": "lora", "r": rank, "alpha": float(rank), "dropout": dropout})
        if position == "module":  # raw module patterns: one exact-name regular expression
            modules = "|".join(re.escape(r.site.module) for r in records)
            deltas.append(DeltaSpec(form=form, modules=modules))
        else:
            layers = sorted({r.site.layer for r in records if r.site.layer is not None})
            deltas.append(DeltaSpec(form=form, positions=(position,), layers=tuple(layers) if layers else None,
                                    stacks=(stack,) if stack else None))
    if copied:
        deltas.append(DeltaSpec(form=form_config({"type": "copy"}), modules="|".join(re.escape(m) for m in copied),
                                insertion="replace"))
    terms = " + ".join(f"{w:g}*{a}" for a, w in zip(adapters, weights))
    return Recipe(name=f"combined-{config.method}", family="reparameterized",
                  paper="add_weighted_adapter semantics; TIES: arXiv 2306.01708, DARE: arXiv 2311.03099",
                  description=f"{config.method} of {terms}", deltas=tuple(deltas))


def _write(peft: Handle, name: str, factors: dict[Key, tuple[torch.Tensor, torch.Tensor]],
           copied: dict[str, dict[str, torch.Tensor]]) -> None:
    """Copy the combined factors into the new adapter's LoRA deltas and the chosen copies into its module copies,
    checking it sits exactly on those sites."""
    placed = {}
    for p in peft.records[name]:
        if _is_copy(p):
            p.form.load_state_dict(copied[p.site.module])
            continue
        key = (p.site.module, p.site.out_slice)
        if key in placed:
            raise RuntimeError(f"the combined adapter's recipe placed two deltas at {key[0]}")
        placed[key] = p
    if set(placed) != set(factors):
        raise RuntimeError(f"the combined adapter's recipe resolved to other sites: "
                           f"{sorted(set(placed) ^ set(factors), key=str)[:5]}")
    with torch.no_grad():
        for key, (b, a) in factors.items():
            placed[key].form.set_low_rank_(a, b)
