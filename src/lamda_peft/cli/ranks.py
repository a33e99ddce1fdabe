"""`lamda-peft ranks MODEL`: LaMDA++ energy scores and allocated ranks, as a table, JSON or a plot.

Nothing is trained and no data is read: the command loads the model, takes the singular values of
every target weight and prints what `rank_allocation="energy"` would put into `rank_pattern`.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

from lamda_peft.cli import CLIError

BUNDLED = {"smollm2": "smollm2_path", "minilm": "minilm_path"}  # MODEL names for the assets


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "ranks",
        help="LaMDA++: per-module energy scores and allocated ranks (no training, no data)",
        description=(
            "Compute each target module's normalised energy score E = sum_{i<=r} s_i^2 / sum_i s_i^2 from "
            "its pretrained weight and the LaMDA++ rank allocation (low energy -> higher rank) that keeps "
            "the uniform budget."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL", help="a local transformers model folder, or 'smollm2' / 'minilm'")
    p.add_argument("--r", type=int, default=8, help="base rank r")
    p.add_argument(
        "--targets", default="all-linear", help="'all-linear' or comma-separated module names/suffixes (q_proj,v_proj)"
    )
    p.add_argument("--r-min", type=int, default=None, help="smallest rank (default r // 2)")
    p.add_argument("--r-max", type=int, default=None, help="largest rank (default 2 r)")
    p.add_argument(
        "--budget",
        choices=["params", "rank"],
        default="params",
        help="kept equal to the uniform one: sum r_l^2 = L r^2 (params) or sum r_l = L r (rank)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--plot", metavar="FILE.png", default=None, help="draw energy score and rank per layer")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lamda_peft.config import ConfigError, LamdaConfig
    from lamda_peft.rank_allocation import allocate_model_ranks

    targets = (
        args.targets if args.targets == "all-linear" else [t.strip() for t in args.targets.split(",") if t.strip()]
    )
    try:
        config = LamdaConfig(
            r=args.r,
            target_modules=targets or None,
            rank_allocation="energy",
            r_min=args.r_min,
            r_max=args.r_max,
            rank_budget=args.budget,
        )
    except ConfigError as err:
        raise CLIError(str(err)) from None
    folder = resolve_model(args.model)
    model = load_model(folder)
    try:
        alloc = allocate_model_ranks(model, config)
    except ValueError as err:
        raise CLIError(str(err)) from None
    report = {"model": args.model, **alloc.to_dict()}
    for record in report["modules"]:
        record["layer"], record["type"] = layer_and_type(record["name"])
    if args.plot:
        plot_ranks(report, args.plot)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_table(report))
        if args.plot:
            print(f"plot written to {args.plot}")
    return 0


def resolve_model(name: str) -> Path:
    """A local folder with a `config.json`, or a bundled asset by name."""
    if name in BUNDLED:
        from lamda_peft import assets

        try:
            return getattr(assets, BUNDLED[name])()
        except FileNotFoundError as err:
            raise CLIError(str(err)) from None
    folder = Path(name)
    if not (folder / "config.json").is_file():
        raise CLIError(
            f"{name!r} is not a model folder with a config.json (models are read from disk only; "
            f"bundled: {', '.join(BUNDLED)})"
        )
    return folder


def load_model(folder: Path):
    """The model in fp32: a causal LM class where the config names one (its module names are the
    ones an adapter on that model uses), else the bare `AutoModel`."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    try:
        cfg = AutoConfig.from_pretrained(folder)
        causal = any(a.endswith("ForCausalLM") for a in (cfg.architectures or []))
        cls = AutoModelForCausalLM if causal else AutoModel
        return cls.from_pretrained(folder, dtype=torch.float32).eval()
    except (OSError, ValueError) as err:
        raise CLIError(f"cannot load a transformers model from {folder}: {err}") from None


def layer_and_type(name: str) -> tuple[int | None, str]:
    """(block index, module type) from a module name: model.layers.3.self_attn.q_proj -> (3, self_attn.q_proj)."""
    match = re.search(r"(?:^|\.)(\d+)\.(.+)$", name)
    return (int(match.group(1)), match.group(2)) if match else (None, name)


def format_table(report: dict) -> str:
    modules = report["modules"]
    width = max(len(m["name"]) for m in modules)
    lines = [f"{'module':<{width}}  {'d_out x d_in':>13}  {'energy':>7}  {'rank':>4}"]
    for m in modules:
        shape = f"{m['d_out']}x{m['d_in']}"
        lines.append(f"{m['name']:<{width}}  {shape:>13}  {m['energy']:7.4f}  {m['rank']:4d}")
    lines.append("")
    lines.append("per module type (mean energy, mean / min / max rank):")
    types: dict[str, list[dict]] = {}
    for m in modules:
        types.setdefault(m["type"], []).append(m)
    for kind, group in types.items():
        ranks = [m["rank"] for m in group]
        mean_e = statistics.fmean(m["energy"] for m in group)
        lines.append(
            f"  {kind:<{max(map(len, types))}}  {mean_e:.4f}  {statistics.fmean(ranks):5.2f} / {min(ranks)} / {max(ranks)}"
        )
    unit = "sum r_l^2" if report["budget"] == "params" else "sum r_l"
    lines.append("")
    lines.append(
        f"{report['num_modules']} modules, r = {report['r']}, bounds [{report['r_min']}, {report['r_max']}], "
        f"spectra + allocation in {report['seconds']:.2f} s"
    )
    lines.append(
        f"budget ({report['budget']}: {unit}): uniform {report['budget_before']} -> allocated {report['budget_after']}"
    )
    return "\n".join(lines)


def plot_ranks(report: dict, path: str) -> None:
    """Energy score (top) and allocated rank (bottom) per layer, one line per module type."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    series: dict[str, list[tuple[int, float, int]]] = {}
    for m in report["modules"]:
        if m["layer"] is not None:  # modules outside the numbered blocks stay in the table only
            series.setdefault(m["type"], []).append((m["layer"], m["energy"], m["rank"]))
    if not series:
        raise CLIError("no target module sits in a numbered layer: nothing to plot per layer")
    fig = Figure(figsize=(9, 6.5), constrained_layout=True)
    ax_e, ax_r = fig.subplots(2, 1, sharex=True)
    short = {kind: kind.split(".")[-1] for kind in series}  # q_proj, not self_attn.q_proj, when unique
    if len(set(short.values())) < len(short):
        short = {kind: kind for kind in series}
    for kind, points in series.items():
        points.sort()
        layers = [p[0] for p in points]
        label = short[kind]
        ax_e.plot(layers, [p[1] for p in points], marker="o", markersize=3, label=label)
        ax_r.plot(layers, [p[2] for p in points], marker="o", markersize=3, label=label)
    ax_r.axhline(report["r"], color="gray", linestyle="--", linewidth=1, label=f"uniform r = {report['r']}")
    ax_e.set_ylabel(f"energy score E (top {report['r']})")
    ax_r.set_ylabel("allocated rank")
    ax_r.set_xlabel("layer")
    ax_e.set_title(
        f"LaMDA++ on {report['model']}: budget {report['budget']} {report['budget_before']} -> "
        f"{report['budget_after']}, bounds [{report['r_min']}, {report['r_max']}]"
    )
    ax_e.legend(ncol=4, fontsize=8)
    ax_r.legend(ncol=4, fontsize=8)
    for ax in (ax_e, ax_r):
        ax.grid(alpha=0.3)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
