"""Sequence-level deltas: prefixes inside attention and prompts at the input (He et al. 2022's prefix tuning view).

* :mod:`unipeft.core.seq.base`: the config and form base classes (insertion ``sequence``);
* :mod:`unipeft.core.seq.attention`: prefix keys/values through transformers' attention interface;
* :mod:`unipeft.core.seq.inputs`: virtual tokens through forward pre-hooks on the model's keyword arguments.
"""

from unipeft.core.seq.base import SequenceForm, SequenceFormConfig

__all__ = ["SequenceForm", "SequenceFormConfig"]
