"""LaMDA on a quantized frozen base (QLaMDA): 4-bit / 8-bit bases, residual quantization, LoftQ.

Two ways in (issue 11), both through `get_lamda_model`:

1. Full-precision model + `LamdaConfig(quantize="nf4" | "fp4" | "int8")`: A, B0, S0 come from the
   SVD of W (as in full-precision LaMDA), and only the residual

       W_res = W - scaling * B0 S0 A

   is quantized (bitsandbytes `Linear4bit` / `Linear8bitLt`, or torchao int8 weight-only). The
   principal part of W lives in the full-precision adapter, so the effective weight at init,
   Q(W_res) + scaling * B0 S0 A, is closer to W than Q(W) (QLoRA's base): the residual has smaller
   block maxima. `loftq_iters=N` then alternates, LoftQ-style, E = W - Q(W_res) and new factors
   from the SVD of E / scaling, shrinking ||W - W_eff|| further.
2. A model whose target linears are already bitsandbytes / torchao quantized (no full-precision W
   exists): A, B0, S0 come from the SVD of the dequantized weight, and the adapter adds
   scaling * (B S - B0 S0) A x = scaling * (dB S + B0 dS) A x, which is exactly 0 at init, so the
   model's outputs at init are bitwise the quantized model's.

Reproducibility: quantization is deterministic, so reloading an adapter onto the original
full-precision base rebuilds Q(W_res) from the saved A, B0, S0 bit for bit. The SHA-256 of each
quantized base (its packed bytes, scales and bias) is written into the config
(`quantized_residual_sha256`); a reload that does not rebuild exactly those bytes (another base
model, another bitsandbytes layout) is refused before the model is modified.

The bitsandbytes and torchao imports are lazy (bitsandbytes takes seconds to import) and live
behind `require_backend`, which names the `quant` extra when a package is missing.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import sys

import torch
import torch.nn.functional as F
from torch import nn

from lamda_peft.config import ConfigError
from lamda_peft.layer import LamdaLinear, is_conv1d
from lamda_peft.spectral import SpectralFactors, residual_weight

QUANT_TYPES = ("nf4", "fp4", "int8")
QUANT_BACKENDS = ("bitsandbytes", "torchao")
EXTRA_HINT = 'pip install "lamda-peft[quant]"'
_BACKEND_PACKAGES = {"bitsandbytes": "bitsandbytes", "torchao": "torchao"}


class QuantizationError(ValueError):
    """A module cannot be quantized (or a quantized base cannot be adapted) as the config asks."""


class MissingQuantExtraError(ImportError):
    """The quantization backend is not installed (the `quant` extra)."""


# -- config checks and the optional extra ---------------------------------------------------------
def backend_available(package: str) -> bool:
    """Is `package` importable? (A `sys.modules[name] = None` entry blocks it, as Python does.)"""
    if package in sys.modules:
        return sys.modules[package] is not None
    return importlib.util.find_spec(package) is not None


def require_backend(backend: str, quantize: str | None = None) -> None:
    """Raise `MissingQuantExtraError` naming the extra when `backend`'s package cannot be imported."""
    package = _BACKEND_PACKAGES[backend]
    if not backend_available(package):
        asked = f'quantize="{quantize}"' if quantize else "a quantized base"
        raise MissingQuantExtraError(
            f"{asked} needs the {package} package, which is not installed: {EXTRA_HINT} (or pip install {package})"
        )


