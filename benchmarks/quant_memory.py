"""Step memory of QLaMDA against PEFT QLoRA on the same NF4 base (issue 11, "Memory").

Both quantize the same target linears with bitsandbytes NF4 (blocksize 64): QLoRA quantizes W
(`quantization.quantize_model_linears`, then PEFT LoRA), QLaMDA the residual W - B0 S0 A
(`LamdaConfig(quantize="nf4")`). Same rank, targets, batch and sequence; the figures are the ones
of step_memory.py (saved activations + gradients + optimizer state; peak RSS increase), measured
in one run, as ratios to QLoRA. QLaMDA is measured before the B freeze (B trainable) and after.

    python benchmarks/quant_memory.py            # SmolLM2, all-linear r=16, batch 2, seq 256
    python benchmarks/quant_memory.py --quick    # a tiny random Llama (a test runs it)
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

VARIANTS = ("qlora", "qlamda_before", "qlamda_after")


def build(variant: str, load, r: int) -> bc.Runner:
    from peft import LoraConfig, get_peft_model

    from lamda_peft import LamdaConfig, get_lamda_model
    from lamda_peft.quantization import quantize_model_linears
    from lamda_peft.targets import find_targets

    model = load()
    if variant == "qlora":
        names = find_targets(model, "all-linear")
        quantize_model_linears(model, names, "nf4")
        peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=r, target_modules=names, lora_dropout=0.0))
        opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=bc.LR)
        return bc.Runner(variant, peft_model, opt, "PEFT LoRA on bitsandbytes NF4 linears")
    after = variant == "qlamda_after"
    lamda = get_lamda_model(
        model, LamdaConfig(r=r, target_modules="all-linear", quantize="nf4", freeze_fraction=0.5 if after else 0.3)
    )
    opt = torch.optim.AdamW(lamda.lamda_param_groups(bc.LR))
    lamda.attach_optimizer(opt, total_steps=4 if after else 10**9)  # as step_memory.py's lamda_before/after
    return bc.Runner(variant, lamda, opt, "LaMDA, NF4 residual base")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny random Llama, short sequence")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/quant_memory.json)")
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--r", type=int, default=16)
    args = p.parse_args(argv)
    q = args.quick
    seq = args.seq or (64 if q else 256)
    r = 4 if q else args.r
    out = args.out or bc.RESULTS_DIR / ("quant_memory_quick.json" if q else "quant_memory.json")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    malloc_ok = bc.configure_malloc()
    machine = bc.machine_info()
    started = time.perf_counter()
    model_name = "tiny" if q else "smollm2"
    load = bc.base_loader(model_name)
    runners = {v: build(v, load, r) for v in VARIANTS}
    ids = bc.batch(load.vocab_size, args.batch, seq)
    for runner in runners.values():
        for _ in range(2):  # optimizer state allocated; qlamda_after's schedule freezes B
            runner.step(ids)
    gc.collect()
    methods = {}
    for name, runner in runners.items():
        m = bc.measure_step(runner, ids, collect=False)
        m["notes"] = runner.notes
        methods[name] = m
        bc.log(
            f"  {name:14s} step memory {m['step_memory_bytes'] / 2**20:8.1f} MiB  trainable {m['trainable_parameters']:,}"
        )
    ref = methods["qlora"]
    ratios = {
        n: {
            "step_memory_x_less_than_qlora": bc.ratio(ref["step_memory_bytes"], m["step_memory_bytes"]),
            "peak_rss_delta_x_less_than_qlora": bc.ratio(ref["peak_rss_delta_bytes"], m["peak_rss_delta_bytes"]),
        }
        for n, m in methods.items()
    }
    bc.log(f"ratios: {ratios}")
    data = {
        "benchmark": "quant_memory",
        "quick": q,
        "command": bc.command_line(),
        "machine": machine,
        "malloc_mmap_threshold_set": malloc_ok,
        "model": model_name,
        "targets": "all-linear",
        "quantization": "bitsandbytes nf4, blocksize 64",
        "r": r,
        "batch": args.batch,
        "seq": seq,
        "methods": methods,
        "ratios_vs_qlora": ratios,
        "wall_s": time.perf_counter() - started,
    }
    bc.write_json(out, data)
    bc.log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
