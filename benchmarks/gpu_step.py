"""Peak GPU memory and throughput of one training step: LaMDA against PEFT's methods (issues 7 and 11).

The GPU counterpart of step_memory.py, quant_memory.py and lean_memory.py. Every method is built
on the same random-weight base (seeded), one at a time (a 7B base fits once, not ten times), and
measured at each sequence length:

- peak `torch.cuda.max_memory_allocated` during one training step (forward, backward, optimizer
  step), and the same minus what was allocated just before the step (weights, adapter, optimizer
  state: the step's own increase);
- saved activations, gradient bytes and optimizer-state bytes, as in step_memory.py;
- tokens per second: batch x seq over the median step time of `--timed-steps` steps (each one
  bracketed by `torch.cuda.synchronize()`), after `--warmup` steps (two at least, so that
  lamda_after's schedule has frozen B and every optimizer has its state).

Methods (bench_common.py, lean_memory.py and quant_memory.py build them): floor, full, lora,
pissa, lorafa, vera, lamda_before, lamda_after, loraxs, lamda_after_unfused; with `--lean`:
lamda_chunked, lamda_lean, lora_lean (chunked cross-entropy, + gradient checkpointing); with
`--quant`: qlora, qlamda_before, qlamda_after (bitsandbytes NF4). A method that runs out of memory
is recorded as such. Every figure is also a ratio to PEFT LoRA (QLoRA for the quantized ones)
measured in the same run. Base weights are in `--dtype` (bf16 on a GPU); adapters are float32,
PEFT's default (`autocast_adapter_dtype`) and LaMDA's.

    python benchmarks/gpu_step.py --out benchmarks/results/gpu/step_h100.json     # Llama-7B shape, seq 2048
    python benchmarks/gpu_step.py --quick      # a tiny random Llama, on whatever device (a test runs it)
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402

# bench_common's methods, full fine-tuning last (on a 7B base it may run out of memory)
BASE_METHODS = (*(m for m in bc.METHODS if m not in ("full", "lamda_before_unfused")), "full")
LEAN_METHODS = ("lamda_chunked", "lamda_lean", "lora_lean")
QUANT_METHODS = ("qlora", "qlamda_before", "qlamda_after")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def model_config(name: str, layers: int | None):
    """The base model's config: Llama-7B's shape, SmolLM2-135M's or the tiny test Llama (random weights)."""
    from transformers import AutoConfig, LlamaConfig

    if name == "llama-7b":
        cfg = LlamaConfig(
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
        )
    elif name == "smollm2":
        from lamda_peft.assets import smollm2_path

        cfg = AutoConfig.from_pretrained(smollm2_path())
    elif name == "tiny":
        cfg = bc.tiny_llama_config()
    else:
        raise ValueError(f"--config must be llama-7b, smollm2 or tiny, got {name!r}")
    if layers is not None:
        cfg.num_hidden_layers = layers
    return cfg


loader = bc.random_llama_loader


def build(method: str, load, targets, r: int) -> bc.Runner:
    if method in LEAN_METHODS:
        import lean_memory

        if targets != "all-linear":
            raise ValueError("--lean methods are measured with --targets all-linear (as lean_memory.py)")
        return lean_memory.build(method, load, r, None)
    if method in QUANT_METHODS:
        import quant_memory

        if targets != "all-linear":
            raise ValueError("--quant methods are measured with --targets all-linear (as quant_memory.py)")
        return quant_memory.build(method, load, r)
    return bc.build(method, load, bc.TARGETS[targets], r)


