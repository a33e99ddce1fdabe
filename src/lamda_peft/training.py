"""`run_training(settings)`: what `lamda-peft train` does, callable from Python.

Steps: resolve the model and data -> build the task model -> wrap it (LaMDA, LaMDA++ or PEFT
LoRA) -> train with the Hugging Face Trainer (`LamdaTrainer` drives the freeze) -> evaluate ->
write adapter, metrics.json, resolved config, log and plots. `metrics.json` is written last, so a
folder without it is never a finished run.
"""

from __future__ import annotations

import json
import random
import resource
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback

from lamda_peft import assets, recursive
from lamda_peft.checkpoint import atomic_write_bytes, load_adapter_state
from lamda_peft.cli import CLIError
from lamda_peft.integrations.fault_guard import FaultGuard, stop_message
from lamda_peft.integrations.hf_trainer import LamdaCallback, LamdaTrainer, LeanTrainer
from lamda_peft.integrations.recursive_trainer import RecursiveTrainer, RelaxationFreeze
from lamda_peft.lean import DEFAULT_CHUNK_TOKENS
from lamda_peft.methods import count_trainable, wrap_model
from lamda_peft.model import CALIBRATED_INITS
from lamda_peft.settings import TrainSettings
from lamda_peft.tasks import causal_lm, classification, data, generation, head_probe, seq2seq
from lamda_peft.tasks.metrics import HIGHER_IS_BETTER, regression_metrics, resolve_metric, trainer_compute_metrics

RUN_ARTIFACTS = (
    "adapter",
    "model",
    "checkpoints",
    "metrics.json",
    "predictions.jsonl",
    "train_log.jsonl",
    "resolved_config.json",
    "loss.png",
    "trainable_params.png",
)
BUNDLED_MODELS = {"minilm": assets.minilm_path, "smollm2": assets.smollm2_path}


def resolve_model_path(name: str) -> str:
    """A bundled name, an existing local folder, or a hub id (which fails clearly when offline)."""
    if name in BUNDLED_MODELS:
        return str(BUNDLED_MODELS[name]())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise CLIError(f"model folder {path} has no config.json: not a Hugging Face model folder")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise CLIError(f"model path {name!r} does not exist")
    return name  # a hub id


def _from_pretrained(loader, path: str, *args, **kwargs):
    try:
        return loader(path, *args, **kwargs)
    except OSError as err:
        if Path(path).exists():  # a local folder whose files are missing or unreadable (no weights, a bad tokenizer)
            raise CLIError(f"cannot load model folder {path}: {str(err).splitlines()[0][:240]}") from None
        raise CLIError(
            f"cannot load model {path!r}: not a local folder, and the Hugging Face hub did not provide it "
            f"(offline? {str(err).splitlines()[0][:160]}). Pass a local model folder or a bundled name (minilm, smollm2)."
        ) from None


def check_output_dir(s: TrainSettings) -> tuple[Path, list[str]]:
    """(the output folder, the previous run's artifacts that --overwrite will remove); nothing is removed here."""
    out = Path(s.output_dir)
    if s.resume:
        return out, []
    existing = [name for name in RUN_ARTIFACTS if (out / name).exists()]
    if existing and not s.overwrite:
        raise CLIError(
            f"output directory {out} already holds a run ({', '.join(existing)}); pass --overwrite to replace it or --resume to continue it"
        )
    return out, existing


def clear_output_dir(out: Path, existing: list[str]) -> None:
    """Remove the previous run's artifacts: only once the model and the data have loaded, so that a
    typo in --data or --model does not cost a finished run."""
    for name in existing:  # only our own artifacts are removed, never anything else in the folder
        target = out / name  # (tolerant: under `accelerate launch` every process does this at once)
        shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


class ProgressBar(TrainerCallback):
    """One tqdm bar: loss and the trainable-parameter count (it drops as B freezes)."""

    def __init__(self, lamda_callback: LamdaCallback | None, count_fn) -> None:
        self.bar = None
        self.count_fn = count_fn
        self.lamda = lamda_callback

    def on_train_begin(self, args, state, control, **kwargs):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", dynamic_ncols=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs and "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}", trainable=f"{self.count_fn():,}")

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()


