"""The launchers, each with 2 CPU processes: PyTorch Lightning (ddp) here; torchrun and Accelerate
on the harness's examples in ``repro/tests/distributed/test_example_launchers.py``.

Each test starts its launcher once in a subprocess and compares what the processes wrote with a
single process over the union batches. Run as a script, this file is the Lightning job
(``python test_launchers.py lightning OUT``): Lightning's ddp strategy starts the second process
by running the same command again, so the job must be a script, not a pytest function.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from _spawn import requires_gloo
from torch import nn

pytestmark = requires_gloo

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
LAUNCH_TIMEOUT_S = 180


def _run(cmd: list[str], cwd: Path, extra_env: dict[str, str] | None = None) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(extra_env or {})}
    proc = subprocess.run(
        cmd,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT_S,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited with {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
            f"\n--- stderr\n{proc.stderr[-8000:]}"
        )
    return proc.stdout + proc.stderr


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(EXAMPLES))  # an example may import another
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(EXAMPLES))
    return module


def _torchrun() -> list[str]:
    exe = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "torch.distributed.run"]


def _assert_same_state(a: dict, b: dict, rtol=1e-4, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


# --------------------------------------------------------------------------------------------
# PyTorch Lightning
N_ROWS, GLOBAL_BATCH, STEPS, LR = 32, 16, 2, 0.1


def _lightning_data():
    g = torch.Generator().manual_seed(5)
    cf = torch.rand(N_ROWS, 1, generator=g) * 3
    x = torch.randn(N_ROWS, 4, generator=g) + cf
    y = (x.sum(1) + torch.randn(N_ROWS, generator=g) > 4).float()
    design = torch.cat([cf, torch.ones(N_ROWS, 1)], dim=1)
    return x, y, design


def _lightning_net(design):
    """An MDN net (compared with one process) and a BatchNorm branch (converted or not)."""
    from metanorm.nn import MetadataNorm

    torch.manual_seed(0)
    return nn.ModuleDict(
        {
            "fc1": nn.Linear(4, 6),
            "mdn": MetadataNorm(6, design, keep=()),
            "fc2": nn.Linear(6, 1),
            "bn_fc": nn.Linear(4, 3),
            "bn": nn.BatchNorm1d(3),
        }
    )


def _lightning_loss(net, x, rows, y, bn=True):
    h = torch.relu(net["mdn"](net["fc1"](x), rows))
    loss = nn.functional.binary_cross_entropy_with_logits(net["fc2"](h)[:, 0], y)
    if bn:  # the BatchNorm branch: its own parameters, so the MDN net is unaffected by it
        loss = loss + net["bn"](net["bn_fc"](x)).square().mean()
    return loss


def _lightning_job(out: str) -> None:
    """The Lightning run (both processes execute this; Lightning starts the second)."""
    try:
        import lightning.pytorch as pl
    except ImportError:
        import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    from metanorm.integrations.lightning import MetadataNormSync

    torch.set_num_threads(1)
    x, y, design = _lightning_data()

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _lightning_net(design)
            self.seen = []

        def training_step(self, batch, batch_idx):
            index, xb, yb, rows = batch
            self.seen.append(
                {
                    "types": {k: type(m).__name__ for k, m in self.net.items()},
                    "index": index.clone(),
                }
            )
            return _lightning_loss(self.net, xb, rows, yb)

        def on_train_end(self):  # still inside fit, before Lightning reverts the layers
            self.inside = {k: v.detach().clone() for k, v in self.net.state_dict().items()}

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR)

    module = Module()
    loader = DataLoader(
        TensorDataset(torch.arange(N_ROWS), x, y, design),
        batch_size=GLOBAL_BATCH // 2,
        shuffle=False,
    )
    trainer = pl.Trainer(
        strategy="ddp",
        devices=2,
        accelerator="cpu",
        plugins=[MetadataNormSync()],
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, loader)
    result = {
        "warnings": [str(w.message) for w in caught if "MetadataNormSync" in str(w.message)],
        "seen": module.seen,
        "inside": module.inside,
        "after": {k: type(m).__name__ for k, m in module.net.items()},
        "world_size": trainer.world_size,
    }
    torch.save(result, os.path.join(out, f"rank{trainer.global_rank}.pt"))


@pytest.fixture(scope="module")
def lightning_results(tmp_path_factory):
    if importlib.util.find_spec("pytorch_lightning") is None and (
        importlib.util.find_spec("lightning") is None
    ):
        pytest.skip("needs pytorch-lightning (metanorm[lightning]) or lightning")
    out = tmp_path_factory.mktemp("lightning")
    _run([sys.executable, str(Path(__file__).resolve()), "lightning", str(out)], cwd=out)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_lightning_plugin_syncs_inside_fit_and_reverts_after(lightning_results):
    for res in lightning_results:
        assert res["world_size"] == 2
        assert len(res["seen"]) == STEPS
        for step in res["seen"]:
            assert step["index"].shape == (GLOBAL_BATCH // 2,)
            assert step["types"]["mdn"] == "SyncMetadataNorm"
            # gloo (CPU): torch's SyncBatchNorm needs GPUs, so BatchNorm stays, with a warning
            assert step["types"]["bn"] == "BatchNorm1d"
        assert len(res["warnings"]) == 1 and "unsynced" in res["warnings"][0]
        assert res["after"] == {
            "fc1": "Linear",
            "mdn": "MetadataNorm",
            "fc2": "Linear",
            "bn_fc": "Linear",
            "bn": "BatchNorm1d",
        }


def _lightning_reference(batches):
    """One process, SGD over the given row index batches; the MDN net's final state."""
    x, y, design = _lightning_data()
    net = _lightning_net(design)
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    for rows in batches:
        opt.zero_grad()
        _lightning_loss(net, x[rows], design[rows], y[rows], bn=False).backward()
        opt.step()
    return {k: v for k, v in net.state_dict().items() if not k.startswith("bn")}


