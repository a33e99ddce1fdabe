"""Markdown tables from the benchmark JSON files (step memory/time, parameter updates, inference).

    python benchmarks/report.py                      # benchmarks/results/*.json -> benchmarks/RESULTS.md
    python benchmarks/report.py --results-dir DIR --out FILE

A file that is missing is skipped with a note; nothing is measured here.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
MIB = 2**20
LABELS = {
    "floor": "no adapter (floor)",
    "full": "full fine-tuning",
    "lora": "PEFT LoRA",
    "pissa": "PEFT LoRA, PiSSA init",
    "lorafa": "PEFT LoRA-FA",
    "vera": "PEFT VeRA (same r)",
    "lamda_before": "LaMDA, B trainable",
    "lamda_after": "LaMDA, B frozen",
    "loraxs": "LaMDA freeze_fraction=0 (LoRA-XS-like)",
    "lamda_before_unfused": "LaMDA, B trainable, unfused path*",
    "lamda_after_unfused": "LaMDA, B frozen, unfused path*",
    "lamda": "LaMDA (freeze_fraction 0.3)",
    "lamda++": "LaMDA++ (energy ranks)",
}


def _f(x, fmt="{:.3f}", none="-"):
    return none if x is None else fmt.format(x)


def _mib(x):
    return _f(None if x is None else x / MIB, "{:.1f}")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def machine_line(data: dict) -> str:
    m = data["machine"]
    load = m.get("load_average_at_start")
    end = data.get("load_average_at_end")
    return (
        f"Machine: {m['cpu']}, {m['cores_available']} cores available, torch {m['torch']}, transformers "
        f"{m['transformers']}, peft {m['peft']}, {m['torch_threads']} torch thread(s); load average "
        f"{_f(load and load[0], '{:.1f}')} at start, {_f(end and end[0], '{:.1f}')} at end (the machine is shared). "
        f"Command: `{data['command']}`."
    )


def step_memory_section(data: dict, title: str = "Memory and time per training step") -> list[str]:
    out = [f"## {title}", "", machine_line(data), ""]
    out.append(
        "Step memory = tensors saved for backward (each storage once, the model's own weights excluded) + "
        "gradients + optimizer state (AdamW). Peak RSS = increase of the process' resident set during the "
        "step. Time = median CPU time of interleaved repetitions (wall time in the JSON). Ratios are to "
        "PEFT LoRA and to the no-adapter floor measured in the same run. The floor backpropagates to the "
        "embeddings' output, so it also keeps the first layer's norm input, which adapter methods never need "
        "(one batch x sequence x hidden tensor). *Unfused rows set `LamdaLinear.fused = False`: the autograd path the library takes for Conv1D, dropout or hooked bases."
    )
    out.append("")
    for cfg in [c for c in data["configs"] if c["timed"]]:
        out.append(f"### {cfg['model']}, {cfg['targets']}, r={cfg['r']}, batch {cfg['batch']}, sequence {cfg['seq']}")
        out.append("")
        rows = []
        for name, m in cfg["methods"].items():
            rl, rf = cfg["ratios_vs_lora"][name], cfg["ratios_vs_floor"][name]
            cpu = m.get("time", {}).get("cpu")
            t = "-" if cpu is None else f"{cpu['median_s']:.2f} [{cpu['min_s']:.2f}-{cpu['max_s']:.2f}]"
            rows.append(
                [
                    LABELS.get(name, name),
                    f"{m['trainable_parameters']:,}",
                    _mib(m["saved_activation_bytes"]),
                    _mib(m["grad_bytes"]),
                    _mib(m["optimizer_state_bytes"]),
                    _mib(m["step_memory_bytes"]),
                    _f(rl["step_memory_bytes"]),
                    _f(rf["step_memory_bytes"]),
                    _mib(m["peak_rss_delta_bytes"]),
                    _f(rl["peak_rss_delta_bytes"]),
                    t,
                    _f(rl.get("step_time_cpu")),
                    _f(rf.get("step_time_cpu")),
                ]
            )
        out += _table(
            [
                "method",
                "trainable",
                "saved MiB",
                "grads MiB",
                "opt. state MiB",
                "step MiB",
                "x LoRA",
                "x floor",
                "peak RSS MiB",
                "x LoRA",
                "step CPU s, median [min-max]",
                "x LoRA",
                "x floor",
            ],
            rows,
        )
        out.append("")
        checks = cfg.get("targets_check", {}) if cfg["targets"] == "all-linear" else {}
        if checks:
            out.append("Targets (issue 7, stated for all-linear r=16, batch 2, sequence 256) at this setting:")
            out.append("")
            rows = []
            for name, c in checks.items():
                rows.append(
                    [
                        LABELS.get(name, name),
                        f"{_f(c['memory_x_less_than_lora'], '{:.3f}x')} ({_ok(c['memory_target_1.4x_less_than_lora_met'])})",
                        f"{_pct(c['memory_over_floor'])} ({_ok(c['memory_target_within_2pct_of_floor_met'])})",
                        f"{_f(c['time_x_faster_than_lora'], '{:.3f}x')} ({_ok(c['time_target_1.15x_faster_than_lora_met'])})",
                        f"{_pct(c['time_over_floor'])} ({_ok(c['time_target_within_5pct_of_floor_met'])})",
                    ]
                )
            out += _table(
                [
                    "method",
                    "memory: less than LoRA (>= 1.4x)",
                    "memory: above floor (<= 2%)",
                    "time: faster than LoRA (>= 1.15x)",
                    "time: above floor (<= 5%)",
                ],
                rows,
            )
            out.append("")
    memory_only = [c for c in data["configs"] if not c["timed"]]
    if memory_only:
        names = [n for n in ("lora", "lorafa", "vera", "lamda_before", "lamda_after", "lamda_after_unfused")]
        out.append("### Step memory across ranks (memory only, same batch and sequence)")
        out.append("")
        out.append("Step memory in MiB, and LoRA's step memory divided by each method's (x less than LoRA).")
        out.append("")
        rows = []
        for cfg in sorted(
            memory_only + [c for c in data["configs"] if c["timed"]], key=lambda c: (c["targets"], c["r"])
        ):
            row = [cfg["targets"], str(cfg["r"])]
            lora = cfg["methods"]["lora"]["step_memory_bytes"]
            for n in names:
                m = cfg["methods"].get(n)
                row.append(
                    "-" if m is None else f"{m['step_memory_bytes'] / MIB:.1f} ({lora / m['step_memory_bytes']:.2f}x)"
                )
            floor = cfg["methods"].get("floor")
            row.append("-" if floor is None else f"{floor['step_memory_bytes'] / MIB:.1f}")
            rows.append(row)
        out += _table(["targets", "r", *[LABELS[n] for n in names], LABELS["floor"]], rows)
        out.append("")
    sweep = data.get("seq_sweep")
    if sweep:
        out.append(
            f"### Step memory vs sequence length ({sweep['model']}, {sweep['targets']} r={sweep['r']}, batch {sweep['batch']})"
        )
        out.append("")
        names = list(sweep["points"][0]["methods"])
        rows = []
        for pnt in sweep["points"]:
            lora = pnt["methods"]["lora"]["step_memory_bytes"]
            rows.append(
                [str(pnt["seq"])]
                + [
                    f"{pnt['methods'][n]['step_memory_bytes'] / MIB:.1f} ({lora / pnt['methods'][n]['step_memory_bytes']:.2f}x)"
                    for n in names
                ]
            )
        out += _table(["seq", *[LABELS.get(n, n) for n in names]], rows)
        out.append("")
        out.append("Step memory MiB (LoRA's / the method's). Plot: `results/step_memory_vs_seq.png`.")
        out.append("")
    return out


def _ok(flag):
    return "n/a" if flag is None else ("met" if flag else "missed")


def _pct(ratio):
    return "-" if ratio is None else f"{(ratio - 1) * 100:+.1f}%"


def param_updates_section(data: dict) -> list[str]:
    out = ["## Trainable parameters and parameter updates", "", machine_line(data), ""]
    out.append(
        f"T = {data['settings']['total_steps']} optimizer steps; LaMDA's B freezes over the first 30%. "
        "'x fewer' = LoRA's figure / the method's. Total updates = elements changed, summed over the steps "
        "(measured bitwise). Plot: `results/param_updates_over_steps.png`."
    )
    out.append("")
    names = [n for n in ("lamda", "lamda++", "loraxs", "lorafa", "vera") if n in data["configs"][0]["methods"]]
    short = {"lamda": "LaMDA", "lamda++": "LaMDA++", "loraxs": "LoRA-XS-like", "lorafa": "LoRA-FA", "vera": "VeRA"}
    header = ["targets", "r", "LoRA trainable"]
    for n in names:
        header += [f"{short[n]} at end (x fewer)", f"{short[n]} updates x fewer"]
    header.append("full fine-tuning")
    rows = []
    for cfg in data["configs"]:
        lora = cfg["methods"]["lora"]
        row = [cfg["targets"], str(cfg["r"]), f"{lora['trainable_at_end']:,}"]
        for n in names:
            m, x = cfg["methods"][n], cfg["lora_over_method"][n]
            row += [
                f"{m['trainable_at_end']:,} ({_f(x['trainable_at_end'], '{:.1f}x')})",
                _f(x["total_updates"], "{:.1f}x"),
            ]
        full = cfg["methods"].get("full")
        row.append("-" if full is None else f"{full['trainable_at_end']:,}")
        rows.append(row)
    out += _table(header, rows)
    out.append("")
    moved = [
        f"{cfg['targets']} r={cfg['r']} {n}"
        for cfg in data["configs"]
        for n, m in cfg["methods"].items()
        if m.get("changed_exceeds_trainable")
    ]
    out.append(
        "Frozen parameters that moved (more elements changed in a step than were trainable): "
        + (", ".join(moved) if moved else "none")
        + "."
    )
    out.append("")
    return out


def inference_section(data: dict) -> list[str]:
    s = data["settings"]
    out = ["## Inference: merged vs unmerged, and the exported LoRA served by PEFT", "", machine_line(data), ""]
    out.append(
        f"{s['model']}, {s['targets']} r={s['r']}, batch {s['batch']}: prefill of {s['prompt_len']} tokens and "
        f"greedy decoding of {s['new_tokens']} tokens (KV cache); median CPU time of {s['reps']} interleaved "
        "repetitions. Logit difference against the unmerged LaMDA model."
    )
    out.append("")
    rows = []
    for name, c in data["correctness"].items():
        pre, dec = data["latency"]["prefill"][name], data["latency"]["decode"][name]
        rows.append(
            [
                name,
                f"{c['max_abs_logit_diff_vs_lamda_unmerged']:.2e}",
                "yes" if c["greedy_tokens_equal_lamda_unmerged"] else "no",
                f"{pre['cpu']['median_s'] * 1e3:.1f}",
                _f(pre["cpu_over_base"]),
                f"{dec['cpu']['median_s'] * 1e3:.1f}",
                _f(dec["cpu_over_base"]),
                f"{dec['tokens_per_cpu_s']:.1f}",
            ]
        )
    out += _table(
        [
            "variant",
            "max abs logit diff",
            "same greedy tokens",
            "prefill ms",
            "x base",
            "decode ms",
            "x base",
            "new tokens per CPU-s (prefill included)",
        ],
        rows,
    )
    out.append("")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results-dir", type=Path, default=HERE / "results")
    p.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = p.parse_args(argv)
    lines = [
        "# Benchmark results",
        "",
        "Generated by `benchmarks/report.py` from the JSON files in `benchmarks/results/` (do not edit by hand).",
        "",
    ]

    def focus(data):
        return step_memory_section(data, "Step time with more repetitions (a second, focused run)")

    for stem, section in (
        ("step_memory", step_memory_section),
        ("step_time_focus", focus),
        ("param_updates", param_updates_section),
        ("inference", inference_section),
    ):
        path = args.results_dir / f"{stem}.json"
        if path.is_file():
            lines += section(json.loads(path.read_text()))
        elif stem != "step_time_focus":
            lines += [f"_{path.name}: not found; run the benchmark first._", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines).rstrip() + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
