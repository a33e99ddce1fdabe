"""Relaxed Recursive Transformers: tying, relaxation exactness, cache, files, errors (tiny decoders)."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import assert_close
from lamda_peft.layer import LamdaLinear
from lamda_peft.recursive import (
    LoraRelaxedLinear,
    RecursiveError,
    decoder_layers,
    layer_linears,
    load_recursive,
    make_recursive,
    parameter_counts,
    relaxations,
    save_recursive,
    shared_parameters,
    shared_sources,
    truncate_layers,
)


def tiny_decoder(arch: str = "llama", layers: int = 4, dtype=torch.float64):
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(0)
    common = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    if arch == "qwen2":  # q/k/v carry biases: they must stay per position
        model = Qwen2ForCausalLM(Qwen2Config(**common))
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.bias.normal_()
    elif arch == "mistral":
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=None))
    elif arch == "gemma":  # RMSNorm as (1 + w), scaled embeddings, GeLU MLP
        from transformers import GemmaConfig, GemmaForCausalLM

        model = GemmaForCausalLM(GemmaConfig(**common, head_dim=8))
    elif arch == "gemma2":  # four norms per layer, soft-capped logits, alternating sliding window
        from transformers import Gemma2Config, Gemma2ForCausalLM

        model = Gemma2ForCausalLM(Gemma2Config(**common, head_dim=8, attn_implementation="eager"))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    with torch.no_grad():  # random norm weights: tying must keep each position's own
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.to(dtype).eval()


IDS = torch.tensor([[1, 5, 9, 2, 33, 7, 11, 3], [4, 4, 8, 60, 2, 19, 5, 1]])


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("init", ["stepwise", "average", "lower"])
@pytest.mark.parametrize("relax", ["lamda", "lora"])
def test_full_rank_relaxation_gives_back_the_original_logits(init, relax):
    model = tiny_decoder()
    expected = logits(model)
    rec = make_recursive(copy.deepcopy(model), unique_layers=2, init=init, relax_rank=10_000, relax=relax)
    assert sorted(rec.recursive_config.capped) == sorted(layer_linears(decoder_layers(model)[0]))
    assert_close(logits(rec), expected)  # float64 tolerance


def test_full_rank_in_float32_within_fp32_tolerance():
    model = tiny_decoder(dtype=torch.float32)
    expected = logits(model)
    rec = make_recursive(copy.deepcopy(model), unique_layers=2, init="average", relax_rank=64)
    assert_close(logits(rec), expected)


def test_mistral_full_rank_is_exact_and_rank_zero_ties():
    model = tiny_decoder("mistral")
    expected = logits(model)
    assert_close(logits(make_recursive(copy.deepcopy(model), 2, init="average", relax_rank=32)), expected)
    tied = make_recursive(copy.deepcopy(model), 2, init="average")
    assert_close(logits(tied), logits(tied_reference(model, 2, "average")))


@pytest.mark.parametrize("arch", ["gemma", "gemma2"])
def test_gemma_layouts_full_rank_is_exact_and_rank_zero_ties(arch):
    model = tiny_decoder(arch)
    expected = logits(model)
    assert_close(logits(make_recursive(copy.deepcopy(model), 2, init="stepwise", relax_rank=64)), expected)
    tied = make_recursive(copy.deepcopy(model), 2, init="average")
    assert_close(logits(tied), logits(tied_reference(model, 2, "average")))
    layers = decoder_layers(tied)  # positions 0 and 2 loop the same shared layer, each with its own norms
    norms0 = {n: p for n, p in layers[0].named_parameters() if "norm" in n}
    norms2 = {n: p for n, p in layers[2].named_parameters() if "norm" in n}
    assert len(norms0) == (4 if arch == "gemma2" else 2) and norms0.keys() == norms2.keys()
    assert all(norms0[n].data_ptr() != norms2[n].data_ptr() for n in norms0)
    q0, q2 = layers[0].self_attn.q_proj, layers[2].self_attn.q_proj
    assert getattr(q0, "weight", q0).data_ptr() == getattr(q2, "weight", q2).data_ptr()  # one shared storage


def test_qwen2_biases_stay_per_position_and_full_rank_is_exact():
    model = tiny_decoder("qwen2")
    expected = logits(model)
    rec = make_recursive(copy.deepcopy(model), unique_layers=1, init="stepwise", relax_rank=100)
    layers = decoder_layers(rec)
    biases = [layer.self_attn.q_proj.base_layer.bias for layer in layers]
    assert len({b.data_ptr() for b in biases}) == len(layers)
    assert_close(logits(rec), expected)


def tied_reference(model, k: int, init: str):
    """The strict looped model built by hand: every position's weights overwritten by copies."""
    ref = copy.deepcopy(model)
    layers = decoder_layers(ref)
    originals = [{n: m.weight.detach().clone() for n, m in layer_linears(layer).items()} for layer in layers]
    sources = shared_sources(len(layers), k, init)
    with torch.no_grad():
        for pos, layer in enumerate(layers):
            for name, lin in layer_linears(layer).items():
                lin.weight.copy_(torch.stack([originals[i][name] for i in sources[pos % k]]).mean(0))
    return ref


