"""Tokenisation, dynamic padding and batching.

Encoding produces unpadded examples (``input_ids``, ``attention_mask``, optionally
``token_type_ids``, and ``labels``); :func:`collate` pads a batch to its longest row, on the right.

Instruction tuning uses the Stanford Alpaca prompt templates for every tokenizer, including ones
with a chat template, so that results are comparable with the Alpaca reference and base models
(which have no chat template) see the same text. The templates end in ``"### Response:\\n"`` as in
the published ``tatsu-lab/alpaca`` ``text`` field (Stanford's ``train.py`` omits the final newline).
The loss covers the response and the end-of-sequence token only: prompt positions get label -100.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from unipeft.data.tasks import TaskSpec

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

Example = dict[str, Any]


def _field(row: Mapping[str, Any], field: str, index: int) -> Any:
    """``row[field]`` with an error naming the row and the fields it has."""
    try:
        return row[field]
    except KeyError:
        raise ValueError(f"row {index} has no field {field!r}; its fields: {', '.join(row)}") from None


def _label(row: Mapping[str, Any], spec: TaskSpec, index: int) -> int | float:
    """The label of one row as an int class id (classification) or a float (regression)."""
    assert spec.label_field is not None
    value = _field(row, spec.label_field, index)
    if spec.kind == "regression":
        return float(value)
    if isinstance(value, str) and spec.label_names:
        if value not in spec.label_names:
            raise ValueError(f"row {index}: label {value!r} is not one of {', '.join(spec.label_names)}")
        return spec.label_names.index(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < spec.num_labels:
        raise ValueError(
            f"row {index}: label {value!r} is not a class id in 0..{spec.num_labels - 1}"
            + (f" or one of {', '.join(spec.label_names)}" if spec.label_names else "")
        )
    return value


def encode_classification(
    rows: Sequence[Mapping[str, Any]], spec: TaskSpec, tokenizer: Any, max_length: int
) -> list[Example]:
    """Tokenise rows of a classification or regression task, without padding.

    Two text fields are encoded as a sentence pair (``[CLS] a [SEP] b [SEP]`` for BERT) and truncated
    longest-first to ``max_length`` tokens.

    Args:
        rows: the data rows.
        spec: a task of kind ``"classification"`` or ``"regression"``.
        tokenizer: a Hugging Face tokenizer.
        max_length: the maximum number of tokens per example, special tokens included.

    Returns:
        One dict per row with ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the
        tokenizer returns them) as lists of ints, and ``labels`` as an int or a float.

    Raises:
        ValueError: wrong task kind, ``max_length < 2``, a missing field or a bad label.
    """
    if spec.kind not in ("classification", "regression"):
        raise ValueError(f"encode_classification needs a classification or regression task, got {spec.kind!r}")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    if not rows:
        return []
    columns = [[str(_field(row, f, i)) for i, row in enumerate(rows)] for f in spec.text_fields]
    enc = tokenizer(*columns, truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    out: list[Example] = []
    for i, row in enumerate(rows):
        example: Example = {k: list(enc[k][i]) for k in keys}
        example["labels"] = _label(row, spec, i)
        out.append(example)
    return out


def format_alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """The Alpaca prompt for an instruction, with the ``### Input:`` section only if ``input_text`` is non-empty."""
    if input_text:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input_text)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def _special_prefix(tokenizer: Any) -> list[int]:
    """The token ids the tokenizer puts before a text by default (BOS for LLaMA, [CLS] for BERT, none for GPT-2)."""
    with_special = list(tokenizer("a")["input_ids"])
    bare = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    for start in range(len(with_special) - len(bare) + 1):
        if with_special[start : start + len(bare)] == bare:
            return with_special[:start]
    return []


