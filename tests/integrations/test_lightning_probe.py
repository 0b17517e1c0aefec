"""LogProbe: the bias probe of each validation epoch, logged per module through the trainer."""

from __future__ import annotations

import csv
from types import SimpleNamespace

import pytest
import torch
from torch import nn

pl = pytest.importorskip("pytorch_lightning")
dcor = pytest.importorskip("dcor")
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*LeafSpec.* is deprecated",  # Lightning's own, with this torch
    "ignore:The '(train|val)_dataloader' does not have many workers",
    "ignore:The number of training batches",
    "ignore:.*is used for evaluation but never trained",  # the sanity check, before training
)

import metanorm as mn  # noqa: E402
from metanorm.integrations.lightning import LogProbe, RefitRunningBeta  # noqa: E402
from metanorm.nn import MetadataNorm, MetadataSequential  # noqa: E402

N_TRAIN, N_VAL, TAKE = 240, 200, 150


def _data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g).float()
    cf = torch.rand(n, generator=g) + y
    rows = torch.stack([y, cf, torch.ones(n)], dim=1)
    x = (
        0.3 * torch.randn(n, 4, generator=g)
        + cf[:, None]
        + y[:, None] * torch.tensor([1, -1, 0, 0])
    )
    return x, y, rows


class _Module(pl.LightningModule):
    def __init__(self, rows: torch.Tensor) -> None:
        super().__init__()
        self.net = MetadataSequential(nn.Linear(4, 6), MetadataNorm(6, rows, keep=[0]))
        self.head = nn.Linear(6, 1)

    def forward(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.net(x, rows))).squeeze(1)

    def training_step(self, batch, _):
        x, y, rows = batch
        return nn.functional.binary_cross_entropy_with_logits(self(x, rows), y)

    def validation_step(self, batch, _):
        x, y, rows = batch
        self.log("val_loss", nn.functional.binary_cross_entropy_with_logits(self(x, rows), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.3)


def _loaders():
    train = torch.utils.data.TensorDataset(*_data(N_TRAIN, 0))
    val = torch.utils.data.TensorDataset(*_data(N_VAL, 1))
    return (
        torch.utils.data.DataLoader(train, batch_size=40, shuffle=True),
        torch.utils.data.DataLoader(val, batch_size=50),
    )


def _fit(callbacks: list, epochs: int = 2, logger=False) -> tuple[_Module, pl.Trainer]:
    torch.manual_seed(0)
    train, val = _loaders()
    module = _Module(train.dataset.tensors[2])
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=1,
        callbacks=callbacks,
    )
    trainer.fit(module, train, val)
    return module, trainer


def _within_class_dcor2(f: torch.Tensor, y: torch.Tensor, cf: torch.Tensor) -> float:
    """Oracle: the dcor package's bias-corrected dcor², averaged over the two classes."""
    vals = [
        dcor.u_distance_correlation_sqr(f[y == c].double().numpy(), cf[y == c].double().numpy())
        for c in (0.0, 1.0)
    ]
    return float(sum(vals) / len(vals))


def test_logs_each_epochs_probe_per_module_to_the_logger(tmp_path):
    callback = LogProbe(metadata=1, max_samples=TAKE)
    logger = pl.loggers.CSVLogger(tmp_path, name="run", version=0)
    module, _ = _fit([RefitRunningBeta(), callback], epochs=2, logger=logger)
    assert sorted(callback.results) == [0, 1]  # one per epoch, none in the sanity check

    with open(tmp_path / "run" / "version_0" / "metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("probe/net.0/dcor2")]
    assert len(rows) == 2
    names = {"probe/net.0/dcor2", "probe/net.0/r2", "probe/net.1/dcor2", "probe/net.1/r2"}
    assert names | {"probe/head/dcor2", "probe/head/r2"} <= set(rows[0])
    last = rows[-1]

    # what was logged is what metanorm.probe measures on the final model (nothing trains after
    # the last validation) with the same settings ...
    _, val = _loaders()
    direct = mn.probe(module, val, metadata=1, max_samples=TAKE, call=lambda m, b: m(b[0], b[2]))
    for record in direct:
        assert record.num_samples == TAKE  # memory bound: the first max_samples samples only
        assert float(last[f"probe/{record.module}/dcor2"]) == pytest.approx(record.dcor2, abs=1e-6)
        assert float(last[f"probe/{record.module}/r2"]) == pytest.approx(record.probe_r2, abs=1e-6)

    # ... and the dcor² of the MDN layer's input and output against the dcor package
    x, y, rows_val = (t[:TAKE] for t in val.dataset.tensors)
    module.eval()
    with torch.no_grad():
        before = module.net[0](x)
        after = module.net(x, rows_val)
    cf = rows_val[:, 1:2]
    assert float(last["probe/net.0/dcor2"]) == pytest.approx(
        _within_class_dcor2(before, y, cf), abs=1e-6
    )
    assert float(last["probe/net.1/dcor2"]) == pytest.approx(
        _within_class_dcor2(after, y, cf), abs=1e-6
    )
    # the probe shows the metadata before the MDN layer and (nearly) none after it
    assert float(last["probe/net.0/dcor2"]) > 0.5 > 0.05 > float(last["probe/net.1/dcor2"])
    assert float(last["probe/net.0/r2"]) > 0.5  # 0.74: the noise of x limits it
    assert float(last["probe/net.1/r2"]) < 0.1


def test_the_probe_leaves_training_as_it_was():
    plain, _ = _fit([RefitRunningBeta()], epochs=3)
    probed, _ = _fit([RefitRunningBeta(), LogProbe(metadata=1, max_samples=TAKE)], epochs=3)
    for (name, a), (_, b) in zip(
        plain.state_dict().items(), probed.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert probed.training  # the flags the probe found are restored


def test_every_n_epochs_modules_and_rank_zero_only():
    callback = LogProbe(metadata=[1], modules=["net.1"], every_n_epochs=2, prefix="bias")
    _, trainer = _fit([callback], epochs=3)
    assert sorted(callback.results) == [1]
    assert [r.module for r in callback.results[1]] == ["net.1"]
    assert {k for k in trainer.callback_metrics if k.startswith("bias/")} == {
        "bias/net.1/dcor2",
        "bias/net.1/r2",
    }
    # a process other than rank 0 neither probes nor logs
    other = SimpleNamespace(sanity_checking=False, current_epoch=1, is_global_zero=False)
    fresh = LogProbe(metadata=1)
    fresh.on_validation_epoch_end(other, object())
    assert fresh.results == {}


def test_bad_arguments_and_batches():
    with pytest.raises(TypeError, match="every_n_epochs"):
        LogProbe(metadata=1, every_n_epochs=1.5)
    with pytest.raises(ValueError, match="every_n_epochs"):
        LogProbe(metadata=1, every_n_epochs=0)
    with pytest.raises(ValueError, match="max_samples"):
        LogProbe(metadata=1, max_samples=4)
    with pytest.raises(TypeError, match="metadata"):
        LogProbe(metadata="cf")
    with pytest.raises(TypeError, match="list of module names"):
        LogProbe(metadata=1, modules="net.1")
    x, _, rows = _data(40, 0)
    pairs = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, rows), batch_size=20)
    with pytest.raises(TypeError, match="labels"):
        _fit([LogProbe(metadata=1, loader=pairs)], epochs=1)