@pytest.mark.parametrize("init", ["stepwise", "average", "lower"])
def test_rank_zero_is_the_plain_looped_model(init):
    model = tiny_decoder()
    rec = make_recursive(copy.deepcopy(model), unique_layers=2, init=init, relax_rank=0)
    assert relaxations(rec) == []
    assert_close(logits(rec), logits(tied_reference(model, 2, init)))


def test_stepwise_and_lower_sources():
    assert shared_sources(30, 15, "stepwise")[:3] == [[0], [2], [4]]
    assert shared_sources(30, 10, "stepwise")[-1] == [27]
    assert shared_sources(30, 15, "lower")[14] == [14]
    assert shared_sources(6, 2, "average") == [[0, 2, 4], [1, 3, 5]]


def test_weights_are_really_shared_one_storage():
    rec = make_recursive(tiny_decoder(), unique_layers=2, relax_rank=4)
    layers = decoder_layers(rec)
    for name in layer_linears(layers[0]):
        if name.endswith("base_layer"):
            ptrs = [layer.get_submodule(name).weight.data_ptr() for layer in layers]
            assert ptrs[0] == ptrs[2] and ptrs[1] == ptrs[3] and ptrs[0] != ptrs[1]
            assert layers[0].get_submodule(name).weight is layers[2].get_submodule(name).weight
    assert len(shared_parameters(rec)) == 2 * 7
    # each position keeps its own norms
    assert layers[0].input_layernorm.weight.data_ptr() != layers[2].input_layernorm.weight.data_ptr()


def test_gradient_from_every_loop_reaches_the_shared_weight():
    rec = make_recursive(tiny_decoder(), unique_layers=2, relax_rank=0)
    rec.train()
    w = decoder_layers(rec)[0].mlp.down_proj.weight
    rec(input_ids=IDS, labels=IDS).loss.backward()
    grad_total = w.grad.clone()
    # the same gradient as the sum over the two positions of a copy-tied model
    ref = tied_reference(tiny_decoder(), 2, "stepwise").train()
    ref(input_ids=IDS, labels=IDS).loss.backward()
    layers = decoder_layers(ref)
    assert_close(grad_total, layers[0].mlp.down_proj.weight.grad + layers[2].mlp.down_proj.weight.grad)


def test_unique_parameter_count():
    model = tiny_decoder()
    full = sum(p.numel() for p in model.parameters())
    r = 4
    rec = make_recursive(copy.deepcopy(model), unique_layers=2, relax_rank=r)
    layer0 = decoder_layers(model)[0]
    lin = layer_linears(layer0)
    linear_params = sum(m.weight.numel() for m in lin.values())
    relax_params = sum(r * (m.in_features + m.out_features) + r * r for m in lin.values())
    expected = full - 2 * linear_params + 4 * relax_params  # two of the four blocks' linears are gone
    assert parameter_counts(rec)["unique"] == expected
    assert parameter_counts(make_recursive(copy.deepcopy(model), 4, relax_rank=0))["unique"] == full


def test_lora_relaxation_is_a_trainable_pair_and_lamda_freezes_a():
    rec = make_recursive(tiny_decoder(), unique_layers=2, relax_rank=3, relax="lora")
    assert all(isinstance(m, LoraRelaxedLinear) and m.lora_A.requires_grad for m in relaxations(rec))
    rec = make_recursive(tiny_decoder(), unique_layers=2, relax_rank=3, relax="lamda")
    assert all(isinstance(m, LamdaLinear) and not m.A.requires_grad and m.dS.requires_grad for m in relaxations(rec))


def test_freeze_shared_keeps_shared_weights_out_of_training():
    rec = make_recursive(tiny_decoder(), unique_layers=2, relax_rank=3, freeze_shared=True)
    assert not any(p.requires_grad for p in shared_parameters(rec))
    assert all(m.dB.requires_grad for m in relaxations(rec))


