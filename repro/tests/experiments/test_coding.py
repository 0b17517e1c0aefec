"""The one design coding of the experiments, and the bias metric's metadata matrix."""

import numpy as np
import torch

from metanorm.datasets import DataSplit
from metanorm_repro.experiments import get_experiment
from metanorm_repro.experiments.coding import (
    build_designs,
    design_data,
    expand_columns,
    fit_design_builder,
    metric_matrix,
)


def _split(name, labels, **metadata):
    n = len(labels)
    return DataSplit(
        images=torch.zeros(n, 1, 4, 4),
        labels=torch.as_tensor(labels),
        metadata={k: np.asarray(v) for k, v in metadata.items()},
        name=name,
    )


def test_one_design_coding_label_raw_metadata_standardised():
    # multisite-mri: site and sex one-hot, age standardised, the 0/1 label raw (never scaled)
    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 10)
    site = np.array(["a", "b", "c", "b"] * 5)
    age = rng.uniform(20, 80, 20)
    sex = np.array(["f", "m"] * 5 + ["m", "f"] * 5)
    train = _split("train", y, site=site, age=age, sex=sex)
    test = _split("test", y[:8], site=site[:8], age=age[:8], sex=sex[:8])
    exp = get_experiment("multisite-mri")
    builder, (rows, test_rows) = build_designs(exp, (train, test))
    assert builder.columns == ("y", "site=b", "site=c", "age", "sex=m", "intercept")
    np.testing.assert_array_equal(rows[:, 0].numpy(), y)  # the label as it is
    z = (age - age.mean()) / age.std()
    np.testing.assert_allclose(rows[:, 3].numpy(), z, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(rows[:, 1].numpy(), site == "b")
    np.testing.assert_allclose(test_rows[:, 3].numpy(), z[:8], rtol=1e-5, atol=1e-6)
    # the metric: the site one-hot with every training level (no reference dropped)
    m = metric_matrix(exp, test, train)
    np.testing.assert_array_equal(m, np.stack([site[:8] == v for v in "abc"], 1).astype(float))
    # three classes: the label one-hot (class 0 the reference), still 0/1
    y3 = np.arange(20) % 3
    _, (rows3,) = build_designs(exp, (_split("train", y3, site=site, age=age, sex=sex),))
    np.testing.assert_array_equal(rows3[:, :2].numpy(), np.stack([y3 == 1, y3 == 2], 1))


def test_patterns_labels_and_errors():
    import pytest

    s = _split("train", [0, 1, 0, 1], **{"scene=b": [1, 0, 0, 1], "scene=a": [0, 1, 1, 1]})
    assert expand_columns(["scene=*"], s) == ("scene=a", "scene=b")
    with pytest.raises(ValueError, match="matches"):
        expand_columns(["site*"], s)
    with pytest.raises(ValueError, match="lacks"):
        expand_columns(["site"], s)
    assert (design_data(s, ["scene=a"], labels=False)["y"] == 0).all()
    with pytest.raises(ValueError, match="lacks"):
        design_data(s, ["age"])
    builder = fit_design_builder(s, ["scene=a"], standardize=True)
    assert builder.columns == ("y", "scene=a", "intercept")