def _load_data(s: TrainSettings):
    default = {"classification": "drug-reviews", "causal-lm": "humaneval"}.get(s.task)
    if not (s.data or default):
        raise CLIError(f"--task {s.task} has no bundled default data: pass --data FILE")
    source = s.data or default
    if source in data.BUNDLED:
        train_df, eval_df = data.bundled(source)
    else:
        train_df, eval_df = data.load_table(source), None
    if s.eval_data:
        eval_df = data.bundled(s.eval_data)[0] if s.eval_data in data.BUNDLED else data.load_table(s.eval_data)
    if s.task in ("classification", "regression"):  # check the columns and labels before anything else uses them
        data.require_columns(train_df, _text_columns(s) + [s.label_column], source)
        if s.task == "classification":
            data.class_labels(train_df[s.label_column], source, s.label_column)
        else:
            data.regression_labels(train_df[s.label_column], source, s.label_column)
    elif s.task == "seq2seq":
        data.require_columns(train_df, [s.source_column, s.target_column], source)
    if eval_df is None:
        train_df, eval_df = data.split_heldout(train_df, s.eval_fraction, s.seed)
    if s.max_train_rows:
        train_df = train_df.iloc[: s.max_train_rows]
    if s.max_eval_rows:
        eval_df = eval_df.iloc[: s.max_eval_rows]
    return source, train_df.reset_index(drop=True), eval_df.reset_index(drop=True)


def _text_columns(s: TrainSettings) -> list[str]:
    cols = [c.strip() for c in s.text_column.split(",") if c.strip()]
    if not 1 <= len(cols) <= 2:
        raise CLIError(f"--text-column takes one column or two separated by a comma, got {s.text_column!r}")
    return cols


def _classification_rows(tokenizer, df, s, label_index, source):
    cols = _text_columns(s)
    data.require_columns(df, cols + [s.label_column], source)
    texts = [_texts(df[c]) for c in cols]
    enc = tokenizer(*texts, truncation=True, max_length=s.max_length)
    if label_index is None:  # regression
        labels = data.regression_labels(df[s.label_column], source, s.label_column)
    else:
        labels = [label_index[v if isinstance(v, str) else int(v)] for v in df[s.label_column].tolist()]
    return [{**{k: enc[k][i] for k in enc}, "labels": labels[i]} for i in range(len(df))]


def _causal_rows(tokenizer, df, s, source):
    if s.prompt_column in df.columns and s.response_column in df.columns:
        return causal_lm.tokenize_sft(
            tokenizer,
            _texts(df[s.prompt_column]),
            _texts(df[s.response_column]),
            s.max_length,
        )
    data.require_columns(df, [s.text_column], source)
    return causal_lm.tokenize_sft(tokenizer, None, _texts(df[s.text_column]), s.max_length)


def _texts(column) -> list[str]:
    """A text column as strings; an empty cell is "" (pandas reads it as NaN, which str() makes "nan")."""
    return column.fillna("").astype(str).tolist()


def _calibration_sample(train_rows: list[dict], collator, s: TrainSettings) -> list[dict]:
    """--calibration-rows training rows, collated in --batch-size batches: all of them when they fit,
    else a sample drawn with --seed (in file order), not the first rows: a file sorted by label
    would otherwise show the calibration one class."""
    rows = train_rows
    if len(rows) > s.calibration_rows:
        keep = sorted(random.Random(s.seed).sample(range(len(rows)), s.calibration_rows))
        rows = [rows[i] for i in keep]
    return [collator(rows[i : i + s.batch_size]) for i in range(0, len(rows), s.batch_size)]


def _calibration_batches(train_rows: list[dict], collator, s: TrainSettings) -> list[dict] | None:
    """--init activation|gradient: the rows that set A (`_calibration_sample`)."""
    if s.init not in CALIBRATED_INITS or s.method not in ("lamda", "lamda++"):
        return None
    return _calibration_sample(train_rows, collator, s)


def _probe_head(model, head, train_rows: list[dict], collator, s: TrainSettings) -> dict | None:
    """--head-init probe: fit the new head on the frozen model's features before any adapter exists."""
    if s.head_init != "probe":
        return None
    if head is None:  # TrainSettings.validate allows the probe only on tasks with a new head
        raise CLIError(f"--head-init probe: --task {s.task} builds no new head")
    batches = _calibration_sample(train_rows, collator, s)  # the same rows as a calibrated init reads
    try:
        report = head_probe.probe_head(model, head if isinstance(head, str) else head[0], batches, seed=s.seed)
    except head_probe.HeadProbeError as err:
        raise CLIError(f"{err} (--head-init random trains the head from its own init instead)") from None
    return report.to_dict()


