"""Tests for unipeft.data."""
