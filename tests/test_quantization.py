"""QLaMDA (quantization.py): LaMDA over bitsandbytes 4/8-bit and torchao int8 frozen bases, on the CPU.

Covers both ways in (quantized residual of a full-precision model; an already-quantized model),
outputs at init against a float64 reference, real freezing, checkpointing, save/load bitwise,
a mismatched base refused, merge, LoRA export, the CPU "evaluate, then train" trap, bad input.
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from lamda_peft import AdapterLoadError, ConfigError, LamdaConfig, LamdaModel, get_lamda_model
from lamda_peft.quantization import (
    MissingQuantExtraError,
    QuantizationError,
    QuantizedLamdaLinear,
    dequantized_weight,
    quantize_linear,
    quantize_model_linears,
    quantized_digest,
    weight_error,
)

pytest.importorskip("bitsandbytes")  # the dev extra installs it; a bare install runs the other tests

# (quantize, backend) pairs: every format the module supports.
FORMATS = [("nf4", "bitsandbytes"), ("fp4", "bitsandbytes"), ("int8", "bitsandbytes"), ("int8", "torchao")]
FORMAT_IDS = ["nf4", "fp4", "int8-bnb", "int8-torchao"]


class Tiny(nn.Module):
    """Two hidden-64 linear layers and a head (a plain nn.Module: any model can be adapted)."""

    def __init__(self, d: int = 64, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.l1 = nn.Linear(d, d)
        self.l2 = nn.Linear(d, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        return self.head(self.l2(torch.tanh(self.l1(x))))


def _config(quantize="nf4", backend="bitsandbytes", **kw):
    return LamdaConfig(
        r=8, target_modules=["l1", "l2"], modules_to_save=["head"], quantize=quantize, quant_backend=backend, **kw
    )


def _train(model: LamdaModel, x: torch.Tensor, steps: int, total: int | None = None) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW(model.lamda_param_groups(1e-2, weight_decay=0.1))
    model.attach_optimizer(opt, total_steps=total or steps)
    for _ in range(steps):
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return opt


def _x(n: int = 6, d: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


# -- outputs at init ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("quantize", "backend"), FORMATS, ids=FORMAT_IDS)
def test_residual_init_matches_float64_reference(quantize, backend):
    """Each layer computes deq(Q(W_res)) x + scaling B0 S0 A x (float64 reference), where W_res =
    W - scaling B0 S0 A; the model's output error against full precision stays small."""
    x = _x()
    full = Tiny()
    weights = {
        n: (full.get_submodule(n).weight.detach().clone(), full.get_submodule(n).bias.detach().clone())
        for n in ("l1", "l2")
    }
    expected_out = full(x).detach()
    model = get_lamda_model(Tiny(), _config(quantize, backend, alpha=16.0)).eval()  # scaling 2: W_res uses it
    for name, layer in model.lamda_layers():
        assert isinstance(layer, QuantizedLamdaLinear) and not layer.delta_form
        W, b = (t.double() for t in weights[name])
        low = layer.scaling * (layer.B0.double() @ layer.S0.double() @ layer.A.double())
        q = dequantized_weight(layer.base_layer).double()
        # the stored quantized weight is Q(W - scaling B0 S0 A), not Q(W): its error is that of a quantizer
        assert weight_error(W - low, q) < (0.2 if quantize != "int8" else 0.02)
        h = _x(5, 64, seed=3)
        reference = h.double() @ (q + low).T + b
        if (quantize, backend) == ("int8", "bitsandbytes"):
            # LLM.int8 also rounds the activations to int8 outside training: not a weight-only format
            out = layer(h).detach().double()
            assert float((out - reference).norm() / reference.norm()) < 0.01
        else:
            torch.testing.assert_close(layer(h).double(), reference, atol=2e-5, rtol=1e-4)
    rel = float((model(x).detach() - expected_out).norm() / expected_out.norm())
    assert 0 < rel < (0.25 if quantize != "int8" else 0.03)


