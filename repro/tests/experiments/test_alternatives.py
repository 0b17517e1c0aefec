"""The alternatives to MDN (concat, BR-Net, DANN, Group DRO): pieces against closed forms, and
tiny training runs against the baseline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from metanorm.datasets import DesignDataset
from metanorm.design import make_design
from metanorm.metrics import distance_correlation_sqr
from metanorm_repro.experiments import RunConfig
from metanorm_repro.experiments.alternatives import (
    OBJECTIVES,
    BRNetObjective,
    DANNObjective,
    GroupDROObjective,
    attach_objective,
    grad_reverse,
    make_objective,
    pearson_r2,
    quantile_edges,
    register_objective,
)
from metanorm_repro.experiments.engine import evaluate, loss_and_predictions, train_one_epoch
from metanorm_repro.experiments.registry import get_experiment
from metanorm_repro.experiments.runner import prepare_run
from metanorm_repro.models.methods import ALTERNATIVES as METHODS_ALTERNATIVES
from metanorm_repro.models.methods import get_method, list_methods
from metanorm_repro.models.norms import confounder_columns

ALTERNATIVES = ("concat", "concat-input", "brnet", "brnet-cond", "dann", "dann-cond", "groupdro")


@pytest.fixture(scope="module")
def design():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    return make_design({"y": y, "cf": rng.uniform(1, 4, 400) + 2 * y}, keep=["y"])


def test_the_methods_are_in_the_one_registry():
    assert [n for n in list_methods() if n in ALTERNATIVES] == list(ALTERNATIVES)
    assert METHODS_ALTERNATIVES == ALTERNATIVES
    # every objective a method names is in the one table of objectives
    named = {get_method(n).objective for n in list_methods()} - {None}
    assert named == set(OBJECTIVES) == {"brnet", "brnet-cond", "dann", "dann-cond", "groupdro"}
    assert get_method("concat").concat_metadata and get_method("concat").objective is None
    spec = get_method("concat-input")
    assert spec.input_metadata and not spec.concat_metadata and spec.objective is None
    for name in ALTERNATIVES[2:]:
        assert get_method(name).objective == name and not get_method(name).needs_design
    compare = get_experiment("synthetic-compare")
    assert set(ALTERNATIVES) | {"none", "mdn-linear", "mdn-conv"} == set(
        compare.defaults["methods"]
    )
    assert set(compare.methods) - set(compare.defaults["methods"]) == {
        "batchnorm",
        "mdn-scale",
        "mdn-ls",
    }
    assert compare.defaults["batch_sizes"] == [200, 32] and compare.defaults["seeds"] == 3


def test_grad_reverse_negates_the_gradient_exactly():
    x = torch.randn(5, 3, requires_grad=True)
    w = torch.randn(5, 3)
    out = grad_reverse(x, 0.7)
    assert torch.equal(out, x)
    (out * w).sum().backward()
    assert torch.equal(x.grad, -0.7 * w)


def test_pearson_r2_matches_numpy():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(50, generator=g, dtype=torch.float64)
    b = 0.5 * a + torch.randn(50, generator=g, dtype=torch.float64)
    r = np.corrcoef(a.numpy(), b.numpy())[0, 1]
    assert float(pearson_r2(a, b)) == pytest.approx(r * r, rel=1e-9)
    # within-group: the correlation of the residuals from the group means
    groups = torch.arange(50) % 3
    ar, br = a.numpy().copy(), b.numpy().copy()
    for k in range(3):
        sel = groups.numpy() == k
        ar[sel] -= ar[sel].mean()
        br[sel] -= br[sel].mean()
    rw = (ar @ br) / np.sqrt((ar @ ar) * (br @ br))
    assert float(pearson_r2(a, b, groups)) == pytest.approx(rw * rw, rel=1e-9)
    # a group offset alone is no within-group correlation
    offset = groups.double() * 10
    assert float(pearson_r2(offset + 1e-3 * a, offset, groups)) < 1e-6


def test_brnet_gradients_reach_the_right_parameters(design):
    torch.manual_seed(0)
    obj = BRNetObjective(design, 6)
    rows = design.tensor()[:40].float()
    labels = rows[:, 0].long()
    feats = torch.randn(40, 6, requires_grad=True)
    logits = torch.randn(40, 1, requires_grad=True)
    loss = obj(logits, feats, labels, rows)
    loss.backward()
    # encoder gradient = d(weight · r²(target, predictor(f)))/df, the predictor frozen
    target = (rows[:, 1:2] - obj.mean) / obj.std
    f2 = feats.detach().clone().requires_grad_(True)
    with torch.no_grad():
        params = [p.clone() for p in obj.predictor.parameters()]
    h = torch.relu(f2 @ params[0].T + params[1]) @ params[2].T + params[3]
    pearson_r2(target[:, 0], h[:, 0]).backward()
    torch.testing.assert_close(feats.grad, f2.grad)
    assert all(p.grad is not None for p in obj.predictor.parameters())


def test_groupdro_weights_move_to_the_worst_group(design):
    obj = GroupDROObjective(design, bins=2, step_size=0.5)
    assert obj.q.shape == (4,) and float(obj.q.sum()) == pytest.approx(1.0)
    groups = torch.tensor([0, 0, 1, 1, 2, 2])  # group 3 absent
    per = torch.tensor([0.1, 0.1, 2.0, 2.0, 0.5, 0.5])
    obj.train()
    for _ in range(5):
        loss = obj.weighted(per, groups)
    q = obj.q.numpy()
    assert q.argmax() == 1
    # the closed form (an absent group's weight is not updated, only renormalised) of 5 exponentiated-gradient steps on constant losses
    expect = 0.25 * np.exp(5 * 0.5 * np.array([0.1, 2.0, 0.5, 0.0]))
    np.testing.assert_allclose(q, expect / expect.sum(), rtol=1e-5)
    w = q[:3] / q[:3].sum()
    assert float(loss) == pytest.approx(float(w @ np.array([0.1, 2.0, 0.5])), rel=1e-5)


def test_dann_bins_and_cond_heads(design):
    cf = design.matrix[:, 1]
    edges = quantile_edges(cf, 4).numpy()
    counts = np.bincount(np.searchsorted(edges, cf, side="left"), minlength=4)
    assert counts.min() >= 95  # equal-count bins
    cond = DANNObjective(design, 6, conditional=True)
    assert cond.edges.shape == (2, 3) and len(cond.heads) == 2
    y = design.matrix[:, 0]
    np.testing.assert_allclose(cond.edges[1].numpy(), quantile_edges(cf[y == 1], 4).numpy())
    with pytest.raises(ValueError, match="objective"):
        make_objective("mdn", design, 6)
    with pytest.raises(ValueError, match="objective in brnet, brnet-cond, dann, dann-cond"):
        make_objective("groupdro-cond", design, 6)
    assert isinstance(make_objective("groupdro", design, 6), GroupDROObjective)
    for name, cls, conditional in (
        ("brnet", BRNetObjective, False),
        ("brnet-cond", BRNetObjective, True),
        ("dann", DANNObjective, False),
        ("dann-cond", DANNObjective, True),
    ):
        obj = make_objective(name, design, 6)
        assert type(obj) is cls and obj.conditional is conditional
    assert confounder_columns(design) == [1]


def _train(method: str, epochs: int = 3) -> dict:
    config = RunConfig(
        experiment="synthetic-compare",
        method=method,
        n_per_class=150,
        options={"n_eval_per_class": 250},
    )
    torch.manual_seed(0)
    run = prepare_run(config)
    loader = DataLoader(
        DesignDataset(run.splits[0], run.rows[0]),
        batch_size=50,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    opt = torch.optim.Adam(run.model.parameters(), lr=2e-3)
    for _ in range(epochs):
        tr = train_one_epoch(run.model, loader, opt)
    ev = evaluate(
        run.model,
        DataLoader(DesignDataset(run.splits[2], run.rows[2]), batch_size=500),
        confounder=run.metrics[2],
    )
    ev["train_loss"] = tr["loss"]
    ev["mean_dcor2"] = float(np.mean(list(ev["dcor2"].values())))
    return ev


def _brnet_features_dcor2(method: str, seed: int = 0, steps: int = 150) -> float:
    """Mean within-class dcor² between cf and a linear encoder's features after full-batch training.

    The encoder reads 8 columns: mf, cf (both shifted by 2·y) and 6 noise columns. "none" trains
    encoder and head on the task loss alone; "brnet"/"brnet-cond" add BR-Net's adversarial game.
    """
    rng = np.random.default_rng(seed)
    n = 400
    y = rng.integers(0, 2, n)
    cf = rng.uniform(1, 4, n) + 2 * y
    mf = rng.uniform(1, 4, n) + 2 * y
    raw = np.column_stack([mf, cf, rng.normal(size=(n, 6))]) + 0.1 * rng.normal(size=(n, 8))
    design = make_design({"y": y, "cf": cf}, keep=["y"])
    rows, labels = design.tensor().float(), torch.as_tensor(y)
    x = torch.as_tensor((raw - raw.mean(0)) / raw.std(0), dtype=torch.float32)
    torch.manual_seed(seed)
    enc, head = torch.nn.Linear(8, 6), torch.nn.Linear(6, 1)
    obj = (
        None if method == "none" else BRNetObjective(design, 6, conditional=method == "brnet-cond")
    )
    params = [*enc.parameters(), *head.parameters(), *(obj.parameters() if obj else [])]
    opt = torch.optim.Adam(params, lr=1e-2)
    for _ in range(steps):
        f = enc(x)
        logits = head(f)
        loss = obj(logits, f, labels, rows) if obj else loss_and_predictions(logits, labels)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        f = enc(x).double()
    cft = torch.as_tensor(cf)
    per_class = [
        float(distance_correlation_sqr(f[labels == c], cft[labels == c, None], unbiased=True))
        for c in (0, 1)
    ]
    return float(np.mean(per_class))


# BR-Net's claim, on features where training is deterministic given the seed (full batch, fixed
# data): its adversarial game takes the encoder's within-class dependence on cf far below what the
# task loss alone leaves. Ratio brnet / none and brnet-cond / none over seeds 0-11 (AMD EPYC, 1
# thread): brnet 0.035 0.070 0.035 0.016 0.058 0.049 0.061 0.061 0.016 0.074 0.054 0.039 (worst
# 0.074); brnet-cond 0.032 0.142 0.068 0.024 0.045 0.026 0.035 0.129 0.051 0.096 0.212 0.091 (worst
# 0.212). Bars: the worst plus 0.05. (The 3-epoch CNN run of the synthetic task does not make this
# claim on every seed: brnet/none ranged 0.54-3.3 over seeds 0-11, brnet-cond 0.31-1.41.)
@pytest.mark.parametrize(("method", "bar"), [("brnet", 0.124), ("brnet-cond", 0.262)])
def test_brnet_lowers_dcor2(method, bar):
    base = _brnet_features_dcor2("none")
    assert base > 0.2  # the task loss alone leaves cf in the features (0.33-0.54 over 12 seeds)
    assert _brnet_features_dcor2(method) < bar * base


def test_dann_trains():
    # at this size DANN does not lower dcor² reliably (docs/alternatives.md): test it trains
    ev = _train("dann", epochs=1)
    assert np.isfinite(ev["train_loss"]) and ev["train_loss"] > 0.0


def test_groupdro_upweights_the_minority_groups():
    config = RunConfig(experiment="synthetic-compare", method="groupdro", n_per_class=150)
    torch.manual_seed(0)
    run = prepare_run(config)
    loader = DataLoader(DesignDataset(run.splits[0], run.rows[0]), batch_size=50, shuffle=True)
    opt = torch.optim.Adam(run.model.parameters(), lr=2e-3)
    tr = train_one_epoch(run.model, loader, opt)
    assert np.isfinite(tr["loss"])
    obj = run.model.objective
    # groups label·4 + global cf quartile; cf | y=0 ~ U[1, 4), cf | y=1 ~ U[3, 6): the rare
    # groups are y=0 with a high cf and y=1 with a low one (the cue points the wrong way)
    rows, y = run.rows[0], run.splits[0].labels
    counts = np.bincount(obj.group(torch.as_tensor(y), rows).numpy(), minlength=8)
    present = np.flatnonzero(counts)
    rare = present[np.argsort(counts[present])[:2]]
    assert int(obj.q.argmax()) in set(rare.tolist()), (obj.q, counts)


def test_concat_feeds_cf_and_never_the_label(design):
    # Concat's use of cf is tested on the wiring, not on a trained accuracy: after 3 epochs on 150
    # images per class the test bAcc over seeds 0-11 ranged 0.68-0.94 for concat and 0.60-0.95 for
    # the baseline (AMD EPYC, 1 thread), too wide for a bar that says anything about cf.
    from metanorm_repro.models import PaperCNN

    torch.manual_seed(0)
    model = PaperCNN("concat", design).eval()
    assert model.concat_columns == (1,) and model.fc2.in_features == 85
    x, rows = torch.randn(4, 1, 32, 32), design.tensor()[:4].float()
    logits, feats = model(x, rows)
    other_y, other_cf = rows.clone(), rows.clone()
    other_y[:, 0] = 1 - other_y[:, 0]
    other_cf[:, 1] += 1.0
    assert torch.equal(model(x, other_y)[0], logits)
    w = model.fc2.weight[0, -1]
    torch.testing.assert_close(model(x, other_cf)[0] - logits, w.expand(4, 1).detach())
    assert feats.shape == (4, 84)
    with pytest.raises(ValueError, match="metadata"):
        model(x)


def test_plot_bacc_vs_dcor2(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib (the plots extra) is not installed")
    from metanorm_repro.experiments.alternatives import plot_bacc_vs_dcor2

    rows = [
        {"method": m, "batch_size": b, "test_bacc": a, "test_bacc_std": 0.01, "test_dcor2_0": d}
        for m, a, d in (("none", 0.94, 0.3), ("mdn-conv", 0.84, 0.0))
        for b in (200, 32)
    ]
    out = plot_bacc_vs_dcor2(rows, tmp_path / "p.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_registered_objective_reaches_a_registered_method(design):
    from torch import nn

    from metanorm_repro.models.methods import METHODS, Method, register_method

    class Halved(nn.Module):
        def forward(self, logits, features, labels, rows):
            return logits.sum() * 0.5

    register_objective("test-halved", lambda design, features, **kw: Halved())
    register_method(Method("test-halved", "Halved", objective="test-halved"))
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_objective("test-halved", lambda design, features: Halved())
        with pytest.raises(TypeError, match="callable"):
            register_objective("test-other", None)
        model = attach_objective(nn.Linear(2, 1), "test-halved", design, 6)
        assert isinstance(model.objective, Halved)
    finally:
        del OBJECTIVES["test-halved"], METHODS["test-halved"]
