"""Export a LaMDA adapter as a plain PEFT LoRA adapter against the *original* base weights.

SPEC.md section 6: with W = W_res + scaling * B0 S0 A (the original weight),
    W_res + scaling * B S A = W + scaling * (B S - B0 S0) A
so LoRA rank r with `lora_A = A` and `lora_B = scaling * (B S - B0 S0)` and LoRA alpha = r
(PEFT scaling 1) reproduces the LaMDA model on the unmodified base. Any LoRA runtime can serve it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save as safetensors_bytes

from lamda_peft.checkpoint import WEIGHTS_NAME, atomic_write_bytes
from lamda_peft.layer import is_conv1d

PEFT_PREFIX = "base_model.model."


def lora_factors(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_A (r, d_in), lora_B (d_out, r)) of one LaMDA layer, for LoRA scaling 1."""
    with torch.no_grad():
        lora_B = layer.scaling * (layer.B @ layer.S - layer.B0 @ layer.S0)  # (d_out, r)
    return layer.A.detach().clone(), lora_B.detach()


def export_lora(lamda_model, directory: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write a PEFT LoRA adapter folder equivalent to `lamda_model` on the original base model.

    Args:
        lamda_model: the `LamdaModel` to export.
        directory: output folder (`adapter_config.json` + `adapter_model.safetensors`).
        dtype: tensor dtype in the file (default: the adapter's own, float32).
    """
    directory = Path(directory)
    state, ranks, names, fan_in_fan_out = {}, {}, [], False
    for name, layer in lamda_model.lamda_layers():
        if layer.merged:
            raise RuntimeError(f"export_lora: module {name!r} is merged; unmerge() the model before exporting")
        A, B = lora_factors(layer)
        cast = dtype or A.dtype
        state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = A.to(cast).contiguous().cpu()
        state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = B.to(cast).contiguous().cpu()
        ranks[name] = layer.r
        names.append(name)
        fan_in_fan_out |= is_conv1d(layer.base_layer)
    saved = []
    for module_name, (prefix, module) in zip(
        lamda_model.config.modules_to_save or [], lamda_model.modules_to_save(), strict=True
    ):
        saved.append(module_name)
        for pname, p in module.state_dict().items():
            state[f"{PEFT_PREFIX}{prefix}.{pname}"] = p.detach().contiguous().cpu()
    base_r = max(set(ranks.values()), key=list(ranks.values()).count)
    # Exact names, anchored, so that PEFT adapts exactly these modules; alpha = r => scaling 1.
    rank_pattern = {f"^{n}$": r for n, r in ranks.items() if r != base_r}
    config = LoraConfig(
        r=base_r,
        lora_alpha=base_r,
        target_modules=names,
        rank_pattern=rank_pattern,
        alpha_pattern=dict(rank_pattern),
        lora_dropout=0.0,
        bias="none",
        fan_in_fan_out=fan_in_fan_out,
        modules_to_save=saved or None,
        base_model_name_or_path=lamda_model.config.base_model_name_or_path,
    )
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(directory / WEIGHTS_NAME, safetensors_bytes(state, metadata={"format": "pt"}))
    config.save_pretrained(str(directory))  # PEFT's own writer for its own config format
    return directory
