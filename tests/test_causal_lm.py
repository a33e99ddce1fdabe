"""Causal-LM fine-tuning of the bundled SmolLM2 on HumanEval, then merge to a plain transformers folder."""

import json

import pytest
import torch

from lamda_peft.cli import main


@pytest.mark.slow
def test_smollm2_sft_lowers_heldout_loss_and_merges(tmp_path):
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--task",
            "causal-lm",
            "--model",
            "smollm2",
            "--output-dir",
            str(out),
            "--max-steps",
            "6",
            "--batch-size",
            "4",
            "--max-length",
            "96",
            "--max-eval-rows",
            "8",
            "--r",
            "8",
            "--targets",
            "q_proj,v_proj,up_proj,down_proj",
            "--lr",
            "3e-3",
            "--quiet",
        ]
    )
    assert code == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["eval_loss"] < m["eval_loss_before"], m
    merged = tmp_path / "merged"
    assert main(["merge", str(out), str(merged)]) == 0
    # The merged folder is a plain transformers model: no lamda_peft needed to load it.
    from transformers import AutoModelForCausalLM

    from lamda_peft.cli.convert import load_run

    plain = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    lamda, tokenizer, _ = load_run(str(out))
    ids = tokenizer("def add(a, b):\n    return", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        # float32 end to end through 30 layers, with the merged weight rounded once: differences of a
        # few 1e-4 in the logits are rounding (measured: 1.3e-4 on 1 of 442,368 logits once B trains to
        # the end, the causal-lm default); the merge's exactness is tested in float64 elsewhere
        torch.testing.assert_close(
            plain(input_ids=ids).logits, lamda.eval()(input_ids=ids).logits, atol=5e-4, rtol=1e-4
        )
