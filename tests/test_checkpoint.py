"""save_pretrained / from_pretrained: bitwise reload, no SVD at load, atomicity, clear errors."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import tiny_bert
from lamda_peft import AdapterLoadError, ConfigError, LamdaConfig, LamdaLinear, LamdaModel, get_lamda_model
from lamda_peft.checkpoint import WEIGHTS_NAME


def trained_model(steps=4):
    model = get_lamda_model(tiny_bert(), LamdaConfig(r=4, target_modules="all-linear", modules_to_save=["classifier"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model.attach_optimizer(opt, total_steps=10)
    torch.manual_seed(3)
    model.train()
    for _ in range(steps):
        ids = torch.randint(0, 100, (4, 10))
        model(input_ids=ids, labels=torch.randint(0, 3, (4,))).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def test_save_load_is_bitwise(tmp_path, monkeypatch):
    model = trained_model()
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", WEIGHTS_NAME]
    # No base weights in the file: only adapter tensors and the classifier head.
    keys = load_file(tmp_path / WEIGHTS_NAME).keys()
    assert all(".lamda_" in k or k.startswith("classifier.") for k in keys)
    import lamda_peft.spectral as spectral

    def no_svd(*a, **k):
        raise AssertionError("an SVD ran at load time")

    monkeypatch.setattr(spectral, "top_r_svd", no_svd)
    loaded = LamdaModel.from_pretrained(tiny_bert(), tmp_path)
    ids = torch.randint(0, 100, (3, 9))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    for (_, a), (_, b) in zip(model.lamda_layers(), loaded.lamda_layers(), strict=True):
        assert torch.equal(a.base_layer.weight, b.base_layer.weight)  # W_res rebuilt bitwise
        assert torch.equal(a.frozen, b.frozen) and int(a.step) == int(b.step)
        assert a.dB.requires_grad == b.dB.requires_grad


def test_missing_weights_file(tmp_path):
    trained_model(1).save_pretrained(tmp_path)
    (tmp_path / WEIGHTS_NAME).unlink()
    with pytest.raises(AdapterLoadError, match="missing adapter_model.safetensors"):
        LamdaModel.from_pretrained(tiny_bert(), tmp_path)


def test_corrupt_weights_file_leaves_model_untouched(tmp_path):
    trained_model(1).save_pretrained(tmp_path)
    data = (tmp_path / WEIGHTS_NAME).read_bytes()
    (tmp_path / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    base = tiny_bert()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(AdapterLoadError, match="not a valid safetensors file"):
        LamdaModel.from_pretrained(base, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_different_base_names_the_module(tmp_path):
    trained_model(1).save_pretrained(tmp_path)
    from transformers import BertConfig, BertForSequenceClassification

    other = BertForSequenceClassification(
        BertConfig(
            vocab_size=100,
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            num_labels=3,
        )
    )
    with pytest.raises(AdapterLoadError, match=r"module 'bert.encoder.layer.0.attention.self.query'.*shape"):
        LamdaModel.from_pretrained(other, tmp_path)


def test_nan_tensor_refused(tmp_path):
    trained_model(1).save_pretrained(tmp_path)

    with safe_open(str(tmp_path / WEIGHTS_NAME), "pt") as f:
        meta = f.metadata()
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    key = next(k for k in tensors if k.endswith("lamda_dS"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, tmp_path / WEIGHTS_NAME, metadata=meta)
    with pytest.raises(AdapterLoadError, match="NaN or Inf"):
        LamdaModel.from_pretrained(tiny_bert(), tmp_path)


def test_unknown_config_key(tmp_path):
    trained_model(1).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["lora_alpha"] = 16
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['lora_alpha'\]"):
        LamdaModel.from_pretrained(tiny_bert(), tmp_path)


def test_mixed_saves_are_detected(tmp_path):
    """A crash between the two renames leaves new weights beside an old config: refused."""
    trained_model(1).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["freeze_fraction"] = 0.5
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterLoadError, match="different saves"):
        LamdaModel.from_pretrained(tiny_bert(), tmp_path)


def test_failed_write_keeps_previous_adapter(tmp_path, monkeypatch):
    model = trained_model(1)
    model.save_pretrained(tmp_path)
    before = (tmp_path / WEIGHTS_NAME).read_bytes()
    import os

    import lamda_peft.checkpoint as ckpt

    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space left"):
        trained_model(3).save_pretrained(tmp_path)
    monkeypatch.setattr(ckpt.os, "fsync", os.fsync)
    assert (tmp_path / WEIGHTS_NAME).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", WEIGHTS_NAME]  # no temp left
    LamdaModel.from_pretrained(tiny_bert(), tmp_path)  # still loads


def test_resume_refuses_other_run_settings_a_merged_model_and_a_negative_step(tmp_path):
    """load_adapter_state (resumption): the same A, B0, S0 under another alpha or schedule would rescale
    dS and dB or freeze B on another timetable; a merged model would later unmerge the wrong delta."""
    from lamda_peft.checkpoint import load_adapter_state

    model = trained_model()
    model.save_pretrained(tmp_path / "ckpt")
    base = {"r": 4, "target_modules": "all-linear", "modules_to_save": ["classifier"]}
    for change, match in (
        ({"alpha": 16}, "alpha=None"),
        ({"freeze_fraction": 0.9}, "freeze_fraction=0.3"),
        ({"freeze_order": "smallest_first"}, "freeze_order='largest_first'"),
        ({"dropout": 0.1}, "dropout=0.0"),
    ):
        other = get_lamda_model(tiny_bert(), LamdaConfig(**base, **change))
        before = {k: v.clone() for k, v in other.adapter_state_dict().items()}
        with pytest.raises(AdapterLoadError, match=match):
            load_adapter_state(other, tmp_path / "ckpt")
        assert all(torch.equal(v, before[k]) for k, v in other.adapter_state_dict().items())
    merged = get_lamda_model(tiny_bert(), LamdaConfig(**base))
    merged.merge()
    with pytest.raises(AdapterLoadError, match="is merged; unmerge"):
        load_adapter_state(merged, tmp_path / "ckpt")
    tensors = load_file(tmp_path / "ckpt" / WEIGHTS_NAME)
    key = next(k for k in tensors if k.endswith(".lamda_step"))
    tensors[key] = torch.tensor(-3)
    save_file(tensors, tmp_path / "ckpt" / WEIGHTS_NAME, metadata=_metadata(tmp_path / "ckpt"))
    with pytest.raises(AdapterLoadError, match="lamda_step' is negative"):
        load_adapter_state(get_lamda_model(tiny_bert(), LamdaConfig(**base)), tmp_path / "ckpt")
    same = get_lamda_model(tiny_bert(), LamdaConfig(**base))
    model.save_pretrained(tmp_path / "ckpt")
    load_adapter_state(same, tmp_path / "ckpt")
    ids = torch.randint(0, 100, (3, 9))
    with torch.no_grad():
        assert torch.equal(same.eval()(input_ids=ids).logits, model(input_ids=ids).logits)


def _metadata(directory):

    with safe_open(str(directory / WEIGHTS_NAME), framework="pt") as f:
        return f.metadata()


def test_modules_to_save_resolves_on_load_as_on_save(tmp_path):
    """A model with both `classifier` and `x.classifier`: the exact path wins on save and on load."""
    model = tiny_bert()
    model.bert.classifier = torch.nn.Linear(4, 4)  # a second module whose name ends in "classifier"
    cfg = LamdaConfig(r=4, target_modules=["query"], modules_to_save=["classifier"])
    lamda = get_lamda_model(model, cfg)
    with torch.no_grad():
        lamda.model.classifier.weight.add_(1.0)
    lamda.save_pretrained(tmp_path)
    other = tiny_bert()
    other.bert.classifier = torch.nn.Linear(4, 4)
    loaded = LamdaModel.from_pretrained(other, tmp_path)
    assert torch.equal(loaded.model.classifier.weight, lamda.model.classifier.weight)


def test_modules_to_save_suffix_entry_is_one_path_for_save_load_and_export(tmp_path):
    """ "pooler" names `bert.pooler` by suffix: save, load and export_lora all use that one path."""
    cfg = LamdaConfig(r=4, target_modules=["query"], modules_to_save=["pooler"])
    lamda = get_lamda_model(tiny_bert(), cfg)
    with torch.no_grad():
        lamda.model.bert.pooler.dense.weight.add_(1.0)
    assert [path for path, _ in lamda.modules_to_save()] == ["bert.pooler"]
    lamda.save_pretrained(tmp_path / "adapter")
    with safe_open(str(tmp_path / "adapter" / WEIGHTS_NAME), framework="pt") as f:
        assert {k for k in f.keys() if "pooler" in k} == {"bert.pooler.dense.weight", "bert.pooler.dense.bias"}
    loaded = LamdaModel.from_pretrained(tiny_bert(), tmp_path / "adapter")
    assert torch.equal(loaded.model.bert.pooler.dense.weight, lamda.model.bert.pooler.dense.weight)
    lamda.export_lora(tmp_path / "lora")
    with safe_open(str(tmp_path / "lora" / "adapter_model.safetensors"), framework="pt") as f:
        assert "base_model.model.bert.pooler.dense.weight" in set(f.keys())


def test_ambiguous_modules_to_save_entry_names_the_matches():
    model = tiny_bert()
    with pytest.raises(ConfigError, match=r"modules_to_save entry 'dense' matches \d+ modules \(bert\."):
        get_lamda_model(model, LamdaConfig(r=4, target_modules=["query"], modules_to_save=["dense"]))
    assert not any(isinstance(m, LamdaLinear) for m in model.modules())
