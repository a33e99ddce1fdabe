"""The fused LaMDA linear (fused.py) against autograd's numerical gradient and the unfused path."""

import pytest
import torch
from torch import nn

from lamda_peft.fused import LamdaLinearFunction
from lamda_peft.layer import LamdaLinear
from lamda_peft.spectral import spectral_factors


def make_layer(d_in=24, d_out=40, r=6, scaling=0.5, dtype=torch.float64, bias=True, dropout=0.0):
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out, bias=bias, dtype=dtype)
    layer = LamdaLinear(base, spectral_factors(base.weight.detach(), r, dtype=dtype), scaling, dropout=dropout)
    with torch.no_grad():  # move away from init so that S and B matter
        layer.dS.normal_(0, 0.1)
        layer.dB.normal_(0, 0.1)
    return layer


def grads(layer: LamdaLinear, x: torch.Tensor, target: torch.Tensor, fused: bool) -> dict:
    layer.fused = fused
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    ((y.float() - target) ** 2).sum().backward()
    return {"y": y.detach(), "x": x.grad, "dS": layer.dS.grad, "dB": layer.dB.grad}


def test_gradcheck_float64():
    """Every input gradient of the Function against finite differences (float64)."""
    torch.manual_seed(0)
    d_in, d_out, r, n = 7, 5, 3, 4
    x = torch.randn(2, n, d_in, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(d_out, d_in, dtype=torch.float64)
    bias = torch.randn(d_out, dtype=torch.float64, requires_grad=True)
    A, B0, S0 = (torch.randn(*s, dtype=torch.float64) for s in ((r, d_in), (d_out, r), (r, r)))
    dB = torch.randn(d_out, r, dtype=torch.float64, requires_grad=True)
    dS = torch.randn(r, r, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, b, dB, dS: LamdaLinearFunction.apply(x, weight, b, A, B0, dB, S0, dS, 0.7), (x, bias, dB, dS)
    )


@pytest.mark.parametrize("bias", [True, False])
def test_fused_equals_unfused_and_dense_reference(bias):
    layer = make_layer(bias=bias)
    layer.freeze_columns(2)  # a frozen column's gradient is masked by the same hook on both paths
    x = torch.randn(3, 5, 24, dtype=torch.float64)
    target = torch.randn(3, 5, 40)
    fused, unfused = grads(layer, x, target, True), grads(layer, x, target, False)
    for key in fused:
        torch.testing.assert_close(fused[key], unfused[key], atol=1e-12, rtol=1e-10)
    W = layer.base_layer.weight + layer.scaling * layer.B @ layer.S @ layer.A
    ref = x @ W.T + (layer.base_layer.bias if bias else 0)
    torch.testing.assert_close(fused["y"], ref.detach())
    assert torch.all(fused["dB"][:, :2] == 0)


def test_fully_frozen_B_gets_no_gradient_and_S_still_trains():
    layer = make_layer()
    layer.freeze_columns(layer.r)
    assert not layer.dB.requires_grad
    out = grads(layer, torch.randn(4, 24, dtype=torch.float64), torch.randn(4, 40), True)
    assert out["dB"] is None and out["dS"] is not None


def test_only_the_r_wide_activation_is_saved():
    """Besides the layer's own tensors, backward keeps exactly one (N, r) tensor."""
    layer = make_layer(d_in=96, d_out=80, r=4, dtype=torch.float32)
    own = {t.untyped_storage().data_ptr() for t in list(layer.parameters()) + list(layer.buffers())}
    x = torch.randn(64, 96, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    new = [tuple(t.shape) for t in saved if t.untyped_storage().data_ptr() not in own]
    assert new == [(64, 4)]
    y.sum().backward()


def test_bf16_autocast_is_as_accurate_as_unfused():
    """Under bf16 autocast both paths round differently; the fused one must be no less accurate
    (relative error against the float32 result, norm-wise) and must return float32 grads."""
    layer = make_layer(d_in=64, d_out=48, r=8, dtype=torch.float32)
    x = torch.randn(6, 64)
    target = torch.randn(6, 48)
    ref = grads(layer, x, target, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, unfused = grads(layer, x, target, True), grads(layer, x, target, False)
    assert fused["y"].dtype == unfused["y"].dtype == torch.bfloat16
    assert fused["dS"].dtype == fused["dB"].dtype == torch.float32
    for key in fused:
        err = {
            name: float((out[key].float() - ref[key]).norm() / ref[key].norm())
            for name, out in (("fused", fused), ("unfused", unfused))
        }
        assert err["fused"] < max(2 * err["unfused"], 1e-2), (key, err)


def test_unfused_bases_take_the_generic_path():
    """Dropout, forward hooks and non-Linear bases never reach the Function (checked by counting calls)."""
    calls = []
    original = LamdaLinearFunction.forward

    def counting(ctx, *args):
        calls.append(1)
        return original(ctx, *args)

    LamdaLinearFunction.forward = staticmethod(counting)
    try:
        x = torch.randn(3, 24, dtype=torch.float64)
        make_layer()(x)
        assert len(calls) == 1
        make_layer(dropout=0.1).train()(x)
        hooked = make_layer()
        hooked.base_layer.register_forward_hook(lambda m, i, o: o)
        hooked(x)
        hooked.fused = False
        hooked(x)
        trained_base = make_layer()
        trained_base.base_layer.weight.requires_grad_(True)  # e.g. a recursive model's shared weight
        y = trained_base(x)
        assert len(calls) == 1
        y.sum().backward()
        assert trained_base.base_layer.weight.grad is not None
    finally:
        LamdaLinearFunction.forward = staticmethod(original)