@pytest.mark.parametrize(("quantize", "backend"), FORMATS, ids=FORMAT_IDS)
def test_already_quantized_model_is_unchanged_at_init(quantize, backend):
    """A model whose linears are already quantized: outputs at init are bitwise the quantized model's,
    and training moves them (the adapter adds scaling (B S - B0 S0) A x)."""
    x = _x()
    model = Tiny()
    if backend == "torchao":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        for name in ("l1", "l2"):
            quantize_(model.get_submodule(name), Int8WeightOnlyConfig())
    else:
        quantize_model_linears(model, ["l1", "l2"], quantize)
    before = model(x).detach()
    lamda = get_lamda_model(model, LamdaConfig(r=8, target_modules=["l1", "l2"], modules_to_save=["head"]))
    assert all(layer.delta_form for _, layer in lamda.lamda_layers())
    with torch.no_grad():
        assert torch.equal(lamda(x), before)
        with lamda.disable_adapter():
            assert torch.equal(lamda(x), before)
    _train(lamda, x, 3)
    assert not torch.allclose(lamda(x), before)
    with lamda.disable_adapter():
        head_only = lamda(x)  # the head was trained too; the adapters add nothing when disabled
    layer = lamda.model.l2
    delta = layer.scaling * (layer.B @ layer.S - layer.B0 @ layer.S0) @ layer.A
    assert torch.allclose(layer.delta_weight(), delta, atol=1e-6)
    assert head_only.shape == before.shape


def test_minilm_residual_nf4_error_is_lower_than_plain_nf4():
    """Real weights (MiniLM, r=16, NF4 blocksize 64): the effective weight at init is closer to W
    when only W_res is quantized, and closer still after LoftQ iterations."""
    from transformers import AutoModel

    from lamda_peft.assets import minilm_path

    encoder = AutoModel.from_pretrained(str(minilm_path()), dtype=torch.float32)
    layer0 = [n for n, m in encoder.named_modules() if type(m) is nn.Linear and ".layer.0." in n]
    plain, resid, loft = [], [], []
    for name in layer0:
        W = encoder.get_submodule(name).weight.detach()
        plain.append(weight_error(W, dequantized_weight(quantize_linear(W, None, "nf4"))))
        errors = []
        for iters in (0, 2):
            cfg = LamdaConfig(r=16, target_modules=["lin"], quantize="nf4", loftq_iters=iters)
            wrapper = nn.Module()
            wrapper.lin = nn.Linear(W.shape[1], W.shape[0], bias=False)
            wrapper.lin.weight.data.copy_(W)
            layer = get_lamda_model(wrapper, cfg).model.lin
            w_eff = dequantized_weight(layer.base_layer).double() + layer.scaling * (
                layer.B0.double() @ layer.S0.double() @ layer.A.double()
            )
            errors.append(weight_error(W, w_eff))
        resid.append(errors[0])
        loft.append(errors[1])
    ratio = torch.tensor(plain) / torch.tensor(resid)
    assert float(ratio.median()) > 1.1, ratio
    assert all(lo < re for lo, re in zip(loft, resid, strict=True)), (loft, resid)


# -- training ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("quantize", "backend"), FORMATS, ids=FORMAT_IDS)
def test_frozen_columns_and_quantized_base_stay_bitwise(quantize, backend):
    x = _x()
    model = get_lamda_model(Tiny(), _config(quantize, backend, freeze_fraction=0.5))
    digests = {n: quantized_digest(layer.base_layer) for n, layer in model.lamda_layers()}
    opt = torch.optim.AdamW(model.lamda_param_groups(1e-2, weight_decay=0.1))
    model.attach_optimizer(opt, total_steps=8)  # t_i = 4: 2 of 8 columns freeze per step
    snapshots = []
    for _ in range(8):
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        for _, layer in model.lamda_layers():
            for j in torch.nonzero(layer.frozen).flatten().tolist():
                snapshots.append((layer, j, layer.dB[:, j].detach().clone()))
    for layer, j, value in snapshots:
        assert torch.equal(layer.dB[:, j], value)
    for name, layer in model.lamda_layers():
        assert layer.n_frozen == layer.r and not layer.dB.requires_grad
        assert layer.dS.abs().sum() > 0
        assert quantized_digest(layer.base_layer) == digests[name]
    assert model.trainable_parameter_count() == 2 * 8 * 8 + sum(p.numel() for p in model.model.head.parameters())


