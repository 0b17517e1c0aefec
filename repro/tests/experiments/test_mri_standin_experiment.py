import json

import dcor
import numpy as np
import pytest

pytest.importorskip(
    "nilearn",
    reason="nilearn not installed (pip install 'metanorm-repro[nilearn]'): no MNI152 template",
)

from metanorm.cli import main
from metanorm_repro.datasets import make_multisite_mri_standin
from metanorm_repro.experiments import RunConfig, get_experiment, prepare_run


def test_mri_standin_registered_and_prepared():
    exp = get_experiment("multisite-mri-standin")
    assert {"n_per_site", "volume_shape", "site_noise", "covariates"} <= set(exp.options)
    opts = {"n_per_site": 6, "n_eval_per_site": 4, "volume_shape": [16, 16, 16]}
    run = prepare_run(RunConfig("multisite-mri-standin", method="mdn", options=opts))
    assert run.design.columns == ("y", "site=siteB", "site=siteC", "age", "sex=M", "intercept")
    assert [s.name for s in run.splits] == ["train", "val", "test", "test_reversed"]
    assert type(run.model).__name__ == "StandInCNN3d"
    with pytest.raises(ValueError, match="no data folder"):
        prepare_run(RunConfig("multisite-mri-standin", options={"data": "/tmp", **opts}))


def test_mri_standin_reproduce_end_to_end(tmp_path):
    out = tmp_path / "out"
    argv = ["reproduce", "multisite-mri-standin", "--out", str(out), "--epochs", "1"]
    argv += ["--batch-sizes", "8", "--seeds", "1", "--quiet"]  # the plots read the site column
    argv += ["--option", "n_per_site=8", "--option", "n_eval_per_site=6"]
    argv += ["--option", "volume_shape=[16,16,16]"]
    assert main(argv) == 0
    report = (out / "report.md").read_text()
    assert "| MDN | 8 |" in report and "| BatchNorm | 8 |" in report
    assert "test_reversed" in report
    assert (out / "features_pca.png").is_file()  # reads the string site column back
    run = out / "runs/bs8/mdn/seed0"
    final = json.loads((run / "final.json").read_text())
    assert set(final["eval_splits"]) == {"test", "test_reversed"}
    # dcor² per class against the one-hot site, from the dcor package
    z = np.load(run / "test_features.npz")
    test = make_multisite_mri_standin(n_per_site=8, n_eval_per_site=6, volume_shape=(16,) * 3)
    site = test["test"].metadata["site"]
    np.testing.assert_array_equal(z["labels"], test["test"].labels.numpy())
    onehot = np.stack([(site == k).astype(float) for k in ("siteA", "siteB", "siteC")], 1)
    np.testing.assert_array_equal(z["metric"], onehot)
    for c, v in final["test_dcor2"].items():
        sel = z["labels"] == int(c)
        want = dcor.u_distance_correlation_sqr(z["features"][sel].astype(np.float64), onehot[sel])
        assert v == pytest.approx(want, abs=1e-5)
