"""The layer notices training rows that its design does not describe (at eval(); refit: raises).

Stand-in: a table of a binary label y, an age that depends on it and a 3-level site (K = 5 with
the intercept), N = 290 training rows in batches of 32. False-alarm rates of the check, measured
over 300 seeds each (two epochs, then eval()): a design from a random 32-row subsample of the
training rows warned 2/300 times, one from a 96-row subsample 0/300, the training rows' own design
0/300 (also after a single batch of 64 rows: 0/300). A 32-row design from another table (age
shifted by 2) warned 300/300 times.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from metanorm.design import DesignBuilder
from metanorm.nn import MetadataNorm, MetadataScaleNorm, SyncMetadataNorm
from metanorm.nn.utils import refit_running_beta

N, BATCH = 290, 32


def _table(rng: np.random.Generator, n: int, shift: float = 0.0) -> dict[str, np.ndarray]:
    y = rng.integers(0, 2, n)
    site = rng.choice(["a", "b", "c"], n)
    return {"y": y, "age": rng.uniform(0, 1, n) + y + shift, "site": site}


def _setup(seed: int, design_from: str):
    """(design, training rows): the design from other data, a subsample, or the rows."""
    rng = np.random.default_rng(seed)
    data = _table(rng, N)
    if design_from == "other":
        source = _table(rng, 32, shift=2.0)
    elif design_from.startswith("subsample"):
        idx = rng.choice(N, int(design_from.removeprefix("subsample")), replace=False)
        source = {k: v[idx] for k, v in data.items()}
    else:
        source = data
    builder = DesignBuilder(keep=["y"]).fit(source)
    return builder.transform(source), builder.transform(data).tensor()


def _train(layer: torch.nn.Module, rows: torch.Tensor, seed: int, epochs: int = 2) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(N, generator=g)
        for i in range(0, N, BATCH):
            idx = perm[i : i + BATCH]
            layer(torch.randn(len(idx), 4, generator=g), rows[idx])


def _warned(layer: torch.nn.Module) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer.eval()
    return [str(w.message) for w in caught if "do not describe" in str(w.message)]


@pytest.mark.parametrize("cls", [MetadataNorm, SyncMetadataNorm, MetadataScaleNorm])
def test_a_design_of_other_rows_warns_at_eval_naming_the_column(cls):
    design, rows = _setup(0, "other")
    layer = cls(4, design)
    _train(layer, rows, seed=0)
    found = _warned(layer)
    assert len(found) == 1
    assert "over 580 rows" in found[0] and "the columns that differ most: ['age']" in found[0]
    layer.train()
    assert not _warned(layer)  # once per layer


@pytest.mark.parametrize("design_from", ["subsample96", "subsample32", "rows"])
def test_a_representative_design_does_not_warn(design_from):
    for seed in range(3):  # seeds that the measured rates (module docstring) make typical
        design, rows = _setup(seed, design_from)
        layer = MetadataNorm(4, design)
        _train(layer, rows, seed)
        assert not _warned(layer), (design_from, seed)


def test_too_few_rows_are_not_checked_and_reset_clears_the_sums():
    design, rows = _setup(0, "other")
    layer = MetadataNorm(4, design)
    layer(torch.randn(49, 4), rows[:49])  # < 10·K = 50 rows: no verdict yet
    assert not _warned(layer)
    layer.train()
    layer.reset_running_stats()
    assert float(layer.design_rows_seen) == 0
    assert "design_rows_gram" not in layer.state_dict()  # not part of checkpoints


def test_refit_on_rows_the_design_does_not_describe_is_an_error():
    design, rows = _setup(0, "other")
    layer = MetadataNorm(4, design)
    x = torch.randn(N, 4)
    loader = [(x[i : i + BATCH], rows[i : i + BATCH]) for i in range(0, N, BATCH)]
    before = layer.running_beta.clone()
    with pytest.raises(ValueError, match=r"do not describe.*\['age'\].*check_design=False"):
        refit_running_beta(layer, loader)
    torch.testing.assert_close(layer.running_beta, before)  # left as it was
    assert refit_running_beta(layer, loader, check_design=False) == 1
    # the right design refits without a word
    good, rows = _setup(0, "subsample96")
    layer = MetadataNorm(4, good)
    loader = [(x[i : i + BATCH], rows[i : i + BATCH]) for i in range(0, N, BATCH)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert refit_running_beta(layer, loader) == 1


def _false_alarms(design_from: str, seeds: int) -> int:  # how the docstring's rates were measured
    count = 0
    for seed in range(seeds):
        design, rows = _setup(seed, design_from)
        layer = MetadataNorm(4, design)
        _train(layer, rows, seed)
        count += bool(_warned(layer))
    return count


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_model_sums_the_rows_in_float32(dtype):
    # the rows are used in float32 at least; a 16-bit sum of them would drift away from the
    # design within a few hundred rows and warn about rows the design does describe
    design, rows = _setup(0, "rows")
    layer = MetadataNorm(4, design).to(dtype)
    assert layer.design_rows_gram.dtype == torch.float32 and layer.running_beta.dtype == dtype
    g = torch.Generator().manual_seed(0)
    for _ in range(8):  # 2,320 rows
        for i in range(0, N, BATCH):
            layer(
                torch.randn(len(rows[i : i + BATCH]), 4, generator=g).to(dtype), rows[i : i + BATCH]
            )
    gram = rows.double().T @ rows.double() * 8
    torch.testing.assert_close(layer.design_rows_gram.double(), gram, rtol=1e-5, atol=1e-3)
    assert not _warned(layer)
    assert layer.double().design_rows_gram.dtype == torch.float64  # wider casts are followed
