"""`LamdaModel`: injects LaMDA layers into any `nn.Module` and drives, saves, merges and exports them.

`get_lamda_model(model, config)` is the entry point. The wrapped model keeps its own API: calls
and unknown attributes are forwarded to it, so a Hugging Face model stays a Hugging Face model.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from lamda_peft.config import ConfigError, LamdaConfig
from lamda_peft.hooks import evaluating
from lamda_peft.layer import LamdaLinear, linear_shape, torch_layout_weight
from lamda_peft.quantization import (
    QuantizationError,
    build_quantized_layers,
    check_quantizable,
    quantized_format,
    uses_quantization,
    weights_as_quantized,
)
from lamda_peft.schedule import FreezeSchedule
from lamda_peft.spectral import (
    SpectralFactors,
    activation_factors,
    gradient_factors,
    gradient_moment_factors,
    spectral_factors,
)
from lamda_peft.targets import find_targets, module_to_save


def _adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    # Half-precision bases keep their adapter in float32 (PEFT's autocast_adapter_dtype does the same).
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def initial_factors(weight: torch.Tensor, r: int, config: LamdaConfig) -> SpectralFactors:
    """A, B0, S0 of a (d_out, d_in) weight as `config` asks (init, SVD method), on the weight's device."""
    f = spectral_factors(
        weight,
        r,
        init=config.init,
        dtype=_adapter_dtype(weight),
        method=config.svd,
        niter=config.svd_niter,
        full_max_dim=config.svd_full_max_dim,
    )
    return SpectralFactors(*(t.to(weight.device) for t in f))


def check_ranks(model: nn.Module, config: LamdaConfig, targets: list[str]) -> None:
    """Every target's rank fits its weight (r <= min(d_in, d_out)), or a ConfigError naming the module."""
    for name in targets:
        d_out, d_in = linear_shape(model.get_submodule(name))
        r = config.rank_for(name)
        if r > min(d_out, d_in):
            raise ConfigError(
                f"rank {r} for module {name!r} exceeds min(d_in, d_out) = {min(d_in, d_out)} of its {d_out}x{d_in} weight"
            )