def end_token_id(tokenizer: Any) -> int | None:
    """The id appended after each response: ``eos_token_id``, else ``sep_token_id``, else ``None``."""
    for attr in ("eos_token_id", "sep_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return None


def prompt_text(row: Mapping[str, Any], spec: TaskSpec, index: int = 0) -> str:
    """The prompt of one row: the task's template for a generation task, else the Alpaca prompt.

    Raises:
        ValueError: a missing field.
    """
    if spec.kind == "generation":
        return spec.format_prompt(dict(row), index)
    assert spec.prompt_field is not None
    extra = str(row.get(spec.input_field) or "") if spec.input_field else ""
    return format_alpaca_prompt(str(_field(row, spec.prompt_field, index)), extra)


def prompt_token_ids(prompt: str, tokenizer: Any) -> list[int]:
    """The token ids of a prompt as training sees them: the tokenizer's default prefix (e.g. BOS) + the prompt."""
    return _special_prefix(tokenizer) + list(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def encode_causal_lm(
    rows: Sequence[Mapping[str, Any]], spec: TaskSpec, tokenizer: Any, max_length: int
) -> list[Example]:
    """Tokenise instruction-tuning rows: prompt + response + end token, loss on the response only.

    The prompt is :func:`prompt_text` (the Alpaca prompt, or a generation task's template).
    Each example is ``prefix + prompt + response + [end]`` where ``prefix`` is what the tokenizer
    puts before a text by default (e.g. BOS) and ``end`` is :func:`end_token_id` (omitted if the
    tokenizer has neither EOS nor SEP). Prompt and response are tokenised jointly when that keeps
    the prompt's tokens intact, else separately and concatenated, so the prompt/response boundary is
    exact. Labels equal ``input_ids`` on the response and end token and are -100 elsewhere.
    Examples are truncated to ``max_length`` tokens; those left with no response token are dropped
    (counted in a warning).

    Args:
        rows: the data rows.
        spec: a task of kind ``"causal_lm"`` or ``"generation"``.
        tokenizer: a Hugging Face tokenizer.
        max_length: the maximum number of tokens per example.

    Returns:
        One dict per kept row with ``input_ids``, ``attention_mask`` and ``labels``, lists of ints.

    Raises:
        ValueError: wrong task kind, ``max_length < 2`` or a missing field.
    """
    if spec.kind not in ("causal_lm", "generation"):
        raise ValueError(f"encode_causal_lm needs a causal_lm or generation task, got {spec.kind!r}")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    if not rows:
        return []
    assert spec.response_field is not None
    prompts, responses = [], []
    for i, row in enumerate(rows):
        prompts.append(prompt_text(row, spec, i))
        responses.append(str(_field(row, spec.response_field, i)))
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    joint_ids = tokenizer([p + r for p, r in zip(prompts, responses)], add_special_tokens=False)["input_ids"]
    prefix = _special_prefix(tokenizer)
    end = end_token_id(tokenizer)
    suffix = [end] if end is not None else []
    out: list[Example] = []
    dropped = 0
    for i, (p_ids, j_ids) in enumerate(zip(prompt_ids, joint_ids)):
        p_ids, j_ids = list(p_ids), list(j_ids)
        if j_ids[: len(p_ids)] == p_ids:
            r_ids = j_ids[len(p_ids) :]
        else:  # the tokenizer merged across the boundary; tokenise the response on its own
            r_ids = list(tokenizer(responses[i], add_special_tokens=False)["input_ids"])
        n_masked = len(prefix) + len(p_ids)
        input_ids = (prefix + p_ids + r_ids + suffix)[:max_length]
        labels = ([IGNORE_INDEX] * n_masked + r_ids + suffix)[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            dropped += 1
            continue
        out.append({"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels})
    if dropped:
        logger.warning("dropped %d of %d examples with no response token within max_length=%d",
                       dropped, len(rows), max_length)
    return out


def encode(rows: Sequence[Mapping[str, Any]], spec: TaskSpec, tokenizer: Any, max_length: int) -> list[Example]:
    """Encode rows with :func:`encode_causal_lm` or :func:`encode_classification`, by ``spec.kind``."""
    if spec.kind in ("causal_lm", "generation"):
        return encode_causal_lm(rows, spec, tokenizer, max_length)
    return encode_classification(rows, spec, tokenizer, max_length)


_PAD_VALUES = {"attention_mask": 0, "token_type_ids": 0, "labels": IGNORE_INDEX}


def collate(batch: Sequence[Mapping[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Stack examples into tensors, right-padding sequences to the longest in the batch.

    ``input_ids`` are padded with ``pad_token_id``, ``attention_mask`` and ``token_type_ids`` with 0,
    sequence ``labels`` (causal LM) with -100. Scalar labels become a ``(B,)`` tensor: int64 for
    classes, float32 for regression scores.

    Args:
        batch: encoded examples, all with the same keys.
        pad_token_id: the padding id for ``input_ids``.

    Returns:
        ``{key: tensor}``; sequences have shape ``(B, T)`` with ``T`` the longest row.

    Raises:
        ValueError: an empty batch, examples with different keys, or ``pad_token_id`` is None.
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    if pad_token_id is None:
        raise ValueError("pad_token_id is None; tokenizers without a pad token can pad with eos_token_id")
    keys = list(batch[0])
    for i, example in enumerate(batch):
        if list(example) != keys:
            raise ValueError(f"example {i} has keys {list(example)}, example 0 has {keys}")
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        values = [example[key] for example in batch]
        if isinstance(values[0], (list, tuple)):
            longest = max(len(v) for v in values)
            pad = pad_token_id if key == "input_ids" else _PAD_VALUES.get(key, 0)
            padded = [list(v) + [pad] * (longest - len(v)) for v in values]
            out[key] = torch.tensor(padded, dtype=torch.long)  # (B, T)
        elif isinstance(values[0], float):
            out[key] = torch.tensor(values, dtype=torch.float32)  # (B,)
        else:
            out[key] = torch.tensor(values, dtype=torch.long)  # (B,)
    return out


def batch_order(n: int, *, shuffle: bool, seed: int = 0, epoch: int = 0) -> np.ndarray:
    """The example order for one epoch: ``0..n-1``, or a permutation fixed by ``(seed, epoch)``."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


def batches(
    examples: Sequence[Mapping[str, Any]],
    batch_size: int,
    *,
    pad_token_id: int,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    drop_last: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield collated batches for one epoch, deterministically.

    The order depends only on ``(seed, epoch)`` when shuffling, so a run can be resumed or repeated
    exactly; pass the epoch number to get a fresh order each epoch.

    Args:
        examples: encoded examples.
        batch_size: examples per batch (>= 1).
        pad_token_id: the padding id for ``input_ids``.
        shuffle: permute the examples.
        seed: the shuffling seed.
        epoch: the epoch number, mixed into the seed.
        drop_last: skip a final batch smaller than ``batch_size``.

    Raises:
        ValueError: ``batch_size < 1``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = batch_order(len(examples), shuffle=shuffle, seed=seed, epoch=epoch)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        if drop_last and len(idx) < batch_size:
            return
        yield collate([examples[int(i)] for i in idx], pad_token_id)


def num_batches(n: int, batch_size: int, drop_last: bool = False) -> int:
    """How many batches :func:`batches` yields for ``n`` examples."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return n // batch_size if drop_last else -(-n // batch_size)
