"""The engine in process: requests that arrive together are prefilled in one forward (left-padded, per-row positions,
each row its own adapter), and every row still decodes exactly its adapter's offline greedy tokens — in float32, and
in bfloat16 up to the first near-tie that bf16 rounding may decide either way."""

from __future__ import annotations

import threading

import pytest
import torch

import unipeft
from tests.serve.conftest import PROMPTS, TOKENS
from unipeft.serve.engine import Engine, GenRequest, _contiguous_head, _prefill_chunks


def _request(prompt: list[int], adapter: str | None, events: list, done: threading.Event, left: list[int]):
    def emit(event):
        events.append(event)
        if event[0] in ("done", "error"):
            left[0] -= 1
            if not left[0]:
                done.set()
    return GenRequest(prompt=prompt, adapter=adapter, max_tokens=TOKENS, emit=emit)


def _run_engine(served, jobs, *, prefill_tokens=4096, dtype=torch.float32):
    """Every job (adapter, prompt index) submitted before the engine starts; their events and the batch size of
    every forward."""
    from unipeft.models import load_model
    from unipeft.peft import Peft
    from unipeft.serve.registry import AdapterRegistry

    model, tokenizer = load_model("smollm2-135m", kind="causal_lm")
    model.to(dtype).eval()
    registry = AdapterRegistry(Peft(model), adapter_dir=str(served["dir"]), max_resident=4)
    for name in ("a", "b", "c"):
        registry.load(name, name)
    forwards: list[int] = []
    model.register_forward_pre_hook(lambda _, args, kwargs: forwards.append(kwargs["input_ids"].shape[0]),
                                    with_kwargs=True)
    engine = Engine(registry, max_batch=16, queue_size=16, max_context=2048, prefill_tokens=prefill_tokens)
    done, left = threading.Event(), [len(jobs)]
    events: dict[tuple, list] = {job: [] for job in jobs}
    for adapter, i in jobs:  # all waiting before the engine starts: one admission takes them all
        engine.submit(_request(tokenizer(PROMPTS[i])["input_ids"], adapter, events[adapter, i], done, left))
    engine.start()
    try:
        assert done.wait(600)
    finally:
        engine.stop()
    return events, forwards


def _tokens(got: list) -> list[int]:
    assert got[-1] == ("done", "length"), got[-1]
    return [value for kind, value in got if kind == "token"]


@pytest.mark.parametrize("prefill_tokens", [4096, 1])
def test_requests_prefilled_together_decode_their_offline_tokens(served, prefill_tokens):
    tokenizer = served["tokenizer"]
    jobs = [(adapter, i) for adapter in (None, "a", "b", "c") for i in range(len(PROMPTS))]
    events, forwards = _run_engine(served, jobs, prefill_tokens=prefill_tokens)
    lengths = {len(tokenizer(p)["input_ids"]) for p in PROMPTS}
    assert len(lengths) > 1, "the prompts must differ in length for the padding to be exercised"
    if prefill_tokens == 4096:
        assert forwards[0] == len(jobs)  # one prefill forward for all 16
    else:
        assert forwards[:len(jobs)] == [1] * len(jobs)  # a budget of one token: each prompt alone
    for (adapter, i), got in events.items():
        tokens = _tokens(got)
        reference = served["reference"][adapter][i]
        if tokenizer.eos_token_id in reference:  # generate() stops at EOS; the engine (no stop ids) goes on
            reference = reference[:reference.index(tokenizer.eos_token_id) + 1]
        assert len(tokens) == TOKENS and tokens[:len(reference)] == reference, (adapter, i)


def _offline_bf16(served, jobs) -> dict[tuple, list[tuple[int, int, float]]]:
    """Each job run alone in bfloat16 (its adapter active, ``generate``): per greedy step, the token, the runner-up
    and how far apart their logits are relative to the top one."""
    from unipeft.models import load_model

    model, tokenizer = load_model("smollm2-135m", kind="causal_lm")
    model.to(torch.bfloat16).eval()
    for name in ("a", "b", "c"):
        peft = unipeft.from_pretrained(model, str(served["dir"] / name), adapter_name=name, activate=False)
    out = {}
    for adapter, i in jobs:
        peft.set_active(*([adapter] if adapter else []))
        ids = tokenizer(PROMPTS[i], return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=TOKENS, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
        steps = []
        for logits in gen.logits:
            top = logits[0].float().topk(2)
            steps.append((int(top.indices[0]), int(top.indices[1]),
                          float((top.values[0] - top.values[1]) / top.values[0].abs())))
        out[adapter, i] = steps
    return out


def test_bfloat16_rows_decode_their_offline_bfloat16_tokens(served):
    """In bf16 the base and adapters run in bf16 (what dtype ``auto`` picks on a device that multiplies it
    natively). A batched, padded row may round differently from the row alone, so each row must equal its offline
    bf16 tokens until, at most, a step where it takes the offline runner-up of a near-tie (top two logits within 5%);
    past that the two runs see different text and are not compared."""
    jobs = [(adapter, i) for adapter in (None, "a", "b", "c") for i in range(2)]
    events, forwards = _run_engine(served, jobs, dtype=torch.bfloat16)
    assert forwards[0] == len(jobs)
    compared = 0
    for job, steps in _offline_bf16(served, jobs).items():
        tokens = _tokens(events[job])
        for got, (best, second, gap) in zip(tokens, steps):
            if got != best:
                assert got == second and gap < 0.05, (job, tokens, steps)
                break
            compared += 1
    assert compared >= len(jobs) * TOKENS // 2, f"only {compared} tokens agreed before a near-tie"


def test_prefill_chunks_sort_by_length_and_keep_the_token_budget():
    reqs = [GenRequest(prompt=[1] * n, adapter=None, max_tokens=1, emit=lambda e: None) for n in (5, 2, 9, 3, 40)]
    chunks = _prefill_chunks(reqs, 20)
    assert [[len(r.prompt) for r in c] for c in chunks] == [[2, 3, 5], [9], [40]]
    assert all(len(c) * max(len(r.prompt) for r in c) <= 20 for c in chunks[:-1])
    assert _prefill_chunks([], 20) == []


def test_contiguous_head_gives_the_head_a_contiguous_input_only_inside_the_block():
    """The prefill's last-position slice ``hidden[:, -1:, :]`` is strided; inside the block the head sees it
    contiguous (same values), and the hook is gone afterwards."""

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(8, 5, bias=False)

        def get_output_embeddings(self):
            return self.head

    model, seen = Tiny(), []
    model.head.register_forward_hook(lambda _m, args, _out: seen.append(args[0].is_contiguous()))
    hidden = torch.randn(3, 4, 8)[:, -1:, :]
    assert not hidden.is_contiguous()
    plain = model.head(hidden)
    with _contiguous_head(model):
        inside = model.head(hidden)
    after = model.head(hidden)
    assert seen == [False, True, False]
    torch.testing.assert_close(inside, plain)
    torch.testing.assert_close(after, plain)
    with _contiguous_head(torch.nn.Identity()):  # a model without an output head passes through
        pass
