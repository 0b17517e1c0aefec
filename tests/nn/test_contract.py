"""The contract every MDN estimator keeps: one test per feature, parametrized over all of them.

Estimators: the batch GLM (flattened and channel-wise), recursive least squares, the penalty
layer, the scale layer and the location-scale layer. Features: restoring without the design, the lazy class,
``convert_metadata_norm(..., layer=)`` and restoring the converted model, Sync convert/revert,
``refit_running_beta`` in closed form, the Lightning plugin, ``torch.compile(fullgraph=True)``
in training and evaluation, autocast, non-finite batches, m ≤ K.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from metanorm.nn import (
    LazyMetadataLocationScaleNorm,
    LazyMetadataNorm,
    LazyMetadataScaleNorm,
    LazyPenaltyMetadataNorm,
    LazyRecursiveMetadataNorm,
    MetadataLocationScaleNorm,
    MetadataNorm,
    MetadataScaleNorm,
    PenaltyMetadataNorm,
    RecursiveMetadataNorm,
    SyncMetadataLocationScaleNorm,
    SyncMetadataNorm,
    SyncMetadataScaleNorm,
    SyncPenaltyMetadataNorm,
    SyncRecursiveMetadataNorm,
    convert_metadata_norm,
    revert_sync_metadata_norm,
)
from metanorm.nn.utils import refit_running_beta

N, K, C, H = 96, 3, 4, 3  # rows, design columns, channels, spatial size (D = C·H·H = 36)
D = C * H * H


def _design() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    y = torch.randint(0, 2, (N, 1), generator=g).double()
    return torch.cat(
        [y, torch.rand(N, 1, generator=g, dtype=torch.float64) * 3 + y, torch.ones(N, 1)], 1
    )


DESIGN = _design()


def _features(rows: torch.Tensor, seed: int) -> torch.Tensor:
    """(m, C, H, H) maps with a linear and a multiplicative effect of column 1."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(len(rows), C, H, H, generator=g, dtype=torch.float64)
    c = rows[:, 1, None, None, None]
    return (base * torch.exp(0.2 * c) + 0.7 * c + 0.3 * rows[:, 0, None, None, None]).float()


# name → (build(dtype), its class, its lazy class and arguments, its synced class, K-only init)
ESTIMATORS = {
    "batch": (
        lambda **kw: MetadataNorm(D, DESIGN, keep=[0], **kw),
        MetadataNorm,
        lambda: LazyMetadataNorm(DESIGN, keep=[0]),
        SyncMetadataNorm,
        lambda: MetadataNorm(D, num_metadata=K),
    ),
    "channelwise": (
        lambda **kw: MetadataNorm(C, DESIGN, keep=[0], channelwise=True, **kw),
        MetadataNorm,
        lambda: LazyMetadataNorm(DESIGN, keep=[0], channelwise=True),
        SyncMetadataNorm,
        lambda: MetadataNorm(C, num_metadata=K, channelwise=True),
    ),
    "recursive": (
        lambda **kw: RecursiveMetadataNorm(D, K, keep=[0], forgetting=0.99, **kw),
        RecursiveMetadataNorm,
        lambda: LazyRecursiveMetadataNorm(K, keep=[0], forgetting=0.99),
        SyncRecursiveMetadataNorm,
        lambda: RecursiveMetadataNorm(D, K, forgetting=0.99),
    ),
    "penalty": (
        lambda **kw: PenaltyMetadataNorm(D, K, keep=[0], lr=0.05, **kw),
        PenaltyMetadataNorm,
        lambda: LazyPenaltyMetadataNorm(K, keep=[0], lr=0.05),
        SyncPenaltyMetadataNorm,
        lambda: PenaltyMetadataNorm(D, K, lr=0.05),
    ),
    "scale": (
        lambda **kw: MetadataScaleNorm(C, DESIGN, keep=[0], **kw),
        MetadataScaleNorm,
        lambda: LazyMetadataScaleNorm(DESIGN, keep=[0]),
        SyncMetadataScaleNorm,
        lambda: MetadataScaleNorm(C, num_metadata=K),
    ),
    "location-scale": (
        lambda **kw: MetadataLocationScaleNorm(C, DESIGN, keep=[0], num_positions=H * H, **kw),
        MetadataLocationScaleNorm,
        lambda: LazyMetadataLocationScaleNorm(DESIGN, keep=[0]),
        SyncMetadataLocationScaleNorm,
        lambda: MetadataLocationScaleNorm(C, num_metadata=K, num_positions=H * H),
    ),
}
NAMES = list(ESTIMATORS)


