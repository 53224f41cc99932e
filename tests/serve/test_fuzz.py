"""No input crashes the server: schemathesis generates requests from the server's own OpenAPI schema (valid and
invalid bodies, odd types, huge numbers, unicode) for every operation, and every answer must be below 500 (503 when
the queue is full is allowed) — bad input gets a 4xx with an OpenAI-style error body."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings


def test_no_input_gets_a_server_error(server):
    schema = schemathesis.openapi.from_url(f"{server}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/v1/load_lora_adapter"}
    calls = []
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def check(case):
            response = case.call(timeout=120)
            calls.append(response.status_code)
            assert response.status_code < 500 or response.status_code == 503, \
                (case.method, case.path, case.body, response.text[:300])
            if response.status_code >= 400 and case.path not in ("/metrics", "/"):
                assert "error" in response.json()

        check()
    assert len(calls) >= 5 * len(operations) and any(400 <= c < 500 for c in calls)
