"""Prefix tuning (Li & Liang 2021, arXiv 2101.00190) and P-tuning v2's deep prompts (Liu et al. 2022, arXiv 2110.07602).

Each attention block gets l trainable key and value vectors in front of its own:

    head = softmax(x W_q [P_k ; C W_k]ᵀ / √d) [P_v ; C W_v],     P_k, P_v ∈ R^{l × d_kv}

which He et al. (2022, arXiv 2110.04366) rewrite as a gated parallel delta on the head's output,
h ← (1 − λ(x)) h + λ(x) softmax(x W_q P_kᵀ) P_v. Positions ``attn`` and ``xattn`` (cross-attention, where He et al.
put prefixes in encoder-decoder models); the keys and values are extended through transformers' attention interface
(:mod:`unipeft.sequence.attention`), so it works in training and in generation with a KV cache.

Reparameterisation (``reparam: h``, Li & Liang's training recipe, HF peft's ``prefix_projection=True``): during
training P = MLP(E) = tanh(E W_1 + b_1) W_2 + b_2 with E ∈ R^{l × d_kv}. E and the first layer are shared by every
block of the delta (as in Li & Liang's code, with one MLP whose output layer holds all blocks' rows); each block has
its own output rows W_2 ∈ R^{h × 2 d_kv}. The MLP is training-only: ``state_dict()`` first folds its current output
into ``key``/``value`` (exactly: the output does not change) and leaves the MLP out, so a saved adapter holds only
2·l·d_kv numbers per block, and ``summary()`` counts those, reporting the MLP separately as training-only. A loaded
adapter computes the saved prefix exactly; training it further continues through a freshly initialised MLP as a
residual on top. With ``reparam: null`` P is trained directly (P-tuning v2, and HF peft's default).

Positions: the real tokens sit after the prefix, at l..l+T−1 (position ids given are shifted by l), as in Li & Liang's
GPT-2 code and HF peft, which feed P as a pre-filled KV cache (:mod:`unipeft.sequence.shift`); so a prefix gives HF
peft's logits and generations exactly, with either padding side (tests/methods/test_prefix.py). ``shift_positions:
false`` keeps the plain model's 0..T−1 instead (the full learned-position range for real tokens; such a prefix has no
HF peft equivalent). Deliberate differences from HF peft's ``PrefixTuningConfig``:

* T5's relative position bias is 0 for the prefix columns (HF peft's cache puts the prefix at relative positions);
* cross-attention blocks can take prefixes too (``xattn``).

Not mergeable (a prefix is not a weight update); not the identity at init (the prefix takes part of the attention).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from unipeft.core.delta import Form, SiteShape, register_form
from unipeft.sequence.attention import attention_dims, attention_module, bind_prefix
from unipeft.core.sequence import SequenceForm, SequenceFormConfig
from unipeft.sequence.shift import bind_shift

if TYPE_CHECKING:
    from unipeft.core.positions import Site
    from unipeft.core.recipe import DeltaSpec
    from unipeft.core.site import DeltaSite, Placed

COMPOSITIONS = ("add", "gated")


@register_form("prefix")
@dataclass(frozen=True, kw_only=True)
class PrefixConfig(SequenceFormConfig):
    """Hyperparameters of prefix tuning.

    Attributes:
        length: l, the number of prefix key/value vectors per attention block.
        reparam: hidden size h of the training-time MLP P = MLP(E); None trains P directly (P-tuning v2).
        shift_positions: number the real tokens after the prefix (l..l+T−1, Li & Liang's and HF peft's convention);
            false keeps 0..T−1.
    """

    length: int = 10
    reparam: int | None = 512
    shift_positions: bool = True

    def __post_init__(self) -> None:
        if self.length < 1:
            raise ValueError(f"prefix length must be >= 1, got {self.length}")
        if self.reparam is not None and self.reparam < 1:
            raise ValueError(f"prefix reparam (MLP hidden size) must be >= 1 or null, got {self.reparam}")

    def site_dims(self, model: nn.Module, site: "Site", spec: "DeltaSpec") -> tuple[int, int]:
        if spec.composition not in COMPOSITIONS:
            raise ValueError(f"a prefix supports composition {' or '.join(COMPOSITIONS)}, not {spec.composition!r}")
        return attention_dims(model, site)

    def build(self, shape: SiteShape) -> "Prefix":
        return Prefix(self, shape)

    def share(self, forms: list[Form]) -> None:
        """Tie E and the MLP's first layer across the blocks of this delta (one per width)."""
        trunks: dict[tuple[int, ...], PrefixTrunk] = {}
        for form in forms:
            if isinstance(form, Prefix) and form.trunk is not None:
                form.trunk = trunks.setdefault(tuple(form.trunk.embedding.shape), form.trunk)


