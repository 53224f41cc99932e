"""Tests for unipeft.models."""
