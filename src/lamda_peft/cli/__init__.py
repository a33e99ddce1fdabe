"""`lamda-peft` command line: one subcommand per module in this package.

| subcommand   | module         | what                                                |
|--------------|----------------|-----------------------------------------------------|
| train        | train.py       | fine-tune with LaMDA / LaMDA++ / PEFT LoRA          |
| evaluate     | evaluate.py    | score a saved adapter on held-out data              |
| merge        | convert.py     | fold an adapter into a plain transformers folder    |
| export-lora  | convert.py     | write a PEFT LoRA adapter folder                    |
| ranks        | ranks.py       | LaMDA++ energy scores and allocated ranks           |
| recipes      | recipes.py     | list the recipes for the paper's experiments        |
| recursive    | recursive.py   | relaxed recursive model: tie layers, relax, report  |
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (subcommand, module) pairs; each module defines `add_parser(subparsers)` that sets `func`.
SUBCOMMANDS = [
    ("train", "lamda_peft.cli.train"),
    ("evaluate", "lamda_peft.cli.evaluate"),
    ("merge", "lamda_peft.cli.convert"),
    ("export-lora", "lamda_peft.cli.convert"),
    ("ranks", "lamda_peft.cli.ranks"),
    ("recipes", "lamda_peft.cli.recipes"),
    ("recursive", "lamda_peft.cli.recursive"),
]


class CLIError(Exception):
    """A user error: printed as one clear line, exit status 2, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    from lamda_peft import __version__

    parser = argparse.ArgumentParser(
        prog="lamda-peft", description="Fine-tune pretrained models with LaMDA and LaMDA++ adapters."
    )
    parser.add_argument("--version", action="version", version=f"lamda-peft {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    added = set()
    for _name, module_name in SUBCOMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name == module_name:  # subcommand not part of this build
                continue
            raise
        if module_name not in added:
            module.add_parser(sub)
            added.add(module_name)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv:
        argv = ["train"]  # `lamda-peft` alone runs the bundled default fine-tune
    args = parser.parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()  # load reports would hide our messages
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from lamda_peft.checkpoint import AdapterLoadError
    from lamda_peft.config import ConfigError
    from lamda_peft.tasks.data import DataError

    try:
        return int(args.func(args) or 0)
    except (CLIError, DataError, ConfigError, AdapterLoadError) as err:
        print(f"lamda-peft {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
