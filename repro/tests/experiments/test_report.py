"""The sweep summary: means and standard deviations over seeds, paired time ratios."""

import numpy as np
import pytest

from metanorm_repro.experiments import (
    summarize,
)


def test_summarize_mean_and_std_over_seeds():
    def result(seed, bacc, d0, method="none", t=1.0):
        return {
            "final": {
                "method": method,
                "batch_size": 64,
                "seed": seed,
                "test_balanced_accuracy": bacc,
                "val_dcor2": {"0": d0, "1": d0},
                "test_dcor2": {"0": d0, "1": d0},
                "test_recall": {"0": bacc, "1": bacc},
                "test_group_accuracy": {},
                "epoch_time_s_median": t,
            }
        }

    rows = summarize(
        [
            result(0, 0.9, 0.3),
            result(1, 0.8, 0.1, t=2.0),
            result(0, 0.8, 0.0, "mdn-conv", 1.5),
            result(1, 0.8, 0.0, "mdn-conv", 5.0),
        ]
    )
    base = next(r for r in rows if r["method"] == "none")
    assert base["seeds"] == 2
    assert base["test_bacc"] == pytest.approx(0.85)
    assert base["test_bacc_std"] == pytest.approx(np.std([0.9, 0.8], ddof=1))
    assert base["val_dcor2_0"] == pytest.approx(0.2)
    mdn = next(r for r in rows if r["method"] == "mdn-conv")
    assert mdn["time_ratio"] == pytest.approx((1.5 / 1.0 + 5.0 / 2.0) / 2)  # paired, per seed
