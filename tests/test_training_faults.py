"""Faults during `lamda-peft train`: a NaN stops the run and keeps the last good checkpoint; SIGTERM
saves a resumable checkpoint; `--resume latest` then finishes the run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from lamda_peft import training
from lamda_peft.cli import main
from lamda_peft.integrations.fault_guard import FaultGuard
from lamda_peft.integrations.hf_trainer import LamdaTrainer

TINY = ["--max-length", "64", "--batch-size", "8", "--max-train-rows", "48", "--max-eval-rows", "16", "--r", "4"]


def run_cli(*argv):
    return main([str(a) for a in argv])


class PoisonedTrainer(LamdaTrainer):
    """From the 4th optimizer step on, every gradient is NaN (what an fp overflow produces)."""

    def training_step(self, model, inputs, *args, **kwargs):
        loss = super().training_step(model, inputs, *args, **kwargs)
        if self.state.global_step >= 3:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
        return loss


def test_nan_gradient_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    args = ["train", "--output-dir", out, *TINY, "--max-steps", "6", "--save-steps", "2", "--quiet"]
    monkeypatch.setattr(training, "LamdaTrainer", PoisonedTrainer)
    assert run_cli(*args) == 2
    err = capsys.readouterr().err
    assert "training diverged at step 4" in err and "NaN or Inf" in err, err
    assert f"the last good checkpoint is {out / 'checkpoints' / 'checkpoint-2'}" in err, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("lamda-peft train: error: training")
    assert not (out / "metrics.json").exists() and not (out / "adapter").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2"]  # step 4's was cancelled
    kept = load_file(out / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors")
    assert all(bool(torch.isfinite(t).all()) for t in kept.values() if t.is_floating_point())
    # The kept checkpoint passes load_adapter_state's checks and the run finishes from it.
    monkeypatch.setattr(training, "LamdaTrainer", LamdaTrainer)
    assert run_cli(*args, "--resume", "latest") == 0
    assert (out / "metrics.json").is_file()


@pytest.mark.parametrize("method", ["lamda", "lora"])
def test_huge_learning_rate_is_reported(tmp_path, capsys, method):
    """Every method gets the guard: PEFT LoRA's diverged run is stopped and named, as LaMDA's is."""
    out = tmp_path / "run"
    argv = ["train", "--output-dir", out, *TINY, "--max-steps", "6", "--lr", "1e6", "--quiet", "--method", method]
    assert run_cli(*argv) == 2
    err = capsys.readouterr().err
    assert "training diverged at step" in err and "try a lower --lr" in err, err
    assert not (out / "metrics.json").exists()


def test_signal_handler_asks_for_save_and_stop():
    """SIGINT in the main thread: the next step end asks to save and stop; handlers are restored."""
    guard, before = FaultGuard(), signal.getsignal(signal.SIGINT)
    state, control = SimpleNamespace(global_step=7), SimpleNamespace(should_save=False, should_training_stop=False)
    guard.on_train_begin(None, state, control)
    assert signal.getsignal(signal.SIGINT) == guard._on_signal
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.05)  # the handler runs between bytecodes of the main thread
    assert signal.getsignal(signal.SIGINT) == before  # a second Ctrl-C acts as usual
    guard.on_step_end(None, state, control, model=torch.nn.Linear(2, 2))
    assert control.should_save and control.should_training_stop
    assert guard.interrupted == "SIGINT" and guard.stopped_at == 7 and guard.failure is None
    guard.on_train_end(None, state, control)


def test_sigterm_saves_a_resumable_checkpoint(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--output-dir", str(out), *TINY, "--max-steps", "30", "--save-steps", "1000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    log = tmp_path / "stderr.txt"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lamda_peft", *args], stderr=f, stdout=subprocess.DEVNULL, env=env
        )
    try:
        deadline = time.time() + 300
        while not re.search(r"\b([1-9]\d*)/30\b", log.read_text(errors="replace")):  # tqdm: a step done
            assert proc.poll() is None, log.read_text(errors="replace")
            assert time.time() < deadline, "training never reported a step"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=300) == 2
    finally:
        if proc.poll() is None:
            proc.kill()
    err = log.read_text(errors="replace")
    match = re.search(r"stopped by SIGTERM at step (\d+)", err)
    assert match, err
    step = int(match.group(1))
    assert 1 <= step < 30 and "--resume latest" in err
    ckpt = out / "checkpoints" / f"checkpoint-{step}"
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "optimizer.pt",
        "scheduler.pt",
        "trainer_state.json",
    ):
        assert (ckpt / name).is_file(), name
    assert not (out / "metrics.json").exists()
    # Resumed in this process (OMP threads aside, the same command): it finishes all 30 steps.
    assert run_cli(*args, "--quiet", "--resume", "latest") == 0
    assert json.loads((out / "metrics.json").read_text())["train_steps"] == 30


@pytest.mark.parametrize("complete", [True, False])
def test_latest_checkpoint_skips_a_half_written_one(tmp_path, complete):
    for step in (2, 4):
        (tmp_path / "checkpoints" / f"checkpoint-{step}").mkdir(parents=True)
    (tmp_path / "checkpoints" / "checkpoint-2" / "trainer_state.json").write_text("{}")
    if complete:
        (tmp_path / "checkpoints" / "checkpoint-4" / "trainer_state.json").write_text("{}")
    assert training.latest_checkpoint(tmp_path).name == ("checkpoint-4" if complete else "checkpoint-2")


def test_resume_refuses_settings_that_change_the_run(tmp_path, capsys):
    """Each checkpoint records the run's settings; resuming with another --lr or --max-steps is refused
    before anything loads, naming both values. What only changes the output (--quiet) is allowed."""
    out = tmp_path / "run"
    args = ["train", "--output-dir", out, *TINY, "--max-steps", "4", "--save-steps", "2", "--quiet"]
    assert run_cli(*args) == 0
    ckpt = out / "checkpoints" / "checkpoint-4"
    recorded = json.loads((ckpt / training.RUN_SETTINGS_NAME).read_text())
    assert recorded["max_steps"] == 4 and recorded["lr"] == 2e-3
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert run_cli(*args, "--lr", "1e-2", "--max-steps", "8", "--resume", str(ckpt)) == 2
    err = capsys.readouterr().err
    assert "--lr 0.01 (the run used 0.002)" in err and "--max-steps 8 (the run used 4)" in err, err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before  # nothing touched
    assert run_cli(*args[:-1], "--resume", str(ckpt)) == 0  # without --quiet: the same run