def test_evaluate_then_train_keeps_the_trainable_layout():
    """bitsandbytes' CPU trap (ASSETS.md): an eval pass without grad repacks a Linear4bit for
    inference when `support_avx512bf16_for_cpu` is on (forced here, as on such a CPU). The adapted
    layer keeps the trainable layout: the quantized bytes stay, and training gives the gradients
    of a never-evaluated twin."""
    x = _x()
    models = [get_lamda_model(Tiny(), _config("nf4")) for _ in range(2)]
    evaluated, twin = models
    for _, layer in evaluated.lamda_layers():
        layer.base_layer.support_avx512bf16_for_cpu = True
    digests = {n: quantized_digest(layer.base_layer) for n, layer in evaluated.lamda_layers()}
    evaluated.eval()
    with torch.no_grad():
        evaluated(x)
    evaluated.train()
    for name, layer in evaluated.lamda_layers():
        assert not getattr(layer.base_layer.weight.quant_state, "packing_format_for_cpu", False)
        assert quantized_digest(layer.base_layer) == digests[name]
    for m in models:
        m(x).pow(2).mean().backward()
    for (_, a), (_, b) in zip(evaluated.lamda_layers(), twin.lamda_layers(), strict=True):
        assert a.dS.grad is not None and torch.equal(a.dS.grad, b.dS.grad)


