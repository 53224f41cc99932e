"""unipeft.data: datasets, task specifications, tokenisation, batching and metrics.

Typical use::

    spec = get_task("sst2")
    rows = load_rows(spec, "train")
    examples = encode(rows, spec, tokenizer, max_length=128)
    for batch in batches(examples, 32, pad_token_id=tokenizer.pad_token_id, shuffle=True, seed=0, epoch=0):
        ...
"""

from unipeft.data.datadir import (
    DATA_DIR_ENV,
    HUB_NAMES,
    default_data_dirs,
    load_split,
    read_jsonl,
    resolve_data_dir,
)
from unipeft.data.encode import (
    IGNORE_INDEX,
    PROMPT_NO_INPUT,
    PROMPT_WITH_INPUT,
    batch_order,
    batches,
    collate,
    encode,
    encode_causal_lm,
    encode_classification,
    end_token_id,
    format_alpaca_prompt,
    num_batches,
    prompt_text,
    prompt_token_ids,
)
from unipeft.data.metrics import (
    HIGHER_IS_BETTER,
    METRICS,
    accuracy,
    compute_metrics,
    f1_binary,
    matthews_corrcoef,
    pearson,
    perplexity,
    predictions_from_logits,
    rank_average,
    spearman,
)
from unipeft.data.tasks import TASKS, TaskKind, TaskSpec, get_task, jsonl_task, load_rows
from unipeft.data.textmetrics import TEXT_METRICS, bleu, rouge_l, text_metrics

__all__ = [
    "DATA_DIR_ENV",
    "HIGHER_IS_BETTER",
    "HUB_NAMES",
    "IGNORE_INDEX",
    "METRICS",
    "PROMPT_NO_INPUT",
    "PROMPT_WITH_INPUT",
    "TASKS",
    "TaskKind",
    "TaskSpec",
    "accuracy",
    "batch_order",
    "batches",
    "collate",
    "compute_metrics",
    "default_data_dirs",
    "encode",
    "encode_causal_lm",
    "encode_classification",
    "end_token_id",
    "f1_binary",
    "format_alpaca_prompt",
    "get_task",
    "jsonl_task",
    "load_rows",
    "load_split",
    "matthews_corrcoef",
    "num_batches",
    "pearson",
    "perplexity",
    "predictions_from_logits",
    "prompt_text",
    "prompt_token_ids",
    "rank_average",
    "read_jsonl",
    "resolve_data_dir",
    "spearman",
    "TEXT_METRICS",
    "bleu",
    "rouge_l",
    "text_metrics",
]
