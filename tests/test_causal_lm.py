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


def test_a_long_prompt_is_cut_on_the_left_for_generation(tmp_path):
    """A prompt longer than max_length keeps its end: the continuation is the one of its last
    max_length tokens (not of its first), also when batched with a short prompt (left padding)."""
    from transformers import AutoModelForCausalLM

    from conftest import save_tiny_llama_with_smollm2_tokenizer
    from lamda_peft.tasks.generation import generate_continuations

    tokenizer = save_tiny_llama_with_smollm2_tokenizer(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    long_prompt = " ".join(f"item {i} is {i * 7 % 13};" for i in range(30)) + " so the answer is"
    short_prompt = "def add(a, b):"
    ids = tokenizer(long_prompt, return_tensors="pt")["input_ids"]
    assert ids.shape[1] > 40 and tokenizer.truncation_side == "right"
    got = generate_continuations(model, tokenizer, [long_prompt, short_prompt], 16, 1, 6, batch_size=2)
    with torch.no_grad():
        tail = model.generate(input_ids=ids[:, -16:], max_new_tokens=6, do_sample=False, pad_token_id=0)
        head = model.generate(input_ids=ids[:, :16], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert got[0] == tokenizer.decode(tail[0, 16:], skip_special_tokens=True)
    assert got[0] != tokenizer.decode(head[0, 16:], skip_special_tokens=True)  # the old, right-cut prompt
    assert tokenizer.truncation_side == "right" and tokenizer.padding_side == "right"  # restored
