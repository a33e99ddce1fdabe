"""--head-init probe: the new head is fitted on the frozen model's features before fine-tuning.

Checked against float64 references (closed-form ridge regression for one output; a float64
L-BFGS fit of the same penalised cross-entropy for classes), for what it leaves untouched (every
other parameter, bitwise), determinism, the cross-validated penalty, the refusal of heads whose
output is not the logits, and through `lamda-peft train`.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_bert
from lamda_peft.cli import main
from lamda_peft.tasks.head_probe import L2_GRID, HeadProbeError, fold_indices, head_inputs, probe_head


def _batches(num_labels: int, n: int = 40, seed: int = 0):
    """Rows whose label is carried by their tokens (learnable), in batches of 8."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(0, n, 8):
        labels = torch.randint(0, max(num_labels, 2), (8,), generator=g)
        ids = torch.randint(10, 90, (8, 6), generator=g)
        ids[:, 1] = 5 + labels  # the label's token
        batch = {"input_ids": ids, "attention_mask": torch.ones(8, 6, dtype=torch.long)}
        batch["labels"] = labels.float() * 0.5 - 0.3 if num_labels == 1 else labels
        out.append(batch)
    return out


def _loss(model, batches):
    with torch.no_grad():
        return sum(model(**b).loss.item() for b in batches) / len(batches)


def test_probe_fits_only_the_head_lowers_its_loss_and_is_deterministic():
    model = tiny_bert(num_labels=3)
    batches = _batches(3)
    body = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("classifier.")}
    before = _loss(model, batches)
    start = {k: v.clone() for k, v in model.classifier.state_dict().items()}
    report = probe_head(model, "classifier", batches)
    assert report.rows == 40 and report.l2 in L2_GRID
    assert report.l2 == min(report.cv_loss, key=report.cv_loss.get)
    assert _loss(model, batches) < before - 0.05  # random tiny features: a modest but real fit
    assert _loss(model, batches) == pytest.approx(report.train_loss, abs=1e-6)
    for k, v in model.state_dict().items():
        if k in body:
            assert torch.equal(v, body[k]), k
    assert not model.training  # the mode it was in
    fitted = {k: v.clone() for k, v in model.classifier.state_dict().items()}
    model.classifier.load_state_dict(start)
    probe_head(model, "classifier", batches)
    for k, v in model.classifier.state_dict().items():
        assert torch.equal(v, fitted[k]), k


def test_one_output_head_is_the_float64_ridge_solution():
    """MSE + l2 ||w||^2 (bias free) has a closed form: w = (Xc^T Xc / n + l2 I)^-1 Xc^T yc / n."""
    model = tiny_bert(num_labels=1)
    batches = _batches(1)
    x, y = head_inputs(model, model.classifier, batches)
    report = probe_head(model, "classifier", batches)
    x, y = x.double(), y.double()
    n, d = x.shape
    xm, ym = x.mean(0), y.mean()
    xc, yc = x - xm, y - ym
    w = torch.linalg.solve(xc.T @ xc / n + report.l2 * torch.eye(d, dtype=torch.float64), xc.T @ yc / n)
    b = ym - xm @ w
    fit_w, fit_b = model.classifier.weight.detach().double()[0], model.classifier.bias.detach().double()[0]

    def objective(w, b):
        return ((x @ w + b - y) ** 2).mean() + report.l2 * w.pow(2).sum()

    # float32 features are nearly collinear here: the objective is the sharp check, the weights a loose one
    assert objective(fit_w, fit_b).item() == pytest.approx(objective(w, b).item(), rel=1e-5)
    torch.testing.assert_close(fit_w, w, atol=1e-3, rtol=1e-2)
    torch.testing.assert_close(fit_b, b, atol=1e-3, rtol=1e-2)


def test_class_head_matches_a_float64_fit_of_the_same_objective():
    model = tiny_bert(num_labels=3)
    batches = _batches(3)
    x, y = head_inputs(model, model.classifier, batches)
    start = {k: v.clone() for k, v in model.classifier.state_dict().items()}
    report = probe_head(model, "classifier", batches)
    ref = torch.nn.Linear(x.shape[1], 3).double()
    ref.load_state_dict({k: v.double() for k, v in start.items()})
    opt = torch.optim.LBFGS(ref.parameters(), max_iter=5000, line_search_fn="strong_wolfe", tolerance_grad=1e-12)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(ref(x.double()), y) + report.l2 * ref.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    # the objective is strictly convex in the weights (bias: up to a shift shared by all classes)
    torch.testing.assert_close(model.classifier.weight.detach().double(), ref.weight.detach(), atol=2e-3, rtol=1e-2)
    logits = model.classifier(x).detach().double()
    torch.testing.assert_close(logits.softmax(-1), ref(x.double()).detach().softmax(-1), atol=1e-3, rtol=0)


def test_a_head_whose_output_is_not_the_logits_is_refused_untouched():
    """A Llama sequence classifier scores every token and then picks the last: its `score` output
    is (batch, seq, labels), so re-running it on its inputs would not give the model's logits."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_labels=3,
        pad_token_id=0,
    )
    model = LlamaForSequenceClassification(cfg).eval()
    start = model.score.weight.clone()
    with pytest.raises(HeadProbeError, match=r"not the model's logits .*head_init='random'"):
        probe_head(model, "score", _batches(3))
    assert torch.equal(model.score.weight, start)


def test_too_few_rows_are_refused():
    model = tiny_bert(num_labels=3)
    with pytest.raises(HeadProbeError, match="at least 10 labelled rows, got 8"):
        probe_head(model, "classifier", _batches(3, n=8))


CLI_FAST = ["train", "--max-steps", "2", "--max-train-rows", "48", "--max-eval-rows", "16", "--batch-size", "8"]


def test_cli_head_init_probe_records_the_fit_and_refuses_causal_lm(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*CLI_FAST, "--head-init", "probe", "--calibration-rows", "32", "--output-dir", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["head_probe"]["rows"] == 32 and metrics["head_probe"]["l2"] in L2_GRID
    assert 0 < metrics["head_probe"]["seconds"] < metrics["wall_time_s"]  # its cost, part of the run's
    bad = ["--task", "causal-lm", "--model", "smollm2", "--head-init", "probe", "--output-dir", str(tmp_path / "c")]
    assert main([*CLI_FAST, *bad]) == 2
    assert "--head-init probe applies to --task classification or regression" in capsys.readouterr().err


def test_folds_are_a_seeded_shuffle_that_mixes_rows_sorted_by_label():
    """Rows in file order are often sorted by label: every held-out fold still holds every class."""
    labels = torch.arange(3).repeat_interleave(14)  # 42 rows, sorted: 14 of each class
    folds = fold_indices(42, 5, seed=0)
    assert sorted(torch.cat(folds).tolist()) == list(range(42))  # a partition
    assert sorted(len(f) for f in folds) == [8, 8, 8, 9, 9]
    assert all(set(labels[f].tolist()) == {0, 1, 2} for f in folds)
    assert all(torch.equal(a, b) for a, b in zip(folds, fold_indices(42, 5, seed=0), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(folds, fold_indices(42, 5, seed=1), strict=True))
