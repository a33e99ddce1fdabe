"""Relaxed Recursive Transformers on the bundled SmolLM2-135M (30 layers): held-out loss against unique
parameters before and after a short CPU uptraining run (issue 12).

    OMP_NUM_THREADS=1 python benchmarks/recursive.py            # or: make bench-recursive

Held-out text: the first --eval-rows reviews of the bundled drug-review test split (English), mean
next-token loss over every real token (max --max-length tokens each). Uptraining: plain AdamW on
the train split's review text (loss on every token), --train-steps steps of --batch rows, the same
for every model; every unique parameter trains (shared weights, relaxations, norms, embeddings).
The grid is the issue's: K in {15, 10} x init in {stepwise, average} x relax rank in {0, 16, 64},
against the full model and the models cut to 15 and 10 layers; every reduced model is uptrained.
`--reuse OLD.json` keeps OLD's rows measured with the same settings; `--quick` (needs --out) runs
three rows on two short texts for one step, to check the plumbing. Writes benchmarks/results/recursive_smollm2.json (after every configuration, so a cut-short run
keeps what it measured) and recursive_smollm2.png.

    OMP_NUM_THREADS=1 python benchmarks/recursive.py --early-exit-only

computes only the early-exit figures (LM head after every loop, before uptraining, on the same
held-out texts; `lamda_peft.early_exit`) for the EARLY_EXIT configurations and merges them into the
existing JSON under "early_exit", keeping everything else in it. The depth-wise batching gain there
is an estimate from the exit shares (constant cost per loop, perfect batching), not measured serving.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from lamda_peft import __version__, assets
from lamda_peft.cli.recursive import heldout_early_exit, heldout_loss, heldout_texts
from lamda_peft.recursive import make_recursive, parameter_counts, truncate_layers

RESULTS = Path(__file__).parent / "results"
TRAIN_KEYS = ("train_steps", "train_length", "batch", "lr")

# (name, kind, K, init, rank): kind "full" | "cut" | "recursive"; the grid, K x init x rank
GRID = [("full", "full", 30, None, None), ("cut 15", "cut", 15, None, None), ("cut 10", "cut", 10, None, None)] + [
    (f"K{k} {init} r{rank}", "recursive", k, init, rank)
    for k in (15, 10)
    for init in ("stepwise", "average")
    for rank in (0, 16, 64)
]
QUICK_GRID = ["full", "cut 15", "K15 average r0"]
# early exit: (name, kind, loop size K, init, rank, uptrained); the full model, read with loops of 15
# or 10 layers, shows what a deep model's intermediate layers give the LM head; "uptrained" rows first
# run the same uptraining as the grid's rows (--train-steps steps, same data and settings)
EARLY_EXIT = [
    ("full, loops of 15", "full", 15, None, None, False),
    ("full, loops of 10", "full", 10, None, None, False),
    ("K15 average r0", "recursive", 15, "average", 0, False),
    ("K15 average r64", "recursive", 15, "average", 64, False),
    ("K15 stepwise r0", "recursive", 15, "stepwise", 0, False),
    ("K10 average r0", "recursive", 10, "average", 0, False),
    ("K15 average r0, uptrained", "recursive", 15, "average", 0, True),
    ("K10 average r0, uptrained", "recursive", 10, "average", 0, True),
]


def build(base, kind: str, k: int, init: str | None, rank: int | None):
    model = copy.deepcopy(base)
    if kind == "cut":
        return truncate_layers(model, k)
    if kind == "recursive":
        return make_recursive(model, k, init=init, relax_rank=rank, relax="lamda")
    return model


def uptrain(model, tokenizer, texts: list[str], steps: int, batch: int, length: int, lr: float) -> dict:
    """AdamW on every trainable parameter; returns losses and tokens/s (real tokens, no padding)."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses, tokens, start = [], 0, time.time()
    for step in range(steps):
        rows = [texts[(step * batch + i) % len(texts)] for i in range(batch)]
        enc = tokenizer(rows, return_tensors="pt", padding=True, truncation=True, max_length=length)
        labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
        loss = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        tokens += int(enc.attention_mask.sum())
    elapsed = time.time() - start
    model.eval()
    return {"train_losses": losses, "train_tokens": tokens, "train_s": elapsed, "tokens_per_s": tokens / elapsed}


