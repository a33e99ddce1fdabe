"""Injection into plain and Hugging Face models, counting, merge, bad input."""

import pytest
import torch

from conftest import TinyMLP, assert_close, tiny_bert, tiny_gpt2, tiny_llama
from lamda_peft import ConfigError, LamdaConfig, LamdaLinear, get_lamda_model


@pytest.mark.parametrize("init", ["spectral", "orthonormal", "zero"])
@pytest.mark.parametrize("factory", [tiny_bert, tiny_gpt2, tiny_llama])
def test_outputs_at_init_equal_base(factory, init):
    base = factory()
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        ref = base(input_ids=ids).logits.clone()
    model = get_lamda_model(base, LamdaConfig(r=4, target_modules="all-linear", init=init))
    with torch.no_grad():
        out = model(input_ids=ids).logits
    assert_close(out, ref)


def test_zero_init_starts_like_lora_and_learns_b_first():
    """init="zero": the base weight is untouched (W_res = W bitwise), A holds W's top-r right singular
    vectors, and at step 0 only B gets a gradient (S's is 0 while B = 0), as LoRA-FA's B does."""
    base = tiny_llama()
    weights = {n: m.weight.detach().clone() for n, m in base.named_modules() if n.endswith("q_proj")}
    model = get_lamda_model(base, LamdaConfig(r=4, target_modules=["q_proj"], init="zero", svd="full"))
    for name, layer in model.lamda_layers():
        assert torch.equal(layer.base_layer.weight, weights[name])
        assert not layer.B0.any()
        Vh = torch.linalg.svd(weights[name].double(), full_matrices=False).Vh[:4]
        torch.testing.assert_close(layer.A.double().abs(), Vh.abs(), atol=1e-5, rtol=0)  # up to signs
    ids = torch.randint(0, 128, (2, 10))
    model(input_ids=ids, labels=ids).loss.backward()
    for _, layer in model.lamda_layers():
        assert layer.dB.grad.abs().sum() > 0 and not layer.dS.grad.any()


def test_all_linear_skips_heads_and_freezes_base():
    model = get_lamda_model(tiny_bert(), LamdaConfig(r=4, target_modules="all-linear", modules_to_save=["classifier"]))
    names = [n for n, _ in model.lamda_layers()]
    assert len(names) == 2 * 6 + 1  # q,k,v,attn out,intermediate,output per layer + the pooler
    assert not any("classifier" in n for n in names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.endswith((".dS", ".dB")) or ".classifier." in n for n in trainable)
    assert any(".classifier." in n for n in trainable)


