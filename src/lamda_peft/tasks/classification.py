"""Sequence classification: a head that suits the encoder, tokenization, metrics.

Sentence-transformers encoders (like the bundled all-MiniLM-L6-v2) were trained with mean pooling
over tokens; their CLS token and BERT pooler are untrained for the task, and a classifier on
them learns far more slowly (ASSETS.md: LoRA at three rates stays at the majority class). So
`pooling="auto"` uses mean pooling for sentence-transformers folders and the model's own head
otherwise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import AutoModel, AutoModelForSequenceClassification
from transformers.modeling_outputs import SequenceClassifierOutput

HEAD_NAMES = ("classifier", "score", "classification_head")


class MeanPoolClassifier(nn.Module):
    """Encoder + mean pooling over non-padding tokens + a linear `classifier`.

    Args:
        encoder: a Hugging Face encoder returning `last_hidden_state` (batch, seq, hidden).
        num_labels: number of classes.
    """

    def __init__(self, encoder: nn.Module, num_labels: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.num_labels = num_labels
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)
        self.config = encoder.config

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        kw = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kw).last_hidden_state  # (b, s, h)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (b, s, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (b, h)
        logits = self.classifier(pooled)  # (b, num_labels)
        loss = None
        if labels is not None:  # one output = regression (MSE on float labels), as in transformers' heads
            loss = (
                nn.functional.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
                if self.num_labels == 1
                else nn.functional.cross_entropy(logits, labels)
            )
        return SequenceClassifierOutput(loss=loss, logits=logits)

    def save_pretrained(self, directory: str | Path) -> Path:
        """The whole model (full fine-tuning): the encoder as a Hugging Face folder, plus
        `classifier.safetensors` and `classifier.json` (labels, mean pooling), each file written atomically."""
        import json

        from safetensors.torch import save as safetensors_bytes

        from lamda_peft.checkpoint import atomic_write_bytes

        directory = Path(directory)
        self.encoder.save_pretrained(directory)
        head = {k: v.detach().contiguous().cpu() for k, v in self.classifier.state_dict().items()}
        atomic_write_bytes(directory / "classifier.safetensors", safetensors_bytes(head, metadata={"format": "pt"}))
        info = {"pooling": "mean", "num_labels": self.num_labels, "hidden_size": self.classifier.in_features}
        atomic_write_bytes(directory / "classifier.json", (json.dumps(info, indent=2) + "\n").encode())
        return directory

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.encoder.gradient_checkpointing_enable(**kwargs)


def is_sentence_transformer(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / "modules.json").is_file() and (folder / "1_Pooling").is_dir()


def build_classifier(
    model_path: str | Path, num_labels: int, pooling: str = "auto", dtype=torch.float32
) -> tuple[nn.Module, str | list[str]]:
    """(model, head name(s) to train and save) for `num_labels` classes (1 = regression, MSE loss).

    With the model's own head, every top-level module the checkpoint lacks (so randomly
    initialised, like DeBERTa-v3's pooler) is returned with the head: [head, *others].

    pooling: "mean" (MeanPoolClassifier), "model" (AutoModelForSequenceClassification's own head)
    or "auto" (mean for sentence-transformers folders).
    """
    if pooling == "auto":
        pooling = "mean" if is_sentence_transformer(model_path) else "model"
    if pooling == "mean":
        try:
            encoder = AutoModel.from_pretrained(model_path, dtype=dtype, add_pooling_layer=False)
        except TypeError:
            encoder = AutoModel.from_pretrained(model_path, dtype=dtype)
        torch.manual_seed(0)  # a deterministic head init, whatever ran before
        return MeanPoolClassifier(encoder, num_labels), "classifier"
    if pooling != "model":
        raise ValueError(f"pooling must be 'auto', 'mean' or 'model', got {pooling!r}")
    model, info = AutoModelForSequenceClassification.from_pretrained(
        model_path, num_labels=num_labels, dtype=dtype, output_loading_info=True
    )
    head = next((n for n in HEAD_NAMES if hasattr(model, n)), None)
    if head is None:
        raise ValueError(
            f"cannot find the classification head of {type(model).__name__} (looked for {', '.join(HEAD_NAMES)})"
        )
    # Other top-level modules the checkpoint did not hold are random too (DeBERTa-v3's ContextPooler):
    # they must train and be saved with the head, or they would stay random and frozen.
    fresh = sorted({k.split(".")[0] for k in info["missing_keys"]} - {head, getattr(model, "base_model_prefix", "")})
    fresh = [n for n in fresh if isinstance(getattr(model, n, None), nn.Module)]
    return model, [head, *fresh] if fresh else head


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """accuracy, macro-F1 and Matthews correlation (see `lamda_peft.tasks.metrics`)."""
    from lamda_peft.tasks.metrics import classification_metrics as _metrics

    return _metrics(logits, labels)


def majority_baseline(labels: np.ndarray) -> float:
    """Accuracy of always predicting the most frequent held-out class."""
    return float(np.bincount(labels).max() / len(labels))
