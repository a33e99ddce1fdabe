"""The fused LaMDA linear: base GEMM and adapter path in one autograd Function.

`LamdaLinear.forward` (layer.py) uses this for plain `nn.Linear` bases. It computes the same
function as the layer's unfused path,

    y = x W_res^T + b + s * (x A^T) S^T B^T,      B = B0 + dB,  S = S0 + dS        (SPEC.md section 1)

but saves only what backward cannot get back cheaply, and adds the adapter's output and input
gradient into the base GEMM's result in place:

    forward                                             saved for backward
    h  = x A^T                  (N, r)                  h (the only activation, r wide)
    S  = S0 + dS                (r, r)                  S (r x r: nothing to recompute later)
    y  = x W_res^T + b          (N, d_out)              W_res, A, B0, dB: the layer's own
    y += s * (h S^T) B^T        (addmm_, no extra pass)   tensors, no new storage

    backward
    gg = dy B                   (N, r)
    dS = s * gg^T h             (r, r)                  s applied inside the GEMM (addmm alpha)
    dB = s * dy^T (h S^T)       (d_out, r)              only while some column of B trains
    dx = dy W_res + s (gg S) A  (N, d_in)               the adapter's part accumulated in place (alpha)

The unfused path instead builds M = s * B S with autograd each forward, so backward keeps B and M
(two new d_out x r storages per layer) besides h, and adds the adapter's output and input
gradient with separate elementwise passes over (N, d_out) and (N, d_in) tensors. Measured in
benchmarks/step_memory.py (the `*_unfused` rows).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


class LamdaLinearFunction(torch.autograd.Function):
    """y = x W^T + b + s * (x A^T) (S0 + dS)^T (B0 + dB)^T; see the module docstring for the maths."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B0, dB, S0, dS, scaling: float):  # noqa: N803 (the paper's names)
        d_out, d_in = weight.shape
        x2 = x.reshape(-1, d_in)  # (N, d_in)
        y = x2 @ weight.t() if bias is None else torch.addmm(bias, x2, weight.t())  # (N, d_out)
        h = x2 @ A.t()  # (N, r)
        B = B0 if dB is None else B0 + dB  # (d_out, r): recomputed in backward, never saved
        S = S0 + dS  # (r, r)
        y.addmm_(h @ S.t(), B.t(), alpha=scaling)  # y += s * (h S^T) B^T
        ctx.save_for_backward(h, weight, A, B0, dB, S)
        ctx.scaling = scaling
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], d_out)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        h, weight, A, B0, dB, S = ctx.saved_tensors
        s = ctx.scaling
        needs_x, _, needs_bias, _, _, needs_dB, _, needs_dS, _ = ctx.needs_input_grad
        dy2 = dy.reshape(-1, weight.shape[0])  # (N, d_out)
        B = B0 if dB is None else B0 + dB  # (d_out, r)
        gg = dy2 @ B  # (N, r); the scale s goes on the smaller results below
        # s applied inside the GEMM (addmm's alpha; beta=0 ignores its first operand): one kernel, not two
        grad_dS = torch.addmm(S, gg.t(), h, beta=0, alpha=s) if needs_dS else None  # (r, r)
        grad_dB = torch.addmm(B, dy2.t(), h @ S.t(), beta=0, alpha=s) if needs_dB else None  # (d_out, r)
        grad_x = None
        if needs_x:
            grad_x = dy2 @ weight  # (N, d_in)
            grad_x.addmm_(gg @ S, A, alpha=s)  # += s (gg S) A
            grad_x = grad_x.view(ctx.x_shape)
        grad_bias = dy2.sum(0) if needs_bias else None
        return grad_x, None, grad_bias, None, None, grad_dB, None, grad_dS, None


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear on `x` computes in: autocast's when it is on, else x's."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype


def fused_lamda_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,  # noqa: N803
    B0: torch.Tensor,  # noqa: N803
    dB: torch.Tensor,  # noqa: N803
    S0: torch.Tensor,  # noqa: N803
    dS: torch.Tensor,  # noqa: N803
    scaling: float,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Apply `LamdaLinearFunction` in one compute dtype, honouring autocast like `F.linear` does.

    Under autocast every operand is cast to the autocast dtype (the casts of dB and dS are
    differentiable, so their gradients reach the float32 parameters); otherwise to x's dtype.

    Args:
        x: (..., d_in) input.
        weight: (d_out, d_in) frozen base weight W_res; bias: (d_out,) or None.
        A: (r, d_in); B0, dB: (d_out, r), dB None for B = B0 (a fully frozen B, pre-summed); S0, dS: (r, r).
        scaling: alpha / r.
        dtype: `compute_dtype(x)`, when the caller has it already.

    Returns:
        (..., d_out) output.
    """
    # This runs once per adapted linear per step: on a GPU at small batch the step is bound by the
    # host's time per layer, so nothing here is computed twice and autocast is only left when on.
    device_type = x.device.type
    autocast_on = torch.is_autocast_enabled(device_type)
    if dtype is None:
        dtype = torch.get_autocast_dtype(device_type) if autocast_on else x.dtype
    operands = [t if t is None or t.dtype == dtype else t.to(dtype) for t in (x, weight, bias, A, B0, dB, S0, dS)]
    if not autocast_on:
        return LamdaLinearFunction.apply(*operands, scaling)
    with torch.autocast(device_type, enabled=False):
        return LamdaLinearFunction.apply(*operands, scaling)
