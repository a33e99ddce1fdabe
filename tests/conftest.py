"""Shared test helpers: tolerances per dtype (one place), small real models, a float64 reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

TOLERANCES = {
    torch.float64: {"atol": 1e-10, "rtol": 1e-9},
    torch.float32: {"atol": 2e-5, "rtol": 1e-4},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """torch.testing.assert_close with this project's tolerance for `dtype` (default: actual's)."""
    tol = TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(actual.to(expected.dtype), expected, **tol)


def assert_calibrated_adapter_reloads(
    model, fresh_base: nn.Module, folder, batch: dict, expected: torch.Tensor
) -> None:
    """A calibrated adapter (init "activation"/"gradient") reloads onto `fresh_base` without calibration
    data: the same adapter state bit for bit, and the same logits on `batch` (float64) as `expected`."""
    from lamda_peft import LamdaModel

    model.save_pretrained(folder)
    again = LamdaModel.from_pretrained(fresh_base, folder)  # no calibration
    for (n1, a), (n2, b) in zip(model.adapter_state_dict().items(), again.adapter_state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(a, b)
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, expected, atol=1e-10, rtol=1e-10)


class TinyMLP(nn.Module):
    """A plain (non-HF) model: the library must adapt any nn.Module."""

    def __init__(self, d: int = 24, hidden: int = 40, out: int = 5, dtype=torch.float32) -> None:
        super().__init__()
        self.up = nn.Linear(d, hidden, dtype=dtype)
        self.down = nn.Linear(hidden, d, dtype=dtype)
        self.head = nn.Linear(d, out, dtype=dtype)

    def forward(self, x):
        return self.head(self.down(torch.relu(self.up(x))))


@pytest.fixture
def tiny_mlp():
    torch.manual_seed(0)
    return TinyMLP()


def tiny_bert(num_labels: int = 3):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=num_labels,
        max_position_embeddings=64,
    )
    return BertForSequenceClassification(cfg).eval()


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def save_tiny_llama_with_smollm2_tokenizer(folder, **config):
    """A 2-layer random Llama sized for SmolLM2's (real) tokenizer, saved with it like a hub checkpoint.

    `config` overrides or adds LlamaConfig fields (max_position_embeddings, tied embeddings, ...).
    Returns the tokenizer.
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lamda_peft.assets import smollm2_path

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    torch.manual_seed(0)
    fields = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
    LlamaForCausalLM(LlamaConfig(**{**fields, **config})).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return tokenizer
