"""The PMB freezing schedule: pure policy, and real freezing under AdamW, accumulation and bf16."""

import pytest
import torch

from conftest import TinyMLP
from lamda_peft import LamdaConfig, get_lamda_model
from lamda_peft.schedule import freeze_steps, frozen_count


def test_policy_linear_schedule():
    T, r = 100, 8
    t_i = freeze_steps(T, 0.3)
    assert t_i == 30
    counts = [frozen_count(k, r, t_i) for k in range(T + 1)]
    assert counts[0] == 0 and counts[30] == r and counts[100] == r
    assert counts[15] == 4  # floor(8 * 15 / 30)
    assert all(a <= b for a, b in zip(counts, counts[1:], strict=False))  # monotone
    assert frozen_count(0, r, 0) == r  # freeze_fraction 0: frozen from the start


def make(freeze_fraction=0.3, r=4, **kw):
    torch.manual_seed(0)
    cfg = LamdaConfig(r=r, target_modules=["up", "down"], freeze_fraction=freeze_fraction, **kw)
    return get_lamda_model(TinyMLP(), cfg)


def train(model, steps, accumulation=1, autocast=False, weight_decay=0.1, lr=1e-2, on_step=None):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    model.attach_optimizer(opt, total_steps=steps)
    torch.manual_seed(1)
    for _ in range(steps):
        for _ in range(accumulation):
            x = torch.randn(8, 24)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = model(x).float().pow(2).mean()
            loss.backward()
        opt.step()
        opt.zero_grad()
        if on_step:
            on_step(model, opt)
    return opt


@pytest.mark.parametrize("accumulation,autocast", [(1, False), (3, False), (1, True)])
def test_frozen_columns_never_move(accumulation, autocast):
    """Each column of B, once frozen, stays bit-identical for the rest of 20 AdamW steps
    (weight_decay 0.1), with gradient accumulation and with bf16 autocast."""
    model = make()
    snapshots = {}  # (layer, column) -> values when first seen frozen

    def check(model, opt):
        for name, layer in model.lamda_layers():
            for j in layer.frozen.nonzero().flatten().tolist():
                col = layer.B[:, j].detach().clone()
                if (name, j) in snapshots:
                    assert torch.equal(col, snapshots[(name, j)]), f"{name} column {j} moved after freezing"
                else:
                    snapshots[(name, j)] = col

    train(model, 20, accumulation=accumulation, autocast=autocast, on_step=check)
    assert len(snapshots) == 2 * 4  # every column of both layers froze (t_i = 6 steps)
    for _, layer in model.lamda_layers():
        assert not torch.equal(layer.dS, torch.zeros_like(layer.dS))  # S kept training


def test_trainable_count_follows_schedule_and_state_is_released(monkeypatch):
    import lamda_peft.schedule as schedule

    releases, release = [], schedule.release_parameters
    monkeypatch.setattr(
        schedule, "release_parameters", lambda opt, params: releases.append(len(params)) or release(opt, params)
    )
    model = make(r=4)
    head = sum(p.numel() for p in model.model.head.parameters())  # frozen: not counted
    assert head > 0
    dims = {name: layer.d_out for name, layer in model.lamda_layers()}
    T = 20
    t_i = freeze_steps(T, 0.3)
    counts = []

    def check(model, opt):
        k = int(next(model.lamda_layers())[1].step)
        n = frozen_count(k, 4, t_i)
        expected = sum(16 + d * (4 - n) for d in dims.values())
        assert model.trainable_parameter_count() == expected
        counts.append(model.trainable_parameter_count())
        if k >= t_i:
            for _, layer in model.lamda_layers():
                assert not layer.dB.requires_grad and layer.dB.grad is None
                assert layer.dB not in opt.state
                assert all(layer.dB is not p for g in opt.param_groups for p in g["params"])

    train(model, T, on_step=check)
    assert counts[-1] == 2 * 4 * 4  # exactly sum(r^2) after t_i
    assert counts[0] > counts[-1]
    # Both B's left the optimizer once, together; later steps never scanned its groups again.
    assert releases == [2]
    # Every layer kept counting steps after its B froze, on the device and in the host copy.
    for _, layer in model.lamda_layers():
        assert int(layer.step) == layer.host_step() == T


def test_freeze_fraction_zero_freezes_b_at_attach():
    model = make(freeze_fraction=0.0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model.attach_optimizer(opt, total_steps=10)
    assert model.trainable_parameter_count() == 2 * 16


def test_training_without_schedule_warns_once():
    model = make().train()
    with pytest.warns(RuntimeWarning, match="without a freezing schedule"):
        model(torch.randn(2, 24)).sum().backward()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(torch.randn(2, 24)).sum().backward()  # only once


def test_schedule_step_survives_save_load(tmp_path):
    model = make()
    train(model, 5)
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    from lamda_peft import LamdaModel

    loaded = LamdaModel.from_pretrained(TinyMLP(), tmp_path)
    for (_, a), (_, b) in zip(model.lamda_layers(), loaded.lamda_layers(), strict=True):
        assert int(b.step) == 5 and torch.equal(a.frozen, b.frozen)


def test_training_steps_never_read_the_schedule_state_back_from_the_device(monkeypatch):
    """`frozen` and `step` are read through host copies: a training step (forward, backward with the
    gradient mask, the schedule after the optimizer step) never converts either to a Python value,
    which on a GPU would stall the host once per layer. A write from outside (a load) is still seen."""
    model = make(r=4)
    layers = [layer for _, layer in model.lamda_layers()]
    watched = {t.data_ptr() for layer in layers for t in (layer.frozen, layer.step)}
    reads = []
    for method in ("item", "__bool__", "__int__", "__float__", "tolist"):
        original = getattr(torch.Tensor, method)

        def spy(self, *args, _original=original, _method=method, **kwargs):
            if self.data_ptr() in watched:
                reads.append(_method)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, spy)
    counts, reads_per_step = [], []

    def on_step(m, opt):
        counts.append(m.trainable_parameter_count())
        reads_per_step.append(len(reads))
        reads.clear()

    train(model, 10, on_step=on_step)
    assert counts[0] > counts[-1]  # the schedule did freeze B
    # The first step fills the host copies (one read of each `step`); none after that.
    assert reads_per_step[0] <= len(layers) and reads_per_step[1:] == [0] * 9, reads_per_step
    # A load writes `step` and `frozen` on the device: the host copies follow, with one read each.
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for key in [k for k in state if k.endswith(".step")]:
        state[key].zero_()
    for key in [k for k in state if k.endswith(".frozen")]:
        state[key].zero_()
    model.load_state_dict(state)
    assert all(layer.n_frozen == 0 and layer.host_step() == 0 for layer in layers)
    assert reads  # the reload was read back, not served stale from the host copies