def validate_quantization_fields(config) -> None:
    """The `LamdaConfig` checks of quantize, quant_backend, quant_blocksize, loftq_iters and digests."""
    if config.quantize is not None and config.quantize not in QUANT_TYPES:
        raise ConfigError(f"quantize must be one of {list(QUANT_TYPES)} or None, got {config.quantize!r}")
    if config.quant_backend not in QUANT_BACKENDS:
        raise ConfigError(f"quant_backend must be one of {list(QUANT_BACKENDS)}, got {config.quant_backend!r}")
    if config.quant_backend == "torchao" and config.quantize not in (None, "int8"):
        raise ConfigError(f"quant_backend 'torchao' supports quantize='int8' only, got {config.quantize!r}")
    bs = config.quant_blocksize
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 64 or bs > 4096 or bs & (bs - 1):
        raise ConfigError(f"quant_blocksize must be a power of two in [64, 4096], got {bs!r}")
    it = config.loftq_iters
    if isinstance(it, bool) or not isinstance(it, int) or it < 0:
        raise ConfigError(f"loftq_iters must be an integer >= 0, got {it!r}")
    if it > 0 and config.quantize is None:
        raise ConfigError("loftq_iters > 0 needs quantize (nf4, fp4 or int8): there is nothing to iterate on")
    if it > 0 and config.init in ("activation", "gradient"):
        raise ConfigError(
            f"loftq_iters > 0 refits A from the quantization error, which would discard init={config.init!r}'s "
            "calibrated A: use loftq_iters=0, or init='spectral'"
        )
    digests = config.quantized_residual_sha256
    if not isinstance(digests, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)
        for k, v in digests.items()
    ):
        raise ConfigError("quantized_residual_sha256 must map module names to 64-hex-digit SHA-256 strings")
    if config.quantize is not None:
        require_backend(config.quant_backend, config.quantize)


# -- recognising, reading and writing quantized linears -------------------------------------------
def quantized_format(module: nn.Module) -> str | None:
    """ "bnb4" (Linear4bit, nf4/fp4), "bnb8" (Linear8bitLt), "torchao" (a torchao weight) or None.

    Decided from class names, so that no quantization package is imported for a plain model.
    """
    for cls in type(module).__mro__:
        if cls.__module__.startswith("bitsandbytes"):
            if cls.__name__ == "Linear4bit":
                return "bnb4"
            if cls.__name__ == "Linear8bitLt":
                return "bnb8"
    weight = getattr(module, "weight", None)
    if weight is not None and type(weight).__module__.startswith("torchao"):
        return "torchao"
    return None


