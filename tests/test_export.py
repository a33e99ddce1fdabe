"""Export to a plain PEFT LoRA adapter, loaded by the real `peft` on the original base."""

import pytest
import torch
from peft import PeftModel

from conftest import assert_close, tiny_bert, tiny_gpt2
from lamda_peft import LamdaConfig, get_lamda_model


def perturb(model):
    torch.manual_seed(5)
    with torch.no_grad():
        for _, layer in model.lamda_layers():
            layer.dS.normal_(0, 0.2)
            layer.dB.normal_(0, 0.05)


def test_export_matches_lamda_model_in_peft(tmp_path):
    cfg = LamdaConfig(
        r=4,
        alpha=8,
        target_modules="all-linear",
        modules_to_save=["classifier"],
        rank_pattern={"bert.encoder.layer.1.output.dense": 2},
    )
    model = get_lamda_model(tiny_bert(), cfg)
    perturb(model)
    with torch.no_grad():
        model.model.classifier.weight.add_(0.3)
    model.export_lora(tmp_path)
    ids = torch.randint(0, 100, (2, 11))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        peft_model = PeftModel.from_pretrained(tiny_bert(), tmp_path).eval()
        assert_close(peft_model(input_ids=ids).logits, expected)


@pytest.mark.parametrize("init", ["spectral", "orthonormal", "zero"])
def test_export_conv1d_gpt2(tmp_path, init):
    model = get_lamda_model(tiny_gpt2(), LamdaConfig(r=4, target_modules=["c_attn", "c_proj", "c_fc"], init=init))
    perturb(model)
    model.export_lora(tmp_path)
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        got = PeftModel.from_pretrained(tiny_gpt2(), tmp_path).eval()(input_ids=ids).logits
    assert_close(got, expected)
