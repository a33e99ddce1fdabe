"""LaMDA as a PEFT tuner layer: `LamdaPeftLinear` holds any number of named LaMDA adapters.

Under PEFT the wrapped layer keeps the *original* weight W (several adapters, `disable_adapter` and
`unload` all need it untouched), and each adapter adds its offset from the spectral initialisation:

    y = x W^T + scaling * (B S - B0 S0) A x,        B = B0 + dB,  S = S0 + dS

This is the same function as `LamdaLinear`'s `x W_res^T + scaling * B S A x` with
`W_res = W - scaling * B0 S0 A`: at step 0 the offset is exactly zero, A is frozen, and the only
activations kept for backward are r wide (`A x`). Gradients of dS and dB are the same; only the
float rounding differs (here it is never worse: W itself is not rounded into a residual).

| tensor (per adapter) | shape     | kind      | as in `LamdaLinear`                                   |
|----------------------|-----------|-----------|-------------------------------------------------------|
| A, B0, S0            | r x d_in, d_out x r, r x r | buffers | the spectral factors, saved so a reload is bitwise |
| dS, dB               | r x r, d_out x r | Parameters | S trains throughout; B freezes column by column |
| frozen, step         | (r,) bool, () int64 | buffers | the freeze mask and the optimizer-step counter   |

The freezing mechanics (gradient mask, bitwise pinning, release of a fully frozen B) are
`LamdaLinear`'s own methods, shared rather than copied, so both front ends freeze identically and
`FreezeSchedule` drives a `LamdaAdapter` exactly as it drives a `LamdaLinear`.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from lamda_peft.layer import LamdaLinear, delta_weight, is_conv1d, linear_shape
from lamda_peft.spectral import SpectralFactors


class LamdaAdapter(nn.Module):
    """One named LaMDA adapter of a `LamdaPeftLinear`: its factors, trainable deltas and freeze state.

    Args:
        factors: A (r, d_in), B0 (d_out, r), S0 (r, r) from `spectral_factors` (or zeros, to be loaded).
        scaling: alpha / r.
        freeze_order: "largest_first" or "smallest_first".
        freeze_fraction: B is fully frozen after ceil(freeze_fraction * T) optimizer steps (read by
            `attach_optimizer`, which builds the schedule).
    """

    def __init__(self, factors: SpectralFactors, scaling: float, freeze_order: str, freeze_fraction: float) -> None:
        super().__init__()
        self.r, self.d_in = factors.A.shape
        self.d_out = factors.B0.shape[0]
        self.scaling = float(scaling)
        self.freeze_order = freeze_order
        self.freeze_fraction = float(freeze_fraction)
        self.scheduled = False  # set by attach_optimizer; training without it warns (once)
        self._warned_unscheduled = False
        r, dtype = self.r, factors.A.dtype
        self.register_buffer("A", factors.A.detach().clone())
        self.register_buffer("B0", factors.B0.detach().clone())
        self.register_buffer("S0", factors.S0.detach().clone())
        self.dS = nn.Parameter(torch.zeros(r, r, dtype=dtype, device=factors.A.device))
        self.dB = nn.Parameter(torch.zeros(self.d_out, r, dtype=dtype, device=factors.A.device))
        self.register_buffer("frozen", torch.zeros(r, dtype=torch.bool, device=factors.A.device))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64, device=factors.A.device))
        self.register_buffer("_dB_pinned", torch.zeros_like(self.dB), persistent=False)
        self._ensure_grad_mask()
        # PeftModel.from_pretrained and load_adapter go through load_state_dict: re-pin the frozen
        # columns at their loaded values (and re-hook dB if the load assigned a new Parameter).
        self.register_load_state_dict_post_hook(lambda module, _incompatible: module._after_load())

    # -- shared with LamdaLinear (same attribute names, same semantics) ------------------------
    B = LamdaLinear.B
    S = LamdaLinear.S
    n_frozen = LamdaLinear.n_frozen
    _key = staticmethod(LamdaLinear._key)
    _derived = LamdaLinear._derived
    _remember = LamdaLinear._remember
    _frozen_on_host = LamdaLinear._frozen_on_host
    host_frozen = LamdaLinear.host_frozen
    host_step = LamdaLinear.host_step
    advance_step = LamdaLinear.advance_step
    _mask_frozen_grad = LamdaLinear._mask_frozen_grad
    freeze_columns = LamdaLinear.freeze_columns
    restore_frozen = LamdaLinear.restore_frozen
    sync_frozen_state = LamdaLinear.sync_frozen_state
    trainable_count = LamdaLinear.trainable_count

    def _ensure_grad_mask(self) -> None:
        if not getattr(self.dB, "_lamda_grad_mask", False):
            self.dB.register_hook(self._mask_frozen_grad)
            self.dB._lamda_grad_mask = True

    def _after_load(self) -> None:
        self._ensure_grad_mask()
        trainable = self.dS.requires_grad  # an inference-mode load keeps everything frozen
        self.sync_frozen_state()
        self.dB.requires_grad_(trainable and not bool(self.host_frozen().all()))

    def respect_freeze(self) -> None:
        """After PEFT toggled requires_grad on the whole adapter: a fully frozen B stays frozen."""
        if bool(self.host_frozen().all()):
            self.dB.requires_grad_(False)

    # -- the maths -----------------------------------------------------------------------------
    def offset(self) -> torch.Tensor:
        """scaling * (B S - B0 S0), (d_out, r): the adapter path after A."""
        return self.scaling * (self.B @ self.S - self.B0 @ self.S0)

    def delta_weight(self) -> torch.Tensor:
        """The change to the original weight, torch layout (d_out, d_in):

        dW = scaling * (B S - B0 S0) A = delta_weight(A, B, S) - delta_weight(A, B0, S0).
        """
        return delta_weight(self.A, self.B, self.S, self.scaling) - delta_weight(self.A, self.B0, self.S0, self.scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.A.to(x.dtype))  # (..., r): the only activation kept for backward (A is a buffer)
        return F.linear(h, self.offset().to(x.dtype))  # (..., d_out)

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, r={self.r}, scaling={self.scaling:g}, frozen={self.n_frozen}/{self.r}"


class LamdaPeftLinear(nn.Module, BaseTunerLayer):
    """A PEFT tuner layer around an `nn.Linear` or HF `Conv1D`, with one `LamdaAdapter` per adapter name.

    Args:
        base_layer: the layer to adapt (its weight is left as it is).
        adapter_name: name of the first adapter.
        **adapter_kwargs: `update_layer`'s arguments for that adapter.
    """

    # PEFT toggles requires_grad on these per adapter name and deletes them with the adapter.
    adapter_layer_names: tuple[str, ...] = ("lamda_adapter",)
    other_param_names: tuple[str, ...] = ("lamda_dropout",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, **adapter_kwargs: Any) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lamda_adapter = nn.ModuleDict()
        self.lamda_dropout = nn.ModuleDict()
        self.merged_adapters: list[str] = []
        self._disable_adapters = False
        self.kwargs: dict[str, Any] = {}
        self.out_features, self.in_features = linear_shape(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)  # Conv1D stores its weight as (d_in, d_out)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, **adapter_kwargs)

    def update_layer(
        self,
        adapter_name: str,
        factors: SpectralFactors,
        scaling: float,
        dropout: float = 0.0,
        freeze_order: str = "largest_first",
        freeze_fraction: float = 0.3,
    ) -> None:
        """Add (or replace) the adapter `adapter_name` and make it the active one, as PEFT's layers do."""
        self.lamda_adapter[adapter_name] = LamdaAdapter(factors, scaling, freeze_order, freeze_fraction)
        self.lamda_dropout[adapter_name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    # -- PEFT's requires_grad toggles must not thaw a fully frozen B ----------------------------
    def _respect_freeze(self) -> None:
        for adapter in self.lamda_adapter.values():
            adapter.respect_freeze()

    def set_adapter(self, adapter_names: str | list[str], *args: Any, **kwargs: Any) -> None:
        super().set_adapter(adapter_names, *args, **kwargs)
        self._respect_freeze()

    def set_requires_grad(self, adapter_names: Any, requires_grad: bool = True) -> None:
        super().set_requires_grad(adapter_names, requires_grad)
        self._respect_freeze()

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        # Device only: PEFT's default would also cast A, B0, S0 to a half-precision base's dtype.
        weight = self.get_base_layer().weight
        target = device if device is not None else weight.device
        if adapter_name in self.lamda_adapter and target.type != "meta":
            self.lamda_adapter[adapter_name].to(target)

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)  # x W^T (+ bias)
        if self.merged:
            return result
        for name in self.active_adapters:
            if name not in self.lamda_adapter:
                continue
            adapter = self.lamda_adapter[name]
            if self.training and torch.is_grad_enabled() and adapter.dB.requires_grad and not adapter.scheduled:
                if not adapter._warned_unscheduled:
                    adapter._warned_unscheduled = True
                    warnings.warn(
                        f"LaMDA adapter {name!r} is training without a freezing schedule: B will never freeze. "
                        "Call lamda_peft.attach_optimizer(model, optimizer, total_steps=T) once the optimizer exists.",
                        RuntimeWarning,
                        stacklevel=2,
                    )
            result = result + adapter(self.lamda_dropout[name](x)).to(result.dtype)
        return result

    # -- merge / unmerge -----------------------------------------------------------------------
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The adapter's weight change in the base layer's own layout (transposed for `Conv1D`), float32+."""
        delta = self.lamda_adapter[adapter_name].delta_weight()  # (d_out, d_in)
        return delta.T if self.fan_in_fan_out else delta

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold the given (default: active) adapters into the base weight; merged ones are skipped."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        weight = self.get_base_layer().weight
        for name in adapter_names:
            if name not in self.lamda_adapter:
                continue
            merged = (weight.float() + self.get_delta_weight(name).float()).to(weight.dtype)
            if safe_merge and not bool(torch.isfinite(merged).all()):
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            weight.data.copy_(merged)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Take every merged adapter back out of the base weight (to float rounding)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.lamda_adapter:
                weight.data.copy_((weight.float() - self.get_delta_weight(name).float()).to(weight.dtype))

    def __repr__(self) -> str:
        return "lamda." + super().__repr__()
