"""`lamda-peft train` end to end on the bundled MiniLM and drug reviews, resume, and bad input."""

import json

import pytest
import torch
from safetensors.torch import load_file

from lamda_peft.cli import main

FAST = ["--max-length", "64", "--batch-size", "8", "--quiet"]


def run_cli(*argv):
    return main([str(a) for a in argv])


def test_help_documents_every_setting(capsys):
    import dataclasses

    from lamda_peft.settings import TrainSettings

    with pytest.raises(SystemExit):
        run_cli("train", "--help")
    text = capsys.readouterr().out
    for f in dataclasses.fields(TrainSettings):
        assert "--" + f.name.replace("_", "-") in text


@pytest.mark.slow
def test_default_run_beats_majority(tmp_path):
    """The default command (190 steps, ~3-4 min on 2 idle cores): held-out accuracy clears the
    majority class (0.654) by a clear margin. Measured with these settings: 0.720, macro-F1 0.459."""
    out = tmp_path / "run"
    assert run_cli("train", "--output-dir", out, "--quiet") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for name in (
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "resolved_config.json",
        "train_log.jsonl",
        "loss.png",
        "trainable_params.png",
    ):
        assert (out / name).is_file(), name
    assert metrics["accuracy"] >= metrics["majority_baseline"] + 0.03, metrics
    assert metrics["trainable_params_end"] < metrics["trainable_params_start"]


