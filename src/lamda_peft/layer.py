"""The adapted layer: `LamdaLinear`, a frozen linear plus LaMDA's low-dimensional path.

    y = x W_res^T + scaling * B S A x,     B = B0 + dB,  S = S0 + dS          (SPEC.md section 1)

| tensor | shape       | kind      | why                                                         |
|--------|-------------|-----------|-------------------------------------------------------------|
| A      | r x d_in    | buffer    | PMA, frozen from the start                                  |
| B0, S0 | d_out x r, r x r | buffers | the spectral init; weight decay on dB/dS pulls B, S back to them, not to 0 |
| dS     | r x r       | Parameter | LDA: trainable for the whole run                            |
| dB     | d_out x r   | Parameter | PMB: trainable early, frozen column by column (the schedule) |
| frozen | r (bool)    | buffer    | which columns of B are frozen                               |
| step   | () int64    | buffer    | optimizer steps taken, so resumption restores the schedule  |

Frozen columns of dB are made immovable, not merely gradient-free: their gradient is masked
(so clipping norms and DDP all-reduces see zero) and, after every optimizer step, their values
are restored bit for bit from a snapshot (AdamW's momentum and weight decay cannot move them).
Once every column is frozen, dB stops requiring grad and leaves the optimizer (its state freed).
Over a plain `nn.Linear` the forward is one fused autograd Function (fused.py) that saves only the
r-wide `A x` (and the r x r S) for backward; other bases (HF `Conv1D`, subclasses such as quantized linears, dropout
on the adapter input, extra forward arguments) take the unfused path below, which computes the
same function with autograd.

The base weight is stored as W_res in the wrapped layer itself (`nn.Linear` or HF `Conv1D`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lamda_peft.fused import compute_dtype, fused_lamda_linear
from lamda_peft.spectral import SpectralFactors, residual_weight


def delta_weight(A: torch.Tensor, B: torch.Tensor, S: torch.Tensor, scaling: float) -> torch.Tensor:
    """The adapter's weight update in torch layout: scaling * B @ S @ A, shape (d_out, d_in)."""
    return scaling * (B @ (S @ A))  # (d_out, r) @ ((r, r) @ (r, d_in))


def advance_steps(layers) -> None:
    """step += 1 in every layer (LaMDA layers or PEFT adapters), on the device and in the host copies.

    One multi-tensor add per device for all of them: a 7B model has hundreds of layers, and one
    kernel each would cost the host a launch per layer per step.
    """
    by_device: dict[torch.device, list] = {}
    for layer in dict.fromkeys(layers):  # a layer listed twice still counts one step
        by_device.setdefault(layer.step.device, []).append(layer)
    for group in by_device.values():
        counts = [layer.host_step() + 1 for layer in group]
        torch._foreach_add_([layer.step for layer in group], 1)
        for layer, count in zip(group, counts, strict=True):
            layer._remember("step", (layer.step,), count)


def is_conv1d(module: nn.Module) -> bool:
    """True for Hugging Face's GPT-2 style `Conv1D` (weight stored as d_in x d_out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of an `nn.Linear` or HF `Conv1D`."""
    w = module.weight
    if is_conv1d(module):
        return (w.shape[1], w.shape[0])
    # A 4-bit linear stores its weight packed (n/2 x 1): its features say the logical shape.
    return (module.out_features, module.in_features) if hasattr(module, "out_features") else (w.shape[0], w.shape[1])


def torch_layout_weight(module: nn.Module) -> torch.Tensor:
    """The module's weight as a (d_out, d_in) tensor (a transposed view for `Conv1D`)."""
    return module.weight.T if is_conv1d(module) else module.weight


