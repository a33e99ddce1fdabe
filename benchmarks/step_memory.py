"""Memory and speed of one training step: LaMDA before/after the B freeze against PEFT's methods.

Issue 7, item 1. Every figure is also given as a ratio to PEFT LoRA measured in the same run (and
to the no-adapter floor). What is measured (details in `bench_common.py`):

- saved activations (`saved_tensors_hooks`, each storage once, the model's own weights left out),
  gradient bytes, optimizer-state bytes after the step; step memory = their sum;
- peak RSS of the process during the step, minus the RSS before it;
- step time (forward, backward, optimizer step): median of interleaved repetitions, CPU time of
  this process (the figure used for ratios) and wall time; one intra-op thread.

Parts of a full run:
1. timing configs (default all-linear r=16 and q,v r=16 on the bundled SmolLM2 weights, batch 2,
   sequence 256): every method, memory and time;
2. a rank sweep (default r = 8, 32, 64, both target sets): memory only, the adapter methods;
3. a sequence sweep (256 .. 2048) on a SmolLM2-shaped Llama with random weights and fewer layers
   (default 6; per-layer memory is the same as in the 30-layer model): memory only.

    python benchmarks/step_memory.py            # full run (tens of minutes on 2 shared cores)
    python benchmarks/step_memory.py --quick    # a tiny random Llama, seconds (a test runs it)
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

MEMORY_KEYS = (
    "saved_activation_bytes",
    "grad_bytes",
    "optimizer_state_bytes",
    "step_memory_bytes",
    "peak_rss_delta_bytes",
)
SWEEP_METHODS = ["lora", "lorafa", "vera", "lamda_before", "lamda_after", "lamda_after_unfused"]
SEQ_SWEEP_METHODS = ["floor", "full", "lora", "lorafa", "vera", "lamda_before", "lamda_after", "lamda_after_unfused"]
TIMED_METHODS = [m for m in bc.METHODS]


def warmup_steps(method: str) -> int:
    # lamda_after's schedule (T=4, t_i=2) freezes B over two optimizer steps; one step for the
    # others allocates their optimizer state, so the measured step sees a steady state.
    return 2 if method.startswith("lamda_after") else 1


def smollm2_shaped_loader(layers: int):
    """SmolLM2-135M's config with `layers` decoder layers and random (seeded) weights."""
    from transformers import AutoConfig

    from lamda_peft.assets import smollm2_path

    cfg = AutoConfig.from_pretrained(smollm2_path())
    cfg.num_hidden_layers = layers
    return bc.random_llama_loader(cfg)


def ratios(methods: dict, reference: str) -> dict:
    ref = methods.get(reference)
    if ref is None:
        return {}
    out = {}
    for name, m in methods.items():
        r = {k: bc.ratio(m.get(k), ref.get(k)) for k in MEMORY_KEYS}
        if "time" in m and "time" in ref:
            r["step_time_cpu"] = bc.ratio(m["time"]["cpu"]["median_s"], ref["time"]["cpu"]["median_s"])
            r["step_time_wall"] = bc.ratio(m["time"]["wall"]["median_s"], ref["time"]["wall"]["median_s"])
        out[name] = r
    return out


def build_all(methods, load, targets, r, factors, log) -> dict[str, bc.Runner]:
    runners = {}
    for method in methods:
        t0 = time.perf_counter()
        runners[method] = bc.build(method, load, targets, r, factors)
        log(f"  built {method} in {time.perf_counter() - t0:.1f}s")
    return runners


def measure_memory(runners: dict[str, bc.Runner], ids: torch.Tensor, log, warm: bool = True) -> dict:
    out = {}
    gc.collect()  # once: the steps below free their own tensors by reference counting
    for name, runner in runners.items():
        if warm:
            for _ in range(warmup_steps(name)):
                runner.step(ids)
        m = bc.measure_step(runner, ids, collect=False)
        m["notes"] = runner.notes
        out[name] = m
        log(
            f"  {name:20s} saved {m['saved_activation_bytes'] / 2**20:8.1f} MiB  grads {m['grad_bytes'] / 2**20:7.1f}"
            f"  state {m['optimizer_state_bytes'] / 2**20:7.1f}  step {m['step_memory_bytes'] / 2**20:8.1f}"
            f"  peak RSS delta {(m['peak_rss_delta_bytes'] or 0) / 2**20:8.1f}"
        )
    return out


