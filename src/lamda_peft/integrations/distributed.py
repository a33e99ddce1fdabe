"""Multi-process (DDP) training of LaMDA: B may stop needing gradients mid-run without upsetting DDP.

The problem: DDP builds its gradient reducer once, from the parameters that require grad when it
wraps the model. When the schedule freezes B entirely, `dB` stops requiring grad, DDP waits for a
gradient that never comes and the next iteration fails ("Expected to have finished reduction in
the prior iteration..."), unless `find_unused_parameters=True` makes DDP search the autograd graph
after every forward pass, which costs time on every step for the whole run.

The fix here: the LaMDA `dB` parameters (and LaMDA's buffers, identical on every rank) are kept out
of DDP (`module._ddp_params_and_buffers_to_ignore`, which DDP reads when it wraps the module), and
`LamdaGradSync` averages the `dB` gradients itself, once per backward pass that DDP reduces:

- a post-accumulate-grad hook on each `dB` queues one callback at the end of the backward pass;
  the callback all-reduces every trainable `dB` gradient in one flattened tensor and divides by the
  world size (DDP's mean), before gradient clipping and the optimizer step see them;
- with gradient accumulation, a backward pass inside `no_sync()` (DDP's
  `require_backward_grad_sync` False) is skipped when the DDP wrapper is bound (`bind`); unbound,
  every backward is reduced, which is still exact (averaging the already-averaged part of `.grad`
  changes nothing) and only costs extra communication of `dB`;
- once B is fully frozen no hook fires and nothing is communicated, on every rank alike (the
  schedule is deterministic), so DDP's own reducer (dS, `modules_to_save`) never sees a change.

Entry points: `LamdaCallback` / `LamdaTrainer` / `lamda-peft train` do this automatically (the
callback prepares the model at `on_init_end`, before the Trainer wraps it); hand-written loops call
`prepare_distributed(model)` before `accelerator.prepare(...)` (or `DistributedDataParallel(...)`).
FSDP2: pass `set(sync.params)` as `ignored_params` to every `fully_shard` call; `dB` then stays a
plain replicated tensor (the schedule pins and releases it in place) and the same hooks average it.

Limits: a backward pass that raises after the first `dB` gradient leaves the reduction queued state
set (`_queued`); a process that survives such an error should not train on with the same object.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from lamda_peft.integrations.peft_training import lamda_adapters

_SYNC_ATTR = "_lamda_grad_sync"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _lamda_names(model: nn.Module) -> tuple[list[tuple[str, nn.Parameter]], list[str]]:
    """(name, dB) pairs and the names of every LaMDA buffer, as `model.named_*` spell them."""
    units = {id(u) for u in lamda_adapters(model)}
    dbs, buffers = [], []
    for prefix, module in model.named_modules():
        if id(module) not in units:
            continue
        dot = prefix + "." if prefix else ""
        dbs.append((dot + "dB", module.dB))
        buffers += [dot + name for name, _ in module.named_buffers(recurse=False)]
    return dbs, buffers


class LamdaGradSync:
    """Averages the gradients of LaMDA `dB` parameters across processes (DDP leaves them alone).

    Build it with `prepare_distributed(model)`; it is inert in a single process.

    Attributes:
        names: the `dB` parameter names kept out of DDP.
        reductions: how many all-reduces it has done (for tests and logs).
    """

    def __init__(self, model: nn.Module) -> None:
        named, self.buffer_names = _lamda_names(model)
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.reductions = 0
        self._ddp: nn.Module | None = None
        self._queued = False
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params if p.requires_grad]

    def bind(self, wrapped: nn.Module) -> LamdaGradSync:
        """Tell it the DDP wrapper, so backward passes inside `no_sync()` skip the reduction (optional)."""
        while wrapped is not None and not isinstance(wrapped, nn.parallel.DistributedDataParallel):
            wrapped = getattr(wrapped, "module", None)
        self._ddp = wrapped
        return self

    @property
    def bound(self) -> bool:
        return self._ddp is not None

    def _on_grad(self, _param: torch.Tensor) -> None:
        if self._queued or not _distributed():
            return
        if self._ddp is not None and not self._ddp.require_backward_grad_sync:
            return  # accumulating under no_sync: reduce the total on the synchronising pass, as DDP does
        self._queued = True
        torch.autograd.Variable._execution_engine.queue_callback(self._reduce)

    def _reduce(self) -> None:
        """End of a backward pass: one all-reduce (mean) of every trainable dB gradient."""
        self._queued = False
        live = [p for p in self.params if p.requires_grad]  # the same list on every rank: the schedule is deterministic
        if not live:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in live]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= dist.get_world_size()
        offset = 0
        for p, g in zip(live, grads, strict=True):
            n = g.numel()
            reduced = flat[offset : offset + n].view_as(g)
            if p.grad is None:
                p.grad = reduced.clone()
            else:
                p.grad.copy_(reduced)
            offset += n
        self.reductions += 1

    def broadcast_from_rank0(self, model: nn.Module) -> None:
        """Make every rank's dB and LaMDA buffers rank 0's (DDP no longer does it for them)."""
        if not _distributed():
            return
        tensors = dict(model.named_parameters())
        tensors.update(dict(model.named_buffers()))
        with torch.no_grad():
            for name in self.names + self.buffer_names:
                t = tensors[name].data
                if t.dtype == torch.bool:  # gloo has no bool collectives
                    u = t.to(torch.uint8)
                    dist.broadcast(u, src=0)
                    t.copy_(u.bool())
                else:
                    dist.broadcast(t, src=0)
        for unit in lamda_adapters(model):
            unit.sync_frozen_state()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def prepare_distributed(model: nn.Module) -> LamdaGradSync:
    """Prepare a LaMDA model for DDP: call it before the model is wrapped (`accelerator.prepare`).

    Keeps every LaMDA `dB` and LaMDA buffer out of DDP and returns the `LamdaGradSync` that averages
    the `dB` gradients instead; if a process group is already up, rank 0's `dB` and LaMDA buffers
    are broadcast (DDP's start-up sync no longer covers them). Calling it again returns the same
    object. Works for `LamdaModel`, a PEFT model with LaMDA adapters, or any module holding them.

        sync = lamda_peft.prepare_distributed(model)
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        sync.bind(model)  # optional: skip the reduction inside accelerator.accumulate / no_sync

    Raises:
        ValueError: the model is already wrapped in DDP (too late to keep parameters out of it).
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise ValueError(
            "prepare_distributed: the model is already wrapped in DistributedDataParallel; call it before wrapping"
        )
    existing = model.__dict__.get(_SYNC_ATTR)
    if existing is not None:
        return existing
    sync = LamdaGradSync(model)
    ignore = set(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))
    model._ddp_params_and_buffers_to_ignore = sorted(ignore | set(sync.names) | set(sync.buffer_names))
    model.__dict__[_SYNC_ATTR] = sync
    sync.broadcast_from_rank0(model)
    return sync


def grad_sync_of(model: nn.Module) -> LamdaGradSync | None:
    """The `LamdaGradSync` that `prepare_distributed` attached to `model` (or its unwrapped inner module), if any."""
    while model is not None:
        sync = model.__dict__.get(_SYNC_ATTR)
        if sync is not None:
            return sync
        model = getattr(model, "module", None)
    return None
