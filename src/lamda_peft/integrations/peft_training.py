"""Drive the PMB freezing schedule of whatever LaMDA adapters a model holds.

    model = peft.get_peft_model(hf_model, LamdaConfig(r=16, target_modules="all-linear"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    lamda_peft.attach_optimizer(model, optimizer, total_steps=T)   # every optimizer.step() now advances it

`attach_optimizer` works on a `PeftModel` (also as the method `peft_model.attach_optimizer`, so
`LamdaCallback` drives PEFT models too), on a transformers model that loaded a LaMDA adapter with
`load_adapter`, and on a `LamdaModel` (whose own `attach_optimizer` calls it). It binds the adapters
that are trainable right now (PEFT's active adapter(s)); each keeps its own step counter.
"""

from __future__ import annotations

import torch
from torch import nn

from lamda_peft.integrations.peft_layer import LamdaAdapter
from lamda_peft.layer import LamdaLinear
from lamda_peft.schedule import FreezeSchedule

_SCHEDULE_ATTR = "_lamda_freeze_schedule"


def lamda_adapters(model: nn.Module) -> list[LamdaLinear | LamdaAdapter]:
    """Every LaMDA adapter in `model`, in module order: `LamdaLinear` layers and PEFT's per-name `LamdaAdapter`s."""
    return [m for m in model.modules() if isinstance(m, (LamdaLinear, LamdaAdapter))]


def attach_optimizer(
    model: nn.Module, optimizer: torch.optim.Optimizer, total_steps: int, freeze_fraction: float | None = None
) -> FreezeSchedule:
    """Make every `optimizer.step()` advance the freezing schedule of the model's trainable LaMDA adapters.

    Args:
        model: any module holding LaMDA adapters (`PeftModel`, a transformers model, a `LamdaModel`).
        optimizer: the optimizer that trains them (Accelerate/Trainer wrappers are unwrapped).
        total_steps: T, the optimizer steps of the whole run.
        freeze_fraction: default: the adapters' own (from their `LamdaConfig`); required for bare
            `LamdaLinear` layers, which do not carry it.

    Re-attaching (a new optimizer, a resumed run) replaces the adapters' previous binding; the step
    counters live in the adapters (and in their checkpoints), so the schedule resumes.

    Raises:
        ValueError: no trainable LaMDA adapter (e.g. loaded without `is_trainable=True`), or adapters
            with different freeze fractions trained together without an explicit `freeze_fraction`.
    """
    units = [u for u in lamda_adapters(model) if u.dS.requires_grad]
    if not units:
        raise ValueError(
            "attach_optimizer: the model has no trainable LaMDA adapter (load it with "
            "PeftModel.from_pretrained(..., is_trainable=True), or set the adapter to train first)"
        )
    if freeze_fraction is None:
        if any(isinstance(u, LamdaLinear) for u in units):
            raise ValueError("attach_optimizer: pass freeze_fraction for LamdaLinear layers (LamdaModel does)")
        fractions = {u.freeze_fraction for u in units}
        if len(fractions) > 1:
            raise ValueError(
                f"attach_optimizer: the trainable adapters have different freeze fractions {sorted(fractions)}; "
                "train one adapter at a time or pass freeze_fraction explicitly"
            )
        freeze_fraction = fractions.pop()
    for previous in {id(s): s for u in units if (s := u.__dict__.get(_SCHEDULE_ATTR)) is not None}.values():
        previous.detach()  # one binding per adapter, whichever entry point made the old one
    schedule = FreezeSchedule(units, optimizer, total_steps, freeze_fraction)
    for unit in units:
        unit.__dict__[_SCHEDULE_ATTR] = schedule
        unit.scheduled = True
    return schedule
