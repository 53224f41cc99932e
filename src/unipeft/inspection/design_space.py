"""He et al. (2022, arXiv 2110.04366)'s design space as data: functional form × position × insertion × composition.

A :class:`DesignPoint` is one delta described along He et al.'s four dimensions; a :class:`Method` is a named set of
points (a row of their Table 1, or a combination such as the MAM adapter); :func:`to_recipe` turns points into a
:class:`~unipeft.core.recipe.Recipe` that :func:`unipeft.attach` takes. New methods are new points::

    from unipeft.inspection.design_space import DesignPoint, to_recipe

    gated_pa = DesignPoint(form={"type": "bottleneck", "size": 32}, positions=("attn.o",),
                           insertion="parallel", composition="gated")
    peft = unipeft.attach(model, to_recipe(gated_pa, name="gated_pa_attn_o"))

:data:`TABLE_1` holds He et al.'s Table 1 (prefix tuning, adapter, LoRA, and the variants they derive from it:
parallel adapter, multi-head PA, scaled PA) plus the MAM adapter of their Sec. 4.6, derived from the shipped recipes
that realise them (:data:`ROWS`); :func:`table_markdown` prints it (docs/design-space.md shows the same table).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping, Sequence

from unipeft.core.compose import COMPOSITIONS
from unipeft.core.delta import FormConfig, form_config
from unipeft.core.recipe import FAMILIES, DeltaSpec, Recipe, load_recipe

#: Δh as He et al. write it, per form type (z is x for parallel insertion and h for sequential).
FUNCTIONAL_FORMS: Mapping[str, str] = {
    "prefix": "softmax(x W_q P_kᵀ) P_v",
    "bottleneck": "ReLU(z W_down) W_up",
    "mh_adapter": "concat_i ReLU(z_i W_down⁽ⁱ⁾) W_up⁽ⁱ⁾",
    "lora": "x W_down W_up",
    "prompt": "[P ; E(x)] (virtual input tokens)",
    "ia3": "l ⊙ h",
    "bias": "b",
}
#: The composition functions of He et al. (prefix tuning's (1 − λ)h + λΔh arises inside the attention's softmax).
COMPOSITION_FUNCTIONS: Mapping[str, str] = {"add": "h + Δh", "scaled": "h + s·Δh", "gated": "h + σ(x W_g)·Δh"}


@dataclass(frozen=True, kw_only=True)
class DesignPoint:
    """One delta along He et al.'s four dimensions.

    Attributes:
        form: the functional form Δh and its hyperparameters (a FormConfig, or ``{"type": ..., **hyperparameters}``).
        positions: the modified representation (canonical positions: ``attn``, ``attn.q``, ``ffn``, ``xattn``, ...).
        insertion: ``parallel``, ``sequential``, ``multiplicative``, ``multiplicative_input``, ``replace`` or
            ``sequence`` (prefix/prompt); None for the form's default.
        composition: ``add``, ``scaled`` or ``gated``.
        scale: s of ``scaled``.
        learn_scale: learn s.
        layers: layer indices (negative from the end); None for all.
        stacks: ``encoder``/``decoder``; None for all.

    Raises:
        ValueError: for an unknown form, insertion or composition (as :class:`DeltaSpec` does).
    """

    form: FormConfig | Mapping[str, Any]
    positions: tuple[str, ...]
    insertion: str | None = None
    composition: str = "add"
    scale: float = 1.0
    learn_scale: bool = False
    layers: tuple[int, ...] | None = None
    stacks: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "form", form_config(self.form))
        object.__setattr__(self, "positions", tuple(self.positions))
        if self.composition not in COMPOSITIONS:
            raise ValueError(f"unknown composition {self.composition!r}; valid: {', '.join(COMPOSITIONS)}")
        self.to_delta()  # validates the insertion against the form

    @classmethod
    def from_delta(cls, spec: DeltaSpec) -> "DesignPoint":
        """The design point a recipe's delta spec realises (a spec placed by module patterns has none)."""
        if spec.modules or not spec.positions:
            raise ValueError(f"delta '{spec.form.type}' is placed by module patterns, not by positions")
        return cls(form=spec.form, positions=spec.positions, insertion=spec.insertion, composition=spec.composition,
                   scale=spec.scale, learn_scale=spec.learn_scale, layers=spec.layers, stacks=spec.stacks)

    def to_delta(self) -> DeltaSpec:
        """The :class:`DeltaSpec` that realises this point."""
        return DeltaSpec(form=self.form, positions=self.positions, insertion=self.insertion,
                         composition=self.composition, scale=self.scale, learn_scale=self.learn_scale,
                         layers=self.layers, stacks=self.stacks)

    def describe(self) -> dict[str, str]:
        """This point in He et al.'s words: functional form, insertion, modified representation, composition."""
        composition = COMPOSITION_FUNCTIONS[self.composition].replace("s·", f"{self.scale:g}·")
        insertion = self.to_delta().resolved_insertion
        if self.form.type == "prefix":  # He et al.: a gated parallel delta on the head output
            composition = "(1 − λ)h + λΔh" if self.composition == "add" else "(1 − λ)h + λ·σ(x W_g)Δh"
            insertion = "parallel (as `sequence`)"
        functional = FUNCTIONAL_FORMS.get(self.form.type, self.form.type)
        activation = getattr(self.form, "activation", None)
        if isinstance(activation, str) and functional.count("ReLU") == 1:  # the form's own non-linearity
            functional = functional.replace("ReLU", "ReLU" if activation == "relu" else activation)
        return {"functional form": functional,
                "insertion": insertion,
                "modified representation": ", ".join(self.positions),
                "composition": composition}


