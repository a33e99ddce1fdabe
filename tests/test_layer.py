"""The adapted layer against a float64 dense reference: forward, gradients, memory, merge."""

import pytest
import torch
from torch import nn

from conftest import assert_close, tiny_gpt2
from lamda_peft.layer import LamdaLinear
from lamda_peft.spectral import spectral_factors


def make_layer(d_in=24, d_out=40, r=6, scaling=0.5, dtype=torch.float64, bias=True, **kw):
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out, bias=bias, dtype=dtype)
    W = base.weight.detach().clone()
    f = spectral_factors(W, r, dtype=dtype, **kw)
    layer = LamdaLinear(base, f, scaling)
    with torch.no_grad():  # move away from init so that S and B matter
        layer.dS.normal_(0, 0.1)
        layer.dB.normal_(0, 0.1)
    return layer, W


def test_forward_matches_dense_reference():
    layer, W = make_layer()
    x = torch.randn(3, 7, 24, dtype=torch.float64)
    W_res = W - layer.scaling * layer.B0 @ layer.A
    ref = x @ (W_res + layer.scaling * layer.B @ layer.S @ layer.A).T + layer.base_layer.bias
    torch.testing.assert_close(layer(x), ref)


def test_gradients_of_S_and_B_match_reference():
    layer, W = make_layer()
    x = torch.randn(5, 24, dtype=torch.float64)
    target = torch.randn(5, 40, dtype=torch.float64)
    ((layer(x) - target) ** 2).sum().backward()
    # Reference: the dense formula with S and B as free float64 leaves.
    S = layer.S.detach().clone().requires_grad_(True)
    B = layer.B.detach().clone().requires_grad_(True)
    W_res = layer.base_layer.weight.detach()
    y = x @ (W_res + layer.scaling * B @ S @ layer.A).T + layer.base_layer.bias.detach()
    ((y - target) ** 2).sum().backward()
    torch.testing.assert_close(layer.dS.grad, S.grad)
    torch.testing.assert_close(layer.dB.grad, B.grad)


def test_output_at_init_equals_base():
    torch.manual_seed(0)
    base = nn.Linear(64, 48)
    ref = nn.Linear(64, 48)
    ref.load_state_dict(base.state_dict())
    layer = LamdaLinear(base, spectral_factors(base.weight, 8), 1.0)
    x = torch.randn(10, 64)
    assert_close(layer(x), ref(x))


def test_input_is_not_saved_for_backward():
    """With dropout 0 the d_in-wide input is not among the tensors saved for backward: only
    r-wide activations are (plus the frozen weights themselves)."""
    d_in, d_out, r, n = 96, 80, 4, 64
    torch.manual_seed(0)
    layer = LamdaLinear(nn.Linear(d_in, d_out), spectral_factors(torch.randn(d_out, d_in), r), 1.0)
    x = torch.randn(n, d_in, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    y.sum().backward()
    activation_shapes = [tuple(t.shape) for t in saved if t.shape and t.shape[0] == n]
    assert (n, d_in) not in activation_shapes
    assert all(shape[-1] <= r for shape in activation_shapes), activation_shapes
    assert x.grad is not None


def test_dropout_does_save_a_wide_mask():
    torch.manual_seed(0)
    layer = LamdaLinear(nn.Linear(32, 32), spectral_factors(torch.randn(32, 32), 4), 1.0, dropout=0.1).train()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(torch.randn(8, 32, requires_grad=True))
    assert any(tuple(t.shape) == (8, 32) for t in saved)


def test_merge_unmerge_exact_and_idempotent():
    layer, _ = make_layer(dtype=torch.float32)
    x = torch.randn(4, 24)
    y = layer(x)
    layer.merge()
    layer.merge()  # harmless
    assert_close(layer(x), y)
    layer.unmerge()
    layer.unmerge()
    assert_close(layer(x), y)


def test_conv1d_layer_matches_reference():
    model = tiny_gpt2()
    conv = model.transformer.h[0].attn.c_attn  # Conv1D, weight (d_in, d_out)
    W = conv.weight.detach().T.clone().double()  # torch layout (d_out, d_in)
    conv = conv.double()
    layer = LamdaLinear(conv, spectral_factors(W, 4, dtype=torch.float64), 2.0)
    with torch.no_grad():
        layer.dS.normal_(0, 0.1)
    x = torch.randn(3, 32, dtype=torch.float64)
    W_res = W - 2.0 * layer.B0 @ layer.A
    ref = x @ (W_res + 2.0 * layer.B @ layer.S @ layer.A).T + conv.bias
    torch.testing.assert_close(layer(x), ref)


@pytest.mark.parametrize("order", ["largest_first", "smallest_first"])
def test_freeze_order(order):
    layer, _ = make_layer()
    layer.freeze_order = order
    layer.freeze_columns(2)
    expected = [0, 1] if order == "largest_first" else [4, 5]
    assert layer.frozen.nonzero().flatten().tolist() == expected
    layer.freeze_columns(1)  # never unfreezes
    assert layer.n_frozen == 2
