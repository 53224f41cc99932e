"""How inexact is merging LoRA into a quantized base? Measured on real models and real sentences.

For each model, base precision (float32, bitsandbytes 8-bit LLM.int8(), 4-bit NF4) and adapter size, LoRA r=8 is
attached at ``attn.q`` / ``attn.v`` with B drawn at random and rescaled per site so that ‖ΔW‖_F = rel · ‖W‖_F (rel =
1% and 5%: a lightly and a strongly trained adapter). Then, on 32 SST-2 training sentences:

* ``quantization``: max |y(quantized base) − y(float base)|, the price of quantizing at all (for scale);
* ``adapter effect``: max |y(adapted) − y(base)| on the same base, what the adapter changes;
* ``merge error``: max |y(merged) − y(unmerged)| on the same base, what merging gets wrong;
* ``merge / effect``: the ratio of the two (0%: exact merge; 100%: as wrong as dropping the adapter);
* ``ΔW lost``: ‖W_merged − (W + ΔW)‖_F / ‖ΔW‖_F over the merged sites, in dequantized weights: the share of the
  update the merged weights get wrong (100%: as if nothing had been merged);
* ``site``: the largest per-site error of ``peft.merge(check=True)`` (N(0, 1) probe rows);
* ``agreement``: SmolLM2: share of positions with the same top-1 next token merged and unmerged; MiniLM: the lowest
  cosine similarity of the merged and unmerged mean-pooled sentence embeddings;
* ``unmerge bitwise``: whether unmerging gives back exactly the unmerged outputs.

y is the LM's logits (SmolLM2-135M) or the last hidden states (MiniLM, a sentence encoder), at every real token.
The base ``nf4→float`` is the recommended alternative: the adapter runs on the NF4 base, then ``model.dequantize()``
(transformers) turns the quantized layers into float ones holding Deq(Q(W)) and the merge is exact.

    python benchmarks/quant_merge.py --models minilm smollm2-135m --out quant_merge.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common

import unipeft
from unipeft.core.quant import quant_scheme
from unipeft.data import collate, encode, get_task, load_rows
from unipeft.models.gguf import cached_gguf_folder
from unipeft.models.registry import resolve_model

log = logging.getLogger("quant_merge")
PRECISIONS = ("float32", "int8", "nf4", "nf4→float")


def model_folder(name: str) -> Path:
    source = resolve_model(name)
    return source.path if source.format == "hf" else cached_gguf_folder(source)


def load(name: str, precision: str) -> torch.nn.Module:
    kwargs: dict[str, Any] = {}
    if precision == "nf4":
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    elif precision == "int8":
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(load_in_8bit=True)
    auto = transformers.AutoModel if is_encoder(name) else transformers.AutoModelForCausalLM
    model = auto.from_pretrained(model_folder(name), dtype=torch.float32, device_map="cpu", **kwargs)
    return model.eval()


def is_encoder(name: str) -> bool:
    """MiniLM is a sentence encoder: its output is compared (no task head, which would be new and random)."""
    return name == "minilm"


def batch_for(name: str) -> dict[str, torch.Tensor]:
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_folder(name))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    spec = get_task("sst2")
    examples = encode(load_rows(spec, "train", limit=32), spec, tokenizer, max_length=48)
    batch = collate(examples, tokenizer.pad_token_id)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def float_weight(base: torch.nn.Module) -> torch.Tensor:
    scheme = quant_scheme(base)
    return scheme.dequantize(base) if scheme is not None else base.weight.detach().float()


def set_lora(peft: unipeft.Peft, rel: float, seed: int) -> None:
    """B at random, rescaled so that ‖s·B A‖_F = rel · ‖W‖_F at every site."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module, placed in peft.delta_modules("default"):
            form = placed.form
            form.lora_A.copy_(torch.randn(form.lora_A.shape, generator=g) / form.lora_A.shape[1] ** 0.5)
            form.lora_B.copy_(torch.randn(form.lora_B.shape, generator=g))
            weight = float_weight(peft.model.get_submodule(module).base)
            form.lora_B.mul_(rel * weight.norm() / form.delta_weight().norm())


def logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The output at every real token: (positions, vocab) logits of an LM, (positions, d) hidden states of MiniLM."""
    with torch.no_grad():
        out = model(**batch)
    out = out.logits if hasattr(out, "logits") else out.last_hidden_state
    return out.float()[batch["attention_mask"].bool()]


def agreement(merged: torch.Tensor, unmerged: torch.Tensor, batch: dict[str, torch.Tensor], encoder: bool) -> float:
    """LM: the share of positions with the same top-1 token; encoder: the lowest cosine similarity between the
    merged and unmerged mean-pooled sentence embeddings."""
    if not encoder:
        return (merged.argmax(-1) == unmerged.argmax(-1)).float().mean().item()
    lengths = batch["attention_mask"].sum(1).tolist()
    pooled = [torch.stack([p.mean(0) for p in x.split(lengths)]) for x in (merged, unmerged)]
    return torch.nn.functional.cosine_similarity(*pooled, dim=-1).min().item()


def site_weights(peft: unipeft.Peft) -> dict[str, torch.Tensor]:
    return {m: float_weight(peft.model.get_submodule(m).base).clone() for m, _ in peft.delta_modules("default")}


def weight_error(peft: unipeft.Peft, before: dict[str, torch.Tensor]) -> float:
    """‖W_merged − (W + ΔW)‖_F / ‖ΔW‖_F over all sites: the share of the update the merged weights get wrong."""
    after = site_weights(peft)
    deltas = {m: placed.form.delta_weight().detach() for m, placed in peft.delta_modules("default")}
    wrong = sum(((after[m] - before[m] - d) ** 2).sum() for m, d in deltas.items())
    return (wrong / sum((d ** 2).sum() for d in deltas.values())).sqrt().item()


def measure(name: str, precision: str, rel: float, batch: dict[str, torch.Tensor],
            float_base: torch.Tensor) -> dict[str, Any]:
    """One row; precision ``nf4→float`` trains on NF4 but merges after ``model.dequantize()`` (float layers holding
    Deq(Q(W)))."""
    dequantize = precision.endswith("→float")
    model = load(name, precision.removesuffix("→float"))
    base_logits = logits(model, batch)
    peft = unipeft.attach(model, "lora", r=8)
    set_lora(peft, rel, seed=1)
    unmerged = logits(model, batch)
    if dequantize:
        model.dequantize()
    weights = site_weights(peft)
    start = time.perf_counter()
    sites = peft.merge(check=True, tolerance=float("inf"))
    merge_s = time.perf_counter() - start
    merged = logits(model, batch)
    lost = weight_error(peft, weights)
    peft.unmerge()
    restored = torch.equal(logits(model, batch), unmerged)
    diff = (merged - unmerged).abs().max().item()
    return {"model": name, "precision": precision, "rel": rel,
            "quantization": (base_logits - float_base).abs().max().item(),
            "effect": (unmerged - base_logits).abs().max().item(), "merge": diff,
            "merge_rel": diff / (unmerged - base_logits).abs().max().item(),
            "weight": lost, "site": max(sites.values()), "agree": agreement(merged, unmerged, batch, is_encoder(name)),
            "unmerge_exact": restored, "merge_seconds": merge_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["minilm", "smollm2-135m"])
    parser.add_argument("--rel", nargs="+", type=float, default=[0.01, 0.05])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        batch = batch_for(name)
        float_base = logits(load(name, "float32"), batch)
        for precision in PRECISIONS:
            for rel in args.rel:
                rows.append(measure(name, precision, rel, batch, float_base))
                print(json.dumps(rows[-1]), flush=True)
    headers = ["model", "base", "‖ΔW‖/‖W‖", "quantization", "adapter effect", "merge error", "merge / effect",
               "ΔW lost", "site (probe)", "agreement", "unmerge bitwise"]
    print(_common.format_table(headers, [
        [r["model"], r["precision"], f"{r['rel']:.0%}", f"{r['quantization']:.3g}", f"{r['effect']:.3g}",
         f"{r['merge']:.3g}", f"{r['merge_rel']:.1%}", f"{r['weight']:.1%}", f"{r['site']:.3g}",
         f"{r['agree']:.4f}" if is_encoder(r["model"]) else f"{r['agree']:.1%}",
         "yes" if r["unmerge_exact"] else "no"] for r in rows]))
    if args.out is not None:
        _common.write_json(args.out, {**_common.environment(), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
