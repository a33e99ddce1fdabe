"""LaMDA as a PEFT method, against the real peft: registration, training with the schedule,
save/reload (bitwise), merge, disable, several named adapters, modules_to_save, transformers'
load_adapter, the version guard and bad folders."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import peft
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import PeftType
from safetensors import safe_open

import lamda_peft
from conftest import assert_close, tiny_bert, tiny_gpt2, tiny_llama
from lamda_peft import AdapterLoadError, ConfigError, LamdaConfig, LamdaModel, attach_optimizer, get_lamda_model
from lamda_peft.integrations import peft_registration
from lamda_peft.integrations.peft_layer import LamdaAdapter, LamdaPeftLinear
from lamda_peft.integrations.peft_training import lamda_adapters
from lamda_peft.spectral import spectral_factors

ROOT = Path(__file__).resolve().parents[1]


def ids(vocab: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(seed))


def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def perturb(model, seed: int = 0) -> None:
    """Give every LaMDA adapter a non-trivial dS, dB (as if trained)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for unit in lamda_adapters(model):
            unit.dS.add_(0.1 * torch.randn(unit.dS.shape, generator=g, dtype=unit.dS.dtype))
            unit.dB.add_(0.1 * torch.randn(unit.dB.shape, generator=g, dtype=unit.dB.dtype))


def llama_peft(**kw) -> PeftModel:
    kw.setdefault("r", 4)
    kw.setdefault("target_modules", ["q_proj", "v_proj"])
    return get_peft_model(tiny_llama(), LamdaConfig(**kw))


# -- registration --------------------------------------------------------------------------------
def test_import_registers_lamda_as_peft_method():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING

    assert peft_registration.is_registered()
    assert PeftType("LAMDA") is PeftType.LAMDA is PeftType["LAMDA"] and PeftType.LAMDA in list(PeftType)
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.LAMDA] is LamdaConfig
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.LAMDA] == "lamda_"
    lamda_peft.register_with_peft()  # idempotent
    assert LamdaConfig(r=2).peft_type is PeftType.LAMDA  # PEFT and transformers read `.value`


@pytest.mark.parametrize("init", ["orthonormal", "zero"])
def test_get_peft_model_returns_peft_model_equal_to_base_at_step_0(init):
    base = tiny_llama()
    x = ids()
    expected = logits(base, x)
    model = get_peft_model(base, LamdaConfig(r=4, target_modules="all-linear", init=init))
    assert isinstance(model, PeftModel) and model.peft_type == PeftType.LAMDA
    assert torch.equal(logits(model, x), expected)  # the offset B S - B0 S0 is exactly 0 at init
    trainable = {n.split(".lamda_adapter.default.")[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"dS", "dB"}


@pytest.mark.parametrize(
    "make,config",
    [
        (tiny_bert, dict(target_modules="all-linear", modules_to_save=["classifier"])),
        (tiny_llama, dict(target_modules=["q_proj", "down_proj"])),
        (tiny_gpt2, dict(target_modules=None)),
    ],
)
def test_same_modules_as_get_lamda_model(make, config):
    ours = [n for n, _ in get_lamda_model(make(), LamdaConfig(r=2, **config)).lamda_layers()]
    model = get_peft_model(make(), LamdaConfig(r=2, **config))
    theirs = [n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, LamdaPeftLinear)]
    assert theirs == ours
    assert model.peft_config["default"].target_modules == ours or config["target_modules"] != "all-linear"


def test_same_function_as_lamda_model_float64():
    """PEFT's offset form (W + s(BS - B0S0)A) equals LamdaModel's residual form (W_res + s BSA)."""
    cfg = dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"])
    ours = get_lamda_model(tiny_llama().double(), LamdaConfig(**cfg))
    theirs = get_peft_model(tiny_llama().double(), LamdaConfig(**cfg))
    perturb(theirs)
    with torch.no_grad():
        for (_, layer), unit in zip(ours.lamda_layers(), lamda_adapters(theirs), strict=True):
            assert torch.equal(layer.A, unit.A) and torch.equal(layer.B0, unit.B0)
            layer.dS.copy_(unit.dS)
            layer.dB.copy_(unit.dB)
    assert_close(logits(theirs, ids()), logits(ours, ids()))


def test_layer_matches_dense_float64_reference():
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 10, dtype=torch.float64)
    w, b = base.weight.detach().clone(), base.bias.detach().clone()
    layer = LamdaPeftLinear(base, "default", factors=spectral_factors(w, 3, dtype=torch.float64), scaling=0.5).eval()
    adapter = layer.lamda_adapter["default"]
    with torch.no_grad():
        adapter.dS.normal_()
        adapter.dB.normal_()
    x = torch.randn(5, 12, dtype=torch.float64)
    B, S = adapter.B0 + adapter.dB, adapter.S0 + adapter.dS
    dense = w + 0.5 * (B @ S - adapter.B0 @ adapter.S0) @ adapter.A
    assert_close(layer(x), x @ dense.T + b)
    assert torch.equal(base.weight, w)  # the base weight is never rewritten


