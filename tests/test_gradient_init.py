"""init="gradient": A spans the top input directions of the loss gradient on calibration data.

Checked against float64 dense references (numpy SVD of the gradient; plain autograd for the
gradient itself, Linear and Conv1D layouts), end to end through `get_lamda_model` (outputs at init,
B's first gradient is the rank-r part of full fine-tuning's, reload without calibration) and
through `lamda-peft train --init gradient`, with the errors a user can hit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import assert_calibrated_adapter_reloads, tiny_bert, tiny_gpt2
from lamda_peft import LamdaConfig, get_lamda_model
from lamda_peft.cli import main
from lamda_peft.model import calibration_groups, weight_gradients
from lamda_peft.spectral import gradient_factors, spectral_factors


def _batches(with_labels=True):
    out = []
    for tokens, lengths, labels in (
        (((5, 6, 7, 8), (9, 10, 11, 0)), (4, 3), (0, 2)),
        (((12, 13, 0, 0), (14, 15, 16, 17)), (2, 4), (1, 1)),
    ):
        batch = {
            "input_ids": torch.tensor(tokens),
            "attention_mask": torch.tensor([[1] * n + [0] * (4 - n) for n in lengths]),
        }
        if with_labels:
            batch["labels"] = torch.tensor(labels)
        out.append(batch)
    return out


def test_factors_are_the_gradients_top_right_singular_vectors():
    torch.manual_seed(0)
    G = torch.randn(9, 12, dtype=torch.float64)
    f = gradient_factors(G, 4, dtype=torch.float64, method="full")
    U, s, Vt = np.linalg.svd(G.numpy())  # the reference
    # A's rows are Vt's top 4 up to sign: the projector onto their span is the same
    P_ref = torch.from_numpy(Vt[:4].T @ Vt[:4])
    torch.testing.assert_close(f.A.T @ f.A, P_ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(f.A @ f.A.T, torch.eye(4, dtype=torch.float64), atol=1e-12, rtol=1e-12)
    assert torch.equal(f.B0, torch.zeros(9, 4, dtype=torch.float64))
    assert torch.equal(f.S0, torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(f.sigma, torch.from_numpy(s[:4]))
    # G A^T (B's first gradient) keeps the best rank-4 part of G
    best = torch.from_numpy((U[:, :4] * s[:4]) @ Vt[:4])
    torch.testing.assert_close((G @ f.A.T) @ f.A, best, atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="calibration"):
        spectral_factors(G, 4, init="gradient")


def _dense_gradients(model, names, batches):
    """The reference: every parameter trainable, plain autograd, summed over the batches."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None
    for batch in batches:
        model(**batch).loss.backward()
    return {n: model.get_submodule(n).weight.grad.clone() for n in names}


def test_weight_gradients_match_dense_autograd_and_leave_the_model_as_it_was():
    model = tiny_bert().double()
    names = ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.output.dense"]
    model.train()
    for p in model.parameters():  # a frozen model with one stale gradient: both must survive
        p.requires_grad_(False)
    head = model.classifier.weight
    head.grad = torch.ones_like(head)
    grads = weight_gradients(model, names, _batches())
    assert model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert torch.equal(head.grad, torch.ones_like(head)) and all(
        p.grad is None for p in model.parameters() if p is not head
    )
    expected = _dense_gradients(tiny_bert().double(), names, _batches())
    for n in names:
        assert grads[n].dtype == torch.float32
        torch.testing.assert_close(grads[n].double(), expected[n], atol=1e-6, rtol=1e-5)


def test_weight_gradients_of_a_bf16_model_are_summed_in_float32():
    """A bf16 model's g^T x is formed and summed in float32: no bf16 gradient is rounded or accumulated."""
    names = ["bert.encoder.layer.0.attention.self.query"]
    grads = weight_gradients(tiny_bert().bfloat16(), names, _batches())
    per_batch = [_dense_gradients(tiny_bert().bfloat16(), names, [b])[names[0]] for b in _batches()]
    rounded = per_batch[0].float() + per_batch[1].float()  # autograd's bf16 gradients, summed in float32
    assert grads[names[0]].dtype == torch.float32
    torch.testing.assert_close(grads[names[0]], rounded, atol=1e-2 * rounded.abs().max().item(), rtol=2e-2)