class Device:
    """Memory counters and synchronisation of the device the step runs on (CUDA or CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def release(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def allocated(self) -> int | None:
        return torch.cuda.memory_allocated(self.device) if self.cuda else None

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int | None:
        return torch.cuda.max_memory_allocated(self.device) if self.cuda else None

    def describe(self) -> dict:
        if not self.cuda:
            return {"type": "cpu"}
        props = torch.cuda.get_device_properties(self.device)
        return {
            "type": "cuda",
            "name": props.name,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count,
            "cuda": torch.version.cuda,
        }


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def measure(runner: bc.Runner, ids: torch.Tensor, dev: Device, timed_steps: int) -> dict:
    """Peak memory of one instrumented step, then the median time of `timed_steps` plain steps."""
    dev.sync()
    dev.release()
    before = dev.allocated()
    dev.reset_peak()
    m = bc.measure_step(runner, ids, collect=False)
    dev.sync()
    peak = dev.peak()
    m["allocated_before_step_bytes"] = before
    m["peak_allocated_bytes"] = peak
    m["peak_step_increase_bytes"] = None if peak is None else peak - before
    times = []
    for _ in range(timed_steps):
        dev.sync()
        t0 = time.perf_counter()
        runner.step(ids)
        dev.sync()
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    m["step_time"] = {
        "median_s": median,
        "min_s": min(times),
        "max_s": max(times),
        "all_s": [round(t, 5) for t in times],
    }
    m["tokens_per_s"] = ids.numel() / median
    return m


def ratios_to(methods: dict, reference: str) -> dict:
    ref = methods.get(reference)
    if ref is None or ref.get("oom"):
        return {}
    out = {}
    for name, m in methods.items():
        if m.get("oom"):
            continue
        out[name] = {
            "peak_x_less": bc.ratio(ref["peak_allocated_bytes"], m["peak_allocated_bytes"]),
            "peak_step_increase_x_less": bc.ratio(ref["peak_step_increase_bytes"], m["peak_step_increase_bytes"]),
            "step_memory_x_less": bc.ratio(ref["step_memory_bytes"], m["step_memory_bytes"]),
            "tokens_per_s_x": bc.ratio(m["tokens_per_s"], ref["tokens_per_s"]),
        }
    return out


def run_method(method, load, args, seqs, dev, log) -> dict[int, dict]:
    """Build `method`, warm it up, measure it at every sequence length; free it. OOM is recorded."""
    out: dict[int, dict] = {}
    runner = None
    try:
        t0 = time.perf_counter()
        runner = build(method, load, args.targets, args.r)
        dev.sync()
        build_s = time.perf_counter() - t0
        warm_ids = bc.batch(load.vocab_size, args.batch, seqs[0]).to(dev.device)
        for _ in range(args.warmup):
            runner.step(warm_ids)
        for seq in seqs:
            ids = bc.batch(load.vocab_size, args.batch, seq).to(dev.device)
            try:
                m = measure(runner, ids, dev, args.timed_steps)
            except RuntimeError as exc:
                if not is_oom(exc):
                    raise
                out[seq] = {"oom": True, "error": str(exc).splitlines()[0][:300]}
                log(f"  {method:20s} seq {seq:5d}  out of memory")
                if runner.optimizer is not None:
                    runner.optimizer.zero_grad(set_to_none=True)
                dev.release()
                continue
            m["build_s"] = build_s
            m["notes"] = runner.notes
            out[seq] = m
            peak = m["peak_allocated_bytes"]
            log(
                f"  {method:20s} seq {seq:5d}  peak {(peak or 0) / 2**30:7.2f} GiB"
                f"  step increase {(m['peak_step_increase_bytes'] or 0) / 2**30:6.2f} GiB"
                f"  saved {m['saved_activation_bytes'] / 2**30:6.2f} GiB  {m['tokens_per_s']:9.0f} tok/s"
                f"  trainable {m['trainable_parameters']:,}"
            )
    except RuntimeError as exc:
        if not is_oom(exc):
            raise
        for seq in seqs:
            out.setdefault(seq, {"oom": True, "error": str(exc).splitlines()[0][:300]})
        log(f"  {method:20s} out of memory while building or warming up")
    finally:
        del runner
        dev.release()
    return out


TIMING_METHODS = ("floor", "lora", "lorafa", "vera", "lamda_before", "lamda_after", "loraxs", "lamda_after_unfused")


def profile_step(runner: bc.Runner, ids: torch.Tensor, dev: Device, top: int = 12) -> dict:
    """One step under torch.profiler: scalar reads, kernel launches and the top ops by self CPU time.

    "syncs" counts explicit stream/device synchronisations plus every `aten::_local_scalar_dense`
    (`.item()`, `int()`, `bool()` of a tensor), on any device: on a GPU each such read of a CUDA
    tensor stalls the host; reads of CPU tensors (AdamW's step counters) are counted too but cost
    nothing. Compare methods by it, not against zero.
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.cuda else [])
    with profile(activities=activities) as prof:
        runner.step(ids)
        dev.sync()
    # the whole step, and inside it forward + backward alone (nested counters both count an op): on a GPU
    # AdamW runs foreach (a few kernels for all parameters), while on the CPU it dispatches several ops
    # per parameter, so the forward + backward count is the fair launch proxy
    forward_backward = bc.DispatchCounter()
    with bc.DispatchCounter() as dispatched:
        runner.step(ids, forward_backward=forward_backward)
    events = prof.key_averages()
    by_name = {e.key: e for e in events}

    def count(*names):
        return sum(by_name[n].count for n in names if n in by_name)

    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {
        "syncs": count("cudaStreamSynchronize", "cudaDeviceSynchronize", "aten::_local_scalar_dense"),
        "kernel_launches": count("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx"),
        "dispatched_ops": dispatched.ops,  # aten ops, views excepted (bench_common.DispatchCounter)
        "dispatched_ops_fwd_bwd": forward_backward.ops,  # the same, forward and backward only
        "self_cpu_ms_total": sum(e.self_cpu_time_total for e in events) / 1e3,
        "top_self_cpu": [{"op": e.key, "count": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3} for e in rows],
    }


