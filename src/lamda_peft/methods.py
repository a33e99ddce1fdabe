"""Which fine-tuning method wraps the model for `lamda-peft train`: LaMDA and LaMDA++ (this package),
the baselines through the real PEFT (LoRA, PiSSA, VeRA; QLoRA on a quantized base) and full fine-tuning.
"""

from __future__ import annotations

from lamda_peft.cli import CLIError
from lamda_peft.config import ConfigError, LamdaConfig
from lamda_peft.model import CALIBRATED_INITS, get_lamda_model
from lamda_peft.quantization import MissingQuantExtraError, QuantizationError, quantize_model_linears
from lamda_peft.settings import TrainSettings
from lamda_peft.targets import default_targets, find_targets

PEFT_METHODS = ("lora", "pissa", "lorafa", "vera")  # baselines through the real peft


def wrap_model(model, s: TrainSettings, head: str | list[str] | None, model_path: str, calibration=None):
    """Apply `s.method` (and `s.quantize`) to `model`; returns the wrapped model.

    `calibration`: keyword batches for `--init activation|gradient` (LaMDA only; see `get_lamda_model`).
    """
    modules_to_save = ([head] if isinstance(head, str) else list(head)) if head else None
    targets: list[str] | str = (
        default_targets(model)
        if s.targets == "auto"
        else s.targets
        if s.targets == "all-linear"
        else ([t.strip() for t in s.targets.split(",")] if "," in s.targets or s.targets.isidentifier() else s.targets)
    )
    if s.quantize != "none":
        return _wrap_quantized(model, s, targets, modules_to_save, model_path, calibration)
    if s.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if s.method in PEFT_METHODS:
        from peft import VeraConfig, get_peft_model

        names = find_targets(model, targets, exclude=modules_to_save)
        if s.method == "vera":
            cfg = VeraConfig(r=s.r, target_modules=names, vera_dropout=s.dropout, modules_to_save=modules_to_save)
        else:
            cfg = _lora_config(s, names, modules_to_save, init="pissa_niter_4" if s.method == "pissa" else True)
        return get_peft_model(model, cfg)
    return _wrap_lamda(model, s, targets, modules_to_save, model_path, calibration)


def _wrap_lamda(model, s: TrainSettings, targets, modules_to_save, model_path, calibration, **quant):
    """get_lamda_model from the settings; a calibrated init's input problems become a CLIError (no traceback)."""
    try:
        cfg = _lamda_config(s, targets, modules_to_save, model_path, **quant)
        budget = None if s.calibration_memory_mb is None else int(s.calibration_memory_mb * 2**20)
        return get_lamda_model(model, cfg, calibration=calibration, calibration_max_bytes=budget)
    except ValueError as err:  # ConfigError (targets, ranks) and QuantizationError already read well
        if s.init in CALIBRATED_INITS and not isinstance(err, (ConfigError, QuantizationError)):
            raise CLIError(f"--init {s.init}: {err}") from None
        raise


def _lora_config(s: TrainSettings, names: list[str], modules_to_save, init: bool | str = True):
    """PEFT's LoraConfig for the LoRA, PiSSA and QLoRA baselines (alpha defaults to r, like LaMDA's)."""
    from peft import LoraConfig

    return LoraConfig(
        r=s.r,
        lora_alpha=s.alpha or s.r,
        target_modules=names,
        lora_dropout=s.dropout,
        modules_to_save=modules_to_save,
        init_lora_weights=init,
    )


def _lamda_config(s: TrainSettings, targets, modules_to_save, model_path: str, **quant) -> LamdaConfig:
    return LamdaConfig(
        r=s.r,
        alpha=s.alpha,
        target_modules=targets,
        dropout=s.dropout,
        freeze_fraction=s.freeze_fraction,
        freeze_order=s.freeze_order,
        init=s.init,
        gradient_stat=s.gradient_stat,
        s_lr_scale=s.s_lr_scale,
        modules_to_save=modules_to_save,
        rank_allocation="energy" if s.method == "lamda++" else "none",
        base_model_name_or_path=model_path,
        **quant,
    )


def _wrap_quantized(model, s: TrainSettings, targets, modules_to_save, model_path: str, calibration=None):
    """--quantize: QLaMDA (residual quantization) or, for --method lora, PEFT QLoRA on the same base.

    With --init gradient, A comes from the full-precision model's gradient and W itself is quantized
    (B0 = 0), so QLaMDA and QLoRA then train on the very same Q(W).
    """
    if s.method not in ("lamda", "lamda++", "lora"):
        raise CLIError(f"--quantize works with --method lamda, lamda++ or lora (QLoRA), not {s.method!r}")
    if s.loftq_iters and s.method == "lora":
        raise CLIError("--loftq-iters applies to LaMDA's quantized residual, not to --method lora")
    try:
        if s.method == "lora":
            from peft import get_peft_model

            names = find_targets(model, targets, exclude=modules_to_save)
            quantize_model_linears(model, names, s.quantize)  # QLoRA's base: Q(W) in place of W
            return get_peft_model(model, _lora_config(s, names, modules_to_save))
        quant = {"quantize": s.quantize, "loftq_iters": s.loftq_iters}
        return _wrap_lamda(model, s, targets, modules_to_save, model_path, calibration, **quant)
    except (MissingQuantExtraError, QuantizationError) as err:
        raise CLIError(str(err)) from None


def count_trainable(model) -> int:
    if hasattr(model, "trainable_parameter_count"):
        return model.trainable_parameter_count()
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