@dataclass(frozen=True, kw_only=True)
class Method:
    """A named method as one or more design points."""

    name: str
    paper: str
    points: tuple[DesignPoint, ...]
    family: str = "additive"
    note: str = ""

    @classmethod
    def from_recipe(cls, recipe: Recipe | str, *, name: str, note: str = "") -> "Method":
        """The method a shipped (or any) recipe realises: its deltas as design points, its paper and family."""
        recipe = load_recipe(recipe)
        return cls(name=name, paper=recipe.paper, family=recipe.family, note=note or recipe.description,
                   points=tuple(DesignPoint.from_delta(d) for d in recipe.deltas))

    def to_recipe(self, name: str | None = None) -> Recipe:
        """This method as a recipe (named ``name``, default: the method's name in snake case)."""
        return to_recipe(*self.points, name=name or self.name.lower().replace(" ", "_").replace("-", "_"),
                         family=self.family, paper=self.paper, description=self.note)


def to_recipe(*points: DesignPoint | Method, name: str = "custom", family: str = "unified", paper: str = "",
              description: str = "") -> Recipe:
    """A recipe placing every point (a Method contributes all its points), in order.

    Args:
        points: design points or methods.
        name: the recipe's name.
        family: its family in Xu & Xie's taxonomy (``unified`` by default: a point chosen in the design space).
        paper, description: as in :class:`Recipe`.

    Raises:
        ValueError: without points, or for an unknown family.
    """
    if not points:
        raise ValueError("to_recipe needs at least one DesignPoint or Method")
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; valid: {', '.join(FAMILIES)}")
    flat = [p for item in points for p in (item.points if isinstance(item, Method) else (item,))]
    return Recipe(name=name, family=family, paper=paper, description=description,
                  deltas=tuple(p.to_delta() for p in flat))


#: He et al.'s Table 1 rows (prefix tuning, adapter, LoRA and the variants they derive) and the MAM adapter of their
#: Sec. 4.6, each read from the shipped recipe that realises it (the hyperparameters, positions, insertion and
#: composition are the recipe's: one fact in one place): (row name, recipe, note).
ROWS: tuple[tuple[str, str, str], ...] = (
    ("Prefix tuning", "prefix", "l key/value vectors per attention block"),
    ("Adapter", "houlsby", "sequential bottleneck after attention and FFN"),
    ("LoRA", "lora", "s = α/r is inside the form"),
    ("Parallel adapter", "parallel_adapter", "the adapter reads the FFN's input"),
    ("Multi-head PA", "mh_pa", "one bottleneck per head at the attention sub-layer"),
    ("Scaled PA", "scaled_pa", "parallel adapter with s = 4"),
    ("MAM adapter", "mam", "prefix at attention (and cross-attention) + scaled PA at the FFN"),
)
TABLE_1: tuple[Method, ...] = tuple(Method.from_recipe(recipe, name=name, note=note) for name, recipe, note in ROWS)


def method(name: str) -> Method:
    """A row of :data:`TABLE_1` by name (case-insensitive).

    Raises:
        ValueError: for an unknown name (the message lists the rows).
    """
    for row in TABLE_1:
        if row.name.lower() == name.lower():
            return row
    raise ValueError(f"unknown method {name!r}; TABLE_1 has: {', '.join(r.name for r in TABLE_1)}")


def table_markdown(rows: Sequence[Method] = TABLE_1) -> str:
    """The rows as a Markdown table in He et al.'s columns (one line per design point; the form's first
    hyperparameter and those that differ from their defaults)."""
    lines = ["| method | functional form Δh | insertion | modified representation | composition | unipeft delta |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        for i, point in enumerate(row.points):
            d = point.describe()
            names = [f.name for f in fields(point.form)]  # the first is the main size (size, r, length, heads)
            defaults = {f.name: f.default for f in fields(point.form)}
            form = ", ".join(f"{k}={v}" for k, v in point.form.to_dict().items()
                             if k != "type" and (k == names[0] or v != defaults.get(k)))
            lines.append(f"| {row.name if i == 0 else '+'} | {d['functional form']} | {d['insertion']} | "
                         f"{d['modified representation']} | {d['composition']} | `{point.form.type}({form})` |")
    return "\n".join(lines)


__all__ = ["DesignPoint", "Method", "TABLE_1", "to_recipe", "method", "table_markdown", "FUNCTIONAL_FORMS",
           "COMPOSITION_FUNCTIONS"]