def _train(layer: nn.Module, steps: int = 4, m: int = 24, seed: int = 0) -> nn.Module:
    layer.train()
    for step in range(steps):
        idx = torch.arange(step * m, (step + 1) * m) % N
        rows = DESIGN[idx].float()
        layer(_features(DESIGN[idx], seed + step), rows)
    return layer


def _probe(seed: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    rows = DESIGN[:10]
    return _features(rows, seed), rows.float()


@pytest.mark.parametrize("name", NAMES)
def test_restores_from_a_state_dict_without_the_design(name):
    build, _, _, _, empty = ESTIMATORS[name]
    trained = _train(build()).eval()
    restored = empty()
    restored.load_state_dict(trained.state_dict())
    restored.eval()
    x, rows = _probe()
    torch.testing.assert_close(restored(x, rows), trained(x, rows), atol=0, rtol=0)
    # and it goes on training as the original does (a resumed run)
    _train(trained, steps=1, seed=7)
    _train(restored, steps=1, seed=7)
    for key, value in trained.state_dict().items():
        torch.testing.assert_close(restored.state_dict()[key], value, atol=0, rtol=0, msg=key)


@pytest.mark.parametrize("name", NAMES)
def test_lazy_layer_becomes_the_layer_and_computes_the_same(name):
    build, cls, lazy, _, _ = ESTIMATORS[name]
    layer = lazy()
    eager = build()
    x, rows = _probe()
    torch.testing.assert_close(layer(x, rows), eager(x, rows))
    assert type(layer) is cls and layer.num_features == eager.num_features


@pytest.mark.parametrize("name", NAMES)
def test_convert_with_a_layer_class_and_restore_without_a_batch(name):
    _, cls, _, _, _ = ESTIMATORS[name]
    channelwise = name == "channelwise"
    options = {"keep": (), **({"channelwise": True} if channelwise else {})}

    def net() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, C, 1), nn.BatchNorm2d(C), nn.ReLU(), nn.Flatten())

    x = torch.randn(24, 1, H, H)
    rows = DESIGN[:24].float()
    model = convert_metadata_norm(net(), DESIGN, replace=[nn.BatchNorm2d], layer=cls, **options)
    model(x, metadata=rows)
    assert type(model.module[1]) is cls
    model.eval()
    want = model(x, metadata=rows)
    # a fresh conversion (lazy layers not yet run) loads the checkpoint and evaluates the same
    again = convert_metadata_norm(net(), DESIGN, replace=[nn.BatchNorm2d], layer=cls, **options)
    again.load_state_dict(model.state_dict())
    again.eval()
    torch.testing.assert_close(again(x, metadata=rows), want, atol=0, rtol=0)
    # a factory (here: empty layers of K columns, no design) works as well
    empty = ESTIMATORS[name][4]
    restored = convert_metadata_norm(
        net(), DESIGN, replace=[nn.BatchNorm2d], layer=lambda design, **kw: empty()
    )
    restored.load_state_dict(model.state_dict())
    restored.eval()
    torch.testing.assert_close(restored(x, metadata=rows), want, atol=0, rtol=0)


def test_convert_refuses_a_class_that_is_not_an_estimator():
    with pytest.raises(TypeError, match="expected layer= to be an MDN layer class"):
        convert_metadata_norm(nn.Sequential(nn.Linear(2, 2)), DESIGN, after=["0"], layer=nn.ReLU)


@pytest.mark.parametrize("name", NAMES)
def test_sync_convert_and_revert_keep_the_class_and_share_the_state(name):
    build, cls, _, synced_cls, _ = ESTIMATORS[name]
    layer = _train(build())
    model = nn.Sequential(nn.Identity(), layer)
    model = SyncMetadataNorm.convert_sync_metadata_norm(model)
    assert type(model[1]) is synced_cls
    for (a, ta), (b, tb) in zip(
        layer.state_dict().items(), model[1].state_dict().items(), strict=True
    ):
        assert a == b and ta.data_ptr() == tb.data_ptr()
    x, rows = _probe()
    model.eval()
    layer.eval()
    torch.testing.assert_close(model[1](x, rows), layer(x, rows), atol=0, rtol=0)  # one process
    model.train()
    model = revert_sync_metadata_norm(model)
    assert type(model[1]) is cls and not hasattr(model[1], "process_group")


