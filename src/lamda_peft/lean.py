"""Memory-lean causal-LM training: a cross-entropy that never materialises the full logits.

Once LaMDA has shrunk the adapter's own memory to almost nothing, a causal-LM training step is
dominated by the base model's activations, and the largest single one is the logits: batch x
sequence x vocabulary floats (SmolLM2: 49,152 columns; b=2, s=256 gives 100 MB in fp32, plus as
much again for their gradient). `chunked_linear_cross_entropy` computes the language-model head
and the loss a chunk of tokens at a time and produces the head's gradients in the same pass, so
what autograd keeps is one (tokens, hidden) gradient instead of (tokens, vocab) logits:

    for each chunk c of tokens:           z_c = h_c W^T + b          (chunk, V)  transient
        loss += sum_i [logsumexp(z_ci) - z_ci[y_i]]                  (valid labels only)
        g_c   = (softmax(z_c) - onehot(y_c)) / n                     (chunk, V)  transient
        dh_c  = g_c W ;  dW += g_c^T h_c ;  db += sum(g_c)           kept: dh (tokens, hidden)
    loss /= n      (n = valid labels, or the Trainer's num_items_in_batch)

The loss equals the model's own `forward(labels=...)` loss to fp32 rounding (tested against a
float64 reference). Together with gradient checkpointing of the decoder layers (selective
recomputation: only each layer's input is kept) this is `lamda-peft train --memory-lean`.
Measured in benchmarks/lean_memory.py, separately from the method-to-method comparison.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

IGNORE_INDEX = -100
DEFAULT_CHUNK_TOKENS = 1024


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Sum of token cross-entropies / denominator, with the head's gradients computed in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, denominator: float, chunk: int, needs: tuple[bool, bool, bool]):
        # hidden (N, d), weight (V, d), bias (V,) or None, labels (N,) int64
        need_h, need_w, need_b = needs
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk]  # (c, d)
            y = labels[start : start + chunk]  # (c,)
            valid = y != IGNORE_INDEX
            if not bool(valid.any()):
                continue
            h, y = h[valid], y[valid]  # ignored tokens cost nothing
            z = (h @ weight.t()).float()  # (c, V), the model's dtype then fp32 as HF's loss does
            if bias is not None:
                z += bias.float()
            lse = torch.logsumexp(z, dim=-1)  # (c,)
            total += (lse - z.gather(1, y[:, None]).squeeze(1)).sum()
            if not (need_h or need_w or need_b):
                continue
            g = z.sub_(lse[:, None]).exp_()  # softmax, in place of z
            g[torch.arange(g.shape[0], device=g.device), y] -= 1.0
            g /= denominator  # (c, V): d loss / d z
            if need_h:
                grad_h[start : start + chunk][valid] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_w:
                grad_w.addmm_(g.t(), h.float())
            if need_b:
                grad_b += g.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total / denominator

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        scale = grad_loss.to(torch.float32)
        dh = None if grad_h is None else grad_h * scale.to(grad_h.dtype)
        dw = None if grad_w is None else (grad_w * scale).to(w_dtype)
        db = None if grad_b is None else (grad_b * scale).to(b_dtype)
        return dh, dw, db, None, None, None, None


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    num_items: int | torch.Tensor | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight^T + bias` against `labels`, without the full logits.

    Args:
        hidden: (N, d) final hidden states (already aligned with `labels`: shift before calling).
        weight: (V, d) output head; bias: (V,) or None.
        labels: (N,) int64 targets, -100 for tokens without loss.
        num_items: the denominator (the Trainer's `num_items_in_batch` under gradient
            accumulation); default the number of labels that are not -100.
        chunk_tokens: tokens per chunk; transient memory is chunk_tokens x V floats.

    Returns:
        The scalar loss (float32).
    """
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(f"hidden must be (N, d) and labels (N,); got {tuple(hidden.shape)} and {tuple(labels.shape)}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    denominator = float((labels != IGNORE_INDEX).sum() if num_items is None else num_items)
    grad = torch.is_grad_enabled()
    needs = (
        grad and hidden.requires_grad,
        grad and weight.requires_grad,
        grad and bias is not None and bias.requires_grad,
    )
    return ChunkedLinearCrossEntropy.apply(
        hidden, weight, bias, labels, max(denominator, 1.0), int(chunk_tokens), needs
    )


def _hf_causal_lm(model: nn.Module) -> nn.Module:
    """The transformers *ForCausalLM inside a LamdaModel, a PeftModel or a bare model."""
    from lamda_peft.integrations.hf_trainer import unwrap
    from lamda_peft.model import LamdaModel

    model = unwrap(model)
    if isinstance(model, LamdaModel):
        model = model.model
    elif hasattr(model, "get_base_model"):  # peft.PeftModel
        model = model.get_base_model()
    if not (hasattr(model, "get_decoder") and hasattr(model, "get_output_embeddings")):
        raise TypeError(f"memory-lean loss needs a transformers causal LM, got {type(model).__name__}")
    return model


def causal_lm_loss(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    num_items: int | torch.Tensor | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> torch.Tensor:
    """The causal-LM loss `model(**inputs).loss` would give, computed without the full logits.

    Runs the model's decoder (adapters included: they live inside it), then
    `chunked_linear_cross_entropy` on the shifted labels with the model's output head.

    Raises:
        ValueError: if the model post-processes its logits (soft-capping, a logit scale), which
            this loss does not reproduce, or `inputs` has no labels.
    """
    lm = _hf_causal_lm(model)
    cfg = lm.config
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        value = getattr(cfg, attr, None)
        if value not in (None, 1, 1.0):
            raise ValueError(f"memory-lean loss: {type(lm).__name__} sets config.{attr}={value}; use the stock loss")
    if "labels" not in inputs:
        raise ValueError("memory-lean loss: the batch has no 'labels'")
    labels = inputs["labels"]
    forward_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    hidden = lm.get_decoder()(**forward_inputs, use_cache=False).last_hidden_state  # (b, s, d)
    head = lm.get_output_embeddings()
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # token t predicts label t+1
    targets = labels[:, 1:].reshape(-1).to(hidden.device)
    return chunked_linear_cross_entropy(hidden, head.weight, targets, head.bias, num_items, chunk_tokens)
