"""Where LoRA's learned update lies relative to LaMDA's frozen A (why LaMDA trails LoRA on SmolLM2).

LaMDA freezes A: whatever it learns, scaling * (B S - B0 S0) A, reads the layer's input only
through A's r rows, which the spectral init puts on W's top-r right singular vectors. LoRA trains
its A. This script trains PEFT LoRA r=8 with the quality benchmark's settings (the smollm2 preset,
its best rate there), then, for every adapted linear, splits LoRA's final update dW = s * B A by
W's right singular vectors:

    share(k) = ||dW V_k^T V_k||_F^2 / ||dW||_F^2      V_k: W's top-k right singular vectors

share(16) is the part of LoRA's update that a rank-16 spectral A could express at all; a random
k-dimensional subspace holds k / d_in on average (the chance level, printed beside it). The same
split of the output side by W's left singular vectors (U_k) shows whether the output directions
are constrained too (LaMDA's B trains, so they are not, until B freezes).

    python benchmarks/update_subspace.py                 # trains LoRA (about 5 min on 2 cores)
    python benchmarks/update_subspace.py --quick --output /tmp/s.json   # 4 steps (a test runs it)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402
import quality  # noqa: E402
from lamda_peft.settings import TrainSettings  # noqa: E402
from lamda_peft.training import run_training  # noqa: E402

KS = (16, 64, 256)


def lora_updates(adapter_dir: Path) -> dict[str, tuple[torch.Tensor, float]]:
    """{module name: (dW = (alpha / r) B A, mean squared row norm of A)} from a saved PEFT LoRA adapter.

    dW is float64 in torch layout. PEFT draws A from kaiming_uniform(a=sqrt(5)): rows of squared
    norm 1/3 on average; a final A far above that is mostly learned, not its random start.
    """
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    scaling = cfg["lora_alpha"] / cfg["r"]
    state = load_file(str(adapter_dir / "adapter_model.safetensors"))
    out = {}
    for key, a in state.items():
        if ".lora_A." not in key:
            continue
        b = state[key.replace(".lora_A.", ".lora_B.")]
        name = key.split(".lora_A.")[0].removeprefix("base_model.model.")
        out[name] = (scaling * (b.double() @ a.double()), float(a.double().pow(2).sum(1).mean()))
    return out


def split_by_spectrum(w: torch.Tensor, dw: torch.Tensor, ks=KS, seed: int = 0) -> dict:
    """share(k) of ||dw||^2 on W's top-k right (input) and left (output) singular vectors, and chance."""
    U, _, Vh = torch.linalg.svd(w.double(), full_matrices=False)
    total = float(dw.pow(2).sum())
    d_out, d_in = w.shape
    g = torch.Generator().manual_seed(seed)
    row = {"d_out": d_out, "d_in": d_in}
    for k in ks:
        if k > min(d_out, d_in):
            continue
        vk, uk = Vh[:k], U[:, :k]
        q, _ = torch.linalg.qr(torch.randn(d_in, k, generator=g, dtype=torch.float64))
        row[f"input_top{k}"] = float((dw @ vk.T).pow(2).sum()) / total
        row[f"input_random{k}"] = float((dw @ q).pow(2).sum()) / total
        row[f"output_top{k}"] = float((uk.T @ dw).pow(2).sum()) / total
    return row


def _medians(rows: list[dict]) -> dict:
    """Median over `rows` of every share and A-norm figure (keys the first row has; rows lacking one skip it)."""
    keys = [k for k in rows[0] if k.startswith(("input_", "output_", "lora_A"))]
    return {k: statistics.median(r[k] for r in rows if k in r) for k in keys}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lr", type=float, default=2e-3, help="LoRA's rate (2e-3: its best on the smollm2 preset)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="4 training steps: checks the plumbing only")
    p.add_argument("--output", default="benchmarks/results/update_subspace_smollm2.json")
    args = p.parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    preset = quality.PRESETS["smollm2"]
    overrides, _ = quality.VARIANTS["lora-r8"]
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        settings = TrainSettings(
            **{**preset["settings"], **overrides, "lr": args.lr, "seed": args.seed, "output_dir": tmp, "quiet": True}
        )
        if args.quick:
            settings.max_steps, settings.max_eval_rows, settings.max_train_rows = 4, 32, 64
        metrics = run_training(settings)
        updates = lora_updates(Path(tmp) / "adapter")
    base = bc.base_loader("smollm2")()
    modules = dict(base.named_modules())
    rows = {}
    for name, (dw, a_row_norm2) in sorted(updates.items()):
        rows[name] = {**split_by_spectrum(modules[name].weight.detach(), dw), "lora_A_row_norm2": a_row_norm2}
    kinds: dict[str, list[dict]] = {}
    for name, row in rows.items():
        kinds.setdefault(name.rsplit(".", 1)[-1], []).append(row)
    summary = {}
    for kind, group in sorted(kinds.items()):
        summary[kind] = {**_medians(group), "d_in": group[0]["d_in"], "layers": len(group)}
    summary["all"] = _medians(list(rows.values()))
    for kind, s in summary.items():
        shares = ", ".join(
            f"top{k} {s[f'input_top{k}']:.3f} (chance {s[f'input_random{k}']:.3f})" for k in KS if f"input_top{k}" in s
        )
        bc.log(
            f"{kind:10s} input side: {shares}; output top16 {s['output_top16']:.3f}; "
            f"|A row|^2 {s['lora_A_row_norm2']:.3f} (init 0.333)"
        )
    bc.write_json(
        Path(args.output),
        {
            "benchmark": "update_subspace",
            "quick": args.quick,
            "command": bc.command_line(),
            "machine": bc.machine_info(),
            "how": "PEFT LoRA r=8 trained with the smollm2 quality preset; per adapted linear, the share of "
            "||dW||_F^2 (dW = s B A) on W's top-k right singular vectors (LaMDA's spectral A at r = k), a random "
            "k-dim input subspace (chance), and W's top-k left singular vectors; medians over linears. "
            "lora_A_row_norm2: mean squared row norm of the final lora_A (PEFT's random init: 1/3)",
            "lr": args.lr,
            "seed": args.seed,
            "eval_loss": metrics.get("eval_loss"),
            "summary_median": summary,
            "per_module": rows,
            "wall_s": round(time.time() - t0, 1),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