def run_timing(load, args, seq: int, dev: Device, log) -> dict:
    """Every timing method resident at once (a shallower base), steps interleaved round by round."""
    runners = {m: build(m, load, args.targets, args.r) for m in args.timing_methods}
    ids = bc.batch(load.vocab_size, args.batch, seq).to(dev.device)
    for runner in runners.values():
        for _ in range(args.warmup):
            runner.step(ids)

    def stepper(runner):
        def step():
            runner.step(ids)
            dev.sync()

        return step

    steps = {name: stepper(r) for name, r in runners.items()}
    rounds = bc.time_interleaved(steps, reps=args.timing_rounds, warmup=1)
    out = {}
    for name, times in rounds.items():
        summary = bc.summarize_times(times)
        summary["tokens_per_s"] = ids.numel() / summary["wall"]["median_s"]
        summary["cpu_over_wall"] = summary["cpu"]["median_s"] / summary["wall"]["median_s"]
        if args.profile:
            summary["profile"] = profile_step(runners[name], ids, dev)
        out[name] = summary
        log(
            f"  {name:20s} {summary['wall']['median_s'] * 1e3:7.1f} ms/step  {summary['tokens_per_s']:8.0f} tok/s"
            f"  process CPU / wall {summary['cpu_over_wall']:.2f}"
            + (
                f"  syncs {summary['profile']['syncs']}  launches {summary['profile']['kernel_launches']}"
                f"  ops {summary['profile']['dispatched_ops']}"
                if args.profile
                else ""
            )
        )
    del runners, steps
    dev.release()
    ref, floor = out.get("lora"), out.get("floor")
    for m in out.values():
        m["x_faster_than_lora"] = None if ref is None else ref["wall"]["median_s"] / m["wall"]["median_s"]
        m["time_over_floor"] = None if floor is None else m["wall"]["median_s"] / floor["wall"]["median_s"]
        if not dev.cuda:  # on the CPU the process' CPU time is the figure a shared machine does not skew
            m["cpu_x_faster_than_lora"] = None if ref is None else ref["cpu"]["median_s"] / m["cpu"]["median_s"]
            m["cpu_time_over_floor"] = None if floor is None else m["cpu"]["median_s"] / floor["cpu"]["median_s"]
    return out


