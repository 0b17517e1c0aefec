"""The probe on the synthetic task: it finds cf before MDN and not after.

The experiment's own evaluation of fc1 (the harness's) is the oracle for that layer.
"""

import pytest
import torch

import metanorm as mn

# The synthetic task: 1000 training images (500 per class, drawn from a training split of 1000
# per class), 3 epochs, batch 50, Adam 2e-3; the running β then refitted on the whole training
# split (2000 images, one forward pass); probed on 500 validation images. Over seeds 0-9 (AMD
# EPYC, 1 thread; seed s for the data, the weights and the shuffling):
#   Baseline: conv1/conv2 dcor² ≥ 0.410, fc1 dcor² 0.212-0.466, fc1 probe R² ≥ 0.983
#   MDN-Conv: dcor² after each MDN layer ≤ 0.017; probe R² after them -0.038 to 0.035
# Bars: 0.05 after MDN and 0.2 for the Baseline's fc1, as asked (both met on every seed, the
# Baseline's fc1 only just: it grows with the training size; it was 0.136-0.271 with 150 images
# per class and 0.165-0.343 with 300, 3 epochs, and 0.144-0.430 with 150 per class, 6 epochs),
# the other bars the worst values less a margin of 0.05. The refit on more images is what
# brings the probe after MDN under 0.05: with β refitted on the training images themselves (150
# per class) the probe R² after MDN was 0.02-0.36, the estimation error of β leaving a small cf
# slope in each of the many columns, which a linear probe on held-out data pools (dcor² does
# not); the same training refitted on 1000 per class gave -0.027 to 0.036.
N_TRAIN, N_REFIT = 500, 1000  # per class


@pytest.fixture(scope="module")
def synthetic_models():
    from torch.utils.data import DataLoader, Subset

    from metanorm.datasets import DesignDataset
    from metanorm_repro.experiments import RunConfig
    from metanorm_repro.experiments.engine import evaluate, train_one_epoch
    from metanorm_repro.experiments.runner import prepare_run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {}
    try:
        for method in ("none", "mdn-conv"):
            config = RunConfig(
                experiment="synthetic",
                method=method,
                n_per_class=N_REFIT,
                options={"n_eval_per_class": 250},
            )
            torch.manual_seed(0)
            run = prepare_run(config)
            full = DesignDataset(run.splits[0], run.rows[0])
            pick = torch.randperm(len(full), generator=torch.Generator().manual_seed(0))
            train = Subset(full, pick[: 2 * N_TRAIN].tolist())
            loader = DataLoader(
                train, batch_size=50, shuffle=True, generator=torch.Generator().manual_seed(0)
            )
            opt = torch.optim.Adam(run.model.parameters(), lr=2e-3)
            for _ in range(3):
                train_one_epoch(run.model, loader, opt)

            def call(model, batch):
                return model(batch[0], batch[2])

            mn.nn.utils.refit_running_beta(run.model, DataLoader(full, batch_size=500), call=call)
            val = DataLoader(DesignDataset(run.splits[1], run.rows[1]), batch_size=500)
            report = evaluate(run.model, val, confounder=run.metrics[1])
            result = mn.probe(run.model, val, metadata=1, call=call, label=method)
            out[method] = (result, report)
    finally:
        torch.set_num_threads(threads)
    return out


def test_synthetic_probe_finds_cf_before_mdn_and_not_after(synthetic_models):
    base, base_report = synthetic_models["none"]
    mdn, mdn_report = synthetic_models["mdn-conv"]
    # the oracle for fc1: the experiment's own evaluation (features after the norm, before ReLU)
    for result, report in ((base, base_report), (mdn, mdn_report)):
        for c, v in report["dcor2"].items():
            assert result["norm3"].dcor2_by_class[c] == pytest.approx(v, rel=1e-6, abs=1e-9)
    assert [r.module for r in mdn] == ["conv1", "norm1", "conv2", "norm2", "fc1", "norm3", "fc2"]
    assert min(base["conv1"].dcor2, base["conv2"].dcor2) > 0.36
    assert base["norm3"].dcor2 >= 0.2
    assert base["norm3"].probe_r2 > 0.93
    for name in ("norm1", "norm2", "norm3"):
        assert mn.nn.MetadataNorm.__name__ == mdn[name].kind
        assert mdn[name].dcor2 <= 0.05, (name, mdn[name])
        assert mdn[name].probe_r2 <= 0.05, (name, mdn[name])
