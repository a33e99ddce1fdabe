"""Sentence pairs, --eval-data and regression through `lamda-peft train` on real text
(the bundled MiniLM and Drugs.com reviews: condition + review as a pair, usefulCount as a number)."""

import json

import pytest

from lamda_peft import assets
from lamda_peft.cli import main

FAST = ["--max-length", "64", "--batch-size", "8", "--quiet", "--r", "4"]


@pytest.fixture(scope="module")
def reviews(tmp_path_factory):
    """Train (48 rows) and held-out (24 rows) CSVs with the original Drugs.com columns."""
    train, test = assets.drug_reviews_tables()
    folder = tmp_path_factory.mktemp("reviews")
    cols = ["condition", "review", "rating", "usefulCount"]
    train[cols].dropna().iloc[:48].to_csv(folder / "train.csv", index=False)
    test[cols].dropna().iloc[:24].to_csv(folder / "test.csv", index=False)
    return folder


def run_cli(*argv):
    return main([str(a) for a in argv])


def test_pair_is_tokenized_as_a_pair():
    from transformers import AutoTokenizer

    from lamda_peft.settings import TrainSettings
    from lamda_peft.training import _classification_rows

    train, _ = assets.drug_reviews_tables()
    df = train.iloc[:2]
    tok = AutoTokenizer.from_pretrained(assets.minilm_path())
    s = TrainSettings(text_column="condition, review", label_column="rating", max_length=64)
    rows = _classification_rows(tok, df, s, {"negative": 0, "neutral": 1, "positive": 2}, "reviews")
    ids, types = rows[0]["input_ids"], rows[0]["token_type_ids"]
    first = tok(df["condition"].iloc[0], add_special_tokens=False)["input_ids"]
    # [CLS] condition [SEP] review... [SEP], segment ids 0 then 1 (truncation cut the review, not the condition)
    assert ids[: len(first) + 2] == [tok.cls_token_id, *first, tok.sep_token_id]
    assert types == [0] * (len(first) + 2) + [1] * (len(ids) - len(first) - 2)
    assert ids[-1] == tok.sep_token_id and len(ids) == 64


def test_pair_classification_with_eval_data(reviews, tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--data", reviews / "train.csv", "--eval-data", reviews / "test.csv", "--output-dir", out]
    argv += ["--text-column", "condition,review", "--label-column", "rating", "--max-steps", "3", *FAST]
    assert run_cli(*argv) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert (m["train_rows"], m["eval_rows"]) == (48, 24)  # all of --data trains; --eval-data is the held-out set
    assert m["metric"] == "accuracy" and m["score"] == m["accuracy"]
    assert {"macro_f1", "matthews"} <= m.keys()


def test_regression_end_to_end(reviews, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--task", "regression", "--data", reviews / "train.csv", "--eval-data", reviews / "test.csv"]
    argv += ["--text-column", "review", "--label-column", "usefulCount", "--max-steps", "4", "--metric", "spearman"]
    assert run_cli(*argv, "--output-dir", out, *FAST) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["metric"] == "spearman" and m["score"] == m["spearman"]
    assert -1 <= m["pearson"] <= 1 and -1 <= m["spearman"] <= 1
    # The Trainer's held-out loss is the MSE head's loss: it must equal our MSE of the same predictions.
    assert m["eval_loss"] == pytest.approx(m["mse"], rel=1e-4)
    capsys.readouterr()
    assert run_cli("evaluate", out) == 0  # the saved adapter + head on a pristine base: the same scores
    again = json.loads(capsys.readouterr().out)
    assert again == pytest.approx({k: m[k] for k in ("pearson", "spearman", "mse", "eval_rows")}, rel=1e-4)


@pytest.mark.parametrize(
    "flags,message",
    [
        (
            ["--text-column", "condition,drug"],
            "column(s) ['drug'] not found; available columns: ['condition', 'review'",
        ),
        (["--task", "regression", "--text-column", "review", "--label-column", "rating"], "row 0 holds 'positive'"),
        (["--task", "classification", "--metric", "pearson"], "'pearson' is not reported for --task classification"),
    ],
)
def test_bad_pair_and_regression_input(reviews, tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    code = run_cli("train", "--data", reviews / "train.csv", "--label-column", "rating", *flags, "--output-dir", out)
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (out / "metrics.json").exists()


def test_hub_spec_names_config_and_split():
    from lamda_peft.tasks.data import parse_hub_spec

    assert parse_hub_spec("nyu-mll/glue:stsb@validation") == ("nyu-mll/glue", "stsb", "validation")
    assert parse_hub_spec("openai/gsm8k:main") == ("openai/gsm8k", "main", "train")
    assert parse_hub_spec("EdinburghNLP/xsum@test") == ("EdinburghNLP/xsum", None, "test")


def test_eval_steps_keep_the_best_checkpoint_by_metric(reviews, tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--data", reviews / "train.csv", "--eval-data", reviews / "test.csv", "--output-dir", out]
    argv += ["--text-column", "review", "--label-column", "rating", "--max-steps", "6", "--eval-steps", "2"]
    assert run_cli(*argv, "--metric", "macro_f1", "--lr", "3e-3", *FAST) == 0
    m = json.loads((out / "metrics.json").read_text())
    evals = [
        row for row in map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if "eval_macro_f1" in row
    ]
    assert [row["step"] for row in evals] == [2, 4, 6]
    best = max(evals, key=lambda row: row["eval_macro_f1"])  # the first of equals, as the Trainer keeps it
    assert (m["best_metric"], m["best_value"], m["best_step"]) == ("macro_f1", best["eval_macro_f1"], best["step"])
    assert m["best_checkpoint"].endswith(f"checkpoint-{best['step']}")
    assert (out / "checkpoints" / f"checkpoint-{best['step']}" / "adapter_model.safetensors").is_file()
