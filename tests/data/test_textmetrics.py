"""BLEU and ROUGE-L of generated text: hand-computed cases, sacrebleu itself and Google's rouge-score."""

from __future__ import annotations

import math

import pytest

from unipeft.data.textmetrics import bleu, lcs_length, rouge_l, rouge_l_pair, rouge_tokens, text_metrics


def test_bleu_identical_is_100():
    assert bleu(["the cat sat on the mat ."], [["the cat sat on the mat ."]]) == pytest.approx(100.0)


def test_bleu_hand_case_with_exp_smoothing():
    # p1 = 3/4, p2 = 2/3, p3 = 1/2, p4 = 0/1 -> sacrebleu's 'exp' smoothing makes it 1/2; equal lengths, BP = 1
    expected = 100 * (0.75 * (2 / 3) * 0.5 * 0.5) ** 0.25
    assert bleu(["a b c d"], [["a b c e"]]) == pytest.approx(expected, abs=1e-9)


def test_bleu_several_references_clip_against_the_best():
    # every 1-, 2- and 3-gram is in one of the references; the 4-gram in none: (1 * 1 * 1 * 1/2) ** (1/4)
    assert bleu(["a b c d"], [["a b c e", "x b c d"]]) == pytest.approx(100 * 0.5 ** 0.25, abs=1e-9)


def test_bleu_variable_reference_counts_match_sacrebleu():
    sacrebleu = pytest.importorskip("sacrebleu")
    hyps = ["the pub is near the river .", "Blue Spice is cheap", "a family friendly place in the centre"]
    refs = [["The pub is by the river .", "Near the river is a pub ."], ["Blue Spice is a cheap venue ."],
            ["A family friendly place in the city centre .", "It is family friendly .", "In the centre ."]]
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(3)]
    assert bleu(hyps, refs) == pytest.approx(sacrebleu.corpus_bleu(hyps, streams).score, abs=1e-12)


def test_rouge_tokens_and_lcs_by_hand():
    assert rouge_tokens("Hello, World! It's 3pm.") == ["hello", "world", "it", "s", "3pm"]
    assert lcs_length(list("abcbdab"), list("bdcaba")) == 4  # CLRS's example
    # h = the cat sat (3), r = the cat was sat here (5), LCS 3: P = 1, R = 0.6, F = 0.75
    assert rouge_l_pair("The cat sat", "the cat was sat here") == pytest.approx(0.75)
    assert rouge_l_pair("", "anything") == 0.0


def test_rouge_l_takes_the_best_reference_and_averages():
    score = rouge_l(["the cat sat", "x y"], [["a dog", "the cat was sat here"], ["x y"]])
    assert score == pytest.approx(100 * (0.75 + 1.0) / 2)


def test_rouge_l_matches_google_rouge_score():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    cases = [("The Vaults is a cheap pub near Café Adriatic.", ["The Vaults pub near Café Adriatic is cheap."]),
             ("Alimentum is not family-friendly, in the city centre", ["Alimentum is not a family-friendly place.",
                                                                      "In the city centre, Alimentum is for adults."]),
             ("Games provide new challenges for AI .", ["Games provide new challenges for AI in game theory ."])]
    for hyp, refs in cases:
        expected = max(scorer.score(r, hyp)["rougeL"].fmeasure for r in refs)
        assert rouge_l([hyp], [refs]) == pytest.approx(100 * expected, abs=1e-12)


def test_text_metrics_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown text metric 'meteor'; valid: bleu, rouge_l"):
        text_metrics(["meteor"], ["a"], [["a"]])
    with pytest.raises(ValueError, match="2 hypotheses but 1 reference lists"):
        bleu(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="segment 0: references must be a non-empty list"):
        rouge_l(["a"], [[]])
    assert math.isclose(text_metrics(["rouge_l"], ["a b"], [["a b"]])["rouge_l"], 100.0)
