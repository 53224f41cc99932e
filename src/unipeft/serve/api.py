"""The HTTP layer: an OpenAI-compatible API on FastAPI (chosen for its typed request models, OpenAPI schema — which the
fuzz test reads — and Starlette streaming; served by uvicorn), Prometheus metrics by ``prometheus-client``.

Endpoints, with vLLM's names and bodies where vLLM has them: ``/v1/completions``, ``/v1/chat/completions`` (the
model's chat template; ``stream: true`` as server-sent events ending ``data: [DONE]``), ``/v1/models`` (the base and
each adapter with its ``root`` path and ``parent``), ``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter``,
``/health``, ``/metrics`` and a playground page at ``/``. The request's ``model`` names the adapter, or the base by its
name. Every error is a 4xx (or 503 when overloaded) with OpenAI's body ``{"error": {"message", "type", "param",
"code"}}``.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from unipeft.serve.engine import Draining, Engine, GenRequest, QueueFull
from unipeft.serve.registry import AdapterError


# ---------------------------------------------------------------------------------------------------- schemas
class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=2 ** 63 - 1)
    n: int = Field(default=1, ge=1, le=8)
    stream: bool = False


class CompletionRequest(_Sampling):
    prompt: str = Field(max_length=100_000)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=100_000)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)


class LoadAdapterRequest(BaseModel):
    lora_name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\-]+$")
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadAdapterRequest(BaseModel):
    lora_name: str = Field(min_length=1, max_length=128)


class APIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}


_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
          409: "conflict_error", 503: "service_unavailable", 507: "insufficient_storage"}


def _error(status: int, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param,
                      "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


# ---------------------------------------------------------------------------------------------------- metrics
class Metrics:
    """The server's Prometheus metrics (one registry per app)."""

    def __init__(self, engine: Engine) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("unipeft_requests", "HTTP generation requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("unipeft_prompt_tokens", "prompt tokens processed", registry=r)
        self.generation_tokens = Counter("unipeft_generation_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("unipeft_time_to_first_token_seconds", "time from arrival to the first token",
                              buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30), registry=r)
        self.tpot = Histogram("unipeft_time_per_output_token_seconds", "time between two output tokens",
                              buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5), registry=r)
        self.step_rows = Histogram("unipeft_batch_size", "rows decoded together in one step",
                                   buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.prefill_rows = Histogram("unipeft_prefill_size", "requests prefilled together in one forward",
                                      buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        Gauge("unipeft_queue_depth", "requests waiting to join the batch",
              registry=r).set_function(lambda: engine.queue_depth)
        Gauge("unipeft_running", "sequences in the running batch", registry=r).set_function(lambda: engine.batch_size)
        Gauge("unipeft_adapters_loaded", "adapters resident", registry=r).set_function(
            lambda: len(engine.registry.entries))


# ---------------------------------------------------------------------------------------------------- the app
def create_app(engine: Engine, tokenizer: Any, *, base_name: str, max_tokens: int, max_context: int,
               api_key: str | None = None, admin_key: str | None = None) -> FastAPI:
    """The FastAPI app serving ``engine`` (see the module docstring)."""
    app = FastAPI(title="unipeft serve", version="1", docs_url=None, redoc_url=None)
    metrics = Metrics(engine)
    dtype = str(next(engine.model.parameters()).dtype).removeprefix("torch.")
    engine.on_step = lambda rows: metrics.step_rows.observe(rows)
    engine.on_prefill = lambda rows: metrics.prefill_rows.observe(rows)
    eos = tuple(t for t in {tokenizer.eos_token_id, getattr(tokenizer, "pad_token_id", None)} if t is not None) \
        if getattr(tokenizer, "eos_token_id", None) is not None else ()

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        return _error(err.status, err.message, err.param, err.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        return _error(400, f"invalid {param or 'request'}: {first.get('msg', 'bad value')}", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return _error(err.status_code, str(err.detail))

    def _check_key(request: Request, allowed: tuple[str | None, ...]) -> None:
        keys = [k for k in allowed if k]
        if not keys:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not any(secrets.compare_digest(given.encode(), k.encode()) for k in keys):
            raise APIError(401, "missing or wrong API key (Authorization: Bearer <key>)")

    def user(request: Request) -> None:
        if api_key:  # the admin key also opens what the API key opens
            _check_key(request, (api_key, admin_key))

    def admin(request: Request) -> None:
        _check_key(request, (admin_key,) if admin_key else (api_key,))

    def _adapter(name: str) -> str | None:
        if name == base_name:
            return None
        if name in engine.registry.entries or engine.registry.findable(name) is not None:
            return name
        raise APIError(404, f"the model {name!r} does not exist; available: "
                            f"{', '.join([base_name, *engine.registry.names()])}", "model")

    # --------------------------------------------------------------------------------------------- generation
    def _requests(body: _Sampling, prompt_ids: list[int], emit_for: Any) -> list[GenRequest]:
        if not prompt_ids:
            raise APIError(400, "the prompt is empty", "prompt")
        limit = body.max_tokens if body.max_tokens is not None else max_tokens
        if limit > max_tokens:
            raise APIError(400, f"max_tokens={limit} is above this server's limit of {max_tokens}", "max_tokens")
        if len(prompt_ids) + limit > max_context:
            raise APIError(400, f"this model's context is {max_context} tokens; the prompt has {len(prompt_ids)} "
                                f"and max_tokens asks for {limit} more", "max_tokens")
        stops = _stops(body)
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "stop takes up to 4 non-empty strings", "stop")
        adapter = _adapter(body.model)
        check = (lambda ids: any(s in tokenizer.decode(ids, skip_special_tokens=True) for s in stops)) \
            if stops else None
        return [GenRequest(prompt=prompt_ids, adapter=adapter, max_tokens=limit, emit=emit_for(i),
                           temperature=body.temperature, top_p=body.top_p,
                           seed=None if body.seed is None else body.seed + i, stop_ids=eos, stop_check=check)
                for i in range(body.n)]

    async def _generate(request: Request, body: _Sampling, prompt_ids: list[int], kind: str) -> Response:
        loop = asyncio.get_running_loop()
        queues = [asyncio.Queue() for _ in range(body.n)]

        def emit_for(i: int) -> Any:
            return lambda event: loop.call_soon_threadsafe(queues[i].put_nowait, (event, time.monotonic()))

        reqs = _requests(body, prompt_ids, emit_for)
        stops = _stops(body)
        endpoint = "chat" if kind == "chat.completion" else "completions"
        try:
            for r in reqs:
                engine.submit(r)
        except QueueFull as err:
            for r in reqs:
                r.cancel()
            metrics.requests.labels(endpoint, "503").inc()
            raise APIError(503, f"{err}; retry later", None, {"Retry-After": "1"}) from None
        except Draining as err:
            metrics.requests.labels(endpoint, "503").inc()
            raise APIError(503, str(err), None, {"Retry-After": "5"}) from None
        metrics.prompt_tokens.inc(len(prompt_ids) * body.n)
        rid = f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        states = [_Decoded(tokenizer, stops) for _ in reqs]

        async def events(i: int) -> AsyncIterator[tuple[str, Any]]:
            last = reqs[i].submitted
            first = True
            while True:
                (event, at) = await queues[i].get()
                if event[0] == "token":
                    (metrics.ttft if first else metrics.tpot).observe(at - last)
                    first, last = False, at
                    metrics.generation_tokens.inc()
                yield event
                if event[0] in ("done", "error"):
                    return

        def _choice(i: int, text: str, finish: str | None, delta: bool) -> dict[str, Any]:
            if kind == "chat.completion":
                key = "delta" if delta else "message"
                content = {"role": "assistant", "content": text} if not delta or text or finish is None else {}
                return {"index": i, key: content, "finish_reason": finish}
            return {"index": i, "text": text, "finish_reason": finish, "logprobs": None}

        if body.stream:
            async def stream() -> AsyncIterator[bytes]:
                merged: asyncio.Queue = asyncio.Queue()

                async def pump(i: int) -> None:
                    async for event in events(i):
                        await merged.put((i, event))

                tasks = [asyncio.create_task(pump(i)) for i in range(len(reqs))]
                open_rows = len(reqs)
                try:
                    while open_rows:
                        i, event = await merged.get()
                        if event[0] == "error":
                            err = event[1]
                            yield _sse({"error": {"message": str(err), "type": "server_error", "code": err.status}})
                            open_rows -= 1
                            continue
                        if event[0] == "token":
                            text = states[i].add(event[1])
                            finish = None
                        else:
                            text, finish = states[i].flush(), event[1]
                            open_rows -= 1
                        if text or finish:
                            yield _sse({"id": rid, "object": f"{kind}.chunk" if kind == "chat.completion"
                                        else "text_completion", "created": created, "model": body.model,
                                        "choices": [_choice(i, text, finish, True)]})
                    usage = _usage(len(prompt_ids), states)
                    yield _sse({"id": rid, "object": f"{kind}.chunk" if kind == "chat.completion"
                                else "text_completion", "created": created, "model": body.model, "choices": [],
                                "usage": usage})
                    yield b"data: [DONE]\n\n"
                    metrics.requests.labels(endpoint, "200").inc()
                finally:  # the client went away, or the stream ended: nothing keeps running for it
                    for r in reqs:
                        r.cancel()
                    for t in tasks:
                        t.cancel()

            return StreamingResponse(stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        finishes: list[str] = ["stop"] * len(reqs)
        try:
            for i in range(len(reqs)):
                events_iter = events(i)
                while True:
                    task = asyncio.ensure_future(events_iter.__anext__())
                    while not task.done():
                        done, _ = await asyncio.wait({task}, timeout=0.25)
                        if not done and await request.is_disconnected():  # abandoned: stop generating for it
                            task.cancel()
                            return Response(status_code=499)
                    try:
                        event = task.result()
                    except StopAsyncIteration:
                        break
                    if event[0] == "token":
                        states[i].add(event[1])
                    elif event[0] == "done":
                        finishes[i] = event[1]
                    else:
                        raise APIError(event[1].status, str(event[1]), event[1].param)
        finally:
            for r in reqs:
                r.cancel()
        metrics.requests.labels(endpoint, "200").inc()
        choices = [_choice(i, states[i].text(), finishes[i], False) for i in range(len(reqs))]
        return JSONResponse({"id": rid, "object": kind if kind == "chat.completion" else "text_completion",
                             "created": created, "model": body.model, "choices": choices,
                             "usage": _usage(len(prompt_ids), states)})

    @app.post("/v1/completions", dependencies=[Depends(user)])
    async def completions(request: Request, body: CompletionRequest) -> Response:
        ids = tokenizer(body.prompt, add_special_tokens=True)["input_ids"]
        return await _generate(request, body, ids, "text_completion")

    @app.post("/v1/chat/completions", dependencies=[Depends(user)])
    async def chat(request: Request, body: ChatRequest) -> Response:
        if getattr(tokenizer, "chat_template", None) is None:
            raise APIError(400, "this model has no chat template; use /v1/completions", "messages")
        messages = [{"role": m.role, "content": m.content} for m in body.messages]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        return await _generate(request, body, ids, "chat.completion")

    # --------------------------------------------------------------------------------------------- adapters
    @app.get("/v1/models", dependencies=[Depends(user)])
    async def models() -> dict[str, Any]:
        created = int(time.time())
        data = [{"id": base_name, "object": "model", "created": created, "owned_by": "unipeft", "root": base_name,
                 "parent": None}]
        data += [{"id": e.name, "object": "model", "created": created, "owned_by": "unipeft", "root": e.path,
                  "parent": base_name} for e in list(engine.registry.entries.values())]
        return {"object": "list", "data": data}

    @app.post("/v1/load_lora_adapter", dependencies=[Depends(admin)])
    async def load_adapter(body: LoadAdapterRequest) -> PlainTextResponse:
        if body.lora_name == base_name:
            raise APIError(400, f"{base_name!r} is the base model's name", "lora_name")
        try:
            await asyncio.to_thread(engine.call, lambda: engine.registry.load(body.lora_name, body.lora_path))
        except AdapterError as err:
            raise APIError(err.status, str(err), err.param) from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", dependencies=[Depends(admin)])
    async def unload_adapter(body: UnloadAdapterRequest) -> PlainTextResponse:
        try:
            await asyncio.to_thread(engine.call, lambda: engine.registry.unload(body.lora_name))
        except AdapterError as err:
            raise APIError(err.status, str(err), "lora_name") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    # --------------------------------------------------------------------------------------------- operations
    @app.get("/health")
    async def health() -> Response:
        if engine.draining:
            return _error(503, "shutting down", None, {"Retry-After": "5"})
        return JSONResponse({"status": "ok", "running": engine.batch_size, "waiting": engine.queue_depth,
                             "device": str(engine.device), "dtype": dtype})

    @app.get("/metrics", dependencies=[Depends(user)])
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def playground() -> HTMLResponse:
        return HTMLResponse((resources.files("unipeft.serve") / "playground.html").read_text(encoding="utf-8"))

    app.state.engine = engine
    app.state.metrics = metrics
    return app


class _Decoded:
    """The text of one output so far, released in pieces that never split a character or run into a stop string."""

    def __init__(self, tokenizer: Any, stops: list[str]) -> None:
        self.tokenizer, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.sent = 0

    def _decode(self) -> tuple[str, bool]:
        """The text so far, cut at the first stop string, and whether a stop string was found."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((text.find(s) for s in self.stops if s in text), default=-1)
        return (text[:cut], True) if cut >= 0 else (text, False)

    def text(self) -> str:
        return self._decode()[0]

    def add(self, token: int) -> str:
        self.ids.append(token)
        text, stopped = self._decode()
        hold = 0 if stopped else max((len(s) - 1 for s in self.stops), default=0)  # a stop may still be forming
        ready = len(text) - hold
        if text.endswith("\ufffd"):
            ready = min(ready, len(text) - 1)
        out = text[self.sent:max(ready, self.sent)]
        self.sent += len(out)
        return out

    def flush(self) -> str:
        text = self.text()
        out = text[self.sent:]
        self.sent = len(text)
        return out


def _stops(body: _Sampling) -> list[str]:
    """The request's stop strings as a list."""
    return [body.stop] if isinstance(body.stop, str) else list(body.stop or [])


def _usage(prompt: int, states: list[_Decoded]) -> dict[str, int]:
    completion = sum(len(s.ids) for s in states)
    return {"prompt_tokens": prompt * len(states), "completion_tokens": completion,
            "total_tokens": prompt * len(states) + completion}


def _sse(data: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


__all__ = ["create_app", "CompletionRequest", "ChatRequest"]
