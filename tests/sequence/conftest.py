"""Every test here runs the tiny models single-threaded (see ``single_thread`` in tests/conftest.py)."""

import pytest


@pytest.fixture(autouse=True)
def _single_thread(single_thread: None) -> None:
    """Apply the shared ``single_thread`` fixture to every test of this folder."""
