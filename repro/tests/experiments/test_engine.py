"""The training loop, evaluation and learning-rate schedules, on the synthetic experiment."""

import numpy as np
import pytest
import torch

from metanorm_repro.experiments import (
    RunConfig,
    evaluate,
    get_experiment,
    list_experiments,
    train_one_epoch,
)
from metanorm_repro.experiments.synthetic import cf_bins
from metanorm_repro.models import PaperCNN


def test_engine_functions_and_registry():
    exp = get_experiment("synthetic")
    assert "synthetic" in list_experiments()
    assert exp.confounder == "cf" and exp.metadata_columns == ("cf",)
    cfg = RunConfig(n_per_class=12, seed=3)
    train, val, _ = exp.make_splits(cfg)
    from torch.utils.data import DataLoader

    from metanorm.datasets import DesignDataset
    from metanorm_repro.experiments.coding import build_designs, training_design

    builder, (rows, vrows, _) = build_designs(exp, (train, val, val))
    model = exp.make_model("mdn-linear", training_design(exp, builder, train), cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    stats = train_one_epoch(model, DataLoader(DesignDataset(train, rows), batch_size=5), opt)
    assert stats["samples"] == 24 and stats["loss"] > 0 and stats["time_s"] > 0
    ev = evaluate(
        model,
        DataLoader(DesignDataset(val, vrows), batch_size=100),
        confounder=val.metadata["cf"],
        groups=cf_bins(val),
    )
    assert set(ev) == {"loss", "accuracy", "balanced_accuracy", "recall", "dcor2", "group_accuracy"}
    with pytest.raises(ValueError, match="confounder"):
        evaluate(model, DataLoader(DesignDataset(val, vrows)), confounder=np.zeros(3))


def test_epoch_lr_schedules():
    import math

    from metanorm_repro.experiments.engine import epoch_lr

    assert [epoch_lr(0.1, "constant", e, 3) for e in range(3)] == [0.1] * 3
    got = [epoch_lr(0.1, "cosine", e, 5) for e in range(5)]
    want = [0.05 * (1 + math.cos(math.pi * e / 5)) for e in range(5)]
    assert got == pytest.approx(want) and got[0] == 0.1 and got == sorted(got, reverse=True)
    with pytest.raises(ValueError, match="epoch"):
        epoch_lr(0.1, "cosine", 5, 5)
    with pytest.raises(ValueError, match="schedule"):
        epoch_lr(0.1, "linear", 0, 5)


def test_refit_running_beta_matches_least_squares_layer_by_layer():
    """Each refitted β is the full-data least-squares fit of the features that layer sees in eval
    mode (the earlier layers already refitted), whatever the batch order."""
    from metanorm.nn.utils import refit_running_beta
    from metanorm_repro.datasets.synthetic import make_synthetic_splits
    from metanorm_repro.experiments.coding import build_designs

    exp = get_experiment("synthetic")
    splits = make_synthetic_splits(30, seed=3)
    _, rows = build_designs(exp, splits)
    torch.manual_seed(0)
    model = PaperCNN("mdn-conv", rows[0], momentum=0.3, keep=()).double()
    model.train()
    x = splits[0].images.double()
    model(x[:20], rows[0][:20].double())  # some stale running state to be replaced
    d = rows[0].double()
    y = splits[0].labels
    loader = [(x[i : i + 7], y[i : i + 7], d[i : i + 7]) for i in range(0, len(x), 7)]  # sorted
    assert refit_running_beta(model, loader) == 3
    assert model.training and model.norm1.momentum == 0.3
    inputs = {}
    hooks = [
        getattr(model, name).register_forward_pre_hook(
            lambda mod, args, name=name: inputs.__setitem__(name, args[0].flatten(1))
        )
        for name in ("norm1", "norm2", "norm3")
    ]
    model.eval()
    with torch.no_grad():
        model(x, d)
    for h in hooks:
        h.remove()
    design = d.numpy()
    for name in ("norm1", "norm2", "norm3"):
        feats = inputs[name].numpy()
        want = np.linalg.lstsq(design, feats, rcond=None)[0]
        got = getattr(model, name).running_beta.double().numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
    assert refit_running_beta(torch.nn.Linear(2, 2), loader) == 0
