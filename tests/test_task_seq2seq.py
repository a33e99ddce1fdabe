"""`--task seq2seq` (tiny random BART, XSum-format data) and `--eval-generate` (tiny Llama, GSM8K format)."""

import json

import pytest

from lamda_peft.cli import main
from lamda_peft.targets import find_targets
from task_models import GSM8K, XSUM, all_text, tiny_bart, tiny_llama, write_jsonl

FAST = ["--max-length", "64", "--batch-size", "4", "--quiet", "--r", "4", "--max-steps", "3"]


def run_cli(*argv):
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def bart(tmp_path_factory):
    return tiny_bart(tmp_path_factory.mktemp("bart"), all_text(XSUM))


def test_bart_default_targets_cover_attention_cross_attention_and_ffn(bart):
    from transformers import AutoModelForSeq2SeqLM

    model = AutoModelForSeq2SeqLM.from_pretrained(bart)
    names = find_targets(model, "auto")
    suffixes = {n.split("model.", 1)[1].split(".", 3)[-1] for n in names}
    assert suffixes == {
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
        "encoder_attn.q_proj", "encoder_attn.k_proj", "encoder_attn.v_proj", "encoder_attn.out_proj",
        "fc1", "fc2",
    }  # fmt: skip
    assert len(names) == 6 + 10  # 1 encoder layer (self-attn + FFN), 1 decoder layer (+ cross-attn)
    assert "lm_head" not in names


def test_seq2seq_trains_generates_and_scores_rouge(bart, tmp_path, capsys):
    data = write_jsonl(tmp_path / "xsum.jsonl", XSUM[:12])
    held = write_jsonl(tmp_path / "xsum_val.jsonl", XSUM[12:])
    out = tmp_path / "run"
    argv = ["train", "--task", "seq2seq", "--model", bart, "--data", data, "--eval-data", held, "--output-dir", out]
    assert run_cli(*argv, "--num-beams", "2", "--max-new-tokens", "8", "--lr", "0.01", *FAST) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["metric"] == "rougeL" and m["score"] == m["rougeL"]
    for k in ("rouge1", "rouge2", "rougeL"):
        assert 0 <= m[k] <= 1
    assert m["eval_rows"] == 4 and m["eval_loss"] < m["eval_loss_before"]
    assert {"rouge1_before", "rouge2_before", "rougeL_before"} <= m.keys()
    preds = [json.loads(line)["prediction"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 4
    from lamda_peft.tasks.metrics import rouge_scores

    expected = {k: m[k] for k in ("rouge1", "rouge2", "rougeL")}
    assert rouge_scores(preds, [r["summary"] for r in XSUM[12:]]) == pytest.approx(expected)
    capsys.readouterr()
    assert run_cli("evaluate", out) == 0  # the saved adapter on a pristine base generates the same summaries
    assert json.loads(capsys.readouterr().out) == pytest.approx({**expected, "eval_rows": 4})


def test_eval_generate_on_gsm8k_format(tmp_path):
    llama = tiny_llama(tmp_path / "llama", all_text(GSM8K))
    data = write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K)
    out = tmp_path / "run"
    argv = ["train", "--task", "causal-lm", "--model", llama, "--data", data, "--prompt-column", "question"]
    argv += ["--response-column", "answer", "--eval-generate", "--max-new-tokens", "12", "--eval-fraction", "0.25"]
    assert run_cli(*argv, "--output-dir", out, *FAST) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["metric"] == "exact_match" and m["eval_rows"] == 4
    assert 0 <= m["exact_match"] <= 1 and 0 <= m["rougeL"] <= 1 and 0 <= m["bleu"] <= 100
    assert {"exact_match_before", "rougeL_before", "bleu_before"} <= m.keys()  # the untrained adapter's scores
    preds = (out / "predictions.jsonl").read_text().splitlines()
    assert len(preds) == 4


@pytest.mark.parametrize("model", ["minilm", "llama"])
def test_seq2seq_refuses_encoder_only_and_decoder_only(model, tmp_path, capsys):
    path = "minilm" if model == "minilm" else tiny_llama(tmp_path / "llama", all_text(GSM8K))
    data = write_jsonl(tmp_path / "xsum.jsonl", XSUM)
    out = tmp_path / "out"
    assert run_cli("train", "--task", "seq2seq", "--model", path, "--data", data, "--output-dir", out) == 2
    err = capsys.readouterr().err
    assert "--task seq2seq needs an encoder-decoder model" in err
    assert ("bert model, which is encoder-only" if model == "minilm" else "llama model, which is decoder-only") in err
    assert not (out / "metrics.json").exists()
