"""Recipes: one YAML of `lamda-peft train` settings per experiment of the LaMDA paper.

Each file holds `TrainSettings` fields (the same keys as `--config`); a comment on each value
says where it comes from: the paper / the authors' released scripts (as quoted in issue 10), or
"our choice" where the paper's value is unknown. The first comment line is the description that
`lamda-peft recipes` prints. `lamda-peft train --recipe NAME [flags]` runs one; flags win.
"""

from __future__ import annotations

from pathlib import Path

RECIPE_DIR = Path(__file__).parent


def recipe_names() -> list[str]:
    """Sorted names of the shipped recipes (file names without .yaml)."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def recipe_path(name: str) -> Path:
    """The YAML file of recipe `name`.

    Raises:
        KeyError: no such recipe (the message lists the known ones).
    """
    path = RECIPE_DIR / f"{name}.yaml"
    if not path.is_file():
        raise KeyError(f"unknown recipe {name!r}; known recipes: {', '.join(recipe_names())}")
    return path


def recipe_description(name: str) -> str:
    """The first comment line of the recipe file, without the '#'."""
    for line in recipe_path(name).read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return ""
