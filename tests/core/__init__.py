"""Tests for unipeft.core."""