def test_resume_mid_freeze_is_bitwise(tmp_path):
    """Interrupt after 4 of 10 steps (B partly frozen: t_i = 5), resume: the final adapter is
    bitwise the uninterrupted run's (schedule, optimizer, RNG and data order restored)."""
    common = [
        *FAST,
        "--max-train-rows",
        "48",
        "--max-eval-rows",
        "16",
        "--max-steps",
        "10",
        "--save-steps",
        "4",
        "--freeze-fraction",
        "0.5",
        "--r",
        "4",
        "--weight-decay",
        "0.1",
    ]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert run_cli("train", "--output-dir", full, *common) == 0
    # The interrupted run: only its first checkpoint survived.
    import shutil

    shutil.copytree(full / "checkpoints" / "checkpoint-4", resumed / "checkpoints" / "checkpoint-4")
    ckpt = load_file(resumed / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors")
    frozen = next(v for k, v in ckpt.items() if k.endswith("lamda_frozen"))
    assert 0 < int(frozen.sum()) < 4  # the checkpoint was taken mid-freeze
    assert run_cli("train", "--output-dir", resumed, *common, "--resume", "latest") == 0
    a = load_file(full / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # The resumed run's counts are its own session's (steps 5-10), and it says where it came from
    m_full, m_resumed = (json.loads((d / "metrics.json").read_text()) for d in (full, resumed))
    assert m_resumed["resumed_from"].endswith("checkpoint-4") and m_resumed["parameter_updates_from_step"] == 4
    assert m_full["parameter_updates_from_step"] == 0
    assert 0 < m_resumed["parameter_updates"] < m_full["parameter_updates"]


def test_refuses_existing_run_and_overwrites_on_request(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    assert run_cli("train", "--output-dir", out, "--max-steps", "1") == 2
    assert "already holds a run" in capsys.readouterr().err
    # --overwrite with a typo in --data: the error comes first, the finished run is still there
    assert run_cli("train", "--output-dir", out, "--overwrite", "--data", tmp_path / "typo.csv") == 2
    assert "typo.csv" in capsys.readouterr().err
    assert (out / "metrics.json").read_text() == "{}"
    assert (
        run_cli(
            "train",
            "--output-dir",
            out,
            "--overwrite",
            "--max-steps",
            "1",
            "--max-train-rows",
            "48",
            "--max-eval-rows",
            "8",
            *FAST,
        )
        == 0
    )
    assert (out / "notes.txt").read_text() == "mine"  # only our artifacts are replaced


@pytest.mark.parametrize(
    "rows,flags,message",
    [
        ("text,rating\nnice,1\nbad,0\n", [], "column(s) ['label'] not found; available columns: ['text', 'rating']"),
        ("text,label\n", [], "the data is empty"),
        ("text,label\na,0.5\nb,1\n", [], "row 0 holds 0.5"),
        ("text,label\na,1\nb,0\n", ["--model", "/no/such/model"], "model path '/no/such/model' does not exist"),
        # a rank the weights cannot hold is the user's input: a clear error, no traceback, for every init
        ("text,label\n" + "a,1\nb,0\n" * 12, ["--r", "999", "--init", "spectral"], "rank 999 for module"),
        ("text,label\n" + "a,1\nb,0\n" * 12, ["--method", "lamda++", "--r", "999"], "allows rank at most 384"),
        ("text,label\n" + "a,1\nb,0\n" * 12, ["--targets", "nosuch"], "error: target_modules=['nosuch'] matched no"),
    ],
)
def test_bad_data_and_model(tmp_path, capsys, rows, flags, message):
    data = tmp_path / "d.csv"
    data.write_text(rows)
    code = run_cli("train", "--data", data, "--output-dir", tmp_path / "out", *flags)
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_config_file_unknown_key_and_precedence(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("r: 4\nlearning_rate: 0.1\n")
    assert run_cli("train", "--config", cfg) == 2
    assert "unknown key(s) ['learning_rate']" in capsys.readouterr().err
    from lamda_peft.cli import build_parser
    from lamda_peft.cli.train import settings_from_args

    cfg.write_text("r: 4\nlr: 0.1\n")
    s = settings_from_args(build_parser().parse_args(["train", "--config", str(cfg), "--lr", "0.5"]))
    assert (s.r, s.lr) == (4, 0.5)  # file over defaults, flags over file
    # YAML reads 1e-3 as a string: converted by the field's type; null / "none" where a field allows it
    cfg.write_text("lr: 1e-3\nhead_lr: none\nalpha: null\nr: '8'\nbatch_size: 4.0\n")
    s = settings_from_args(build_parser().parse_args(["train", "--config", str(cfg)]))
    assert (s.lr, s.head_lr, s.alpha, s.r, s.batch_size) == (1e-3, None, None, 8, 4)
    s.validate()
    s = settings_from_args(build_parser().parse_args(["train", "--head-lr", "none", "--alpha", "16"]))
    assert (s.head_lr, s.alpha) == (None, 16.0)
    for text, message in (
        ("lr: fast\n", "lr must be a float or none, got 'fast'"),
        ("r: 2.5\n", "r must be a int, got 2.5"),
        ("r: null\n", "r must be a int, got null"),
        ("quiet: 'yes'\n", "quiet must be a bool, got 'yes'"),
    ):
        cfg.write_text(text)
        assert run_cli("train", "--config", cfg) == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--max-train-rows", "-1"], "max_train_rows must be >= 0"),
        (["--max-eval-rows", "-2"], "max_eval_rows must be >= 0"),
        (["--warmup-ratio", "1.0"], "warmup_ratio must be in [0, 1)"),
        (["--head-lr=-1e-3"], "head_lr must be > 0"),
        (["--alpha", "0"], "alpha must be > 0"),
        (["--method", "vera", "--alpha", "32"], "alpha does not apply to --method vera"),
        (["--scheduler", "cosin"], "scheduler must be one of ['linear', 'cosine'"),
    ],
)
def test_bad_settings_are_refused_before_anything_loads(tmp_path, capsys, flags, message):
    assert run_cli("train", "--output-dir", tmp_path / "out", *flags) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_accumulation_checkpointing_bf16_drive_the_schedule(tmp_path):
    """Gradient accumulation, gradient checkpointing and bf16 autocast together: the freeze still
    follows the optimizer steps (t_i = ceil(0.5 * 4) = 2, so B is fully frozen at the end)."""
    out = tmp_path / "run"
    code = run_cli(
        "train",
        "--output-dir",
        out,
        *FAST,
        "--max-train-rows",
        "48",
        "--max-eval-rows",
        "8",
        "--max-steps",
        "4",
        "--grad-accum",
        "2",
        "--gradient-checkpointing",
        "--bf16",
        "--freeze-fraction",
        "0.5",
        "--r",
        "4",
    )
    assert code == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["train_steps"] == 4
    assert m["trainable_params_end"] == 36 * 16 + 384 * 3 + 3  # sum r^2 + the head
    frozen = [
        v for k, v in load_file(out / "adapter" / "adapter_model.safetensors").items() if k.endswith("lamda_frozen")
    ]
    assert all(bool(f.all()) for f in frozen)


def test_method_dependent_defaults_resolve_and_explicit_values_win():
    """init, lr and warm-up default per method (LaMDA: the 3-seed sweeps' winners); given values are kept."""
    from lamda_peft.settings import TrainSettings

    lamda, lora = TrainSettings(method="lamda"), TrainSettings(method="lora")
    spectral, quantized = TrainSettings(method="lamda++", init="spectral"), TrainSettings(quantize="nf4")
    loftq = TrainSettings(quantize="nf4", loftq_iters=2)
    causal_lm = TrainSettings(task="causal-lm", model="smollm2", data="humaneval")
    lamda_pp = TrainSettings(method="lamda++")
    for s in (lamda, lora, spectral, quantized, loftq, causal_lm, lamda_pp):
        s.validate()
    assert (lamda.init, lamda.lr, lamda.warmup_ratio, lamda.freeze_fraction, lamda.s_lr_scale) == (
        "gradient",
        2e-3,
        0.1,
        0.6,
        3.0,
    )
    assert spectral.lr == 5e-4  # the spectral init's rate
    # the probe gave full-precision LaMDA higher macro-F1 on every MiniLM seed but lower accuracy: not a
    # default there; on NF4 (18 seeds) it was no lower on accuracy and higher on macro-F1: the default
    assert lamda.head_init == lora.head_init == loftq.head_init == "random"
    assert quantized.head_init == "probe"
    lora_nf4 = TrainSettings(method="lora", quantize="nf4")
    lora_nf4.validate()
    assert lora_nf4.head_init == "random"  # the QLoRA baseline keeps PEFT's own head init
    assert (quantized.init, quantized.lr) == ("gradient", 2e-3)  # NF4: gradient measured better too
    assert (loftq.init, loftq.lr) == ("spectral", 5e-4)  # LoftQ refits A: the gradient's A would be lost
    # code text: spectral, 3e-4 and B trained over the whole run measured better (quality_smollm2.json)
    assert (causal_lm.init, causal_lm.lr, causal_lm.freeze_fraction) == ("spectral", 3e-4, 1.0)
    explicit = TrainSettings(task="causal-lm", freeze_fraction=0.3, lr=5e-4)
    explicit.validate()
    assert (explicit.freeze_fraction, explicit.lr) == (0.3, 5e-4)
    assert (lamda_pp.init, lamda_pp.lr) == ("spectral", 5e-4)  # LaMDA++ was measured with the spectral init
    assert (lora.init, lora.lr, lora.warmup_ratio) == ("spectral", 1e-3, 0.0)
    given = TrainSettings(method="lamda++", lr=3e-3, warmup_ratio=0.0)
    given.validate()
    assert (given.lr, given.warmup_ratio) == (3e-3, 0.0)


def test_commands_on_an_unfinished_run_say_how_to_continue_it(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints" / "checkpoint-3").mkdir(parents=True)  # what a run stopped mid-way leaves
    for argv in (["evaluate", run], ["merge", run, tmp_path / "merged"], ["export-lora", run, tmp_path / "lora"]):
        assert run_cli(*argv) == 2
        assert "has checkpoints/ but no adapter/: the run did not finish" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists() and not (tmp_path / "lora").exists()
    assert run_cli("evaluate", tmp_path / "nothing") == 2
    assert "is neither a run folder with adapter/ nor an adapter folder" in capsys.readouterr().err


def test_lorafa_baseline_trains_lora_b_only_through_peft(tmp_path, capsys):
    """--method lorafa: PEFT LoRA trained by PEFT's LoRA-FA optimizer. Two rates from the same seed
    leave every lora_A bitwise at its (seeded) init while lora_B moves differently; the trainable count
    leaves A out; the adapter is a plain PEFT LoRA folder."""
    small = [
        *FAST,
        "--max-steps",
        "2",
        "--max-train-rows",
        "32",
        "--max-eval-rows",
        "16",
        "--method",
        "lorafa",
        "--r",
        "4",
    ]
    states, metrics = [], []
    for lr in ("1e-3", "1e-2"):
        out = tmp_path / lr
        assert run_cli("train", "--output-dir", out, "--lr", lr, *small) == 0
        states.append(load_file(str(out / "adapter" / "adapter_model.safetensors")))
        metrics.append(json.loads((out / "metrics.json").read_text()))
        assert json.loads((out / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    a_keys = [k for k in states[0] if ".lora_A." in k]
    b_keys = [k for k in states[0] if ".lora_B." in k]
    assert a_keys and len(a_keys) == len(b_keys)
    for k in a_keys:
        assert torch.equal(states[0][k], states[1][k]), k
    assert any(not torch.equal(states[0][k], states[1][k]) for k in b_keys)
    assert all(states[0][k].abs().sum() > 0 for k in b_keys)  # B moved off its zero init
    a_params = sum(states[0][k].numel() for k in a_keys)
    b_params = sum(states[0][k].numel() for k in b_keys)
    trainable = metrics[0]["trainable_params_start"]
    assert trainable == metrics[0]["trainable_params_end"]
    assert b_params <= trainable < b_params + a_params  # B and the head train, A does not
    # a PEFT run is not a LaMDA run: merge / export-lora / evaluate name the method, and write nothing
    for argv in (("merge", out, tmp_path / "m"), ("export-lora", out, tmp_path / "e")):
        assert run_cli(*argv) == 2
    assert not (tmp_path / "m").exists() and not (tmp_path / "e").exists()
    assert run_cli("evaluate", out) == 2
    assert capsys.readouterr().err.count("is a --method lorafa run, not a LaMDA one") == 3


def test_lorafa_resume_is_bitwise(tmp_path):
    """PEFT's LoRA-FA optimizer keeps its state by parameter name: the Trainer's checkpoint still
    restores it, so a run resumed at step 2 of 4 ends bitwise where the uninterrupted run ends."""
    import shutil

    small = [*FAST, "--max-train-rows", "32", "--max-eval-rows", "16", "--method", "lorafa", "--r", "4"]
    small += ["--max-steps", "4", "--save-steps", "2"]
    whole = tmp_path / "whole"
    assert run_cli("train", "--output-dir", whole, *small) == 0
    resumed = tmp_path / "resumed"
    shutil.copytree(whole / "checkpoints" / "checkpoint-2", resumed / "checkpoints" / "checkpoint-2")
    assert run_cli("train", "--output-dir", resumed, *small, "--resume", "latest") == 0
    a = load_file(str(whole / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(resumed / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the resumed run did read the checkpoint (a from-scratch run would also match): one whose
    # lora_B was halved ends elsewhere
    from safetensors.torch import save_file

    tampered = tmp_path / "tampered"
    shutil.copytree(whole / "checkpoints" / "checkpoint-2", tampered / "checkpoints" / "checkpoint-2")
    ckpt_file = tampered / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors"
    ckpt = load_file(str(ckpt_file))
    save_file({k: v / 2 if ".lora_B." in k else v for k, v in ckpt.items()}, str(ckpt_file))
    assert run_cli("train", "--output-dir", tampered, *small, "--resume", "latest") == 0
    c = load_file(str(tampered / "adapter" / "adapter_model.safetensors"))
    assert any(not torch.equal(a[k], c[k]) for k in a if ".lora_B." in k)


def test_a_model_folder_without_weights_is_a_clear_error(tmp_path, capsys):
    import shutil

    from lamda_peft.assets import minilm_path

    folder = tmp_path / "broken"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (minilm_path() / name).is_file():
            shutil.copy(minilm_path() / name, folder / name)
    assert run_cli("train", "--model", folder, "--output-dir", tmp_path / "out", "--max-steps", "1") == 2
    err = capsys.readouterr().err
    assert f"cannot load model folder {folder}" in err and "Traceback" not in err


def test_a_held_out_set_with_one_class_is_evaluated(tmp_path):
    """--max-eval-rows 1 (or a label-sorted test file) leaves one class in the held-out set: still a valid evaluation."""
    out = tmp_path / "run"
    flags = ("--max-steps", "1", "--max-train-rows", "48", "--max-eval-rows", "1", *FAST)
    assert run_cli("train", "--output-dir", out, *flags) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_rows"] == 1 and metrics["accuracy"] in (0.0, 1.0)


def test_full_fine_tuning_of_the_mean_pooling_model_saves_it(tmp_path):
    """--method full on the bundled MiniLM (mean pooling, no Hugging Face head): the whole model is written."""
    from safetensors.torch import load_file
    from transformers import AutoModel

    out = tmp_path / "run"
    flags = ("--method", "full", "--max-steps", "1", "--max-train-rows", "48", "--max-eval-rows", "8", *FAST)
    assert run_cli("train", "--output-dir", out, *flags) == 0
    saved = out / "adapter"
    head = load_file(saved / "classifier.safetensors")
    info = json.loads((saved / "classifier.json").read_text())
    assert head["weight"].shape == (info["num_labels"], info["hidden_size"]) and info["pooling"] == "mean"
    encoder = AutoModel.from_pretrained(saved)  # a Hugging Face folder
    assert encoder.config.hidden_size == info["hidden_size"]


def test_calibration_rows_are_a_seeded_sample_when_the_data_has_more():
    """A file sorted by label must not give the gradient init (or the head probe) one class: more rows than
    --calibration-rows are sampled with --seed, in file order; fewer are all taken, as they are."""
    from lamda_peft.settings import TrainSettings
    from lamda_peft.training import _calibration_sample

    rows = [{"i": i} for i in range(100)]

    def batches(**kw):
        s = TrainSettings(batch_size=8, **kw)
        return [r["i"] for b in _calibration_sample(rows, lambda chunk: chunk, s) for r in b]

    taken = batches(calibration_rows=20, seed=0)
    assert len(taken) == 20 == len(set(taken)) and taken == sorted(taken) and max(taken) >= 50
    assert taken == batches(calibration_rows=20, seed=0) and taken != batches(calibration_rows=20, seed=1)
    assert batches(calibration_rows=100) == list(range(100)) == batches(calibration_rows=1024)


def test_an_empty_text_cell_is_an_empty_string_not_nan():
    import pandas as pd

    from lamda_peft.training import _texts

    df = pd.read_csv(__import__("io").StringIO("text,label\nnice,1\n,0\n"))
    assert _texts(df["text"]) == ["nice", ""]
