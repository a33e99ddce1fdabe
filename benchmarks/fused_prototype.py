"""A prototype fused LaMDA forward, measured by the benchmarks beside the library's own layer.

NOT part of the library: it exists to measure what a fused `LamdaLinear.forward` would gain, so
that the proposal to change `src/lamda_peft/layer.py` comes with numbers. It patches the
`forward` of `LamdaLinear` *instances* (never the class) in the benchmark's own process.

One autograd Function computes the base linear and the adapter path together:

    h = x A^T                    (N, r)        the only tensor saved for backward
    g = h S^T                    (N, r)
    y = x W_res^T + b + s * g B^T   (N, d_out)   one GEMM accumulated into y (addmm_), no extra add

and its backward recomputes everything else from the layer's own parameters and buffers:

    gg = s * dy B                (N, r)
    dS = gg^T h                  (r, r)
    dB = s * dy^T (h S^T)        (d_out, r)    only while some column of B still trains
    dx = dy W_res + (gg S) A     (N, d_in)     the adapter's part accumulated in place (addmm_)

The library's layer instead builds M = s * (B0 + dB) @ (S0 + dS) with autograd each forward, so
backward keeps B and M (two d_out x r tensors per layer, new storages) besides h, and it adds the
adapter's output and input gradients with separate elementwise passes.
"""

from __future__ import annotations

import types

import torch
from torch import nn


class FusedLamdaFunction(torch.autograd.Function):
    """y = x W^T + b + s * (x A^T) S^T B^T, with B = B0 + dB and S = S0 + dS (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B0, dB, S0, dS, scaling: float):  # noqa: N803 (maths names)
        d_out, d_in = weight.shape
        x2 = x.reshape(-1, d_in)  # (N, d_in)
        y = x2 @ weight.t() if bias is None else torch.addmm(bias, x2, weight.t())  # (N, d_out)
        h = x2 @ A.t()  # (N, r)
        B = B0 + dB  # (d_out, r), not saved: recomputed in backward from the layer's own tensors
        S = S0 + dS  # (r, r)
        y.addmm_(h @ S.t(), B.t(), alpha=scaling)
        ctx.save_for_backward(h, weight, A, B0, dB, S0, dS)
        ctx.scaling = scaling
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], d_out)

    @staticmethod
    def backward(ctx, dy):
        h, weight, A, B0, dB, S0, dS = ctx.saved_tensors
        s = ctx.scaling
        dy2 = dy.reshape(-1, weight.shape[0])  # (N, d_out)
        B = B0 + dB
        S = S0 + dS
        gg = (dy2 @ B).mul_(s)  # (N, r)
        d_S = gg.t() @ h if ctx.needs_input_grad[7] else None  # (r, r)
        d_B = (dy2.t() @ (h @ S.t())).mul_(s) if ctx.needs_input_grad[5] else None  # (d_out, r)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = dy2 @ weight  # (N, d_in)
            dx.addmm_(gg @ S, A)
            dx = dx.view(ctx.x_shape)
        d_bias = dy2.sum(0) if ctx.needs_input_grad[2] else None
        return dx, None, d_bias, None, None, d_B, None, d_S, None


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if self.merged or self.disabled or not isinstance(self.base_layer, nn.Linear) or args or kwargs:
        return type(self).forward(self, x, *args, **kwargs)
    base = self.base_layer
    return FusedLamdaFunction.apply(x, base.weight, base.bias, self.A, self.B0, self.dB, self.S0, self.dS, self.scaling)


def patch_fused(model: nn.Module) -> int:
    """Give every `LamdaLinear` instance in `model` the fused forward; returns how many were patched."""
    from lamda_peft import LamdaLinear

    n = 0
    for module in model.modules():
        if isinstance(module, LamdaLinear):
            module.forward = types.MethodType(_fused_forward, module)
            n += 1
    return n
