"""Memory-lean causal-LM loss (lean.py): same loss and gradients as the full logits, without them."""

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import save_tiny_llama_with_smollm2_tokenizer, tiny_llama
from lamda_peft import LamdaConfig, get_lamda_model
from lamda_peft.lean import IGNORE_INDEX, causal_lm_loss, chunked_linear_cross_entropy


def reference(hidden, weight, bias, labels, num_items=None):
    """float64 dense reference: full logits, then cross-entropy summed over valid labels / n."""
    logits = hidden.double() @ weight.double().T + (0 if bias is None else bias.double())
    total = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    n = (labels != IGNORE_INDEX).sum() if num_items is None else num_items
    return total / n


@pytest.mark.parametrize("chunk", [1, 5, 64])
@pytest.mark.parametrize("with_bias", [False, True])
def test_loss_and_gradients_match_float64_reference(chunk, with_bias):
    torch.manual_seed(0)
    n, d, v = 23, 16, 50
    hidden = torch.randn(n, d, requires_grad=True)
    weight = torch.randn(v, d, requires_grad=True)
    bias = torch.randn(v, requires_grad=True) if with_bias else None
    labels = torch.randint(0, v, (n,))
    labels[[0, 7, 8]] = IGNORE_INDEX
    loss = chunked_linear_cross_entropy(hidden, weight, labels, bias, chunk_tokens=chunk)
    (loss * 2.5).backward()  # an upstream gradient other than 1

    leaves = [t.detach().double().requires_grad_(True) for t in (hidden, weight)]
    b64 = bias.detach().double().requires_grad_(True) if with_bias else None
    ref = reference(leaves[0], leaves[1], b64, labels)
    (ref * 2.5).backward()
    torch.testing.assert_close(loss.double(), ref.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(hidden.grad.double(), leaves[0].grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(weight.grad.double(), leaves[1].grad, atol=1e-6, rtol=1e-5)
    if with_bias:
        torch.testing.assert_close(bias.grad.double(), b64.grad, atol=1e-6, rtol=1e-5)
    assert not torch.any(hidden.grad[[0, 7, 8]])  # tokens without a label get no gradient


def test_num_items_sets_the_denominator():
    torch.manual_seed(0)
    hidden, weight = torch.randn(10, 8), torch.randn(30, 8)
    labels = torch.randint(0, 30, (10,))
    loss = chunked_linear_cross_entropy(hidden, weight, labels, num_items=40)
    torch.testing.assert_close(loss.double(), reference(hidden, weight, None, labels, 40), atol=1e-6, rtol=1e-6)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="labels"):
        chunked_linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunked_linear_cross_entropy(
            torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long), chunk_tokens=0
        )


def lamda_llama():
    model = get_lamda_model(tiny_llama().train(), LamdaConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():  # away from init so the adapter matters
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    return model


def batch(vocab=128, b=3, s=20):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (b, s), generator=g)
    labels = ids.clone()
    labels[0, :6] = IGNORE_INDEX  # a prompt without loss
    mask = torch.ones_like(ids)
    mask[2, -4:] = 0  # right padding
    labels[2, -4:] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_model_loss_and_adapter_gradients_equal_the_stock_loss():
    model = lamda_llama()
    inputs = batch()
    stock = model(**inputs).loss
    stock.backward()
    stock_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    lean = causal_lm_loss(model, inputs, chunk_tokens=7)
    lean.backward()
    torch.testing.assert_close(lean, stock.float(), atol=2e-6, rtol=2e-6)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, stock_grads[n], atol=1e-6, rtol=1e-4)


def saved_vocab_wide(fn) -> list[tuple]:
    """Shapes of (..., vocab) tensors autograd saves while computing fn()'s loss (the head excluded)."""
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        loss = fn()
    loss.backward()
    return [s for s in shapes if len(s) >= 2 and s[-1] == 128 and s[0] != 128]


def test_no_vocabulary_wide_tensor_is_saved_for_backward():
    model = lamda_llama()
    inputs = batch()
    assert saved_vocab_wide(lambda: model(**inputs).loss), "the stock loss keeps the logits: the check can fail"
    assert saved_vocab_wide(lambda: causal_lm_loss(model, inputs)) == []


def test_peft_lora_model_is_supported():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama().train(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    inputs = batch()
    torch.testing.assert_close(causal_lm_loss(model, inputs), model(**inputs).loss, atol=2e-6, rtol=2e-6)


def test_trainer_compute_loss_matches_stock(tmp_path):
    """LamdaTrainer(chunked_loss_tokens=...) gives the loss Trainer.compute_loss gives, with the
    Trainer's own num_items_in_batch (gradient accumulation)."""
    from transformers import TrainingArguments

    from lamda_peft.integrations.hf_trainer import LamdaTrainer

    model = lamda_llama()
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    trainer = LamdaTrainer(model=model, args=args, chunked_loss_tokens=16)
    inputs = batch()
    lean = trainer.compute_loss(model, inputs, num_items_in_batch=torch.tensor(70))
    trainer.chunked_loss_tokens = None
    stock = trainer.compute_loss(model, inputs, num_items_in_batch=torch.tensor(70))
    torch.testing.assert_close(lean, stock.float(), atol=2e-6, rtol=2e-6)


def test_memory_lean_needs_causal_lm():
    from lamda_peft.cli import main

    assert main(["train", "--memory-lean", "--output-dir", "unused"]) == 2


@pytest.mark.slow
def test_cli_memory_lean_trains_like_the_stock_loss(tmp_path):
    """Two CLI runs on a tiny Llama (SmolLM2's tokenizer): --gradient-checkpointing with the stock
    loss and --memory-lean give the same losses step by step (grad accumulation 2)."""
    from lamda_peft.cli import main

    folder = tmp_path / "tiny"
    save_tiny_llama_with_smollm2_tokenizer(folder, max_position_embeddings=128, tie_word_embeddings=True)
    losses = {}
    for name, flag in (("stock", "--gradient-checkpointing"), ("lean", "--memory-lean")):
        out = tmp_path / name
        common = ["--task", "causal-lm", "--model", str(folder), "--data", "humaneval", "--max-length", "384"]
        run = ["--max-steps", "3", "--batch-size", "2", "--grad-accum", "2", "--max-eval-rows", "4", "--quiet"]
        assert main(["train", *common, *run, "--output-dir", str(out), flag]) == 0
        log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        losses[name] = [row["loss"] for row in log if "loss" in row]
    assert len(losses["lean"]) == 3
    torch.testing.assert_close(torch.tensor(losses["lean"]), torch.tensor(losses["stock"]), rtol=1e-4, atol=1e-5)
