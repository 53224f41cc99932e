"""Adapter combination benchmark: unipeft's ``Peft.combine`` against HF peft's ``add_weighted_adapter`` on a real model.

Three LoRA adapters (r=8, α=16 on the query and value projections; B ~ N(0, 0.02²) so they are not zero) are made in
HF peft, saved, and loaded into unipeft with ``unipeft.interop.load_hf_adapter``; every combination type is then run
by both libraries with weights (0.5, 0.3, 0.2). For each type the script prints the time of each (median of
``--repeats`` runs, the two alternating) and their ratio, and the largest difference between the combined adapters'
ΔW over all sites, absolute and relative to the largest |ΔW|. DARE's ``torch.bernoulli`` is replaced by the same
seeded stream for both, so their random masks are the same (see tests/core/test_combine_hf.py).

    python benchmarks/combine.py                       # smollm2-135m
    python benchmarks/combine.py --model minilm --repeats 5 --threads 2 --out combine.json
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
import warnings
from pathlib import Path
from statistics import median

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import environment, format_table, write_json  # noqa: E402

import peft  # noqa: E402
from unipeft.ops.combine import METHODS  # noqa: E402
from unipeft.interop import load_hf_adapter  # noqa: E402
from unipeft.models import load_model  # noqa: E402

TARGETS = {"smollm2-135m": ("causal_lm", ["q_proj", "v_proj"]), "minilm": ("base", ["query", "value"])}
ADAPTERS, WEIGHTS = ["t1", "t2", "t3"], [0.5, 0.3, 0.2]


def options(method: str) -> dict[str, float]:
    return {"density": 0.5} if method not in ("linear", "cat", "svd") else {}


def stream(seed: int):
    g = torch.Generator().manual_seed(seed)
    return lambda p, *a, generator=None, **k: (torch.rand(p.shape, generator=g) < p).to(p.dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", choices=sorted(TARGETS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a busy machine two threads make LAPACK's SVD 10x slower)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    kind, targets = TARGETS[args.model]
    base, _ = load_model(args.model, kind=kind)
    hf = None
    g = torch.Generator().manual_seed(0)
    for name in ADAPTERS:
        config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets)
        hf = peft.get_peft_model(copy.deepcopy(base), config, adapter_name=name) if hf is None else hf
        if name not in hf.peft_config:
            hf.add_adapter(name, config)
    with torch.no_grad():
        for key, p in hf.named_parameters():
            if "lora_B" in key:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder, selected_adapters=ADAPTERS)
        model = copy.deepcopy(base)
        for name in ADAPTERS:
            handle = load_hf_adapter(model, Path(folder) / name, name, activate=False)
    original_bernoulli = torch.bernoulli
    rows, results = [], []
    for method in METHODS:
        ours_s, hf_s = [], []
        for _ in range(args.repeats):
            torch.bernoulli = stream(7)
            start = time.perf_counter()
            hf.add_weighted_adapter(ADAPTERS, WEIGHTS, "m", combination_type=method, **options(method))
            hf_s.append(time.perf_counter() - start)
            torch.bernoulli = stream(7)
            start = time.perf_counter()
            handle.combine(ADAPTERS, WEIGHTS, method=method, new_name="m", **options(method))
            ours_s.append(time.perf_counter() - start)
            torch.bernoulli = original_bernoulli
            ours = {m: p.form.delta_weight().detach() for m, p in handle.delta_modules("m")}
            theirs = {k[len("base_model.model."):]: mod.get_delta_weight("m").detach()
                      for k, mod in hf.named_modules() if isinstance(mod, peft.tuners.lora.LoraLayer)
                      and "m" in mod.lora_A}
            diff = max((ours[m] - theirs[m]).abs().max().item() for m in theirs)
            scale = max(t.abs().max().item() for t in theirs.values())
            hf.delete_adapter("m")
            handle.remove("m")
        row = dict(method=method, unipeft_s=median(ours_s), peft_s=median(hf_s), sites=len(ours),
                   max_abs_diff=diff, rel_diff=diff / scale)
        results.append(row)
        rows.append([method, f"{row['unipeft_s']:.4f}", f"{row['peft_s']:.4f}",
                     f"{row['unipeft_s'] / row['peft_s']:.2f}", f"{diff:.1e}", f"{diff / scale:.1e}"])
        print(" ".join(rows[-1]), flush=True)  # progress: the SVD methods take minutes on a large model
    print(f"{args.model}: 3 LoRA adapters r=8 at {', '.join(targets)} ({len(ours)} sites), "
          f"median of {args.repeats}, torch threads {torch.get_num_threads()}")
    print(format_table(["method", "unipeft s", "peft s", "unipeft/peft", "max |ΔW diff|", "relative"], rows))
    if args.out:
        write_json(args.out, {"environment": environment(), "model": args.model, "results": results})


if __name__ == "__main__":
    main()