def target_check(by_method: dict, quant: bool) -> dict:
    """The issues' GPU targets at one sequence length."""
    out = {}
    vs_lora = ratios_to(by_method, "lora")
    for name in ("lamda_before", "lamda_after", "loraxs"):
        if name in vs_lora:
            x = vs_lora[name]["peak_x_less"]
            out[name] = {"peak_x_less_than_lora": x, "target_1.32x_met": None if x is None else x >= 1.32}
    lean = by_method.get("lamda_lean")
    if lean and not lean.get("oom") and "lora" in vs_lora:
        x = bc.ratio(by_method["lora"]["peak_allocated_bytes"], lean["peak_allocated_bytes"])
        out["lamda_lean"] = {"peak_x_less_than_stock_lora": x, "target_2x_met": None if x is None else x >= 2.0}
    if quant:
        vs_q = ratios_to(by_method, "qlora")
        for name in ("qlamda_before", "qlamda_after"):
            if name in vs_q:
                out[name] = {"peak_x_less_than_qlora": vs_q[name]["peak_x_less"]}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny random Llama, seq 64, 2 timed steps")
    p.add_argument(
        "--out", type=Path, default=None, help="JSON path (default benchmarks/results/gpu/step_<device>.json)"
    )
    p.add_argument("--config", default="llama-7b", help="llama-7b (default), smollm2 or tiny (random weights)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the config's)")
    p.add_argument("--device", default=None, help="default cuda when available, else cpu")
    p.add_argument(
        "--dtype", default=None, choices=sorted(DTYPES), help="base weights (default bf16 on cuda, fp32 on cpu)"
    )
    p.add_argument("--seqs", default=None, help="sequence lengths (default 2048; quick 64)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--targets", default="all-linear", choices=sorted(bc.TARGETS))
    p.add_argument("--methods", default=None, help=f"comma list (default {','.join(BASE_METHODS)})")
    p.add_argument("--lean", action="store_true", help=f"add {', '.join(LEAN_METHODS)}")
    p.add_argument("--quant", action="store_true", help=f"add {', '.join(QUANT_METHODS)} (needs bitsandbytes)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--timed-steps", type=int, default=None, help="default 10; quick 2")
    p.add_argument(
        "--timing-layers",
        type=int,
        default=None,
        help="also time TIMING_METHODS all resident at once, interleaved, on a base with this many layers "
        "(default 8 for llama-7b, 0 = skip; quick 2)",
    )
    p.add_argument("--timing-methods", default=",".join(TIMING_METHODS))
    p.add_argument("--timing-rounds", type=int, default=None, help="interleaved rounds (default 15; quick 2)")
    p.add_argument("--profile", action="store_true", help="profile one step of each timing method (syncs, launches)")
    args = p.parse_args(argv)
    q = args.quick
    if args.warmup < 2:
        p.error("--warmup must be at least 2 (lamda_after's schedule freezes B over two steps)")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dev = Device(device)
    dtype = DTYPES[args.dtype or ("bf16" if dev.cuda else "fp32")]
    config_name = "tiny" if q else args.config
    seqs = [int(s) for s in (args.seqs or ("64" if q else "2048")).split(",")]
    args.timed_steps = args.timed_steps or (2 if q else 10)
    methods = args.methods.split(",") if args.methods else list(BASE_METHODS)
    if args.lean:
        methods += [m for m in LEAN_METHODS if m not in methods]
    if args.quant:
        methods += [m for m in QUANT_METHODS if m not in methods]
    unknown = [m for m in methods if m not in (*bc.METHODS, *LEAN_METHODS, *QUANT_METHODS)]
    if unknown:
        p.error(f"unknown --methods {unknown}")
    tag = (dev.describe().get("name") or "cpu").replace(" ", "_").lower()
    out = args.out or bc.RESULTS_DIR / "gpu" / (f"step_{tag}_quick.json" if q else f"step_{tag}.json")
    warnings.filterwarnings("ignore")
    cfg = model_config(config_name, args.layers)
    load = loader(cfg, device, dtype)
    started = time.perf_counter()
    bc.log(
        f"{config_name} ({cfg.num_hidden_layers} layers), {dtype}, {device}, {args.targets} r={args.r}, "
        f"batch {args.batch}, seqs {seqs}: {methods}"
    )
    results: dict[str, dict[int, dict]] = {}
    for method in methods:
        results[method] = run_method(method, load, args, seqs, dev, bc.log)
    timing_layers = args.timing_layers if args.timing_layers is not None else (2 if q else 8)
    args.timing_methods = [m for m in args.timing_methods.split(",") if m]
    args.timing_rounds = args.timing_rounds or (2 if q else 15)
    timing = {}
    if timing_layers:
        timing_load = loader(model_config(config_name, timing_layers), device, dtype)
        for seq in seqs:
            bc.log(f"interleaved timing, {timing_layers} layers, seq {seq}: {args.timing_methods}")
            timing[str(seq)] = run_timing(timing_load, args, seq, dev, bc.log)
    points = []
    for seq in seqs:
        by_method = {name: per_seq[seq] for name, per_seq in results.items()}
        point = {
            "seq": seq,
            "methods": by_method,
            "ratios_vs_lora": ratios_to(by_method, "lora"),
            "ratios_vs_floor": ratios_to(by_method, "floor"),
            "targets": target_check(by_method, args.quant),
        }
        if args.quant:
            point["ratios_vs_qlora"] = ratios_to(by_method, "qlora")
        points.append(point)
        bc.log(f"seq {seq} targets: {point['targets']}")
    data = {
        "benchmark": "gpu_step",
        "quick": q,
        "command": bc.command_line(),
        "machine": bc.machine_info(),
        "device": dev.describe(),
        "model": f"{config_name} shape, {cfg.num_hidden_layers} layers, random weights (seed 0)",
        "attention": getattr(cfg, "_attn_implementation", None),
        "base_dtype": str(dtype).removeprefix("torch."),
        "targets": args.targets,
        "r": args.r,
        "batch": args.batch,
        "warmup_steps": args.warmup,
        "timed_steps": args.timed_steps,
        "points": points,
        "timing": {
            "layers": timing_layers,
            "rounds": args.timing_rounds,
            "how": "every method resident at once; one step of each per round, the order rotating; wall time "
            "bracketed by torch.cuda.synchronize(); the process' CPU time alongside (synchronize() may spin: "
            "not a measure of host-boundness on CUDA)",
            "by_seq": timing,
        },
        "wall_s": time.perf_counter() - started,
    }
    bc.write_json(out, data)
    bc.log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
