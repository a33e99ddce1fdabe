"""Causal-LM supervised fine-tuning data: prompt/response pairs (loss on the response only) or plain text."""

from __future__ import annotations

import math

import torch

IGNORE_INDEX = -100


def tokenize_sft(tokenizer, prompts: list[str] | None, responses: list[str], max_length: int) -> list[dict]:
    """Token ids and labels; with prompts, prompt tokens get label -100 (no loss on them).

    Args:
        prompts: None for plain-text training (loss on every token).
        responses: the text to learn (or the plain text).
    """
    eos = tokenizer.eos_token or ""
    rows = []
    for i, response in enumerate(responses):
        prompt_ids = tokenizer(prompts[i], add_special_tokens=True)["input_ids"] if prompts else []
        response_ids = tokenizer(response + eos, add_special_tokens=not prompts)["input_ids"]
        ids = (prompt_ids + response_ids)[:max_length]
        labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            continue  # the prompt filled the whole window: nothing to learn from this row
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return rows


class SFTCollator:
    """Right-pads input_ids (pad id), attention_mask (0) and labels (-100) to the batch's longest row."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad = pad_token_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        out = {"input_ids": [], "attention_mask": [], "labels": []}
        for r in rows:
            gap = width - len(r["input_ids"])
            out["input_ids"].append(r["input_ids"] + [self.pad] * gap)
            out["attention_mask"].append(r["attention_mask"] + [0] * gap)
            out["labels"].append(r["labels"] + [IGNORE_INDEX] * gap)
        return {k: torch.tensor(v) for k, v in out.items()}


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")