def test_gradient_checkpointing_with_input_grads():
    """A Llama (hidden 64, 2 layers) with NF4 residual bases under HF gradient checkpointing, input
    grads enabled as PEFT's prepare_model_for_kbit_training does: same gradients as without."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def build():
        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
        return get_lamda_model(LlamaForCausalLM(cfg), LamdaConfig(r=4, target_modules="all-linear", quantize="nf4"))

    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        model = build()
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            model.enable_input_require_grads()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append([layer.dS.grad.clone() for _, layer in model.lamda_layers()])
    assert all(bool(g.abs().sum() > 0) for g in grads[1])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# -- persistence ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("quantize", "backend", "loftq"), [("nf4", "bitsandbytes", 2), ("int8", "torchao", 0)])
def test_save_load_rebuilds_the_quantized_residual_bitwise(tmp_path, quantize, backend, loftq):
    x = _x()
    model = get_lamda_model(Tiny(), _config(quantize, backend, loftq_iters=loftq))
    _train(model, x, 3, total=10)
    out = model(x).detach()
    model.save_pretrained(tmp_path / "adapter")
    loaded = LamdaModel.from_pretrained(Tiny(), tmp_path / "adapter")  # the original full-precision base
    assert torch.equal(loaded(x), out)
    saved = model.adapter_state_dict()
    for key, value in loaded.adapter_state_dict().items():
        assert torch.equal(value, saved[key]), key
    for (name, a), (_, b) in zip(model.lamda_layers(), loaded.lamda_layers(), strict=True):
        assert quantized_digest(a.base_layer) == quantized_digest(b.base_layer)
        assert loaded.config.quantized_residual_sha256[name] == quantized_digest(b.base_layer)
        assert torch.equal(dequantized_weight(a.base_layer), dequantized_weight(b.base_layer))


def test_mismatched_base_is_refused_and_left_unmodified(tmp_path):
    x = _x()
    model = get_lamda_model(Tiny(), _config("nf4"))
    _train(model, x, 2, total=10)
    model.save_pretrained(tmp_path / "adapter")
    other = Tiny(seed=7)
    state = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(AdapterLoadError, match="SHA-256 mismatch"):
        LamdaModel.from_pretrained(other, tmp_path / "adapter")
    assert all(type(m) is nn.Linear for m in (other.l1, other.l2, other.head))
    for k, v in other.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(p.requires_grad for p in other.parameters())  # not frozen by a half-done wrap


def test_already_quantized_adapter_reloads_onto_the_same_quantized_model(tmp_path):
    x = _x()
    base = quantize_model_linears(Tiny(), ["l1", "l2"], "nf4")
    model = get_lamda_model(base, LamdaConfig(r=8, target_modules=["l1", "l2"], modules_to_save=["head"]))
    _train(model, x, 2, total=10)
    model.save_pretrained(tmp_path / "adapter")
    loaded = LamdaModel.from_pretrained(quantize_model_linears(Tiny(), ["l1", "l2"], "nf4"), tmp_path / "adapter")
    assert torch.equal(loaded(x), model(x))
    with pytest.raises(AdapterLoadError, match="SHA-256 mismatch"):
        LamdaModel.from_pretrained(quantize_model_linears(Tiny(seed=3), ["l1", "l2"], "nf4"), tmp_path / "adapter")


# -- merge and export --------------------------------------------------------------------------------
@pytest.mark.parametrize(("quantize", "backend"), FORMATS, ids=FORMAT_IDS)
def test_merge_unmerge_and_merge_and_unload(quantize, backend):
    x = _x()
    model = get_lamda_model(Tiny(), _config(quantize, backend))
    _train(model, x, 3, total=10)
    out = model(x).detach()
    digests = [quantized_digest(layer.base_layer) for _, layer in model.lamda_layers()]
    model.merge()
    torch.testing.assert_close(model(x), out, atol=2e-5, rtol=1e-4)
    model.unmerge()
    assert torch.equal(model(x), out)
    assert digests == [quantized_digest(layer.base_layer) for _, layer in model.lamda_layers()]
    layer = model.model.l1
    reference = dequantized_weight(layer.base_layer).double() + layer.scaling * (
        layer.B.double() @ layer.S.double() @ layer.A.double()
    )
    plain = model.merge_and_unload()
    assert type(plain.l1) is nn.Linear and plain.l1.weight.dtype == torch.float32
    torch.testing.assert_close(plain.l1.weight.double(), reference, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(plain(x), out, atol=2e-5, rtol=1e-4)


def test_export_lora_against_the_original_base_states_its_error(tmp_path):
    """The exported LoRA on the original full-precision W computes W + scaling (B S - B0 S0) A; the
    QLaMDA model computes Q(W_res) + scaling B S A. They differ by exactly the residual's
    quantization error: y_lora - y_qlamda = x (W_res - deq(Q(W_res)))^T."""
    from peft import PeftModel

    x = _x()
    model = get_lamda_model(Tiny(), _config("nf4"))
    _train(model, x, 3, total=10)
    layer = model.model.l1
    h = _x(5, 64, seed=4)
    y_qlamda = layer(h).detach().double()
    model.export_lora(tmp_path / "lora")
    original = Tiny()
    W = original.l1.weight.detach().double()
    peft_model = PeftModel.from_pretrained(original, tmp_path / "lora")
    y_lora = peft_model.base_model.model.l1(h).detach().double()
    w_res = W - layer.scaling * (layer.B0.double() @ layer.S0.double() @ layer.A.double())
    quant_error = w_res - dequantized_weight(layer.base_layer).double()
    torch.testing.assert_close(y_lora - y_qlamda, h.double() @ quant_error.T, atol=2e-5, rtol=1e-4)
    assert float(quant_error.norm() / W.norm()) > 0  # the stated error is real, not zero


# -- bad input ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"quantize": "int4"}, "quantize"),
        ({"quantize": "nf4", "quant_backend": "torchao"}, "quant_backend"),
        ({"quantize": "nf4", "quant_backend": "gptq"}, "quant_backend"),
        ({"quantize": "nf4", "quant_blocksize": 100}, "quant_blocksize"),
        ({"loftq_iters": 2}, "loftq_iters"),
        ({"quantize": "nf4", "loftq_iters": -1}, "loftq_iters"),
        ({"quantized_residual_sha256": {"l1": "abc"}}, "quantized_residual_sha256"),
    ],
)
def test_bad_config_values_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        LamdaConfig(r=4, **kwargs)


def test_missing_extra_names_it(monkeypatch):
    """Without bitsandbytes importable (a None entry in sys.modules blocks the import, as Python
    does), asking for quantize fails naming the extra; torchao likewise."""
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(MissingQuantExtraError, match=r'pip install "lamda-peft\[quant\]"'):
        LamdaConfig(r=4, quantize="nf4")
    with pytest.raises(ImportError, match="bitsandbytes"):
        LamdaConfig.from_dict({"r": 4, "quantize": "int8"})
    monkeypatch.setitem(sys.modules, "torchao", None)
    with pytest.raises(MissingQuantExtraError, match="torchao"):
        LamdaConfig(r=4, quantize="int8", quant_backend="torchao")
    LamdaConfig(r=4)  # no quantize: nothing needed


def test_layers_that_cannot_be_quantized_are_named_and_nothing_changes():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=64, n_layer=2, n_head=4, n_positions=32))
    with pytest.raises(QuantizationError, match=r"'transformer.h.0.attn.c_attn' is a Conv1D"):
        get_lamda_model(gpt2, LamdaConfig(r=4, target_modules=["c_attn"], quantize="nf4"))
    assert type(gpt2.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    double = Tiny().double()
    with pytest.raises(QuantizationError, match=r"'l1' has a torch.float64 weight"):
        get_lamda_model(double, _config("nf4"))
    quantized = quantize_model_linears(Tiny(), ["l1"], "nf4")
    with pytest.raises(QuantizationError, match="'l1' is already quantized"):
        get_lamda_model(quantized, _config("nf4"))
    with pytest.raises(QuantizationError, match="'l2' is a full-precision Linear"):
        get_lamda_model(quantized, LamdaConfig(r=4, target_modules=["l1", "l2"]))
    assert type(quantized.l2) is nn.Linear and type(quantized.l1).__name__ == "Linear4bit"


def test_peft_get_peft_model_refuses_quantize():
    import peft

    with pytest.raises(ValueError, match="quantize is supported by lamda_peft.get_lamda_model"):
        peft.get_peft_model(Tiny(), _config("nf4"))


def test_qlora_baseline_uses_peft_bitsandbytes_layers():
    """`quantize_model_linears` + PEFT LoRA: PEFT picks its own bitsandbytes LoRA layer (real QLoRA)."""
    import peft
    from peft.tuners.lora.bnb import Linear4bit as PeftLoraLinear4bit

    x = _x()
    model = quantize_model_linears(Tiny(), ["l1", "l2"], "nf4")
    before = model(x).detach()
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["l1", "l2"]))
    assert isinstance(lora.base_model.model.l1, PeftLoraLinear4bit)
    assert torch.equal(lora(x), before)  # LoRA's B starts at 0


# -- the CLI -----------------------------------------------------------------------------------------
CLI_FAST = ["--max-length", "48", "--batch-size", "8", "--quiet", "--max-train-rows", "48", "--max-eval-rows", "16"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lamda", "lora"])
def test_cli_train_quantized(tmp_path, method):
    """`lamda-peft train --quantize nf4`: QLaMDA (its head probed first by default), and PEFT QLoRA
    (LoRA on bitsandbytes Linear4bit, PEFT's own head init)."""
    import json

    from lamda_peft.cli import main

    out = tmp_path / method
    argv = ["train", *CLI_FAST, "--max-steps", "2", "--method", method, "--quantize", "nf4", "--output-dir", str(out)]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_steps"] == 2 and 0 <= metrics["accuracy"] <= 1
    assert json.loads((out / "resolved_config.json").read_text())["quantize"] == "nf4"
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    if method == "lamda":
        assert adapter["quantize"] == "nf4" and len(adapter["quantized_residual_sha256"]) == 36  # MiniLM's linears
        assert metrics["head_probe"]["rows"] == 48  # the NF4 default fits the head first (--head-init probe)
        assert metrics["trainable_params_end"] < metrics["trainable_params_start"]
    else:
        assert adapter["peft_type"] == "LORA" and "head_probe" not in metrics


def test_cli_quantize_bad_combinations(tmp_path, capsys):
    from lamda_peft.cli import main

    base = ["train", *CLI_FAST, "--max-steps", "1", "--output-dir", str(tmp_path / "x")]
    assert main([*base, "--method", "vera", "--quantize", "nf4"]) == 2
    assert "--quantize works with --method lamda, lamda++ or lora" in capsys.readouterr().err
    assert main([*base, "--method", "lora", "--quantize", "nf4", "--loftq-iters", "2"]) == 2
    assert "--loftq-iters applies to LaMDA" in capsys.readouterr().err


@pytest.mark.slow
def test_quantization_error_benchmark_quick(tmp_path):
    """benchmarks/quantization_error.py --quick writes the documented JSON; on the tiny Llama
    (r = d/4) the residual and LoftQ variants beat plain NF4 on every linear."""
    import json
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "q.json"
    subprocess.run(
        [sys.executable, str(root / "benchmarks" / "quantization_error.py"), "--quick", "--out", str(out)],
        check=True,
        cwd=root,
        timeout=600,
    )
    data = json.loads(out.read_text())
    assert data["quick"] is True and data["command"].startswith("python ")
    assert {"bitsandbytes", "torchao", "torch", "cpu"} <= set(data["machine"])
    summary = data["models"]["tiny"]["summary"]
    assert summary["linears"] == 14 == len(data["models"]["tiny"]["per_linear"])
    assert summary["linears_improved"] == {"residual": 14, "loftq5": 14}
    assert summary["median_ratio_plain_over"]["loftq5"] > summary["median_ratio_plain_over"]["residual"] > 1
    assert summary["output_ratio_plain_over"]["residual"] > 1


@pytest.mark.parametrize(("quantize", "backend"), FORMATS, ids=FORMAT_IDS)
def test_weights_as_quantized_shows_q_inside_and_restores_w_bitwise(quantize, backend):
    """The gradient init's calibration view: deq(Q(W)) inside the block, W bitwise after it, also
    when the block raises."""
    from lamda_peft.quantization import weights_as_quantized

    model, original = Tiny(), Tiny()
    config = _config(quantize, backend)
    expected = dequantized_weight(quantize_linear(original.l1.weight, None, quantize, backend)).float()
    with pytest.raises(RuntimeError, match="calibration failed"), weights_as_quantized(model, ["l1", "l2"], config):
        assert torch.equal(model.l1.weight, expected)
        assert not torch.equal(model.l1.weight, original.l1.weight)
        raise RuntimeError("calibration failed")
    for name in ("l1", "l2", "head"):
        assert torch.equal(getattr(model, name).weight, getattr(original, name).weight), name


# -- a wrong modules_to_save, the delta form on a full-precision base, merge while disabled, resume ----
@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_unknown_modules_to_save_is_refused_before_anything_changes(quantize):
    model = Tiny()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = LamdaConfig(r=4, target_modules=["l1", "l2"], modules_to_save=["nope"], quantize=quantize)
    with pytest.raises(
        ConfigError, match="modules_to_save entry .nope. matches no module of the model; expected exactly one"
    ):
        get_lamda_model(model, cfg)
    assert all(type(m) is nn.Linear for m in (model.l1, model.l2, model.head))
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert cfg.quantized_residual_sha256 == {}


def test_int8_merge_and_unload_of_a_bf16_model_stays_bf16():
    """bitsandbytes dequantizes int8 to float32; the merged layers keep the model's bf16."""
    x = _x().bfloat16()
    model = get_lamda_model(Tiny().bfloat16(), _config("int8"))
    _train(model, x, 2, total=10)
    with torch.no_grad():
        out = model(x).float()
        plain = model.merge_and_unload()
        assert plain.l1.weight.dtype == plain.l2.weight.dtype == torch.bfloat16
        merged = plain(x)
    assert merged.dtype == torch.bfloat16
    torch.testing.assert_close(merged.float(), out, atol=5e-2, rtol=5e-2)


def test_adapter_of_an_already_quantized_model_is_refused_on_the_full_precision_base(tmp_path):
    base = quantize_model_linears(Tiny(), ["l1", "l2"], "nf4")
    model = get_lamda_model(base, LamdaConfig(r=8, target_modules=["l1", "l2"], modules_to_save=["head"]))
    _train(model, _x(), 2, total=10)
    model.save_pretrained(tmp_path / "adapter")
    assert base.is_loaded_in_4bit
    merged = get_lamda_model(
        quantize_model_linears(Tiny(), ["l1", "l2"], "nf4"), LamdaConfig(r=8, target_modules=["l1", "l2"])
    )
    plain = merged.merge_and_unload()
    assert type(plain.l1) is nn.Linear and not plain.is_loaded_in_4bit  # full precision again: not flagged as 4-bit
    full = Tiny()
    state = {k: v.clone() for k, v in full.state_dict().items()}
    with pytest.raises(AdapterLoadError, match="trained on a quantized base"):
        LamdaModel.from_pretrained(full, tmp_path / "adapter")
    assert all(type(m) is nn.Linear for m in (full.l1, full.l2, full.head))
    assert all(p.requires_grad for p in full.parameters())
    assert all(torch.equal(v, state[k]) for k, v in full.state_dict().items())


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_merge_inside_disable_adapter_is_refused(quantize):
    x = _x()
    model = get_lamda_model(Tiny(), _config(quantize))
    _train(model, x, 2, total=10)
    out = model(x).detach()
    with model.disable_adapter(), pytest.raises(RuntimeError, match="inside disable_adapter"):
        model.merge()
    assert not any(layer.merged for _, layer in model.lamda_layers())
    assert torch.equal(model(x), out)


def test_resume_on_other_quantization_settings_is_refused(tmp_path):
    from lamda_peft.checkpoint import load_adapter_state

    x = _x()
    model = get_lamda_model(Tiny(), _config("nf4"))
    _train(model, x, 2, total=10)
    model.save_pretrained(tmp_path / "ckpt")
    for other, match in (
        (_config("fp4"), "quantize='nf4'"),
        (_config("nf4", quant_blocksize=128), "quant_blocksize=64"),
        (_config("int8"), "quantize='nf4'"),
    ):
        resumed = get_lamda_model(Tiny(), other)
        before = {k: v.clone() for k, v in resumed.adapter_state_dict().items()}
        with pytest.raises(AdapterLoadError, match=match):
            load_adapter_state(resumed, tmp_path / "ckpt")
        assert all(torch.equal(v, before[k]) for k, v in resumed.adapter_state_dict().items())
    with pytest.raises(AdapterLoadError, match="quantized bases differ"):  # same settings, another base
        load_adapter_state(get_lamda_model(Tiny(seed=5), _config("nf4")), tmp_path / "ckpt")
    same = get_lamda_model(Tiny(), _config("nf4"))
    load_adapter_state(same, tmp_path / "ckpt")
    assert torch.equal(same(x), model(x))


def test_moving_a_merged_model_reaches_the_quantized_base_kept_for_unmerge():
    model = get_lamda_model(Tiny(), _config("nf4"))
    model.merge()
    model.to(torch.bfloat16)  # the GPU version of this (merge, .to(cuda), unmerge) is in test_gpu.py
    model.unmerge()
    for _, layer in model.lamda_layers():
        assert layer.base_layer.bias.dtype == torch.bfloat16


def test_weights_as_quantized_quantizes_a_tied_weight_once_and_restores_w():
    from lamda_peft.quantization import weights_as_quantized

    model, original = Tiny(), Tiny()
    model.l2.weight = model.l1.weight  # tied: two targets, one tensor
    expected = dequantized_weight(quantize_linear(original.l1.weight, None, "nf4")).float()
    with weights_as_quantized(model, ["l1", "l2"], _config("nf4")):
        assert torch.equal(model.l1.weight, expected)  # Q(W), not Q(Q(W))
    assert torch.equal(model.l1.weight, original.l1.weight) and model.l2.weight is model.l1.weight