def test_forwards_attributes_to_wrapped_model():
    model = get_lamda_model(tiny_llama(), LamdaConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert model.config.r == 2  # the LaMDA config
    assert model.model.config.hidden_size == 48
    assert model.get_input_embeddings().weight.shape[0] == 128  # forwarded to the HF model
    assert len(list(model.lamda_layers())) == 4


def test_merge_and_unload_returns_plain_model():
    base = tiny_llama()
    model = get_lamda_model(base, LamdaConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for _, layer in model.lamda_layers():
            layer.dS.normal_(0, 0.2)
            layer.dB.normal_(0, 0.05)
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        ref = model(input_ids=ids).logits.clone()
        plain = model.merge_and_unload()
        assert not any(isinstance(m, LamdaLinear) for m in plain.modules())
        assert_close(plain(input_ids=ids).logits, ref)


def test_disable_adapter_gives_base_outputs():
    base = tiny_gpt2()
    ids = torch.randint(0, 100, (1, 8))
    with torch.no_grad():
        ref = base(input_ids=ids).logits.clone()
    model = get_lamda_model(base, LamdaConfig(r=4, target_modules=["c_attn", "c_fc"]))
    with torch.no_grad():
        for _, layer in model.lamda_layers():
            layer.dS.normal_(0, 0.5)
        assert not torch.allclose(model(input_ids=ids).logits, ref, atol=1e-3)
        with model.disable_adapter():
            assert_close(model(input_ids=ids).logits, ref)


def test_rank_pattern_overrides():
    cfg = LamdaConfig(r=4, target_modules=["up", "down"], rank_pattern={"down": 2})
    model = get_lamda_model(TinyMLP(), cfg)
    assert {n: layer.r for n, layer in model.lamda_layers()} == {"up": 4, "down": 2}


# -- bad input --------------------------------------------------------------------------------
def test_rank_too_large_names_the_module():
    with pytest.raises(ValueError, match=r"rank 30 for module 'up'.*min\(d_in, d_out\) = 24"):
        get_lamda_model(TinyMLP(), LamdaConfig(r=30, target_modules=["up", "down"]))


def test_targets_matching_nothing_list_names():
    with pytest.raises(ValueError, match=r"matched no Linear.*'down'.*'up'"):
        get_lamda_model(TinyMLP(), LamdaConfig(r=2, target_modules=["q_proj"]))


def test_target_that_is_not_linear():
    with pytest.raises(ValueError, match="is a LlamaDecoderLayer"):
        get_lamda_model(tiny_llama(), LamdaConfig(r=2, target_modules=["layers.0"]))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"r": 0}, "r must be >= 1"),
        ({"r": 2.5}, "r must be an integer"),
        ({"freeze_fraction": 1.5}, "freeze_fraction must be in"),
        ({"freeze_order": "random"}, "freeze_order must be one of"),
        ({"dropout": -0.1}, "dropout must be in"),
        ({"target_modules": "(["}, "not a valid regex"),
        ({"r_min": 8, "r_max": 4}, "r_min .* must be <= r_max"),
        ({"alpha": float("nan")}, "alpha must be a finite number"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LamdaConfig(**kwargs)


def test_config_unknown_key_and_round_trip(tmp_path):
    cfg = LamdaConfig(r=4, target_modules=["q"], rank_pattern={"a.q": 2}, modules_to_save=["classifier"])
    cfg.save(tmp_path)
    assert LamdaConfig.load(tmp_path) == cfg
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['rank_patern'\]"):
        LamdaConfig.from_dict({"r": 4, "rank_patern": {}})
    with pytest.raises(ConfigError, match="not a LaMDA adapter"):
        LamdaConfig.from_dict({"r": 4, "peft_type": "LORA"})


def test_a_target_with_a_tied_weight_is_refused_and_nothing_changes():
    """SmolLM2 and GPT-2 tie lm_head to the input embedding: W_res written into lm_head would change
    the embedding too, and the model would no longer start as the base model."""
    model = tiny_llama()
    model.lm_head.weight = model.model.embed_tokens.weight  # tied
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"'lm_head' shares its weight with 'model.embed_tokens.weight'"):
        get_lamda_model(model, LamdaConfig(r=4, target_modules=["lm_head", "q_proj"]))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_a_failing_svd_modifies_nothing():
    """Every factor is computed before the first layer is replaced: a weight the SVD cannot take
    (non-finite) leaves the model exactly as it was, unfrozen."""
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight[0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(Exception):  # noqa: B017 - torch's own linalg error (or ValueError) is what the user sees
        get_lamda_model(model, LamdaConfig(r=4, target_modules=["q_proj"], svd="full"))
    assert not any(isinstance(m, LamdaLinear) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items() if not v.isnan().any())
    assert all(p.requires_grad for p in model.parameters())


def test_a_float64_merge_and_unmerge_keep_float64_precision():
    """merge/unmerge of a float64 base add the delta in float64 (they went through float32): the
    round trip is exact to float64 rounding and the merged weight matches a float64 reference."""
    model = get_lamda_model(tiny_llama().double(), LamdaConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for _, layer in model.lamda_layers():
            layer.dS.normal_(0, 0.2)
            layer.dB.normal_(0, 0.05)
    layer = next(layer for _, layer in model.lamda_layers())
    w_res = layer.base_layer.weight.detach().clone()
    expected = w_res + layer.scaling * (layer.B @ layer.S @ layer.A)
    model.merge()
    torch.testing.assert_close(layer.base_layer.weight, expected, atol=1e-14, rtol=0)
    model.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w_res, atol=1e-14, rtol=0)
