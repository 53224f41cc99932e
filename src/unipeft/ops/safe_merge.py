"""Checked merging: merge, compare outputs on a probe input against the unmerged adapters, undo if they differ.

Merging is exact in real arithmetic (W x + s·ΔW x = (W + s·ΔW) x) but not in floating point, and not at all into a
quantized base, where the merged weight is rounded to the quantization grid (see :mod:`unipeft.core.quant`).
:func:`checked_merge` measures the difference instead of assuming it:

    err_site = max |site_merged(x) − site_unmerged(x)|     x ~ N(0, 1), 8 rows, fixed seed (token ids for embeddings)
    err_model = max |model_merged(probe) − model_unmerged(probe)|   (logits; only with a user probe)

and raises — after unmerging again and restoring the base bit for bit (float weights from a copy taken before the
merge, quantized ones from the codes the site keeps) — if any of them exceeds the tolerance or is not finite. HF
peft's ``safe_merge`` checks the merged weights for NaNs only; this also catches a merge that is finite but wrong (or
too lossy for the user's taste).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from unipeft.core.modules import module_dims
from unipeft.core.quant import is_quantized

if TYPE_CHECKING:
    from unipeft.core.adapted import Handle

log = logging.getLogger(__name__)

#: Default largest max-abs output difference a checked merge accepts (float32 merges are ~1e-6; quantized ones more).
DEFAULT_TOLERANCE = 1e-4
PROBE_ROWS = 8
PROBE_SEED = 0


class MergeCheckError(ValueError):
    """A checked merge changed the outputs by more than the tolerance (the merge was undone).

    Attributes:
        errors: max abs output difference per probed site (and ``"model"`` for a user probe).
    """

    def __init__(self, message: str, errors: dict[str, float]) -> None:
        super().__init__(message)
        self.errors = errors


def probe_input(site: nn.Module, generator: torch.Generator) -> torch.Tensor | None:
    """A random input for one site (a base module and its deltas): N(0, 1) rows of the base's input width, in the
    dtype of the site's first floating-point parameter (a quantized base's bias or deltas), or token ids for an
    embedding; None for a module whose input cannot be made up."""
    base = getattr(site, "base", site)
    weight = next(iter(base.parameters()), None)
    device = weight.device if weight is not None else torch.device("cpu")
    if isinstance(base, nn.Embedding):
        return torch.randint(0, base.num_embeddings, (PROBE_ROWS,), generator=generator).to(device)
    try:
        d_in, _ = module_dims(base)
    except TypeError:
        return None
    if d_in is None:
        return None
    floating = next((p for p in site.parameters() if p.is_floating_point()), None)
    dtype = floating.dtype if floating is not None else torch.float32
    return torch.randn(PROBE_ROWS, d_in, generator=generator).to(device, dtype)


def _output(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    logits = getattr(value, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise TypeError(f"cannot compare outputs of type {type(value).__name__}: give a probe whose forward returns a "
                    "tensor, a tuple starting with one, or an output with .logits")


@contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) for the probes; every module's own mode is restored afterwards."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, mode in modes.items():
            module.train(mode)


def _run(peft: Handle, sites: dict[str, nn.Module], inputs: dict[str, torch.Tensor],
         probe: Mapping[str, Any] | torch.Tensor | None) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = {m: _output(sites[m](x)).float() for m, x in inputs.items()}
        if probe is not None:
            result = peft.model(**probe) if isinstance(probe, Mapping) else peft.model(probe)
            out["model"] = _output(result).float()
    return out


def checked_merge(peft: Handle, names: list[str], *, tolerance: float = DEFAULT_TOLERANCE,
                  probe: Mapping[str, Any] | torch.Tensor | None = None) -> dict[str, float]:
    """Merge ``names`` into the base and check the outputs against the unmerged adapters (see the module docstring).

    Args:
        peft: the handle.
        names: adapters to merge (already merged ones are left as they are).
        tolerance: the largest max-abs output difference accepted, per site and for the model probe.
        probe: an input of the whole model (a dict of keyword arguments, or one tensor) to compare its outputs too.

    Returns:
        The max abs output difference per probed site (module name), and ``"model"`` with a probe.

    Raises:
        MergeCheckError: (a ValueError) if a difference exceeds ``tolerance`` or an output is not finite; the adapters
            merged by this call are unmerged again and the active adapters restored first.
        ValueError: for a negative tolerance.
    """
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    todo = [n for n in names if n not in peft.merged]
    if not todo:
        return {}
    modules = list(dict.fromkeys(m for n in todo for m, _ in peft.delta_modules(n)))
    sites = {m: peft.model.get_submodule(m) for m in modules}
    generator = torch.Generator().manual_seed(PROBE_SEED)
    # float bases are put back from a copy if the check fails (unmerging a NaN or inf delta could not restore them)
    saved = {m: {k: v.detach().clone() for k, v in sites[m].base.state_dict().items()}
             for m in modules if not is_quantized(sites[m].base)}
    active = list(peft.active)
    running = active + [n for n in todo if n not in active]  # the adapters as they would run unmerged
    # a site also hosting a sub-layer delta needs its sub-layer's input, which only a whole-model forward provides
    alone = [m for m in modules if all(p.source == "module" for n in running if n in sites[m].adapters
                                       for p in sites[m].adapters[n])]
    inputs = {m: x for m in alone if (x := probe_input(sites[m], generator)) is not None}
    skipped = [m for m in modules if m not in inputs]
    if skipped:
        log.info("checked merge: no probe input for %s; only a model probe covers them", ", ".join(skipped[:5]))
    with _evaluating(peft.model):
        try:
            peft.set_active(*running)
            before = _run(peft, sites, inputs, probe)
            peft.merge(*todo)
            after = _run(peft, sites, inputs, probe)
        finally:
            peft.set_active(*active)
    errors = {k: (after[k] - before[k]).abs().max().item() if after[k].numel() else 0.0 for k in before}
    bad = {k: e for k, e in errors.items() if not (e <= tolerance and torch.isfinite(after[k]).all())}
    if bad:
        peft.unmerge(*todo)
        with torch.no_grad():
            for m, state in saved.items():
                own = sites[m].base.state_dict(keep_vars=True)
                for key, tensor in state.items():
                    own[key].data.copy_(tensor)
        worst = max(bad, key=lambda k: bad[k] if bad[k] == bad[k] else float("inf"))
        raise MergeCheckError(
            f"merging {', '.join(todo)} changed the output at {worst} by {bad[worst]:.3g} (tolerance {tolerance:g}; "
            f"{len(bad)} of {len(errors)} probes over it); the merge was undone. A quantized base rounds the merged "
            "weight: pass a larger tolerance to accept that, or keep the adapters unmerged", errors)
    log.info("checked merge of %s: max output difference %.3g over %d probes", ", ".join(todo),
             max(errors.values(), default=0.0), len(errors))
    return errors


__all__ = ["DEFAULT_TOLERANCE", "MergeCheckError", "checked_merge", "probe_input"]