def target_check(cfg: dict) -> dict:
    """The issue's targets at this config: step memory and step time of LaMDA vs LoRA and the floor."""
    vs_lora, vs_floor = cfg["ratios_vs_lora"], cfg["ratios_vs_floor"]
    out = {}
    for name in ("lamda_before", "lamda_after", "loraxs", "lamda_before_unfused", "lamda_after_unfused"):
        if name not in vs_lora:
            continue
        mem_lora = bc.ratio(1.0, vs_lora[name]["step_memory_bytes"])  # LoRA / LaMDA: "x less memory"
        mem_floor = vs_floor.get(name, {}).get("step_memory_bytes")
        t_lora = bc.ratio(1.0, vs_lora[name].get("step_time_cpu"))  # LoRA / LaMDA: "x faster"
        t_floor = vs_floor.get(name, {}).get("step_time_cpu")
        out[name] = {
            "memory_x_less_than_lora": mem_lora,
            "memory_target_1.4x_less_than_lora_met": None if mem_lora is None else mem_lora >= 1.4,
            "memory_over_floor": mem_floor,
            "memory_target_within_2pct_of_floor_met": None if mem_floor is None else mem_floor <= 1.02,
            "time_x_faster_than_lora": t_lora,
            "time_target_1.15x_faster_than_lora_met": None if t_lora is None else t_lora >= 1.15,
            "time_over_floor": t_floor,
            "time_target_within_5pct_of_floor_met": None if t_floor is None else t_floor <= 1.05,
        }
    return out


