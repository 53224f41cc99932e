"""``unipeft serve`` end to end: the official ``openai`` client, many concurrent clients over several adapters (each
gets exactly its adapter's offline greedy tokens), overload (fast 503s), adapters loaded, unloaded and evicted during
traffic, errors and security, metrics."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json

import httpx
import openai
import pytest

from tests.serve.conftest import ADMIN_KEY, PROMPTS, TOKENS

BASE = "smollm2-135m"


def _expected(served, adapter, i: int) -> str:
    tokenizer = served["tokenizer"]
    ids = served["reference"][adapter][i]
    if tokenizer.eos_token_id in ids:
        ids = ids[:ids.index(tokenizer.eos_token_id)]
    return tokenizer.decode(ids, skip_special_tokens=True)


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_openai_client_completions_chat_and_streaming(server, served):
    client = _client(server)
    got = client.completions.create(model="a", prompt=PROMPTS[0], max_tokens=TOKENS, temperature=0)
    assert got.choices[0].text == _expected(served, "a", 0)
    assert got.usage.completion_tokens == TOKENS and got.usage.prompt_tokens > 0
    streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(
        model="b", prompt=PROMPTS[1], max_tokens=TOKENS, temperature=0, stream=True) if chunk.choices)
    assert streamed == _expected(served, "b", 1)
    chat = client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "Say hi"}],
                                          max_tokens=8, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=BASE, messages=[{"role": "user", "content": "Say hi"}], max_tokens=8, temperature=0, stream=True)
        if c.choices]
    assert "".join(pieces) == chat.choices[0].message.content
    stopped = client.completions.create(model="a", prompt=PROMPTS[0], max_tokens=TOKENS, temperature=0,
                                        stop=[_expected(served, "a", 0)[3:6]])
    assert stopped.choices[0].finish_reason == "stop"
    assert _expected(served, "a", 0).startswith(stopped.choices[0].text)
    assert len(stopped.choices[0].text) < len(_expected(served, "a", 0))
    seeded = [client.completions.create(model="a", prompt=PROMPTS[2], max_tokens=6, temperature=0.9, seed=7).choices[0]
              .text for _ in range(2)]
    assert seeded[0] == seeded[1]
    models = {m.id: m for m in client.models.list().data}
    assert set(models) >= {BASE, "a", "b"} and getattr(models["a"], "parent") == BASE


def test_concurrent_clients_over_adapters_get_their_offline_tokens(server, served):
    """16 concurrent requests over the base and three adapters (one loaded on demand) share decoding steps; every one
    gets exactly the greedy tokens its adapter gives alone, offline."""
    jobs = [(adapter, i) for adapter in (None, "a", "b", "c") for i in range(len(PROMPTS))]

    def run(job):
        adapter, i = job
        r = httpx.post(f"{server}/v1/completions", json={"model": adapter or BASE, "prompt": PROMPTS[i],
                                                         "max_tokens": TOKENS, "temperature": 0}, timeout=300)
        if r.status_code == 503:
            return job, None
        assert r.status_code == 200, r.text
        return job, r.json()["choices"][0]["text"]

    pending = list(jobs)
    while pending:  # the queue holds 8: retry what was refused, as a client would after Retry-After
        with concurrent.futures.ThreadPoolExecutor(len(pending)) as pool:
            results = list(pool.map(run, pending))
        pending = [job for job, text in results if text is None]
        for (adapter, i), text in results:
            if text is not None:
                assert text == _expected(served, adapter, i), (adapter, i)


def test_overload_gets_fast_503s_and_accepted_requests_complete(server, served):
    async def main():
        async with httpx.AsyncClient(timeout=300) as client:
            async def one(k):
                return await client.post(f"{server}/v1/completions", json={
                    "model": "a", "prompt": PROMPTS[k % 4], "max_tokens": TOKENS, "temperature": 0})
            return await asyncio.gather(*(one(k) for k in range(80)))  # 10x the queue

    responses = asyncio.run(main())
    refused = [r for r in responses if r.status_code == 503]
    accepted = [(k, r) for k, r in enumerate(responses) if r.status_code == 200]
    assert refused and accepted and len(refused) + len(accepted) == 80
    assert all(r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "service_unavailable"
               for r in refused)
    assert all(r.elapsed.total_seconds() < 5 for r in refused)
    for k, r in accepted:
        assert r.json()["choices"][0]["text"] == _expected(served, "a", k % 4)


def test_adapters_load_unload_and_evict_during_traffic(server, served):
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}

    def stream_one(i):
        with httpx.stream("POST", f"{server}/v1/completions", json={
                "model": "a", "prompt": PROMPTS[i], "max_tokens": TOKENS, "temperature": 0, "stream": True},
                timeout=300) as r:
            assert r.status_code == 200
            text = ""
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    text += "".join(c.get("text", "") for c in json.loads(line[6:])["choices"])
            return i, text

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(stream_one, i) for i in range(4)]
        assert httpx.post(f"{server}/v1/load_lora_adapter", json={"lora_name": "c2", "lora_path": "c"},
                          timeout=120).status_code == 401  # the admin key alone may load
        r = httpx.post(f"{server}/v1/load_lora_adapter", json={"lora_name": "c2", "lora_path": "c"}, headers=admin,
                       timeout=120)
        assert r.status_code == 200, r.text
        got = httpx.post(f"{server}/v1/completions", json={"model": "c2", "prompt": PROMPTS[0], "max_tokens": TOKENS,
                                                          "temperature": 0}, timeout=300)
        assert got.json()["choices"][0]["text"] == _expected(served, "c", 0)
        assert httpx.post(f"{server}/v1/unload_lora_adapter", json={"lora_name": "c2"}, headers=admin,
                          timeout=120).status_code == 200
        for future in futures:
            i, text = future.result()
            assert text == _expected(served, "a", i)
    ids = {m["id"] for m in httpx.get(f"{server}/v1/models").json()["data"]}
    assert "c2" not in ids
    # max_resident is 3 with a and b pinned: loading c2 again evicts c, which reloads on its next request
    httpx.post(f"{server}/v1/load_lora_adapter", json={"lora_name": "c2", "lora_path": "c"}, headers=admin,
               timeout=120).raise_for_status()
    ids = {m["id"] for m in httpx.get(f"{server}/v1/models").json()["data"]}
    assert "c" not in ids and "c2" in ids
    again = httpx.post(f"{server}/v1/completions", json={"model": "c", "prompt": PROMPTS[1], "max_tokens": TOKENS,
                                                        "temperature": 0}, timeout=300)
    assert again.status_code == 200 and again.json()["choices"][0]["text"] == _expected(served, "c", 1)
    assert "unipeft_adapters_loaded 3.0" in httpx.get(f"{server}/metrics").text


@pytest.mark.parametrize("body, status, words", [
    ({"model": "nope", "prompt": "x"}, 404, ["nope", "smollm2-135m", "a", "b"]),
    ({"model": "a", "prompt": "x", "temperature": 5}, 400, ["temperature"]),
    ({"model": "a", "prompt": "x", "top_p": 0}, 400, ["top_p"]),
    ({"model": "a", "prompt": "x", "max_tokens": 17}, 400, ["max_tokens=17", "16"]),
    ({"model": "a"}, 400, ["prompt"]),
    ({"model": "a", "prompt": ""}, 400, ["empty"]),
])
def test_bad_requests_get_openai_errors_naming_the_field(server, body, status, words):
    r = httpx.post(f"{server}/v1/completions", json=body, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert all(w in error["message"] for w in words), error


def test_prompt_longer_than_the_context_names_both_numbers(server):
    r = httpx.post(f"{server}/v1/completions", json={"model": "a", "prompt": "word " * 9000, "max_tokens": 4})
    assert r.status_code == 400 and "8192" in r.json()["error"]["message"] and "9" in r.json()["error"]["message"]


@pytest.mark.parametrize("path", ["../outside", "/etc", "a/../../outside", "outside"])
def test_no_adapter_is_loaded_from_outside_the_adapter_folder(server, path):
    r = httpx.post(f"{server}/v1/load_lora_adapter", json={"lora_name": "evil", "lora_path": path},
                   headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)
    assert 400 <= r.status_code < 500 and r.json()["error"]["param"] == "lora_path", r.text
    assert "evil" not in {m["id"] for m in httpx.get(f"{server}/v1/models").json()["data"]}


def test_metrics_are_prometheus_text(server):
    httpx.post(f"{server}/v1/completions", json={"model": "a", "prompt": "Hi", "max_tokens": 2}, timeout=60)
    text = httpx.get(f"{server}/metrics").text
    for name in ("unipeft_requests_total", "unipeft_generation_tokens_total", "unipeft_queue_depth",
                 "unipeft_batch_size_bucket", "unipeft_adapters_loaded", "unipeft_time_to_first_token_seconds_bucket",
                 "unipeft_time_per_output_token_seconds_bucket", "unipeft_prefill_size_bucket"):
        assert name in text, name
    counts = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line.startswith(("unipeft_prefill_size_count", "unipeft_batch_size_count"))}
    assert counts["unipeft_prefill_size_count"] >= 1 and counts["unipeft_batch_size_count"] >= 1, counts


def test_health_names_the_device_and_dtype(server):
    """The fixture asks for float32 (its references are float32), so that is what the server reports running."""
    body = httpx.get(f"{server}/health").json()
    assert body["status"] == "ok" and body["device"] == "cpu" and body["dtype"] == "float32", body
