"""benchmarks/quality.py's seed-by-seed comparison (`paired`, `--paired A:B`), the figure behind the
README's "at least as good as" statements, checked against a float64 computation of its own."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
try:
    import quality
finally:
    sys.path.remove(str(BENCH))


def _row(variant, lr, seed, value, metric="accuracy"):
    return {
        "variant": variant,
        "lr": lr,
        "seed": seed,
        metric: value,
        "trainable_params_end": 1,
        "parameter_updates": 1,
    }


A = {0: 0.7203, 1: 0.6992, 2: 0.7361, 3: 0.7100}  # variant "a" at its best rate, 2e-3
B = {0: 0.7124, 1: 0.7256, 2: 0.7177, 5: 0.7300}  # variant "b": seed 3 missing, seed 5 extra

RUNS = (
    [_row("a", 2e-3, s, v) for s, v in A.items()]
    + [_row("a", 1e-3, s, v - 0.05) for s, v in A.items()]  # a worse rate on the same seeds: never paired
    + [_row("b", 3e-3, s, v) for s, v in B.items()]
)


def test_paired_matches_a_float64_reference_on_the_shared_seeds_at_the_best_rates():
    out = quality.paired(RUNS, "a", "b")
    seeds = [0, 1, 2]
    diffs = np.array([A[s] - B[s] for s in seeds], dtype=np.float64)
    assert out["seeds"] == seeds
    assert out["diff_mean"] == pytest.approx(diffs.mean(), abs=1e-15)
    assert out["diff_se"] == pytest.approx(diffs.std(ddof=1) / np.sqrt(len(diffs)), abs=1e-15)
    assert out["accuracy_mean_a"] == pytest.approx(np.mean([A[s] for s in seeds]), abs=1e-15)
    assert out["accuracy_mean_b"] == pytest.approx(np.mean([B[s] for s in seeds]), abs=1e-15)
    assert (out["wins"], out["losses"], out["ties"]) == (2, 1, 0)


def test_paired_on_a_lower_is_better_metric_counts_a_lower_loss_as_a_win():
    runs = [_row("a", 1e-3, s, v, "eval_loss") for s, v in {0: 0.8, 1: 0.9, 2: 1.0}.items()]
    runs += [_row("b", 1e-3, s, v, "eval_loss") for s, v in {0: 0.9, 1: 0.9, 2: 0.95}.items()]
    out = quality.paired(runs, "a", "b", metric="eval_loss", higher_is_better=False)
    assert (out["wins"], out["losses"], out["ties"]) == (1, 1, 1)
    assert out["diff_mean"] == pytest.approx((-0.1 + 0.0 + 0.05) / 3, abs=1e-12)


def test_paired_refuses_an_unknown_variant_and_too_few_shared_seeds():
    with pytest.raises(ValueError, match="variant 'c' has no runs"):
        quality.paired(RUNS, "a", "c")
    with pytest.raises(ValueError, match="share 1 seed"):
        quality.paired([_row("a", 1e-3, 0, 0.7), _row("b", 1e-3, 0, 0.7), _row("b", 1e-3, 1, 0.7)], "a", "b")


def test_merge_writes_the_paired_rows_and_refuses_a_malformed_pair(tmp_path, capsys):
    part = tmp_path / "part.json"
    part.write_text(json.dumps({"runs": RUNS}))
    out = tmp_path / "merged.json"
    assert quality.main(["--merge", str(part), "--paired", "a:b", "--paired", "b:a", "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    forward, backward = data["paired"]
    assert (forward["a"], forward["b"], backward["a"]) == ("a", "b", "b")
    assert forward["diff_mean"] == pytest.approx(-backward["diff_mean"], abs=1e-15)
    assert (forward["wins"], forward["losses"]) == (backward["losses"], backward["wins"])
    assert "--paired a:b" in data["command"]
    with pytest.raises(SystemExit) as exit_info:
        quality.main(["--merge", str(part), "--paired", "a-b", "--output", str(out)])
    assert exit_info.value.code == 2
    assert "expected VARIANT_A:VARIANT_B, got 'a-b'" in capsys.readouterr().err


def test_a_pair_that_cannot_be_formed_waits_mid_sweep_and_is_a_usage_error_at_the_end(tmp_path, capsys):
    import argparse

    out = tmp_path / "sweep.json"
    args = argparse.Namespace(preset="minilm", output=str(out), argv=["--paired", "a:c"], pairs=[("a", "c")])
    quality._write(args, RUNS)  # mid-sweep: variant c has not run yet, the runs are written all the same
    data = json.loads(out.read_text())
    assert len(data["runs"]) == len(RUNS) and data["paired"] == []
    part = tmp_path / "part.json"
    part.write_text(json.dumps({"runs": RUNS}))
    merged = tmp_path / "merged.json"
    with pytest.raises(SystemExit) as exit_info:
        quality.main(["--merge", str(part), "--paired", "a:c", "--output", str(merged)])
    assert exit_info.value.code == 2
    assert "--paired: variant 'c' has no runs" in capsys.readouterr().err
    assert not merged.exists()  # nothing written that looks like a finished merge


def test_paired_also_compares_the_other_metrics_on_the_seeds_that_recorded_them():
    runs = []
    for v, acc, loss in (("a", (0.70, 0.72, 0.71), (0.9, None, 1.0)), ("b", (0.71, 0.71, 0.70), (1.1, 1.2, 1.3))):
        for seed, (x, y) in enumerate(zip(acc, loss, strict=True)):
            row = _row(v, 1e-3, seed, x)
            if y is not None:  # seed 1 of "a" predates the held-out loss: left out of that comparison only
                row["eval_loss"] = y
            if v == "a":  # only "a" recorded a macro-F1: never compared
                row["macro_f1"] = 0.5
            runs.append(row)
    out = quality.paired(runs, "a", "b")
    assert out["seeds"] == [0, 1, 2]
    loss = out["other_metrics"]["eval_loss"]
    diffs = np.array([0.9 - 1.1, 1.0 - 1.3], dtype=np.float64)
    assert loss["seeds"] == 2
    assert loss["diff_mean"] == pytest.approx(diffs.mean(), abs=1e-15)
    assert loss["diff_se"] == pytest.approx(diffs.std(ddof=1) / np.sqrt(2), abs=1e-15)
    assert set(out["other_metrics"]) == {"eval_loss"}  # not the paired metric itself, not macro-F1


def test_report_renders_the_paired_rows_with_their_other_metrics(tmp_path):
    sys.path.insert(0, str(BENCH))
    try:
        import report
    finally:
        sys.path.remove(str(BENCH))
    runs = [dict(r, macro_f1=0.5, eval_loss=1.0 + r["seed"] / 10 + (0.2 if r["variant"] == "b" else 0)) for r in RUNS]
    part, out = tmp_path / "part.json", tmp_path / "merged.json"
    part.write_text(json.dumps({"runs": runs}))
    assert quality.main(["--merge", str(part), "--paired", "a:b", "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    [row] = [line for line in report.quality_section(data) if line.startswith("| a - b |")]
    diffs = np.array([A[s] - B[s] for s in (0, 1, 2)], dtype=np.float64)
    assert f"| 3 | {100 * diffs.mean():+.2f} (SE {100 * diffs.std(ddof=1) / np.sqrt(3):.2f}) | 2 / 1 / 0 |" in row
    assert "held-out loss -0.200 (SE 0.000) on 3 seeds" in row
