"""The engine in process: requests that arrive together are prefilled in one forward (left-padded, per-row positions,
each row its own adapter), and every row still decodes exactly its adapter's offline greedy tokens."""

from __future__ import annotations

import threading

import pytest

from tests.serve.conftest import PROMPTS, TOKENS
from unipeft.serve.engine import Engine, GenRequest, _prefill_chunks


def _request(prompt: list[int], adapter: str | None, events: list, done: threading.Event, left: list[int]):
    def emit(event):
        events.append(event)
        if event[0] in ("done", "error"):
            left[0] -= 1
            if not left[0]:
                done.set()
    return GenRequest(prompt=prompt, adapter=adapter, max_tokens=TOKENS, emit=emit)


@pytest.mark.parametrize("prefill_tokens", [4096, 1])
def test_requests_prefilled_together_decode_their_offline_tokens(served, prefill_tokens):
    from unipeft.models import load_model
    from unipeft.peft import Peft
    from unipeft.serve.registry import AdapterRegistry

    model, tokenizer = load_model("smollm2-135m", kind="causal_lm")
    model.eval()
    registry = AdapterRegistry(Peft(model), adapter_dir=str(served["dir"]), max_resident=4)
    for name in ("a", "b", "c"):
        registry.load(name, name)
    forwards: list[int] = []
    model.register_forward_pre_hook(lambda _, args, kwargs: forwards.append(kwargs["input_ids"].shape[0]),
                                    with_kwargs=True)
    engine = Engine(registry, max_batch=16, queue_size=16, max_context=2048, prefill_tokens=prefill_tokens)
    jobs = [(adapter, i) for adapter in (None, "a", "b", "c") for i in range(len(PROMPTS))]
    done, left = threading.Event(), [len(jobs)]
    events: dict[tuple, list] = {job: [] for job in jobs}
    for adapter, i in jobs:  # all waiting before the engine starts: one admission takes them all
        engine.submit(_request(tokenizer(PROMPTS[i])["input_ids"], adapter, events[adapter, i], done, left))
    engine.start()
    try:
        assert done.wait(300)
    finally:
        engine.stop()
    lengths = {len(tokenizer(p)["input_ids"]) for p in PROMPTS}
    assert len(lengths) > 1, "the prompts must differ in length for the padding to be exercised"
    if prefill_tokens == 4096:
        assert forwards[0] == len(jobs)  # one prefill forward for all 16
    else:
        assert forwards[:len(jobs)] == [1] * len(jobs)  # a budget of one token: each prompt alone
    for (adapter, i), got in events.items():
        assert got[-1] == ("done", "length"), got[-1]
        tokens = [value for kind, value in got if kind == "token"]
        reference = served["reference"][adapter][i]
        if tokenizer.eos_token_id in reference:  # generate() stops at EOS; the engine (no stop ids) goes on
            reference = reference[:reference.index(tokenizer.eos_token_id) + 1]
        assert len(tokens) == TOKENS and tokens[:len(reference)] == reference, (adapter, i)


def test_prefill_chunks_sort_by_length_and_keep_the_token_budget():
    reqs = [GenRequest(prompt=[1] * n, adapter=None, max_tokens=1, emit=lambda e: None) for n in (5, 2, 9, 3, 40)]
    chunks = _prefill_chunks(reqs, 20)
    assert [[len(r.prompt) for r in c] for c in chunks] == [[2, 3, 5], [9], [40]]
    assert all(len(c) * max(len(r.prompt) for r in c) <= 20 for c in chunks[:-1])
    assert _prefill_chunks([], 20) == []
