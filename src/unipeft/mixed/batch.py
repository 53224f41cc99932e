"""Mixed batches: one forward pass in which each row of the batch uses its own adapter (or none), for inference
and, with ``train=True``, for training several adapters at once on one base.

    with peft.mixed_batch(["support", "legal", None, "support"]):
        logits = model(**batch).logits           # row 0 and 3 with adapter "support", row 2 with the base
        tokens = model.generate(**batch)         # the assignment holds for every decoding step

As Punica's BGMV (Chen et al. 2023, arXiv 2310.18547) and S-LoRA (Sheng et al. 2023, arXiv 2311.03285): the base
model runs once on the whole batch, and at each site the deltas of all the batch's adapters are stacked and gathered
per row, so the extra cost is one batched low-rank product per site whatever the number of adapters (for LoRA,
Δ_b = s_a B_a A_a x_b with a = a_b; see :mod:`unipeft.mixed.groups`). Row b's output equals the output of the
model run on that row alone with only a_b active (``peft.set_active(a_b)``, or ``peft.set_active()`` for None).

Supported: forms that implement :class:`~unipeft.core.factors.Batchable` (LoRA and its variants rsLoRA, PiSSA,
OLoRA, DoRA, VeRA, AdaLoRA; (IA)³; BitFit; SSF; bottleneck, parallel and scaled parallel adapters), composed with
``add`` or ``scaled``, and module copies (``replace``, e.g. classification heads; run once per adapter on its rows).
Refused with an error: sequence-level forms (prefix, prompt), gated compositions, other forms, merged adapters, a
model in training mode (unless ``train=True``). For inference the stacks are built once per site and reused while
the adapters do not change (see :mod:`unipeft.mixed.stacks`: adding, removing, training or swapping an adapter
rebuilds them); they are copies, so no gradient reaches the adapters.

With ``train=True`` (``peft.mixed_batch(names, train=True)``, the model in training mode) the stacks are built afresh
on entering, as differentiable functions of the adapters' tensors, so the backward of a loss over the batch gives
each adapter exactly the gradient of its own rows' loss (a row's gradient reaches only its own adapter), as mLoRA
(Ye et al. 2023, arXiv 2312.02515) and ASPEN train many LoRA jobs on one base. Enter it once per forward (the stacks
hold that step's graph). Dropout is not applied per row, so adapters with dropout > 0 are refused for training.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from unipeft.core.delta import form_class, form_config_class, form_names
from unipeft.mixed.plan import SitePlan, Step
from unipeft.mixed.stacks import SiteStacks, site_stacks, training_stacks

if TYPE_CHECKING:
    from unipeft.core.adapted import Handle
    from unipeft.core.site import DeltaSite

def supported_forms() -> tuple[str, ...]:
    """The registered forms that run in mixed batches: those whose Form class implements the batching protocol
    (``mixed_factors``, :class:`~unipeft.core.factors.Batchable`), and module copies (insertion ``replace``)."""
    return tuple(name for name in form_names()
                 if hasattr(form_class(name), "mixed_factors") or form_config_class(name).insertions == ("replace",))


#: :func:`supported_forms` for the built-in methods (``import unipeft`` registers them before this module loads).
SUPPORTED_FORMS: tuple[str, ...] = supported_forms()


class MixedBatch:
    """Context manager that runs the model of ``peft`` with one adapter per row (see the module docstring).

    Creating it validates the names and brings the sites' stacks up to date; entering the ``with`` block gathers the
    stacks for the rows and routes the sites through them; leaving it restores the active adapters. For inference
    the gathered rows are kept: entering the same object again (a server's next decoding step with the same rows)
    checks that the stacks are current and gathers again only at sites whose stacks were rebuilt. A decoding step of
    32 rows over 32 SmolLM2 adapters spent ~40 ms entering a fresh block (one ``index_select`` per stacked tensor at
    60 sites and the staleness check, twice), a quarter of the step, all of it on one core.

    Args:
        peft: the adapted model's handle.
        adapter_names: one entry per row of the batches run inside the block: an adapter name, or None for the
            base model.

    Raises:
        ValueError: for an empty list, an unknown name (the message lists the loaded adapters), a merged adapter, or
            an adapter with a delta that cannot run in a mixed batch (the message names the form, where it is, and the
            supported forms); on entering, for a model in training mode. Inside the block, a batch whose size is not
            ``len(adapter_names)`` raises ValueError.
    """

    def __init__(self, peft: "Handle", adapter_names: Sequence[str | None], *, train: bool = False) -> None:
        names = list(adapter_names)
        if not names:
            raise ValueError("a mixed batch needs one adapter name (or None) per row; got an empty list")
        for n in names:
            if n is not None and n not in peft.recipes:
                raise ValueError(f"unknown adapter {n!r} in the mixed batch; loaded adapters: "
                                 f"{', '.join(peft.recipes) or '(none)'} (None runs the base model)")
        if peft.merged:
            raise ValueError(f"adapters {', '.join(peft.merged)} are merged into the base weights, so every row would "
                             "get them; unmerge them (peft.unmerge()) before running a mixed batch")
        self.peft = peft
        self.names = names
        self.train = train
        self.adapters = [n for n in dict.fromkeys(names) if n is not None]
        if train:
            _refuse_dropout(peft, self.adapters)
        self._stacks: dict[str, SiteStacks] = {module: site_stacks(site, self.adapters)
                                               for module, site in peft._sites.items()
                                               if any(a in site.adapters for a in self.adapters)}
        _refuse(self._stacks, self.adapters)
        self._plans: dict[str, SitePlan] = {}

    def __enter__(self) -> "MixedBatch":
        peft = self.peft
        if peft.model.training and not self.train:
            raise ValueError("mixed batches are for inference (dropout is not applied per row); call model.eval(), "
                             "or train several adapters with peft.mixed_batch(names, train=True)")
        if any(site.mixed is not None for site in peft._sites.values()):
            raise RuntimeError("a mixed batch is already running on this model; mixed batches do not nest")
        if self.train:
            self._stacks = {module: training_stacks(peft._sites[module]) for module in self._stacks}
            _refuse(self._stacks, self.adapters)
            self._plans = {module: self._plan(module, peft._sites[module], stacks, self._slot_tensors())
                           for module, stacks in self._stacks.items()}
            return self._route()
        with torch.no_grad():
            for module, stacks in self._stacks.items():
                site = peft._sites[module]
                if not stacks.current(site, self.adapters):  # changed since the handle was made: bring them up to date
                    stacks = self._stacks[module] = site_stacks(site, self.adapters)
                    _refuse({module: stacks}, self.adapters)
                    self._plans.pop(module, None)
            unbound = [module for module in self._stacks if module not in self._plans]
            if unbound:  # the first entry, or sites whose stacks were rebuilt: gather their rows
                index = self._slot_tensors()
                for module in unbound:
                    self._plans[module] = self._plan(module, peft._sites[module], self._stacks[module], index)
        return self._route()

    def _route(self) -> "MixedBatch":
        """Route the sites through the plans (nothing of the active adapters runs)."""
        peft = self.peft
        for site in peft._sites.values():  # nothing of the active adapters runs (prefixes, prompts included)
            site.set_active([])
        for module, plan in self._plans.items():
            peft._sites[module].mixed = plan
        return self

    def __exit__(self, *exc: object) -> None:
        for site in self.peft._sites.values():
            site.mixed = None
            site.set_active(self.peft.active)
        if self.train:  # they hold this step's graph
            self._plans = {}

    def _plan(self, module: str, site: "DeltaSite", stacks: SiteStacks,
              index: dict[tuple[int, ...], torch.Tensor]) -> SitePlan:
        plan = SitePlan(site=site, name=module, rows=len(self.names))
        device = next((t.device for t in site.base.parameters()), torch.device("cpu"))
        for adapter, copy in stacks.replace.items():
            rows = [i for i, n in enumerate(self.names) if n == adapter]
            if rows:
                plan.replace.append((copy, torch.tensor(rows, dtype=torch.long, device=device)))
        plan.base_rows = any(n not in stacks.replace for n in self.names)
        for stage in stacks.stages:
            slots = tuple(stage.slot_of.get(n, 0) for n in self.names)  # type: ignore[arg-type]
            if not any(slots):
                continue  # no row's adapter has this delta
            bound = stage.group.bind(slots, index.get(slots))
            if stage.insertion == "multiplicative_input":
                plan.pre.append(bound)
            else:
                plan.post.append(Step(group=bound, insertion=stage.insertion, source=stage.source,  # type: ignore
                                      out_slice=stage.out_slice))
        return plan

    def _slot_tensors(self) -> dict[tuple[int, ...], torch.Tensor]:
        """Every distinct slot list of the batch's groups as a tensor on the stacks' device, in one host-to-device
        copy (the lists repeat: usually every site of one kind has the same one)."""
        lists = {tuple(stage.slot_of.get(n, 0) for n in self.names): stage.group.device  # type: ignore[arg-type]
                 for stacks in self._stacks.values() for stage in stacks.stages}
        out: dict[tuple[int, ...], torch.Tensor] = {}
        for device in set(lists.values()):
            keys = [k for k, d in lists.items() if d == device]
            table = torch.tensor(keys, dtype=torch.long).to(device)  # (lists, B)
            out.update(zip(keys, table.unbind(0)))
        return out


def _refuse_dropout(peft: "Handle", adapters: list[str]) -> None:
    """Raise if a delta of one of ``adapters`` has dropout, which a mixed batch does not apply per row.

    Raises:
        ValueError: naming the adapter, the form and the rate.
    """
    for adapter in adapters:
        for placed in peft._placements[adapter]:
            rates = [m.p for m in placed.form.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
            if rates:
                raise ValueError(f"adapter '{adapter}' has dropout {rates[0]} in {type(placed.form).__name__}; "
                                 "mixed-batch training does not apply dropout per row, so train its adapters "
                                 "with dropout 0")


def _refuse(stacks: dict[str, SiteStacks], adapters: list[str]) -> None:
    """Raise if a delta of one of ``adapters`` cannot run per row (at any of these sites).

    Raises:
        ValueError: naming each refused form and insertion, where it is (first site and how many more) and why,
            and the supported forms.
    """
    where: dict[tuple[str, str, str, str], list[str]] = {}  # (adapter, form, insertion, reason) -> modules
    for module, site_stack in stacks.items():
        for adapter in adapters:
            for form, insertion, reason in site_stack.refused.get(adapter, ()):
                where.setdefault((adapter, form, insertion, reason), []).append(module)
    if not where:
        return
    problems = []
    for (adapter, form, insertion, reason), modules in where.items():
        more = f" and {len(modules) - 1} more" if len(modules) > 1 else ""
        problems.append(f"{form} ({insertion}) of '{adapter}' at {modules[0]}{more}: {reason}")
    raise ValueError(f"these deltas cannot run in a mixed batch: {'; '.join(problems[:5])}"
                     f"{' ...' if len(problems) > 5 else ''}. Supported forms: {', '.join(supported_forms())} "
                     "(insertions parallel, sequential, multiplicative, multiplicative_input, replace; "
                     "compositions add, scaled)")


def mixed_batch(peft: "Handle", adapter_names: Sequence[str | None], *, train: bool = False) -> MixedBatch:
    """``with mixed_batch(peft, names): model(**batch)``: row b runs with adapter ``names[b]`` (None: the base);
    ``train=True``: differentiably, for a training step.

    See :class:`MixedBatch` for what is supported and what raises.
    """
    return MixedBatch(peft, adapter_names, train=train)


__all__ = ["MixedBatch", "mixed_batch", "SUPPORTED_FORMS"]