def test_sync_convert_refuses_an_unknown_subclass():
    class Mine(MetadataNorm):
        pass

    with pytest.raises(TypeError, match="synchronised class"):
        SyncMetadataNorm.convert_sync_metadata_norm(Mine(D, DESIGN, keep=[0]))


def _loader(m: int = 24):
    out = []
    for step in range(N // m):
        idx = torch.arange(step * m, (step + 1) * m)
        out.append((_features(DESIGN[idx], 100 + step), DESIGN[idx].float()))
    return out


@pytest.mark.parametrize("name", NAMES)
def test_refit_is_closed_form_least_squares_over_the_loader(name):
    build, *_ = ESTIMATORS[name]
    layer = _train(build())
    loader = _loader()
    assert refit_running_beta(layer, loader) == 1
    x = torch.cat([b[1] for b in loader]).double().numpy()
    f = torch.cat([b[0] for b in loader]).double()
    if name == "location-scale":  # two passes: β on the features, γ on the residual's log-scale
        beta, *_ = np.linalg.lstsq(x, f.reshape(N, -1).numpy(), rcond=None)
        r = torch.from_numpy(f.reshape(N, -1).numpy() - x @ beta).reshape(N, C, -1)
        target = torch.cat(
            [f.reshape(N, -1), 0.5 * torch.log(r.var(2, unbiased=False) + layer.eps)], 1
        )
    elif name == "scale":
        target = 0.5 * torch.log(f.flatten(2).var(2, unbiased=False) + layer.eps)
    elif name == "channelwise":
        target = f.mean(dim=(2, 3))
    else:
        target = f.reshape(N, -1)
    coef, *_ = np.linalg.lstsq(x, target.numpy(), rcond=None)  # the oracle: numpy least squares
    state = {"recursive": "beta", "penalty": "beta", "location-scale": "running_state"}.get(
        name, "running_beta"
    )
    got = getattr(layer, state).double().numpy()
    # the loader holds the whole design (S = N): (N/S)Σ⁻¹XᵀF is least squares; RLS has its
    # prior δ = 0.01 against XᵀX of ~N, the penalty layer is least squares
    np.testing.assert_allclose(got, coef, atol=2e-3 if name == "recursive" else 1e-4)
    assert int(layer.num_samples_tracked) == N and int(layer.num_batches_tracked) == len(loader)


@pytest.mark.parametrize("name", NAMES)
def test_nonfinite_batch_leaves_the_state_and_is_counted(name):
    build, *_ = ESTIMATORS[name]
    layer = _train(build())
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x, rows = _probe()
    x[0, 0, 0, 0] = float("nan")
    layer(x, rows)
    for key, value in layer.state_dict().items():
        if key == "num_batches_skipped":
            assert int(value) == int(before[key]) + 1
        else:
            torch.testing.assert_close(value, before[key], equal_nan=True)
    with pytest.raises(ValueError, match="not finite"):
        build(on_nonfinite="raise")(x, rows)


@pytest.mark.parametrize("name", NAMES)
def test_autocast_bfloat16_computes_in_float32(name):
    build, *_ = ESTIMATORS[name]
    ref, low = _train(build()), _train(build())
    x, rows = _probe()
    want = ref(x.bfloat16().float(), rows)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = low(x.bfloat16(), rows)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=0.05, rtol=0.02)


@pytest.mark.parametrize("name", NAMES)
def test_compile_fullgraph_train_and_eval_equal_eager(name):
    build, *_ = ESTIMATORS[name]
    eager = _train(build(dtype=torch.float64), steps=2)
    layer = copy.deepcopy(eager)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    for step in range(2):
        x, rows = _probe(60 + step)
        x = x.double().requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        out, want = compiled(x, rows.double()), eager(x2, rows.double())
        torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-10)
        out.square().sum().backward()
        want.square().sum().backward()
        torch.testing.assert_close(x.grad, x2.grad, atol=1e-10, rtol=1e-10)
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(layer.state_dict()[key], value, atol=1e-10, rtol=1e-10)
    layer.eval()
    eager.eval()
    x, rows = _probe(70)
    torch.testing.assert_close(
        compiled(x.double(), rows.double()), eager(x.double(), rows.double())
    )


