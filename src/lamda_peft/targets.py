"""Which modules of a model get a LaMDA adapter: name lists, regexes and "all-linear"."""

from __future__ import annotations

import re

from torch import nn

from lamda_peft.config import ConfigError
from lamda_peft.layer import is_conv1d

# Heads that "all-linear" leaves alone (PEFT's convention: the output embedding and the usual
# sequence-classification head names).
_HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs")

# LaMDA's default targets per architecture (config.model_type), from the paper's setup: encoder
# self-attention, decoder self- and cross-attention, and the feed-forward layers. Architectures not
# listed get "all-linear".
ARCHITECTURE_TARGETS: dict[str, list[str]] = {
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "mbart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "deberta-v2": [
        "query_proj",
        "key_proj",
        "value_proj",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    ],
}


def default_targets(model: nn.Module) -> list[str] | str:
    """The per-architecture target list for `model` (by `config.model_type`), else "all-linear"."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return list(ARCHITECTURE_TARGETS.get(model_type, [])) or "all-linear"


def is_linear(module: nn.Module) -> bool:
    """`nn.Linear` or HF `Conv1D` (the two layer types LaMDA adapts)."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_module_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if name and is_linear(module)]


def _output_head_names(model: nn.Module) -> set[str]:
    names = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if out is not None and module is out:
            names.add(name)
        if name.split(".")[0] in _HEAD_NAMES:
            names.add(name)
    return names


def matches(name: str, target_modules: list[str] | str) -> bool:
    """Does module `name` match `target_modules` (a regex string or a list of names/suffixes)?"""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def find_targets(
    model: nn.Module, target_modules: list[str] | str | None, exclude: list[str] | None = None
) -> list[str]:
    """Names of the Linear/Conv1D modules to adapt, in model order.

    Raises:
        ConfigError (a ValueError): nothing matched (the message lists some of the model's linear layers), or a
            listed name matched a module that is not a Linear/Conv1D.
    """
    target_modules = "all-linear" if target_modules is None else target_modules
    if target_modules == "auto":
        target_modules = default_targets(model)
    excluded = set()
    for name in linear_module_names(model):
        if exclude and any(name == e or name.startswith(e + ".") or name.endswith("." + e) for e in exclude):
            excluded.add(name)
    if target_modules == "all-linear":
        heads = _output_head_names(model)
        found = [n for n in linear_module_names(model) if n not in heads and n not in excluded]
    else:
        found = []
        for name, module in model.named_modules():
            if not name or name in excluded or not matches(name, target_modules):
                continue
            if not is_linear(module):
                if isinstance(target_modules, list):  # a regex may well match containers; a name must not
                    raise ConfigError(
                        f"target module {name!r} is a {type(module).__name__}; LaMDA adapts nn.Linear and HF Conv1D only"
                    )
                continue
            found.append(name)
    if not found:
        available = linear_module_names(model)
        suffixes = sorted({n.split(".")[-1] for n in available})
        raise ConfigError(
            f"target_modules={target_modules!r} matched no Linear/Conv1D module. "
            f"Linear layer names in this model end with: {suffixes[:12]}; for example {available[:4]}"
        )
    return found


def module_to_save(model: nn.Module, name: str) -> tuple[str, nn.Module]:
    """The (path, module) that a `modules_to_save` entry names, the one rule for save, load and export.

    The exact path wins; otherwise exactly one module whose path ends in "." + name ("score" finds
    "model.score"). Raises ConfigError naming the entry when neither gives exactly one module.
    """
    modules = list(model.named_modules())
    hits = [(n, m) for n, m in modules if n == name] or [(n, m) for n, m in modules if n.endswith("." + name)]
    if len(hits) != 1:
        found = f"{len(hits)} modules ({', '.join(n for n, _ in hits[:4])})" if hits else "no module"
        raise ConfigError(f"modules_to_save entry {name!r} matches {found} of the model; expected exactly one")
    return hits[0]
