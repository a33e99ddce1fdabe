"""Parameter updates: trainable parameters over the steps of a run, and total updates, LaMDA vs LoRA.

Issue 7, item 2 (the paper's "up to 17.7x fewer parameter updates" is of this kind). For each
method the real model, optimizer (AdamW) and, for LaMDA, the real freezing schedule run for T
optimizer steps. Each step's gradients come from a surrogate loss `sum(p * noise)` over the
trainable tensors, through autograd (so LaMDA's gradient mask on frozen columns of B applies);
the counts do not depend on the data. Two counts per step:

- `trainable`: trainable parameters during the step (`trainable_parameter_count()` for LaMDA,
  elements of tensors with requires_grad otherwise);
- `changed`: elements whose value actually changed in the step (bitwise comparison before/after),
  which checks that frozen parts really stay put.

Total updates over the run = sum over steps of `changed`. Full fine-tuning is counted, not run
(every weight changes at every step with AdamW). Methods: LaMDA (freeze_fraction 0.3, the
default), LaMDA++ (energy rank allocation, same budget), LoRA-XS-like (LaMDA with B frozen from
the start), PEFT LoRA, PiSSA (same count as LoRA), LoRA-FA, VeRA at the same r, full fine-tuning.

    python benchmarks/param_updates.py            # SmolLM2, q,v and all-linear, r = 8, 16, 32, 64, T = 100
    python benchmarks/param_updates.py --quick    # tiny random Llama, T = 10
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402

METHODS = ("lamda", "lamda++", "loraxs", "lora", "pissa", "lorafa", "vera", "full")


def build_counted(method: str, load, targets, r: int, factors: bc.LamdaFactors, total_steps: int):
    """(model, optimizer, trainable-count function) for `method`, LaMDA's schedule attached for T steps."""
    from lamda_peft import LamdaConfig, LamdaModel

    if method in ("lamda", "lamda++", "loraxs"):
        model = load()
        config = LamdaConfig(r=r, target_modules=targets, freeze_fraction=0.0 if method == "loraxs" else 0.3)
        if method == "lamda++":
            from lamda_peft.rank_allocation import allocate_model_ranks

            config.rank_allocation = "energy"
            config.rank_pattern = allocate_model_ranks(model, config).ranks
            lamda = LamdaModel(model, config, factors=factors.at_rank(config.rank_pattern))
        else:
            lamda = LamdaModel(model, config, factors=factors.at_rank(r))
        opt = torch.optim.AdamW(lamda.lamda_param_groups(bc.LR))
        lamda.attach_optimizer(opt, total_steps=total_steps)
        return lamda, opt, lamda.trainable_parameter_count
    runner = bc.build(method, load, targets, r)
    return runner.model, runner.optimizer, runner.trainable_count


def count_run(model, opt, trainable_count, total_steps: int, seed: int = 0) -> dict:
    """Run T optimizer steps on a surrogate loss; count trainable and actually changed elements."""
    g = torch.Generator().manual_seed(seed)
    watched = [p for p in model.parameters() if p.requires_grad]  # everything that may ever move
    trainable, changed = [], []
    for _ in range(total_steps):
        trainable.append(int(trainable_count()))
        before = [p.detach().clone() for p in watched]
        live = [p for p in watched if p.requires_grad]
        loss = sum((p * torch.randn(p.shape, generator=g, dtype=p.dtype)).sum() for p in live)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        changed.append(int(sum(int((p.detach() != b).sum()) for p, b in zip(watched, before, strict=True))))
    return {
        "trainable_per_step": trainable,
        "changed_per_step": changed,
        "trainable_at_start": trainable[0],
        "trainable_at_end": int(trainable_count()),
        "total_updates": sum(changed),
        # Never more than the trainable count (a frozen element that moved would show here); a few
        # fewer is fp32 rounding: an AdamW update below half an ulp of the weight.
        "changed_exceeds_trainable": any(c > t for c, t in zip(changed, trainable, strict=True)),
        "unchanged_trainable_elements": sum(trainable) - sum(changed),
    }


def full_count(load, total_steps: int) -> dict:
    n = sum(p.numel() for p in load().parameters())
    return {
        "trainable_per_step": [n] * total_steps,
        "changed_per_step": None,
        "trainable_at_start": n,
        "trainable_at_end": n,
        "total_updates": n * total_steps,
        "changed_exceeds_trainable": None,
        "unchanged_trainable_elements": None,
        "notes": "counted, not run: AdamW moves every weight at every step",
    }


