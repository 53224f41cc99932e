"""``unipeft combine``: combine saved adapters into one new LoRA adapter folder (see docs/combining.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from unipeft.cli.merge_cmd import KINDS, head_size
from unipeft.ops.combine import METHODS


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("combine", help="combine saved adapters into a new LoRA adapter (cat, svd, ties, dare...)",
                              description="Load the base and every --adapter, combine them with --weights by --method "
                                          "(HF peft's add_weighted_adapter semantics) and save the new adapter to OUT.")
    p.add_argument("--model", required=True, help="short name (minilm, smollm2-135m) or local model folder")
    p.add_argument("--kind", choices=KINDS, default="base", help="the model kind the adapters were trained on")
    p.add_argument("--adapter", required=True, action="append", help="adapter folder (repeat for each adapter)")
    p.add_argument("--weights", type=float, nargs="+", help="one weight per adapter (default: the average)")
    p.add_argument("--method", default="cat", choices=METHODS, help="combination method (default: cat, exact)")
    p.add_argument("--density", type=float, help="fraction of entries kept by ties/dare/magnitude_prune methods")
    p.add_argument("--svd-rank", type=int, help="rank of the result of the svd methods")
    p.add_argument("--seed", type=int, help="seed of DARE's random masks")
    p.add_argument("--copies", default="refuse",
                   help="what the result gets where the adapters hold module copies (classification heads): "
                        "average (their weighted mean), first, N (the copy of the N-th --adapter, from 1), or "
                        "refuse (default: stop and say so)")
    p.add_argument("--out", required=True, help="output adapter folder (written atomically)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from unipeft.persist.io import load_adapter
    from unipeft.methods.module_copy import CopyConfig
    from unipeft.models import load_model

    num_labels = head_size(args.adapter[0]) if args.kind == "classification" else None
    model, _ = load_model(args.model, kind=args.kind, num_labels=num_labels)
    names = [f"adapter{i}" for i in range(len(args.adapter))]
    peft = None
    for name, folder in zip(names, args.adapter):
        peft = load_adapter(model, folder, name, activate=False)
    assert peft is not None
    copies = args.copies
    if copies.isdigit():
        if not 1 <= int(copies) <= len(names):
            raise ValueError(f"--copies {copies}: there are {len(names)} adapters; give 1..{len(names)}, average, "
                             "first or refuse")
        copies = names[int(copies) - 1]
    peft.combine(names, args.weights, method=args.method, new_name="combined", density=args.density,
                 svd_rank=args.svd_rank, seed=args.seed, copies=copies)
    out = peft.save(str(Path(args.out)), "combined")
    deltas = peft.recipes["combined"].deltas
    heads = [r.site.module for r in peft.records["combined"] if isinstance(deltas[r.spec_index].form, CopyConfig)]
    taken = f"; module copies ({', '.join(heads)}): {args.copies}" if heads else ""
    print(f"combined {len(names)} adapters by {args.method}{taken} -> {out}")
    return 0