def early_exit_only(args, base, tokenizer, texts: list[str], out: Path) -> None:
    """Early-exit rows merged into the existing JSON (its other content is kept as it is).

    Rows already in its "early_exit" section with the same held-out settings are kept, not rerun.
    """
    results = json.loads(out.read_text()) if out.is_file() else {}
    old = results.get("early_exit", {})
    same = all(old.get("settings", {}).get(k) == getattr(args, k) for k in ("eval_rows", "max_length"))
    previous = {row["name"]: row for row in old.get("rows", [])} if same else {}
    section = {
        "command": "OMP_NUM_THREADS=1 python " + " ".join(sys.argv),
        "settings": {
            "heldout": f"drug-review test split, first {len(texts)} rows",
            "eval_rows": args.eval_rows,
            "max_length": args.max_length,
            "relax": "lamda",
            "when": "before uptraining, except the rows named 'uptrained'",
            "uptraining": {k: getattr(args, k) for k in TRAIN_KEYS},
        },
        "estimate_note": "throughput_gain_estimate = num_loops / mean_exit_loop: the gain depth-wise batching would "
        "give if every token left at its earliest stable loop (final prediction as oracle), every loop cost the same "
        "and batching were perfect; computed from the shares, not measured serving",
        "rows": [],
    }
    results["early_exit"] = section
    train_texts = assets.drug_reviews()[0]["text"].astype(str).tolist()
    for name, kind, k, init, rank, uptrained in EARLY_EXIT:
        if name in previous:
            section["rows"].append({"uptrained": False, **previous[name]})
            continue
        start = time.time()
        model = build(base, kind, k, init, rank)
        row = {"name": name, "kind": kind, "loop_size": k, "init": init, "relax_rank": rank, "uptrained": uptrained}
        if uptrained:
            stats = uptrain(model, tokenizer, train_texts, args.train_steps, args.batch, args.train_length, args.lr)
            row.update(train_steps=args.train_steps, train_tokens=stats["train_tokens"])
        summary = heldout_early_exit(model, tokenizer, texts, args.max_length, loop_size=k)
        row.update(unique_parameters=parameter_counts(model)["unique"], **summary, time_s=time.time() - start)
        del row["estimate_note"]
        section["rows"].append(row)
        print(json.dumps({key: v for key, v in row.items() if key != "loops"}), flush=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
        del model


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for row in results["before"]:
        ax.scatter(row["unique_parameters"] / 1e6, row["heldout_loss"], color="C0")
        ax.annotate(row["name"], (row["unique_parameters"] / 1e6, row["heldout_loss"]), fontsize=7)
    after = [r for r in results["uptraining"]]
    if after:
        ax.scatter(
            [r["unique_parameters"] / 1e6 for r in after],
            [r["heldout_loss_after"] for r in after],
            color="C3",
            label=f"after {results['settings']['train_steps']} uptraining steps",
        )
    ax.set(xlabel="unique parameters (M)", ylabel="held-out loss", title="SmolLM2-135M, relaxed recursive (CPU)")
    ax.scatter([], [], color="C0", label="before training")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval-rows", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--train-steps", type=int, default=20)
    ap.add_argument("--train-length", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--out", default=None, help="JSON to write (default: results/recursive_smollm2.json)")
    ap.add_argument(
        "--early-exit-only",
        action="store_true",
        help="only the early-exit figures, merged into --out (its other content is kept)",
    )
    ap.add_argument(
        "--reuse", default=None, help="a previous JSON: its rows of the same name and settings are not re-evaluated"
    )
    ap.add_argument("--quick", action="store_true", help="full, cut 15 and K15 average r0 on 2 short texts, 1 step")
    ap.add_argument(
        "--only",
        default=None,
        help="comma-separated grid rows to run (e.g. 'cut 15,K15 average r0'; needs --out): a longer "
        "uptraining of a few models without rerunning the grid",
    )
    args = ap.parse_args()
    if (args.quick or args.only) and args.out is None:
        ap.error("--quick and --only need --out (they must not replace the committed results)")
    only = [name.strip() for name in args.only.split(",")] if args.only else None
    unknown = sorted(set(only or []) - {row[0] for row in GRID})
    if unknown:
        ap.error(f"--only: unknown grid row(s) {unknown}; known: {', '.join(row[0] for row in GRID)}")
    args.out = args.out or str(RESULTS / "recursive_smollm2.json")
    if args.quick:
        args.eval_rows, args.max_length, args.train_steps, args.batch, args.train_length = 2, 16, 1, 1, 16
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    path = assets.smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    texts = heldout_texts("drug-reviews", args.eval_rows)
    if args.early_exit_only:
        early_exit_only(args, base, tokenizer, texts, Path(args.out))
        return
    train_texts = assets.drug_reviews()[0]["text"].astype(str).tolist()
    results = {
        "command": "OMP_NUM_THREADS=1 python " + " ".join(sys.argv),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": "cpu",
        },
        "versions": {"lamda_peft": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "settings": {**vars(args), "heldout": f"drug-review test split, first {len(texts)} rows", "relax": "lamda"},
        "before": [],
        "uptraining": [],
    }
    out = Path(args.out)
    if out.is_file() and "early_exit" in json.loads(out.read_text()):  # written by --early-exit-only: keep it
        results["early_exit"] = json.loads(out.read_text())["early_exit"]

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")

    previous = {}
    if args.reuse:  # a cut-short run: keep what it measured (the held-out set and lengths must match)
        old = json.loads(Path(args.reuse).read_text())
        same = all(old["settings"].get(k) == getattr(args, k) for k in ("eval_rows", "max_length"))
        previous = {row["name"]: row for row in old["before"]} if same else {}
    old_after = {}
    if args.reuse:
        same_training = all(old["settings"].get(k) == getattr(args, k) for k in TRAIN_KEYS)
        old_after = {row["name"]: row for row in old.get("uptraining", [])} if same and same_training else {}
    grid = [row for row in GRID if (not args.quick or row[0] in QUICK_GRID) and (not only or row[0] in only)]
    for name, kind, k, init, rank in grid:
        if name in previous and (kind == "full" or name in old_after):  # nothing left to measure
            results["before"].append({**previous[name], "reused_from": args.reuse})
            if name in old_after:
                results["uptraining"].append({**old_after[name], "reused_from": args.reuse})
            continue
        start = time.time()
        model = build(base, kind, k, init, rank)
        convert_s = time.time() - start
        loss = (
            previous[name]["heldout_loss"]
            if name in previous
            else heldout_loss(model, tokenizer, texts, args.max_length)
        )
        row = {"name": name, "kind": kind, "layers_or_K": k, "init": init, "relax_rank": rank}
        row.update(unique_parameters=parameter_counts(model)["unique"], heldout_loss=loss, convert_s=convert_s)
        results["before"].append(row)
        print(json.dumps(row), flush=True)
        save()
        if kind != "full":  # uptrain every reduced model with the same data, steps and settings
            stats = uptrain(model, tokenizer, train_texts, args.train_steps, args.batch, args.train_length, args.lr)
            after = {
                "name": name,
                "unique_parameters": row["unique_parameters"],
                "heldout_loss_before": row["heldout_loss"],
                "heldout_loss_after": heldout_loss(model, tokenizer, texts, args.max_length),
                **stats,
            }
            results["uptraining"].append(after)
            print(json.dumps({key: v for key, v in after.items() if key != "train_losses"}), flush=True)
            save()
        del model
    plot(results, out.with_suffix(".png"))
    save()


if __name__ == "__main__":
    main()
