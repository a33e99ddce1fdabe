"""`LamdaConfig`: every knob of a LaMDA / LaMDA++ adapter, validated on creation.

The config is what `adapter_config.json` holds. Loading an adapter never recomputes anything that
the config can state (ranks chosen by LaMDA++ are written into `rank_pattern`).
Choices marked "[ours]" in `SPEC.md` are fields here, with the default documented on the field.

`LamdaConfig` is a `peft.PeftConfig` so that the very same object drives `get_lamda_model` and
`peft.get_peft_model` (see `integrations/peft_registration.py`). PEFT's own bookkeeping fields
(`task_type`, `revision`, `inference_mode`, ...) are inherited; `to_dict` leaves them out while they
hold their defaults, so a LaMDA config file does not depend on the installed peft version.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peft.config import PeftConfig
from peft.utils import PeftType

CONFIG_NAME = "adapter_config.json"
PEFT_TYPE = "LAMDA"

_FREEZE_ORDERS = ("largest_first", "smallest_first")
_INITS = ("spectral", "orthonormal", "zero", "activation", "gradient")
_SVD_METHODS = ("auto", "full", "lowrank")
_GRADIENT_STATS = ("sum", "batch_moment")
_RANK_ALLOCATIONS = ("none", "energy")
_RANK_BUDGETS = ("params", "rank")
# PeftConfig's fields, written only when they differ from these defaults (peft_version: never, as it
# names the installed peft, not the adapter; a file must read the same whichever peft wrote it).
_PEFT_FIELD_DEFAULTS = {"task_type": None, "auto_mapping": None, "revision": None, "inference_mode": False}
_PEFT_VERSION_FIELD = "peft_version"


class ConfigError(ValueError):
    """A `LamdaConfig` field (or an `adapter_config.json` key) has a value it cannot take."""


@dataclass
class LamdaConfig(PeftConfig):
    """Configuration of a LaMDA adapter (a `peft.PeftConfig`; build it with keyword arguments).

    Attributes:
        r: base rank of every adapted matrix (the size of the trainable r x r core S).
        alpha: scaling numerator; the adapter path is multiplied by `alpha / r`. None means `r`
            (scaling 1) [ours].
        target_modules: which modules to adapt: a list of module names or dotted suffixes
            (`["query", "value"]`, `["attention.self.query"]`), a regex string matched with
            `re.fullmatch` against the full module name, or "all-linear" (every Linear/Conv1D
            except the output head, as PEFT means it).
        dropout: dropout on the adapter input. 0 by default [ours]: a dropout on x stores a
            d_in-wide mask for backward and gives back most of LaMDA's activation saving.
        freeze_fraction: B (PMB) is fully frozen after `ceil(freeze_fraction * total_steps)`
            optimizer steps. 0.3 by default (the paper: 10% underperforms LoRA, 20-30% beat it);
            0 freezes B from the start (LoRA-XS-like); 1 freezes its last component at the end.
        freeze_order: which components of B freeze first: "largest_first" (index 0 = largest
            singular value, as the authors' code; the default [ours]) or "smallest_first".
        init: "spectral" (the paper: A = sqrt(s) Vh, B = U sqrt(s), S = I) or "orthonormal"
            (A = Vh, B = U, S = diag(s)); both start from the same residual base W - scaling*B S A.
            "activation" [ours]: A spans the top-r principal directions of the layer's inputs on
            calibration data (`get_lamda_model(..., calibration=...)`), B0 = W on that subspace,
            split like "spectral"; the same residual base. See `spectral.activation_factors`.
            "zero" [ours]: A = Vh, B0 = 0, S = I: no residual (W_res = W), the adapter's change
            starts at zero as LoRA's does and B learns from there, on W's top-r input directions.
            "gradient" [ours]: A = the top-r right singular vectors of the loss gradient dL/dW on
            calibration batches with labels, B0 = 0, S = I (W_res = W): the input directions full
            fine-tuning would move first. See `spectral.gradient_factors`.
        gradient_stat: what init="gradient" reads of the calibration gradients. "sum": the
            summed gradient G = sum_b G_b (its top-r right singular vectors). "batch_moment" [ours]:
            the top-r eigenvectors of sum_b G_b^T G_b, the input directions where the per-batch
            gradients (the steps training takes) carry most energy, not only their mean; holds one
            (d_in, d_in) matrix per target during calibration.
        s_lr_scale: multiplier on the learning rate of S in `lamda_param_groups` (1 = same rate).
        svd: "full" (exact SVD in float64), "lowrank" (`torch.svd_lowrank`, randomised) or
            "auto": full for matrices up to `svd_full_max_dim`, low-rank above it.
        svd_niter: power iterations of the randomised SVD (more = closer to the exact top-r).
        svd_full_max_dim: "auto" uses the exact SVD while min(d_in, d_out) <= this.
        rank_pattern: per-module rank overrides, {module name or regex: rank}; LaMDA++ writes
            its allocation here.
        alpha_pattern: per-module alpha overrides, same keys as `rank_pattern`.
        modules_to_save: modules trained in full and saved with the adapter (a classifier head).
        rank_allocation: "none" (every module gets `r`) or "energy" (LaMDA++: ranks from the
            spectrum of the pretrained weights, SPEC.md section 4).
        r_min / r_max: LaMDA++ bounds; None means r // 2 and 2 * r [ours].
        rank_budget: LaMDA++ budget kept equal to the uniform one: "params" (sum r_l^2 = L r^2)
            [ours: default] or "rank" (sum r_l = L r).
        base_model_name_or_path: where the base model came from (informational).
        task_type: PEFT's task type ("SEQ_CLS", "CAUSAL_LM", ...), used only by `peft.get_peft_model`.
        quantize: None (full precision) or "nf4" / "fp4" / "int8": the frozen base is quantized,
            only its residual W - scaling * B0 S0 A (quantization.py). Needs `lamda-peft[quant]`.
        quant_backend: "bitsandbytes" (nf4, fp4, int8) or "torchao" (int8 weight-only).
        quant_blocksize: elements per absmax block of the 4-bit formats (bitsandbytes; 64 = QLoRA).
        loftq_iters: LoftQ-style alternations of quantization and SVD of the quantization error.
        quantized_residual_sha256: {module: SHA-256 of its quantized base}, written by
            `get_lamda_model`; a reload must rebuild exactly these bytes or is refused.
    """

    r: int = 8
    alpha: float | None = None
    target_modules: list[str] | str | None = None
    dropout: float = 0.0
    freeze_fraction: float = 0.3
    freeze_order: str = "largest_first"
    init: str = "spectral"
    s_lr_scale: float = 1.0
    gradient_stat: str = "sum"
    svd: str = "auto"
    svd_niter: int = 4
    svd_full_max_dim: int = 1024
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] | None = None
    rank_allocation: str = "none"
    r_min: int | None = None
    r_max: int | None = None
    rank_budget: str = "params"
    base_model_name_or_path: str | None = None
    quantize: str | None = None
    quant_backend: str = "bitsandbytes"
    quant_blocksize: int = 64
    loftq_iters: int = 0
    quantized_residual_sha256: dict[str, str] = field(default_factory=dict)
    peft_type: str = PEFT_TYPE

    def __post_init__(self) -> None:
        super().__post_init__()  # PEFT's checks (task_type) and its peft_version stamp
        # PEFT and transformers expect the enum member (`peft_type.value`) once LaMDA is registered.
        self.peft_type = getattr(PeftType, PEFT_TYPE, self.peft_type) if self.peft_type == PEFT_TYPE else self.peft_type
        self.validate()

    # -- validation ---------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise `ConfigError` naming the first field whose value is not allowed."""
        _check_int("r", self.r, minimum=1)
        if self.alpha is not None:
            _check_number("alpha", self.alpha)
            if self.alpha <= 0:
                raise ConfigError(f"alpha must be > 0 (or None for alpha = r), got {self.alpha}")
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if self.target_modules is not None and not isinstance(self.target_modules, (str, list)):
            raise ConfigError(
                "target_modules must be a list of names, a regex string or 'all-linear', "
                f"got {type(self.target_modules).__name__}"
            )
        if isinstance(self.target_modules, list):
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise ConfigError(f"target_modules must be non-empty strings, got {self.target_modules!r}")
        elif isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            _check_regex("target_modules", self.target_modules)
        _check_number("dropout", self.dropout)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        _check_number("freeze_fraction", self.freeze_fraction)
        if not 0.0 <= self.freeze_fraction <= 1.0:
            raise ConfigError(f"freeze_fraction must be in [0, 1], got {self.freeze_fraction}")
        _check_choice("freeze_order", self.freeze_order, _FREEZE_ORDERS)
        _check_choice("init", self.init, _INITS)
        _check_choice("gradient_stat", self.gradient_stat, _GRADIENT_STATS)
        _check_number("s_lr_scale", self.s_lr_scale)
        if self.s_lr_scale <= 0:
            raise ConfigError(f"s_lr_scale must be > 0, got {self.s_lr_scale}")
        _check_choice("svd", self.svd, _SVD_METHODS)
        _check_int("svd_niter", self.svd_niter, minimum=0)
        _check_int("svd_full_max_dim", self.svd_full_max_dim, minimum=1)
        if not isinstance(self.rank_pattern, dict):
            raise ConfigError(f"rank_pattern must be a dict {{module: rank}}, got {self.rank_pattern!r}")
        for key, value in self.rank_pattern.items():
            _check_pattern_key("rank_pattern", key)
            _check_int(f"rank_pattern[{key!r}]", value, minimum=1)
        if not isinstance(self.alpha_pattern, dict):
            raise ConfigError(f"alpha_pattern must be a dict {{module: alpha}}, got {self.alpha_pattern!r}")
        for key, value in self.alpha_pattern.items():
            _check_pattern_key("alpha_pattern", key)
            _check_number(f"alpha_pattern[{key!r}]", value)
            if value <= 0:
                raise ConfigError(f"alpha_pattern[{key!r}] must be > 0, got {value}")
        if isinstance(self.modules_to_save, tuple):
            self.modules_to_save = list(self.modules_to_save)
        if self.modules_to_save is not None and (
            not isinstance(self.modules_to_save, list)
            or not all(isinstance(m, str) and m for m in self.modules_to_save)
        ):
            raise ConfigError(f"modules_to_save must be a list of module names, got {self.modules_to_save!r}")
        _check_choice("rank_allocation", self.rank_allocation, _RANK_ALLOCATIONS)
        _check_choice("rank_budget", self.rank_budget, _RANK_BUDGETS)
        if self.r_min is not None:
            _check_int("r_min", self.r_min, minimum=1)
        if self.r_max is not None:
            _check_int("r_max", self.r_max, minimum=1)
        if self.rank_bounds[0] > self.rank_bounds[1]:
            raise ConfigError(f"r_min ({self.rank_bounds[0]}) must be <= r_max ({self.rank_bounds[1]})")
        from lamda_peft.quantization import validate_quantization_fields  # its own module: one place

        validate_quantization_fields(self)
        if self.peft_type != PEFT_TYPE:
            raise ConfigError(f"peft_type must be {PEFT_TYPE!r} for a LaMDA adapter, got {self.peft_type!r}")

    # -- derived values -----------------------------------------------------------------------
    @property
    def rank_bounds(self) -> tuple[int, int]:
        """(r_min, r_max) with the [ours] defaults r // 2 and 2 r filled in."""
        lo = self.r_min if self.r_min is not None else max(1, self.r // 2)
        hi = self.r_max if self.r_max is not None else 2 * self.r
        return lo, hi

    def rank_for(self, module_name: str) -> int:
        """The rank of `module_name`: its `rank_pattern` entry (exact name, suffix, or regex), else r."""
        return _pattern_lookup(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        """The alpha of `module_name`: `alpha_pattern`, else `alpha`, else the module's rank."""
        default = self.alpha if self.alpha is not None else float(self.rank_for(module_name))
        return float(_pattern_lookup(self.alpha_pattern, module_name, default))

    # -- JSON round trip ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready fields: enums as plain strings, PEFT's bookkeeping fields only when set."""
        data = dataclasses.asdict(self)
        data.pop(_PEFT_VERSION_FIELD, None)
        for key, default in _PEFT_FIELD_DEFAULTS.items():
            if key in data and data[key] == default:
                del data[key]
        for key in ("peft_type", "task_type"):
            if data.get(key) is not None:
                data[key] = str(getattr(data[key], "value", data[key]))
        return data

    def save(self, directory: str | Path) -> Path:
        """Write `adapter_config.json` into `directory` atomically; returns its path."""
        from lamda_peft.checkpoint import atomic_write_bytes

        path = Path(directory) / CONFIG_NAME
        atomic_write_bytes(path, (json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n").encode())
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> LamdaConfig:
        """Build a config from a dict, refusing unknown keys (a typo must not be ignored)."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        # Checked first: another method's config (LoRA's) is a wrong folder, not a set of typos.
        if data.get("peft_type", PEFT_TYPE) != PEFT_TYPE:
            raise ConfigError(
                f"{source}: peft_type is {data.get('peft_type')!r}, not {PEFT_TYPE!r}: this is not a "
                "LaMDA adapter (a LoRA folder loads with peft.PeftModel.from_pretrained)"
            )
        unknown = sorted(set(data) - known)  # known includes PeftConfig's fields (task_type, peft_version, ...)
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {unknown}; known keys are {sorted(known)}")
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None
        except (TypeError, ValueError) as err:  # PEFT's own checks (task_type) raise ValueError
            raise ConfigError(f"{source}: {err}") from None

    @classmethod
    def load(cls, directory: str | Path) -> LamdaConfig:
        """Read and validate `directory/adapter_config.json`."""
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}: not a saved LaMDA adapter folder")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from None
        return cls.from_dict(data, source=str(path))


def _pattern_lookup(pattern: dict[str, Any], name: str, default: Any) -> Any:
    if name in pattern:
        return pattern[name]
    for key, value in pattern.items():
        if name.endswith("." + key) or re.fullmatch(key, name):
            return value
    return default


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")


def _check_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if value in (float("inf"), float("-inf")):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {list(choices)}, got {value!r}")


def _check_pattern_key(name: str, key: Any) -> None:
    # Keys are matched as names, suffixes and regexes (`_pattern_lookup`): a broken regex must fail here.
    if not isinstance(key, str) or not key:
        raise ConfigError(f"{name} keys must be non-empty module names or regexes, got {key!r}")
    _check_regex(f"{name} key", key)


def _check_regex(name: str, value: str) -> None:
    try:
        re.compile(value)
    except re.error as err:
        raise ConfigError(f"{name}: {value!r} is not a valid regex ({err})") from None
