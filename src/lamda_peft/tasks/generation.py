"""Generation-based evaluation of causal LMs (`--eval-generate`): answers to held-out prompts.

Each prompt is left-padded (so generation continues right after it), the model generates up to
`max_new_tokens` (greedy or beam search), and the continuation is scored against the response
column: exact match after answer extraction (GSM8K's `#### <number>` by default, `--answer-regex`),
ROUGE-L and corpus BLEU for free text.
"""

from __future__ import annotations

import torch

from lamda_peft.tasks.metrics import bleu, exact_match, rouge_scores


@torch.no_grad()
def batched_generate(
    model,
    tokenizer,
    texts: list[str],
    max_length: int,
    num_beams: int,
    max_new_tokens: int,
    batch_size: int,
    continuation_only: bool,
) -> list[str]:
    """Generate for `texts` in batches (eval mode, greedy or beam search); the model's mode is restored.

    Under torch.distributed (`accelerate launch`) each process generates for its share of `texts`
    and every process gets all the outputs back, in order (see `across_ranks`).

    Args:
        continuation_only: decoder-only models: left-pad the prompts (generation appends on the
            right, so prompts must end there), cut a prompt longer than `max_length` on the left
            (its end is what the answer continues) and return only the new tokens. False for
            encoder-decoder models, whose output is the generated text itself.
    """
    return across_ranks(
        lambda share: _generate(
            model, tokenizer, share, max_length, num_beams, max_new_tokens, batch_size, continuation_only
        ),
        texts,
        model,
    )


def across_ranks(fn, items: list, model=None) -> list:
    """`fn(items)`, with the items split round-robin over the torch.distributed processes.

    Each process runs `fn` on items[rank::world] and every process returns the outputs of all of
    them, in the order of `items`. One process, or a model sharded by FSDP (whose every forward is
    a collective that all ranks must join in step), runs `fn(items)` whole.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1 or _is_fsdp(model):
        return fn(items)
    rank, world = dist.get_rank(), dist.get_world_size()
    shares: list = [None] * world
    dist.all_gather_object(shares, list(fn(items[rank::world])))
    outputs: list = [None] * len(items)
    for r, share in enumerate(shares):
        outputs[r::world] = share
    return outputs


def _is_fsdp(model) -> bool:
    if model is None:
        return False
    from torch.distributed.fsdp import FullyShardedDataParallel

    fsdp2 = getattr(torch.distributed.fsdp, "FSDPModule", ())
    return any(isinstance(m, (FullyShardedDataParallel, fsdp2)) for m in model.modules())


def _generate(model, tokenizer, texts, max_length, num_beams, max_new_tokens, batch_size, continuation_only):
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sides = tokenizer.padding_side, tokenizer.truncation_side
    if continuation_only:
        tokenizer.padding_side = tokenizer.truncation_side = "left"
    extra = {"pad_token_id": tokenizer.pad_token_id} if continuation_only else {}
    outputs = []
    try:
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(
                texts[i : i + batch_size], truncation=True, max_length=max_length, padding=True, return_tensors="pt"
            ).to(device)
            ids = model.generate(
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                num_beams=num_beams,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                **extra,
            )
            if continuation_only:
                ids = ids[:, enc["input_ids"].shape[1] :]  # (batch, new tokens)
            outputs += tokenizer.batch_decode(ids, skip_special_tokens=True)
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = sides
        model.train(was_training)
    return outputs


def generate_continuations(
    model, tokenizer, prompts: list[str], max_length: int, num_beams: int, max_new_tokens: int, batch_size: int = 8
) -> list[str]:
    """The text each prompt is continued with (prompt tokens removed)."""
    return batched_generate(model, tokenizer, prompts, max_length, num_beams, max_new_tokens, batch_size, True)


def evaluate(model, tokenizer, prompts: list[str], references: list[str], s) -> tuple[dict, list[str]]:
    """({exact_match, rougeL, bleu}, generated continuations) for held-out prompt/response pairs."""
    predictions = generate_continuations(model, tokenizer, prompts, s.max_length, s.num_beams, s.max_new_tokens)
    metrics = {
        "exact_match": exact_match(predictions, references, s.answer_regex or None),
        "rougeL": rouge_scores(predictions, references, kinds=("rougeL",))["rougeL"],
        "bleu": bleu(predictions, references),
    }
    return metrics, predictions
