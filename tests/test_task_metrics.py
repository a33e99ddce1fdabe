"""Task metrics against hand-computed values; the headline-metric choice per task."""

import math

import numpy as np
import pytest

from lamda_peft.tasks import metrics as M


def test_classification_metrics_by_hand():
    # labels 0 0 1 1 2, predictions 0 1 1 1 2: accuracy 4/5; per-class F1 2/3, 4/5, 1.
    logits = np.eye(3)[[0, 1, 1, 1, 2]]
    m = M.classification_metrics(logits, np.array([0, 0, 1, 1, 2]))
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8 + 1) / 3)
    # binary: TP 1, TN 2, FP 0, FN 1 -> (1*2 - 0*1) / sqrt(1 * 2 * 2 * 3)
    m = M.classification_metrics(np.eye(2)[[1, 0, 0, 0]], np.array([1, 1, 0, 0]))
    assert m["matthews"] == pytest.approx(2 / math.sqrt(12))


def test_regression_metrics_by_hand():
    # deviations (-1.5, -.5, .5, 1.5) and (-3.25, -1.25, .75, 3.75): cov 11.5, ss 5 and 26.75
    m = M.regression_metrics(np.array([[1.0], [2.0], [3.0], [4.0]]), np.array([2.0, 4.0, 6.0, 9.0]))
    assert m["pearson"] == pytest.approx(11.5 / math.sqrt(5 * 26.75))
    assert m["spearman"] == pytest.approx(1.0)
    assert m["mse"] == pytest.approx((1 + 4 + 9 + 25) / 4)
    # rank differences 0, 1, -1, 0: rho = 1 - 6 * 2 / (4 * (16 - 1))
    assert M.regression_metrics(np.array([1, 3, 2, 4]), np.array([1, 2, 3, 4]))["spearman"] == pytest.approx(0.8)
    assert math.isnan(M.regression_metrics(np.ones(4), np.arange(4))["pearson"])  # constant: undefined


def test_rouge_by_hand():
    # 3 of the reference's 6 unigrams, 2 of its 5 bigrams, LCS 3; precision 1 throughout.
    r = M.rouge_scores(["the cat sat"], ["the cat sat on the mat"])
    assert r["rouge1"] == pytest.approx(2 * 0.5 / 1.5)
    assert r["rouge2"] == pytest.approx(2 * 0.4 / 1.4)
    assert r["rougeL"] == pytest.approx(2 * 0.5 / 1.5)
    assert M.rouge_scores(["a b", "x"], ["a b", "y"])["rouge1"] == pytest.approx(0.5)  # mean over rows


def test_bleu_by_hand():
    # n-gram precisions 3/4, 2/3, 1/2, 0/1 (sacrebleu's 'exp' smoothing makes the 0 into 1/2), no brevity penalty
    assert M.bleu(["a b c d"], ["a b c e"]) == pytest.approx(100 * (0.75 * (2 / 3) * 0.5 * 0.5) ** 0.25, rel=1e-6)
    assert M.bleu(["same words here ok"], ["same words here ok"]) == pytest.approx(100.0)


def test_answer_extraction_and_exact_match():
    assert M.extract_answer("so 3 + 4 = 7\n#### 1,000.") == "1000"
    assert M.extract_answer("#### 5 then #### -2.5") == "-2.5"  # the last one
    assert M.extract_answer("no marker 12") is None
    refs = ["She has 5 apples.\n#### 72", "#### 1,000", "#### 3"]
    preds = ["work... #### 72", "#### 1000", "the answer is 3"]
    assert M.exact_match(preds, refs) == pytest.approx(2 / 3)
    assert M.exact_match(["The answer is 3."], ["answer is 3"], r"answer is (\d+)") == 1.0
    assert M.exact_match([" Paris "], ["Paris"]) == 1.0  # free text: the whole stripped string


def test_metric_choice():
    assert M.resolve_metric("classification", "auto") == "accuracy"
    assert M.resolve_metric("classification", "matthews") == "matthews"
    assert M.resolve_metric("regression", "auto") == "pearson"
    assert M.resolve_metric("seq2seq", "auto") == "rougeL"
    assert M.resolve_metric("causal-lm", "auto") == "perplexity"
    assert M.resolve_metric("causal-lm", "auto", eval_generate=True) == "exact_match"
    with pytest.raises(ValueError, match=r"'rouge1' is not reported for --task classification"):
        M.resolve_metric("classification", "rouge1")
    with pytest.raises(ValueError, match="need --eval-generate"):
        M.resolve_metric("causal-lm", "bleu")