def plot(configs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = [c for c in configs if c["r"] == configs[0]["plot_r"]]
    fig, axes = plt.subplots(1, len(chosen), figsize=(6 * len(chosen), 4.5), squeeze=False)
    for ax, cfg in zip(axes[0], chosen, strict=True):
        for name, m in cfg["methods"].items():
            steps = range(1, len(m["trainable_per_step"]) + 1)
            style = "-" if name.startswith("lamda") or name == "loraxs" else "--"
            width = 3.5 if name == "lora" else 1.5  # PiSSA trains exactly LoRA's count: drawn on top of it
            ax.step(steps, m["trainable_per_step"], style, where="post", label=name, linewidth=width)
        ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("trainable parameters")
        ax.set_title(f"{cfg['model']}: {cfg['targets']}, r={cfg['r']}, T={cfg['total_steps']}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny random Llama, r=4 and 8, T=10")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/param_updates.json)")
    p.add_argument("--plot", type=Path, default=None, help="PNG path (default next to the JSON)")
    p.add_argument("--ranks", default=None, help="default 8,16,32,64 (quick: 4,8)")
    p.add_argument("--steps", type=int, default=None, help="T, optimizer steps of the run (default 100)")
    p.add_argument("--methods", default=",".join(METHODS))
    args = p.parse_args(argv)

    q = args.quick
    ranks = [int(x) for x in (args.ranks or ("4,8" if q else "8,16,32,64")).split(",") if x]
    total_steps = args.steps or (10 if q else 100)
    methods = [m for m in args.methods.split(",") if m]
    out = args.out or bc.RESULTS_DIR / ("param_updates_quick.json" if q else "param_updates.json")
    plot_path = args.plot or out.with_name(out.stem + "_over_steps.png")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    machine = bc.machine_info()
    started = time.perf_counter()
    model_name = "tiny" if q else "smollm2"
    load = bc.base_loader(model_name)
    plot_r = 8 if q else 16

    configs = []
    for targets in ("qv", "all-linear"):
        # LaMDA++ may give a module up to 2r: factors up to 2 * max(r) (capped by each weight's size).
        factors = bc.LamdaFactors(load, bc.TARGETS[targets], 2 * max(ranks))
        full = full_count(load, total_steps) if "full" in methods else None
        for r in ranks:
            bc.log(f"== {model_name} {targets} r={r} T={total_steps}")
            results = {}
            for method in methods:
                if method == "full":
                    results[method] = full
                    continue
                model, opt, counter = build_counted(method, load, bc.TARGETS[targets], r, factors, total_steps)
                results[method] = count_run(model, opt, counter, total_steps)
                del model, opt
                m = results[method]
                bc.log(
                    f"  {method:8s} trainable start {m['trainable_at_start']:>11,} end {m['trainable_at_end']:>11,}"
                    f"  total updates {m['total_updates']:>14,}  frozen moved: {m['changed_exceeds_trainable']}"
                )
            cfg = {
                "model": model_name,
                "targets": targets,
                "r": r,
                "total_steps": total_steps,
                "plot_r": plot_r,
                "methods": results,
            }
            if "lora" in results:
                lora = results["lora"]
                cfg["lora_over_method"] = {
                    name: {
                        "trainable_at_end": bc.ratio(lora["trainable_at_end"], m["trainable_at_end"]),
                        "total_updates": bc.ratio(lora["total_updates"], m["total_updates"]),
                    }
                    for name, m in results.items()
                }
            configs.append(cfg)
    result = {
        "benchmark": "param_updates",
        "command": bc.command_line(),
        "quick": q,
        "machine": machine,
        "settings": {
            "optimizer": f"AdamW lr {bc.LR} (LoRA-FA: PEFT's LoraFAOptimizer)",
            "total_steps": total_steps,
            "lamda_freeze_fraction": 0.3,
            "gradients": "surrogate loss sum(p * noise) through autograd: counts do not depend on data",
            "vera_rank": "same r as the others (PEFT's default is 256)",
        },
        "definitions": {
            "trainable_per_step": "trainable parameters during each optimizer step",
            "changed_per_step": "elements whose value changed in that step (bitwise)",
            "total_updates": "sum of changed_per_step over the run (full: parameters x steps)",
            "lora_over_method": "LoRA's figure / the method's: 'x fewer' than LoRA",
        },
        "configs": configs,
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    bc.write_json(out, result)
    plot(configs, plot_path)
    bc.log(f"wrote {out} and {plot_path} in {result['elapsed_s']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