class _SessionStart(TrainerCallback):
    """The step and tokens seen when this session's training began (a resumed run restores both)."""

    def __init__(self) -> None:
        self.step, self.tokens = 0, 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.step, self.tokens = state.global_step, state.num_input_tokens_seen


RUN_SETTINGS_NAME = "run_settings.json"  # in every checkpoint: the settings the run was started with
# What a resumed run may change: where it writes and what it prints, the checkpoint cadence, the
# evaluation after training, and memory-only switches (gradient checkpointing; the gradient init's
# groups, whose A is bitwise the same). Every other setting shapes the trained weights.
RESUME_MAY_CHANGE = frozenset(
    {
        "output_dir",
        "overwrite",
        "resume",
        "quiet",
        "save_steps",
        "gradient_checkpointing",
        "calibration_memory_mb",
        "eval_generate",
        "answer_regex",
        "num_beams",
        "max_new_tokens",
    }
)


class _RecordSettings(TrainerCallback):
    """Writes the run's settings into every checkpoint it saves, for `check_resume_settings`."""

    def __init__(self, s: TrainSettings) -> None:
        self.payload = (json.dumps(s.to_dict(), indent=2, sort_keys=True) + "\n").encode()

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            atomic_write_bytes(folder / RUN_SETTINGS_NAME, self.payload)