def plot_seq_sweep(sweep: dict, path: Path) -> None:
    """Three panels: step memory (MiB), step memory relative to LoRA, peak RSS increase; per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seqs = [p["seq"] for p in sweep["points"]]
    methods = list(sweep["points"][0]["methods"])
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    for name in methods:
        step = [p["methods"][name]["step_memory_bytes"] / 2**20 for p in sweep["points"]]
        rel = [
            p["methods"][name]["step_memory_bytes"] / p["methods"]["lora"]["step_memory_bytes"] for p in sweep["points"]
        ]
        rss = [(p["methods"][name]["peak_rss_delta_bytes"] or 0) / 2**20 for p in sweep["points"]]
        style = "-" if name.startswith("lamda") else "--"
        for ax, values in zip(axes, (step, rel, rss), strict=True):
            ax.plot(seqs, values, style, marker="o", label=name)
    titles = (
        "step memory (saved activations + grads + optimizer state), MiB",
        "step memory / PEFT LoRA's (full fine-tuning off scale)",
        "peak RSS increase during the step, MiB",
    )
    for i, (ax, title) in enumerate(zip(axes, titles, strict=True)):
        ax.set_xscale("log", base=2)
        if i != 1:
            ax.set_yscale("log")
        ax.set_xticks(seqs, [str(s) for s in seqs])
        ax.set_xlabel(f"sequence length (batch {sweep['batch']})")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].set_ylim(0.7, 1.3)  # full fine-tuning (1.4-3.5x) is off this scale: it is in the first panel
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{sweep['model']}, {sweep['targets']} r={sweep['r']}, fp32 (CPU)", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_seq_sweep(args, q: bool, load, sweep_seqs: list[int], log) -> dict:
    """Memory of one step at each sequence length, on a SmolLM2-shaped model with fewer (random) layers."""
    if q:
        sweep_load, sweep_name = load, "tiny (random weights)"
        sweep_r = 8
    else:
        sweep_load = smollm2_shaped_loader(args.sweep_layers)
        sweep_name = f"SmolLM2-135M shape, {args.sweep_layers} of 30 layers, random weights"
        sweep_r = 16
    log(f"== sequence sweep: {sweep_name}, all-linear r={sweep_r}, seqs {sweep_seqs}")
    sweep_factors = bc.LamdaFactors(sweep_load, "all-linear", sweep_r)
    runners = build_all(SEQ_SWEEP_METHODS, sweep_load, "all-linear", sweep_r, sweep_factors, log)
    vocab = sweep_load.vocab_size
    warm_ids = bc.batch(vocab, args.batch, sweep_seqs[0])
    for name, runner in runners.items():
        for _ in range(warmup_steps(name)):
            runner.step(warm_ids)
    points = []
    for s in sweep_seqs:
        log(f"  seq {s}")
        memory = measure_memory(runners, bc.batch(vocab, args.batch, s), log, warm=False)
        points.append({"seq": s, "methods": memory, "ratios_vs_lora": ratios(memory, "lora")})
    del runners
    gc.collect()
    return {"model": sweep_name, "targets": "all-linear", "r": sweep_r, "batch": args.batch, "points": points}


def parse_configs(text: str) -> list[tuple[str, int]]:
    out = []
    for item in text.split(","):
        if item.strip():
            targets, r = item.strip().rsplit(":", 1)
            out.append((targets, int(r)))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny random Llama, short sequences, 2 repetitions")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/step_memory.json)")
    p.add_argument("--plot", type=Path, default=None, help="PNG path (default next to the JSON)")
    p.add_argument("--timed", default=None, help="timed configs, 'targets:r,...' (default all-linear:16,qv:16)")
    p.add_argument("--ranks", default=None, help="memory-only rank sweep (default 8,32,64)")
    p.add_argument("--seq", type=int, default=None, help="sequence length of the timed configs (default 256)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--reps", type=int, default=None, help="interleaved timing repetitions (default 5)")
    p.add_argument("--sweep-seqs", default=None, help="sequence sweep (default 256,512,1024,2048)")
    p.add_argument("--sweep-layers", type=int, default=6, help="decoder layers of the sweep model")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steadier timings)")
    p.add_argument("--methods", default=None, help="methods of the timed configs (default: all; floor and lora always)")
    args = p.parse_args(argv)

    q = args.quick
    timed = parse_configs(args.timed or ("all-linear:8" if q else "all-linear:16,qv:16"))
    ranks = [int(x) for x in (args.ranks if args.ranks is not None else ("4" if q else "8,32,64")).split(",") if x]
    seq = args.seq or (64 if q else 256)
    reps = args.reps or (2 if q else 5)
    default_seqs = "32,64" if q else "256,512,1024,2048"
    sweep_seqs = [int(x) for x in (args.sweep_seqs if args.sweep_seqs is not None else default_seqs).split(",") if x]
    timed_methods = TIMED_METHODS
    if args.methods:
        chosen = set(args.methods.split(",")) | {"floor", "lora"}
        timed_methods = [m for m in TIMED_METHODS if m in chosen]
    out = args.out or bc.RESULTS_DIR / ("step_memory_quick.json" if q else "step_memory.json")
    plot = args.plot or out.with_name(out.stem + "_vs_seq.png")

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    malloc_ok = bc.configure_malloc()
    machine = bc.machine_info()
    log = bc.log
    started = time.perf_counter()
    model_name = "tiny" if q else "smollm2"
    load = bc.base_loader(model_name)

    # LaMDA's spectral factors: one SVD per weight, at the largest rank used, per target set.
    all_targets = sorted({t for t, _ in timed} | ({"all-linear", "qv"} if ranks else set()))
    r_max = max([r for _, r in timed] + ranks)
    factor_cache = {}
    for targets in all_targets:
        t0 = time.perf_counter()
        factor_cache[targets] = bc.LamdaFactors(load, bc.TARGETS[targets], r_max)
        log(f"spectral factors for {targets} up to r={r_max}: {time.perf_counter() - t0:.1f}s")

    vocab = load.vocab_size
    ids = bc.batch(vocab, args.batch, seq)
    shared = {}  # floor and full do not depend on targets or rank: built once, timed in every config
    configs = []
    for targets, r in timed:
        log(f"== timed config: {model_name} {targets} r={r} batch {args.batch} seq {seq}")
        methods = [m for m in timed_methods if m not in shared]
        runners = build_all(methods, load, bc.TARGETS[targets], r, factor_cache[targets], log)
        memory = measure_memory(runners, ids, log)
        for name in [n for n in ("floor", "full") if n in timed_methods]:
            if name in runners:
                shared[name] = (runners[name], memory[name])
            else:
                runners[name], memory[name] = shared[name]
                memory[name] = dict(
                    memory[name], measured_in="the first timed config (independent of targets and rank)"
                )
        order = [m for m in timed_methods if m in runners]
        times = bc.time_interleaved(
            {m: (lambda rn=runners[m]: rn.step(ids)) for m in order}, reps=reps, warmup=0, log=log
        )
        for m in order:
            memory[m]["time"] = bc.summarize_times(times[m])
        cfg = {
            "model": model_name,
            "targets": targets,
            "r": r,
            "batch": args.batch,
            "seq": seq,
            "timed": True,
            "methods": {m: memory[m] for m in order},
        }
        cfg["ratios_vs_lora"] = ratios(cfg["methods"], "lora")
        cfg["ratios_vs_floor"] = ratios(cfg["methods"], "floor")
        cfg["targets_check"] = target_check(cfg)
        configs.append(cfg)
        for m in order:
            rl, rf = cfg["ratios_vs_lora"][m], cfg["ratios_vs_floor"][m]
            log(
                f"  {m:20s} step memory x{rl['step_memory_bytes']:.3f} of LoRA, x{rf['step_memory_bytes']:.3f} of floor;"
                f" cpu time x{rl['step_time_cpu']:.3f} of LoRA, x{rf['step_time_cpu']:.3f} of floor"
            )
        for name in list(runners):
            if name not in ("floor", "full"):
                del runners[name]
        gc.collect()

    floor_mem = shared["floor"][1] if "floor" in shared else None
    for targets in ("all-linear", "qv"):
        for r in ranks:
            log(f"== memory-only config: {model_name} {targets} r={r}")
            runners = build_all(SWEEP_METHODS, load, bc.TARGETS[targets], r, factor_cache[targets], log)
            memory = measure_memory(runners, ids, log)
            del runners
            gc.collect()
            if floor_mem is not None:
                memory["floor"] = dict(floor_mem, measured_in="the first timed config")
                memory["floor"].pop("time", None)
            cfg = {
                "model": model_name,
                "targets": targets,
                "r": r,
                "batch": args.batch,
                "seq": seq,
                "timed": False,
                "methods": memory,
            }
            cfg["ratios_vs_lora"] = ratios(memory, "lora")
            cfg["ratios_vs_floor"] = ratios(memory, "floor")
            configs.append(cfg)
    shared.clear()
    gc.collect()

    sweep = run_seq_sweep(args, q, load, sweep_seqs, log) if sweep_seqs else None

    result = {
        "benchmark": "step_memory",
        "command": bc.command_line(),
        "quick": q,
        "machine": machine,
        "settings": {
            "dtype": "float32",
            "dropout": 0.0,
            "optimizer": f"AdamW lr {bc.LR} (LoRA-FA: PEFT's LoraFAOptimizer)",
            "torch_threads": args.threads,
            "timing": f"median of {reps} interleaved repetitions (order rotated each round); "
            "ratios use CPU time (time.process_time), wall time is given too",
            "timed_configs": [f"{t} r={r}" for t, r in timed],
            "memory_only_ranks": ranks,
            "malloc_mmap_threshold_set": malloc_ok,
            "lamda_factors": "one float64 SVD per target weight (lamda_peft.spectral.spectral_factors) at the "
            "largest rank, sliced for each rank",
        },
        "definitions": {
            "saved_activation_bytes": "bytes autograd saved for backward during the forward "
            "(saved_tensors_hooks), each storage once (by data_ptr), the model's own parameters and buffers excluded",
            "saved_weight_bytes": "bytes of the model's own parameters/buffers that backward holds on to (not extra)",
            "grad_bytes": "bytes of every .grad after backward",
            "optimizer_state_bytes": "bytes of the optimizer's state tensors after the step",
            "step_memory_bytes": "saved_activation_bytes + grad_bytes + optimizer_state_bytes",
            "peak_rss_delta_bytes": "process VmHWM during the step (reset via /proc/self/clear_refs) minus VmRSS "
            "before it; glibc mallopt(M_MMAP_THRESHOLD=64KiB) so freed tensors leave the RSS",
            "time": "seconds per step (forward, loss, backward, optimizer step, zero_grad); cpu = process_time",
        },
        "configs": configs,
        "seq_sweep": sweep,
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    bc.write_json(out, result)
    if sweep:
        plot_seq_sweep(sweep, plot)
    log(f"wrote {out}{' and ' + str(plot) if sweep else ''} in {result['elapsed_s']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