def test_weight_gradients_in_groups_are_bitwise_one_pass_and_no_weight_ever_takes_a_gradient():
    """max_bytes splits the targets into groups (one pass each): the same sums, bit for bit, and at no
    point does any parameter require grad (no weight-sized gradient is ever allocated)."""
    names = [f"bert.encoder.layer.{i}.{m}" for i in (0, 1) for m in ("attention.self.query", "output.dense")]
    model = tiny_bert()
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(any(p.requires_grad for p in module.parameters())))
    one_pass = weight_gradients(model, names, _batches())
    sizes = {n: 4 * model.get_submodule(n).weight.numel() for n in names}
    assert len(calibration_groups(sizes, max(sizes.values()))) > 1
    grouped = weight_gradients(model, names, iter(_batches()), max_bytes=max(sizes.values()))  # an iterator: read once
    assert seen and not any(seen)
    for n in names:
        assert torch.equal(grouped[n], one_pass[n]), n
    for moment in (False, True):
        a = weight_gradients(model, names, _batches(), batch_moment=moment)
        b = weight_gradients(model, names, _batches(), batch_moment=moment, max_bytes=1)  # each target alone
        assert all(torch.equal(a[n], b[n]) for n in names)


def test_calibration_groups_fill_in_order_and_refuse_a_non_positive_budget():
    sizes = {"a": 4, "b": 4, "c": 10, "d": 1}
    assert calibration_groups(sizes, None) == [["a", "b", "c", "d"]]
    assert calibration_groups(sizes, 8) == [["a", "b"], ["c"], ["d"]]  # c alone is over the budget: its own group
    assert calibration_groups(sizes, 100) == [["a", "b", "c", "d"]]
    assert calibration_groups({}, 8) == []
    with pytest.raises(ValueError, match="max_bytes must be positive"):
        calibration_groups(sizes, 0)


def test_weight_gradients_of_conv1d_are_in_out_by_in_layout():
    name = "transformer.h.0.attn.c_attn"
    ids = torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10]])
    batches = [{"input_ids": ids, "labels": ids}]
    grads = weight_gradients(tiny_gpt2().double(), [name], batches)
    expected = _dense_gradients(tiny_gpt2().double(), [name], batches)[name]  # Conv1D: (d_in, d_out)
    torch.testing.assert_close(grads[name].double(), expected.T, atol=1e-6, rtol=1e-5)


def test_model_output_at_init_equals_base_b_gets_the_rank_r_gradient_and_reload_needs_no_calibration(tmp_path):
    batch = {k: v for k, v in _batches()[0].items() if k != "labels"}
    base = tiny_bert().double().eval()
    with torch.no_grad():
        expected = base(**batch).logits
    cfg = LamdaConfig(r=4, target_modules="all-linear", init="gradient", modules_to_save=["classifier"])
    model = get_lamda_model(tiny_bert().double().eval(), cfg, calibration=_batches())
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, expected, atol=1e-12, rtol=1e-12)

    names = [n for n, _ in model.lamda_layers()]
    full = _dense_gradients(tiny_bert().double(), names, _batches())
    model.eval()
    for b in _batches():
        model(**b).loss.backward()
    for name, layer in model.lamda_layers():
        # A spans the top-4 right singular vectors of the full gradient ...
        _, _, Vt = np.linalg.svd(full[name].numpy())
        torch.testing.assert_close(layer.A.T @ layer.A, torch.from_numpy(Vt[:4].T @ Vt[:4]), atol=1e-5, rtol=1e-5)
        # ... so B's first gradient (B = B0 + dB) is the full gradient seen through A (scaling 1, S = I)
        torch.testing.assert_close(layer.dB.grad, full[name] @ layer.A.T, atol=1e-9, rtol=1e-9)

    assert_calibrated_adapter_reloads(model, tiny_bert().double().eval(), tmp_path / "adapter", batch, expected)


