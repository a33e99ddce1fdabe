"""Inference: LaMDA merged vs unmerged latency, and the exported LoRA adapter served by PEFT.

Issue 7, item 4. A LaMDA adapter (all-linear, r=16 on the bundled SmolLM2) is given non-trivial
trained values (dS, dB set to seeded noise, as after a run), then served five ways:

| variant               | what runs                                                              |
|-----------------------|------------------------------------------------------------------------|
| base                  | the original model, no adapter (the latency floor)                     |
| lamda_unmerged        | `LamdaModel`, adapter path computed at every layer                     |
| lamda_unmerged_unfused | the same with `LamdaLinear.fused = False` (the autograd path)           |
| lamda_merged          | `LamdaModel.merge()`: W_res + s B S A folded into each weight           |
| peft_lora_unmerged    | `export_lora()` folder loaded by `peft.PeftModel.from_pretrained` on the original base |
| peft_lora_merged      | the same after PEFT's `merge_and_unload()`                             |

Correctness: the logits of every variant against `lamda_unmerged` (max abs difference) and the
greedy continuations (identical tokens). Latency: prefill (one forward over the prompt) and
decoding (greedy `generate` with the KV cache), medians of interleaved repetitions, CPU time of
this process (wall time too), one intra-op thread, `torch.inference_mode()`.

    python benchmarks/inference.py            # SmolLM2, prefill batch 1 x 256, decode 32 tokens
    python benchmarks/inference.py --quick    # tiny random Llama
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402


def trained_lamda(load, targets, r: int, factors: bc.LamdaFactors, seed: int = 0):
    """A LaMDA model whose dS and dB hold seeded 'trained' values (half of B's columns frozen)."""
    from lamda_peft import LamdaConfig, LamdaModel

    lamda = LamdaModel(load(), LamdaConfig(r=r, target_modules=targets), factors=factors.at_rank(r))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lamda.lamda_layers():
            layer.dS.copy_(0.02 * torch.randn(layer.dS.shape, generator=g))
            layer.dB.copy_(0.02 * layer.B0.abs().mean() * torch.randn(layer.dB.shape, generator=g))
            layer.freeze_columns(layer.r // 2)
    return lamda.eval()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny random Llama, short prompt, 2 repetitions")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/inference.json)")
    p.add_argument("--r", type=int, default=None, help="rank (default 16; quick 8)")
    p.add_argument("--targets", default="all-linear", choices=sorted(bc.TARGETS))
    p.add_argument("--prompt-len", type=int, default=None, help="prefill length (default 256; quick 32)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=None, help="greedy decode length (default 32; quick 8)")
    p.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 7; quick 2)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    q = args.quick
    r = args.r or (8 if q else 16)
    prompt_len = args.prompt_len or (32 if q else 256)
    new_tokens = args.new_tokens or (8 if q else 32)
    reps = args.reps or (2 if q else 7)
    out = args.out or bc.RESULTS_DIR / ("inference_quick.json" if q else "inference.json")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    machine = bc.machine_info()
    started = time.perf_counter()
    model_name = "tiny" if q else "smollm2"
    load = bc.base_loader(model_name)
    targets = bc.TARGETS[args.targets]

    from peft import PeftModel

    factors = bc.LamdaFactors(load, targets, r)
    models = {"base": load().eval()}
    models["lamda_unmerged"] = trained_lamda(load, targets, r, factors)
    models["lamda_unmerged_unfused"] = trained_lamda(load, targets, r, factors)
    for _, module in models["lamda_unmerged_unfused"].lamda_layers():
        module.fused = False
    merged = trained_lamda(load, targets, r, factors)
    merged.merge()
    models["lamda_merged"] = merged
    with tempfile.TemporaryDirectory() as tmp:
        export_dir = models["lamda_unmerged"].export_lora(Path(tmp) / "lora")
        files = sorted(f.name for f in export_dir.iterdir())
        models["peft_lora_unmerged"] = PeftModel.from_pretrained(load(), str(export_dir)).eval()
        models["peft_lora_merged"] = PeftModel.from_pretrained(load(), str(export_dir)).merge_and_unload().eval()
    bc.log(f"built {list(models)}; export folder: {files}")

    ids = bc.batch(load.vocab_size, args.batch, prompt_len, seed=1)
    with torch.inference_mode():
        logits = {n: m(input_ids=ids).logits.float() for n, m in models.items()}
        gen = {
            n: m.generate(
                input_ids=ids, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens, pad_token_id=0
            )[:, prompt_len:]
            for n, m in models.items()
        }
    ref = logits["lamda_unmerged"]
    scale = float(ref.abs().max())
    correctness = {
        n: {
            "max_abs_logit_diff_vs_lamda_unmerged": float((lg - ref).abs().max()),
            "max_abs_logit_diff_relative": float((lg - ref).abs().max()) / scale,
            "greedy_tokens_equal_lamda_unmerged": bool(torch.equal(gen[n], gen["lamda_unmerged"])),
        }
        for n, lg in logits.items()
    }
    correctness["base"]["note"] = (
        "the base model without adapter: differs by construction (shows the adapter is non-trivial)"
    )
    for n, c in correctness.items():
        bc.log(
            f"  {n:22s} max |logit diff| {c['max_abs_logit_diff_vs_lamda_unmerged']:.3e}  greedy equal {c['greedy_tokens_equal_lamda_unmerged']}"
        )

    def prefill(m):
        return lambda: m(input_ids=ids)

    def decode(m):
        return lambda: m.generate(
            input_ids=ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0
        )

    timings = {}
    with torch.inference_mode():
        for workload, make in (("prefill", prefill), ("decode", decode)):
            bc.log(f"== {workload}")
            times = bc.time_interleaved({n: make(m) for n, m in models.items()}, reps=reps, warmup=1, log=bc.log)
            summary = {n: bc.summarize_times(t) for n, t in times.items()}
            base_cpu = summary["base"]["cpu"]["median_s"]
            merged_cpu = summary["lamda_merged"]["cpu"]["median_s"]
            for n, s in summary.items():
                s["cpu_over_base"] = bc.ratio(s["cpu"]["median_s"], base_cpu)
                s["cpu_over_lamda_merged"] = bc.ratio(s["cpu"]["median_s"], merged_cpu)
                tokens = args.batch * (prompt_len if workload == "prefill" else new_tokens)
                s["tokens_per_cpu_s"] = tokens / s["cpu"]["median_s"]
                bc.log(f"  {n:22s} cpu {s['cpu']['median_s'] * 1e3:8.1f} ms  x{s['cpu_over_base']:.3f} of base")
            timings[workload] = summary

    result = {
        "benchmark": "inference",
        "command": bc.command_line(),
        "quick": q,
        "machine": machine,
        "settings": {
            "model": model_name,
            "targets": args.targets,
            "r": r,
            "batch": args.batch,
            "prompt_len": prompt_len,
            "new_tokens": new_tokens,
            "reps": reps,
            "torch_threads": args.threads,
            "dtype": "float32",
            "timing": "median of interleaved repetitions (order rotated each round) of CPU time (process_time); "
            "wall time too; decode = greedy generate with KV cache, prompt included",
            "adapter_values": "dS, dB seeded noise (as after training), half of B's columns frozen",
        },
        "export_files": files,
        "correctness": correctness,
        "latency": timings,
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    bc.write_json(out, result)
    bc.log(f"wrote {out} in {result['elapsed_s']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