def test_lightning_run_matches_one_process_on_the_union_batches(lightning_results):
    r0, r1 = (
        {k: v for k, v in res["inside"].items() if not k.startswith("bn")}
        for res in lightning_results
    )
    for k in r0:
        torch.testing.assert_close(r0[k], r1[k], rtol=0, atol=0)  # the ranks agree exactly
    # one process on the union of the two ranks' batches, step by step (Lightning's
    # DistributedSampler shuffles: the rows each rank saw were recorded)
    seen0, seen1 = (res["seen"] for res in lightning_results)
    union = [torch.cat([a["index"], b["index"]]) for a, b in zip(seen0, seen1, strict=True)]
    assert all(len(set(u.tolist())) == GLOBAL_BATCH for u in union)
    _assert_same_state(r0, _lightning_reference(union), rtol=1e-5, atol=1e-6)
    # an unsynced MDN would have used rank 0's half batches: visibly different
    half = _lightning_reference([a["index"] for a in seen0])
    assert not torch.allclose(half["mdn.running_beta"], r0["mdn.running_beta"], atol=1e-3)


def _lightning_refit_job(out: str) -> None:
    """RefitRunningBeta under Lightning's ddp strategy: what each rank's validation uses."""
    try:
        import lightning.pytorch as pl
    except ImportError:
        import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    from metanorm.integrations.lightning import LogProbe, RefitRunningBeta

    torch.set_num_threads(1)
    x, y, design = _lightning_data()

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _lightning_net(design)
            self.seen = []

        def training_step(self, batch, batch_idx):
            _, xb, yb, rows = batch
            return _lightning_loss(self.net, xb, rows, yb)

        def validation_step(self, batch, batch_idx):
            if batch_idx == 0:
                self.seen.append({k: v.detach().clone() for k, v in self.net.state_dict().items()})

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR)

    data = TensorDataset(torch.arange(N_ROWS), x, y, design)

    def call(m, b):
        return m.net["mdn"](m.net["fc1"](b[1]), b[3])

    # the probe runs on rank 0 alone, inside fit, while rank 1 waits at the end of validation
    probe = LogProbe(
        metadata=0, modules=["net.fc1", "net.mdn"], targets=lambda b: (b[2], b[3]), call=call
    )
    trainer = pl.Trainer(
        strategy="ddp",
        devices=2,
        accelerator="cpu",
        max_epochs=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
        callbacks=[RefitRunningBeta(call=call), probe],
    )
    loader = DataLoader(data, batch_size=GLOBAL_BATCH // 2)
    trainer.fit(Module(), loader, DataLoader(data, batch_size=N_ROWS))
    torch.save(trainer.lightning_module.seen, os.path.join(out, f"rank{trainer.global_rank}.pt"))
    probed = {epoch: result.to_dicts() for epoch, result in probe.results.items()}
    torch.save(probed, os.path.join(out, f"probe{trainer.global_rank}.pt"))


def test_lightning_refit_callback_under_ddp(tmp_path):
    """Both ranks validate with the least-squares β over the union of their shards."""
    if importlib.util.find_spec("pytorch_lightning") is None and (
        importlib.util.find_spec("lightning") is None
    ):
        pytest.skip("needs pytorch-lightning (metanorm[lightning]) or lightning")
    _run(
        [sys.executable, str(Path(__file__).resolve()), "lightning-refit", str(tmp_path)], tmp_path
    )
    seen = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert len(seen[0]) == len(seen[1]) == 1  # one validation, after the one epoch
    r0, r1 = seen[0][0], seen[1][0]
    for k in r0:
        torch.testing.assert_close(r0[k], r1[k], rtol=0, atol=0)  # the ranks agree exactly
    x, _, design = _lightning_data()
    features = (x @ r0["fc1.weight"].T + r0["fc1.bias"]).double()
    want = torch.linalg.lstsq(design.double(), features).solution.float()  # all 32 rows
    torch.testing.assert_close(r0["mdn.running_beta"], want, rtol=1e-4, atol=1e-5)
    # LogProbe: rank 0 probed its shard of the validation set (16 of the 32 rows), rank 1 nothing
    probes = [torch.load(tmp_path / f"probe{r}.pt", weights_only=False) for r in range(2)]
    assert list(probes[0]) == [0] and probes[1] == {}
    assert [(r["module"], r["num_samples"]) for r in probes[0][0]] == [
        ("net.fc1", N_ROWS // 2),
        ("net.mdn", N_ROWS // 2),
    ]


if __name__ == "__main__":
    if sys.argv[1:2] == ["lightning"]:
        _lightning_job(sys.argv[2])
    elif sys.argv[1:2] == ["lightning-refit"]:
        _lightning_refit_job(sys.argv[2])
    else:
        raise SystemExit(f"usage: {sys.argv[0]} lightning|lightning-refit OUT")
    # Lightning leaves its gloo group up; torn down by the interpreter's exit, its threads can
    # abort the process ("terminate called without an active exception") after the results
    # are written, so it is destroyed here, on both ranks
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
