"""`FaultGuard`: a `TrainerCallback` that stops a run cleanly on a NaN/Inf or on SIGTERM/SIGINT.

- Non-finite training: after every optimizer step the trainable parameters are checked (for an
  adapter that is a few hundred thousand numbers), and every logged loss / gradient norm. On a
  NaN or Inf the run stops *without* saving: the checkpoint due at that step is cancelled, so the
  newest checkpoint on disk is the last good one. `failure` says what happened; the caller turns it
  into an error (`lamda-peft train` exits with status 2 and that message).
- A kill: SIGTERM (a scheduler's pre-emption) or SIGINT (Ctrl-C) sets a flag; at the end of the
  current optimizer step the Trainer is asked to save a full checkpoint (adapter, optimizer,
  scheduler, RNG, data position) and stop, so `--resume latest` continues bitwise. A second signal
  gets the previous handler (a second Ctrl-C kills at once). Handlers are installed only in the
  main thread, for the duration of `train()`.

The Trainer's `logging_nan_inf_filter` hides NaN losses from the logs; `run_training` turns it off
so the logged loss is the real one.
"""

from __future__ import annotations

import math
import signal
import threading

import torch
from transformers import TrainerCallback

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class FaultGuard(TrainerCallback):
    """Stop on non-finite values (keeping the last good checkpoint); save and stop on a signal.

    Attributes:
        failure: why training was stopped for a non-finite value, else None.
        interrupted: the name of the signal that stopped training ("SIGTERM"), else None.
        stopped_at: the optimizer step at which either happened.
    """

    def __init__(self) -> None:
        self.failure: str | None = None
        self.interrupted: str | None = None
        self.stopped_at: int | None = None
        self._pending_signal: str | None = None
        self._previous: dict[int, object] = {}

    # -- signals ----------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        self._pending_signal = signal.Signals(signum).name
        self._restore_handlers()  # a second signal acts as it did before training started

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is threading.main_thread():
            for signum in _SIGNALS:
                self._previous[signum] = signal.signal(signum, self._on_signal)

    def on_train_end(self, args, state, control, **kwargs):
        self._restore_handlers()

    # -- checks -----------------------------------------------------------------------------
    def _stop_for(self, reason: str, state, control) -> None:
        if self.failure is None:
            self.failure = reason
            self.stopped_at = state.global_step
        control.should_save = False  # never write the poisoned adapter over the last good one
        control.should_training_stop = True

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.failure is not None:
            return self._stop_for(self.failure, state, control)
        bad = _first_non_finite(model)
        if bad is not None:
            self._stop_for(
                f"training diverged at step {state.global_step}: parameter {bad!r} is NaN or Inf", state, control
            )
        elif self._pending_signal is not None and self.interrupted is None:
            self.interrupted, self.stopped_at = self._pending_signal, state.global_step
            control.should_save = True  # the Trainer writes checkpoint-<step> right after this hook
            control.should_training_stop = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                self._stop_for(f"training diverged at step {state.global_step}: {key} is {value}", state, control)
        return control


def _first_non_finite(model) -> str | None:
    """The name of the first trainable parameter holding a NaN or Inf, else None."""
    if model is None:
        return None
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and not bool(torch.isfinite(p).all()):
                return name
    return None


def stop_message(guard: FaultGuard, checkpoint) -> str | None:
    """One line for the user after `train()` returned early, else None. `checkpoint`: the newest one kept."""
    kept = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was kept"
    if guard.failure:
        return f"{guard.failure}; stopped without saving it, {kept} (try a lower --lr, then --resume latest)"
    if guard.interrupted:
        return f"stopped by {guard.interrupted} at step {guard.stopped_at}; saved {checkpoint}: run the same command with --resume latest to continue"
    return None
