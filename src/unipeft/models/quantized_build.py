"""Building a large model with a quantized base without ever holding its full-precision weights.

QLoRA (Dettmers et al. 2023, arXiv 2305.14314) trains LoRA factors on a frozen base stored as 4-bit NormalFloat
codes: each block of 64 weights w is stored as ``q_i = argmin_j |w_i / absmax(w) - c_j|`` over the 16 NF4 levels c_j,
with ``absmax`` itself quantized to 8 bits with a second scale per 256 blocks (double quantization). A 33B base is
~17 GB in NF4 but 130 GB in float32, so it must never exist in float32: :func:`build_quantized_model` builds the
model on the ``meta`` device (shapes, no storage), then materialises it module by module. Each linear layer of the
body gets its weights (seeded random, N(0, σ²) with σ = ``config.initializer_range``) generated a slice of rows at a
time, and each slice is quantized at once into the layer's codes, so at most one slice of full-precision weights
(~1 MiB) exists at any moment. Embeddings, norms and output heads are materialised in the compute dtype, initialised
by the model's own ``_init_weights`` (as transformers does for weights a checkpoint lacks; this also fills the rotary
embedding's buffers).

The codes are exactly bitsandbytes' (``bnb.functional.quantize_4bit`` / ``int8_vectorwise_quant`` on the whole
matrix): 4-bit blocks and int8 rows are independent, so quantizing block- or row-aligned slices and joining them
gives the same codes and scales, and the double quantization of the block scales runs once on the joined scales as
bitsandbytes does. Random weights stand in for a checkpoint here; a loader reading one shard at a time would plug
in where the slices are drawn.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from torch import nn
from transformers import PretrainedConfig

from .configs import KNOWN_CONFIGS, ModelKind, build_meta_model, known_config

logger = logging.getLogger(__name__)

#: Quantizations of the base's linear layers: NF4 / FP4 4-bit blocks (``Linear4bit``) or LLM.int8() (``Linear8bitLt``).
BUILD_QUANTIZATIONS: tuple[str, ...] = ("nf4", "fp4", "int8")
#: Output layers kept in the compute dtype (as :func:`unipeft.models.load_model` keeps them).
FLOAT_HEADS: tuple[str, ...] = ("classifier", "score", "qa_outputs", "lm_head")
#: Full-precision elements drawn and quantized at a time (a 1 MiB float32 slice: fastest here, cache-sized).
SLICE_ELEMENTS = 1 << 18

RowSource = Callable[[int, int], torch.Tensor]
"""``rows(start, stop)`` → the float rows ``start:stop`` of an (out, in) weight."""


def _row_step(in_features: int, blocksize: int) -> int:
    """Rows per slice: about :data:`SLICE_ELEMENTS` elements, a whole number of ``blocksize`` blocks."""
    aligned = blocksize // math.gcd(in_features, blocksize)  # the fewest rows holding whole blocks
    return max(aligned, SLICE_ELEMENTS // in_features // aligned * aligned)


def quantize_4bit_rows(rows: RowSource, out_features: int, in_features: int, *, quant_type: str = "nf4",
                       blocksize: int = 64, compress_statistics: bool = True,
                       dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, object]:
    """Quantize an (out, in) weight to bitsandbytes 4-bit codes, drawing it a slice of rows at a time.

    Args:
        rows: gives rows ``start:stop`` of the float weight; called once per slice, in order.
        out_features, in_features: the weight's shape.
        quant_type: ``nf4`` or ``fp4``.
        blocksize: weights per absmax block (bitsandbytes' default 64).
        compress_statistics: double quantization of the block scales (QLoRA).
        dtype: the dtype the weight dequantizes to (the layer's compute dtype).

    Returns:
        ``(packed, quant_state)``: uint8 codes of shape (out·in/2, 1) and a ``QuantState``, equal to
        ``bnb.functional.quantize_4bit`` of the whole weight.
    """
    import bitsandbytes.functional as F

    n = out_features * in_features
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8)
    absmax = torch.empty(math.ceil(n / blocksize), dtype=torch.float32)
    step = _row_step(in_features, blocksize)
    for start in range(0, out_features, step):
        stop = min(start + step, out_features)
        codes, scales = torch.ops.bitsandbytes.quantize_4bit.default(rows(start, stop).contiguous(), blocksize,
                                                                    quant_type, torch.uint8)
        first = start * in_features  # block-aligned (see _row_step)
        packed[first // 2: first // 2 + codes.shape[0]] = codes
        absmax[first // blocksize: first // blocksize + scales.numel()] = scales
    code = F.get_4bit_type(quant_type, device=packed.device)
    shape = torch.Size((out_features, in_features))
    if not compress_statistics:
        return packed, F.QuantState(absmax=absmax, shape=shape, dtype=dtype, blocksize=blocksize, code=code,
                                    quant_type=quant_type)
    offset = absmax.mean()
    qabsmax, state2 = F.quantize_blockwise(absmax - offset, blocksize=256)
    return packed, F.QuantState(absmax=qabsmax, shape=shape, dtype=dtype, blocksize=blocksize, code=code,
                                quant_type=quant_type, offset=offset, state2=state2)


def quantize_int8_rows(rows: RowSource, out_features: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LLM.int8() codes of an (out, in) weight drawn a slice of rows at a time: int8 (out, in) and one float32
    absmax scale per row, equal to bitsandbytes' ``Int8Params`` quantization of the whole weight."""
    import bitsandbytes.functional as F

    codes = torch.empty((out_features, in_features), dtype=torch.int8)
    scales = torch.empty(out_features, dtype=torch.float32)
    step = _row_step(in_features, 1)
    for start in range(0, out_features, step):
        stop = min(start + step, out_features)
        cb, scb, _ = F.int8_vectorwise_quant(rows(start, stop).to(torch.float16))
        codes[start:stop], scales[start:stop] = cb, scb
    return codes, scales


def _quantized_linear(linear: nn.Linear, rows: RowSource, quantization: str, compute_dtype: torch.dtype,
                      double_quant: bool) -> nn.Module:
    """A bitsandbytes layer of ``linear``'s shape holding the quantized ``rows`` (bias zero, in compute dtype)."""
    import bitsandbytes as bnb

    out_f, in_f, has_bias = linear.out_features, linear.in_features, linear.bias is not None
    if quantization == "int8":
        layer = bnb.nn.Linear8bitLt(in_f, out_f, bias=has_bias, has_fp16_weights=False, threshold=6.0, device="meta")
        codes, scales = quantize_int8_rows(rows, out_f, in_f)
        layer.weight = bnb.nn.Int8Params(codes, requires_grad=False, has_fp16_weights=False, CB=codes, SCB=scales)
    else:
        layer = bnb.nn.Linear4bit(in_f, out_f, bias=has_bias, compute_dtype=compute_dtype,
                                  compress_statistics=double_quant, quant_type=quantization, device="meta")
        packed, state = quantize_4bit_rows(rows, out_f, in_f, quant_type=quantization,
                                           compress_statistics=double_quant, dtype=compute_dtype)
        layer.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=state.blocksize,
                                         compress_statistics=double_quant, quant_type=quantization,
                                         quant_storage=torch.uint8, module=layer, bnb_quantized=True)
        layer.quant_state = state
    if has_bias:
        layer.bias = nn.Parameter(torch.zeros(out_f, dtype=compute_dtype))
    return layer


def _materialise_(model: nn.Module, module: nn.Module, dtype: torch.dtype) -> None:
    """Give ``module``'s own meta tensors storage (parameters in ``dtype``, buffers in theirs) and initialise them
    with the model's ``_init_weights``."""
    for name, param in module.named_parameters(recurse=False):
        if param.is_meta:
            fresh = torch.empty(param.shape, dtype=dtype)
            setattr(module, name, nn.Parameter(fresh, requires_grad=param.requires_grad))
    for name, buffer in module.named_buffers(recurse=False):
        if buffer.is_meta:
            module._buffers[name] = torch.empty(buffer.shape, dtype=buffer.dtype)
    with torch.no_grad():
        model._init_weights(module)


def _check_arguments(quantization: str, compute_dtype: torch.dtype) -> None:
    if quantization not in BUILD_QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; valid: {', '.join(BUILD_QUANTIZATIONS)}")
    if compute_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"unsupported compute_dtype {compute_dtype}; valid: torch.float32, torch.bfloat16, "
                         "torch.float16")


