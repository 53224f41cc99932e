"""Mixed-batch inference benchmark: one batch whose rows use different LoRA adapters, unipeft against HF peft.

Every row of a batch of ``--batch`` sequences uses one of k distinct LoRA adapters (r=8, α=16 on ``attn.q`` and
``attn.v``, B drawn non-zero), row b taking adapter b mod k. The contenders run the same model on the same batch:

* ``unipeft/k``:   ``with peft.mixed_batch(names): model(...)``, k = each of ``--adapters``; entering the block
  (gathering the adapters' stacks for the rows) is timed too, once per prefill and once per decode measurement;
* ``peft/k``:      HF peft's ``model(..., adapter_names=names)`` with the same adapters (the same A and B);
* ``unipeft/single`` and ``peft/single``: every row with one adapter, the ordinary forward (``set_active`` /
  ``set_adapter``): what one batch costs when it needs no mixing;
* ``floor``:       the model without adapters.

Two phases are timed: ``prefill`` (one forward over batch × seq tokens, logits of the last position only, as a
server computes them) and ``decode`` (``--decode-steps`` forward steps of one token per row on a KV cache of the
prefill, cropped back after each round). Time is measured in one process, the contenders alternating round robin
(the first rotating each round) after warm-up rounds; the report gives medians, tokens/s and the ratios
peft/unipeft at each k, unipeft k / unipeft single, and the time above the floor (the adapters' own cost). The
logits of unipeft/k and peft/k are compared as a check that both compute the same thing.

    python benchmarks/mixed_batch.py --out mixed.json                 # SmolLM2-135M, 32 x 16, k = 1 8 32
    python benchmarks/mixed_batch.py --batch 32 --seq 64 --rounds 5
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Sequence

import torch
from torch import nn

from _common import environment, format_table, timing_stats, write_json

PHASES: tuple[str, ...] = ("prefill", "decode")
POSITIONS: tuple[str, ...] = ("attn.q", "attn.v")


@dataclass(frozen=True, kw_only=True)
class Setup:
    """One benchmark run.

    Attributes:
        model: a short name of :func:`unipeft.models.load_model` (a causal LM), or a label when ``config`` is given.
        config: keyword arguments of ``AutoConfig.for_model`` for a randomly initialised model (the tests' tiny one).
        batch: rows per batch (each with its own adapter name).
        seq: prompt tokens per row (the prefill; the decode phase's KV cache).
        decode_steps: one-token steps per decode measurement.
        adapters: the numbers k of distinct adapters to mix (each at most ``batch``).
        phases: ``prefill`` and/or ``decode``.
        rounds: measured rounds; warmup: unmeasured rounds first.
        r, alpha, b_std: the LoRA (r, α) and the standard deviation of its random B.
        seed: seeds the weights of a config model, the adapters and the tokens.
        threads: ``torch.set_num_threads``.
        device: where the models and inputs live (``cpu``, ``cuda``); on CUDA every measurement ends with a
            synchronisation.
    """

    model: str = "smollm2-135m"
    config: dict[str, Any] | None = None
    batch: int = 32
    seq: int = 16
    decode_steps: int = 4
    adapters: tuple[int, ...] = (1, 8, 32)
    phases: tuple[str, ...] = PHASES
    rounds: int = 3
    warmup: int = 1
    r: int = 8
    alpha: float = 16.0
    b_std: float = 0.02
    seed: int = 0
    threads: int = 2
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("batch", "seq", "decode_steps", "rounds", "threads", "r"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        bad = [k for k in self.adapters if not 1 <= k <= self.batch]
        if bad or not self.adapters:
            raise ValueError(f"adapters must be numbers in 1..batch ({self.batch}), got {list(self.adapters)}")
        unknown = sorted(set(self.phases) - set(PHASES))
        if unknown or not self.phases:
            raise ValueError(f"unknown phase(s) {unknown or '(none)'}; valid: {', '.join(PHASES)}")

    @property
    def n_adapters(self) -> int:
        """How many adapters are loaded (the largest k)."""
        return max(self.adapters)

    def names(self, k: int) -> list[str]:
        """The adapter of each row when k adapters are mixed: row b takes adapter b mod k."""
        return [adapter_name(b % k) for b in range(self.batch)]


def adapter_name(i: int) -> str:
    """The name of the i-th adapter (the same in unipeft and HF peft)."""
    return f"adapter{i}"


@dataclass(eq=False)
class Contender:
    """One way of running a batch: inside ``block()``, ``run(**inputs)`` does one forward and returns the output.

    Attributes:
        name: e.g. ``unipeft/8``, ``peft/single``, ``floor``.
        library: ``unipeft``, ``peft`` or ``none``.
        k: distinct adapters in the batch (0 for the floor).
        run: the forward.
        block: the context every measurement runs in, entered once per prefill and once per decode measurement
            (unipeft's ``mixed_batch``, as a server enters it once per batch and keeps it for the decoding steps).
    """

    name: str
    library: str
    k: int
    run: Callable[..., Any]
    block: Callable[[], ContextManager[Any]] = nullcontext
    times: dict[str, list[float]] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------------ building
def load_base(setup: Setup) -> nn.Module:
    """The causal LM, in eval mode."""
    if setup.config is None:
        from unipeft.models import load_model

        model, _ = load_model(setup.model, kind="causal_lm")
        return model.to(setup.device).eval()
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(setup.seed)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**setup.config))
    return model.to(setup.device).eval()


def attach_unipeft(model: nn.Module, setup: Setup) -> "Any":
    """unipeft with ``setup.n_adapters`` LoRA adapters, each with its own random A (Kaiming) and B ~ N(0, b_std²)."""
    import unipeft

    generator = torch.Generator().manual_seed(setup.seed)
    peft = None
    for i in range(setup.n_adapters):
        torch.manual_seed(setup.seed + i)
        peft = unipeft.attach(model, "lora", name=adapter_name(i), r=setup.r, alpha=setup.alpha, dropout=0.0,
                              positions=POSITIONS)
        with torch.no_grad():
            for _, placed in peft.delta_modules(adapter_name(i)):
                b = torch.randn(placed.form.lora_B.shape, generator=generator) * setup.b_std
                placed.form.lora_B.copy_(b.to(placed.form.lora_B.device))
    return peft


def attach_peft(model: nn.Module, source: "Any", setup: Setup) -> nn.Module:
    """HF peft with the same adapters as the unipeft handle ``source`` (their A and B copied in).

    Raises:
        ValueError: if HF peft does not target exactly unipeft's modules or the scalings differ.
    """
    from peft import LoraConfig, get_peft_model

    targets = sorted({module for module, _ in source.delta_modules(adapter_name(0))})
    config = LoraConfig(r=setup.r, lora_alpha=setup.alpha, lora_dropout=0.0, target_modules=targets)
    peft_model = get_peft_model(model, config, adapter_name=adapter_name(0))
    for i in range(1, setup.n_adapters):
        peft_model.add_adapter(adapter_name(i), config)
    if sorted(peft_model.targeted_module_names) != targets:
        raise ValueError(f"HF peft targeted {sorted(peft_model.targeted_module_names)}, expected {targets}")
    inner = peft_model.base_model.model
    with torch.no_grad():
        for i in range(setup.n_adapters):
            name = adapter_name(i)
            for module, placed in source.delta_modules(name):
                layer = inner.get_submodule(module)
                if layer.scaling[name] != placed.form.scaling:
                    raise ValueError(f"scaling differs at {module}: peft {layer.scaling[name]}, "
                                     f"unipeft {placed.form.scaling}")
                layer.lora_A[name].weight.copy_(placed.form.lora_A)
                layer.lora_B[name].weight.copy_(placed.form.lora_B)
    return peft_model.eval()


def build_contenders(base: nn.Module, setup: Setup) -> list[Contender]:
    """The contenders of the module docstring, each on its own copy of ``base`` except the two unipeft/peft pairs."""
    uni_model = copy.deepcopy(base)
    uni = attach_unipeft(uni_model, setup)
    peft_model = attach_peft(copy.deepcopy(base), uni, setup)
    uni.set_active(adapter_name(0))  # the single-adapter contenders run the first adapter; the mixed ones
    peft_model.set_adapter(adapter_name(0))  # ignore the active adapter

    def peft_mixed(names: list[str]) -> Callable[..., Any]:
        return lambda **inputs: peft_model(**inputs, adapter_names=names)

    contenders = [Contender("floor", "none", 0, base)]
    contenders += [Contender("unipeft/single", "unipeft", 1, uni_model),
                   Contender("peft/single", "peft", 1, peft_model)]
    for k in setup.adapters:
        contenders += [Contender(f"unipeft/{k}", "unipeft", k, uni_model,
                                 block=lambda names=setup.names(k): uni.mixed_batch(names)),
                       Contender(f"peft/{k}", "peft", k, peft_mixed(setup.names(k)))]
    return contenders


# ----------------------------------------------------------------------------------------------------- measuring
def make_inputs(vocab: int, setup: Setup) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompt ids (B, seq) and the decode steps' ids (B, decode_steps), fixed by the seed."""
    generator = torch.Generator().manual_seed(setup.seed)
    prompt = torch.randint(3, vocab, (setup.batch, setup.seq), generator=generator)
    steps = torch.randint(3, vocab, (setup.batch, setup.decode_steps), generator=generator)
    return prompt.to(setup.device), steps.to(setup.device)


def prefill(contender: Contender, prompt: torch.Tensor) -> Any:
    """One forward over the prompts, logits of the last position only, keeping the KV cache."""
    with contender.block():
        return contender.run(input_ids=prompt, attention_mask=torch.ones_like(prompt), use_cache=True,
                             logits_to_keep=1)


def decode(contender: Contender, cache: Any, steps: torch.Tensor) -> None:
    """``steps.shape[1]`` one-token forwards on ``cache``, then the cache cropped back to the prompt."""
    past = cache.get_seq_length()
    with contender.block():
        for i in range(steps.shape[1]):
            mask = torch.ones(steps.shape[0], past + i + 1, dtype=torch.long, device=steps.device)
            contender.run(input_ids=steps[:, i:i + 1], attention_mask=mask, past_key_values=cache, use_cache=True)
    cache.crop(-steps.shape[1])


def run_benchmark(setup: Setup, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Time every contender in every phase, round robin; returns a JSON-ready dict (setup, per contender the times,
    statistics and tokens/s per phase, the ratios, and the unipeft-vs-peft output check)."""
    torch.set_num_threads(setup.threads)
    log(f"[{setup.model}] loading and attaching {setup.n_adapters} adapters to unipeft and HF peft")
    base = load_base(setup)
    contenders = build_contenders(base, setup)
    prompt, steps = make_inputs(base.config.vocab_size, setup)
    with torch.no_grad():
        outputs = {c.name: prefill(c, prompt) for c in contenders}
        check = output_check(outputs, setup)
        caches = {name: out.past_key_values for name, out in outputs.items()}
        del outputs
        gc.collect()
        gc.freeze()  # what exists now is never garbage: the collections between measurements need not scan it
        try:
            for phase in setup.phases:
                time_phase(phase, contenders, caches, prompt, steps, setup, log)
        finally:
            gc.unfreeze()
    tokens = {"prefill": setup.batch * setup.seq, "decode": setup.batch * setup.decode_steps}
    results = {}
    for c in contenders:
        results[c.name] = {"library": c.library, "k": c.k, "phases": {}}
        for phase, times in c.times.items():
            stats = timing_stats(times)
            results[c.name]["phases"][phase] = {"times_s": times, "time": stats,
                                                "tokens_per_s": tokens[phase] / stats["median_s"]}
    setup_dict = asdict(setup)
    setup_dict["adapters"], setup_dict["phases"] = list(setup.adapters), list(setup.phases)
    return {"model": setup.model, "setup": setup_dict, "tokens": tokens, "contenders": results,
            "ratios": ratios(results, setup), "output_check": check}


def time_phase(phase: str, contenders: list[Contender], caches: dict[str, Any], prompt: torch.Tensor,
               steps: torch.Tensor, setup: Setup, log: Callable[[str], None]) -> None:
    """Run ``warmup + rounds`` rounds of ``phase``, one measurement of every contender per round, the first contender
    rotating; the measured seconds go to ``contender.times[phase]``."""
    rounds = setup.warmup + setup.rounds
    log(f"[{setup.model}] {phase}: {setup.warmup} warm-up + {setup.rounds} rounds of {len(contenders)} "
        f"contenders on {setup.batch} x {setup.seq if phase == 'prefill' else setup.decode_steps} tokens")
    for c in contenders:
        c.times[phase] = []
    for round_ in range(rounds):
        first = round_ % len(contenders)
        for c in [*contenders[first:], *contenders[:first]]:
            gc.collect()  # outside the timed region, so no contender pays for another's garbage
            start = time.perf_counter()
            if phase == "prefill":
                prefill(c, prompt)
            else:
                decode(c, caches[c.name], steps)
            if prompt.is_cuda:
                torch.cuda.synchronize()
            if round_ >= setup.warmup:
                c.times[phase].append(time.perf_counter() - start)
        done = ", ".join(f"{c.name} {c.times[phase][-1]:.2f} s" for c in contenders if c.times[phase])
        log(f"[{setup.model}] {phase} round {round_ + 1}/{rounds}: {done or 'warm-up'}")


def output_check(outputs: dict[str, Any], setup: Setup) -> dict[str, float]:
    """Max abs difference of the last-position logits: unipeft/k vs peft/k, and the single-adapter pair."""
    out = {}
    for k in [*setup.adapters, "single"]:
        a, b = outputs[f"unipeft/{k}"].logits, outputs[f"peft/{k}"].logits
        out[f"unipeft/{k} vs peft/{k}"] = (a - b).abs().max().item()
    out["single vs mixed/1 (unipeft)"] = ((outputs["unipeft/single"].logits - outputs["unipeft/1"].logits)
                                          .abs().max().item() if 1 in setup.adapters else float("nan"))
    return out


def ratios(results: dict[str, dict[str, Any]], setup: Setup) -> dict[str, Any]:
    """Per phase: peft/unipeft at every k (>1: unipeft is faster), unipeft k / unipeft single, and the time above the
    floor (median minus the floor's median) of unipeft and peft at every k with its ratio."""
    out: dict[str, Any] = {}
    for phase in setup.phases:
        med = {name: r["phases"][phase]["time"]["median_s"] for name, r in results.items()}
        paired = {name: r["phases"][phase]["times_s"] for name, r in results.items()}
        entry: dict[str, Any] = {}
        for k in [*setup.adapters, "single"]:
            uni, hf = f"unipeft/{k}", f"peft/{k}"
            over_uni, over_hf = med[uni] - med["floor"], med[hf] - med["floor"]
            entry[f"peft/unipeft at {k}"] = {
                "of_medians": med[hf] / med[uni],
                "median_paired": statistics.median(a / b for a, b in zip(paired[hf], paired[uni])),
                "above_floor_s": {"unipeft": over_uni, "peft": over_hf},
                "above_floor_ratio": over_hf / over_uni if over_uni > 0 else None}
        for k in setup.adapters:
            entry[f"unipeft {k} / unipeft single"] = med[f"unipeft/{k}"] / med["unipeft/single"]
            entry[f"peft {k} / peft single"] = med[f"peft/{k}"] / med["peft/single"]
        out[phase] = entry
    return out


# ------------------------------------------------------------------------------------------------------- report
def report(result: dict[str, Any]) -> str:
    """Tables per phase and the ratios under them."""
    s = result["setup"]
    lines = [f"## {result['model']}: batch {s['batch']}, prompt {s['seq']} tokens, {s['decode_steps']} decode steps, "
             f"{s['rounds']} rounds after {s['warmup']} warm-up, {s['threads']} threads", ""]
    for phase in s["phases"]:
        rows = []
        for name, r in result["contenders"].items():
            p = r["phases"][phase]
            t = p["time"]
            rows.append([name, r["k"], f"{t['median_s'] * 1e3:.1f}", f"{t['p25_s'] * 1e3:.1f}-{t['p75_s'] * 1e3:.1f}",
                         f"{p['tokens_per_s']:.1f}"])
        lines += [f"### {phase} ({result['tokens'][phase]} tokens per measurement)", "",
                  format_table(["contender", "adapters", "median (ms)", "IQR (ms)", "tokens/s"], rows), ""]
        q = result["ratios"][phase]
        for k in [*s["adapters"], "single"]:
            e = q[f"peft/unipeft at {k}"]
            above = e["above_floor_s"]
            ratio = f"{e['above_floor_ratio']:.2f}x" if e["above_floor_ratio"] else "n/a"
            lines.append(f"peft/unipeft at {k!s:>6}: {e['of_medians']:.3f} (per-round {e['median_paired']:.3f}); "
                         f"above the floor: unipeft {above['unipeft'] * 1e3:.1f} ms, peft {above['peft'] * 1e3:.1f} ms "
                         f"({ratio})")
        for k in s["adapters"]:
            lines.append(f"unipeft {k} / unipeft single = {q[f'unipeft {k} / unipeft single']:.3f}; "
                         f"peft {k} / peft single = {q[f'peft {k} / peft single']:.3f}")
        lines.append("")
    check = ", ".join(f"{k}: {v:.1e}" for k, v in result["output_check"].items())
    lines.append(f"logits max abs difference: {check}")
    return "\n".join(lines)


def _quiet() -> None:
    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Setup()
    parser.add_argument("--model", default=defaults.model, help="a causal LM short name (default: smollm2-135m)")
    parser.add_argument("--batch", type=int, default=defaults.batch, help="rows per batch (default: 32)")
    parser.add_argument("--seq", type=int, default=defaults.seq, help="prompt tokens per row (default: 16)")
    parser.add_argument("--decode-steps", type=int, default=defaults.decode_steps, help="decode steps (default: 4)")
    parser.add_argument("--adapters", type=int, nargs="+", default=list(defaults.adapters),
                        help="numbers of distinct adapters to mix (default: 1 8 32)")
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    parser.add_argument("--rounds", type=int, default=defaults.rounds, help="measured rounds (default: 3)")
    parser.add_argument("--warmup", type=int, default=defaults.warmup, help="unmeasured rounds first (default: 1)")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch.set_num_threads (default: 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--out", help="write all numbers to this JSON file")
    args = parser.parse_args(argv)

    _quiet()
    setup = Setup(model=args.model, batch=args.batch, seq=args.seq, decode_steps=args.decode_steps,
                  adapters=tuple(args.adapters), phases=tuple(args.phases), rounds=args.rounds, warmup=args.warmup,
                  threads=args.threads, seed=args.seed, device=args.device)
    torch.set_num_threads(setup.threads)  # before the environment is recorded, which notes the thread count
    started, load_before = datetime.now(timezone.utc), os.getloadavg()
    env = environment(sys.argv if argv is None else [sys.argv[0], *argv])
    result = run_benchmark(setup, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(report(result) + "\n", flush=True)
    load_after = os.getloadavg()
    if args.out:
        write_json(args.out, {"benchmark": "mixed_batch", "started": started.isoformat(timespec="seconds"),
                              "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                              "load_average": {"start": load_before, "end": load_after}, **env, "result": result})
    print(f"{env['command']}\n{env['versions']}\n{env['machine']}\n"
          f"load average (1, 5, 15 min) at start {load_before}, at end {load_after}")
    if args.out:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
