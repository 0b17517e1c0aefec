"""``metanorm reproduce synthetic`` end to end on a tiny configuration: files, run folders, report."""

import csv
import json

import numpy as np
import pytest
import torch

from metanorm.cli import main
from metanorm_repro.experiments import RunConfig
from metanorm_repro.experiments.runner import prepare_run
from metanorm_repro.models import PaperCNN

TINY = ["--n-per-class", "40", "--epochs", "2", "--batch-sizes", "30", "--threads", "1", "--quiet"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """The whole command on a tiny configuration (80 training images; 30 does not divide 80)."""
    out = tmp_path_factory.mktemp("sweep") / "synthetic"
    rc = main(
        ["reproduce", "synthetic", "--out", str(out), "--methods", "baseline", "mdn-conv", *TINY]
    )
    assert rc == 0
    return out


#: The line of every report's Files section about the result files (experiments and studies).
FILES_LINE = (
    "- `results.json`: the results, unrounded; `run.json`: the command, the settings and the "
    "wall time"
)


def test_sweep_writes_every_file(sweep):
    for name in (
        "report.md",
        "results.json",
        "run.json",
        "summary.csv",
        "dcor2_per_epoch.png",
        "val_bacc_per_epoch.png",
        "features_pca.png",
    ):
        assert (sweep / name).is_file(), name
    assert (sweep / "features_pca.png").read_bytes()[:4] == b"\x89PNG"
    run = json.loads((sweep / "run.json").read_text())
    assert run["name"] == "synthetic" and run["command"].startswith("metanorm reproduce synthetic")
    assert run["settings"]["methods"] == ["none", "mdn-conv"] and run["wall_time_s"] > 0
    # the report ends with the Files section every entry's report ends with
    report = (sweep / "report.md").read_text()
    files = report[report.index("## Files") :].splitlines()
    assert files[2] == "- `runs/`: one folder per run unit (2), each with the files it wrote"
    assert files[3] == FILES_LINE
    assert "- `features_pca.png`" in files and "- `summary.csv`" in files
    assert "Each run folder `runs/bs{B}/{method}/seed{S}/` holds `config.json`" in report


def test_run_folder_contents_are_sane(sweep):
    run = sweep / "runs" / "bs30" / "mdn-conv" / "seed0"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["config"]["method"] == "mdn-conv" and cfg["config"]["batch_size"] == 30
    assert cfg["design"] == {"columns": ["y", "cf", "intercept"], "keep": ["y"]}
    assert cfg["sizes"] == {"train": 80, "val": 80, "test": 80}
    assert cfg["batches_per_epoch"] == 3  # 30 + 30 + 20
    with open(run / "epochs.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    # the default cosine schedule: lr, then lr·(1 + cos(π/2))/2 = lr/2
    assert cfg["config"]["lr_schedule"] == "cosine"
    lr = cfg["config"]["lr"]
    assert [float(r["lr"]) for r in rows] == pytest.approx([lr, lr / 2])
    for r in rows:
        assert float(r["train_loss"]) > 0 and float(r["epoch_time_s"]) > 0
        assert 0 <= float(r["val_balanced_accuracy"]) <= 1
        assert -0.2 <= float(r["val_dcor2_0"]) <= 1 and -0.2 <= float(r["val_dcor2_1"]) <= 1
    final = json.loads((run / "final.json").read_text())
    assert 0 <= final["test_balanced_accuracy"] <= 1
    assert set(final["test_recall"]) == {"0", "1"} and set(final["test_dcor2"]) == {"0", "1"}
    assert final["test_balanced_accuracy"] == pytest.approx(
        np.mean(list(final["test_recall"].values()))
    )
    assert set(final["test_group_accuracy"]) <= {"[1,2)", "[2,3)", "[3,4)", "[4,5)", "[5,6]"}
    assert final["val_dcor2"]["0"] == pytest.approx(float(rows[-1]["val_dcor2_0"]))
    # the checkpoint restores the model, MDN buffers included
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    assert ckpt["design_columns"] == ["y", "cf", "intercept"]
    # into the same model rebuilt from the run's config (its own training design) ...
    model = prepare_run(RunConfig.from_dict(cfg["config"])).model
    model.load_state_dict(ckpt["model"])
    # ... while a model built on another design refuses it (it would change what is removed)
    other = torch.zeros(80, 3)
    other[:, 2] = 1
    other[:40, 0] = 1
    other[:, 1] = torch.linspace(-1, 1, 80)
    with pytest.raises(ValueError, match="another design"):
        PaperCNN("mdn-conv", other, keep=[0]).load_state_dict(ckpt["model"])
    # the default refit: after the last epoch each running β comes from one pass over the
    # 80 training images (one batch of at most 500)
    assert cfg["config"]["refit_running_beta"] is True
    assert int(model.norm3.num_batches_tracked) == 1
    assert int(model.norm3.num_samples_tracked) == 80
    with np.load(run / "test_features.npz") as z:
        assert z["features"].shape == (80, 84) and z["labels"].shape == (80,)
        assert z["confounder"].shape == (80,)


def test_report_contents(sweep):
    text = (sweep / "report.md").read_text()
    assert "| Baseline | 30 |" in text and "| MDN-Conv | 30 |" in text
    assert "The authors' figures" in text and "0.944" in text
    assert "## Checks" in text and "epoch time" not in text.split("## Checks")[1].split("##")[0]
    # epoch times are timing information beside the checks, never a PASS/FAIL line
    timing = text.split("## Timing (information, not a check)")[1].split("##")[0]
    assert "- MDN-Conv bs=30: epoch" in timing and "× the Baseline's" in timing
    assert "![features_pca.png](features_pca.png)" in text
    summary = json.loads((sweep / "results.json").read_text())
    rows = {r["method"]: r for r in summary["rows"]}
    assert rows["none"]["time_ratio"] == pytest.approx(1.0)
    hist = {}
    for m in ("none", "mdn-conv"):
        with open(sweep / f"runs/bs30/{m}/seed0/epochs.csv") as f:
            hist[m] = np.array([float(r["epoch_time_s"]) for r in csv.DictReader(f)])
    # the paired ratio: median over epochs of (method's epoch e) / (baseline's epoch e)
    assert rows["mdn-conv"]["time_ratio"] == pytest.approx(
        np.median(hist["mdn-conv"] / hist["none"])
    )
    final = json.loads((sweep / "runs/bs30/none/seed0/final.json").read_text())
    assert rows["none"]["test_bacc"] == pytest.approx(final["test_balanced_accuracy"])


def test_refuses_to_overwrite(sweep, capsys):
    before = (sweep / "report.md").read_bytes()
    rc = main(["reproduce", "synthetic", "--out", str(sweep), "--methods", "baseline", *TINY])
    assert rc == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (sweep / "report.md").read_bytes() == before


def test_report_shows_intervals_of_the_test_metrics(sweep):
    text = (sweep / "report.md").read_text()
    section = text.split("## 95 % intervals")[1].split("\n## ")[0]
    assert "| Baseline | 30 |" in section and "half-samples" in section
    final = json.loads((sweep / "runs/bs30/mdn-conv/seed0/final.json").read_text())
    iv = final["test_intervals"]
    low, high = iv["balanced_accuracy"]
    assert low <= final["test_balanced_accuracy"] <= high and iv["confidence"] == 0.95
    assert f"{final['test_balanced_accuracy']:.3f} [{low:.3f}, {high:.3f}]" in section
    assert iv["resamples"] == {"balanced_accuracy": 1000, "dcor2": 100}
    for c, pair in iv["dcor2"].items():  # 40 test images per class: defined intervals
        assert pair[0] <= final["test_dcor2"][c] <= pair[1]


def test_report_probes_the_baseline_and_mdn_models(sweep):
    """probe.png / probe.json: the features layer's dcor² equals the run's own last validation
    evaluation (the oracle: the engine's metric on the same 80 validation images)."""
    assert (sweep / "probe.png").read_bytes()[:4] == b"\x89PNG"
    assert "![probe.png](probe.png)" in (sweep / "report.md").read_text()
    probe = json.loads((sweep / "probe.json").read_text())
    assert set(probe["models"]) == {"Baseline", "MDN-Conv"}
    for label, method in (("Baseline", "none"), ("MDN-Conv", "mdn-conv")):
        records = {r["module"]: r for r in probe["models"][label]}
        assert {"conv1", "norm1", "conv2", "norm2", "fc1", "norm3"} <= set(records)
        with open(sweep / "runs" / "bs30" / method / "seed0" / "epochs.csv") as f:
            last = list(csv.DictReader(f))[-1]
        for c, v in records["norm3"]["dcor2_by_class"].items():
            assert v == pytest.approx(float(last[f"val_dcor2_{c}"]), rel=1e-5, abs=1e-7)
        assert records["norm3"]["num_samples"] == 80