def test_forward_with_labels_and_generate_cache_equals_recompute():
    rec = make_recursive(tiny_decoder(dtype=torch.float32), unique_layers=2, relax_rank=4)
    out = rec(input_ids=IDS, labels=IDS)
    assert torch.isfinite(out.loss)
    prompt = IDS[:1, :4]
    with torch.no_grad():
        cached = rec.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
        ids = prompt
        for _ in range(8):  # greedy recomputed from scratch at every step, no cache
            nxt = rec(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    assert torch.equal(cached, ids)


@pytest.mark.parametrize("relax", ["lamda", "lora"])
def test_save_load_bitwise_and_size_follows_unique_parameters(tmp_path, relax):
    model = tiny_decoder()
    rec = make_recursive(copy.deepcopy(model), unique_layers=2, relax_rank=3, relax=relax)
    with torch.no_grad():  # move the trainable state off its init so the round trip is not trivial
        for p in rec.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_recursive(rec, tmp_path / "rec")
    back = load_recursive(tmp_path / "rec")
    assert torch.equal(logits(back), logits(rec))
    for (name, a), (_, b) in zip(rec.state_dict().items(), back.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    layers = decoder_layers(back)
    assert layers[0].self_attn.q_proj.base_layer.weight is layers[2].self_attn.q_proj.base_layer.weight
    # strict model: the file size follows the unique parameters (8 bytes each in float64)
    strict = make_recursive(copy.deepcopy(model), unique_layers=2, relax_rank=0)
    full = make_recursive(copy.deepcopy(model), unique_layers=4, relax_rank=0)  # K = N: the original model
    size_strict = (save_recursive(strict, tmp_path / "s") / "model.safetensors").stat().st_size
    size_full = (save_recursive(full, tmp_path / "f") / "model.safetensors").stat().st_size
    ratio = parameter_counts(strict)["unique"] / parameter_counts(full)["unique"]
    assert size_strict / size_full == pytest.approx(ratio, rel=0.02)
    assert 8 * parameter_counts(strict)["unique"] <= size_strict < 8 * parameter_counts(strict)["unique"] + 20_000


def test_truncate_layers_is_the_cut_baseline():
    model = truncate_layers(tiny_decoder(), 2)
    assert len(decoder_layers(model)) == 2 and model.config.num_hidden_layers == 2
    assert torch.isfinite(model(input_ids=IDS, labels=IDS).loss)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"unique_layers": 3}, "divisor of the 4"),
        ({"unique_layers": 2, "relax_rank": -1}, "relax_rank"),
        ({"unique_layers": 2, "init": "middle"}, "unknown init"),
        ({"unique_layers": 2, "relax": "dora"}, "unknown relax"),
    ],
)
def test_clear_errors(kwargs, message):
    with pytest.raises(RecursiveError, match=message):
        make_recursive(tiny_decoder(), **kwargs)


def test_unknown_architecture_is_refused(tiny_gpt2_model=None):
    from conftest import tiny_gpt2

    with pytest.raises(RecursiveError, match="model.model.layers"):
        make_recursive(tiny_gpt2(), unique_layers=1)
    with pytest.raises(RecursiveError, match="already recursive"):
        make_recursive(make_recursive(tiny_decoder(), 2), 2)


def test_a_position_equal_to_its_shared_layer_gets_a_trainable_zero_relaxation():
    rec = make_recursive(tiny_decoder(), unique_layers=2, init="lower", relax_rank=3).train()
    q = decoder_layers(rec)[0].self_attn.q_proj  # position 0 IS shared layer 0: residual 0
    assert torch.count_nonzero(q.B0) == 0 and torch.count_nonzero(q.A) > 0
    rec(input_ids=IDS, labels=IDS).loss.backward()
    assert torch.count_nonzero(q.dB.grad) > 0


@pytest.mark.slow
def test_smollm2_tied_models_order_as_the_paper_says():
    """Real weights: full < average-init strict < stepwise strict on held-out text; shared storage."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lamda_peft import assets
    from lamda_peft.cli.recursive import heldout_loss, heldout_texts

    path = assets.smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    texts = heldout_texts("drug-reviews", 8)
    full = heldout_loss(base, tokenizer, texts, 64)
    full_count = parameter_counts(base)["unique"]
    average = make_recursive(copy.deepcopy(base), 15, init="average")
    avg_loss = heldout_loss(average, tokenizer, texts, 64)
    stepwise = make_recursive(base, 15, init="stepwise")
    step_loss = heldout_loss(stepwise, tokenizer, texts, 64)
    assert full < 5 < avg_loss < step_loss
    layers = decoder_layers(stepwise)
    assert layers[3].mlp.up_proj.weight is layers[18].mlp.up_proj.weight
    per_layer = sum(m.weight.numel() for m in layer_linears(layers[0]).values())
    assert parameter_counts(stepwise)["unique"] == full_count - 15 * per_layer
