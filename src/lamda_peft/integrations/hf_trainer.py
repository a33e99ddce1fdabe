"""Hugging Face `Trainer` integration: the schedule drives itself, checkpoints hold only the adapter.

- `LamdaCallback` attaches the optimizer at `on_train_begin` with `state.max_steps` (optimizer
  steps, so gradient accumulation is accounted for); from then on every optimizer step advances
  the PMB freeze. It also records the trainable-parameter count after each step. At
  `on_init_end` (before the Trainer wraps the model in DDP) it calls `prepare_distributed`, so multi-process
  runs keep `dB` out of DDP and the phase change when B freezes needs no `find_unused_parameters`.
- `LamdaTrainer` is `Trainer` plus that callback, with checkpoints written by
  `LamdaModel.save_pretrained` (adapter tensors, schedule state) instead of the full state dict,
  and resumption that loads them back (the Trainer restores optimizer, scheduler, RNG, data order).
- `LeanLossMixin` (in `LamdaTrainer`, and `LeanTrainer` for other models) computes a causal LM's
  loss with `lean.causal_lm_loss` when `chunked_loss_tokens` is set: the same loss, no full logits.
"""

from __future__ import annotations

import os

from torch import nn
from transformers import Trainer, TrainerCallback

from lamda_peft.checkpoint import load_adapter_state
from lamda_peft.integrations.distributed import grad_sync_of, prepare_distributed
from lamda_peft.integrations.peft_training import lamda_adapters
from lamda_peft.model import LamdaModel


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP / Accelerate / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


class LamdaCallback(TrainerCallback):
    """Drives LaMDA's freezing schedule from any `Trainer` (no user action beyond adding it).

    Attributes:
        history: (optimizer step, trainable parameters after it) pairs.
    """

    def __init__(self) -> None:
        self.history: list[tuple[int, int]] = []

    def on_init_end(self, args, state, control, model=None, **kwargs):
        # The Trainer wraps the model in DDP only in train(): now is the last moment to keep dB out of it.
        if model is not None and lamda_adapters(model):
            prepare_distributed(model)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        lamda = unwrap(model)
        if not hasattr(lamda, "attach_optimizer"):
            raise TypeError(f"LamdaCallback needs a LaMDA model (with attach_optimizer); got {type(lamda).__name__}")
        if optimizer is None:
            raise RuntimeError("LamdaCallback: the Trainer passed no optimizer to on_train_begin")
        lamda.attach_optimizer(optimizer, total_steps=state.max_steps)
        self.history.append((state.global_step, lamda.trainable_parameter_count()))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.history.append((state.global_step, unwrap(model).trainable_parameter_count()))


class LeanLossMixin:
    """Causal-LM loss without the full logits (`lean.causal_lm_loss`) when `chunked_loss_tokens` is set.

    The loss is the one `Trainer.compute_loss` gets from the model: the same denominator
    (`num_items_in_batch` when the model takes loss kwargs) and the same multi-process scaling.
    Evaluation that needs the logits (`return_outputs=True`) takes the stock path.
    """

    def __init__(self, *args, chunked_loss_tokens: int | None = None, **kwargs) -> None:
        self.chunked_loss_tokens = chunked_loss_tokens
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.chunked_loss_tokens or return_outputs or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        from lamda_peft.lean import causal_lm_loss

        num_items = num_items_in_batch if self.model_accepts_loss_kwargs else None
        loss = causal_lm_loss(model, inputs, num_items, self.chunked_loss_tokens)
        if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs and num_items is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())  # as Trainer.compute_loss
        return loss


class LamdaTrainer(LeanLossMixin, Trainer):
    """`Trainer` for a `LamdaModel`: adds `LamdaCallback` and saves/loads adapter-only checkpoints.

    Args:
        chunked_loss_tokens: compute a causal LM's training loss in chunks of this many tokens,
            never materialising the full logits (None: the model's own loss).
    """

    def __init__(self, *args, **kwargs) -> None:
        callbacks = list(kwargs.pop("callbacks", None) or [])
        if not any(isinstance(c, LamdaCallback) for c in callbacks):
            callbacks.append(LamdaCallback())
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if training_args is not None and training_args.ddp_find_unused_parameters is None:
            # The Trainer's default for a model that is not a PreTrainedModel is True (a graph search
            # every step); with dB out of DDP (prepare_distributed) every parameter DDP holds gets a gradient.
            training_args.ddp_find_unused_parameters = False
        super().__init__(*args, callbacks=callbacks, **kwargs)

    def training_step(self, model: nn.Module, *args, **kwargs):
        sync = grad_sync_of(self.model)
        if sync is not None and not sync.bound and model is not self.model:
            sync.bind(model)  # the DDP wrapper: dB is then reduced only on the synchronising micro-batch
        return super().training_step(model, *args, **kwargs)

    @property
    def lamda_callback(self) -> LamdaCallback:
        return next(c for c in self.callback_handler.callbacks if isinstance(c, LamdaCallback))

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = unwrap(self.model)
        if not isinstance(model, LamdaModel):
            return super()._save(output_dir, state_dict)
        output_dir = output_dir or self.args.output_dir
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            model.save_pretrained(output_dir)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        target = unwrap(model if model is not None else self.model)
        if not isinstance(target, LamdaModel):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_adapter_state(target, resume_from_checkpoint)


class LeanTrainer(LeanLossMixin, Trainer):
    """`Trainer` with the chunked causal-LM loss, for models other than a `LamdaModel` (the baselines)."""
