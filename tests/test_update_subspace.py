"""`benchmarks/update_subspace.py`'s split of an update by W's singular vectors, against float64 cases
whose answer is known by construction (the script's figures explain the SmolLM2 quality gap)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from update_subspace import split_by_spectrum  # noqa: E402


@pytest.fixture
def w_and_svd():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 80, generator=g, dtype=torch.float64)
    U, _, Vh = torch.linalg.svd(w, full_matrices=False)
    return w, U, Vh


def test_update_inside_the_top_input_subspace_has_share_one(w_and_svd):
    w, U, Vh = w_and_svd
    g = torch.Generator().manual_seed(1)
    dw = torch.randn(96, 16, generator=g, dtype=torch.float64) @ Vh[:16]  # reads only W's top-16 input directions
    row = split_by_spectrum(w, dw, ks=(16, 64))
    assert row["input_top16"] == pytest.approx(1.0, abs=1e-12)
    assert row["input_top64"] == pytest.approx(1.0, abs=1e-12)


def test_update_outside_the_top_subspace_has_share_zero_and_matches_a_dense_reference(w_and_svd):
    w, U, Vh = w_and_svd
    g = torch.Generator().manual_seed(2)
    dw = U[:, 40:50] @ torch.randn(10, 80, generator=g, dtype=torch.float64) @ Vh[20:].T @ Vh[20:]
    row = split_by_spectrum(w, dw, ks=(16, 64))
    assert row["input_top16"] == pytest.approx(0.0, abs=1e-12)
    assert row["output_top16"] == pytest.approx(0.0, abs=1e-12)
    # top-64 against the projector built explicitly
    p = Vh[:64].T @ Vh[:64]
    assert row["input_top64"] == pytest.approx(float((dw @ p).pow(2).sum() / dw.pow(2).sum()), rel=1e-10)
    assert row["output_top64"] == pytest.approx(1.0, abs=1e-12)  # its output directions are U[:, 40:50]


def test_random_subspace_is_the_chance_level_on_average(w_and_svd):
    w, _, _ = w_and_svd
    g = torch.Generator().manual_seed(3)
    shares = [
        split_by_spectrum(w, torch.randn(96, 80, generator=g, dtype=torch.float64), ks=(16,), seed=s)["input_random16"]
        for s in range(40)
    ]
    assert sum(shares) / len(shares) == pytest.approx(16 / 80, abs=0.02)