def check_untied(model: nn.Module, targets: list[str]) -> None:
    """A ConfigError naming any target whose weight another module shares (tied embeddings).

    LaMDA writes W_res into the target's weight: a tied input embedding would change with it, and
    the model would no longer start as the base model.
    """
    owners: dict[int, list[str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param_name, p in module.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(id(p), []).append(f"{module_name}.{param_name}" if module_name else param_name)
    for name in targets:
        weight = getattr(model.get_submodule(name), "weight", None)
        others = [o for o in owners.get(id(weight), []) if o != f"{name}.weight"] if weight is not None else []
        if others:
            raise ConfigError(
                f"module {name!r} shares its weight with {others[0]!r} (tied weights): adapting it would change "
                "that module too; untie them first, or leave it out of target_modules"
            )


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


class LamdaModel(nn.Module):
    """A model with LaMDA adapters. Build it with `get_lamda_model` or `LamdaModel.from_pretrained`.

    Args:
        factors: each target's A, B0, S0 when they are not the SVD of its weight: calibrated
            (init "activation" / "gradient") or read from a saved adapter.
        reload: the factors come from a saved adapter, so a quantized base rebuilt from them must
            match the saved digest bitwise.

    Attributes:
        model: the wrapped model (its target linears replaced by `LamdaLinear`).
        config: the `LamdaConfig` (with LaMDA++ ranks resolved into `rank_pattern`).
    """

    def __init__(
        self,
        model: nn.Module,
        config: LamdaConfig,
        factors: dict[str, SpectralFactors] | None = None,
        reload: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self._schedule: FreezeSchedule | None = None
        self._warned_unscheduled = False
        targets = find_targets(model, config.target_modules, exclude=config.modules_to_save)
        if factors is None:
            check_ranks(model, config, targets)
        to_save = [module for _, module in self.modules_to_save()]  # resolved before any change
        check_untied(model, targets)
        quantizing = uses_quantization(model, targets, config)
        if reload and config.quantized_residual_sha256 and not quantizing:
            from lamda_peft.checkpoint import AdapterLoadError

            raise AdapterLoadError(
                f"this adapter was trained on a quantized base ({len(config.quantized_residual_sha256)} modules "
                "with a quantized_residual_sha256), but this model's targets are full precision and the config "
                "asks for no quantize: load it onto the quantized model it was trained on"
            )
        # Quantized bases (issue 11) are built first and checked whole: an error modifies nothing.
        quantized = build_quantized_layers(model, targets, config, factors, reload) if quantizing else {}
        # Every factor before any change: an SVD that fails (a non-finite weight) modifies nothing
        plain = {}
        for name in targets:
            if name in quantized:
                continue
            weight = torch_layout_weight(model.get_submodule(name))
            if factors is not None:
                plain[name] = SpectralFactors(*(t.to(weight.device) for t in factors[name]))
            else:
                plain[name] = initial_factors(weight, config.rank_for(name), config)
        for p in model.parameters():
            p.requires_grad_(False)
        for name in targets:
            if name in quantized:
                _set_submodule(model, name, quantized[name])
                continue
            base = model.get_submodule(name)
            scaling = config.alpha_for(name) / config.rank_for(name)
            layer = LamdaLinear(base, plain[name], scaling, dropout=config.dropout, freeze_order=config.freeze_order)
            _set_submodule(model, name, layer)
        for module in to_save:
            for p in module.parameters():
                p.requires_grad_(True)

    def modules_to_save(self) -> list[tuple[str, nn.Module]]:
        """(path, module) of every `config.modules_to_save` entry, resolved by `module_to_save`."""
        return [module_to_save(self.model, name) for name in self.config.modules_to_save or []]

    # -- access ------------------------------------------------------------------------------
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.model, name)

    def lamda_layers(self) -> Iterator[tuple[str, LamdaLinear]]:
        for name, module in self.model.named_modules():
            if isinstance(module, LamdaLinear):
                yield name, module

    def forward(self, *args, **kwargs):
        if self.training and torch.is_grad_enabled() and self._schedule is None and not self._warned_unscheduled:
            if any(layer.dB.requires_grad for _, layer in self.lamda_layers()):
                self._warned_unscheduled = True
                warnings.warn(
                    "LaMDA: training without a freezing schedule: B will never freeze (that is plain "
                    "LoRA-XS-with-B training, not LaMDA). Call model.attach_optimizer(optimizer, total_steps=T) "
                    "in a plain loop, or train with lamda_peft.LamdaCallback / `lamda-peft train`.",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return self.model(*args, **kwargs)

    # -- schedule ----------------------------------------------------------------------------
    def attach_optimizer(self, optimizer: torch.optim.Optimizer, total_steps: int) -> FreezeSchedule:
        """Make every `optimizer.step()` advance the PMB freezing schedule of a T-step run.

        Re-attaching (a new optimizer, a resumed run) replaces the previous binding; the step
        count lives in the layers (and in checkpoints), so the schedule resumes where it was.
        """
        from lamda_peft.integrations.peft_training import attach_optimizer  # shared with PEFT models

        self._schedule = attach_optimizer(self.model, optimizer, total_steps, self.config.freeze_fraction)
        return self._schedule

    @property
    def schedule(self) -> FreezeSchedule | None:
        return self._schedule

    # -- counting ----------------------------------------------------------------------------
    def trainable_parameter_count(self) -> int:
        """Trainable parameters right now: sum of r^2 + d_out * unfrozen(B) + modules_to_save."""
        count = sum(layer.trainable_count() for _, layer in self.lamda_layers())
        lamda_ids = {id(p) for _, layer in self.lamda_layers() for p in (layer.dS, layer.dB)}
        count += sum(p.numel() for p in self.model.parameters() if p.requires_grad and id(p) not in lamda_ids)
        return count

    def print_trainable_parameters(self) -> None:
        total = sum(p.numel() for p in self.model.parameters()) + sum(
            layer.A.numel() + layer.B0.numel() for _, layer in self.lamda_layers()
        )
        n = self.trainable_parameter_count()
        print(f"trainable params: {n:,} || all params: {total:,} || trainable%: {100 * n / total:.4f}")

    def lamda_param_groups(self, lr: float, weight_decay: float = 0.0, head_lr: float | None = None) -> list[dict]:
        """Optimizer groups: S at lr * config.s_lr_scale, B at lr, modules_to_save at head_lr (default lr).

        A freshly initialised head usually wants a larger rate than the adapter: with the spectral
        init an Adam step on S or B moves the weight by about sqrt(s_i s_j) times the step.
        """
        layers = [layer for _, layer in self.lamda_layers()]
        s_params = [layer.dS for layer in layers]
        b_params = [layer.dB for layer in layers if layer.dB.requires_grad]
        lamda_ids = {id(p) for p in s_params} | {id(layer.dB) for layer in layers}
        other = [p for p in self.model.parameters() if p.requires_grad and id(p) not in lamda_ids]
        groups = [
            {"params": s_params, "lr": lr * self.config.s_lr_scale, "weight_decay": weight_decay},
            {"params": b_params, "lr": lr, "weight_decay": weight_decay},
            {"params": other, "lr": lr if head_lr is None else head_lr, "weight_decay": weight_decay},
        ]
        # The B group stays even when empty (B fully frozen on resume): a checkpoint's optimizer
        # state has one group per role, and the resumed optimizer must have the same groups.
        return [g for g in groups if g["params"] or g is groups[1]]

    # -- merge / disable ---------------------------------------------------------------------
    def merge(self) -> None:
        for _, layer in self.lamda_layers():
            layer.merge()

    def unmerge(self) -> None:
        for _, layer in self.lamda_layers():
            layer.unmerge()

    def merge_and_unload(self) -> nn.Module:
        """Fold every adapter into its base weight and return the plain wrapped model."""
        for name, layer in list(self.lamda_layers()):
            layer.merge()
            _set_submodule(self.model, name, layer.base_layer)
        if not any(quantized_format(m) for m in self.model.modules()):
            # every quantized target was merged into full precision: the flags by which PEFT and
            # transformers treat a model as quantized (set by `quantize_model_linears`) no longer hold
            for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
                if getattr(self.model, flag, False):
                    setattr(self.model, flag, False)
        return self.model

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within this block the model computes the original base model's outputs."""
        layers = [layer for _, layer in self.lamda_layers()]
        if any(layer.merged for layer in layers):
            raise RuntimeError("disable_adapter() on a merged model: call unmerge() first")
        for layer in layers:
            layer.disabled = True
        try:
            yield
        finally:
            for layer in layers:
                layer.disabled = False

    # -- persistence (see checkpoint.py) -------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        from lamda_peft.checkpoint import adapter_state_dict

        return adapter_state_dict(self)

    def save_pretrained(self, directory: str | Path) -> Path:
        from lamda_peft.checkpoint import save_adapter

        return save_adapter(self, directory)

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | Path, **limits) -> LamdaModel:
        from lamda_peft.checkpoint import load_adapter

        return load_adapter(model, directory, **limits)

    def export_lora(self, directory: str | Path) -> Path:
        from lamda_peft.export import export_lora

        return export_lora(self, directory)


def _batch_to(batch: dict, device: torch.device) -> dict:
    """A calibration batch's tensors on the model's device (batches may come from a CPU data loader)."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def input_covariances(model: nn.Module, names: list[str], calibration) -> dict[str, torch.Tensor]:
    """X^T X (float64) of the inputs of each named linear over the calibration batches.

    `calibration` is an iterable of keyword batches for `model(**batch)`; rows that a batch's
    `attention_mask` marks as padding are left out. Runs without gradients; the model's mode is kept.
    """
    sums: dict[str, torch.Tensor] = {}
    mask: list[torch.Tensor | None] = [None]

    def hook(name):
        def record(module, args, output):
            x = args[0].detach()
            m = mask[0]
            if m is not None and x.dim() == m.dim() + 1 and x.shape[:-1] == m.shape:
                x = x[m.bool()]
            x = x.reshape(-1, x.shape[-1]).to(torch.float64)
            sums[name] = sums.get(name, 0) + x.T @ x

        return record

    device = next(model.parameters()).device
    with evaluating(model, {model.get_submodule(n): hook(n) for n in names}), torch.no_grad():
        for batch in calibration:
            batch = _batch_to(batch, device)
            mask[0] = batch.get("attention_mask")
            model(**batch)
    missing = [n for n in names if n not in sums]
    if missing:
        raise ValueError(f"init='activation': the calibration batches never reached {missing[:3]} (no input seen)")
    return sums


CALIBRATED_INITS = ("activation", "gradient")  # inits that read calibration data


def weight_gradients(
    model: nn.Module, names: list[str], calibration, batch_moment: bool = False, max_bytes: int | None = None
) -> dict[str, torch.Tensor]:
    """dL/dW (float32, (d_out, d_in) layout) of each named linear, summed over the calibration batches.

    With `batch_moment`, sum_b G_b^T G_b (float32, (d_in, d_in)) over the batches instead.

    No weight takes a gradient: a forward hook keeps each target's input x, and a hook on its output's
    gradient g adds g^T x (in float32; float64 for a float64 model) to that target's sum. All the
    sums together are a float32 copy of every target weight; `max_bytes` splits the targets into
    groups (`calibration_groups`), one pass over the batches per group, with the same sums as one
    pass (bitwise: each target's additions happen in the same order). Only a consumer that drops
    each group (`weight_gradient_groups`, as `calibrated_init` does) holds less than all of them:
    benchmarks/calibration_memory.py.

    `calibration` is an iterable of keyword batches with labels, so that `model(**batch).loss`
    exists. Runs in eval mode (no dropout); every parameter's `requires_grad` and `.grad` are as
    they were afterwards.
    """
    sums: dict[str, torch.Tensor] = {}
    for group in weight_gradient_groups(model, names, calibration, batch_moment, max_bytes):
        sums.update(group)
    return sums


def weight_gradient_groups(
    model: nn.Module, names: list[str], calibration, batch_moment: bool = False, max_bytes: int | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """`weight_gradients` one group at a time: a consumer that turns each group into factors and drops
    it holds at most `max_bytes` of sums (all of them together is a full float32 model)."""
    modules = {n: model.get_submodule(n) for n in names}
    sizes = {n: _gradient_sum_bytes(m, batch_moment) for n, m in modules.items()}
    groups = calibration_groups(sizes, max_bytes)
    if len(groups) > 1:
        calibration = list(calibration)  # read once per group
    for group in groups:
        sums = _gradient_pass(model, {n: modules[n] for n in group}, calibration, batch_moment)
        missing = [n for n in group if n not in sums]
        if missing:
            raise ValueError(f"init='gradient': the loss does not depend on {missing[:3]} (no gradient reached them)")
        yield sums
        del sums  # not held through the next group's pass


def _gradient_sum_bytes(module: nn.Module, batch_moment: bool) -> int:
    """float32 bytes a target's calibration sum holds (and, for the moment, this batch's G_b)."""
    d_out, d_in = linear_shape(module)
    return 4 * (d_in * d_in + d_out * d_in if batch_moment else d_out * d_in)


def calibration_groups(sizes: dict[str, int], max_bytes: int | None) -> list[list[str]]:
    """The targets split, in order, into groups whose sums fit in `max_bytes` (None: one group).

    A target whose sum alone is larger than `max_bytes` is a group of its own.
    """
    if max_bytes is None:
        return [list(sizes)] if sizes else []
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    groups: list[list[str]] = []
    used = 0
    for name, size in sizes.items():
        if not groups or used + size > max_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    return groups


def _gradient_pass(
    model: nn.Module, modules: dict[str, nn.Module], calibration, batch_moment: bool
) -> dict[str, torch.Tensor]:
    """One pass over the batches: each module's summed g^T x (or sum_b G_b^T G_b), see `weight_gradients`."""
    device = next(model.parameters()).device
    # A zero added to each target's output puts it in the autograd graph while no parameter trains
    lift = torch.zeros((), device=device, requires_grad=True)
    sums: dict[str, torch.Tensor] = {}
    batch_sums: dict[str, torch.Tensor] = {}

    def hook(name):
        def capture(module, args, output):
            if not torch.is_grad_enabled():
                return None
            x = args[0].detach()

            def accumulate(g: torch.Tensor) -> None:
                acc = torch.float64 if g.dtype == torch.float64 else torch.float32
                gT, xs = g.reshape(-1, g.shape[-1]).to(acc).T, x.reshape(-1, x.shape[-1]).to(acc)
                into = batch_sums if batch_moment else sums  # the moment needs this batch's G_b alone
                if name in into:
                    into[name].addmm_(gT, xs)  # += g^T x, (d_out, d_in), no second (d_out, d_in) tensor
                else:
                    into[name] = gT @ xs

            output = output + lift
            output.register_hook(accumulate)
            return output

        return capture

    flags = {p: (p.requires_grad, p.grad) for p in model.parameters()}
    try:
        for p in flags:
            p.requires_grad_(False)
        with evaluating(model, {m: hook(n) for n, m in modules.items()}):
            for batch in calibration:
                batch = _batch_to(batch, device)
                out = model(**batch)
                loss = out.get("loss") if isinstance(out, dict) else getattr(out, "loss", None)
                if loss is None:
                    raise ValueError(
                        "init='gradient': model(**batch) returned no loss; the calibration batches need labels"
                    )
                if loss.requires_grad:  # else no target reaches the loss: reported as missing below
                    loss.backward()
                for n, G in batch_sums.items():  # batch_moment: this batch's G_b^T G_b
                    sums[n] = sums[n].addmm_(G.T, G) if n in sums else G.T @ G
                batch_sums.clear()
    finally:
        for p, (flag, grad) in flags.items():
            p.requires_grad_(flag)
            p.grad = grad
    return {n: t.to(torch.float32) for n, t in sums.items()}


def calibrated_init(
    model: nn.Module, config: LamdaConfig, calibration, max_bytes: int | None = None
) -> dict[str, SpectralFactors]:
    """init="activation" / "gradient": each target's A, B0, S0 from the model's behaviour on `calibration`.

    "activation": A on the top-r principal directions of the layer's inputs (`activation_factors`).
    "gradient": A on the top-r right singular vectors of the loss gradient (`gradient_factors`).
    Both read the full-precision weights; with `config.quantize` the residual W - scaling B0 S0 A
    is then quantized. For "gradient", B0 = 0, so that base is Q(W) itself (QLoRA's), and the
    calibration gradient is taken on it: on the model that will train (over 5 MiniLM seeds,
    0.712 against 0.706 accuracy with the full-precision gradient; README, "Quantized bases").
    """
    if calibration is None:
        raise ValueError(
            f"init={config.init!r} needs calibration inputs: get_lamda_model(model, config, calibration=[batch, ...]) "
            "(`lamda-peft train` uses the first --calibration-rows training rows)"
        )
    targets = find_targets(model, config.target_modules, exclude=config.modules_to_save)
    quantized = [n for n in targets if quantized_format(model.get_submodule(n)) is not None]
    if quantized:
        raise QuantizationError(
            f"init={config.init!r} reads each target's full-precision weight, but module {quantized[0]!r} is already "
            "quantized: load the model in full precision and pass quantize='nf4' (or 'fp4', 'int8'), or use "
            "init='spectral'"
        )
    check_ranks(model, config, targets)  # before the calibration pass
    if config.quantize:
        check_quantizable(model, targets, config)  # a Conv1D or float64 target, named before it, not after
    factors = {}

    def to_factors(stats: dict[str, torch.Tensor]) -> None:
        for name, stat in stats.items():
            weight = torch_layout_weight(model.get_submodule(name))
            r, dtype = config.rank_for(name), _adapter_dtype(weight)
            if config.init == "gradient" and config.gradient_stat == "batch_moment":
                f = gradient_moment_factors(stat, r, weight.shape[0], dtype=dtype)
            elif config.init == "gradient":
                svd = {"method": config.svd, "niter": config.svd_niter, "full_max_dim": config.svd_full_max_dim}
                f = gradient_factors(stat, r, dtype=dtype, **svd)
            else:
                f = activation_factors(weight, stat, r, dtype=dtype)
            factors[name] = SpectralFactors(*(t.to(weight.device) for t in f))

    if config.init == "gradient":
        # B0 = 0: a quantized base will be Q(W) itself, so the gradient is taken on that model
        view = weights_as_quantized(model, targets, config) if config.quantize else contextlib.nullcontext()
        moment = config.gradient_stat == "batch_moment"
        with view:  # each group's sums become factors and are dropped before the next group's pass
            for group in weight_gradient_groups(model, targets, calibration, moment, max_bytes):
                to_factors(group)
                del group
    else:
        to_factors(input_covariances(model, targets, calibration))
    return {name: factors[name] for name in targets}


def get_lamda_model(
    model: nn.Module, config: LamdaConfig, calibration=None, calibration_max_bytes: int | None = None
) -> LamdaModel:
    """Wrap `model` with LaMDA adapters described by `config`.

    Everything is frozen except each adapter's S core, its B (until the schedule freezes it) and
    the `modules_to_save`. With `config.rank_allocation == "energy"` (LaMDA++) and no
    `rank_pattern` yet, ranks are allocated from the pretrained spectra first and stored in the
    config's `rank_pattern`. With `config.init` "activation" or "gradient", `calibration` (keyword
    batches for `model(**batch)`, e.g. a few hundred training rows; with labels for "gradient")
    sets each A; reloading needs none. `calibration_max_bytes` bounds the float32 gradient sums that
    init="gradient" holds at once (`weight_gradients`: the targets are then taken in groups, one
    pass over `calibration` each; default: all in one pass).
    """
    if config.rank_allocation == "energy" and not config.rank_pattern:
        from lamda_peft.rank_allocation import allocate_model_ranks

        config.rank_pattern = allocate_model_ranks(model, config).ranks
    if config.init not in CALIBRATED_INITS:
        return LamdaModel(model, config)
    return LamdaModel(model, config, factors=calibrated_init(model, config, calibration, calibration_max_bytes))