class LamdaLinear(nn.Module):
    """A LaMDA adapter around a frozen `nn.Linear` or HF `Conv1D`.

    Args:
        base_layer: the layer to adapt; its weight is replaced in place by W_res.
        factors: A, B0, S0 from `spectral_factors` (or from a saved adapter).
        scaling: alpha / r.
        dropout: dropout probability on the adapter input (0 keeps only r-wide activations).
        freeze_order: "largest_first" or "smallest_first" (column 0 = largest singular value).
        set_residual: False when the base already holds W_res (never recompute it twice).
    """

    def __init__(
        self,
        base_layer: nn.Module,
        factors: SpectralFactors,
        scaling: float,
        dropout: float = 0.0,
        freeze_order: str = "largest_first",
        set_residual: bool = True,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        base_layer.requires_grad_(False)  # W_res is frozen by definition: x is then not saved for its grad
        self.d_out, self.d_in = linear_shape(base_layer)
        self.r = factors.A.shape[0]
        self.scaling = float(scaling)
        self.freeze_order = freeze_order
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False
        r, dtype = self.r, factors.A.dtype
        # Everything lives where the base weight lives (factors may come from a CPU SVD or file).
        device = base_layer.weight.device
        self.register_buffer("A", factors.A.detach().to(device, copy=True))
        self.register_buffer("B0", factors.B0.detach().to(device, copy=True))
        self.register_buffer("S0", factors.S0.detach().to(device, copy=True))
        self.dS = nn.Parameter(torch.zeros(r, r, dtype=dtype, device=device))
        self.dB = nn.Parameter(torch.zeros(self.d_out, r, dtype=dtype, device=device))
        self.register_buffer("frozen", torch.zeros(r, dtype=torch.bool, device=device))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64, device=device))
        # Values the frozen columns are pinned to; rebuilt from dB whenever `frozen` changes.
        self.register_buffer("_dB_pinned", torch.zeros(self.d_out, r, dtype=dtype, device=device), persistent=False)
        self.dB.register_hook(self._mask_frozen_grad)
        # Any load_state_dict (ours, the Trainer's resume) re-pins frozen columns at their loaded values.
        self.register_load_state_dict_post_hook(lambda module, _incompatible: module.sync_frozen_state())
        if set_residual:
            with torch.no_grad():
                w = torch_layout_weight(base_layer)
                w_res = residual_weight(w, self.A, self.B0, self.S0, self.scaling)
                self._write_base(w_res)

    # -- the maths, once ---------------------------------------------------------------------
    @property
    def B(self) -> torch.Tensor:
        """Current PMB, (d_out, r)."""
        return self.B0 + self.dB

    @property
    def S(self) -> torch.Tensor:
        """Current LDA core, (r, r)."""
        return self.S0 + self.dS

    def delta_weight(self) -> torch.Tensor:
        """scaling * B S A in torch layout (d_out, d_in)."""
        return delta_weight(self.A, self.B, self.S, self.scaling)

    # False sends every forward through the unfused path (benchmarks compare the two).
    fused: bool = True

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.fused and not (args or kwargs or self.merged or self.disabled):
            base = self.base_layer
            if self._fusable(base):
                dtype = compute_dtype(x)
                A, B0, dB, S0 = self._frozen_operands(dtype)
                return fused_lamda_linear(x, base.weight, base.bias, A, B0, dB, S0, self.dS, self.scaling, dtype)
        result = self.base_layer(x, *args, **kwargs)  # x W_res^T (+ bias)
        if self.merged:
            return result
        # M = scaling * B S: (d_out, r). One r-wide intermediate h = A x is all that is saved
        # for backward (A is a buffer, so x itself is not kept).
        if self.disabled:  # W_res + scaling * B0 S0 A is the original weight: the base model's output
            M = self.scaling * (self.B0 @ self.S0)
        else:
            M = self.scaling * (self.B @ self.S)
        h = F.linear(self.dropout(x), self.A.to(x.dtype))  # (..., r)
        return result + F.linear(h, M.to(x.dtype)).to(result.dtype)  # (..., d_out)

    def _frozen_operands(self, dtype: torch.dtype) -> tuple:
        """A, B0, dB, S0 for the fused Function; in mixed precision, the frozen ones cast once.

        With float32 adapters and a bf16/fp16 compute dtype, casting A, B0, dB and S0 on every
        forward costs four kernels per layer (hundreds per step on a 7B model, where a step is
        bound by kernel launches). Frozen tensors are cast once and cached: A, B0 and S0, and
        B = B0 + dB (passed as B0, with dB None) once the schedule has frozen all of it. A cache
        entry is keyed by its sources' version counters and storages, so any write to them
        (load_state_dict, `.to()`, a merge) rebuilds it. In float32 nothing is cached: the
        Function then saves the layer's own tensors and no copy exists.
        """
        A, B0, dB, S0 = self.A, self.B0, self.dB, self.S0
        if dtype == A.dtype:
            return A, B0, dB, S0
        b_trains = dB.requires_grad
        # One cache entry for all of them (the host cost of a lookup counts: it runs every forward).
        sources = (A, S0, B0, dB) if not b_trains else (A, S0, B0)

        def cast() -> tuple:
            with torch.no_grad():
                return A.to(dtype), S0.to(dtype), (B0 if b_trains else B0 + dB).to(dtype)

        # Under inference mode the cast is an inference tensor, which a later backward could not save.
        A_c, S0_c, B_c = self._derived(
            "cast", sources, cast, tag=(dtype, b_trains), keep=not torch.is_inference_mode_enabled()
        )
        return A_c, B_c, (dB if b_trains else None), S0_c

    def _fusable(self, base: nn.Module) -> bool:
        # Exactly nn.Linear (a subclass may quantize its weight), a frozen base (the Function
        # returns no weight gradient; a recursive model's shared weights do train), no hooks on it
        # that calling its weight directly would skip (accelerate's offload, user hooks) and no
        # adapter dropout.
        return (
            type(base) is nn.Linear
            and not base.weight.requires_grad
            and (base.bias is None or not base.bias.requires_grad)
            and not (base._forward_hooks or base._forward_pre_hooks)
            and isinstance(self.dropout, nn.Identity)
        )

    # -- freezing ----------------------------------------------------------------------------
    def _mask_frozen_grad(self, grad: torch.Tensor) -> torch.Tensor:
        if self.n_frozen == 0:
            return grad
        return grad.masked_fill(self.frozen[None, :], 0.0)

    # -- values derived from the layer's tensors, kept until those tensors are written -----------
    # The schedule consults `frozen` and `step` after every optimizer step and the gradient mask
    # in every backward; reading a GPU tensor's value stalls the host until the device catches up
    # (four such syncs per layer per step: hundreds on a 7B model). So the host keeps a copy of
    # each, as it keeps the mixed-precision casts: keyed by each source's version counter and
    # storage. Any write that bypasses the schedule (load_state_dict, a DDP buffer broadcast,
    # `.to(device)`) changes the key and forces one recomputation, so a value can never go stale.
    @staticmethod
    def _key(t: torch.Tensor) -> tuple | None:
        try:
            return (t._version, t.data_ptr(), t.device)
        except RuntimeError:  # an inference-mode tensor keeps no version counter: always recompute
            return None

    def _derived(self, slot: str, sources: tuple, compute, tag=None, keep: bool = True):
        """compute(), cached in `slot` while `tag` and every source's version and storage are unchanged."""
        key = (tag, *map(self._key, sources))
        table = self.__dict__.get("_derived_cache")
        if table is None:
            table = self.__dict__["_derived_cache"] = {}
        hit = table.get(slot)
        if hit is not None and hit[0] == key and None not in key[1:]:
            return hit[1]
        value = compute()
        if keep:
            table[slot] = (key, value)
        return value

    def _remember(self, slot: str, sources: tuple, value) -> None:
        """After the layer's own write to `sources`: `value` is what `slot` holds for them now."""
        self.__dict__.setdefault("_derived_cache", {})[slot] = ((None, *(self._key(t) for t in sources)), value)

    def _frozen_on_host(self) -> tuple[torch.Tensor, int]:
        """(`frozen` as a CPU bool tensor (r,), its count), read from the device only when it changed."""

        def read() -> tuple[torch.Tensor, int]:
            mask = self.frozen.detach().cpu()
            return mask, int(mask.sum())

        return self._derived("frozen", (self.frozen,), read)

    def host_frozen(self) -> torch.Tensor:
        """`frozen` as a CPU bool tensor (r,), read from the device only when it changed."""
        return self._frozen_on_host()[0]

    def host_step(self) -> int:
        """`step` as a Python int, read from the device only when it changed."""
        return self._derived("step", (self.step,), lambda: int(self.step))

    def advance_step(self) -> None:
        """step += 1, on the device and in the host copy (no sync). See also `advance_steps`."""
        advance_steps([self])

    @property
    def n_frozen(self) -> int:
        return self._frozen_on_host()[1]

    def freeze_columns(self, count: int) -> None:
        """Freeze the first `count` columns of B in this layer's freeze order (never unfreezes)."""
        current, n = self._frozen_on_host()
        if min(int(count), self.r) <= n:
            return  # nothing new is due (most steps): the schedule asks every layer after every step
        order = torch.arange(self.r)
        if self.freeze_order != "largest_first":
            order = order.flip(0)
        new = current.clone()  # columns frozen already stay frozen, whatever their position
        new[order[:count]] = True
        count = int(new.sum())
        with torch.no_grad():
            # Columns frozen earlier keep their pinned values; newly frozen ones pin their current ones.
            self._dB_pinned.copy_(torch.where(self.frozen[None, :], self._dB_pinned, self.dB))
            self.frozen.copy_(new)
        self._remember("frozen", (self.frozen,), (new, count))
        if count == self.r:
            self.dB.requires_grad_(False)
            self.dB.grad = None

    def restore_frozen(self) -> None:
        """Undo whatever an optimizer step did to frozen columns (bitwise).

        Nothing to undo once all of B is frozen: dB then has no gradient and left the optimizer.
        """
        if self.n_frozen and self.dB.requires_grad:
            with torch.no_grad():
                self.dB.copy_(torch.where(self.frozen[None, :], self._dB_pinned, self.dB))

    def sync_frozen_state(self) -> None:
        """After loading `frozen` and `dB` from a checkpoint: pin the frozen columns at their loaded values."""
        with torch.no_grad():
            self._dB_pinned.copy_(self.dB)
        self.dB.requires_grad_(not bool(self.host_frozen().all()))

    def trainable_count(self) -> int:
        """r*r + d_out * (unfrozen columns of B): this layer's trainable parameters right now."""
        return self.r * self.r + self.d_out * (self.r - self.n_frozen)

    # -- merge / unmerge ---------------------------------------------------------------------
    def _write_base(self, w_torch_layout: torch.Tensor) -> None:
        w = self.base_layer.weight
        w.data.copy_(w_torch_layout.T if is_conv1d(self.base_layer) else w_torch_layout)

    def _should_merge(self) -> bool:
        """False for a merged layer (merging again is a no-op); refuses a merge inside disable_adapter()."""
        if self.merged:
            return False
        if self.disabled:  # disable_adapter() refuses a merged model; merging inside it would be its mirror
            raise RuntimeError("merge() inside disable_adapter(): leave the block first")
        return True

    def merge(self) -> None:
        """Fold scaling*B S A into the base weight. Merging a merged layer is a no-op."""
        if not self._should_merge():
            return
        with torch.no_grad():
            w = torch_layout_weight(self.base_layer)
            acc = torch.promote_types(w.dtype, torch.float32)  # float64 stays float64, half precision sums in float32
            self._write_base((w.to(acc) + self.delta_weight().to(acc)).to(w.dtype))
        self.merged = True

    def unmerge(self) -> None:
        """Take the adapter back out of the base weight. Unmerging an unmerged layer is a no-op."""
        if not self.merged:
            return
        with torch.no_grad():
            w = torch_layout_weight(self.base_layer)
            acc = torch.promote_types(w.dtype, torch.float32)
            self._write_base((w.to(acc) - self.delta_weight().to(acc)).to(w.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, r={self.r}, scaling={self.scaling:g}, frozen={self.n_frozen}/{self.r}"
