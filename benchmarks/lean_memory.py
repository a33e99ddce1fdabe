"""Memory-lean training mode: what chunked cross-entropy and recomputation save beyond the adapter.

Issue 7, "beyond the adapter". Measured apart from the method-to-method comparison
(step_memory.py), so each claim stays honest: the lean mode helps any method, LoRA included.

| variant        | what runs                                                                      |
|----------------|--------------------------------------------------------------------------------|
| lora_stock     | PEFT LoRA, the model's own loss (full logits), no checkpointing: the stock Trainer |
| lamda_stock    | LaMDA after the B freeze, same stock settings                                  |
| lamda_chunked  | LaMDA + `lamda_peft.lean.causal_lm_loss` (no full logits), no checkpointing     |
| lamda_lean     | LaMDA + chunked loss + gradient checkpointing: `lamda-peft train --memory-lean` |
| lora_lean      | PEFT LoRA with the same lean mode (for comparison: the mode is not LaMDA-only)  |

Figures per step: peak RSS increase of the process during the step (the headline: with
recomputation, tensors rebuilt during backward never pass through the forward's saved-tensor
hooks, but they do show in the RSS), saved activations + gradients + optimizer state (as in
step_memory.py), CPU step time (median of interleaved repetitions) and the loss of the first
step, which must agree between stock and lean variants (same weights, same batch).

    python benchmarks/lean_memory.py            # SmolLM2, all-linear r=16, batch 2, seq 256 and 1024
    python benchmarks/lean_memory.py --quick    # a tiny random Llama, seconds (a test runs it)
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402

VARIANTS = ("lora_stock", "lamda_stock", "lamda_chunked", "lamda_lean", "lora_lean")


def build(variant: str, load, r: int, factors) -> bc.Runner:
    method = "lora" if variant.startswith("lora") else "lamda_after"
    runner = bc.build(method, load, "all-linear", r, factors)
    runner.name = variant
    runner.lean_loss = variant.endswith(("_chunked", "_lean"))
    if variant.endswith("_lean"):
        hf = runner.model.model if hasattr(runner.model, "lamda_layers") else runner.model
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return runner


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny random Llama, short sequences, 2 repetitions")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/lean_memory.json)")
    p.add_argument("--seqs", default=None, help="sequence lengths (default 256,1024; quick 64)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--reps", type=int, default=None, help="interleaved timing repetitions (default 3; quick 2)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    q = args.quick
    seqs = [int(x) for x in (args.seqs or ("64" if q else "256,1024")).split(",")]
    reps = args.reps or (2 if q else 3)
    r = 4 if q else args.r
    out = args.out or bc.RESULTS_DIR / ("lean_memory_quick.json" if q else "lean_memory.json")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    malloc_ok = bc.configure_malloc()
    machine = bc.machine_info()
    started = time.perf_counter()
    model_name = "tiny" if q else "smollm2"
    load = bc.base_loader(model_name)
    factors = bc.LamdaFactors(load, "all-linear", r)

    runners = {v: build(v, load, r, factors) for v in VARIANTS}
    bc.log(f"built {list(runners)}")
    warm = bc.batch(load.vocab_size, args.batch, seqs[0])
    first_loss = {}
    for name, runner in runners.items():  # also runs lamda's two schedule steps that freeze B
        for _ in range(2):
            first_loss.setdefault(name, runner.step(warm))
    points = []
    for seq in seqs:
        ids = bc.batch(load.vocab_size, args.batch, seq, seed=seq)
        gc.collect()
        memory = {}
        for name, runner in runners.items():
            m = bc.measure_step(runner, ids, collect=False)
            memory[name] = m
            bc.log(
                f"  seq {seq} {name:14s} peak RSS delta {(m['peak_rss_delta_bytes'] or 0) / 2**20:8.1f} MiB"
                f"  step memory {m['step_memory_bytes'] / 2**20:8.1f} MiB"
            )
        times = bc.time_interleaved(
            {n: (lambda rn=rn, ids=ids: rn.step(ids)) for n, rn in runners.items()}, reps, 0, bc.log
        )
        for name in runners:
            memory[name]["time"] = bc.summarize_times(times[name])
        lora = memory["lora_stock"]
        ratios = {}
        for name, m in memory.items():
            ratios[name] = {
                "peak_rss_delta_x_less_than_lora_stock": bc.ratio(
                    lora["peak_rss_delta_bytes"], m["peak_rss_delta_bytes"]
                ),
                "step_memory_x_less_than_lora_stock": bc.ratio(lora["step_memory_bytes"], m["step_memory_bytes"]),
                "step_time_cpu_vs_lora_stock": bc.ratio(m["time"]["cpu"]["median_s"], lora["time"]["cpu"]["median_s"]),
            }
            bc.log(f"  seq {seq} {name:14s} " + ", ".join(f"{k} {v:.3f}" for k, v in ratios[name].items() if v))
        points.append({"seq": seq, "methods": memory, "ratios": ratios})
    loss_gap = {
        "lamda_lean_vs_lamda_stock": abs(first_loss["lamda_lean"] - first_loss["lamda_stock"]),
        "lamda_chunked_vs_lamda_stock": abs(first_loss["lamda_chunked"] - first_loss["lamda_stock"]),
        "lora_lean_vs_lora_stock": abs(first_loss["lora_lean"] - first_loss["lora_stock"]),
    }
    bc.log(f"first-step loss, |lean - stock|: {loss_gap}")
    data = {
        "benchmark": "lean_memory",
        "quick": q,
        "command": bc.command_line(),
        "machine": machine,
        "malloc_mmap_threshold_set": malloc_ok,
        "model": model_name,
        "targets": "all-linear",
        "r": r,
        "batch": args.batch,
        "first_step_loss": first_loss,
        "first_step_loss_abs_diff": loss_gap,
        "points": points,
        "wall_s": time.perf_counter() - started,
    }
    bc.write_json(out, data)
    bc.log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