class PrefixTrunk(nn.Module):
    """E ∈ R^{l × d} and the first layer of the reparameterising MLP: tanh(E W_1 + b_1), shared across blocks."""

    def __init__(self, length: int, width: int, hidden: int) -> None:
        super().__init__()
        self.embedding = nn.Parameter(torch.randn(length, width))  # N(0, 1), as HF peft's nn.Embedding
        self.down = nn.Linear(width, hidden)

    def forward(self) -> torch.Tensor:
        return torch.tanh(self.down(self.embedding))  # (l, h)


class Prefix(SequenceForm):
    """P_k, P_v ∈ R^{l × d_kv} for one attention block; ``forward()`` returns (P_k, P_v)."""

    def __init__(self, config: PrefixConfig, shape: SiteShape) -> None:
        super().__init__()
        length, width = config.length, shape.d_out
        self.key = nn.Parameter(torch.empty(length, width))  # (l, d_kv)
        self.value = nn.Parameter(torch.empty(length, width))
        self.trunk: PrefixTrunk | None = None
        self.up: nn.Linear | None = None
        self.shift_positions = config.shift_positions
        self._release: list[Any] = []
        if config.reparam is None:
            nn.init.normal_(self.key)  # N(0, 1), as HF peft's nn.Embedding
            nn.init.normal_(self.value)
            return
        nn.init.zeros_(self.key)
        nn.init.zeros_(self.value)
        self.trunk = PrefixTrunk(length, width, config.reparam)
        self.up = nn.Linear(config.reparam, 2 * width)
        # the MLP's output already folded into key/value (not saved): P = key + (MLP(E) − offset)
        self.register_buffer("offset", torch.zeros(2, length, width), persistent=False)
        self.register_state_dict_pre_hook(_fold_reparam)
        self.register_state_dict_post_hook(_drop_reparam)

    def reparameterised(self) -> torch.Tensor:
        """MLP(E) for this block: (2, l, d_kv), keys then values."""
        length, width = self.key.shape
        return self.up(self.trunk()).view(length, 2, width).transpose(0, 1)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.up is None:
            return self.key, self.value
        delta = self.reparameterised() - self.offset  # gradients reach E and the MLP only
        return self.key.detach() + delta[0], self.value.detach() + delta[1]

    def training_only_parameters(self) -> list[nn.Parameter]:
        """E and the MLP (left out of the saved adapter)."""
        if self.up is None:
            return []
        return [*self.trunk.parameters(), *self.up.parameters()]

    def bind(self, model: nn.Module, site: "Site", host: "DeltaSite", placed: "Placed") -> None:
        self._release.append(bind_prefix(model, site, host, placed))
        if self.shift_positions:
            self._release.append(bind_shift(model, attention_module(model, site), host, placed, self.key.shape[0]))

    def on_detach(self, base: nn.Module) -> None:
        while self._release:
            self._release.pop()()

    def extra_repr(self) -> str:
        length, width = self.key.shape
        return f"length={length}, width={width}, reparam={self.up.in_features if self.up is not None else None}"


def _fold_reparam(module: Prefix, prefix: str, keep_vars: bool) -> None:
    """State-dict pre-hook: key/value ← key/value + (MLP(E) − offset), offset ← MLP(E). The output is unchanged."""
    with torch.no_grad():
        fresh = module.reparameterised()
        delta = fresh - module.offset
        module.key.add_(delta[0])
        module.value.add_(delta[1])
        module.offset.copy_(fresh)


def _drop_reparam(module: Prefix, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """State-dict post-hook: leave the training-only MLP out."""
    for key in [k for k in state if k.startswith((f"{prefix}trunk.", f"{prefix}up."))]:
        del state[key]
