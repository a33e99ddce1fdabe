"""`lamda-peft recipes`: list the shipped recipes (one per experiment of the paper)."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "recipes",
        help="list the recipes for the paper's experiments (run one with `lamda-peft train --recipe NAME`)",
        description="List the recipes; `--show NAME` prints one recipe's YAML (values with their sources).",
    )
    p.add_argument("--show", metavar="NAME", help="print this recipe's file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lamda_peft.cli import CLIError
    from lamda_peft.recipes import recipe_description, recipe_names, recipe_path

    if args.show:
        try:
            print(recipe_path(args.show).read_text(), end="")
        except KeyError as err:
            raise CLIError(err.args[0]) from None
        return 0
    names = recipe_names()
    width = max(len(n) for n in names)
    for name in names:
        print(f"{name:<{width}}  {recipe_description(name)}")
    return 0
