"""The PMB freezing schedule (SPEC.md section 3): pure policy plus the optimizer binding that drives it.

Policy (pure functions):
    t_i  = ceil(freeze_fraction * T)                        optimizer steps until B is fully frozen
    n(k) = min(r, floor(r * k / t_i))                       frozen components after step k

Driving: `FreezeSchedule` registers a post-step hook on the (innermost) torch optimizer, so every
`optimizer.step()` advances every layer's schedule; no training loop has to remember a call.
A step the optimizer skips (fp16 overflow) is not counted: T counts optimizer steps.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from lamda_peft.layer import LamdaLinear, advance_steps


def freeze_steps(total_steps: int, freeze_fraction: float) -> int:
    """t_i: the optimizer step after which B is entirely frozen."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    return math.ceil(freeze_fraction * total_steps)


def frozen_count(step: int, r: int, t_i: int) -> int:
    """n(k) = min(r, floor(r * k / t_i)): components of B frozen after optimizer step `step`."""
    if t_i <= 0:
        return r
    return min(r, (r * step) // t_i)


def innermost_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Unwrap Accelerate's / Trainer's optimizer wrappers down to the torch optimizer that steps."""
    seen = 0
    while hasattr(optimizer, "optimizer") and isinstance(optimizer.optimizer, torch.optim.Optimizer) and seen < 8:
        optimizer = optimizer.optimizer
        seen += 1
    return optimizer


class FreezeSchedule:
    """Binds LaMDA layers to an optimizer so that each optimizer step advances their schedule.

    Args:
        layers: the model's `LamdaLinear` modules.
        optimizer: the optimizer training them (wrappers are unwrapped).
        total_steps: T, the number of optimizer steps of the whole run.
        freeze_fraction: see `LamdaConfig.freeze_fraction`.
    """

    def __init__(
        self, layers: Iterable[LamdaLinear], optimizer: torch.optim.Optimizer, total_steps: int, freeze_fraction: float
    ) -> None:
        self.layers = list(layers)
        self.optimizer = innermost_optimizer(optimizer)
        self.total_steps = int(total_steps)
        self.t_i = freeze_steps(self.total_steps, freeze_fraction)
        self._handle = self.optimizer.register_step_post_hook(lambda *_: self.after_step())
        self.apply()  # step 0 (freeze_fraction 0 freezes B now) or the step a checkpoint resumed at

    @property
    def step(self) -> int:
        return self.layers[0].host_step() if self.layers else 0

    def after_step(self) -> None:
        """Run after every optimizer step: pin frozen columns, count the step, freeze what is due.

        A layer whose B is entirely frozen (and out of the optimizer) only counts the step: it has
        nothing left to pin or freeze, and this runs on the host once per step for every layer.
        """
        training = [layer for layer in self.layers if layer.dB.requires_grad]
        for layer in training:
            layer.restore_frozen()
        advance_steps(self.layers)
        self.apply(training)

    def apply(self, layers: list | None = None) -> None:
        """Freeze each layer's due components (all layers by default); drop fully frozen B from the
        optimizer (state freed)."""
        released = []
        for layer in self.layers if layers is None else layers:
            layer.freeze_columns(frozen_count(layer.host_step(), layer.r, self.t_i))
            if not layer.dB.requires_grad:
                released.append(layer.dB)
        if released:
            release_parameters(self.optimizer, released)

    def detach(self) -> None:
        """Remove the hook (the layers keep their state)."""
        self._handle.remove()


def release_parameters(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> None:
    """Remove `params` from `optimizer`'s groups and free their state (moments)."""
    ids = {id(p) for p in params}
    for group in optimizer.param_groups:
        if any(id(p) in ids for p in group["params"]):
            group["params"] = [p for p in group["params"] if id(p) not in ids]
    for p in params:
        optimizer.state.pop(p, None)
