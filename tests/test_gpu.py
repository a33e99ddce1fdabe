"""The library on a CUDA device: everything the CPU tests check, where device placement can break it.

Skipped without a GPU (CI has none); run on one with `pytest -m gpu tests/test_gpu.py`. Every
adapter tensor must live on the base weight's device, whatever device the factors, the calibration
batches or a saved adapter come from; numbers must agree with the same model on the CPU.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from conftest import tiny_llama
from lamda_peft import LamdaConfig, LamdaModel, get_lamda_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CUDA = torch.device("cuda")


def _batch(seed: int = 0, rows: int = 2, seq: int = 12) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (rows, seq), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def _on(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def _assert_all_on_cuda(model: torch.nn.Module) -> None:
    stray = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type != "cuda"]
    assert not stray, f"tensors left off the GPU: {stray[:5]}"


def test_adapter_lives_on_the_base_device_and_matches_the_cpu_model():
    config = LamdaConfig(r=4, target_modules="all-linear", svd="full")
    cpu = get_lamda_model(tiny_llama().double(), config)
    gpu = get_lamda_model(tiny_llama().double().to(CUDA), config)
    _assert_all_on_cuda(gpu)
    batch = _batch()
    with torch.no_grad():
        base_cpu = tiny_llama().double()(**batch).logits
        base_gpu = tiny_llama().double().to(CUDA)(**_on(batch, CUDA)).logits
        on_cpu = cpu(**batch).logits
        on_gpu = gpu(**_on(batch, CUDA)).logits
    # W_res + B0 S0 A = W: the adapted model equals its base at init, on either device (float64).
    torch.testing.assert_close(on_cpu, base_cpu, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(on_gpu, base_gpu, atol=1e-10, rtol=1e-9)
    # Across devices only Llama's float32 rotary tables differ (about 1e-7 relative).
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=1e-6, rtol=1e-4)


def test_training_freezes_b_saves_and_reloads_across_devices(tmp_path):
    model = get_lamda_model(tiny_llama().to(CUDA).train(), LamdaConfig(r=4, target_modules="all-linear"))
    opt = torch.optim.AdamW(model.lamda_param_groups(1e-2))
    model.attach_optimizer(opt, total_steps=4)
    batch = _on(_batch(), CUDA)
    trainable_at_start = model.trainable_parameter_count()
    losses = []
    for _ in range(4):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    _, layer = next(iter(model.lamda_layers()))
    assert layer.n_frozen > 0 and model.trainable_parameter_count() < trainable_at_start
    _assert_all_on_cuda(model)
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits.cpu()
    model.save_pretrained(tmp_path / "adapter")
    on_cpu = LamdaModel.from_pretrained(tiny_llama(), tmp_path / "adapter").eval()
    on_gpu = LamdaModel.from_pretrained(tiny_llama().to(CUDA), tmp_path / "adapter").eval()
    _assert_all_on_cuda(on_gpu)
    with torch.no_grad():
        torch.testing.assert_close(on_cpu(**_batch()).logits, expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(on_gpu(**batch).logits.cpu(), expected, atol=1e-5, rtol=1e-5)
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(**batch).logits.cpu(), expected, atol=1e-4, rtol=1e-4)


def test_exported_lora_runs_in_peft_on_the_gpu(tmp_path):
    from peft import PeftModel

    model = get_lamda_model(tiny_llama().to(CUDA), LamdaConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for _, layer in model.lamda_layers():
            layer.dS.normal_(std=0.05)
            layer.dB.normal_(std=0.05)
    batch = _on(_batch(), CUDA)
    with torch.no_grad():
        expected = model(**batch).logits
    model.export_lora(tmp_path / "lora")
    peft_model = PeftModel.from_pretrained(tiny_llama().to(CUDA), tmp_path / "lora").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**batch).logits, expected, atol=1e-4, rtol=1e-4)


def test_bf16_base_fused_and_unfused_agree_and_grads_reach_float32_params():
    grads = {}
    for fused in (True, False):
        model = get_lamda_model(
            tiny_llama().to(CUDA, torch.bfloat16).train(), LamdaConfig(r=4, target_modules="all-linear")
        )
        for _, layer in model.lamda_layers():
            layer.fused = fused
        model(**_on(_batch(), CUDA)).loss.backward()
        _, layer = next(iter(model.lamda_layers()))
        assert layer.dB.dtype == torch.float32 and layer.dB.grad is not None
        assert torch.isfinite(layer.dB.grad).all()
        grads[fused] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    torch.testing.assert_close(grads[True], grads[False], atol=2e-2, rtol=5e-2)


def test_gradient_init_takes_cpu_calibration_batches():
    config = LamdaConfig(r=4, target_modules="all-linear", init="gradient")
    model = get_lamda_model(tiny_llama().to(CUDA), config, calibration=[_batch(1), _batch(2)])
    _assert_all_on_cuda(model)
    with torch.no_grad():  # B0 = 0: the model equals its base at init
        torch.testing.assert_close(
            model(**_on(_batch(), CUDA)).logits, tiny_llama().to(CUDA)(**_on(_batch(), CUDA)).logits
        )


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_qlamda_nf4_on_the_gpu(tmp_path):
    from lamda_peft.quantization import quantize_model_linears
    from lamda_peft.targets import find_targets

    # Residual NF4: closer to the full-precision model than plain NF4 (QLoRA's base) at init.
    batch = _on(_batch(), CUDA)
    with torch.no_grad():
        reference = tiny_llama().to(CUDA)(**batch).logits
        model = get_lamda_model(tiny_llama().to(CUDA), LamdaConfig(r=8, target_modules="all-linear", quantize="nf4"))
        _assert_all_on_cuda(model)
        residual_err = (model(**batch).logits - reference).norm() / reference.norm()
        plain = quantize_model_linears(tiny_llama().to(CUDA), find_targets(tiny_llama(), "all-linear"), "nf4")
        plain_err = (plain(**batch).logits - reference).norm() / reference.norm()
    assert residual_err < plain_err
    # Training steps run, and the adapter reloads onto the full-precision base bitwise.
    opt = torch.optim.AdamW(model.lamda_param_groups(1e-2))
    model.attach_optimizer(opt, total_steps=4)
    model.train()
    for _ in range(2):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    model.save_pretrained(tmp_path / "adapter")
    again = LamdaModel.from_pretrained(tiny_llama().to(CUDA), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(again(**batch).logits, model(**batch).logits)
    # An already-quantized model: the adapter leaves it exactly as it was at init.
    names = find_targets(tiny_llama(), "all-linear")
    quantized = quantize_model_linears(tiny_llama().to(CUDA), names, "nf4")
    with torch.no_grad():
        before = quantized(**batch).logits.clone()
        lamda = get_lamda_model(quantized, LamdaConfig(r=8, target_modules=names))
        assert torch.equal(lamda(**batch).logits, before)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_qlamda_int8_on_a_model_already_on_the_gpu():
    """bitsandbytes' Int8Params quantizes only on a move from the CPU: a weight already on the GPU must
    still end up int8 with its scales (quantize_linear starts it on the CPU)."""
    from lamda_peft.quantization import dequantized_weight

    batch = _on(_batch(), CUDA)
    with torch.no_grad():
        reference = tiny_llama().to(CUDA)(**batch).logits
        model = get_lamda_model(tiny_llama().to(CUDA), LamdaConfig(r=8, target_modules="all-linear", quantize="int8"))
        for _, layer in model.lamda_layers():
            assert layer.base_layer.weight.dtype == torch.int8 and layer.base_layer.weight.device.type == "cuda"
            assert dequantized_weight(layer.base_layer).isfinite().all()
        err = (model(**batch).logits - reference).norm() / reference.norm()
    assert err < 0.05


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_a_merged_qlamda_model_moved_to_the_gpu_unmerges_there():
    """The quantized base kept aside by merge() moves with the model, so unmerge() works on the new device."""
    batch = _batch()
    model = get_lamda_model(tiny_llama(), LamdaConfig(r=8, target_modules="all-linear", quantize="nf4")).eval()
    with torch.no_grad():
        expected = model(**batch).logits
        model.merge()
        model.to(CUDA)
        model.unmerge()
        _assert_all_on_cuda(model)
        got = model(**_on(batch, CUDA)).logits.cpu()
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-3)


def test_the_randomised_svd_leaves_the_cuda_generator_as_it_was():
    """svd_lowrank is seeded for a deterministic A; the user's CUDA random stream must not be reseeded."""
    torch.manual_seed(1234)
    expected = torch.rand(4, device=CUDA)
    torch.manual_seed(1234)
    get_lamda_model(tiny_llama().to(CUDA), LamdaConfig(r=4, target_modules="all-linear", svd="lowrank"))
    assert torch.equal(torch.rand(4, device=CUDA), expected)
