"""RefitRunningBeta: every validation while fitting sees the least-squares β of the current weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pl = pytest.importorskip("pytorch_lightning")
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*LeafSpec.* is deprecated",  # Lightning's own, with this torch
    "ignore:You defined a `validation_step` but have no `val_dataloader`",
)

from metanorm.integrations.lightning import RefitRunningBeta  # noqa: E402
from metanorm.nn import MetadataNorm, MetadataSequential  # noqa: E402

N, K = 96, 3


def _data():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (N,), generator=g).float()
    cf = torch.rand(N, generator=g) + y
    rows = torch.stack([y, cf, torch.ones(N)], dim=1)
    x = torch.randn(N, 4, generator=g) + cf[:, None]
    return x, y, rows


class _Module(pl.LightningModule):
    def __init__(self, rows: torch.Tensor) -> None:
        super().__init__()
        self.net = MetadataSequential(nn.Linear(4, 5), MetadataNorm(5, rows, keep=[0]))
        self.head = nn.Linear(5, 1)
        self.seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x, rows)).squeeze(1)

    def training_step(self, batch, _):
        x, y, rows = batch
        return nn.functional.binary_cross_entropy_with_logits(self(x, rows), y)

    def validation_step(self, batch, index):
        if index == 0:  # β and the weights this validation uses
            lin = self.net[0]
            self.seen.append(
                (self.net[1].running_beta.clone(), lin.weight.clone(), lin.bias.clone())
            )

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _fit(callbacks: list, epochs: int = 3) -> tuple[_Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    x, y, rows = _data()
    data = torch.utils.data.TensorDataset(x, y, rows)
    train = torch.utils.data.DataLoader(data, batch_size=16, shuffle=True)
    val = torch.utils.data.DataLoader(data, batch_size=48)
    module = _Module(rows)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=1,
        callbacks=callbacks,
    )
    trainer.fit(module, train, val)
    return module, x, rows


def _least_squares(weight, bias, x, rows):
    """The full-data least-squares β of the layer's input (oracle: torch.linalg.lstsq)."""
    features = (x @ weight.T + bias).double()
    return torch.linalg.lstsq(rows.double(), features).solution.float()


def test_every_validation_uses_the_refitted_beta_of_the_current_weights():
    module, x, rows = _fit([RefitRunningBeta()])
    assert len(module.seen) == 4  # the sanity check, then one validation per epoch
    sanity, *epochs = module.seen
    assert torch.count_nonzero(sanity[0]) == 0  # not refitted before training
    for beta, weight, bias in epochs:
        torch.testing.assert_close(
            beta, _least_squares(weight, bias, x, rows), atol=1e-4, rtol=1e-4
        )


def test_without_the_callback_or_on_other_epochs_the_beta_lags():
    module, x, rows = _fit([RefitRunningBeta(every_n_epochs=2)])
    _, first, second, third = module.seen
    gap = [(b - _least_squares(w, c, x, rows)).abs().max() for b, w, c in (first, second, third)]
    assert gap[0] > 1e-2 and gap[2] > 1e-2  # epochs 0 and 2: the running average
    assert gap[1] < 1e-4  # epoch 1: refitted before its validation


def test_refits_at_epoch_end_without_validation_and_checks_arguments():
    torch.manual_seed(0)
    x, y, rows = _data()
    data = torch.utils.data.TensorDataset(x, y, rows)
    module = _Module(rows)
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[RefitRunningBeta()],
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=16))
    lin = module.net[0]
    want = _least_squares(lin.weight.detach(), lin.bias.detach(), x, rows)
    torch.testing.assert_close(module.net[1].running_beta, want, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="positive int"):
        RefitRunningBeta(every_n_epochs=0)
    with pytest.raises(TypeError, match="positive int"):
        RefitRunningBeta(every_n_epochs=1.0)  # type: ignore[arg-type]
