"""Utilities below every other layer: atomic writes and safe config-file reading (they import nothing of unipeft)."""
