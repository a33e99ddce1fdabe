"""Linear probing of a new task head before fine-tuning (`--head-init probe`).

A freshly initialised head is random, and so is the loss gradient it sends into the body at the
first steps. Two things suffer: the body's early updates chase that random head (Kumar et al.,
"Fine-Tuning can Distort Pretrained Features", ICLR 2022: linear probe, then fine-tune), and
LaMDA's `init="gradient"`, whose frozen A is the top input directions of that very gradient.

`probe_head` fits the head alone on the frozen model's features of the training rows: one forward
pass collects the head's inputs, then full-batch L-BFGS minimises cross-entropy (MSE for one
output) plus an L2 penalty on the head's weights. The penalty is chosen by k-fold cross-validation
on those rows (held-out loss), never on the evaluation data.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)


class HeadProbeError(ValueError):
    """The head cannot be probed (its output is not the model's logits)."""


@dataclass
class ProbeReport:
    l2: float  # the chosen penalty
    cv_loss: dict[float, float]  # mean held-out-fold loss per penalty
    train_loss: float  # on all rows, with the chosen penalty's fit (penalty excluded)
    rows: int
    seconds: float = 0.0  # wall time of the whole probe: the features' forward pass and every fit

    def to_dict(self) -> dict:
        return {
            "l2": self.l2,
            "cv_loss": {str(k): v for k, v in self.cv_loss.items()},
            "train_loss": self.train_loss,
            "rows": self.rows,
            "seconds": self.seconds,
        }


def _task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if logits.shape[-1] == 1:  # regression, as the model's own loss
        return nn.functional.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
    return nn.functional.cross_entropy(logits, labels)


@torch.no_grad()
def head_inputs(model: nn.Module, head: nn.Module, batches) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs of `head`, labels) over `batches`, in eval mode, each input as the head received it.

    Refuses a head whose output is not the model's logits (a decoder classifier's `score`, applied to
    every token before the last one is picked, for instance): re-running it on its inputs would not give them.
    """
    captured: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []

    def pre_hook(_module, args):
        captured.append(args[0].detach())

    def post_hook(_module, _args, out):
        outputs.append(out)

    labels = []
    handles = [head.register_forward_pre_hook(pre_hook), head.register_forward_hook(post_hook)]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            batch = dict(batch)
            labels.append(batch.pop("labels"))
            logits = model(**batch).logits
            if len(outputs) != len(labels) or outputs[-1].shape != logits.shape:
                raise HeadProbeError(
                    f"head_init='probe': the head's output {tuple(outputs[-1].shape) if outputs else None} is not "
                    f"the model's logits {tuple(logits.shape)}; use head_init='random' for this model"
                )
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return torch.cat(captured), torch.cat(labels)


def _fit(head: nn.Module, x: torch.Tensor, y: torch.Tensor, l2: float, max_iter: int) -> None:
    """Full-batch L-BFGS on task loss + l2 * sum of the head's squared weight matrices (not biases)."""
    params = list(head.parameters())
    weights = [p for p in params if p.dim() >= 2]
    opt = torch.optim.LBFGS(
        params, max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12
    )

    def closure():
        opt.zero_grad()
        loss = _task_loss(head(x), y) + l2 * sum(w.pow(2).sum() for w in weights)
        loss.backward()
        return loss

    head.train(False)
    with torch.enable_grad():
        opt.step(closure)


def fold_indices(n: int, folds: int, seed: int) -> list[torch.Tensor]:
    """The held-out rows of each cross-validation fold: a seeded permutation of range(n) cut into
    `folds` slices whose sizes differ by at most one."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    bounds = [round(i * n / folds) for i in range(folds + 1)]
    return [order[bounds[f] : bounds[f + 1]] for f in range(folds)]


def cv_losses(
    head: nn.Module,
    start: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    held_out: list[torch.Tensor],
    l2_grid: tuple[float, ...],
    max_iter: int,
) -> dict[float, float]:
    """Mean held-out loss per penalty: for each fold, `head` is reset to `start`, fitted on the other
    folds' rows and scored on the fold's. The head is left holding the last fit."""
    cv: dict[float, float] = {}
    for l2 in l2_grid:
        total = 0.0
        for f, out in enumerate(held_out):
            keep = torch.cat([held_out[g] for g in range(len(held_out)) if g != f])
            head.load_state_dict(start)
            _fit(head, x[keep], y[keep], l2, max_iter)
            with torch.no_grad():
                total += _task_loss(head(x[out]), y[out]).item() * len(out)
        cv[l2] = total / len(y)
    return cv


def lowest_loss_l2(cv: dict[float, float]) -> float:
    """The penalty of lowest cross-validated loss (a non-finite loss never wins; ties: the smaller)."""
    return min(cv, key=lambda k: (cv[k] if math.isfinite(cv[k]) else math.inf, k))


def probe_head(
    model: nn.Module,
    head_name: str,
    batches,
    folds: int = 5,
    l2_grid: tuple[float, ...] = L2_GRID,
    max_iter: int = 500,
    seed: int = 0,
) -> ProbeReport:
    """Fit `model.<head_name>` on the frozen model's features of `batches` (keyword batches with labels).

    The head's parameters are replaced in place by the fit with the penalty of lowest `folds`-fold
    cross-validated loss; everything else in the model is untouched. Deterministic for a `seed`:
    the folds are slices of a permutation of the rows drawn from it (rows in file order are often
    sorted by label, which would leave classes out of a fold), and every fit starts from the
    head's current values.
    """
    started = time.perf_counter()
    head = model.get_submodule(head_name)
    x, y = head_inputs(model, head, batches)
    n = len(y)
    if n < 2 * folds:
        raise HeadProbeError(f"head_init='probe' needs at least {2 * folds} labelled rows, got {n}")
    x = x.to(torch.float32)
    start = {k: v.detach().clone() for k, v in head.state_dict().items()}
    dtype = next(head.parameters()).dtype
    head.to(torch.float32)  # fitted in float32 whatever the head's dtype, and put back in it
    try:
        cv = cv_losses(head, start, x, y, fold_indices(n, folds, seed), l2_grid, max_iter)
        best = lowest_loss_l2(cv)
        head.load_state_dict(start)
        _fit(head, x, y, best, max_iter)
        with torch.no_grad():
            train_loss = _task_loss(head(x), y).item()
        if not all(torch.isfinite(p).all() for p in head.parameters()):
            raise HeadProbeError("head_init='probe': the fit diverged (non-finite head weights)")
    except BaseException:
        head.load_state_dict(start)  # nothing half-fitted is left behind
        raise
    finally:
        head.to(dtype)
    return ProbeReport(l2=best, cv_loss=cv, train_loss=train_loss, rows=n, seconds=time.perf_counter() - started)