def keep_trainable_layout(module: nn.Module) -> None:
    """Stop bitsandbytes' CPU inference repacking (ASSETS.md: the "evaluate, then train" trap).

    On a CPU with AVX512-BF16, `Linear4bit.forward` in eval mode without input grad converts the
    weight for good into an inference-only layout, after which training through it fails. The
    module attribute below switches that conversion off; the trainable layout is what we keep.
    """
    if hasattr(module, "support_avx512bf16_for_cpu"):
        module.support_avx512bf16_for_cpu = False


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The effective (d_out, d_in) weight of a quantized linear, in its compute dtype."""
    kind = quantized_format(module)
    if kind == "bnb4":
        import bitsandbytes.functional as bnb_f

        w = module.weight
        if getattr(w.quant_state, "packing_format_for_cpu", False):
            raise QuantizationError(
                "this Linear4bit was repacked into bitsandbytes' CPU inference layout (an eval pass with "
                "support_avx512bf16_for_cpu on); its weight can no longer be read back for training"
            )
        return bnb_f.dequantize_4bit(w.data, w.quant_state)
    if kind == "bnb8":
        import bitsandbytes.functional as bnb_f

        w = module.weight
        scb = w.SCB if getattr(w, "SCB", None) is not None else module.state.SCB
        return bnb_f.int8_vectorwise_dequant(w.data, scb)
    if kind == "torchao":
        return module.weight.dequantize()
    raise QuantizationError(f"{type(module).__name__} is not a bitsandbytes or torchao quantized linear")


@contextlib.contextmanager
def weights_as_quantized(model: nn.Module, names: list[str], config):
    """Inside the block, each named linear's weight holds deq(Q(W)) (config's format); W afterwards.

    For the gradient init on a quantized base (B0 = 0, so the base is Q(W) itself): the calibration
    gradient is then taken on the model that will actually train, not on the full-precision one.
    """
    from lamda_peft.layer import torch_layout_weight

    require_backend(config.quant_backend, config.quantize)
    saved, seen = {}, set()
    try:
        with torch.no_grad():
            for name in names:
                w = torch_layout_weight(model.get_submodule(name))
                if w.data_ptr() in seen:  # a weight two targets share (tied): quantized once, restored once
                    continue
                seen.add(w.data_ptr())
                q = quantize_linear(w, None, config.quantize, config.quant_backend, config.quant_blocksize)
                deq = dequantized_weight(q).to(w.dtype)
                saved[name] = w.detach().clone()
                w.copy_(deq)
        yield
    finally:
        with torch.no_grad():
            for name, original in saved.items():
                torch_layout_weight(model.get_submodule(name)).copy_(original)


def merged_dtype(module: nn.Module, dequantized: torch.Tensor) -> torch.dtype:
    """The dtype a merge gives the full-precision layer replacing a quantized one: the model's own.

    A 4-bit or torchao weight dequantizes to its original dtype, but bitsandbytes' int8 always to
    float32, which a bf16/fp16 model's activations could not multiply. So: the dtype `quantize_linear`
    recorded, else the bias's (an int8 layer of a model quantized elsewhere), else the dequantized one.
    """
    recorded = getattr(module, "lamda_compute_dtype", None)
    if recorded is not None:
        return recorded
    if quantized_format(module) == "bnb8" and getattr(module, "bias", None) is not None:
        return module.bias.dtype
    return dequantized.dtype


def quantize_linear(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    quantize: str,
    backend: str = "bitsandbytes",
    blocksize: int = 64,
) -> nn.Module:
    """A frozen quantized linear computing x Q(weight)^T + bias, on weight's device.

    Args:
        weight: (d_out, d_in) full-precision weight (its dtype is the compute dtype).
        bias: (d_out,) or None; kept in full precision.
        quantize: "nf4", "fp4" (bitsandbytes `Linear4bit`) or "int8" (`Linear8bitLt`, LLM.int8
            with outlier threshold 6, or torchao int8 weight-only).
        backend: "bitsandbytes" or "torchao".
        blocksize: 4-bit absmax block size.
    """
    require_backend(backend, quantize)
    d_out, d_in = weight.shape
    device, dtype = weight.device, weight.dtype
    w = weight.detach().contiguous().clone()
    if backend == "torchao":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        module = nn.Linear(d_in, d_out, bias=bias is not None, device="meta", dtype=dtype)
        module.weight = nn.Parameter(w, requires_grad=False)
        if bias is not None:
            module.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        quantize_(module, Int8WeightOnlyConfig())
        return module.requires_grad_(False)
    import bitsandbytes as bnb

    if quantize in ("nf4", "fp4"):
        module = bnb.nn.Linear4bit(
            d_in, d_out, bias=bias is not None, compute_dtype=dtype, quant_type=quantize, device="meta"
        )
        module.weight = bnb.nn.Params4bit(
            w, requires_grad=False, quant_type=quantize, blocksize=blocksize, compress_statistics=True
        )
    elif quantize == "int8":
        # LLM.int8 with transformers' default outlier threshold (load_in_8bit): activations are
        # rounded to int8 too at inference, except the outlier features above the threshold.
        module = bnb.nn.Linear8bitLt(d_in, d_out, bias=bias is not None, has_fp16_weights=False, threshold=6.0)
        # Int8Params quantizes only on a move *from the CPU* (bitsandbytes 0.50): a weight already on a
        # GPU would stay unquantized, with no scales. So it starts on the CPU and is quantized on the move.
        module.weight = bnb.nn.Int8Params(w.cpu(), requires_grad=False, has_fp16_weights=False)
    else:
        raise QuantizationError(f"quantize must be one of {list(QUANT_TYPES)}, got {quantize!r}")
    if bias is not None:
        module.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    module = module.to(device)  # bitsandbytes quantizes on this move
    module.lamda_compute_dtype = dtype  # what `merged_dtype` gives a merge (int8 dequantizes to float32)
    keep_trainable_layout(module)
    return module.requires_grad_(False)


def quantized_digest(module: nn.Module) -> str:
    """SHA-256 of a quantized linear's stored bytes: packed weight, scales, statistics, bias."""
    kind = quantized_format(module)
    h = hashlib.sha256(kind.encode() if kind else b"none")
    tensors: list[tuple[str, torch.Tensor]] = []
    w = module.weight
    if kind == "bnb4":
        tensors.append(("weight", w.data))
        tensors += sorted(w.quant_state.as_dict(packed=True).items())
    elif kind == "bnb8":
        tensors += [("weight", w.data), ("SCB", w.SCB if getattr(w, "SCB", None) is not None else module.state.SCB)]
    elif kind == "torchao":
        names, _ = w.__tensor_flatten__()
        tensors += [(n, getattr(w, n)) for n in names]
    else:
        raise QuantizationError(f"{type(module).__name__} is not a quantized linear")
    if module.bias is not None:
        tensors.append(("bias", module.bias))
    for name, t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# -- the adapted layer ----------------------------------------------------------------------------
