"""Recipes: every shipped recipe's code path end to end for a few steps on a tiny random model of
the same architecture (DeBERTa-v2/v3, BART, Llama) and tiny local files in the real datasets'
formats (GLUE columns, XSum document/summary, CNN/DM article/highlights, GSM8K question/answer)."""

import json

import pytest
from safetensors.torch import load_file

from lamda_peft.cli import main
from lamda_peft.recipes import recipe_names
from task_models import GSM8K, XSUM, all_text, tiny_bart, tiny_deberta, tiny_llama, write_jsonl

# GLUE rows in the hub's column layout (nyu-mll/glue), 2 classes unless noted.
PAIR = [("the cat sat on the mat", "a cat is sitting"), ("he went home early", "nobody left the house")] * 4
SINGLE = ["the movie was great fun", "a dull and boring film", "i loved every minute", "what a waste of time"] * 2
GLUE_COLUMNS = {
    "cola": ("sentence",),
    "sst2": ("sentence",),
    "mrpc": ("sentence1", "sentence2"),
    "qqp": ("question1", "question2"),
    "stsb": ("sentence1", "sentence2"),
    "mnli": ("premise", "hypothesis"),
    "qnli": ("question", "sentence"),
    "rte": ("sentence1", "sentence2"),
}
FAST_RECIPES = {"glue-cola", "glue-stsb", "glue-mnli", "xsum", "gsm8k"}  # one of each path; the rest are slow


def glue_rows(task: str) -> list[dict]:
    cols = GLUE_COLUMNS[task]
    rows = []
    for i in range(8):
        texts = (SINGLE[i],) if len(cols) == 1 else PAIR[i]
        if task == "stsb":
            label = [4.8, 0.4, 3.2, 1.0][i % 4]  # similarity 0-5, a float
        elif task == "mnli":
            label = i % 3  # entailment / neutral / contradiction
        else:
            label = i % 2
        rows.append({**dict(zip(cols, texts, strict=True)), "label": label, "idx": i})
    return rows


def run_cli(*argv):
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    glue_text = [t for task in GLUE_COLUMNS for t in all_text(glue_rows(task))]
    cnn = [{"article": r["document"], "highlights": r["summary"], "id": r["id"]} for r in XSUM]
    return {
        "deberta": tiny_deberta(root / "deberta", glue_text),
        "bart": tiny_bart(root / "bart", all_text(XSUM) + all_text(cnn)),
        "llama": tiny_llama(root / "llama", all_text(GSM8K)),
        "cnn": cnn,
    }


def test_recipes_listed(capsys):
    assert run_cli("recipes") == 0
    out = capsys.readouterr().out
    expected = {f"glue-{t}" for t in GLUE_COLUMNS} | {"xsum", "cnn_dailymail", "gsm8k"}
    assert set(recipe_names()) == expected
    for name in expected:
        assert name in out
    assert run_cli("recipes", "--show", "gsm8k") == 0
    assert "lr: 3.0e-4  # authors' scripts" in capsys.readouterr().out


def test_every_recipe_value_has_a_source():
    from lamda_peft.recipes import recipe_path

    for name in recipe_names():
        for line in recipe_path(name).read_text().splitlines():
            if line and not line.startswith("#"):
                source = line.split("  # ", 1)[1] if "  # " in line else ""
                assert (
                    source.startswith(("paper", "authors' scripts", "our choice"))
                    or "column name" in source
                    or ("convention" in source)
                ), f"{name}: {line!r} does not say where its value comes from"


def test_unknown_recipe_lists_the_known_ones(tmp_path, capsys):
    assert run_cli("train", "--recipe", "glue-nope", "--output-dir", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "unknown recipe 'glue-nope'; known recipes: cnn_dailymail, glue-cola" in err
    assert not (tmp_path / "out").exists()


def test_flags_win_over_the_recipe():
    from lamda_peft.cli import build_parser
    from lamda_peft.cli.train import settings_from_args

    s = settings_from_args(build_parser().parse_args(["train", "--recipe", "xsum", "--lr", "0.5"]))
    assert (s.lr, s.epochs, s.batch_size, s.grad_accum, s.task) == (0.5, 25, 4, 4, "seq2seq")


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=() if n in FAST_RECIPES else pytest.mark.slow) for n in sorted(recipe_names())]
)
def test_recipe_runs_on_a_tiny_model_of_its_architecture(name, models, tmp_path):
    if name.startswith("glue-"):
        task = name.removeprefix("glue-")
        rows, model = glue_rows(task), models["deberta"]
    elif name == "gsm8k":
        rows, model = GSM8K, models["llama"]
    else:
        rows, model = (XSUM if name == "xsum" else models["cnn"]), models["bart"]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    held = write_jsonl(tmp_path / "heldout.jsonl", rows[:4])
    out = tmp_path / "run"
    overrides = ["--model", model, "--data", data, "--eval-data", held, "--output-dir", out, "--max-steps", "2"]
    overrides += ["--max-length", "48", "--batch-size", "2", "--max-new-tokens", "6", "--quiet"]
    assert run_cli("train", "--recipe", name, *overrides) == 0
    m = json.loads((out / "metrics.json").read_text())
    resolved = json.loads((out / "resolved_config.json").read_text())
    assert m["train_steps"] == 2 and m["eval_rows"] == 4
    assert m["metric"] == resolved["metric"] and m["score"] == m[m["metric"]]
    assert resolved["scheduler"] in ("linear", "cosine") and resolved["method"] == "lamda"
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    adapted = {k.rsplit(".", 1)[0] for k in adapter if k.endswith("lamda_frozen")}
    if name.startswith("glue-"):
        assert len(adapted) == 2 * 6  # the paper's six DeBERTa projections in each of 2 layers
        assert {"pooler.dense.weight", "classifier.weight"} <= adapter.keys()  # both random at load: trained, saved
    elif name == "gsm8k":
        assert len(adapted) == 2 * 7 and 0 <= m["exact_match"] <= 1  # all-linear: q k v o gate up down
    else:
        assert len(adapted) == 6 + 10 and {"rouge1", "rouge2", "rougeL"} <= m.keys()
