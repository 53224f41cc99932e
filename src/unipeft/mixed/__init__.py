"""Mixed batches: one forward pass in which every row uses its own adapter (see :mod:`unipeft.mixed.batch`)."""

from unipeft.mixed.batch import SUPPORTED_FORMS, MixedBatch, mixed_batch
from unipeft.core.factors import MLP, Affine, Batchable, Factors, LowRank, Scale

__all__ = ["MixedBatch", "mixed_batch", "SUPPORTED_FORMS", "Batchable", "Factors", "LowRank", "Affine", "Scale", "MLP"]
