"""Encoder-decoder (BART, T5) summarization: checks, tokenization, generation and ROUGE.

Training uses the plain Trainer with labels (the model shifts them into decoder inputs itself);
evaluation generates with `model.generate` (beam size and max new tokens from the settings) and
scores ROUGE-1/2/L against the target column.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig

from lamda_peft.tasks.causal_lm import IGNORE_INDEX
from lamda_peft.tasks.generation import batched_generate


class Seq2SeqError(ValueError):
    """The model cannot do seq2seq (not an encoder-decoder)."""


def check_encoder_decoder(model_path: str) -> None:
    """Raise `Seq2SeqError` naming the architecture when `model_path` is not an encoder-decoder model."""
    config = AutoConfig.from_pretrained(model_path)
    if not getattr(config, "is_encoder_decoder", False):
        kind = "decoder-only (use --task causal-lm)" if _is_decoder_only(config) else "encoder-only"
        raise Seq2SeqError(
            f"--task seq2seq needs an encoder-decoder model (BART, T5, ...); {model_path} is a "
            f"{config.model_type} model, which is {kind}"
        )


def _is_decoder_only(config) -> bool:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    # BERT-like encoders also have a causal-LM class (BertLMHeadModel); a masked-LM one marks an encoder
    return (
        config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        and config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    )


def tokenize_pairs(
    tokenizer, sources: list[str], targets: list[str], max_length: int, max_target_length: int
) -> list[dict]:
    """input_ids/attention_mask of the sources and `labels` (target ids), both truncated."""
    enc = tokenizer(sources, truncation=True, max_length=max_length)
    lab = tokenizer(text_target=targets, truncation=True, max_length=max_target_length)["input_ids"]
    return [
        {"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "labels": lab[i]}
        for i in range(len(sources))
    ]


class Seq2SeqCollator:
    """Right-pads inputs (pad id / 0) and labels (-100, so padding carries no loss)."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad = pad_token_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        label_width = max(len(r["labels"]) for r in rows)
        return {
            "input_ids": torch.tensor([r["input_ids"] + [self.pad] * (width - len(r["input_ids"])) for r in rows]),
            "attention_mask": torch.tensor(
                [r["attention_mask"] + [0] * (width - len(r["attention_mask"])) for r in rows]
            ),
            "labels": torch.tensor([r["labels"] + [IGNORE_INDEX] * (label_width - len(r["labels"])) for r in rows]),
        }


def generate(
    model, tokenizer, sources: list[str], max_length: int, num_beams: int, max_new_tokens: int, batch_size: int = 16
) -> list[str]:
    """Generated texts for `sources` (eval mode, greedy or beam search)."""
    outputs = batched_generate(model, tokenizer, sources, max_length, num_beams, max_new_tokens, batch_size, False)
    return [o.strip() for o in outputs]


def evaluate(model, tokenizer, sources: list[str], targets: list[str], s) -> tuple[dict, list[str]]:
    """(ROUGE-1/2/L of generated vs. target texts, the generated texts)."""
    from lamda_peft.tasks.metrics import rouge_scores

    predictions = generate(model, tokenizer, sources, s.max_length, s.num_beams, s.max_new_tokens)
    return rouge_scores(predictions, targets), predictions
