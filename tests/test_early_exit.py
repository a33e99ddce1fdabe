"""Early exit on a looped decoder: per-loop loss and agreement against truncated models, the estimate."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import save_tiny_llama_with_smollm2_tokenizer
from lamda_peft.early_exit import (
    early_exit_counts,
    early_exit_profile,
    format_table,
    stable_exit_loops,
    throughput_estimate,
)
from lamda_peft.recursive import RecursiveError, make_recursive, truncate_layers
from test_recursive import tiny_decoder

IDS = torch.tensor([[1, 5, 9, 2, 33, 7, 11, 3, 8, 14], [4, 4, 8, 60, 2, 19, 5, 1, 0, 0]])
MASK = torch.tensor([[1] * 10, [1] * 8 + [0, 0]])


def recursive(dtype=torch.float32, layers: int = 6, k: int = 2, rank: int = 3):
    return make_recursive(tiny_decoder(layers=layers, dtype=dtype), unique_layers=k, init="average", relax_rank=rank)


def test_throughput_estimate_by_hand():
    # 6 tokens over 3 loops: 3 exit at loop 1, 1 at loop 2, 2 at loop 3 -> E = (3 + 2 + 6) / 6 = 11/6
    est = throughput_estimate([3, 1, 2], 3)
    assert est["mean_exit_loop"] == pytest.approx(11 / 6)
    assert est["throughput_gain_estimate"] == pytest.approx(3 / (11 / 6))
    assert throughput_estimate([0, 0, 5], 3)["throughput_gain_estimate"] == 1.0  # nobody exits early
    assert throughput_estimate([4, 0], 2)["throughput_gain_estimate"] == 2.0  # everybody after loop 1
    with pytest.raises(ValueError, match="num_loops = 3"):
        throughput_estimate([1, 2], 3)
    with pytest.raises(ValueError, match="all zero"):
        throughput_estimate([0, 0], 2)


def test_stable_exit_loop_on_a_synthetic_argmax_table():
    # rows: loops 1..4; columns: tokens. The final row is the reference.
    predictions = torch.tensor(
        [
            [7, 1, 5, 2, 9],
            [7, 3, 5, 2, 4],
            [7, 3, 6, 2, 9],
            [7, 3, 5, 8, 9],
        ]
    )
    # token 0 final from loop 1; token 1 from loop 2; token 2 agrees at loops 1, 2 but not 3 -> 4;
    # token 3 changes at the last loop -> 4; token 4 agrees at 1, 3, 4 but not 2 -> 3
    assert stable_exit_loops(predictions).tolist() == [1, 2, 4, 4, 3]


def test_last_loop_is_the_model_itself():
    model = recursive()
    labels = IDS.masked_fill(MASK == 0, -100)
    with torch.no_grad():
        own = model(input_ids=IDS, attention_mask=MASK, labels=labels).loss
    out = early_exit_profile(model, IDS, MASK, labels)
    assert out["num_loops"] == 3 and out["loop_size"] == 2
    last = out["loops"][-1]
    assert last["heldout_loss"] == pytest.approx(float(own), rel=1e-5)
    assert last["agree_with_final"] == 1.0
    assert out["tokens"] == int((labels[:, 1:] != -100).sum()) == 16
    for row in out["loops"]:
        assert 0.0 <= row["agree_with_final"] <= 1.0 and 0.0 <= row["exit_share"] <= 1.0
    assert sum(row["exit_share"] for row in out["loops"]) == pytest.approx(1.0)
    assert 1.0 <= out["mean_exit_loop"] <= 3.0
    assert out["throughput_gain_estimate"] == pytest.approx(3 / out["mean_exit_loop"])
    assert "loop" in format_table(out)


def test_each_loop_equals_the_model_truncated_there_float64():
    """The reference for loop j: the same recursive model cut to its first j*K layers (its own forward)."""
    model = recursive(torch.float64)
    labels = IDS.masked_fill(MASK == 0, -100)
    labels[0, 4] = -100  # an ignored label inside a row
    out = early_exit_profile(model, IDS, MASK, labels, batch_size=1)  # and batches add up
    scored = labels[:, 1:] != -100
    predictions = []
    for j in range(1, 4):
        cut = truncate_layers(copy.deepcopy(model), 2 * j)
        with torch.no_grad():
            res = cut(input_ids=IDS, attention_mask=MASK, labels=labels)
        assert out["loops"][j - 1]["heldout_loss"] == pytest.approx(float(res.loss), rel=1e-6)
        predictions.append(res.logits[:, :-1].argmax(-1)[scored])
    predictions = torch.stack(predictions)
    assert out["tokens"] == 15
    agree = (predictions == predictions[-1]).double().mean(1)
    assert [row["agree_with_final"] for row in out["loops"]] == pytest.approx(agree.tolist())
    exits = torch.bincount(stable_exit_loops(predictions) - 1, minlength=3).double() / 15
    assert [row["exit_share"] for row in out["loops"]] == pytest.approx(exits.tolist())


def test_ignored_labels_do_not_count():
    model = recursive()
    labels = IDS.masked_fill(MASK == 0, -100)
    base = early_exit_counts(model, IDS, MASK, labels)
    # one more ignored label: one token fewer scored; the input is the same
    other = labels.clone()
    other[0, 5] = -100
    less = early_exit_counts(model, IDS, MASK, other)
    assert less.tokens == base.tokens - 1
    assert sum(less.exit) == less.tokens and sum(base.exit) == base.tokens
    # default labels: input_ids with padding ignored
    assert early_exit_counts(model, IDS, MASK).tokens == base.tokens


def test_plain_model_with_a_loop_size_and_errors():
    plain = tiny_decoder(layers=4, dtype=torch.float32)
    out = early_exit_profile(plain, IDS, MASK, loop_size=2)
    assert out["num_loops"] == 2 and out["loops"][-1]["agree_with_final"] == 1.0
    with pytest.raises(RecursiveError, match="needs loop_size"):
        early_exit_profile(plain, IDS, MASK)
    with pytest.raises(RecursiveError, match="divisor of the 4"):
        early_exit_profile(plain, IDS, MASK, loop_size=3)
    with pytest.raises(ValueError, match="every label is -100"):
        early_exit_profile(plain, IDS, MASK, labels=torch.full_like(IDS, -100), loop_size=2)


def test_recursive_cli_early_exit(tmp_path, capsys):
    """`lamda-peft recursive --early-exit` on a tiny Llama with SmolLM2's tokenizer and real text."""
    import json

    from lamda_peft.cli import main
    from test_cli_recursive import FOUR_LAYERS

    folder = tmp_path / "llama"
    save_tiny_llama_with_smollm2_tokenizer(folder, **FOUR_LAYERS)
    argv = ["recursive", str(folder), "--unique-layers", "2", "--eval-rows", "4", "--max-length", "32"]
    assert main(argv + ["--early-exit"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    ee = report["early_exit"]
    assert ee["num_loops"] == 2 and len(ee["loops"]) == 2
    # the same tokenization and batches as the held-out loss: the last loop IS that loss
    assert ee["loops"][-1]["heldout_loss"] == pytest.approx(report["heldout_loss"], rel=1e-6)
    assert "estimated depth-wise batching gain" in captured.err
    assert main(argv[:-4] + ["--eval-rows", "0", "--early-exit"]) == 2
    assert "--eval-rows must be > 0" in capsys.readouterr().err
