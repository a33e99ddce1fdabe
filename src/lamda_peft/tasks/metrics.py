"""Evaluation metrics by task, all from the well-kept libraries (scikit-learn, scipy, rouge-score, sacrebleu).

| task            | metrics (keys of metrics.json)                          | default headline |
|-----------------|---------------------------------------------------------|------------------|
| classification  | accuracy, macro_f1, matthews                            | accuracy         |
| regression      | pearson, spearman, mse                                  | pearson          |
| seq2seq         | rouge1, rouge2, rougeL (F-measure, 0-1)                 | rougeL           |
| causal-lm       | perplexity; with --eval-generate exact_match, rougeL, bleu | exact_match (perplexity without) |

`--metric` picks the headline (`metrics["metric"]`, `metrics["score"]`); `HIGHER_IS_BETTER` says
which way it points. ROUGE and exact match are fractions in [0, 1]; BLEU is sacrebleu's 0-100 scale.
"""

from __future__ import annotations

import re

import numpy as np

TASK_METRICS = {
    "classification": ("accuracy", "macro_f1", "matthews"),
    "regression": ("pearson", "spearman", "mse"),
    "seq2seq": ("rouge1", "rouge2", "rougeL"),
    "causal-lm": ("perplexity", "exact_match", "rougeL", "bleu"),
}
DEFAULT_METRIC = {"classification": "accuracy", "regression": "pearson", "seq2seq": "rougeL"}
HIGHER_IS_BETTER = {"perplexity": False, "mse": False}

# GSM8K's reference answers end with "#### <number>".
GSM8K_ANSWER_REGEX = r"####\s*(-?[\d,]*\.?\d+)"


def default_metric(task: str, eval_generate: bool = False) -> str:
    """The headline metric of `task` when --metric is "auto"."""
    if task == "causal-lm":
        return "exact_match" if eval_generate else "perplexity"
    return DEFAULT_METRIC[task]


def resolve_metric(task: str, metric: str, eval_generate: bool = False) -> str:
    """`metric`, checked against what `task` reports ("auto" gives the task default).

    Raises:
        ValueError: the metric is not one that this task reports (message lists those it does).
    """
    if metric == "auto":
        return default_metric(task, eval_generate)
    available = TASK_METRICS[task]
    if task == "causal-lm" and not eval_generate:
        available = ("perplexity",)
    if metric not in available:
        hint = " (generation metrics need --eval-generate)" if task == "causal-lm" else ""
        raise ValueError(f"--metric {metric!r} is not reported for --task {task}; choose from {list(available)}{hint}")
    return metric


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """accuracy, macro-F1 and Matthews correlation of argmax(logits) (scikit-learn)."""
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    pred = np.asarray(logits).argmax(-1)
    return {
        "accuracy": float(accuracy_score(labels, pred)),
        "macro_f1": float(f1_score(labels, pred, average="macro")),
        "matthews": float(matthews_corrcoef(labels, pred)),
    }


def regression_metrics(predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Pearson and Spearman correlation (scipy) and mean squared error of one output per row.

    A constant prediction has no defined correlation: scipy returns NaN and so do we (JSON `NaN`).
    """
    from scipy.stats import pearsonr, spearmanr

    pred = np.asarray(predictions, dtype=np.float64).reshape(-1)
    gold = np.asarray(labels, dtype=np.float64).reshape(-1)
    if pred.shape != gold.shape:
        raise ValueError(f"{pred.size} predictions for {gold.size} labels")
    constant = np.ptp(pred) == 0 or np.ptp(gold) == 0  # scipy warns and returns NaN then
    return {
        "pearson": float("nan") if constant else float(pearsonr(pred, gold)[0]),
        "spearman": float("nan") if constant else float(spearmanr(pred, gold)[0]),
        "mse": float(np.mean((pred - gold) ** 2)),
    }


def trainer_compute_metrics(task: str):
    """A `Trainer` `compute_metrics` for evaluation during training (classification, regression), else None."""
    if task == "classification":
        return lambda p: classification_metrics(p.predictions, p.label_ids)
    if task == "regression":
        return lambda p: regression_metrics(p.predictions, p.label_ids)
    return None


def rouge_scores(predictions: list[str], references: list[str], kinds=("rouge1", "rouge2", "rougeL")) -> dict:
    """Mean ROUGE F-measures (rouge-score, Porter stemming as in the summarization papers)."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    scorer = rouge_scorer.RougeScorer(list(kinds), use_stemmer=True)
    totals = dict.fromkeys(kinds, 0.0)
    for pred, ref in zip(predictions, references, strict=True):
        scores = scorer.score(ref, pred)  # (target, prediction)
        for k in kinds:
            totals[k] += scores[k].fmeasure
    n = max(len(predictions), 1)
    return {k: v / n for k, v in totals.items()}


def bleu(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenization, 0-100), one reference per prediction."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(predictions, [references]).score)


def extract_answer(text: str, pattern: str = GSM8K_ANSWER_REGEX) -> str | None:
    """The last match of `pattern` in `text` (its first group if it has one), normalised; None if none.

    Normalising drops thousands separators, surrounding space and a trailing period, so
    "#### 1,000." and "#### 1000" agree.
    """
    matches = list(re.finditer(pattern, text))
    if not matches:
        return None
    m = matches[-1]
    answer = m.group(1) if m.re.groups else m.group(0)
    return answer.replace(",", "").strip().rstrip(".")


def exact_match(predictions: list[str], references: list[str], pattern: str | None = GSM8K_ANSWER_REGEX) -> float:
    """Fraction of predictions whose extracted answer equals the reference's.

    A reference without a match of `pattern` is compared as whole stripped text (so free-text
    references still work); a prediction without a match is wrong.
    """
    if not references:
        return float("nan")
    hits = 0
    for pred, ref in zip(predictions, references, strict=True):
        gold = extract_answer(ref, pattern) if pattern else None
        if gold is None:
            hits += pred.strip() == ref.strip()
        else:
            hits += extract_answer(pred, pattern) == gold
    return hits / len(references)
