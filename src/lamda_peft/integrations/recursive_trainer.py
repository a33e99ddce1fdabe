"""Uptraining a relaxed recursive model with the Hugging Face `Trainer` (what `lamda-peft train` uses).

`RecursiveTrainer` writes checkpoints with each shared tensor once (`save_recursive`) and reloads
them in place; `RelaxationFreeze` drives LaMDA's B freeze on `relax="lamda"` relaxations.
"""

from __future__ import annotations

from torch import nn
from transformers import Trainer, TrainerCallback

from lamda_peft.integrations.hf_trainer import LeanLossMixin, unwrap
from lamda_peft.layer import LamdaLinear
from lamda_peft.recursive import load_recursive_state, relaxations, save_recursive
from lamda_peft.schedule import FreezeSchedule


class RelaxationFreeze(TrainerCallback):
    """Drives LaMDA's B freeze (SPEC section 3) on `relax="lamda"` relaxations during uptraining."""

    def __init__(self, freeze_fraction: float) -> None:
        self.freeze_fraction = freeze_fraction
        self.schedule: FreezeSchedule | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        layers = [m for m in relaxations(unwrap(model)) if isinstance(m, LamdaLinear)]
        if layers and optimizer is not None:
            self.schedule = FreezeSchedule(layers, optimizer, state.max_steps, self.freeze_fraction)


class RecursiveTrainer(LeanLossMixin, Trainer):
    """`Trainer` whose checkpoints store each shared tensor once (`save_recursive`); takes
    `chunked_loss_tokens` for `--memory-lean` like `LamdaTrainer`."""

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        save_recursive(unwrap(self.model), output_dir or self.args.output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        load_recursive_state(unwrap(model or self.model), resume_from_checkpoint)