def test_get_lamda_model_errors_name_the_problem():
    cfg = LamdaConfig(r=4, target_modules="all-linear", init="gradient")
    with pytest.raises(ValueError, match="needs calibration inputs"):
        get_lamda_model(tiny_bert(), cfg)
    with pytest.raises(ValueError, match="returned no loss; the calibration batches need labels"):
        get_lamda_model(tiny_bert(), cfg, calibration=_batches(with_labels=False))
    model = tiny_bert()
    with pytest.raises(ValueError, match="exceeds min"):
        get_lamda_model(model, LamdaConfig(r=999, target_modules="all-linear", init="gradient"), _batches())
    assert not any(type(m).__name__ == "LamdaLinear" for m in model.modules())  # nothing modified


CLI_FAST = ["train", "--max-steps", "2", "--max-train-rows", "48", "--max-eval-rows", "16", "--batch-size", "8"]


def test_cli_init_gradient_trains_and_rejects_loftq(tmp_path, capsys):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    assert main([*CLI_FAST, "--init", "gradient", "--calibration-rows", "16", "--output-dir", str(out)]) == 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    # --calibration-memory-mb: the targets calibrated a few at a time give the very same A
    grouped = tmp_path / "grouped"
    flags = ["--init", "gradient", "--calibration-rows", "16", "--calibration-memory-mb", "0.01"]
    assert main([*CLI_FAST, *flags, "--output-dir", str(grouped)]) == 0
    a, b = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (out, grouped))
    assert all(torch.equal(a[k], b[k]) for k in a if k.endswith(".lamda_A"))
    assert main([*CLI_FAST, "--calibration-memory-mb", "0", "--output-dir", str(tmp_path / "bad")]) == 2
    assert "calibration_memory_mb must be > 0" in capsys.readouterr().err
    q = ["--init", "gradient", "--quantize", "nf4", "--loftq-iters", "2", "--output-dir", str(tmp_path / "q")]
    assert main([*CLI_FAST, *q]) == 2
    assert "loftq_iters > 0 refits A from the quantization error" in capsys.readouterr().err


def test_quantized_base_is_qloras_and_a_is_the_quantized_models_gradients(tmp_path):
    """quantize="nf4" + init="gradient": B0 = 0, so the quantized base is Q(W), bitwise QLoRA's base;
    A comes from the gradient of that quantized model (the one that trains), not of the
    full-precision one; outputs at init are QLoRA's at init; reload rebuilds it bitwise."""
    pytest.importorskip("bitsandbytes")
    from lamda_peft import ConfigError, LamdaModel
    from lamda_peft.quantization import QuantizationError, dequantized_weight, quantize_model_linears

    batch = {k: v for k, v in _batches()[0].items() if k != "labels"}
    cfg = {"r": 4, "target_modules": "all-linear", "init": "gradient", "modules_to_save": ["classifier"]}
    model = get_lamda_model(tiny_bert(), LamdaConfig(**cfg, quantize="nf4"), calibration=_batches())
    full_precision = get_lamda_model(tiny_bert(), LamdaConfig(**cfg), calibration=_batches())
    names = [n for n, _ in model.lamda_layers()]
    qlora_base = quantize_model_linears(tiny_bert(), names, "nf4")
    # The reference: a full-precision model whose targets hold deq(Q(W)), calibrated the same way.
    on_q = tiny_bert()
    with torch.no_grad():
        for name in names:
            on_q.get_submodule(name).weight.copy_(dequantized_weight(qlora_base.get_submodule(name)))
    reference = dict(get_lamda_model(on_q, LamdaConfig(**cfg), calibration=_batches()).lamda_layers())
    differs = []
    for (name, layer), (_, fp_layer) in zip(model.lamda_layers(), full_precision.lamda_layers(), strict=True):
        assert torch.equal(layer.A, reference[name].A) and not layer.B0.any(), name
        differs.append(not torch.equal(layer.A, fp_layer.A))
        q = dequantized_weight(qlora_base.get_submodule(name))
        assert torch.equal(dequantized_weight(layer.base_layer), q), name
    assert all(differs)  # the calibration did see the quantized weights
    with torch.no_grad():
        expected = qlora_base(**batch).logits
        assert torch.equal(model(**batch).logits, expected)
    model.save_pretrained(tmp_path / "adapter")
    again = LamdaModel.from_pretrained(tiny_bert(), tmp_path / "adapter")  # no calibration; digests checked
    with torch.no_grad():
        assert torch.equal(again(**batch).logits, expected)

    with pytest.raises(ConfigError, match="loftq_iters > 0 refits A"):
        LamdaConfig(**cfg, quantize="nf4", loftq_iters=2)
    with pytest.raises(QuantizationError, match="already quantized: load the model in full precision"):
        get_lamda_model(qlora_base, LamdaConfig(**cfg), calibration=_batches())


