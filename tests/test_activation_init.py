"""init="activation": A spans the principal directions of each layer's inputs (calibration data).

Checked against a float64 dense reference (numpy eigendecomposition of X^T X), end to end through
`get_lamda_model` (outputs at init, padding left out of the covariance, reload without
calibration) and through `lamda-peft train --init activation`, with the errors a user can hit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import assert_calibrated_adapter_reloads, tiny_bert
from lamda_peft import LamdaConfig, get_lamda_model
from lamda_peft.cli import main
from lamda_peft.model import input_covariances
from lamda_peft.spectral import activation_factors, spectral_factors


def _inputs(n=40, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    scales = torch.linspace(3.0, 0.1, d, dtype=torch.float64)  # a clear principal subspace
    return torch.randn(n, d, generator=g, dtype=torch.float64) * scales


def test_factors_are_w_on_the_inputs_principal_subspace():
    torch.manual_seed(0)
    W = torch.randn(9, 12, dtype=torch.float64)
    X = _inputs()
    f = activation_factors(W, X.T @ X, 4, dtype=torch.float64)
    vals, vecs = np.linalg.eigh((X.T @ X).numpy())
    Q = torch.from_numpy(vecs[:, ::-1][:, :4].copy())  # the reference: top-4 eigenvectors
    torch.testing.assert_close(f.B0 @ f.S0 @ f.A, W @ Q @ Q.T, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(f.S0, torch.eye(4, dtype=torch.float64))
    # split like "spectral": B0^T B0 = A A^T = diag(s), s the singular values of W Q, descending
    s = torch.linalg.svdvals(W @ Q)
    torch.testing.assert_close(f.B0.T @ f.B0, torch.diag(s), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(f.A @ f.A.T, torch.diag(s), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(f.sigma, s)
    # the adapter path carries more input energy than with W's own top singular directions
    spectral = spectral_factors(W, 4, dtype=torch.float64, method="full")

    def energy(A):
        P = torch.linalg.qr(A.T).Q
        return float(((X @ P) ** 2).sum() / (X**2).sum())

    assert energy(f.A) > energy(spectral.A)
    assert energy(f.A) == pytest.approx(float(vals[::-1][:4].sum() / vals.sum()), rel=1e-10)


def test_factor_errors_name_the_problem():
    W = torch.randn(9, 12, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"input covariance is \(5, 5\), expected \(12, 12\)"):
        activation_factors(W, torch.eye(5), 4)
    with pytest.raises(ValueError, match="rank 10 must be in"):
        activation_factors(W, torch.eye(12), 10)
    with pytest.raises(ValueError, match="calibration"):
        spectral_factors(W, 4, init="activation")


def _batches(tokens=((5, 6, 7, 8), (9, 10, 11, 0)), lengths=(4, 3)):
    ids = torch.tensor(tokens)
    mask = torch.tensor([[1] * n + [0] * (ids.shape[1] - n) for n in lengths])
    return [{"input_ids": ids, "attention_mask": mask}]


def test_covariance_leaves_padding_out():
    model = tiny_bert().double().eval()
    name = "bert.encoder.layer.0.attention.self.query"
    padded = input_covariances(model, [name], _batches())[name]
    # the same two texts unpadded, one at a time
    one = input_covariances(model, [name], [{"input_ids": torch.tensor([[5, 6, 7, 8]])}])[name]
    two = input_covariances(model, [name], [{"input_ids": torch.tensor([[9, 10, 11]])}])[name]
    torch.testing.assert_close(padded, one + two, atol=1e-10, rtol=1e-10)


def test_model_output_at_init_equals_base_and_reload_needs_no_calibration(tmp_path):
    base = tiny_bert().double().eval()
    batch = _batches()[0]
    with torch.no_grad():
        expected = base(**batch).logits
    cfg = LamdaConfig(r=4, target_modules="all-linear", init="activation", modules_to_save=["classifier"])
    model = get_lamda_model(tiny_bert().double().eval(), cfg, calibration=_batches())
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, expected, atol=1e-10, rtol=1e-10)
    for name, layer in model.lamda_layers():  # each A's rows span its own inputs' top-4 directions
        cov = input_covariances(tiny_bert().double().eval(), [name], _batches())[name]
        top = torch.linalg.eigh(cov).eigenvectors[:, -4:]
        torch.testing.assert_close(layer.A.T, top @ (top.T @ layer.A.T), atol=1e-10, rtol=1e-10)
    assert_calibrated_adapter_reloads(model, tiny_bert().double().eval(), tmp_path / "adapter", batch, expected)


def test_get_lamda_model_errors():
    cfg = LamdaConfig(r=4, target_modules="all-linear", init="activation")
    with pytest.raises(ValueError, match="needs calibration inputs"):
        get_lamda_model(tiny_bert(), cfg)
    with pytest.raises(ValueError, match="exceeds min"):
        get_lamda_model(tiny_bert(), LamdaConfig(r=999, target_modules="all-linear", init="activation"), _batches())


CLI_FAST = ["train", "--max-steps", "2", "--max-train-rows", "48", "--max-eval-rows", "16", "--batch-size", "8"]


def test_quantize_quantizes_the_residual_of_the_calibrated_factors():
    """quantize="nf4" + init="activation": the base is Q(W - scaling B0 S0 A) of the calibrated factors."""
    pytest.importorskip("bitsandbytes")
    from lamda_peft.quantization import dequantized_weight, quantize_linear
    from lamda_peft.spectral import residual_weight

    cfg = LamdaConfig(r=4, target_modules="all-linear", init="activation", quantize="nf4")
    model = get_lamda_model(tiny_bert(), cfg, calibration=_batches())
    original = tiny_bert()
    for name, layer in model.lamda_layers():
        base = original.get_submodule(name)
        w_res = residual_weight(base.weight, layer.A, layer.B0, layer.S0, layer.scaling)
        expected = dequantized_weight(quantize_linear(w_res, base.bias, "nf4"))
        assert torch.equal(dequantized_weight(layer.base_layer), expected), name


def test_cli_init_activation_trains_and_rejects_loftq(tmp_path, capsys):
    out = tmp_path / "run"
    argv = [*CLI_FAST, "--init", "activation", "--calibration-rows", "16", "--output-dir", str(out)]
    assert main(argv) == 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    q = ["--init", "activation", "--quantize", "nf4", "--loftq-iters", "1", "--output-dir", str(tmp_path / "q")]
    assert main([*CLI_FAST, *q]) == 2
    assert "loftq_iters > 0 refits A from the quantization error" in capsys.readouterr().err
    assert main([*CLI_FAST, "--calibration-rows", "0", "--output-dir", str(tmp_path / "c")]) == 2
    assert "calibration_rows must be >= 1" in capsys.readouterr().err
