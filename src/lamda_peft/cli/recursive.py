"""`lamda-peft recursive MODEL`: convert a decoder into a relaxed recursive model (issue 12).

Loads MODEL (a folder or the bundled `smollm2`), ties its N layers into K shared ones
(`make_recursive`), reports unique parameters and the held-out loss on English text (default: the
bundled drug-review test split), and with `--output DIR` writes a folder that `load_recursive`
and `lamda-peft train --task causal-lm --model DIR --method full` (uptraining) take. `--early-exit`
adds the per-loop early-exit table (`lamda_peft.early_exit`) to the report and prints it to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

from lamda_peft.cli import CLIError
from lamda_peft.hooks import evaluating


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "recursive",
        help="turn a decoder into a relaxed recursive model (K shared layers looped, low-rank relaxation)",
        description="Relaxed Recursive Transformers: tie N decoder layers into K shared ones looped N/K times "
        "(position l runs shared layer l mod K), relax each position with a low-rank path from the SVD of "
        "W_l - W_shared, and report unique parameters and held-out loss.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL", help="a local causal-LM folder, or 'smollm2'")
    p.add_argument("--unique-layers", type=int, required=True, help="K, a divisor of the number of layers")
    p.add_argument("--init", choices=["stepwise", "average", "lower"], default="stepwise", help="shared-weight init")
    p.add_argument("--relax-rank", type=int, default=0, help="relaxation rank (0 = strict recursive model)")
    p.add_argument("--relax", choices=["lamda", "lora"], default="lamda", help="relaxation kind")
    p.add_argument("--output", default=None, help="write the recursive model folder here")
    p.add_argument("--eval-data", default="drug-reviews", help="held-out text: 'drug-reviews' or a table file")
    p.add_argument("--text-column", default="text", help="text column of --eval-data")
    p.add_argument("--eval-rows", type=int, default=32, help="held-out rows scored (0 = skip the evaluation)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per held-out row")
    p.add_argument("--baseline", action="store_true", help="also score the original model")
    p.add_argument(
        "--early-exit",
        action="store_true",
        help="LM head after every loop on the held-out text: per-loop loss, share of tokens already predicting the "
        "final token, and the depth-wise batching throughput ESTIMATE (not measured serving)",
    )
    p.set_defaults(func=run)


def heldout_texts(source: str = "drug-reviews", rows: int = 32, text_column: str = "text") -> list[str]:
    """The first `rows` held-out texts: the bundled drug-review test split, or a table file's column."""
    from lamda_peft.tasks import data

    if source == "drug-reviews":
        df = data.bundled(source)[1]
    else:
        df = data.load_table(source)
        data.require_columns(df, [text_column], source)
    return df[text_column].astype(str).tolist()[:rows] if rows else df[text_column].astype(str).tolist()


@torch.no_grad()
def heldout_loss(model, tokenizer, texts: list[str], max_length: int = 128, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy over every real token of `texts` (padding excluded)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    total, count = 0.0, 0
    with evaluating(model):
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(
                texts[i : i + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=max_length
            )
            logits = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits[:, :-1]  # (b, t-1, V)
            labels = enc.input_ids[:, 1:].masked_fill(enc.attention_mask[:, 1:] == 0, -100)
            total += float(
                torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100, reduction="sum"
                )
            )
            count += int((labels != -100).sum())
    return total / count if count else math.nan


@torch.no_grad()
def heldout_early_exit(model, tokenizer, texts: list[str], max_length: int = 128, batch_size: int = 8, loop_size=None):
    """`early_exit_profile` on `texts`, tokenized and batched exactly as `heldout_loss` does."""
    from lamda_peft.early_exit import early_exit_counts

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    total = None
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[i : i + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=max_length
        )
        part = early_exit_counts(model, enc.input_ids, enc.attention_mask, loop_size=loop_size)
        total = part if total is None else total + part
    return total.summary()


def run(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lamda_peft.recursive import RecursiveError, make_recursive, parameter_counts, save_recursive
    from lamda_peft.training import resolve_model_path

    path = resolve_model_path(args.model)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise CLIError(f"cannot load a causal LM from {path}: {err}") from None
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = heldout_texts(args.eval_data, args.eval_rows, args.text_column) if args.eval_rows else []
    report: dict = {"model": args.model, "original_parameters": parameter_counts(model)["unique"]}
    if args.baseline and texts:
        report["original_heldout_loss"] = heldout_loss(model, tokenizer, texts, args.max_length)
    start = time.time()
    try:
        make_recursive(model, args.unique_layers, init=args.init, relax_rank=args.relax_rank, relax=args.relax)
    except RecursiveError as err:
        raise CLIError(str(err)) from None
    cfg = model.recursive_config
    report.update(
        unique_layers=cfg.unique_layers,
        num_layers=cfg.num_layers,
        init=cfg.init,
        relax=cfg.relax,
        relax_rank=cfg.relax_rank,
        rank_capped={name: cfg.ranks[name] for name in cfg.capped},
        unique_parameters=parameter_counts(model)["unique"],
        convert_time_s=round(time.time() - start, 2),
    )
    if texts:
        report.update(heldout_loss=heldout_loss(model, tokenizer, texts, args.max_length), heldout_rows=len(texts))
    if args.early_exit:
        if not texts:
            raise CLIError("--early-exit needs held-out text: --eval-rows must be > 0")
        from lamda_peft.early_exit import format_table

        report["early_exit"] = heldout_early_exit(model, tokenizer, texts, args.max_length)
        print(format_table(report["early_exit"]), file=sys.stderr)  # stdout stays one JSON document
    if args.output:
        save_recursive(model, args.output)
        tokenizer.save_pretrained(args.output)
        report["output"] = args.output
    print(json.dumps(report, indent=2))
    return 0
