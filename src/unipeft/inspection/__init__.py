"""Inspection: parameter summaries, adapter listings and He et al.'s design-space table."""