@pytest.mark.parametrize(
    "name", ["batch", "recursive", "penalty", "scale", "location-scale"]
)  # one per family
def test_compile_inductor_fullgraph_train_step(name):
    build, *_ = ESTIMATORS[name]
    eager = _train(build(), steps=2)
    layer = copy.deepcopy(eager)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    x, rows = _probe(80)
    torch.testing.assert_close(compiled(x, rows), eager(x, rows), atol=1e-4, rtol=1e-4)
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(layer.state_dict()[key], value, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["batch", "scale", "location-scale"])
def test_small_batches_fall_back_are_counted_and_warn_once_at_eval(name):
    build, *_ = ESTIMATORS[name]
    layer = build()
    for step in range(6):
        rows = DESIGN[step * 2 : step * 2 + 2].float()
        layer(_features(DESIGN[step * 2 : step * 2 + 2], step), rows)
    assert int(layer.num_batches_fallback) == 6
    with pytest.warns(UserWarning, match=r"m <= K = 3.*RecursiveMetadataNorm"):
        layer.eval()
    layer.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.eval()  # once per layer


def test_lightning_plugin_syncs_every_estimator():
    lightning = pytest.importorskip("metanorm.integrations.lightning")
    model = nn.Sequential(*(ESTIMATORS[name][0]() for name in NAMES))
    plugin = lightning.MetadataNormSync(batch_norm=False)
    synced = plugin.apply(model)
    assert [type(m) for m in synced] == [ESTIMATORS[name][3] for name in NAMES]
    reverted = plugin.revert(synced)
    assert [type(m) for m in reverted] == [ESTIMATORS[name][1] for name in NAMES]


def test_batches_of_four_against_eight_columns_still_give_least_squares_over_an_epoch():
    """m = 4 ≤ K = 8 on every batch: each output falls back to the running β, yet every estimate
    enters it weighted by m, so after one epoch (cumulative average) it is the least-squares β
    of the epoch (numpy as the oracle)."""
    g = torch.Generator().manual_seed(5)
    n = 96
    site = torch.randint(0, 5, (n,), generator=g)
    x = torch.cat(
        [
            torch.randint(0, 2, (n, 1), generator=g).double(),
            nn.functional.one_hot(site, 5)[:, 1:].double(),  # 4 site dummies
            torch.randn(n, 2, generator=g, dtype=torch.float64),  # age, sex-like
            torch.ones(n, 1, dtype=torch.float64),
        ],
        1,
    )
    assert x.shape[1] == 8
    f = x @ torch.randn(8, 5, generator=g, dtype=torch.float64) + torch.randn(
        n, 5, generator=g, dtype=torch.float64
    )
    layer = MetadataNorm(5, x, keep=[0], momentum=None, dtype=torch.float64)
    perm = torch.randperm(n, generator=g)
    for i in range(0, n, 4):
        idx = perm[i : i + 4]
        before = layer.running_beta.clone()
        out = layer(f[idx], x[idx])
        # the output used the running β of before this batch
        want = f[idx] - (x[idx] * layer.remove_mask) @ before
        torch.testing.assert_close(out, want, atol=1e-12, rtol=0)
    coef, *_ = np.linalg.lstsq(x.numpy(), f.numpy(), rcond=None)
    np.testing.assert_allclose(layer.running_beta.numpy(), coef, atol=1e-10)
    assert int(layer.num_batches_fallback) == n // 4 == int(layer.num_batches_tracked)


def test_refit_can_leave_other_estimators_as_they_are():
    model = nn.ModuleList([_train(ESTIMATORS["batch"][0]()), _train(ESTIMATORS["recursive"][0]())])
    before = model[1].beta.clone()

    def call(mdl, batch):
        for layer in mdl:
            layer(*batch)

    assert refit_running_beta(model, _loader(), call=call, estimators=MetadataNorm) == 1
    torch.testing.assert_close(model[1].beta, before, atol=0, rtol=0)
