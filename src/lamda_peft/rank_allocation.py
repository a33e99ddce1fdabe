"""LaMDA++: data-free rank allocation from the spectra of the frozen pretrained weights (SPEC.md 4).

Two layers, as everywhere in this project: a pure policy (`allocate_ranks`: numbers in, ranks out)
and a function that reads a model and applies it (`allocate_model_ranks`). `get_lamda_model` calls
the latter when `LamdaConfig.rank_allocation == "energy"` and writes its `.ranks` into the config's
`rank_pattern`, so a saved adapter is reloaded with the same ranks and never recomputes them.

The rule. Module l has the normalised energy score at the base rank r

    E_l = sum_{i<=r} sigma_i^2 / sum_i sigma_i^2                    (0 < E_l <= 1)

and `r / E_l` is its *effective width*: the rank it would need to hold all of its energy if the
rest of its spectrum were as strong as the top r (a flat spectrum gives min(d_in, d_out), a rank-r
matrix gives r). Ranks are proportional to it, clipped to the bounds, with one common factor
lambda chosen so that the budget of the uniform allocation is kept [ours]:

    r_l = clip(lambda / E_l, r_min, min(r_max, d_in, d_out)),     sum_l cost(r_l) = L * cost(r)

with cost(x) = x^2 (`rank_budget="params"`, the S cores' size; the default) or x (`"rank"`).
A low energy score (the top-r subspace captures little) gives a high rank, a high one gives rank
away. The real-valued solution is rounded by largest remainder: floors first, then one extra rank
each, in order of remainder, while the budget allows.

Guarantees (tested): "rank" meets L*r exactly; "params" never exceeds L*r^2 and falls short of it by
less than one rank step (0 <= L r^2 - sum r_l^2 < 2 r_max); bounds hold; the result is
deterministic (ties broken by energy, then by position); a module with a lower energy score gets at
least the rank of one with a higher score when both have the same cap min(r_max, d_in, d_out); equal
scores give every module r.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lamda_peft.config import ConfigError
from lamda_peft.layer import linear_shape, torch_layout_weight
from lamda_peft.spectral import energy_score, singular_values
from lamda_peft.targets import find_targets

BUDGETS = ("params", "rank")


def budget_cost(ranks: Sequence[int], budget: str) -> int:
    """The budget an allocation spends: sum r_l^2 ("params") or sum r_l ("rank")."""
    power = _power(budget)
    return sum(int(x) ** power for x in ranks)


def allocate_ranks(
    energy_scores: Sequence[float],
    max_ranks: Sequence[int],
    r: int,
    r_min: int,
    r_max: int,
    budget: str = "params",
) -> list[int]:
    """Per-module ranks from normalised energy scores, keeping the uniform allocation's budget.

    Args:
        energy_scores: E_l in (0, 1] per module (`spectral.energy_score` at rank r).
        max_ranks: min(d_in, d_out) per module, the largest rank its weight allows.
        r: base rank; the budget is that of giving every module r.
        r_min, r_max: bounds on every rank (r_max is further capped by each module's max rank).
        budget: "params" (sum r_l^2 = L r^2, within one rank step below) or "rank" (sum r_l = L r,
            exact).

    Returns:
        One rank per module, in input order.

    Raises:
        ValueError: mismatched or empty inputs, a score outside (0, 1], r_min > r_max, a module whose
            max rank is below r_min, or a budget that the bounds cannot meet.
    """
    scores = [float(e) for e in energy_scores]
    caps = [int(m) for m in max_ranks]
    power = _power(budget)
    if not scores or len(scores) != len(caps):
        raise ValueError(f"need one max rank per energy score, got {len(scores)} scores and {len(caps)} max ranks")
    for name, value in (("r", r), ("r_min", r_min), ("r_max", r_max)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if r_min > r_max:
        raise ValueError(f"r_min ({r_min}) must be <= r_max ({r_max})")
    for i, e in enumerate(scores):
        if not 0.0 < e <= 1.0:  # also refuses NaN
            raise ValueError(f"energy score of module {i} must be in (0, 1], got {e}")
    for i, m in enumerate(caps):
        if m < r_min:
            raise ValueError(f"module {i} allows rank at most min(d_in, d_out) = {m}, below r_min = {r_min}")

    lo = [r_min] * len(scores)
    hi = [min(r_max, m) for m in caps]
    target = len(scores) * r**power
    cheapest, dearest = budget_cost(lo, budget), budget_cost(hi, budget)
    unit = "sum r_l^2" if power == 2 else "sum r_l"
    if cheapest > target:
        raise ConfigError(
            f"budget {budget!r} ({unit} = {len(scores)} x {r}^{power} = {target}) cannot be met: every module "
            f"at r_min = {r_min} already spends {cheapest}; lower r_min or raise r"
        )
    if dearest < target:
        raise ConfigError(
            f"budget {budget!r} ({unit} = {len(scores)} x {r}^{power} = {target}) cannot be met: every module at "
            f"its upper bound min(r_max = {r_max}, d_in, d_out) spends only {dearest}; raise r_max or lower r"
        )

    # Real-valued solution: ranks proportional to the effective width 1 / E_l (r is a common
    # factor, absorbed in lam), one lam for all modules, found by bisection (the spend is
    # continuous and non-decreasing in lam).
    width = [1.0 / e for e in scores]

    def real_ranks(lam: float) -> list[float]:
        return [min(max(lam * w, a), b) for w, a, b in zip(width, lo, hi, strict=True)]

    def spend(lam: float) -> float:
        return sum(x**power for x in real_ranks(lam))

    lam_lo, lam_hi = 0.0, max(b / w for w, b in zip(width, hi, strict=True))  # at lam_hi every module is at its cap
    for _ in range(200):
        mid = 0.5 * (lam_lo + lam_hi)
        if spend(mid) <= target:
            lam_lo = mid
        else:
            lam_hi = mid
    real = real_ranks(lam_lo)  # spends <= target, as close as float64 allows

    # Largest-remainder rounding. Floors keep the order of `real` (hence of the scores); extra
    # ranks go by remainder, then lower energy, then position, so the order survives: two modules
    # on the same floor pay the same price for +1, and the one served first is the flatter one.
    ranks = [math.floor(x) for x in real]
    left = target - budget_cost(ranks, budget)
    order = sorted(range(len(real)), key=lambda i: (-(real[i] - ranks[i]), scores[i], i))
    for i in order:
        if real[i] == ranks[i] or ranks[i] >= hi[i]:
            continue
        step = (ranks[i] + 1) ** power - ranks[i] ** power
        if step <= left:
            ranks[i] += 1
            left -= step
    return ranks


@dataclass
class RankAllocation:
    """What `allocate_model_ranks` found, per target module (full module names, model order).

    Attributes:
        ranks: {module name: allocated rank}; what goes into `LamdaConfig.rank_pattern`.
        energy: {module name: E_l at the base rank r}.
        shapes: {module name: (d_out, d_in)}.
        r, r_min, r_max, budget: the settings used.
        budget_before: the uniform allocation's budget, L * r^2 ("params") or L * r ("rank").
        budget_after: what `ranks` spends in the same unit.
        seconds: wall time of the spectra (one `svdvals` per target) and the allocation.
    """

    ranks: dict[str, int]
    energy: dict[str, float]
    shapes: dict[str, tuple[int, int]]
    r: int
    r_min: int
    r_max: int
    budget: str
    budget_before: int
    budget_after: int
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary: settings, budgets and one record per module."""
        modules = [
            {
                "name": name,
                "d_out": self.shapes[name][0],
                "d_in": self.shapes[name][1],
                "energy": self.energy[name],
                "rank": self.ranks[name],
            }
            for name in self.ranks
        ]
        return {
            "r": self.r,
            "r_min": self.r_min,
            "r_max": self.r_max,
            "budget": self.budget,
            "budget_before": self.budget_before,
            "budget_after": self.budget_after,
            "num_modules": len(modules),
            "seconds": round(self.seconds, 3),
            "modules": modules,
        }


def allocate_model_ranks(model: nn.Module, config, num_threads: int | None = 1) -> RankAllocation:
    """LaMDA++ ranks for the target modules of `model` under `config` (a `LamdaConfig`).

    One pass over the target weights: all singular values (no singular vectors) in float32 whatever
    the weight's dtype, on the weight's device, the energy score at `config.r`, then
    `allocate_ranks` with `config.rank_bounds` and `config.rank_budget`. Nothing in the model is
    modified.

    Args:
        model: the base model, before any adapter is injected.
        config: a `LamdaConfig` (r, target_modules, modules_to_save, rank bounds and budget).
        num_threads: torch intra-op threads while the CPU spectra run, restored afterwards; None
            keeps the current setting. 1 by default: for weights of a few thousand rows LAPACK's
            threaded SVD is no faster, and on a CPU shared with other processes it was measured
            100x slower (a 1536x576 `svdvals`: 0.1 s on 1 thread, 13-18 s on 2 busy cores).

    Raises:
        ConfigError (a ValueError): no target matched, a target's min(d_in, d_out) is below r_min,
            or the budget cannot be met within the bounds.
    """
    start = time.perf_counter()
    r_min, r_max = config.rank_bounds
    names = find_targets(model, config.target_modules, exclude=config.modules_to_save)
    shapes, energy = {}, {}
    threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        for name in names:
            module = model.get_submodule(name)
            d_out, d_in = linear_shape(module)
            if min(d_out, d_in) < r_min:
                raise ConfigError(
                    f"target module {name!r} ({d_out}x{d_in}) allows rank at most {min(d_out, d_in)}, below "
                    f"r_min = {r_min}: lower r_min (or r) or leave the module out of target_modules"
                )
            shapes[name] = (d_out, d_in)
            energy[name] = energy_score(singular_values(torch_layout_weight(module)), config.r)
    finally:
        torch.set_num_threads(threads)
    ranks = allocate_ranks(
        [energy[n] for n in names],
        [min(shapes[n]) for n in names],
        r=config.r,
        r_min=r_min,
        r_max=r_max,
        budget=config.rank_budget,
    )
    return RankAllocation(
        ranks=dict(zip(names, ranks, strict=True)),
        energy=energy,
        shapes=shapes,
        r=config.r,
        r_min=r_min,
        r_max=r_max,
        budget=config.rank_budget,
        budget_before=len(names) * config.r ** _power(config.rank_budget),
        budget_after=budget_cost(ranks, config.rank_budget),
        seconds=time.perf_counter() - start,
    )


def _power(budget: str) -> int:
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {list(BUDGETS)}, got {budget!r}")
    return 2 if budget == "params" else 1
