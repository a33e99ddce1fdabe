"""`lamda-peft train`: flags generated from `TrainSettings`; a config file may carry the same fields."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

from lamda_peft.settings import TrainSettings, field_type, load_settings_file, means_none


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="fine-tune a model (default: LaMDA on the bundled MiniLM + drug reviews)",
        description="Fine-tune with LaMDA, LaMDA++ or PEFT LoRA. Precedence: defaults < --recipe < --config file < flags.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--config", help="YAML or JSON file with any of the options below (same names)", default=argparse.SUPPRESS
    )
    p.add_argument(
        "--recipe",
        help="a shipped recipe for one of the paper's experiments (`lamda-peft recipes` lists them)",
        default=argparse.SUPPRESS,
    )
    for f in dataclasses.fields(TrainSettings):
        flag = "--" + f.name.replace("_", "-")
        kwargs = {"help": f.metadata["help"], "default": argparse.SUPPRESS, "dest": f.name}
        if f.type in ("bool", bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _type_of(f)
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
        kwargs["help"] += f" (default: {f.default})"
        p.add_argument(flag, **kwargs)
    p.set_defaults(func=run)


def _type_of(f: dataclasses.Field):
    """The flag's converter: int, float or str; "none" gives None where the field allows it (--head-lr none)."""
    name, optional = field_type(f)
    base = {"int": int, "float": float}.get(name, str)
    if not optional or base is str:  # a str field keeps "none" as text: its choices name what it allows
        return base

    def convert(text: str):
        return None if means_none(text) else base(text)

    convert.__name__ = f"{base.__name__} or none"  # what argparse names in its error message
    return convert


def settings_from_args(args: argparse.Namespace) -> TrainSettings:
    values = {}
    if getattr(args, "recipe", None):
        from lamda_peft.cli import CLIError
        from lamda_peft.recipes import recipe_path

        try:
            values.update(load_settings_file(recipe_path(args.recipe)))
        except KeyError as err:
            raise CLIError(err.args[0]) from None
    if getattr(args, "config", None):
        values.update(load_settings_file(args.config))
    names = {f.name for f in dataclasses.fields(TrainSettings)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    return TrainSettings(**values)


def run(args: argparse.Namespace) -> int:
    from lamda_peft.training import run_training

    settings = settings_from_args(args)
    if settings.quiet:  # this process ends with the command: the global switch is ours to set
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    metrics = run_training(settings)
    keys = [
        "accuracy",
        "macro_f1",
        "majority_baseline",
        "matthews",
        "pearson",
        "spearman",
        "rouge1",
        "rouge2",
        "rougeL",
        "exact_match_before",
        "exact_match",
        "rougeL_before",
        "bleu",
        "metric",
        "score",
        "eval_loss_before",
        "eval_loss",
        "perplexity_before",
        "perplexity",
        "trainable_params_start",
        "trainable_params_end",
        "parameter_updates",
        "train_tokens_per_s",
        "peak_memory_mb",
        "wall_time_s",
        "output_dir",
    ]
    summary = {k: metrics[k] for k in keys if k in metrics}
    if int(os.environ.get("RANK", "0")) == 0:  # one summary under `accelerate launch`
        print(json.dumps(summary, indent=2))
    return 0
