"""Memory of the gradient init (`init="gradient"`: `model.calibrated_init`, sums then A by SVD).

Three ways to get each target's summed loss gradient dL/dW over the calibration batches and its
A, each in a fresh process (peak RSS increase over the loaded model and batches, glibc set to
return freed memory at once, as in step_memory.py):

- autograd: every target weight takes a gradient (`requires_grad`), half-precision gradients
  summed per batch into float32, all targets at once: what the library did before it used hooks;
- hooks: `weight_gradient_groups` in one group: no weight takes a gradient, hooks add g^T x in float32;
- hooks_grouped: `calibration_max_bytes = --group-mib MiB`: the targets in groups, one pass each,
  each group's sums turned into A and dropped before the next pass.

    python benchmarks/calibration_memory.py            # SmolLM2-135M in bf16, all-linear, 4 batches of 2 x 128
    python benchmarks/calibration_memory.py --dtype float32 --batches 2 --seq 64   # faster on a CPU
    python benchmarks/calibration_memory.py --quick    # a tiny random Llama (a test runs it)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402

VARIANTS = ("autograd", "hooks", "hooks_grouped")


def autograd_weight_gradients(model, names, calibration) -> dict[str, torch.Tensor]:
    """The reference: each target weight takes a gradient; half-precision ones summed per batch in float32."""
    modules = {n: model.get_submodule(n) for n in names}
    for p in model.parameters():
        p.requires_grad_(False)
    for m in modules.values():
        m.weight.requires_grad_(True)
    sums: dict[str, torch.Tensor] = {}
    model.eval()
    for batch in calibration:
        model(**batch).loss.backward()
        for n, m in modules.items():
            g = m.weight.grad.to(torch.float32)
            sums[n] = sums[n] + g if n in sums else g.clone()
            m.weight.grad = None
    return sums


def one(variant: str, quick: bool, batches: int, seq: int, group_mib: float, dtype: str) -> dict:
    """Measure one variant in this process."""
    import lamda_peft.model as model_module
    from lamda_peft import LamdaConfig
    from lamda_peft.targets import find_targets

    bc.configure_malloc()
    torch.manual_seed(0)
    load = bc.random_llama_loader(bc.tiny_llama_config()) if quick else bc.base_loader("smollm2")
    model = load().to(getattr(torch, dtype))
    names = find_targets(model, "all-linear")
    gen = torch.Generator().manual_seed(0)
    data = []
    for _ in range(batches):
        ids = torch.randint(0, load.vocab_size, (2, seq), generator=gen)
        data.append({"input_ids": ids, "labels": ids})
    weights = sum(model.get_submodule(n).weight.numel() for n in names)
    rss0 = bc.rss_bytes()
    bc.reset_peak_rss()
    start = time.perf_counter()
    config = LamdaConfig(r=16, target_modules="all-linear", init="gradient")
    budget = int(group_mib * 2**20) if variant == "hooks_grouped" else None
    if variant == "autograd":
        model_module.weight_gradient_groups = lambda m, n, c, moment, max_bytes: iter(
            [autograd_weight_gradients(m, n, c)]
        )
    factors = model_module.calibrated_init(model, config, data, max_bytes=budget)
    seconds = time.perf_counter() - start
    peak = bc.peak_rss_bytes()
    return {
        "variant": variant,
        "peak_rss_increase_mib": None if peak is None or rss0 is None else round((peak - rss0) / 2**20, 1),
        "seconds": round(seconds, 2),
        "targets": len(names),
        "target_weights": weights,
        "float32_sums_mib_in_all": round(4 * weights / 2**20, 1),
        # A's span, sign-free: sum of |A^T A| entries (hooks and hooks_grouped agree bit for bit)
        "checksum": float(sum((f.A.double().T @ f.A.double()).abs().sum() for f in factors.values())),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny random Llama")
    p.add_argument(
        "--out", type=Path, default=None, help="JSON path (default benchmarks/results/calibration_memory.json)"
    )
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--seq", type=int, default=None, help="tokens per row (default 128; 32 with --quick)")
    p.add_argument("--group-mib", type=float, default=None, help="hooks_grouped budget (default 64; 0.25 --quick)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)  # the child process
    args = p.parse_args(argv)
    seq = args.seq or (32 if args.quick else 128)
    group = args.group_mib or (0.25 if args.quick else 64.0)
    if args.one:
        print(json.dumps(one(args.one, args.quick, args.batches, seq, group, args.dtype)))
        return 0
    rows = {}
    for variant in VARIANTS:
        child = [sys.executable, __file__, "--one", variant, "--batches", str(args.batches), "--seq", str(seq)]
        child += ["--group-mib", str(group), "--dtype", args.dtype] + (["--quick"] if args.quick else [])
        done = subprocess.run(child, check=True, capture_output=True, text=True)
        rows[variant] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{variant:14s} peak +{rows[variant]['peak_rss_increase_mib']} MiB  {rows[variant]['seconds']} s")
    base = rows["autograd"]["peak_rss_increase_mib"]
    payload = {
        "benchmark": "calibration_memory",
        "quick": args.quick,
        "command": bc.command_line(),
        "settings": {"model": "tiny" if args.quick else "smollm2", "dtype": args.dtype, "targets": "all-linear"}
        | {"batches": args.batches, "batch_size": 2, "seq": seq, "group_mib": group},
        "machine": bc.machine_info(),
        "variants": rows,
        "ratios_vs_autograd": {
            v: {"peak_x_less": round(base / rows[v]["peak_rss_increase_mib"], 3) if base else None} for v in VARIANTS
        },
        # hooks and hooks_grouped: the same sums bit for bit (tests/test_gradient_init.py); autograd rounds
        # each batch's gradient to bf16 first, so its checksum differs slightly
        "checksum_relative_difference_vs_autograd": {
            v: abs(rows[v]["checksum"] - rows["autograd"]["checksum"]) / rows["autograd"]["checksum"] for v in VARIANTS
        },
    }
    out = args.out or Path(__file__).resolve().parent / "results" / "calibration_memory.json"
    print(f"wrote {bc.write_json(out, payload)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
