"""One evaluation pass with forward hooks: eval mode and the hooks for a `with` block, both undone after."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from torch import nn


@contextlib.contextmanager
def evaluating(model: nn.Module, hooks: dict[nn.Module, Callable] | None = None) -> Iterator[nn.Module]:
    """`model` in eval mode with `hooks` ({submodule: forward hook}) registered; on exit, even after an
    error, the hooks are removed and the model's train/eval mode is restored."""
    handles = [module.register_forward_hook(fn) for module, fn in (hooks or {}).items()]
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
