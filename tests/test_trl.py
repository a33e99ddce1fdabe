"""TRL's `SFTTrainer` with LaMDA (trl 1.16): `peft_config=LamdaConfig(...)` plus `LamdaCallback`.

The freeze follows the optimizer steps (counts checked per step), the loss is finite, and the PEFT
folder that `trainer.save_model` writes reloads into the trained model exactly.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

trl = pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from peft import PeftModel  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from conftest import save_tiny_llama_with_smollm2_tokenizer  # noqa: E402
from lamda_peft import LamdaConfig, frozen_count  # noqa: E402
from lamda_peft.assets import smollm2_path  # noqa: E402
from lamda_peft.integrations.hf_trainer import LamdaCallback  # noqa: E402
from lamda_peft.integrations.peft_training import lamda_adapters  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEPS, R = 6, 4  # as in the snippet


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """A tiny Llama with SmolLM2's tokenizer, saved like a hub checkpoint (SFTTrainer loads it by path)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    save_tiny_llama_with_smollm2_tokenizer(
        path, max_position_embeddings=64, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
    )
    return str(path)


def test_sft_trainer_drives_the_freeze_and_saves_a_peft_adapter(model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dataset = Dataset.from_dict({"text": [f"{i} is {'even' if i % 2 == 0 else 'odd'}." for i in range(48)]})
    # --- the README snippet ("Trainer / TRL") ---
    # model_dir: a causal LM folder; dataset: a datasets.Dataset with a "text" column
    config = SFTConfig(output_dir="sft", max_steps=6, learning_rate=3e-3, logging_steps=1, use_cpu=True)
    trainer = SFTTrainer(
        model=model_dir,
        train_dataset=dataset,
        args=config,
        peft_config=LamdaConfig(r=4, target_modules="all-linear", freeze_fraction=0.5),
        callbacks=[LamdaCallback()],  # drives the B-freeze schedule (and prepares DDP under accelerate launch)
    )
    trainer.train()
    trainer.save_model("lamda-adapter")  # a PEFT folder: adapter_config.json + adapter_model.safetensors
    # --- end of snippet ---
    model = trainer.model
    assert isinstance(model, PeftModel)
    units = lamda_adapters(model)
    assert len(units) == 14  # q k v o gate up down in 2 layers
    # The schedule ran on the optimizer steps: t_i = ceil(0.5 * 6) = 3, n(k) = floor(4 k / 3).
    history = next(c for c in trainer.callback_handler.callbacks if isinstance(c, LamdaCallback)).history
    assert [step for step, _ in history] == list(range(STEPS + 1))
    for step, count in history:
        n = frozen_count(step, R, 3)
        assert count == sum(R * R + u.d_out * (R - n) for u in units), (step, count)
    assert all(bool(u.frozen.all()) and not u.dB.requires_grad for u in units)
    assert max(u.dB.abs().max().item() for u in units) > 0  # B trained before it froze
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert losses and all(math.isfinite(v) for v in losses)

    saved = load_file(tmp_path / "lamda-adapter" / "adapter_model.safetensors")
    assert any("frozen" in k for k in saved)
    # The reloaded adapter is the trained one, tensor for tensor (logits are not compared: SFTConfig's
    # default bf16=True leaves the trained model's forward wrapped in Accelerate's autocast).
    restored = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_dir), str(tmp_path / "lamda-adapter")
    )
    reloaded = lamda_adapters(restored)
    assert len(reloaded) == len(units)
    for trained, loaded in zip(units, reloaded, strict=True):
        for name in ("A", "B0", "S0", "dS", "dB", "frozen", "step"):
            assert torch.equal(getattr(trained, name), getattr(loaded, name)), name


def test_readme_trl_snippet_is_the_tested_code():
    readme = (ROOT / "README.md").read_text()
    snippet = readme.split("## Trainer / TRL", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    here = {line.strip() for line in Path(__file__).read_text().splitlines()}
    for line in snippet.strip().splitlines():
        if line.strip() and not line.strip().startswith(("#", "import", "from")):
            assert line.strip() in here, line


@pytest.mark.slow
def test_sft_trainer_under_accelerate_launch(model_dir, tmp_path):
    """2 CPU processes (DDP, gloo, find_unused_parameters=False): B freezes on schedule, no crash at
    the phase change, dB gradients averaged once per step while B trains."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += [str(Path(__file__).with_name("trl_worker.py")), model_dir, str(tmp_path)]
    r = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1)]
    for rep in reports:
        assert rep["world"] == 2 and rep["wrapper"] == "DistributedDataParallel"
        assert rep["find_unused_parameters"] is False
        counts = [count for _, count in rep["history"]]
        assert counts[3:] == [counts[-1]] * 4 and counts[0] > counts[1] > counts[2] > counts[3]  # frozen at t_i = 3
        assert rep["reductions"] == 3
    assert reports[0]["history"] == reports[1]["history"]