def test_batch_moment_is_the_float64_sum_of_per_batch_gram_matrices_and_a_its_top_eigenvectors():
    """gradient_stat="batch_moment": weight_gradients returns sum_b G_b^T G_b (each G_b from plain
    float64 autograd on one batch), and A is its top-r eigenspace, i.e. the top-r right singular
    vectors of the stacked per-batch gradients [G_1; G_2]; B0 = 0, S0 = I, the base untouched."""
    from lamda_peft.spectral import gradient_moment_factors

    names = ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.output.dense"]
    moments = weight_gradients(tiny_bert().double(), names, _batches(), batch_moment=True)
    for n in names:
        per_batch = [_dense_gradients(tiny_bert().double(), [n], [b])[n] for b in _batches()]
        expected = sum(g.T @ g for g in per_batch)
        torch.testing.assert_close(moments[n].double(), expected, atol=1e-7, rtol=1e-5)
        r = 3
        f = gradient_moment_factors(expected, r, per_batch[0].shape[0], dtype=torch.float64)
        stacked = np.concatenate([g.numpy() for g in per_batch])
        _, s, vt = np.linalg.svd(stacked)
        proj = torch.from_numpy(vt[:r].T @ vt[:r])
        torch.testing.assert_close(f.A.T @ f.A, proj, atol=1e-8, rtol=0)  # the same subspace
        torch.testing.assert_close(f.sigma, torch.from_numpy(s[:r]), atol=1e-8, rtol=1e-7)
        assert f.B0.shape == (per_batch[0].shape[0], r) and not f.B0.any()
        torch.testing.assert_close(f.S0, torch.eye(r, dtype=torch.float64))

    base = tiny_bert().double().eval()
    batch = {k: v for k, v in _batches()[0].items() if k != "labels"}
    with torch.no_grad():
        expected_out = base(**batch).logits
    cfg = LamdaConfig(r=4, target_modules=["query", "value"], init="gradient", gradient_stat="batch_moment")
    model = get_lamda_model(base, cfg, calibration=_batches())
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, expected_out, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="gradient_stat"):
        LamdaConfig(r=4, init="gradient", gradient_stat="mean")


def test_quantize_with_a_target_it_cannot_quantize_fails_before_the_calibration_pass():
    pytest.importorskip("bitsandbytes")
    from lamda_peft.quantization import QuantizationError

    def never():
        raise AssertionError("the calibration batches were read")
        yield

    cfg = LamdaConfig(r=4, target_modules="all-linear", init="gradient", quantize="nf4")
    with pytest.raises(QuantizationError, match="has a torch.float64 weight"):
        get_lamda_model(tiny_bert().double(), cfg, calibration=never())


def test_grouped_calibration_drops_each_groups_sums_before_the_next_pass(monkeypatch):
    """With calibration_max_bytes, a group's float32 sums become A and are freed before the next
    group's pass: at most one group's sums are alive at any time (and A is the one-pass A)."""
    import weakref

    import lamda_peft.model as model_module

    alive: list = []
    passes = []
    real = model_module._gradient_pass

    def watched(model, modules, calibration, batch_moment):
        passes.append([ref() is not None for ref in alive])
        out = real(model, modules, calibration, batch_moment)
        alive.extend(weakref.ref(t) for t in out.values())
        return out

    monkeypatch.setattr(model_module, "_gradient_pass", watched)
    cfg = {"r": 4, "target_modules": "all-linear", "init": "gradient", "modules_to_save": ["classifier"]}
    grouped = get_lamda_model(tiny_bert(), LamdaConfig(**cfg), calibration=_batches(), calibration_max_bytes=1)
    assert len(passes) > 2 and not any(any(flags) for flags in passes)  # every earlier group freed
    monkeypatch.setattr(model_module, "_gradient_pass", real)
    one = get_lamda_model(tiny_bert(), LamdaConfig(**cfg), calibration=_batches())
    for (_, a), (_, b) in zip(grouped.lamda_layers(), one.lamda_layers(), strict=True):
        assert torch.equal(a.A, b.A)
