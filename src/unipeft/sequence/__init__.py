"""Sequence-level deltas at work: prefixes inside attention and prompts at the input (He et al. 2022's prefix tuning
view), above the core's base classes (:mod:`unipeft.core.sequence`, insertion ``sequence``).

* :mod:`unipeft.sequence.attention`: prefix keys/values through transformers' attention interface;
* :mod:`unipeft.sequence.shift`: the real tokens' position ids numbered after the prefix;
* :mod:`unipeft.sequence.inputs`: virtual tokens through forward pre-hooks on the model's keyword arguments.
"""