def check_resume_settings(s: TrainSettings, checkpoint: Path) -> None:
    """Refuse to resume `checkpoint` with settings that differ from the run that saved it.

    A resumed run is meant to end where the uninterrupted one would: another --lr, --max-steps,
    --seed, data or batch size would silently make it a different run. A checkpoint written before
    this check existed has no settings file and is not compared.
    """
    path = checkpoint / RUN_SETTINGS_NAME
    if not path.is_file():
        return
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CLIError(f"{path}: cannot read the run's settings ({err})") from None
    if not isinstance(saved, dict):
        raise CLIError(f"{path}: expected a JSON object of settings, got {type(saved).__name__}")
    now = s.to_dict()
    changed = [
        f"--{key.replace('_', '-')} {now[key]!r} (the run used {saved[key]!r})"
        for key in sorted(now)
        if key not in RESUME_MAY_CHANGE and key in saved and saved[key] != now[key]
    ]
    if changed:
        raise CLIError(
            f"--resume {checkpoint} continues the run that saved it, but {'; '.join(changed)}. "
            "Pass the run's own values, or start a new run (--overwrite, or another --output-dir)"
        )


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint (the Trainer writes trainer_state.json last; a kill mid-save leaves none)."""
    ckpts = sorted(
        (p for p in (out / "checkpoints").glob("checkpoint-*") if (p / "trainer_state.json").is_file()),
        key=lambda p: int(p.name.split("-")[-1]),
    )
    return ckpts[-1] if ckpts else None


def run_training(s: TrainSettings) -> dict:
    """Train, evaluate and write everything to `s.output_dir`; returns the metrics."""
    s.validate()
    start = time.time()
    out, stale = check_output_dir(s)
    best_model = _best_model_args(s)  # its flag conflicts too are found before anything is removed
    resume = None
    if s.resume:
        resume = latest_checkpoint(out) if s.resume == "latest" else Path(s.resume)
        if resume is None or not resume.is_dir():
            raise CLIError(f"no checkpoint to resume from ({s.resume!r} in {out / 'checkpoints'})")
        check_resume_settings(s, resume)
    model_path = resolve_model_path(s.model)
    if s.task == "seq2seq":
        try:
            _from_pretrained(seq2seq.check_encoder_decoder, model_path)  # an offline hub id: a CLIError
        except seq2seq.Seq2SeqError as err:
            raise CLIError(str(err)) from None
    source, train_df, eval_df = _load_data(s)
    tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, model_path)
    torch.manual_seed(s.seed)
    metrics: dict = {"task": s.task, "method": s.method, "model": s.model, "data": source}
    eval_source = s.eval_data or source
    if s.task == "regression":
        data.require_columns(eval_df, _text_columns(s) + [s.label_column], eval_source)
        train_rows = _classification_rows(tokenizer, train_df, s, None, source)
        eval_rows = _classification_rows(tokenizer, eval_df, s, None, eval_source)
        base, head = _from_pretrained(classification.build_classifier, model_path, 1, s.pooling)
        collator = DataCollatorWithPadding(tokenizer)
    elif s.task == "seq2seq":
        from transformers import AutoModelForSeq2SeqLM

        data.require_columns(eval_df, [s.source_column, s.target_column], eval_source)
        train_rows, eval_rows = (
            seq2seq.tokenize_pairs(
                tokenizer,
                _texts(df[s.source_column]),
                _texts(df[s.target_column]),
                s.max_length,
                s.max_target_length,
            )
            for df in (train_df, eval_df)
        )
        base, head = _from_pretrained(AutoModelForSeq2SeqLM.from_pretrained, model_path, dtype=torch.float32), None
        collator = seq2seq.Seq2SeqCollator(tokenizer.pad_token_id)
    elif s.task == "classification":
        data.require_columns(train_df, _text_columns(s) + [s.label_column], source)
        data.require_columns(eval_df, _text_columns(s) + [s.label_column], s.eval_data or source)
        label_names = data.class_labels(train_df[s.label_column], source, s.label_column)
        unseen = sorted(
            set(data.class_labels(eval_df[s.label_column], s.eval_data or source, s.label_column, min_classes=1))
            - set(label_names)
        )
        if unseen:
            raise CLIError(f"held-out labels {unseen} never occur in the training data")
        label_index = {v: i for i, v in enumerate(label_names)}
        train_rows = _classification_rows(tokenizer, train_df, s, label_index, source)
        eval_rows = _classification_rows(tokenizer, eval_df, s, label_index, s.eval_data or source)
        base, head = _from_pretrained(classification.build_classifier, model_path, len(label_names), s.pooling)
        collator = DataCollatorWithPadding(tokenizer)
        metrics["labels"] = [str(v) for v in label_names]
    else:
        from transformers import AutoModelForCausalLM

        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if s.eval_generate:
            data.require_columns(eval_df, [s.prompt_column, s.response_column], eval_source)
        train_rows = _causal_rows(tokenizer, train_df, s, source)
        eval_rows = _causal_rows(tokenizer, eval_df, s, s.eval_data or source)
        if recursive.is_recursive_folder(model_path):  # written by `lamda-peft recursive --output`
            base, head = recursive.load_recursive(model_path), None
        else:
            base, head = _from_pretrained(AutoModelForCausalLM.from_pretrained, model_path, dtype=torch.float32), None
        collator = causal_lm.SFTCollator(tokenizer.pad_token_id)
    if not train_rows or not eval_rows:
        raise CLIError(f"no usable rows after tokenization (train {len(train_rows)}, held-out {len(eval_rows)})")
    clear_output_dir(out, stale)  # model, tokenizer and data all loaded: --overwrite may now remove the old run
    is_recursive = getattr(base, "recursive_config", None) is not None
    if not is_recursive:  # also on resume: the gradient init below must see the same head as the first run
        probe = _probe_head(base, head, train_rows, collator, s)
        if probe is not None:
            metrics["head_probe"] = probe
    model = (
        recursive.prepare_uptraining(base, s.method, s.freeze_shared)
        if is_recursive
        else wrap_model(base, s, head, model_path, calibration=_calibration_batches(train_rows, collator, s))
    )
    is_lamda = s.method in ("lamda", "lamda++")
    if resume is not None and is_lamda:
        load_adapter_state(model, resume)  # before the optimizer exists: a frozen B must not enter it
    # Passed only when asked for: the flag is deprecated in transformers 5 and warns whenever given.
    checkpointing = (
        {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}}
        if s.gradient_checkpointing or s.memory_lean
        else {}
    )
    args = TrainingArguments(
        output_dir=str(out / "checkpoints"),
        per_device_train_batch_size=s.batch_size,
        per_device_eval_batch_size=max(s.batch_size, 16),
        gradient_accumulation_steps=s.grad_accum,
        learning_rate=s.lr,
        weight_decay=s.weight_decay,
        warmup_steps=float(s.warmup_ratio),
        lr_scheduler_type=s.scheduler,
        num_train_epochs=s.epochs,
        max_steps=s.max_steps,
        seed=s.seed,
        data_seed=s.seed,
        bf16=s.bf16,
        logging_steps=1,
        logging_nan_inf_filter=False,  # a NaN loss must reach the log (and FaultGuard), not be averaged away
        save_strategy="steps" if s.save_steps or s.eval_steps else "epoch",
        save_steps=s.save_steps or s.eval_steps or 500,
        save_total_limit=3,
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        label_names=["labels"],
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        include_num_input_tokens_seen="non_padding",
        **checkpointing,
        **best_model,
    )
    optimizers = (None, None)
    if is_lamda:
        optimizers = (torch.optim.AdamW(model.lamda_param_groups(s.lr, s.weight_decay, head_lr=s.head_lr)), None)
    elif s.method == "lorafa":  # PEFT's own: freezes every lora_A, projects lora_B's gradient (one group)
        from peft.optimizers import create_lorafa_optimizer

        optimizers = (
            create_lorafa_optimizer(model, r=s.r, lora_alpha=s.alpha or s.r, lr=s.lr, weight_decay=s.weight_decay),
            None,
        )
    if is_lamda:
        trainer_cls = LamdaTrainer
    elif is_recursive:
        trainer_cls = RecursiveTrainer
    else:
        trainer_cls = LeanTrainer if s.memory_lean else Trainer
    lean = {"chunked_loss_tokens": DEFAULT_CHUNK_TOKENS} if s.memory_lean else {}
    trainer = trainer_cls(
        **lean,
        model=model,
        args=args,
        train_dataset=train_rows,
        eval_dataset=eval_rows,
        data_collator=collator,
        optimizers=optimizers,
        compute_metrics=trainer_compute_metrics(s.task) if s.eval_steps else None,
    )
    lamda_cb = trainer.lamda_callback if isinstance(trainer, LamdaTrainer) else None
    guard = FaultGuard()  # stop on NaN/Inf; save and stop on SIGTERM/SIGINT
    trainer.add_callback(guard)
    trainer.add_callback(_RecordSettings(s))
    trainer.remove_callback(PrinterCallback)  # our bar shows the loss; no raw dict per step
    if not s.quiet:
        trainer.add_callback(ProgressBar(lamda_cb, lambda: count_trainable(model)))
    if resume is not None:
        # "before" means the untrained model: a resumed LaMDA model already holds the checkpoint (a
        # resumed PEFT one not yet), so no *_before figure is reported for a resumed run
        metrics["resumed_from"] = str(resume)
    elif s.task in ("causal-lm", "seq2seq"):
        before = trainer.evaluate()["eval_loss"]
        metrics.update(eval_loss_before=before, perplexity_before=causal_lm.perplexity(before))
        scores: dict = {}  # generation scores of the untrained adapter (it starts as the base model's function)
        _generation_eval(model, tokenizer, eval_df, s, scores)
        metrics.update({f"{k}_before": v for k, v in scores.items()})
    session_start = _SessionStart()  # what a resumed run had done before this session
    trainer.add_callback(session_start)
    trainable_start = count_trainable(model)
    if is_recursive:
        trainer.add_callback(RelaxationFreeze(s.freeze_fraction))
    train_output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if message := stop_message(guard, latest_checkpoint(out)):
        raise CLIError(message)  # not finished: no adapter/ and no metrics.json are written
    # Evaluation
    predictions: list[str] = []  # generated texts (seq2seq, causal-lm --eval-generate)
    if s.task == "classification":
        pred = trainer.predict(eval_rows)
        labels = np.asarray([r["labels"] for r in eval_rows])
        metrics.update(classification.classification_metrics(pred.predictions, labels))
        metrics["majority_baseline"] = classification.majority_baseline(labels)
        metrics["eval_loss"] = float(pred.metrics.get("test_loss", float("nan")))
    elif s.task == "regression":
        pred = trainer.predict(eval_rows)
        metrics.update(regression_metrics(pred.predictions, np.asarray([r["labels"] for r in eval_rows])))
        metrics["eval_loss"] = float(pred.metrics.get("test_loss", float("nan")))
    else:
        after = trainer.evaluate()["eval_loss"]
        metrics.update(eval_loss=after, perplexity=causal_lm.perplexity(after))
        predictions = _generation_eval(model, tokenizer, eval_df, s, metrics)
    metric = resolve_metric(s.task, s.metric, s.eval_generate)
    metrics.update(metric=metric, score=metrics[metric], higher_is_better=HIGHER_IS_BETTER.get(metric, True))
    if s.eval_steps:
        metrics.update(
            best_checkpoint=trainer.state.best_model_checkpoint,
            best_step=trainer.state.best_global_step,
            best_metric=trainer.args.metric_for_best_model,
            best_value=trainer.state.best_metric,
        )
    history = lamda_cb.history if lamda_cb else [(0, trainable_start)]
    metrics.update(
        trainable_params_start=trainable_start,
        trainable_params_end=count_trainable(model),
        parameter_updates=int(sum(c for _, c in history[1:]))  # this session's steps (from a resumed step on)
        if lamda_cb
        else trainable_start * (trainer.state.global_step - session_start.step),
        parameter_updates_from_step=session_start.step,
        total_params=sum(p.numel() for p in model.parameters()),
        train_steps=trainer.state.global_step,
        train_rows=len(train_rows),
        eval_rows=len(eval_rows),
        peak_memory_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        wall_time_s=time.time() - start,
        torch_threads=torch.get_num_threads(),
        processes=trainer.args.world_size,
        train_tokens_per_s=(trainer.state.num_input_tokens_seen - session_start.tokens)
        / max(train_output.metrics["train_runtime"], 1e-9),
    )
    if trainer.is_world_process_zero():  # one writer under `accelerate launch`
        if predictions:
            rows = [json.dumps({"prediction": p}) for p in predictions]
            atomic_write_bytes(out / "predictions.jsonl", ("\n".join(rows) + "\n").encode())
        _write_outputs(out, s, model, trainer, history, metrics)
    return metrics


def _best_model_args(s: TrainSettings) -> dict:
    """TrainingArguments for --eval-steps: evaluate every N steps, track the best checkpoint by --metric.

    Classification and regression track --metric itself; seq2seq and causal-lm track the held-out
    loss (their generation metrics are computed once, at the end).
    """
    if not s.eval_steps:
        return {}
    if s.save_steps not in (0, s.eval_steps):
        raise CLIError("--save-steps must equal --eval-steps (or be 0) so the best evaluation has a checkpoint")
    metric = resolve_metric(s.task, s.metric, s.eval_generate)
    if s.task not in ("classification", "regression"):
        metric = "eval_loss"
    return {
        "eval_strategy": "steps",
        "eval_steps": s.eval_steps,
        "metric_for_best_model": metric,
        "greater_is_better": HIGHER_IS_BETTER.get(metric, metric != "eval_loss"),
    }


def _generation_eval(model, tokenizer, eval_df, s: TrainSettings, metrics: dict) -> list[str]:
    """Seq2seq ROUGE, or causal-LM --eval-generate scores, added to `metrics`; the generated texts."""
    if s.task == "seq2seq":
        scores, predictions = seq2seq.evaluate(
            model,
            tokenizer,
            _texts(eval_df[s.source_column]),
            _texts(eval_df[s.target_column]),
            s,
        )
    elif s.eval_generate:
        scores, predictions = generation.evaluate(
            model,
            tokenizer,
            _texts(eval_df[s.prompt_column]),
            _texts(eval_df[s.response_column]),
            s,
        )
    else:
        return []
    metrics.update(scores)
    return predictions


def _write_outputs(out: Path, s: TrainSettings, model, trainer, history, metrics) -> None:
    adapter_dir = out / "adapter"
    if getattr(model, "recursive_config", None) is not None:
        recursive.save_recursive(model, out / "model")  # the whole model; shared weights once
    elif hasattr(model, "save_pretrained"):
        model.save_pretrained(adapter_dir)
    atomic_write_bytes(out / "resolved_config.json", (json.dumps(s.to_dict(), indent=2) + "\n").encode())
    log = [json.dumps(row) for row in trainer.state.log_history]
    atomic_write_bytes(out / "train_log.jsonl", ("\n".join(log) + "\n").encode())
    _plots(out, trainer.state.log_history, history)
    metrics["output_dir"] = str(out)
    atomic_write_bytes(
        out / "metrics.json", (json.dumps(metrics, indent=2) + "\n").encode()
    )  # last: marks the run finished


def _plots(out: Path, log_history: list[dict], history: list[tuple[int, int]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [row["step"] for row in log_history if "loss" in row]
    losses = [row["loss"] for row in log_history if "loss" in row]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses)
    ax.set(xlabel="optimizer step", ylabel="training loss", title="Loss")
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.step([h[0] for h in history], [h[1] for h in history], where="post")
    ax.set(xlabel="optimizer step", ylabel="trainable parameters", title="Trainable parameters (B freezes)")
    fig.tight_layout()
    fig.savefig(out / "trainable_params.png", dpi=110)
    plt.close(fig)