def build_quantized_model(
    name_or_config: str | PretrainedConfig,
    *,
    quantization: str = "nf4",
    compute_dtype: torch.dtype = torch.float32,
    double_quant: bool = True,
    seed: int = 0,
    kind: ModelKind = "causal_lm",
) -> nn.Module:
    """Build a randomly initialised model whose linear layers are quantized while it is built (see the module
    docstring): the full-precision weights of the quantized layers never exist beyond one ~1 MiB slice.

    Args:
        name_or_config: a name in :data:`~unipeft.models.configs.KNOWN_CONFIGS` (``llama-7b``, ``llama-33b``, ...)
            or a transformers config.
        quantization: ``nf4`` / ``fp4`` (bitsandbytes ``Linear4bit``) or ``int8`` (``Linear8bitLt``) for every
            linear layer except the output heads (:data:`FLOAT_HEADS`).
        compute_dtype: dtype of the embeddings, norms and heads, and the 4-bit layers' compute dtype.
        double_quant: with a 4-bit base, quantize the block scales too.
        seed: seeds every weight; the same seed gives the same model. The global RNG state is left untouched.
        kind: which head to build (see :data:`~unipeft.models.configs.ModelKind`).

    Returns:
        The model on the CPU, in eval mode; ready for ``unipeft.attach`` (QLoRA).

    Raises:
        ValueError: for an unknown name, quantization, compute dtype or kind.
        ImportError: if bitsandbytes is not installed.
    """
    _check_arguments(quantization, compute_dtype)
    if isinstance(name_or_config, str):
        if name_or_config not in KNOWN_CONFIGS:
            raise ValueError(f"no known config {name_or_config!r}; known: {', '.join(KNOWN_CONFIGS)}")
        config = known_config(name_or_config)
    else:
        config = name_or_config
    import bitsandbytes  # noqa: F401  (fail before building when it is missing)

    model = build_meta_model(config, kind)
    std = float(getattr(config, "initializer_range", 0.02) or 0.02)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, module in list(model.named_modules()):
            parent_name, _, attr = name.rpartition(".")
            if type(module) is nn.Linear and attr not in FLOAT_HEADS:
                def rows(start: int, stop: int, width: int = module.in_features) -> torch.Tensor:
                    return torch.empty(stop - start, width).normal_(0.0, std)

                layer = _quantized_linear(module, rows, quantization, compute_dtype, double_quant)
                setattr(model.get_submodule(parent_name), attr, layer)
            elif any(t.is_meta for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]):
                _materialise_(model, module, compute_dtype)
        if getattr(config, "tie_word_embeddings", False):
            model.tie_weights()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{type(model).__name__}: tensors left on the meta device after building: {left[:5]}")
    logger.info("built %s with a %s base (double quant %s)", type(model).__name__, quantization, double_quant)
    return model.eval()


__all__ = ["BUILD_QUANTIZATIONS", "FLOAT_HEADS", "build_quantized_model", "quantize_4bit_rows", "quantize_int8_rows"]
