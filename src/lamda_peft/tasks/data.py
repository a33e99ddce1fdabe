"""Loading the user's data (CSV, JSONL/JSON, a `datasets` folder or hub name) or the bundled sets.

Every problem is reported as `DataError` naming the file, the column and (for bad values) the
first offending row, before any training starts.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from lamda_peft import assets

BUNDLED = {
    "drug-reviews": "the bundled Drugs.com reviews (600 train / 379 test; text, label)",
    "humaneval": "the bundled HumanEval prompts + canonical solutions (164; prompt, response)",
}


class DataError(ValueError):
    """The data cannot be used as given (missing column, empty, bad labels...)."""


def load_table(source: str) -> pd.DataFrame:
    """A table from a CSV/TSV/JSONL/JSON/Parquet file, a `datasets` folder, or a hub dataset.

    A hub dataset is `NAME[:CONFIG][@SPLIT]` (split default: train), e.g. `nyu-mll/glue:sst2@validation`.
    """
    path = Path(source)
    if path.is_file():
        suffix = path.suffix.lower()
        try:
            if suffix in (".csv",):
                df = pd.read_csv(path)
            elif suffix in (".tsv",):
                df = pd.read_csv(path, sep="\t")
            elif suffix in (".jsonl",):
                df = pd.read_json(path, lines=True)
            elif suffix in (".json",):
                try:
                    df = pd.read_json(path, lines=True)
                except ValueError:
                    df = pd.read_json(path)
            elif suffix in (".parquet",):
                df = pd.read_parquet(path)
            else:
                raise DataError(
                    f"{path}: unknown data format {suffix!r}; expected .csv, .tsv, .jsonl, .json or .parquet"
                )
        except DataError:
            raise
        except Exception as err:
            raise DataError(f"{path}: cannot be read as {suffix[1:]} ({type(err).__name__}: {err})") from None
    elif path.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as err:
            raise DataError(f"{path}: not a `datasets` folder saved with save_to_disk ({err})") from None
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        df = ds.to_pandas()
    else:
        name, config, split = parse_hub_spec(source)
        if "/" not in name and not name.replace("-", "").replace("_", "").isalnum():
            raise DataError(f"data {source!r} is not a file, a folder or a dataset name")
        import datasets

        try:
            df = datasets.load_dataset(name, config, split=split).to_pandas()
        except Exception as err:
            raise DataError(
                f"data {source!r} is not a local file or folder, and loading it from the Hugging Face hub failed "
                f"({type(err).__name__}: {str(err)[:200]}). Offline? Pass a local CSV/JSONL file or a saved folder."
            ) from None
    if len(df) == 0:
        raise DataError(f"{source}: the data is empty (0 rows)")
    return df


def parse_hub_spec(source: str) -> tuple[str, str | None, str]:
    """`NAME[:CONFIG][@SPLIT]` -> (name, config or None, split, default "train").

    For example `nyu-mll/glue:cola@validation` or `openai/gsm8k:main@test`.
    """
    name, _, split = source.partition("@")
    name, _, config = name.partition(":")
    return name, config or None, split or "train"


def require_columns(df: pd.DataFrame, columns: list[str], source: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(f"{source}: column(s) {missing} not found; available columns: {list(df.columns)}")


def bundled(name: str) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """(train, held-out or None) frames of a bundled data set."""
    if name == "drug-reviews":
        return assets.drug_reviews()
    if name == "humaneval":
        rows = assets.humaneval()
        df = pd.DataFrame({"prompt": [r["prompt"] for r in rows], "response": [r["canonical_solution"] for r in rows]})
        return df, None
    raise DataError(f"unknown bundled data {name!r}; bundled: {sorted(BUNDLED)}")


def split_heldout(df: pd.DataFrame, fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A seeded random held-out split (the same seed always gives the same split)."""
    heldout = df.sample(n=max(1, round(fraction * len(df))), random_state=seed)
    train = df.drop(heldout.index)
    if len(train) == 0 or len(heldout) == 0:
        raise DataError(f"{len(df)} rows are too few to hold out {fraction:.0%} for evaluation")
    return train.reset_index(drop=True), heldout.reset_index(drop=True)


def class_labels(values: pd.Series, source: str, column: str, min_classes: int = 2) -> list:
    """The sorted class names of a label column; integers or strings only.

    `min_classes`: 2 for training data (one class teaches nothing); a held-out set may hold one.
    """
    for i, v in enumerate(values.tolist()):
        integral_float = isinstance(v, float) and v.is_integer()  # pandas reads int columns with gaps as float
        if isinstance(v, bool) or not (isinstance(v, (int, str)) or integral_float):
            raise DataError(
                f"{source}: label column {column!r} row {i} holds {v!r} ({type(v).__name__}); "
                "classification labels must be integers or strings"
            )
    cleaned = values.map(lambda v: int(v) if not isinstance(v, str) else v)
    kinds = {type(v) for v in cleaned}
    if len(kinds) > 1:
        raise DataError(f"{source}: label column {column!r} mixes integers and strings")
    labels = sorted(cleaned.unique().tolist())
    if len(labels) < min_classes:
        raise DataError(f"{source}: label column {column!r} has a single class {labels}; need at least {min_classes}")
    return labels


def regression_labels(values: pd.Series, source: str, column: str) -> list[float]:
    """The label column as floats; the first row that is not a finite number is named."""
    import math

    out = []
    for i, v in enumerate(values.tolist()):
        try:
            x = float(v) if not isinstance(v, bool) else None
        except (TypeError, ValueError):
            x = None
        if x is None or not math.isfinite(x):
            raise DataError(
                f"{source}: label column {column!r} row {i} holds {v!r}; regression labels must be finite numbers"
            )
        out.append(x)
    return out
