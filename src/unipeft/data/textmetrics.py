"""Metrics of generated text against one or more references: corpus BLEU and ROUGE-L, both on a 0-100 scale.

- **BLEU** (Papineni et al. 2002) is sacrebleu's corpus BLEU (Post 2018, "A Call for Clarity in Reporting BLEU
  Scores") with its defaults: 13a tokenisation, exponential smoothing off, case-sensitive. Segments may have different
  numbers of references (E2E: every reference text of a meaning representation); missing ones are passed as ``None``,
  which sacrebleu ignores.
- **ROUGE-L** (Lin 2004) is the sentence-level F1 of the longest common subsequence ``LCS(h, r)``::

      P = LCS / |h|,  R = LCS / |r|,  F = 2PR / (P + R)

  over tokens made as Google's ``rouge-score`` makes them (lower-cased, every run of characters other than ``a-z0-9``
  is a separator, no stemming). With several references a segment scores the best F over them (``rouge-score``'s
  ``score_multi``); the corpus score is the mean over segments.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_NON_ALNUM = re.compile(r"[^a-z0-9]+")

#: Metrics computed from generated text (by :func:`text_metrics`).
TEXT_METRICS: tuple[str, ...] = ("bleu", "rouge_l")


def _check(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    if not hypotheses:
        raise ValueError("no hypotheses to score")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or not refs:
            raise ValueError(f"segment {i}: references must be a non-empty list of strings, got {refs!r}")


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (0-100) of ``hypotheses[i]`` against the references ``references[i]`` (one or more per segment).

    Raises:
        ValueError: different lengths, no hypotheses, or a segment without references.
    """
    import sacrebleu

    _check(hypotheses, references)
    most = max(len(refs) for refs in references)
    streams = [[refs[k] if k < len(refs) else None for refs in references] for k in range(most)]
    return float(sacrebleu.corpus_bleu(list(hypotheses), streams).score)  # type: ignore[arg-type]


def rouge_tokens(text: str) -> list[str]:
    """``rouge-score``'s default tokenisation: lower-case, split on every run of characters other than a-z and 0-9."""
    return [t for t in _NON_ALNUM.split(text.lower()) if t]


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists (dynamic programming, O(|a|·|b|))."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l_pair(hypothesis: str, reference: str) -> float:
    """ROUGE-L F1 (0-1) of one hypothesis against one reference; 0.0 if either has no tokens."""
    h, r = rouge_tokens(hypothesis), rouge_tokens(reference)
    if not h or not r:
        return 0.0
    lcs = lcs_length(h, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(h), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def rouge_l(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean over segments of the best ROUGE-L F1 against the segment's references, times 100.

    Raises:
        ValueError: different lengths, no hypotheses, or a segment without references.
    """
    _check(hypotheses, references)
    best = [max(rouge_l_pair(h, r) for r in refs) for h, refs in zip(hypotheses, references)]
    return 100.0 * sum(best) / len(best)


def text_metrics(names: Sequence[str], hypotheses: Sequence[str],
                 references: Sequence[Sequence[str]]) -> dict[str, float]:
    """The named text metrics (``bleu``, ``rouge_l``) of a corpus.

    Raises:
        ValueError: an unknown metric (the message lists the valid ones) or bad inputs.
    """
    functions = {"bleu": bleu, "rouge_l": rouge_l}
    out = {}
    for name in names:
        if name not in functions:
            raise ValueError(f"unknown text metric {name!r}; valid: {', '.join(TEXT_METRICS)}")
        out[name] = functions[name](hypotheses, references)
    return out


__all__ = ["TEXT_METRICS", "bleu", "rouge_l", "rouge_l_pair", "rouge_tokens", "lcs_length", "text_metrics"]
