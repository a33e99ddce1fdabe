"""`lamda-peft merge` and `lamda-peft export-lora`: serve a trained adapter anywhere.

merge: a plain model folder that `transformers` loads without this package (for a mean-pooling
classifier, the merged encoder folder plus `classifier.safetensors` holding the head).
export-lora: a PEFT LoRA adapter against the original base (any LoRA runtime serves it).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lamda_peft.cli import CLIError


def add_parser(subparsers) -> None:
    for name, func, what in (
        ("merge", run_merge, "fold a LaMDA adapter into the base and write a plain transformers model folder"),
        ("export-lora", run_export, "write a LaMDA adapter as a PEFT LoRA adapter against the original base"),
    ):
        p = subparsers.add_parser(name, help=what, description=what)
        p.add_argument("run_or_adapter", help="a `lamda-peft train` output folder, or an adapter folder inside one")
        p.add_argument("output", help="folder to write")
        p.add_argument("--model", help="base model (default: the one recorded with the run)")
        p.set_defaults(func=func)


def load_run(path: str, model: str | None = None):
    """(LamdaModel, tokenizer, settings) from a run folder (or its adapter folder) on a pristine base."""
    from transformers import AutoTokenizer

    from lamda_peft.model import LamdaModel
    from lamda_peft.settings import TrainSettings
    from lamda_peft.training import _from_pretrained, resolve_model_path

    folder = Path(path)
    run_dir = folder.parent if (folder / "adapter_config.json").is_file() else folder
    adapter = folder if (folder / "adapter_config.json").is_file() else folder / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        if (folder / "checkpoints").is_dir():  # a run stopped before it wrote its adapter
            raise CLIError(
                f"{path} has checkpoints/ but no adapter/: the run did not finish; continue it with "
                "`lamda-peft train ... --resume latest` (the same command it was started with)"
            )
        raise CLIError(f"{path} is neither a run folder with adapter/ nor an adapter folder")
    resolved = run_dir / "resolved_config.json"
    if not resolved.is_file():
        raise CLIError(f"{run_dir} has no resolved_config.json: cannot tell which base model and task it used")
    s = TrainSettings(**json.loads(resolved.read_text()))
    if s.method not in ("lamda", "lamda++"):  # lora, lorafa, pissa, vera: a PEFT adapter; full: no adapter
        raise CLIError(
            f"{path} is a --method {s.method} run, not a LaMDA one: load it with peft "
            "(PeftModel.from_pretrained, then merge_and_unload) or transformers"
        )
    model_path = resolve_model_path(model or s.model)
    tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, model_path)
    if s.task in ("classification", "regression"):
        from lamda_peft.tasks.classification import build_classifier

        metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
        n_labels = 1 if s.task == "regression" else len(metrics.get("labels", [])) or _n_labels_from_adapter(adapter)
        base, _ = build_classifier(model_path, n_labels, s.pooling)
    elif s.task == "seq2seq":
        import torch
        from transformers import AutoModelForSeq2SeqLM

        base = _from_pretrained(AutoModelForSeq2SeqLM.from_pretrained, model_path, dtype=torch.float32)
    else:
        import torch
        from transformers import AutoModelForCausalLM

        base = _from_pretrained(AutoModelForCausalLM.from_pretrained, model_path, dtype=torch.float32)
    return LamdaModel.from_pretrained(base, adapter), tokenizer, s


def _n_labels_from_adapter(adapter: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        key = next(k for k in f.keys() if k.endswith("classifier.weight") or k.endswith("score.weight"))
        return f.get_slice(key).get_shape()[0]


def run_merge(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    from lamda_peft.tasks.classification import MeanPoolClassifier

    model, tokenizer, _ = load_run(args.run_or_adapter, args.model)
    plain = model.merge_and_unload()
    out = Path(args.output)
    if isinstance(plain, MeanPoolClassifier):
        plain.encoder.save_pretrained(out)
        save_file(
            {k: v.contiguous() for k, v in plain.classifier.state_dict().items()}, str(out / "classifier.safetensors")
        )
    else:
        plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"merged model written to {out}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    model, _, _ = load_run(args.run_or_adapter, args.model)
    model.export_lora(args.output)
    print(f"PEFT LoRA adapter written to {args.output}")
    return 0
