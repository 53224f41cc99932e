"""``unipeft convert``: convert an adapter between unipeft's format and Hugging Face peft's.

    unipeft convert --model minilm --in runs/sst2_lora/adapter --out hf_adapter --to hf
    unipeft convert --model smollm2-135m --in hf_adapter --out unipeft_adapter --to unipeft

The base model is loaded with the head the adapter was trained with: read from the adapter (HF's ``task_type`` /
``auto_mapping``, or a copied head's size) unless ``--kind`` / ``--num-labels`` say it. Anything the target format
cannot hold is refused with a message naming it (exit code 2); nothing is written then.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import unipeft
from unipeft.cli.common import UsageError
from unipeft.persist.io import read_adapter_config
from unipeft.persist.names import CONFIG_NAME, FORMAT
from unipeft.interop import load_hf_adapter, read_hf_adapter, save_hf_adapter
from unipeft.models import MODEL_KINDS, load_model

#: HF ``task_type`` → unipeft model kind.
HF_TASK_KINDS = {"SEQ_CLS": "classification", "CAUSAL_LM": "causal_lm", "SEQ_2_SEQ_LM": "seq2seq_lm",
                 "FEATURE_EXTRACTION": "base"}
#: Model class name endings (HF's ``auto_mapping.base_model_class``) → unipeft model kind.
CLASS_KINDS = (("ForSequenceClassification", "classification"), ("ForCausalLM", "causal_lm"),
               ("LMHeadModel", "causal_lm"), ("ForConditionalGeneration", "seq2seq_lm"))
#: unipeft architecture families → the kind their adapters are usually trained with.
FAMILY_KINDS = {"bert": "classification", "gpt2": "causal_lm", "llama": "causal_lm", "t5": "seq2seq_lm",
                "bart": "seq2seq_lm"}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("convert", help="convert an adapter between unipeft and Hugging Face peft formats",
                              description="Load the base model and the adapter in one format and save the adapter in "
                                          "the other; the result computes the same outputs.")
    p.add_argument("--model", required=True, help="short name (minilm, smollm2-135m) or local model folder")
    p.add_argument("--in", dest="source", required=True, help="adapter folder to convert")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--to", required=True, choices=("hf", "unipeft"), help="the format to write")
    p.add_argument("--kind", choices=MODEL_KINDS, help="model kind (default: read from the adapter)")
    p.add_argument("--num-labels", type=int, help="classes of a classification head (default: read from the adapter)")
    p.set_defaults(run=run)


def _source_format(folder: Path) -> tuple[str, dict[str, Any]]:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {CONFIG_NAME}; is it an adapter folder?")
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("format") == FORMAT:
        return "unipeft", read_adapter_config(folder)
    if "peft_type" in config:
        return "hf", config
    raise UsageError(f"{path} is neither a unipeft nor an HF peft adapter config")


def _kind_of_hf(folder: Path, config: dict[str, Any]) -> tuple[str | None, int | None]:
    kind = HF_TASK_KINDS.get(config.get("task_type") or "")
    base_class = (config.get("auto_mapping") or {}).get("base_model_class") or ""
    kind = kind or next((k for suffix, k in CLASS_KINDS if base_class.endswith(suffix)), None)
    labels = None
    if kind == "classification":
        _, tensors = read_hf_adapter(folder)
        heads = [t for k, t in tensors.items() if k.rsplit(".", 1)[0].endswith(("classifier", "score"))
                 and k.endswith(".weight") and t.dim() == 2]
        labels = int(heads[0].shape[0]) if heads else None
    return kind, labels


def _kind_of_unipeft(config: dict[str, Any]) -> tuple[str | None, int | None]:
    heads = [s for s in config["sites"] if len(s["base_shape"]) == 2 and
             (s["position"] == "head" or s["module"].rsplit(".", 1)[-1] in ("classifier", "score"))]
    kind = FAMILY_KINDS.get(config["base"].get("family") or "")
    labels = int(heads[0]["base_shape"][0]) if heads and kind == "classification" else None
    return kind, labels


def run(args: argparse.Namespace) -> int:
    source = Path(args.source)
    if not source.is_dir():
        raise FileNotFoundError(f"adapter folder {source} does not exist")
    fmt, config = _source_format(source)
    if fmt == args.to:
        raise UsageError(f"{source} is already a{'n HF peft' if fmt == 'hf' else ' unipeft'} adapter")
    kind, labels = _kind_of_hf(source, config) if fmt == "hf" else _kind_of_unipeft(config)
    kind = args.kind or kind
    if kind is None:
        raise UsageError(f"cannot tell which model head {source} was trained with; give --kind")
    labels = (args.num_labels or labels) if kind == "classification" else None
    model, _ = load_model(args.model, kind=kind, num_labels=labels)  # type: ignore[arg-type]
    if fmt == "hf":
        peft = load_hf_adapter(model, source)
        out = unipeft.save_adapter(peft, args.out)
    else:
        peft = unipeft.load_adapter(model, source)
        out = save_hf_adapter(peft, args.out)
    print(f"converted {source} ({fmt}) -> {out} ({args.to}) on {args.model} ({kind})")
    return 0
