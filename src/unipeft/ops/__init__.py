"""Operations on adapters built on the core handle: checked merging and combination (TIES, DARE, SVD, ...)."""
