"""Persistence: unipeft's adapter folders (safetensors + JSON, written atomically, checked on load)."""
