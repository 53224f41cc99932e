"""``torch.compile`` on adapted models: compiled forward and backward equal eager, the whole model compiles to one
graph (no graph break from the adapter sites), and changing the active or merged adapters is seen by the compiled
model (dynamo's guards recompile it instead of replaying a stale graph).

Compiling costs seconds even for a tiny model (TorchDynamo + AOTAutograd tracing); the default tests use the
``aot_eager`` / ``eager`` backends, which trace exactly as inductor does but skip code generation. Inductor itself
(C++ code generation, ~1-2 minutes here) runs in the slow tests.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import unipeft


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def one_layer_llama(tiny) -> torch.nn.Module:
    """The tiny LLaMA with one layer: dynamo unrolls the layers, so this halves the tracing time."""
    import transformers

    config = tiny.config("llama")
    config.num_hidden_layers = 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(config).eval()


def forward_backward(model, batch: dict, params: list[torch.nn.Parameter]) -> tuple[torch.Tensor, list]:
    """Logits and the gradients of ``params`` (None for a parameter the loss does not reach: a prefix's stored
    keys/values while its reparameterisation trains)."""
    for p in params:
        p.grad = None
    out = model(**batch)
    out.loss.backward()
    return out.logits.detach(), [None if p.grad is None else p.grad.clone() for p in params]


def check_compiled_equals_eager(tiny, randomize, recipe: str, backend: str) -> None:
    model = one_layer_llama(tiny)
    peft = unipeft.attach(model, recipe)
    randomize(peft, std=0.1)
    model.train()
    batch = tiny.batch("llama")
    params = [p for p in peft.trainable_parameters()]
    eager_logits, eager_grads = forward_backward(model, batch, params)
    compiled = torch.compile(model, backend=backend, fullgraph=True)  # fullgraph: a graph break is an error
    logits, grads = forward_backward(compiled, batch, params)
    torch.testing.assert_close(logits, eager_logits, rtol=1e-5, atol=1e-5)
    assert [g is None for g in grads] == [e is None for e in eager_grads]
    used = [(g, e) for g, e in zip(grads, eager_grads) if e is not None]
    assert any(e.abs().sum() > 0 for _, e in used)
    for grad, eager in used:
        torch.testing.assert_close(grad, eager, rtol=1e-4, atol=1e-6)


def test_compiled_lora_forward_and_backward_equal_eager(tiny, randomize):
    check_compiled_equals_eager(tiny, randomize, "lora", backend="aot_eager")


def test_compiled_model_follows_adapter_changes(tiny, randomize):
    model = one_layer_llama(tiny)
    peft = unipeft.attach(model, "lora", name="a")
    peft.add("ia3", "b")
    randomize(peft, std=0.2)
    batch = {"input_ids": tiny.batch("llama")["input_ids"]}
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    for change in (lambda: peft.set_active("a"), lambda: peft.set_active("a", "b"), lambda: peft.merge("a"),
                   lambda: peft.set_active()):
        change()
        torch.testing.assert_close(tiny.logits(compiled, batch), tiny.logits(model, batch), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["lora", "prefix", "prompt", "ia3", "houlsby"])
def test_inductor_forward_and_backward_equal_eager(tiny, randomize, recipe):
    check_compiled_equals_eager(tiny, randomize, recipe, backend="inductor")
