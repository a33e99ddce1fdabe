"""Multi-process training with `accelerate launch` (2 CPU processes, gloo): the phase change when B
freezes, equality with a single-process run of the same global batch, and `lamda-peft train`.

The launches take 30-70 s each on 2 shared cores, so they are marked slow.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lamda_peft import LamdaConfig, get_lamda_model, prepare_distributed
from lamda_peft.integrations.distributed import grad_sync_of

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("ddp_worker.py")
FSDP_WORKER = Path(__file__).with_name("fsdp_worker.py")
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
LAUNCH += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
# Adapter agreement between 2 processes and 1 (float32; only the summation order of the batch
# mean and of the all-reduce differ). Measured: 6.1e-8 max abs difference.
DDP_ATOL = 1e-6
FSDP_ATOL = 2e-6  # measured: 3.2e-7 (dS is reduce-scattered by FSDP, dB all-reduced by LamdaGradSync)


def _env(tmp_path: Path) -> dict:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")])),
        HF_HUB_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf_home"),  # no user accelerate config file is read
    )
    return env


def _run(cmd: list, tmp_path: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(c) for c in cmd], env=_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=timeout
    )


def test_prepare_distributed_keeps_db_and_buffers_out_of_ddp(tiny_mlp):
    """Single process: the ignore list names exactly dB and the LaMDA buffers, and the sync is inert."""
    model = get_lamda_model(tiny_mlp, LamdaConfig(r=4, target_modules=["up", "down"]))
    sync = prepare_distributed(model)
    assert prepare_distributed(model) is sync and grad_sync_of(model) is sync
    names = set(model._ddp_params_and_buffers_to_ignore)
    assert {n for n in names if n.endswith(".dB")} == {"model.up.dB", "model.down.dB"}
    assert all(".dS" not in n for n in names)  # dS stays DDP's
    assert "model.up.A" in names and "model.down.frozen" in names and "model.up._dB_pinned" in names
    model.eval()(torch.randn(3, 24)).sum().backward()  # no process group: no reduction
    assert sync.reductions == 0 and model.model.up.dB.grad is not None


def test_prepare_distributed_refuses_a_wrapped_model(tiny_mlp):
    import torch.distributed as dist

    model = get_lamda_model(tiny_mlp, LamdaConfig(r=4, target_modules=["up"]))
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        with pytest.raises(ValueError, match="before wrapping"):
            prepare_distributed(ddp)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_equal_one_across_the_freeze(tmp_path):
    """A hand-written Accelerate loop (the README snippet), gradient accumulation 2, 6 steps, B fully
    frozen after step 3: 2 processes x 2 rows == 1 process x 4 rows, per optimizer step."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    r1 = _run([sys.executable, WORKER, "--out", one], tmp_path)
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = _run([*LAUNCH, WORKER, "--out", two], tmp_path)
    assert r2.returncode == 0, r2.stderr[-3000:]
    ref = torch.load(one / "rank0.pt")
    ranks = [torch.load(two / f"rank{i}.pt") for i in (0, 1)]
    assert ref["world"] == 1 and [r["world"] for r in ranks] == [2, 2]
    # DDP really wrapped the model, without find_unused_parameters, and left dB to LamdaGradSync.
    assert all(r["ddp"] and r["find_unused_parameters"] is False for r in ranks)
    assert any(n.endswith(".dB") for n in ranks[0]["ddp_ignored"])
    # The phase change happened mid-run: B fully frozen (dB out of autograd) at step 3 of 6.
    total = ref["total_rank"]
    assert ref["frozen_per_step"][2:] == [total] * 4 and ref["frozen_per_step"][0] < total
    for r in ranks:
        assert r["frozen_per_step"] == ref["frozen_per_step"]
        assert not any(r["db_requires_grad"])
        assert r["reductions"] == 3  # one per optimizer step while B trained; none in no_sync passes, none after
    for key, value in ref["adapter"].items():
        assert torch.equal(ranks[0]["adapter"][key], ranks[1]["adapter"][key]), key  # ranks agree bitwise
        torch.testing.assert_close(ranks[0]["adapter"][key], value, atol=DDP_ATOL, rtol=0, msg=key)
    moved = max(v.abs().max().item() for k, v in ref["adapter"].items() if k.endswith("dB"))
    assert moved > 1e-3  # B trained before it froze (the comparison is not between zeros)
    assert (two / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_without_prepare_distributed_the_phase_change_breaks_ddp(tmp_path):
    """The negative control: DDP owning dB (find_unused_parameters=False) fails once B is frozen."""
    out = tmp_path / "bad"
    out.mkdir()
    r = _run([*LAUNCH, WORKER, "--out", out, "--no-prepare", "--accum", "1", "--steps", "4"], tmp_path)
    assert r.returncode != 0
    assert re.search(r"Expected to have finished reduction|did not receive grad", r.stderr), r.stderr[-3000:]


@pytest.mark.slow
def test_cli_train_under_accelerate_launch(tmp_path):
    """`accelerate launch ... -m lamda_peft train`: 2 processes with gradient accumulation, B fully frozen at the
    end, one set of outputs."""
    out = tmp_path / "run"
    cmd = [*LAUNCH, "-m", "lamda_peft", "train", "--output-dir", out, "--max-length", "32", "--batch-size", "2"]
    cmd += ["--grad-accum", "2"]  # the no_sync micro-batches of LamdaTrainer under DDP
    cmd += ["--max-train-rows", "32", "--max-eval-rows", "8", "--max-steps", "4", "--freeze-fraction", "0.5"]
    cmd += ["--r", "4", "--quiet"]
    r = _run(cmd, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count('"trainable_params_end"') == 1  # rank 0 alone prints its summary
    m = json.loads((out / "metrics.json").read_text())
    assert m["processes"] == 2 and m["train_steps"] == 4
    assert m["trainable_params_end"] < m["trainable_params_start"]
    frozen = [v for k, v in load_file(out / "adapter" / "adapter_model.safetensors").items() if k.endswith("frozen")]
    assert frozen and all(bool(f.all()) for f in frozen)


@pytest.mark.slow
def test_fsdp2_two_processes_equal_one_across_the_freeze(tmp_path):
    """FSDP2 `fully_shard` on CPU/gloo with dB in `ignored_params`: the sharded 2-process run equals an
    unsharded single process with the same global batch, through the phase change."""
    r1 = _run([sys.executable, FSDP_WORKER, "--out", tmp_path], tmp_path)
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = _run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", FSDP_WORKER, "--out", tmp_path],
        tmp_path,
    )
    assert r2.returncode == 0, r2.stderr[-3000:]
    one, two = torch.load(tmp_path / "fsdp_w1.pt"), torch.load(tmp_path / "fsdp_w2.pt")
    assert two["sharded"] and not one["sharded"]
    assert one["frozen_per_step"] == two["frozen_per_step"] == [14, 28, 56, 56, 56, 56]  # fully frozen at step 3
    assert two["reductions"] == 3 and one["reductions"] == 0
    for key, value in one["adapter"].items():
        torch.testing.assert_close(two["adapter"][key], value, atol=FSDP_ATOL, rtol=0, msg=key)


def _snippet(heading: str) -> str:
    section = (ROOT / "README.md").read_text().split(heading, 1)[1]
    return section.split("```python", 1)[1].split("```", 1)[0]


def test_readme_fsdp_snippet_is_the_tested_code():
    worker = {line.strip() for line in FSDP_WORKER.read_text().splitlines()}
    for line in _snippet("### FSDP2").strip().splitlines():
        if line.strip() and not line.strip().startswith(("#", "import", "from")):
            assert line.strip() in worker, line


def test_readme_accelerate_snippet_is_the_tested_code():
    """Every line of the README's Accelerate snippet is in the worker the slow test launches."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Accelerate (multi-process)", 1)[1]
    snippet = section.split("```python", 1)[1].split("```", 1)[0]
    worker = {line.strip() for line in WORKER.read_text().splitlines()}
    for line in snippet.strip().splitlines():
        if line.strip() and not line.strip().startswith(("#", "import", "from", "for ")):
            assert line.strip() in worker, line


def test_generation_is_split_across_processes_and_gathered_in_order(tmp_path):
    """Under torch.distributed each rank generates for its share of the prompts (round-robin) and all
    ranks get every continuation back, in order, equal to a single process's."""
    from transformers import AutoModelForCausalLM

    from conftest import save_tiny_llama_with_smollm2_tokenizer
    from generation_worker import PROMPTS
    from lamda_peft.tasks.generation import generate_continuations

    model_dir = tmp_path / "model"
    tokenizer = save_tiny_llama_with_smollm2_tokenizer(model_dir)
    single = generate_continuations(
        AutoModelForCausalLM.from_pretrained(model_dir).eval(), tokenizer, PROMPTS, 32, 1, 5, 2
    )
    worker = Path(__file__).with_name("generation_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", worker]
    r = _run([*cmd, "--model", model_dir, "--out", tmp_path], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert ranks[0]["seen"] == PROMPTS[0::2] and ranks[1]["seen"] == PROMPTS[1::2]
    assert ranks[0]["outputs"] == ranks[1]["outputs"] == single
    assert len(set(single)) > 1  # the prompts' continuations differ, so the order is checked
