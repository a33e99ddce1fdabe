"""`lamda-peft recursive` and uptraining a recursive folder through `lamda-peft train` (tiny Llama)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import save_tiny_llama_with_smollm2_tokenizer
from lamda_peft.cli import main
from lamda_peft.recursive import decoder_layers, load_recursive, relaxations

# loopable: 4 layers; the CLI evaluates at lengths up to 128
FOUR_LAYERS = {"num_hidden_layers": 4, "max_position_embeddings": 128, "tie_word_embeddings": True}


@pytest.fixture(scope="module")
def tiny_llama_folder(tmp_path_factory):
    """A 4-layer Llama with SmolLM2's tokenizer (real text needs a real tokenizer)."""
    folder = tmp_path_factory.mktemp("tiny") / "llama"
    save_tiny_llama_with_smollm2_tokenizer(folder, **FOUR_LAYERS)
    return folder


def test_recursive_cli_converts_reports_and_writes(tiny_llama_folder, tmp_path, capsys):
    out = tmp_path / "rec"
    argv = ["recursive", str(tiny_llama_folder), "--unique-layers", "2", "--relax-rank", "64", "--output", str(out)]
    assert main(argv + ["--eval-rows", "4", "--baseline"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["unique_parameters"] > report["original_parameters"]  # rank 64 caps at 32 everywhere: all back
    assert set(report["rank_capped"].values()) == {16, 32}  # k/v_proj are 16 x 32
    # full rank: the held-out loss is the original model's
    assert report["heldout_loss"] == pytest.approx(report["original_heldout_loss"], rel=1e-5)
    model = load_recursive(out)
    assert len(relaxations(model)) == 4 * 7


def test_recursive_cli_errors(tiny_llama_folder, capsys):
    assert main(["recursive", str(tiny_llama_folder), "--unique-layers", "3", "--eval-rows", "0"]) == 2
    assert "divisor of the 4" in capsys.readouterr().err


@pytest.mark.parametrize("freeze_shared", [False, True])
def test_uptraining_through_train(tiny_llama_folder, tmp_path, capsys, freeze_shared):
    rec = tmp_path / "rec"
    assert (
        main(
            [
                "recursive",
                str(tiny_llama_folder),
                "--unique-layers",
                "2",
                "--relax-rank",
                "4",
                "--eval-rows",
                "0",
                "--output",
                str(rec),
            ]
        )
        == 0
    )
    capsys.readouterr()
    run = tmp_path / "run"
    argv = ["train", "--task", "causal-lm", "--model", str(rec), "--method", "full", "--data", "drug-reviews"]
    argv += ["--max-steps", "3", "--batch-size", "4", "--max-train-rows", "12", "--max-eval-rows", "4"]
    argv += ["--max-length", "32", "--lr", "1e-2", "--output-dir", str(run), "--quiet"]
    argv += ["--freeze-shared"] if freeze_shared else []
    assert main(argv) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train_tokens_per_s"] > 0 and metrics["train_steps"] == 3
    before, after = load_file(str(rec / "model.safetensors")), load_file(str(run / "model" / "model.safetensors"))
    assert before.keys() == after.keys()  # the same deduplicated layout: shared weights once
    shared = "model.layers.1.mlp.down_proj.base_layer.weight"
    relax = "model.layers.1.mlp.down_proj.dS"
    assert torch.equal(before[shared], after[shared]) == freeze_shared
    assert not torch.equal(before[relax], after[relax])
    trained = load_recursive(run / "model")
    layers = decoder_layers(trained)
    assert layers[1].mlp.up_proj.base_layer.weight is layers[3].mlp.up_proj.base_layer.weight
    # a checkpoint of the Trainer is the same layout (RecursiveTrainer._save)
    ckpt = next((run / "checkpoints").glob("checkpoint-*"))
    assert load_file(str(ckpt / "model.safetensors")).keys() == after.keys()


def test_train_refuses_an_adapter_method_on_a_recursive_folder(tiny_llama_folder, tmp_path, capsys):
    rec = tmp_path / "rec"
    assert (
        main(["recursive", str(tiny_llama_folder), "--unique-layers", "2", "--eval-rows", "0", "--output", str(rec)])
        == 0
    )
    argv = ["train", "--task", "causal-lm", "--model", str(rec), "--data", "drug-reviews", "--max-steps", "1"]
    assert main(argv + ["--output-dir", str(tmp_path / "run"), "--quiet"]) == 2
    assert "--method full" in capsys.readouterr().err
