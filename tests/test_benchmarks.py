"""Every benchmark script runs with --quick and writes JSON of the documented structure.

Timings are never asserted (the machine is shared); only structure and invariants that do not
depend on load: ratios to LoRA of LoRA itself are 1, frozen parameters never move, the exported
LoRA served by PEFT reproduces the LaMDA model.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"

pytestmark = pytest.mark.slow  # each script starts torch + transformers + peft: ~15-40 s


def run(script: str, *args: str, timeout: float = 600) -> None:
    subprocess.run([sys.executable, str(BENCH / script), *args], check=True, cwd=ROOT, timeout=timeout)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    run("step_memory.py", "--quick", "--out", str(out / "step_memory.json"))
    run("param_updates.py", "--quick", "--out", str(out / "param_updates.json"))
    run("inference.py", "--quick", "--out", str(out / "inference.json"))
    run("lean_memory.py", "--quick", "--out", str(out / "lean_memory.json"))
    run("quant_memory.py", "--quick", "--out", str(out / "quant_memory.json"))
    run("gpu_step.py", "--quick", "--lean", "--quant", "--profile", "--out", str(out / "gpu" / "step_h100.json"))
    return out


def load(results: Path, name: str) -> dict:
    data = json.loads((results / name).read_text())
    assert data["quick"] is True
    assert data["command"].startswith("python ")
    for key in ("cpu", "logical_cores", "torch", "transformers", "peft", "load_average_at_start"):
        assert key in data["machine"]
    return data


def test_step_memory_structure(results):
    data = load(results, "step_memory.json")
    assert (results / "step_memory_vs_seq.png").stat().st_size > 0
    timed = [c for c in data["configs"] if c["timed"]]
    assert timed and any(not c["timed"] for c in data["configs"])
    cfg = timed[0]
    assert set(cfg["methods"]) >= {
        "floor",
        "full",
        "lora",
        "pissa",
        "lorafa",
        "vera",
        "lamda_before",
        "lamda_after",
        "loraxs",
    }
    for name, m in cfg["methods"].items():
        for key in (
            "saved_activation_bytes",
            "grad_bytes",
            "optimizer_state_bytes",
            "step_memory_bytes",
            "trainable_parameters",
        ):
            assert isinstance(m[key], int) and m[key] >= 0, (name, key)
        assert m["step_memory_bytes"] == m["saved_activation_bytes"] + m["grad_bytes"] + m["optimizer_state_bytes"]
        assert m["time"]["reps"] >= 2 and m["time"]["cpu"]["median_s"] > 0
    assert cfg["ratios_vs_lora"]["lora"]["step_memory_bytes"] == pytest.approx(1.0)
    assert cfg["ratios_vs_floor"]["floor"]["step_time_cpu"] == pytest.approx(1.0)
    assert "lamda_after" in cfg["targets_check"]
    # Deterministic accounting facts (not timings): the floor has no gradients or optimizer state;
    # after the freeze LaMDA trains exactly r*r per matrix, as LoRA-XS-like does from the start.
    assert cfg["methods"]["floor"]["grad_bytes"] == cfg["methods"]["floor"]["optimizer_state_bytes"] == 0
    after, xs = cfg["methods"]["lamda_after"], cfg["methods"]["loraxs"]
    assert after["trainable_parameters"] == xs["trainable_parameters"]
    assert after["saved_activation_bytes"] == xs["saved_activation_bytes"]
    assert after["step_memory_bytes"] < cfg["methods"]["lora"]["step_memory_bytes"]
    sweep = data["seq_sweep"]
    assert [p["seq"] for p in sweep["points"]] == sorted(p["seq"] for p in sweep["points"])
    assert all("lora" in p["methods"] for p in sweep["points"])


def test_param_updates_structure(results):
    data = load(results, "param_updates.json")
    assert (results / "param_updates_over_steps.png").stat().st_size > 0
    T = data["settings"]["total_steps"]
    for cfg in data["configs"]:
        lamda, lora = cfg["methods"]["lamda"], cfg["methods"]["lora"]
        assert len(lamda["trainable_per_step"]) == len(lamda["changed_per_step"]) == T
        # B freezes: LaMDA ends at exactly r*r per adapted matrix, far below LoRA.
        assert lamda["trainable_at_end"] == cfg["methods"]["loraxs"]["trainable_at_start"]
        assert lamda["trainable_at_end"] < lamda["trainable_at_start"] < lora["trainable_at_start"]
        assert lamda["trainable_per_step"] == sorted(lamda["trainable_per_step"], reverse=True)
        for name, m in cfg["methods"].items():
            assert m["changed_exceeds_trainable"] in (False, None), name  # frozen parameters never move
        assert cfg["lora_over_method"]["lora"]["total_updates"] == pytest.approx(1.0)


def test_inference_structure(results):
    data = load(results, "inference.json")
    assert data["export_files"] == ["adapter_config.json", "adapter_model.safetensors"]
    for name in ("lamda_merged", "peft_lora_unmerged", "peft_lora_merged"):
        c = data["correctness"][name]
        assert c["max_abs_logit_diff_vs_lamda_unmerged"] < 1e-4, name
        assert c["greedy_tokens_equal_lamda_unmerged"], name
    for workload in ("prefill", "decode"):
        lat = data["latency"][workload]
        assert set(lat) >= {"base", "lamda_unmerged", "lamda_merged", "peft_lora_unmerged", "peft_lora_merged"}
        assert all(v["cpu"]["median_s"] > 0 for v in lat.values())


def test_report_renders(results, tmp_path):
    out = tmp_path / "RESULTS.md"
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- benchmarks:start -->\nstale\n<!-- benchmarks:end -->\noutro\n")
    run("report.py", "--results-dir", str(results), "--out", str(out), "--readme", str(readme))
    text = out.read_text()
    for heading in ("Memory and time per training step", "parameter updates", "Inference", "Memory-lean", "GPU: peak"):
        assert heading.lower() in text.lower()
    block = readme.read_text()
    assert block.startswith("intro\n") and block.endswith("outro\n") and "stale" not in block
    assert "step memory vs PEFT LoRA" in block and "--memory-lean" in block


def test_lean_memory_same_loss_and_no_logits_kept(results):
    data = load(results, "lean_memory.json")
    assert all(gap < 1e-4 for gap in data["first_step_loss_abs_diff"].values()), data["first_step_loss_abs_diff"]
    for point in data["points"]:
        m = point["methods"]
        assert point["ratios"]["lora_stock"]["step_memory_x_less_than_lora_stock"] == 1.0
        # Bytes saved for backward do not depend on load: the chunked loss keeps no logits.
        assert m["lamda_chunked"]["saved_activation_bytes"] < m["lamda_stock"]["saved_activation_bytes"]
        assert m["lamda_lean"]["step_memory_bytes"] < m["lamda_chunked"]["step_memory_bytes"]


def test_quant_memory_structure(results):
    data = load(results, "quant_memory.json")
    m, x = data["methods"], data["ratios_vs_qlora"]
    assert x["qlora"]["step_memory_x_less_than_qlora"] == 1.0
    assert m["qlamda_after"]["trainable_parameters"] < m["qlamda_before"]["trainable_parameters"]
    assert m["qlamda_before"]["trainable_parameters"] < m["qlora"]["trainable_parameters"]
    # Saved bytes do not depend on load: LaMDA keeps only r-wide activations on top of the base's.
    assert m["qlamda_after"]["saved_activation_bytes"] < m["qlora"]["saved_activation_bytes"]


def test_quality_quick_runs_every_baseline_through_the_cli_path(tmp_path):
    """quality.py --quick: LoRA, PiSSA, VeRA, full fine-tuning, LaMDA and LaMDA++ each train (4 steps)
    through `run_training`, and the summary keeps one best row per variant."""
    variants = ["lora-r8", "pissa-r8", "vera-r256", "full", "lamda-r16", "lamda++-r16"]
    out = tmp_path / "quality.json"
    run("quality.py", "--quick", "--variants", ",".join(variants), "--output", str(out))
    data = json.loads(out.read_text())
    assert data["command"].startswith("python benchmarks/quality.py --quick")
    best = {row["variant"]: row for row in data["best_per_variant"]}
    assert sorted(best) == sorted(variants)
    for row in data["runs"]:
        assert 0.0 <= row["accuracy"] <= 1.0 and row["train_steps"] == 4
    # at the end only S (r x r per layer) and the head train: >= 10x fewer than LoRA r=8
    assert best["lamda-r16"]["trainable_params_end"] * 10 <= best["lora-r8"]["trainable_params_end"]
    assert best["full"]["trainable_params_end"] > best["lora-r8"]["trainable_params_end"] * 10
    # --merge combines parallel workers' files: the same run twice is kept once, summary unchanged
    merged = tmp_path / "merged.json"
    run("quality.py", "--merge", str(out), str(out), "--output", str(merged))
    both = json.loads(merged.read_text())
    assert both["runs"] == data["runs"] and both["best_per_variant"] == data["best_per_variant"]
    # --merge --variants keeps only the named variants' runs
    run("quality.py", "--merge", str(out), "--variants", "lora-r8,lamda-r16", "--output", str(merged))
    some = json.loads(merged.read_text())
    assert [row["variant"] for row in some["best_per_variant"]] == ["lora-r8", "lamda-r16"]
    assert some["best_per_variant"] == [best["lora-r8"], best["lamda-r16"]]


def test_quality_smollm2_preset_ranks_by_heldout_loss(tmp_path):
    """The code-text preset trains SmolLM2 as a causal LM and keeps, per variant, the learning rate
    with the lowest held-out loss (a copy of a row at a worse loss checks the direction); the report
    renders its table, plot and README row."""
    out = tmp_path / "quality_smollm2.json"
    variants = "lora-r8,lamda-r16-ff1-combo"  # two SmolLM2 runs: 2-3 min on idle cores, far more on busy ones
    run("quality.py", "--preset", "smollm2", "--quick", "--variants", variants, "--output", str(out), timeout=2400)
    data = json.loads(out.read_text())
    assert data["metric"] == "eval_loss" and data["higher_is_better"] is False
    rows = {row["variant"]: row for row in data["runs"]}
    assert sorted(rows) == ["lamda-r16-ff1-combo", "lora-r8"]  # ff1: the CLI's causal-lm default
    for row in rows.values():
        assert row["train_steps"] == 4 and 0 < row["eval_loss"] < 20 and "accuracy" not in row
    row = rows["lamda-r16-ff1-combo"]
    assert row["eval_loss"] < row["eval_loss_before"]  # 4 steps on code text already help SmolLM2
    sys.path.insert(0, str(BENCH))
    try:
        from quality import summarise
    finally:
        sys.path.remove(str(BENCH))
    worse = {**row, "lr": row["lr"] * 2, "eval_loss": row["eval_loss"] + 1.0}
    (best,) = summarise([worse, row], "eval_loss", higher_is_better=False)
    assert best["lr"] == row["lr"] and best["eval_loss_mean"] == row["eval_loss"]
    (best,) = summarise([worse, row], "eval_loss", higher_is_better=True)
    assert best["lr"] == worse["lr"]
    readme = tmp_path / "README.md"
    readme.write_text("<!-- benchmarks:start -->\n<!-- benchmarks:end -->\n")
    run("report.py", "--results-dir", str(tmp_path), "--out", str(tmp_path / "RESULTS.md"), "--readme", str(readme))
    assert "held-out loss per seed" in (tmp_path / "RESULTS.md").read_text()
    assert (tmp_path / "quality_smollm2_vs_params.png").stat().st_size > 0
    assert "LaMDA held-out loss vs LoRA (code text)" in readme.read_text()


def test_recursive_quick_uptrains_every_reduced_model(tmp_path):
    """recursive.py --quick on the real SmolLM2: the full model is evaluated once, each reduced model
    before and after its (1-step) uptraining; unique parameters follow the layer count."""
    out = tmp_path / "recursive.json"
    run("recursive.py", "--quick", "--out", str(out))
    data = json.loads(out.read_text())
    before = {row["name"]: row for row in data["before"]}
    after = {row["name"]: row for row in data["uptraining"]}
    assert list(before) == ["full", "cut 15", "K15 average r0"] and list(after) == ["cut 15", "K15 average r0"]
    assert before["K15 average r0"]["unique_parameters"] < before["full"]["unique_parameters"]
    for name, row in after.items():
        assert row["heldout_loss_before"] == before[name]["heldout_loss"]
        assert row["train_tokens"] > 0 and len(row["train_losses"]) == 1
    assert (tmp_path / "recursive.png").stat().st_size > 0
    with pytest.raises(subprocess.CalledProcessError):  # --quick never replaces the committed results
        run("recursive.py", "--quick")
    # --only runs the named rows (a longer uptraining of a few models), into its own --out
    only = tmp_path / "only.json"
    run("recursive.py", "--quick", "--only", "cut 15", "--out", str(only))
    data = json.loads(only.read_text())
    assert [row["name"] for row in data["before"]] == ["cut 15"] and len(data["uptraining"]) == 1
    assert data["before"][0]["heldout_loss"] == pytest.approx(before["cut 15"]["heldout_loss"], rel=1e-6)
    for bad in (["--only", "cut 7", "--out", str(only)], ["--only", "cut 15"]):
        with pytest.raises(subprocess.CalledProcessError):  # an unknown row; --only without --out
            run("recursive.py", *bad)


def test_gpu_step_runs_on_whatever_device_there_is(results):
    """gpu_step.py --quick: every method, on the CPU here (no peak figure without CUDA), same structure."""
    data = load(results, "gpu/step_h100.json")
    (point,) = data["points"]
    m = point["methods"]
    assert not any(r.get("oom") for r in m.values())
    for name in ("lora", "lamda_after", "lamda_lean", "qlora", "qlamda_after"):
        assert name in m and m[name]["tokens_per_s"] > 0
    assert point["ratios_vs_lora"]["lora"]["step_memory_x_less"] == 1.0
    assert m["lamda_after"]["trainable_parameters"] < m["lamda_before"]["trainable_parameters"]
    assert m["lamda_after"]["saved_activation_bytes"] < m["lora"]["saved_activation_bytes"]
    timing = data["timing"]["by_seq"][str(point["seq"])]
    assert timing["lora"]["x_faster_than_lora"] == 1.0 and "syncs" in timing["lamda_after"]["profile"]
    # Scalar reads per step (test_schedule checks that the schedule reads no device tensor): LaMDA's
    # come from AdamW's step counters alone, fewer than LoRA's (fewer trainable tensors).
    assert timing["lamda_after"]["profile"]["syncs"] <= timing["lora"]["profile"]["syncs"]


def test_update_subspace_quick_splits_lora_update_by_w_spectrum(tmp_path):
    """The diagnosis behind the SmolLM2 quality row: LoRA trains through the CLI path, its saved update
    is split by W's singular vectors, and every share is a fraction with a chance level beside it."""
    out = tmp_path / "subspace.json"
    run("update_subspace.py", "--quick", "--output", str(out), timeout=1200)
    data = json.loads(out.read_text())
    assert data["quick"] is True and "update_subspace.py --quick" in data["command"]
    assert len(data["per_module"]) == 30 * 7  # all-linear on SmolLM2's 30 layers
    for row in data["per_module"].values():
        for key, value in row.items():
            if key.startswith(("input_", "output_")):
                assert 0.0 <= value <= 1.0 + 1e-9
        assert row["lora_A_row_norm2"] > 0
    assert set(data["summary_median"]) == {
        "all",
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }


def test_calibration_memory_quick(tmp_path):
    out = tmp_path / "calibration_memory.json"
    run("calibration_memory.py", "--quick", "--out", str(out))
    data = json.loads(out.read_text())
    assert data["quick"] is True and set(data["variants"]) == {"autograd", "hooks", "hooks_grouped"}
    assert data["ratios_vs_autograd"]["autograd"]["peak_x_less"] == 1.0
    # grouped or not, the same A (the sums are the same bit for bit); autograd's A agrees to rounding
    assert data["checksum_relative_difference_vs_autograd"]["hooks"] == pytest.approx(
        data["checksum_relative_difference_vs_autograd"]["hooks_grouped"], abs=0
    )
    assert data["checksum_relative_difference_vs_autograd"]["hooks"] < 1e-4
