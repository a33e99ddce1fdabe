"""`lamda-peft evaluate RUN`: score a trained adapter on held-out data (the run's own, or --data)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="evaluate a trained LaMDA adapter on held-out data")
    p.add_argument("run", help="a `lamda-peft train` output folder")
    p.add_argument("--data", help="held-out data file (default: the run's held-out set)")
    p.add_argument("--max-eval-rows", type=int, default=0, help="evaluate on the first N rows only (0 = all)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from transformers import DataCollatorWithPadding

    from lamda_peft.cli.convert import load_run
    from lamda_peft.tasks import causal_lm, classification
    from lamda_peft.training import _causal_rows, _classification_rows, _load_data

    model, tokenizer, s = load_run(args.run)
    s = dataclasses.replace(s, eval_data=args.data or s.eval_data, max_eval_rows=args.max_eval_rows or s.max_eval_rows)
    _, _, eval_df = _load_data(s)
    model.eval()
    results = {}
    with torch.no_grad():
        if s.task == "classification":
            names = json.loads((Path(args.run) / "metrics.json").read_text())["labels"]  # training's label order
            label_index = {v: i for i, v in enumerate(names)}
            as_text = eval_df.assign(**{s.label_column: eval_df[s.label_column].map(str)})
            rows = _classification_rows(tokenizer, as_text, s, label_index, s.eval_data or s.data)
            collate = DataCollatorWithPadding(tokenizer)
            logits = [
                model(**{k: v for k, v in collate(rows[i : i + 32]).items() if k != "labels"}).logits
                for i in range(0, len(rows), 32)
            ]
            labels = np.asarray([r["labels"] for r in rows])
            results = classification.classification_metrics(torch.cat(logits).numpy(), labels)
        elif s.task == "regression":
            from lamda_peft.tasks.metrics import regression_metrics

            rows = _classification_rows(tokenizer, eval_df, s, None, s.eval_data or s.data)
            collate = DataCollatorWithPadding(tokenizer)
            preds = [
                model(**{k: v for k, v in collate(rows[i : i + 32]).items() if k != "labels"}).logits
                for i in range(0, len(rows), 32)
            ]
            results = regression_metrics(torch.cat(preds).numpy(), np.asarray([r["labels"] for r in rows]))
        elif s.task == "seq2seq":
            from lamda_peft.tasks import seq2seq

            rows = eval_df
            sources = eval_df[s.source_column].astype(str).tolist()
            results, _ = seq2seq.evaluate(model, tokenizer, sources, eval_df[s.target_column].astype(str).tolist(), s)
        else:
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            rows = _causal_rows(tokenizer, eval_df, s, s.eval_data or s.data)
            collate = causal_lm.SFTCollator(tokenizer.pad_token_id)
            total, count = 0.0, 0
            for i in range(0, len(rows), 8):
                batch = collate(rows[i : i + 8])
                n = int((batch["labels"][:, 1:] != causal_lm.IGNORE_INDEX).sum())
                total += float(model(**batch).loss) * n
                count += n
            results = {"eval_loss": total / count, "perplexity": causal_lm.perplexity(total / count)}
    results["eval_rows"] = len(rows)
    print(json.dumps(results, indent=2))
    return 0
