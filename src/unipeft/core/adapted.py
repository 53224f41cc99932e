"""The handle: the lifecycle of a model's named adapters — add, activate, merge, unmerge, remove, detach.

Attaching wraps each targeted module in place in a :class:`~unipeft.core.site.DeltaSite` and freezes every base
weight; detaching puts the original module objects back and restores their ``requires_grad`` flags, so the model is
exactly what it was before (its state dict is bit-for-bit the same unless an adapter was merged and unmerged).

Where a delta sits (its site, the recipe spec it came from, the base weight's shape there) is kept on the placed
delta itself (:class:`~unipeft.core.site.Placed`); the handle keeps each adapter's placed deltas in the order they
were added. Saving, loading, combining, mixed batches and summaries are layers above the core
(:mod:`unipeft.persist`, :mod:`unipeft.ops`, :mod:`unipeft.mixed`, :mod:`unipeft.inspection`); the public
:class:`unipeft.Peft` is this handle plus one-line calls into them.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from unipeft.core.compose import build_composition
from unipeft.core.delta import Form, SiteShape
from unipeft.core.modules import module_dims, set_submodule
from unipeft.core.positions import Site, resolve_patterns, resolve_positions
from unipeft.core.quant import hold_autograd_kernels, is_quantized, release_autograd_kernels, weight_shape
from unipeft.core.recipe import DeltaSpec, Recipe, load_recipe
from unipeft.core.sequence import SequenceForm, SequenceFormConfig
from unipeft.core.site import DeltaSite, Placed

log = logging.getLogger(__name__)
_HANDLE = "_unipeft_handle"


class Handle:
    """A model with unipeft adapters attached: the lifecycle. Create it with :func:`unipeft.attach` (which makes the
    public :class:`unipeft.Peft`, this plus convenience calls); the model is modified in place.

    Attributes:
        model: the adapted model (the same object that was passed to :func:`unipeft.attach`).
        recipes: adapter name → recipe.
        active: names of the adapters that run in ``forward``, in order.
    """

    def __init__(self, model: nn.Module) -> None:
        if find_handle(model) is not None:
            raise ValueError("this model already has unipeft adapters; use unipeft.handle(model) to get them")
        self.model = model
        self.recipes: dict[str, Recipe] = {}
        self._placements: dict[str, list[Placed]] = {}  # adapter → its placed deltas, in the order they were added
        self.active: list[str] = []
        self._sites: dict[str, DeltaSite] = {}
        self._hooks: dict[str, RemovableHandle] = {}
        self._requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        self._held_kernels = hold_autograd_kernels(model)  # gradients must cross a 4-bit base on every CPU
        model.__dict__[_HANDLE] = self

    # ----------------------------------------------------------------------------------------------- adapters
    def add(self, recipe: "Recipe | str", name: str = "default", **options) -> "Handle":
        """Place the deltas of ``recipe`` as adapter ``name`` (inactive until :meth:`set_active`).

        Args:
            recipe: a Recipe, a built-in recipe name, or a YAML/JSON file.
            name: the adapter's name (letters, digits, ``_`` and ``-``).
            **options: hyperparameter overrides, e.g. ``r=16`` (see :meth:`Recipe.with_options`).

        Raises:
            ValueError: for a duplicate or invalid name, an unknown position or a pattern that matches nothing.
        """
        recipe = load_recipe(recipe).with_options(**options)
        if name in self.recipes:
            raise ValueError(f"adapter '{name}' already exists; existing adapters: {', '.join(self.recipes)}")
        if not name or not all(c.isalnum() or c in "_-" for c in name):
            raise ValueError(f"invalid adapter name {name!r}: use letters, digits, '_' and '-'")
        placements = [self._build(spec, index, site) for index, spec in enumerate(recipe.deltas)
                      for site in self._resolve(spec)]
        for index, spec in enumerate(recipe.deltas):  # forms that share parameters across sites tie them
            spec.form.share([p.form for p in placements if p.spec_index == index])
        for placed in placements:
            module = placed.site.module
            self._site(module).add(name, placed)
            placed.form.on_attach(self._sites[module].base)
            if isinstance(placed.form, SequenceForm):  # prefix/prompt: connect to the attention or the model's inputs
                placed.form.bind(self.model, placed.site, self._sites[module], placed)
            if placed.site.entry is not None and placed.source == "sublayer" and module not in self._hooks:
                entry = self.model.get_submodule(placed.site.entry)
                self._hooks[module] = entry.register_forward_pre_hook(self._sites[module].capture, with_kwargs=True)
        for placed in placements:  # inactive until set_active, so not trainable yet
            for param in placed.parameters():
                param.requires_grad_(False)
        if recipe.train_base:
            for param in self.base_parameters():
                param.requires_grad_(True)
        self.recipes[name] = recipe
        self._placements[name] = placements
        log.info("added adapter '%s' (%s): %d deltas", name, recipe.name, len(placements))
        return self

    def _resolve(self, spec: DeltaSpec) -> list[Site]:
        sites: list[Site] = []
        if spec.positions:
            sites += resolve_positions(self.model, spec.positions, layers=spec.layers, stacks=spec.stacks)
        if spec.modules:
            sites += resolve_patterns(self.model, spec.modules)
        if not sites:
            raise ValueError(f"delta '{spec.form.type}' at {list(spec.positions) or spec.modules} "
                             "resolved to no module of this model")
        return sites

    def _base_shape(self, module: str) -> tuple[int, ...]:
        return weight_shape(self._original(module))  # (out, in) also for a packed quantized weight

    def _original(self, module: str) -> nn.Module:
        return self._sites[module].base if module in self._sites else self.model.get_submodule(module)

    def _site(self, module: str) -> DeltaSite:
        if module not in self._sites:
            site = DeltaSite(self.model.get_submodule(module))
            set_submodule(self.model, module, site)
            self._sites[module] = site
        return self._sites[module]

    def _build(self, spec: DeltaSpec, spec_index: int, site: Site) -> Placed:
        base = self._original(site.module)
        insertion = spec.resolved_insertion
        try:
            d_in, d_out = module_dims(base)
        except TypeError:
            if insertion != "replace":
                raise
            d_in, d_out = None, 0  # a replacing copy needs no widths: it may copy any module (RoBERTa's 2-layer head)
        source = "sublayer" if site.entry is not None and insertion == "parallel" else "module"
        if site.out_slice is not None:
            d_out = site.out_slice[1] - site.out_slice[0]
        if insertion == "sequential" or source == "sublayer":
            d_in = d_out  # reads the (sub-layer's) hidden state, of the model width
        if insertion == "multiplicative_input":
            if d_in is None:
                raise ValueError(f"insertion 'multiplicative_input' needs a module with input features at {site.module}")
            d_out = d_in
        if isinstance(spec.form, SequenceFormConfig):  # prefix/prompt: widths of the attention's keys or embeddings
            d_in, d_out = spec.form.site_dims(self.model, site, spec)
        weight = next(iter(base.parameters()), None)
        device = weight.device if weight is not None else torch.device("cpu")
        with torch.device(device):
            form = spec.form.build(SiteShape(d_in=d_in, d_out=d_out, base=base, out_slice=site.out_slice))
            compose = build_composition(spec.composition, scale=spec.scale, learn_scale=spec.learn_scale, d_in=d_in)
        placed = Placed(form, compose, insertion=insertion, source=source, site=site, spec=spec, spec_index=spec_index,
                        base_shape=self._base_shape(site.module))
        dtype = weight.dtype if weight is not None and weight.is_floating_point() else None
        if weight is not None and is_quantized(base):  # the dtype it computes in: its own, or the model's
            dtype = getattr(base, "compute_dtype", None) or getattr(self.model, "dtype", None)
        if dtype is not None and dtype.is_floating_point and dtype != torch.float32:
            placed.to(dtype)
        return placed

    def set_active(self, *names: str) -> None:
        """Run exactly these adapters, in this order (none: run the bare base model).

        Raises:
            ValueError: for an unknown adapter name (the message lists the existing ones).
        """
        for n in names:
            if n not in self.recipes:
                raise ValueError(f"unknown adapter '{n}'; existing adapters: {', '.join(self.recipes) or '(none)'}")
        self.active = list(names)
        for site in self._sites.values():
            site.set_active(self.active)
        for adapter in self.recipes:  # only active adapters train (as HF peft's set_adapter)
            for _, placed in self._placed(adapter):
                for param in placed.parameters():
                    param.requires_grad_(adapter in self.active)

    def remove(self, name: str) -> None:
        """Delete adapter ``name`` and its weights (unmerge it first if it is merged)."""
        self._check(name)
        self.unmerge(name)
        for module, placed in list(self._placed(name)):
            placed.form.on_detach(self._sites[module].base)
        for module in {p.site.module for p in self._placements[name]}:
            self._sites[module].remove(name)
        del self.recipes[name], self._placements[name]
        self.set_active(*[a for a in self.active if a != name])
        self._drop_empty_sites()

    def _drop_empty_sites(self) -> None:
        for module in [m for m, s in self._sites.items() if len(s.adapters) == 0]:
            set_submodule(self.model, module, self._sites.pop(module).base)
            hook = self._hooks.pop(module, None)
            if hook is not None:
                hook.remove()

    def _check(self, name: str) -> None:
        if name not in self.recipes:
            raise ValueError(f"unknown adapter '{name}'; existing adapters: {', '.join(self.recipes) or '(none)'}")

    # ------------------------------------------------------------------------------------------------ merging
    def merge(self, *names: str) -> None:
        """Fold adapters (default: the active ones) into the base weights, for zero-overhead inference.

        A quantized base (bitsandbytes 4/8-bit) is dequantized, summed and requantized, which rounds the merge.
        (:meth:`unipeft.Peft.merge` can also check the outputs and undo a merge that changed them.)

        Raises:
            NotImplementedError: if a delta of the adapter is not linear in the weight (nothing is changed then).
        """
        names = names or tuple(self.active)
        self.check_mergeable(*names)
        for name in names:
            for module in dict.fromkeys(p.site.module for p in self._placements[name]):
                self._sites[module].merge(name)

    def check_mergeable(self, *names: str) -> None:
        """Raise NotImplementedError naming the deltas of these adapters that cannot be folded into the base."""
        for name in names:
            self._check(name)
            problems = sorted({f"{type(p.form).__name__} ({p.insertion}) at {m}" for m, p in self._placed(name)
                               if p.insertion != "replace" and (not p.mergeable or p.merge_problem(site_base(self, m)))})
            if problems:
                raise NotImplementedError(f"adapter '{name}' cannot be merged: {'; '.join(problems[:5])}"
                                          f"{' ...' if len(problems) > 5 else ''} — these deltas are not linear in the "
                                          "base weight; keep them unmerged")

    def unmerge(self, *names: str) -> None:
        """Undo :meth:`merge` for these adapters (default: all merged ones)."""
        merged = [n for n in self.recipes if any(n in s.merged for s in self._sites.values())]
        for name in reversed(names or merged):
            self._check(name)
            for module in dict.fromkeys(p.site.module for p in self._placements[name]):
                self._sites[module].unmerge(name)

    @property
    def merged(self) -> list[str]:
        """Names of the adapters currently folded into the base."""
        return [n for n in self.recipes if any(n in s.merged for s in self._sites.values())]

    def _placed(self, name: str) -> Iterator[tuple[str, Placed]]:
        """(module, placed) of adapter ``name``, grouped by module (first-placed module first), in placing order."""
        by_module: dict[str, list[Placed]] = {}
        for placed in self._placements[name]:
            by_module.setdefault(placed.site.module, []).append(placed)
        for module, placed_there in by_module.items():
            for placed in placed_there:
                yield module, placed

    @property
    def records(self) -> dict[str, list[Placed]]:
        """Adapter name → its placed deltas in the order they were placed; each knows its ``site``, ``spec``,
        ``spec_index`` and ``base_shape`` (a read-only view)."""
        return {name: list(placed) for name, placed in self._placements.items()}

    # ----------------------------------------------------------------------------------------------- queries
    def delta_modules(self, name: str | None = None) -> Iterator[tuple[str, Placed]]:
        """(site module name, placed delta) for one adapter, or all."""
        for adapter in [name] if name else list(self.recipes):
            self._check(adapter)
            yield from self._placed(adapter)

    def state_prefixes(self, name: str) -> Iterator[tuple[str, Placed]]:
        """(key prefix, placed) of adapter ``name``: the prefix ``<site module>::<index>.`` its tensors have in
        :meth:`adapter_state_dict` (index: the delta's place among the adapter's deltas at that module)."""
        counters: dict[str, int] = {}
        for module, placed in self._placed(name):
            index = counters.get(module, 0)
            counters[module] = index + 1
            yield f"{module}::{index}.", placed

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """The adapter's tensors, keyed ``<site module>::<index>.<parameter>``, plus the base if it trains."""
        self._check(name)
        state: dict[str, torch.Tensor] = {}
        for prefix, placed in self.state_prefixes(name):
            for key, tensor in placed.state_dict().items():
                state[prefix + key] = tensor
        if self.recipes[name].train_base:
            tied = {id(v): k for k, v in reversed(self.model.state_dict(keep_vars=True).items())}
            for key, tensor in self.model.state_dict(keep_vars=True).items():
                original = self.original_key(key)
                if original is None or tied[id(tensor)] != key:
                    continue  # a delta's tensor, or a tied weight (GPT-2's lm_head = wte) already stored once
                state[f"base::{original}"] = tensor.detach()
        return state

    def base_parameters(self) -> Iterator[nn.Parameter]:
        """The base model's own parameters (no delta parameters)."""
        delta_ids = {id(p) for site in self._sites.values() for p in site.adapters.parameters()}
        for p in self.model.parameters():
            if id(p) not in delta_ids:
                yield p

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        """The base model's state dict under its original key names."""
        out = {}
        for key, tensor in self.model.state_dict().items():
            original = self.original_key(key)
            if original is not None:
                out[original] = tensor
        return out

    def original_key(self, key: str) -> str | None:
        """The name ``key`` of the adapted model's state dict had before attaching; None for a delta's tensor.

        Walks the module path, so only the ``base``/``adapters`` children of unipeft's own sites are rewritten: a
        model's own modules that happen to be called ``base`` or ``adapters`` keep their names.
        """
        module: nn.Module | None = self.model
        kept: list[str] = []
        *path, leaf = key.split(".")
        for part in path:
            if isinstance(module, DeltaSite) and part in ("adapters", "base"):
                if part == "adapters":
                    return None
                module = module.base
                continue
            kept.append(part)
            module = module._modules.get(part) if module is not None else None
        return ".".join([*kept, leaf])

    def deactivate(self, *names: str) -> None:
        """Stop running these adapters (default: all); the others stay active, in their order."""
        for n in names:
            self._check(n)
        self.set_active(*[a for a in self.active if names and a not in names])

    # ----------------------------------------------------------------------------------------------- training
    # The forms' training contract (:class:`~unipeft.core.delta.Form`), gathered over the active adapters. Every
    # training loop — unipeft's own, ``AdapterTrainer``, a plain PyTorch loop — calls these four:
    #
    #     if peft.needs_prepare(): peft.prepare(first_batches)           # before building the optimizer
    #     loss = model(**batch).loss + peft.loss_term()
    #     loss.backward(); optimizer.step()
    #     if peft.on_step(step, total_steps): <give the optimizer peft.trainable_parameters()>
    #     optimizer.zero_grad()
    def _active_forms(self) -> list[Form]:
        return [placed.form for name in self.active for _, placed in self._placed(name)]

    def loss_term(self) -> torch.Tensor:
        """The active adapters' regularisers, to add to the training loss (a zero scalar when none has one)."""
        terms = [t for t in (form.loss_term() for form in self._active_forms()) if t is not None]
        if terms:
            return torch.stack([t.reshape(()) for t in terms]).sum()
        device = next(iter(self.model.parameters())).device
        return torch.zeros((), device=device)

    def needs_prepare(self) -> bool:
        """Whether some active form must see training batches before training (:meth:`prepare`)."""
        return any(form.needs_prepare() for form in self._active_forms())

    def prepare(self, batches: Iterable[Any], *, loss_fn: Callable[..., torch.Tensor] | None = None) -> bool:
        """Before building the optimizer: let the active forms that need data see a few real training batches
        (FishMask chooses its entries by Fisher information; give about
        :data:`~unipeft.core.delta.PREPARE_BATCHES`, with labels, or ``loss_fn(model, batch) -> loss``).

        Returns:
            True if trainable tensors were replaced (so an optimizer built before must be given the new ones).
        """
        batches = list(batches)
        replaced = False
        for form in self._active_forms():
            if form.needs_prepare():
                replaced |= bool(form.prepare(self.model, batches, loss_fn))
        return replaced

    def on_step(self, step: int, total_steps: int) -> bool:
        """Tell the active adapters' forms that optimizer step ``step`` (1-based) of ``total_steps`` is done; call
        it after ``optimizer.step()`` and before ``optimizer.zero_grad()`` (AdaLoRA reads the gradients).

        Returns:
            True if trainable tensors were replaced (diff pruning): the optimizer must be given
            :meth:`trainable_parameters` again.
        """
        replaced = False
        for form in self._active_forms():
            replaced |= bool(form.on_step(step, total_steps))
        return replaced

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters that require grad (the active adapters' deltas, and the base for full fine-tuning)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    # ----------------------------------------------------------------------------------------------- detach
    def detach(self, *, keep_merged: bool = False) -> nn.Module:
        """Remove every adapter and restore the original modules and ``requires_grad`` flags.

        Args:
            keep_merged: keep the weights of merged adapters in the base (to export a merged model);
                otherwise merged adapters are unmerged first.

        Returns:
            The model, with no unipeft modules left in it.
        """
        if not keep_merged:
            self.unmerge()
        for adapter in self.recipes:
            for module, placed in self._placed(adapter):
                placed.form.on_detach(self._sites[module].base)
        for module, site in list(self._sites.items()):
            set_submodule(self.model, module, site.base)
        for hook in self._hooks.values():
            hook.remove()
        self._sites.clear()
        self._hooks.clear()
        for name, p in self.model.named_parameters():
            p.requires_grad_(self._requires_grad.get(name, p.requires_grad))
        release_autograd_kernels(self._held_kernels)
        self._held_kernels = {}
        self.model.__dict__.pop(_HANDLE, None)
        self.recipes.clear()
        self._placements.clear()
        self.active = []
        return self.model


def site_base(peft: Handle, module: str) -> nn.Module:
    """The original module wrapped at ``module``."""
    return peft._sites[module].base


def find_handle(model: nn.Module) -> Handle | None:
    """The handle of a model with adapters attached, or None (internal; the public way is :func:`handle`)."""
    return model.__dict__.get(_HANDLE)


def handle(model: nn.Module) -> Handle:
    """The handle of a model with adapters attached (a :class:`unipeft.Peft`): the one public way to find it.

    Raises:
        ValueError: if the model has no unipeft adapters.
    """
    found = find_handle(model)
    if found is None:
        raise ValueError("this model has no unipeft adapters; call unipeft.attach(model, recipe) first")
    return found


_HANDLE_TYPES: list[type[Handle]] = [Handle]


def use_handle_type(cls: type[Handle]) -> type[Handle]:
    """Make new handles instances of ``cls`` (a subclass of :class:`Handle`); :mod:`unipeft.peft` registers the
    public :class:`unipeft.Peft` this way, so that handles made by any layer have its convenience calls."""
    if not (isinstance(cls, type) and issubclass(cls, Handle)):
        raise TypeError(f"a handle type must subclass Handle, got {cls!r}")
    _HANDLE_TYPES.append(cls)
    return cls


def new_handle(model: nn.Module) -> Handle:
    """A new handle on ``model`` (of the registered handle type)."""
    return _HANDLE_TYPES[-1](model)


__all__ = ["Handle", "handle", "find_handle", "new_handle", "use_handle_type", "site_base"]
