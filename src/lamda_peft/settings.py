"""`TrainSettings`: every option of `lamda-peft train`, with the help text the CLI shows.

One dataclass feeds the CLI flags, the YAML/JSON config file (same field names) and the resolved
config written next to each run. Defaults are the measured ones (see benchmarks/ for evidence).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainSettings:
    # what to train
    model: str = _f("minilm", "model: a local folder, a hub id, or a bundled name (minilm, smollm2)")
    task: str = _f(
        "classification",
        "task family: classification, regression (one output, MSE), seq2seq (encoder-decoder, e.g. BART/T5), causal-lm",
        choices=["classification", "regression", "seq2seq", "causal-lm"],
    )
    data: str | None = _f(
        None,
        "training data: CSV/TSV/JSONL/JSON/Parquet file, a `datasets` folder or hub name, or a bundled "
        "name (drug-reviews, humaneval). Default: drug-reviews (classification), humaneval (causal-lm)",
    )
    eval_data: str | None = _f(
        None, "held-out data in the same format (default: the bundled test split, or a seeded split of --data)"
    )
    eval_fraction: float = _f(0.2, "fraction of --data held out when there is no separate eval data")
    text_column: str = _f("text", "text column (classification, or plain-text causal-lm); 'a,b' for sentence pairs")
    label_column: str = _f("label", "label column (classification: integers or strings; regression: numbers)")
    prompt_column: str = _f(
        "prompt", "causal-lm: prompt column (no loss on it); missing => plain text from --text-column"
    )
    response_column: str = _f("response", "causal-lm: response column (the loss is on these tokens)")
    source_column: str = _f("document", "seq2seq: input text column")
    target_column: str = _f("summary", "seq2seq: output text column")
    max_target_length: int = _f(128, "seq2seq: maximum target tokens in training")
    # evaluation
    metric: str = _f(
        "auto",
        "headline metric reported as `score` in metrics.json: accuracy, macro_f1, matthews, pearson, spearman, mse, "
        "rouge1, rouge2, rougeL, exact_match, bleu, perplexity; auto = accuracy / pearson / rougeL / "
        "exact_match (with --eval-generate) or perplexity",
    )
    eval_steps: int = _f(
        0,
        "evaluate every N optimizer steps and keep the checkpoint with the best --metric (classification, "
        "regression; held-out loss for seq2seq/causal-lm), named in metrics.json; 0 = evaluate once at the end",
    )
    eval_generate: bool = _f(False, "causal-lm: generate answers for the held-out prompts; exact match, ROUGE-L, BLEU")
    answer_regex: str = _f(
        r"####\s*(-?[\d,]*\.?\d+)",
        "causal-lm --eval-generate: exact match compares the last match (group 1) of this regex (default: GSM8K's #### answer)",
    )
    num_beams: int = _f(1, "generation in evaluation (seq2seq, --eval-generate): beam size")
    max_new_tokens: int = _f(64, "generation in evaluation (seq2seq, --eval-generate): maximum new tokens")
    pooling: str = _f(
        "auto",
        "classification head input: mean pooling, the model's own head, or auto (mean for sentence-transformers)",
        choices=["auto", "mean", "model"],
    )
    # the adapter
    method: str = _f(
        "lamda",
        "adapter: LaMDA, LaMDA++ (spectral rank allocation), or a baseline through real PEFT (LoRA, "
        "PiSSA-initialised LoRA, LoRA-FA: LoRA with lora_A frozen, trained by PEFT's LoRA-FA optimizer, VeRA) "
        "or full fine-tuning",
        choices=["lamda", "lamda++", "lora", "pissa", "lorafa", "vera", "full"],
    )
    r: int = _f(16, "adapter rank (LaMDA: the r x r core; LaMDA++: the base rank)")
    alpha: float | None = _f(None, "scaling numerator (scaling = alpha / r); default r")
    targets: str = _f(
        "auto",
        "target modules: 'auto' (the paper's per-architecture list for BART and DeBERTa-v2/v3, else all-linear), "
        "'all-linear', a comma-separated list of names/suffixes, or a regex",
    )
    # LaMDA's defaults below (freeze_fraction, s_lr_scale, and the LaMDA values of lr and warmup) won a
    # 3-seed sweep of SPEC section 9's alternatives on the bundled MiniLM + drug reviews:
    # benchmarks/results/quality_minilm_alternatives.json (0.700 mean accuracy against 0.689 for the paper's
    # 0.3 / lr 1e-3 / no warm-up / same rate for S).
    # On the code text (SmolLM2, causal-lm) training B over the whole run won on each of three seeds
    # (held-out loss 0.849 against 0.854 for 0.6, both at 3e-4; 5e-4 gave 0.861): quality_smollm2.json.
    freeze_fraction: float | None = _f(
        None,
        "LaMDA: B fully frozen after this fraction of the optimizer steps (the paper's default is 0.3). "
        "Default: 1.0 on --task causal-lm (B's last component freezes at the last step), else 0.6",
    )
    freeze_order: str = _f(
        "largest_first", "LaMDA: which components of B freeze first", choices=["largest_first", "smallest_first"]
    )
    # init "gradient" won the quality runs on the bundled MiniLM + drug reviews (0.716 +- 0.008 over three
    # seeds against 0.700 +- 0.011 for "spectral", both with the defaults above):
    # benchmarks/results/quality_minilm.json. On the code text (SmolLM2, causal-lm) "spectral" did better
    # (held-out loss 0.821 against 0.826 / 0.828 at 5e-4 / 1e-3: quality_smollm2.json), so the default is
    # "gradient" for LaMDA on classification only. On an NF4 base it won too (0.717 +- 0.002 on 1024 rows
    # against 0.690 +- 0.007: quality_minilm_alternatives.json), so --quantize keeps it, except with --loftq-iters
    # (which refits A from the quantization error). LaMDA++ (not measured with it) keeps "spectral".
    init: str | None = _f(
        None,
        "LaMDA initialisation of A, B, S (spectral: the paper's; zero: A = Vh, B starts at 0 like LoRA's; "
        "activation: A from the inputs' principal directions on --calibration-rows; gradient: A from the loss "
        "gradient's top input directions on --calibration-rows, B starts at 0). Default: gradient for "
        "--method lamda on --task classification without --loftq-iters, else spectral",
        choices=["spectral", "orthonormal", "zero", "activation", "gradient"],
    )
    # 1024 rows (all 600 of the bundled reviews) gave 0.720 +- 0.002 over three seeds, 256 rows 0.716 +- 0.008
    # (benchmarks/results/sweep/lamda-r16-grad-cal1k-combo-*.json): the summed gradient is less noisy.
    calibration_rows: int = _f(
        1024, "init activation/gradient: training rows whose layer inputs or loss gradient set A"
    )
    # batch_moment on the NF4 base, seeds 0-2: 0.705 against 0.717 for sum (lower on every seed)
    gradient_stat: str = _f(
        "sum",
        "init gradient: sum (A from the summed calibration gradient) or batch_moment (A from the top "
        "eigenvectors of sum_b G_b^T G_b over --batch-size calibration batches)",
        choices=["sum", "batch_moment"],
    )
    calibration_memory_mb: float | None = _f(
        None,
        "init gradient: most MiB of float32 gradient sums held at once; the targets are then calibrated in "
        "groups, one pass over --calibration-rows each (same A). Default: all targets in one pass",
    )
    # --head-init probe on MiniLM + drug reviews, full precision (LaMDA defaults, seeds 0-5): accuracy 0.704
    # against 0.714, so not the default there (README, "Two more ways..."). On NF4 over 18 seeds: accuracy
    # 0.714 against 0.712 without it and 0.712 for PEFT QLoRA on the same seeds, macro-F1 0.530 against
    # 0.463 and 0.503 (README, "Quantized bases"): the default for exactly that measured setting.
    head_init: str | None = _f(
        None,
        "classification/regression: the new head's start (random: its own init; probe: fitted first on the "
        "frozen model's features of --calibration-rows training rows, L2 penalty by 5-fold cross-validation). "
        "Default: probe for --method lamda --quantize nf4 on --task classification with the gradient init and no "
        "--loftq-iters (where it was measured better), else random",
        choices=["random", "probe"],
    )
    s_lr_scale: float = _f(3.0, "LaMDA: learning-rate multiplier for the core S (S trains at 3x the rate of B)")
    dropout: float = _f(0.0, "dropout on the adapter input (0 keeps LaMDA's activation saving)")
    freeze_shared: bool = _f(False, "recursive model folders: keep the shared layer weights frozen while uptraining")
    quantize: str = _f(
        "none",
        "quantize the frozen base (needs lamda-peft[quant]): LaMDA quantizes the residual W - B0 S0 A (W itself "
        "with --init gradient, whose B0 is 0); "
        "--method lora gives PEFT QLoRA on the same bitsandbytes base",
        choices=["none", "nf4", "fp4", "int8"],
    )
    loftq_iters: int = _f(0, "LaMDA with --quantize: LoftQ-style alternations of quantization and SVD of its error")
    # optimisation
    # Measured (benchmarks/results/quality_minilm_*.json, MiniLM r=16, 190 steps): LaMDA at 3e-3 for
    # adapter and head stays at the majority class; 1e-3 or less for the adapter with 3e-3 for the head learns.
    lr: float | None = _f(
        None,
        "peak learning rate (AdamW); for LaMDA the rate of B (S: x s_lr_scale). Default: LaMDA 2e-3 with --init "
        "gradient or zero, 5e-4 with the others (3e-4 on --task causal-lm); 1e-3 other methods",
    )
    head_lr: float | None = _f(3e-3, "LaMDA runs: learning rate of the trained head (modules_to_save); none = --lr")
    weight_decay: float = _f(0.01, "AdamW weight decay (LaMDA: pulls S to its init, not to 0)")
    warmup_ratio: float | None = _f(None, "fraction of steps of linear warm-up. Default: 0.1 LaMDA, 0 others")
    scheduler: str = _f("linear", "learning-rate schedule (transformers' lr_scheduler_type)")
    epochs: float = _f(5.0, "training epochs (ignored when --max-steps > 0)")
    max_steps: int = _f(-1, "total optimizer steps; overrides --epochs when > 0")
    batch_size: int = _f(16, "per-device batch size")
    grad_accum: int = _f(1, "gradient accumulation steps (an optimizer step sees batch_size * grad_accum rows)")
    max_length: int = _f(128, "maximum tokens per example")
    max_train_rows: int = _f(0, "use only the first N training rows (0 = all)")
    max_eval_rows: int = _f(0, "use only the first N held-out rows (0 = all)")
    seed: int = _f(0, "random seed (data order, head init, dropout)")
    bf16: bool = _f(False, "bf16 autocast (adapter weights stay float32)")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward (less memory, more time)")
    memory_lean: bool = _f(
        False,
        "causal-lm: chunked cross-entropy that never builds the full logits, plus gradient checkpointing "
        "(same loss; see benchmarks/lean_memory.py)",
    )
    # output
    output_dir: str = _f("runs/lamda-default", "where the adapter, metrics.json, logs, plots and checkpoints go")
    overwrite: bool = _f(False, "replace the results of a previous run in --output-dir")
    resume: str | None = _f(None, "resume from a checkpoint folder, or 'latest' for the newest one in --output-dir")
    save_steps: int = _f(0, "checkpoint every N optimizer steps (0 = once per epoch)")
    quiet: bool = _f(False, "no progress bar")

    def validate(self) -> None:
        from lamda_peft.cli import CLIError

        lamda = self.method in ("lamda", "lamda++")
        if self.init is None:  # see the comment on `init`
            measured_better = self.method == "lamda" and self.task == "classification" and not self.loftq_iters
            self.init = "gradient" if measured_better else "spectral"
        if self.head_init is None:  # see the comment on `head_init`
            measured = (self.method, self.task, self.quantize, self.init, self.loftq_iters)
            self.head_init = "probe" if measured == ("lamda", "classification", "nf4", "gradient", 0) else "random"
        if self.lr is None:  # each method's default rate (see the comment on `lr`)
            # A with unit rows (gradient, zero) moves W less per step than sqrt(sigma)-scaled rows
            # causal-lm with the spectral init: 3e-4 beat 5e-4 on each of three SmolLM2 seeds
            spectral_lr = 3e-4 if self.task == "causal-lm" else 5e-4
            self.lr = (2e-3 if self.init in ("gradient", "zero") else spectral_lr) if lamda else 1e-3
        if self.freeze_fraction is None:
            self.freeze_fraction = 1.0 if lamda and self.task == "causal-lm" else 0.6
        if self.warmup_ratio is None:
            self.warmup_ratio = 0.1 if lamda else 0.0

        checks = [
            (self.r >= 1, "r must be >= 1"),
            (0 <= self.freeze_fraction <= 1, "freeze_fraction must be in [0, 1]"),
            (self.lr > 0, "lr must be > 0"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.grad_accum >= 1, "grad_accum must be >= 1"),
            (self.max_length >= 8, "max_length must be >= 8"),
            (self.epochs > 0 or self.max_steps > 0, "epochs must be > 0 (or give max_steps)"),
            (0 < self.eval_fraction < 1, "eval_fraction must be in (0, 1)"),
            (self.save_steps >= 0, "save_steps must be >= 0"),
            (not self.memory_lean or self.task == "causal-lm", "memory_lean applies to --task causal-lm only"),
            (self.num_beams >= 1, "num_beams must be >= 1"),
            (self.eval_steps >= 0, "eval_steps must be >= 0"),
            (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (self.max_target_length >= 1, "max_target_length must be >= 1"),
            (self.loftq_iters >= 0, "loftq_iters must be >= 0"),
            (self.calibration_rows >= 1, "calibration_rows must be >= 1"),
            (self.max_train_rows >= 0, "max_train_rows must be >= 0 (0 = all)"),
            (self.max_eval_rows >= 0, "max_eval_rows must be >= 0 (0 = all)"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1) (a fraction of the steps)"),
            (self.head_lr is None or self.head_lr > 0, "head_lr must be > 0 (or none: --lr)"),
            (self.alpha is None or self.alpha > 0, "alpha must be > 0 (or none: r)"),
            (
                self.alpha is None or self.method not in ("vera", "full"),
                f"alpha does not apply to --method {self.method} (VeRA scales by its trained vectors; full "
                "fine-tuning has no adapter): leave --alpha out",
            ),
            (
                self.calibration_memory_mb is None or self.calibration_memory_mb > 0,
                "calibration_memory_mb must be > 0",
            ),
            (
                self.head_init == "random" or self.task in ("classification", "regression"),
                f"--head-init probe applies to --task classification or regression, not {self.task}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise CLIError(message)
        from transformers.trainer_utils import SchedulerType

        schedulers = [t.value for t in SchedulerType]
        if self.scheduler not in schedulers:  # else a traceback from TrainingArguments, after the model loaded
            raise CLIError(f"scheduler must be one of {schedulers}, got {self.scheduler!r}")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise CLIError(f"{f.name} must be one of {choices}, got {getattr(self, f.name)!r}")
        from lamda_peft.tasks.metrics import resolve_metric

        try:
            resolve_metric(self.task, self.metric, self.eval_generate)
        except ValueError as err:
            raise CLIError(str(err)) from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_settings_file(path: str | Path) -> dict[str, Any]:
    """Fields from a YAML or JSON config file; unknown keys are an error (a typo must not be ignored)."""
    from lamda_peft.cli import CLIError

    path = Path(path)
    if not path.is_file():
        raise CLIError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as err:
        raise CLIError(f"config file {path} cannot be parsed ({err})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CLIError(f"config file {path} must hold a mapping of option: value")
    data = {k.replace("-", "_"): v for k, v in data.items()}
    fields = {f.name: f for f in dataclasses.fields(TrainSettings)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise CLIError(f"config file {path}: unknown key(s) {unknown}; known keys: {sorted(fields)}")
    return {k: coerce_value(fields[k], v, f"config file {path}") for k, v in data.items()}


def field_type(f: dataclasses.Field) -> tuple[str, bool]:
    """A settings field's base type name ("int", "float", "str", "bool") and whether it allows None."""
    kind = str(f.type)
    return kind.split("|")[0].strip(), "None" in kind


def means_none(value: Any) -> bool:
    """The text "none" (any case) spells None, in a flag (--head-lr none) and in a config file."""
    return isinstance(value, str) and value.strip().lower() == "none"


def coerce_value(f: dataclasses.Field, value: Any, where: str) -> Any:
    """A config file's value as the field's type: YAML reads `lr: 1e-3` as the string '1e-3'.

    Numbers given as strings are converted; "none"/null is None where the field allows it;
    anything else that is not of the field's type is a CLIError naming the key.
    """
    from lamda_peft.cli import CLIError

    base, optional = field_type(f)
    if value is None or (optional and means_none(value)):
        if optional:
            return None
        raise CLIError(f"{where}: {f.name} must be a {base}, got null")
    try:
        if base == "bool":
            if isinstance(value, bool):
                return value
        elif base == "int":
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, str):
                return int(value)
        elif base == "float":
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):
                return float(value)
        elif isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
    except ValueError:
        pass
    raise CLIError(f"{where}: {f.name} must be a {base}{' or none' if optional else ''}, got {value!r}")
