"""Tests for unipeft.methods."""