# -- training with the schedule ------------------------------------------------------------------
def train_steps(model, optimizer, steps: int, x: torch.Tensor, on_step=None) -> None:
    model.train()
    for _ in range(steps):
        model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if on_step:
            on_step()


def test_training_freezes_b_on_schedule_bitwise():
    """T=6, freeze_fraction=0.5: t_i=3, n(k)=min(4, floor(4k/3)); a frozen column never moves again
    under AdamW with weight decay, and a fully frozen B leaves the optimizer while S keeps training."""
    model = llama_peft(freeze_fraction=0.5)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    schedule = attach_optimizer(model, optimizer, total_steps=6)
    units = lamda_adapters(model)
    assert len(units) == 4 and schedule.t_i == 3
    pinned: dict[tuple[int, int], torch.Tensor] = {}
    S_at_3 = []

    def check():
        k = int(units[0].step)
        for i, unit in enumerate(units):
            assert int(unit.step) == k and unit.n_frozen == min(4, 4 * k // 3)
            assert unit.frozen[: unit.n_frozen].all()  # largest_first: column 0 first
            for j in unit.frozen.nonzero().flatten().tolist():
                col = unit.dB[:, j].detach().clone()
                assert torch.equal(pinned.setdefault((i, j), col), col), f"adapter {i} column {j} moved"
        if k == 3:
            S_at_3.extend(u.S.detach().clone() for u in units)

    train_steps(model, optimizer, 6, ids(), on_step=check)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for unit, s3 in zip(units, S_at_3, strict=True):
        assert not unit.dB.requires_grad and id(unit.dB) not in in_optimizer and unit.dB not in optimizer.state
        assert not torch.equal(unit.S, s3)  # the core keeps training after B froze


def test_peft_model_method_and_lamda_callback_drive_the_schedule():
    """`peft_model.attach_optimizer` exists (PeftModel forwards to the tuner), so the Trainer callback
    that drives LamdaModel drives a PeftModel as well."""
    from transformers import TrainerControl, TrainerState

    from lamda_peft.integrations.hf_trainer import LamdaCallback

    model = llama_peft(freeze_fraction=0.5)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    callback = LamdaCallback()
    callback.on_train_begin(None, TrainerState(max_steps=2), TrainerControl(), model=model, optimizer=optimizer)
    train_steps(model, optimizer, 2, ids())
    assert all(u.n_frozen == u.r for u in lamda_adapters(model))  # t_i = 1
    assert model.trainable_parameter_count() == 4 * 4 * 4  # four adapted matrices, r^2 each
    assert callback.history[0][1] == sum(4 * 4 + 4 * u.d_out for u in lamda_adapters(model))


def test_training_without_attach_optimizer_warns():
    model = llama_peft()
    model.train()
    with pytest.warns(RuntimeWarning, match="without a freezing schedule"):
        model(input_ids=ids(), labels=ids()).loss.backward()


def test_attach_optimizer_refuses_a_model_with_nothing_to_train():
    model = llama_peft()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable LaMDA adapter"):
        attach_optimizer(model, torch.optim.SGD([torch.zeros(1, requires_grad=True)]), total_steps=3)


# -- save / reload / merge / disable --------------------------------------------------------------
def test_save_pretrained_writes_peft_folder_and_reload_is_bitwise(tmp_path):
    model = llama_peft(freeze_fraction=0.5)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    attach_optimizer(model, optimizer, total_steps=6)
    train_steps(model, optimizer, 2, ids())  # mid-run: 2 of 4 columns frozen
    model.eval()
    expected = logits(model, ids(seed=1))
    model.save_pretrained(tmp_path)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in tmp_path.iterdir()}
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LAMDA" and config["r"] == 4 and config["target_modules"] == ["q_proj", "v_proj"]
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lamda_adapter.A" in keys and len(keys) == 4 * 7

    restored = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert torch.equal(logits(restored, ids(seed=1)), expected)
    assert not any(p.requires_grad for p in restored.parameters())  # inference mode by default

    # Resumption: the step counter and pinned columns come back; the schedule continues from step 2.
    resumed = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    units = lamda_adapters(resumed)
    before = [u.dB.detach().clone() for u in units]
    assert [int(u.step) for u in units] == [2] * 4 and [u.n_frozen for u in units] == [2] * 4
    optimizer = torch.optim.AdamW([p for p in resumed.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    attach_optimizer(resumed, optimizer, total_steps=6)
    train_steps(resumed, optimizer, 2, ids())
    for unit, dB in zip(units, before, strict=True):
        assert int(unit.step) == 4 and unit.n_frozen == 4
        assert torch.equal(unit.dB[:, :2], dB[:, :2])  # frozen before the save: never moved


def test_merge_and_unload_and_unmerge(tmp_path):
    model = llama_peft()
    perturb(model)
    x = ids()
    expected = logits(model, x)
    original = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()
    model.merge_adapter()
    assert_close(logits(model, x), expected)
    model.unmerge_adapter()
    assert_close(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight, original)
    merged = model.merge_and_unload()
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not any(isinstance(m, LamdaPeftLinear) for m in merged.modules())
    assert_close(logits(merged, x), expected)


def test_merge_conv1d_gpt2():
    model = get_peft_model(tiny_gpt2(), LamdaConfig(r=4, target_modules=["c_attn", "c_fc"]))
    perturb(model)
    expected = logits(model, ids(100))
    assert_close(logits(model.merge_and_unload(), ids(100)), expected)


def test_disable_adapter_gives_the_base_model_exactly():
    base = tiny_llama()
    expected = logits(base, ids())
    model = get_peft_model(base, LamdaConfig(r=4, target_modules="all-linear"))
    perturb(model)
    adapted = logits(model, ids())
    assert not torch.equal(adapted, expected)
    with model.disable_adapter():
        assert torch.equal(logits(model, ids()), expected)
    assert torch.equal(logits(model, ids()), adapted)


def test_disable_adapter_does_not_thaw_a_frozen_b():
    model = llama_peft(freeze_fraction=0.0)  # B frozen from the start
    attach_optimizer(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1), 4)
    with model.disable_adapter():
        pass
    model.set_adapter("default")
    assert all(u.dS.requires_grad and not u.dB.requires_grad for u in lamda_adapters(model))


# -- several named adapters ------------------------------------------------------------------------
def test_second_adapter_set_adapter_and_reload(tmp_path):
    base = tiny_llama()
    expected_base = logits(base, ids())
    model = get_peft_model(base, LamdaConfig(r=4, target_modules=["q_proj", "v_proj"]))
    perturb(model)
    first = logits(model, ids())
    model.add_adapter("second", LamdaConfig(r=2, target_modules="all-linear", freeze_fraction=0.5))
    assert torch.equal(logits(model, ids()), first)  # adding does not change the active adapter
    model.set_adapter("second")
    assert torch.equal(logits(model, ids()), expected_base)  # the new adapter starts at the base model
    trainable = {n.split(".lamda_adapter.")[1].split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"second"}

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    attach_optimizer(model, optimizer, total_steps=4)
    train_steps(model, optimizer, 2, ids())
    model.eval()
    second = logits(model, ids())
    steps = {name: {int(m.lamda_adapter[name].step) for m in model.modules() if isinstance(m, LamdaPeftLinear)
                    and name in m.lamda_adapter} for name in ("default", "second")}  # fmt: skip
    assert steps == {"default": {0}, "second": {2}}  # only the trained adapter's schedule advanced
    model.set_adapter("default")
    assert torch.equal(logits(model, ids()), first)

    model.save_pretrained(tmp_path)  # "second" goes to tmp_path / "second"
    restored = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    restored.load_adapter(tmp_path / "second", adapter_name="second")
    assert torch.equal(logits(restored, ids()), first)
    restored.set_adapter("second")
    assert torch.equal(logits(restored, ids()), second)
    restored.delete_adapter("second")
    assert not any("second" in m.lamda_adapter for m in restored.modules() if isinstance(m, LamdaPeftLinear))


# -- modules_to_save -------------------------------------------------------------------------------
def test_modules_to_save_trains_saves_and_restores(tmp_path):
    x = ids(100)
    model = get_peft_model(tiny_bert(), LamdaConfig(r=4, target_modules="all-linear", modules_to_save=["classifier"]))
    classifier = model.base_model.model.classifier
    assert type(classifier).__name__ == "ModulesToSaveWrapper"
    assert not any(isinstance(m, LamdaPeftLinear) for m in classifier.modules())
    before = classifier.original_module.weight.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    attach_optimizer(model, optimizer, total_steps=3)
    model.train()
    for _ in range(3):
        model(input_ids=x, labels=torch.tensor([0, 2])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    assert not torch.equal(classifier.modules_to_save["default"].weight, before)
    assert torch.equal(classifier.original_module.weight, before)
    expected = logits(model, x)
    model.save_pretrained(tmp_path)
    restored = PeftModel.from_pretrained(tiny_bert(), tmp_path)
    assert torch.equal(logits(restored, x), expected)


def test_task_type_seq_cls_saves_the_head():
    model = get_peft_model(tiny_bert(), LamdaConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    assert "classifier" in model.peft_config["default"].modules_to_save
    assert any(p.requires_grad for p in model.base_model.model.classifier.parameters())


# -- transformers' load_adapter and a fresh process -------------------------------------------------
def test_transformers_load_adapter_is_bitwise(tmp_path):
    model = llama_peft()
    perturb(model)
    expected = logits(model, ids())
    model.save_pretrained(tmp_path)
    base = tiny_llama()
    base.load_adapter(str(tmp_path))
    assert torch.equal(logits(base, ids()), expected)


def test_fresh_process_imports_lamda_peft_then_from_pretrained(tmp_path):
    model = llama_peft()
    perturb(model)
    model.save_pretrained(tmp_path / "adapter")
    torch.save(logits(model, ids()), tmp_path / "expected.pt")
    script = f"""
import sys, torch
sys.path.insert(0, {str(ROOT / "tests")!r})
import lamda_peft
from peft import PeftModel
from conftest import tiny_llama
from test_peft_integration import ids, logits
restored = PeftModel.from_pretrained(tiny_llama(), {str(tmp_path / "adapter")!r})
assert torch.equal(logits(restored, ids()), torch.load({str(tmp_path / "expected.pt")!r})), "not bitwise"
print("OK")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "OK" in done.stdout, done.stderr[-2000:]


# -- version guard and bad input --------------------------------------------------------------------
def test_version_guard_messages(monkeypatch):
    monkeypatch.delenv(peft_registration.ALLOW_UNTESTED_ENV, raising=False)
    assert peft_registration.peft_support_problem() is None  # the installed peft is a tested one
    for version in ("0.19.1", "0.22.0", "1.0.0"):
        problem = peft_registration.peft_support_problem(version)
        assert version in problem and "tested: 0.20.x, 0.21.x" in problem
    monkeypatch.setenv(peft_registration.ALLOW_UNTESTED_ENV, "1")
    assert peft_registration.peft_support_problem("0.22.0") is None


def test_unsupported_peft_raises_and_import_only_warns(monkeypatch):
    monkeypatch.delenv(peft_registration.ALLOW_UNTESTED_ENV, raising=False)
    monkeypatch.setattr(peft, "__version__", "0.19.0")
    monkeypatch.setattr(peft_registration, "is_registered", lambda: False)
    with pytest.raises(lamda_peft.PeftIntegrationError, match=r"peft 0\.19\.0 is not supported"):
        lamda_peft.register_with_peft()
    with pytest.warns(peft_registration.PeftIntegrationWarning, match="PeftModel.from_pretrained will not accept"):
        assert peft_registration.register_on_import() is False


def test_enum_member_is_a_real_member():
    member = PeftType.LAMDA
    assert isinstance(member, PeftType) and member.value == member.name == "LAMDA" and member == "LAMDA"
    assert json.dumps({"t": member}) == '{"t": "LAMDA"}'


def test_rank_too_large_fails_before_the_model_is_touched():
    base = tiny_llama()
    with pytest.raises(ValueError, match="exceeds min"):
        get_peft_model(base, LamdaConfig(r=4, target_modules="all-linear", rank_pattern={"k_proj": 48}))
    assert not any(isinstance(m, LamdaPeftLinear) for m in base.modules())


def test_non_linear_target_is_refused():
    with pytest.raises(ValueError, match="adapts nn.Linear and HF Conv1D only"):
        get_peft_model(tiny_llama(), LamdaConfig(r=2, target_modules=["mlp"]))


def test_wrong_folders_give_clear_errors(tmp_path):
    lora = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "lora")
    with pytest.raises(ConfigError, match="not a LaMDA adapter"):
        LamdaModel.from_pretrained(tiny_llama(), tmp_path / "lora")
    lamda = llama_peft()
    lamda.save_pretrained(tmp_path / "peft-lamda")
    with pytest.raises(AdapterLoadError, match="metadata format"):  # PEFT's layout is PEFT's to load
        LamdaModel.from_pretrained(tiny_llama(), tmp_path / "peft-lamda")


# -- README ----------------------------------------------------------------------------------------
def readme_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Using LaMDA through PEFT", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_peft_snippet_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    x = ids()
    namespace = {
        "base_model": tiny_llama(),
        "fresh_base_model": tiny_llama(),
        "batches": [{"input_ids": x, "labels": x}] * 3,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the snippet attaches the schedule: no warning
        exec(compile(readme_snippet(), "README.md", "exec"), namespace)
    model = namespace["model"]
    assert all(isinstance(u, LamdaAdapter) and u.n_frozen == u.r for u in lamda_adapters(model))  # t_i = 1
    model.eval()
    expected = logits(model, x)
    assert torch.equal(logits(PeftModel.from_pretrained(tiny_llama(), tmp_path / "lamda-adapter"), x), expected)
    assert_close(logits(namespace["merged"], x), expected)