class QuantizedLamdaLinear(LamdaLinear):
    """`LamdaLinear` over a frozen quantized base (bitsandbytes `Linear4bit`/`Linear8bitLt`, torchao).

    The adapter (A, B0, S0, dS, dB) stays in full precision; freezing, the schedule and saving are
    `LamdaLinear`'s. Only the forward's base term, merging and `disable_adapter` differ.

    Args:
        base_layer: the quantized linear (already holding Q(W_res), or a model's own quantized W).
        factors: A, B0, S0.
        scaling: alpha / r.
        delta_form: True for an already-quantized model: the adapter adds scaling*(B S - B0 S0) A x
            (0 at init); False for a quantized residual: it adds scaling * B S A x.
        dropout, freeze_order: as `LamdaLinear`.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        factors: SpectralFactors,
        scaling: float,
        delta_form: bool,
        dropout: float = 0.0,
        freeze_order: str = "largest_first",
    ) -> None:
        super().__init__(base_layer, factors, scaling, dropout=dropout, freeze_order=freeze_order, set_residual=False)
        self.delta_form = bool(delta_form)
        self.quant_format = quantized_format(base_layer)
        keep_trainable_layout(base_layer)

    def _adapter_matrix(self) -> torch.Tensor | None:
        """M (d_out, r) with adapter output = M A x; None when the adapter adds nothing."""
        if self.disabled:
            return None if self.delta_form else self.scaling * (self.B0 @ self.S0)
        if self.delta_form:  # B S - B0 S0 = dB S + B0 dS, without the cancellation of two large terms
            return self.scaling * (self.dB @ self.S + self.B0 @ self.dS)
        return self.scaling * (self.B @ self.S)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        keep_trainable_layout(self.base_layer)  # a user may have switched it back on
        result = self.base_layer(x, *args, **kwargs)  # x Q^T (+ bias)
        M = self._adapter_matrix()
        if M is None:
            return result
        h = F.linear(self.dropout(x), self.A.to(x.dtype))  # (..., r): all the adapter saves for backward
        return result + F.linear(h, M.to(x.dtype)).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """What the adapter adds to the quantized base weight, torch layout (d_out, d_in)."""
        M = self._adapter_matrix()
        return torch.zeros(self.d_out, self.d_in, dtype=self.A.dtype, device=self.A.device) if M is None else M @ self.A

    def merge(self) -> None:
        """Replace the quantized base by a full-precision `nn.Linear` holding deq(Q) + delta.

        A 4-bit weight cannot absorb a full-precision update without a new rounding, so merging
        de-quantizes (memory of a full-precision layer). `unmerge` puts the very same quantized
        module back, bitwise.
        """
        if not self._should_merge():
            return
        q = self.base_layer
        with torch.no_grad():
            w_q = dequantized_weight(q)
            dtype = merged_dtype(q, w_q)
            merged = (w_q.float() + self.delta_weight().float().to(w_q.device)).to(dtype)
            dense = nn.Linear(self.d_in, self.d_out, bias=q.bias is not None, device="meta", dtype=dtype)
            dense.weight = nn.Parameter(merged, requires_grad=False)
            if q.bias is not None:
                dense.bias = nn.Parameter(q.bias.detach().clone().to(dtype), requires_grad=False)
        object.__setattr__(self, "_quantized_base", q)  # unregistered: not in state_dict while merged
        self.base_layer = dense
        self.merged = True

    def _apply(self, fn, recurse=True):
        # `.to(device)`, `.cuda()`, `.half()` while merged reach the quantized base kept aside for
        # `unmerge`, which is not a registered submodule then (so that it stays out of the state dict)
        stashed = self.__dict__.get("_quantized_base")
        if stashed is not None:
            stashed._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def unmerge(self) -> None:
        """Put the quantized base back (bitwise the one before `merge`)."""
        if not self.merged:
            return
        self.base_layer = self.__dict__.pop("_quantized_base")
        self.merged = False

    def extra_repr(self) -> str:
        form = "delta" if self.delta_form else "residual"
        return f"{super().extra_repr()}, quant={self.quant_format}, form={form}"


# -- building the quantized layers of a model -----------------------------------------------------
def uses_quantization(model: nn.Module, targets: list[str], config) -> bool:
    """Does this model/config need `QuantizedLamdaLinear`s (quantize asked, or quantized targets)?"""
    return config.quantize is not None or any(quantized_format(model.get_submodule(n)) for n in targets)


def _residual_with_loftq(weight, bias, r, scaling, config, factors=None):
    """(factors, Q(W_res) module) for one full-precision weight; `factors` given => no SVD, no loop."""
    from lamda_peft.model import initial_factors

    def build(f):
        w_res = residual_weight(weight, f.A, f.B0, f.S0, scaling)
        return quantize_linear(w_res, bias, config.quantize, config.quant_backend, config.quant_blocksize)

    if factors is not None:
        return factors, build(factors)
    factors = initial_factors(weight, r, config)
    q = build(factors)
    for _ in range(config.loftq_iters):
        # LoftQ: the low-rank part is the best rank-r fit of what quantization left out.
        error = weight.detach().float() - dequantized_weight(q).float()
        factors = initial_factors(error / scaling, r, config)
        q = build(factors)
    return factors, q


def check_quantizable(model: nn.Module, targets: list[str], config) -> None:
    """Raise `QuantizationError` naming the first target that this config cannot quantize or adapt.

    Also run by the calibrated inits before their calibration pass, so that a bad target is named
    before minutes of forward and backward passes, not after.
    """
    for name in targets:
        module = model.get_submodule(name)
        kind = quantized_format(module)
        if kind is not None and config.quantize is not None:
            raise QuantizationError(
                f"module {name!r} is already quantized ({type(module).__name__}); leave quantize=None to adapt "
                "an already-quantized model"
            )
        if kind is None and config.quantize is None:
            raise QuantizationError(
                f"module {name!r} is a full-precision {type(module).__name__} in a model whose other targets are "
                "quantized; pass quantize=... to quantize it too, or exclude it from target_modules"
            )
        if kind is None and (is_conv1d(module) or type(module) is not nn.Linear):
            raise QuantizationError(
                f"module {name!r} is a {type(module).__name__}: quantize supports plain nn.Linear layers only"
            )
        if kind is None and module.weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise QuantizationError(
                f"module {name!r} has a {module.weight.dtype} weight: quantize needs float32, bfloat16 or float16"
            )
        if kind is not None:
            require_backend("torchao" if kind == "torchao" else "bitsandbytes")


def build_quantized_layers(
    model: nn.Module,
    targets: list[str],
    config,
    factors: dict[str, SpectralFactors] | None = None,
    reload: bool = False,
) -> dict[str, QuantizedLamdaLinear]:
    """A `QuantizedLamdaLinear` for every target, without modifying the model.

    Fresh build (`reload` False): factors from the SVD (and LoftQ), or the given calibrated ones
    (init "activation" / "gradient"); digests written into `config.quantized_residual_sha256`.
    Reload (`reload` True, `factors` from the saved adapter): the quantized bases are rebuilt from
    the saved factors and must match the config's digests bitwise.

    Raises:
        QuantizationError: a target cannot be quantized (HF Conv1D, a float64 weight), or quantize
            is asked for on an already-quantized model.
        AdapterLoadError: a rebuilt quantized base differs from the one the adapter was saved with.
    """
    from lamda_peft.checkpoint import AdapterLoadError
    from lamda_peft.model import initial_factors

    check_quantizable(model, targets, config)  # every check first: an error leaves the model as it was
    parts, digests = {}, {}
    for name in targets:
        module = model.get_submodule(name)
        r = config.rank_for(name)
        scaling = config.alpha_for(name) / r
        given = None
        if factors is not None:
            device = module.weight.device
            given = SpectralFactors(*(t.to(device) for t in factors[name]))
        if quantized_format(module) is None:
            f, q = _residual_with_loftq(module.weight, module.bias, r, scaling, config, given)
            delta_form = False
        else:
            q, delta_form = module, True
            f = given if given is not None else initial_factors(dequantized_weight(module).float(), r, config)
        digests[name] = quantized_digest(q)
        if reload:
            expected = config.quantized_residual_sha256.get(name)
            if expected is None:
                raise AdapterLoadError(f"module {name!r}: the adapter config has no quantized_residual_sha256 entry")
            if digests[name] != expected:
                raise AdapterLoadError(
                    f"module {name!r}: the quantized base rebuilt here differs from the one this adapter was trained "
                    "against (SHA-256 mismatch): a different base model, or a different quantization library build"
                )
        parts[name] = (q, f, scaling, delta_form)
    # Every digest checked: only now are the model's own modules touched (a delta-form layer
    # freezes and re-flags the quantized module it wraps)
    layers = {
        name: QuantizedLamdaLinear(
            q, f, scaling, delta_form=delta, dropout=config.dropout, freeze_order=config.freeze_order
        )
        for name, (q, f, scaling, delta) in parts.items()
    }
    if not reload:
        config.quantized_residual_sha256 = digests
    return layers


def quantize_model_linears(model: nn.Module, names: list[str], quantize: str, blocksize: int = 64) -> nn.Module:
    """Replace `names` (plain nn.Linear) by bitsandbytes-quantized copies of W (QLoRA's base).

    For the PEFT QLoRA baseline: sets `is_loaded_in_4bit` / `is_loaded_in_8bit` on the model, the
    flags by which PEFT's LoRA picks its bitsandbytes layers.
    """
    from lamda_peft.model import _set_submodule

    quantized = {}
    for name in names:
        module = model.get_submodule(name)
        if type(module) is not nn.Linear:
            raise QuantizationError(f"module {name!r} is a {type(module).__name__}: only nn.Linear can be quantized")
        quantized[name] = quantize_linear(module.weight, module.bias, quantize, "bitsandbytes", blocksize)
    for name, q in quantized.items():
        _set_submodule(model, name, q)
    if quantize == "int8":
        model.is_loaded_in_8bit = True
    else:
        model.is_loaded_in_4bit = True
    return model


def weight_error(weight: torch.Tensor, effective: torch.Tensor) -> float:
    """||W - W_eff||_F / ||W||_F in float64."""
    w = weight.detach().double()
    return float((w - effective.detach().double()).norm() / w.norm())
