"""Which L2 penalty `--head-init probe` picks on the bundled MiniLM + drug reviews, with the
contiguous cross-validation folds the 18-seed QLaMDA probe runs used and with the seeded shuffle that
replaced them, for seeds 0-17 (the seed sets the head's start). The same penalty means the same
final fit (on all rows, from the same start), so those runs stand for the current code.

    python benchmarks/probe_folds_check.py   # writes benchmarks/results/probe_folds.json (~3 min, CPU)
"""

import json
import sys

import torch
from transformers import AutoTokenizer, DataCollatorWithPadding

from lamda_peft import training
from lamda_peft.settings import TrainSettings
from lamda_peft.tasks import classification, data, head_probe

s = TrainSettings(head_init="probe", quantize="nf4")
s.validate()
path = training.resolve_model_path(s.model)
source, train_df, eval_df = training._load_data(s)
tok = AutoTokenizer.from_pretrained(path)
labels = data.class_labels(train_df[s.label_column], source, s.label_column)
idx = {v: i for i, v in enumerate(labels)}
rows = training._classification_rows(tok, train_df, s, idx, source)
collator = DataCollatorWithPadding(tok)
batches = training._calibration_sample(rows, collator, s)
out = {}
x = y = None
for seed in range(18):
    torch.manual_seed(seed)
    base, head = classification.build_classifier(path, len(labels), s.pooling)
    name = head if isinstance(head, str) else head[0]
    if x is None:
        x, y = head_probe.head_inputs(base, base.get_submodule(name), batches)
        x = x.float()
    hm = base.get_submodule(name).float()
    start = {k: v.clone() for k, v in hm.state_dict().items()}
    n, folds = len(y), 5
    bounds = [round(i * n / folds) for i in range(folds + 1)]
    schemes = {
        "contiguous": [torch.arange(bounds[f], bounds[f + 1]) for f in range(folds)],  # the old folds
        "shuffled": head_probe.fold_indices(n, folds, seed),
    }
    res = {}
    for scheme, held in schemes.items():
        cv = head_probe.cv_losses(hm, start, x, y, held, head_probe.L2_GRID, 500)
        res[scheme] = head_probe.lowest_loss_l2(cv)
        res[scheme + "_cv"] = cv
    out[seed] = res
    print(seed, res["contiguous"], res["shuffled"], flush=True)
same = sum(r["contiguous"] == r["shuffled"] for r in out.values())
result = {
    "command": "python benchmarks/probe_folds_check.py",
    "rows": len(y),
    "seeds_with_the_same_l2": same,
    "seeds": len(out),
    "per_seed": out,
}
path = sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/probe_folds.json"
with open(path, "w") as f:
    json.dump(result, f, indent=1, default=str)
print(f"{same} of {len(out)} seeds pick the same L2 with either folds")
