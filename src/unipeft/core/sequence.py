"""The two base classes of sequence-level forms: they extend the sequence instead of adding Δ to a hidden state.

A prefix (Li & Liang 2021) adds l key/value positions inside an attention block; a prompt (Lester et al. 2021) adds n
virtual tokens to the model's input. Neither changes the output of the module it is placed on, so they use the
insertion ``sequence`` (identity at the site) and act through the model's own interfaces instead:

* :class:`SequenceFormConfig.site_dims` gives the shapes the form needs at its site (the width of the attention's keys,
  or of the input embeddings) and refuses sites where the form cannot act, before anything is attached;
* :meth:`SequenceForm.bind` connects the placed form to the model once it is attached (an attention function, or
  forward pre-hooks); :meth:`Form.on_detach` disconnects it.

The site that hosts the placed form (a :class:`~unipeft.core.site.DeltaSite`) keeps the list of running sequence
deltas in ``DeltaSite.sequence``, so activating, deactivating and removing adapters works as for every other form.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from unipeft.core.delta import Form, FormConfig

if TYPE_CHECKING:
    from unipeft.core.positions import Site
    from unipeft.core.recipe import DeltaSpec
    from unipeft.core.site import DeltaSite, Placed


@dataclass(frozen=True, kw_only=True)
class SequenceFormConfig(FormConfig):
    """Config of a form that extends the sequence (insertion ``sequence``)."""

    insertions = ("sequence",)

    def site_dims(self, model: nn.Module, site: "Site", spec: "DeltaSpec") -> tuple[int | None, int]:
        """(d_in, d_out) to build the form with at ``site``, where ``spec`` places it.

        Raises:
            ValueError: if the form cannot act at this site or with this composition (the message names the valid
                choices).
        """
        raise NotImplementedError


class SequenceForm(Form):
    """A form that acts on the sequence; :meth:`bind` connects it to the model after it is placed."""

    def bind(self, model: nn.Module, site: "Site", host: "DeltaSite", placed: "Placed") -> None:
        """Connect this form, placed as ``placed`` on ``host`` at ``site`` of ``model``, to the model's interfaces."""
        raise NotImplementedError

    def training_only_parameters(self) -> list[nn.Parameter]:
        """Parameters that train but are not part of the saved adapter (a reparameterisation); none by default."""
        return []
