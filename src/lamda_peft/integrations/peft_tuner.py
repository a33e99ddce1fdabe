"""`LamdaTuner`: the PEFT `BaseTuner` that injects `LamdaPeftLinear` layers (PEFT's "model class").

PEFT calls it from `get_peft_model`, `PeftModel.add_adapter`/`load_adapter`/`from_pretrained` and
`inject_adapter_in_model` (transformers' `model.load_adapter`). Target selection follows
`targets.find_targets` exactly, so one `LamdaConfig` adapts the same modules through PEFT as through
`get_lamda_model`; "all-linear" (and None) is resolved to the explicit module names before PEFT's
own matcher runs, as PEFT does for LoRA, and those names are what `adapter_config.json` then holds.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from lamda_peft.config import LamdaConfig
from lamda_peft.integrations.peft_layer import LamdaPeftLinear
from lamda_peft.layer import linear_shape, torch_layout_weight
from lamda_peft.model import initial_factors
from lamda_peft.quantization import quantized_format
from lamda_peft.schedule import FreezeSchedule
from lamda_peft.targets import _output_head_names, is_linear, matches

PREFIX = "lamda_"  # every LaMDA tensor name under PEFT starts with it (`lamda_adapter.<name>.A`, ...)


def _linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> Linear/Conv1D of `model`, counting a PEFT tuner layer as the linear it wraps.

    Modules inside tuner layers and inside `modules_to_save` wrappers are skipped: a second adapter
    targets the same names as the first, never the first one's internals.
    """
    found: dict[str, nn.Module] = {}
    wrappers: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(w) for w in wrappers):
            continue
        if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
            wrappers.append(name + ".")
            if isinstance(module, BaseTunerLayer) and is_linear(module.get_base_layer()):
                found[name] = module.get_base_layer()
            continue
        if is_linear(module):
            found[name] = module
    return found


def resolve_targets(model: nn.Module, target_modules: list[str] | str | None, exclude: list[str] | None) -> list[str]:
    """`targets.find_targets`' answer for a model that may already hold PEFT tuner layers.

    Raises:
        ValueError: nothing matched, or a listed name matched a module that is not a Linear/Conv1D.
    """
    target_modules = "all-linear" if target_modules is None else target_modules
    linears = _linear_modules(model)

    def excluded(name: str) -> bool:
        return bool(exclude) and any(name == e or name.startswith(e + ".") or name.endswith("." + e) for e in exclude)

    if target_modules == "all-linear":
        heads = _output_head_names(model)
        found = [n for n in linears if n not in heads and not excluded(n)]
    else:
        if isinstance(target_modules, list):  # a listed name must name a linear (find_targets' rule)
            skip = tuple(n + "." for n in linears)
            for name, module in model.named_modules():
                if name and name not in linears and not name.startswith(skip) and matches(name, target_modules):
                    if not excluded(name) and not isinstance(module, AuxiliaryTrainingWrapper):
                        raise ValueError(
                            f"target module {name!r} is a {type(module).__name__}; "
                            "LaMDA adapts nn.Linear and HF Conv1D only"
                        )
        found = [n for n in linears if matches(n, target_modules) and not excluded(n)]
    if not found:
        suffixes = sorted({n.split(".")[-1] for n in linears})
        raise ValueError(
            f"target_modules={target_modules!r} matched no Linear/Conv1D module. "
            f"Linear layer names in this model end with: {suffixes[:12]}; for example {list(linears)[:4]}"
        )
    return found


class LamdaTuner(BaseTuner):
    """Injects LaMDA adapters into a model for PEFT. Users never build it: `peft.get_peft_model` does."""

    prefix: str = PREFIX
    tuner_layer_cls = LamdaPeftLinear
    target_module_mapping: dict[str, list[str]] = {}  # no per-architecture defaults: None means "all-linear"

    def attach_optimizer(self, optimizer: torch.optim.Optimizer, total_steps: int) -> FreezeSchedule:
        """`lamda_peft.attach_optimizer` as a method: `peft_model.attach_optimizer(optimizer, T)` reaches it."""
        from lamda_peft.integrations.peft_training import attach_optimizer

        return attach_optimizer(self.model, optimizer, total_steps)

    def trainable_parameter_count(self) -> int:
        """Trainable parameters right now, as `LamdaModel` counts them: r^2 + d_out * unfrozen(B) per
        trainable adapter, plus everything else that requires grad (modules_to_save)."""
        from lamda_peft.integrations.peft_training import lamda_adapters

        units = lamda_adapters(self.model)
        lamda_ids = {id(p) for u in units for p in (u.dS, u.dB)}
        count = sum(u.trainable_count() for u in units if u.dS.requires_grad)
        return count + sum(p.numel() for p in self.model.parameters() if p.requires_grad and id(p) not in lamda_ids)

    def _prepare_adapter_config(self, peft_config: LamdaConfig, model_config: dict) -> LamdaConfig:
        if not isinstance(peft_config, LamdaConfig):
            raise TypeError(f"LaMDA's PEFT tuner needs a lamda_peft.LamdaConfig, got {type(peft_config).__name__}")
        if peft_config.quantize is not None:  # issue 11 lives in quantization.py, behind get_lamda_model
            raise ValueError("quantize is supported by lamda_peft.get_lamda_model, not by peft.get_peft_model")
        if peft_config.target_modules is None:
            peft_config.target_modules = "all-linear"
        return peft_config

    def _prepare_model(self, peft_config: LamdaConfig, model: nn.Module) -> None:
        """Before any module is replaced: LaMDA++ ranks, target resolution and the rank check."""
        if peft_config.rank_allocation == "energy" and not peft_config.rank_pattern:
            from lamda_peft.rank_allocation import allocate_model_ranks

            peft_config.rank_pattern = allocate_model_ranks(model, peft_config).ranks
        names = resolve_targets(model, peft_config.target_modules, peft_config.modules_to_save)
        linears = _linear_modules(model)
        for name in names:
            d_out, d_in = linear_shape(linears[name])
            r = peft_config.rank_for(name)
            if r > min(d_out, d_in):
                raise ValueError(
                    f"rank {r} for module {name!r} exceeds min(d_in, d_out) = {min(d_in, d_out)} of its {d_out}x{d_in} weight"
                )
        if peft_config.target_modules == "all-linear":
            # Full module names: PEFT's matcher then selects exactly find_targets' modules.
            peft_config.target_modules = names

    def _create_and_replace(
        self,
        peft_config: LamdaConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not is_linear(base):
            raise ValueError(
                f"target module {current_key!r} is a {type(base).__name__}; LaMDA adapts nn.Linear and HF Conv1D only"
            )
        if quantized_format(base) is not None:
            raise ValueError(
                f"module {current_key!r} is quantized ({type(base).__name__}); adapt quantized models with "
                "lamda_peft.get_lamda_model"
            )
        if isinstance(target, BaseTunerLayer) and not isinstance(target, LamdaPeftLinear):
            raise ValueError(f"module {current_key!r} already holds a {type(target).__name__} adapter")
        r = peft_config.rank_for(current_key)
        weight = torch_layout_weight(base)  # the original W: PEFT never rewrites it
        factors = initial_factors(weight, r, peft_config)
        kwargs = {
            "factors": factors,
            "scaling": peft_config.alpha_for(current_key) / r,
            "dropout": peft_config.dropout,
            "freeze_order": peft_config.freeze_order,
            "freeze_fraction": peft_config.freeze_fraction,
        }
        if isinstance(target, LamdaPeftLinear):
            target.update_layer(adapter_name, **kwargs)
            return
        new_module = LamdaPeftLinear(target, adapter_name, **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)
